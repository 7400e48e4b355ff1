"""Mail backends: a real SMTP server receives the welcome mail, an SMTP server
that is down is waited for, and the folder backend writes whole files only."""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from celery import Celery, signals
from sqlalchemy import select

import proj.jobs.testing
from proj.config import current_settings, use_settings
from proj.db import session_scope
from proj.jobs import ConfigurationError
from proj.mail import FolderMailer, SmtpMailer, mailer_for
from proj.models import User
from proj.tasks import send_welcome


class Inbox:
    """An aiosmtpd handler keeping every envelope it is given."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


@contextmanager
def smtp_server(port: int) -> Iterator[Inbox]:
    """A real SMTP server on 127.0.0.1:``port`` until the block ends."""
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()


@contextmanager
def mail_url(url: str) -> Iterator[None]:
    """Send mail (in this process, workers included) through ``url``."""
    before = current_settings()
    use_settings(replace(before, mail_url=url))
    try:
        yield
    finally:
        use_settings(before)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def new_user() -> tuple[int, str]:
    address = f"mail-{uuid.uuid4().hex[:12]}@example.com"
    with session_scope() as session:
        user = User(email=address)
        session.add(user)
        session.flush()
        return user.id, address


def welcomed(user_id: int) -> bool:
    with session_scope() as session:
        return session.scalar(select(User.welcomed_at).filter_by(id=user_id)) is not None


def subject_of(envelope: Envelope) -> str:
    content = envelope.content
    assert isinstance(content, bytes)
    return str(email.message_from_bytes(content, policy=email.policy.default)["Subject"])


def test_welcome_mail_over_smtp(purged: Celery) -> None:
    """send_welcome on a worker delivers the welcome mail to a real SMTP server."""
    user_id, address = new_user()
    port = closed_port()
    with (
        smtp_server(port) as inbox,
        mail_url(f"smtp://127.0.0.1:{port}"),
        proj.jobs.testing.worker(purged, pool="threads", concurrency=2),
    ):
        send_welcome.delay(user_id)
        proj.jobs.testing.wait_for(lambda: welcomed(user_id))
    assert [envelope.rcpt_tos for envelope in inbox.envelopes] == [[address]]
    assert subject_of(inbox.envelopes[0]) == "Welcome!"


def test_welcome_waits_for_smtp_server(purged: Celery) -> None:
    """With the SMTP server down, send_welcome is retried (not failed) and the
    mail arrives once the server is up."""
    user_id, address = new_user()
    port = closed_port()
    retries: list[BaseException] = []  # celery.exceptions.Retry, holding the error
    first_retry = threading.Event()

    def on_retry(request: Any, reason: BaseException, **_: Any) -> None:
        if request.id == job_id:
            retries.append(reason)
            first_retry.set()

    signals.task_retry.connect(on_retry)
    try:
        with (
            mail_url(f"smtp://127.0.0.1:{port}"),
            proj.jobs.testing.worker(purged, pool="threads", concurrency=2),
        ):
            job_id = send_welcome.apply_async((user_id,), countdown=0.1).id
            proj.jobs.testing.wait_for(first_retry.is_set)
            assert not welcomed(user_id)
            with smtp_server(port) as inbox:
                proj.jobs.testing.wait_for(lambda: welcomed(user_id))
    finally:
        signals.task_retry.disconnect(on_retry)
    assert isinstance(getattr(retries[0], "exc", None), ConnectionRefusedError)
    assert [envelope.rcpt_tos for envelope in inbox.envelopes] == [[address]]
    assert subject_of(inbox.envelopes[0]) == "Welcome!"


@pytest.mark.parametrize(
    "url", ["ftp://mail.example.com", "smtp://127.0.0.1:port", "file://somehost/mail", "mail"]
)
def test_mailer_for_refuses_what_it_cannot_use(url: str) -> None:
    """A mail URL proj has no backend for is a ConfigurationError naming the setting."""
    with pytest.raises(ConfigurationError, match="PROJ_MAIL_URL"):
        mailer_for(url)


def test_mailer_for_known_schemes(tmp_path: Path) -> None:
    """smtp:// and file:// URLs give the mailer and the place they name."""
    smtp = mailer_for("smtp://127.0.0.1:2525")
    assert isinstance(smtp, SmtpMailer) and (smtp.host, smtp.port) == ("127.0.0.1", 2525)
    folder = mailer_for(f"file://{tmp_path}/mail")
    assert isinstance(folder, FolderMailer) and folder.folder == tmp_path / "mail"


def test_folder_mailer_writes_whole_files(tmp_path: Path) -> None:
    """Each message becomes one complete .eml file; no temporary file is left."""
    folder = tmp_path / "mail"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.com", "Hi"
    message.set_content("hello\n")
    FolderMailer(folder).send(message)
    FolderMailer(folder).send(message)
    files = sorted(folder.iterdir())
    assert [path.suffix for path in files] == [".eml", ".eml"]
    for path in files:
        assert path.read_bytes() == bytes(message)
