"""Sending mail through the backend ``PROJ_MAIL_URL`` names.

- ``smtp://host:port``: a real SMTP server;
- ``file:///folder``: one ``.eml`` file a message (the embedded default).
"""

from __future__ import annotations

import os
import smtplib
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from proj.config import current_settings
from proj.jobs import ConfigurationError


class Mailer(Protocol):
    """What sends the application's mail: SMTP, or a folder of ``.eml`` files."""

    def send(self, message: EmailMessage) -> None:
        """Deliver ``message`` or raise."""
        ...


class SmtpMailer:
    """Delivers to an SMTP server."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    def send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.send_message(message)


class FolderMailer:
    """Writes each message to ``<folder>/<id>.eml``, atomically: a reader of the
    folder sees whole messages only, and a failed write leaves nothing behind."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, message: EmailMessage) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        partial = self.folder / f".{name}.tmp"
        try:
            partial.write_bytes(bytes(message))
            os.replace(partial, self.folder / f"{name}.eml")
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def mailer_for(url: str) -> Mailer:
    """The mailer for ``url``; :class:`ConfigurationError` if proj has none."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "smtp" and not parts.path.strip("/"):
            return SmtpMailer(parts.hostname or "localhost", parts.port or 25)
        if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
            return FolderMailer(Path(unquote(parts.path)))
    except ValueError:  # a port that is not a number
        pass
    raise ConfigurationError(
        f"PROJ_MAIL_URL={url!r}: use smtp://host:port or file:///absolute/folder."
    )


def send_mail(to: str, subject: str, body: str) -> None:
    """Compose a plain-text message and send it with the configured mailer."""
    settings = current_settings()
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    mailer_for(settings.mail_url).send(message)
