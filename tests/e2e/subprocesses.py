"""The real commands as subprocesses, for the end-to-end tier.

A :class:`Command` writes its output to a log file; tests wait for readiness
and effects by polling it, and :meth:`Command.stop` ends it however a test ends
(a signal, then SIGKILL for it and any child that outlives it).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

from proj.jobs.testing import wait_for

T = TypeVar("T")

E2E_DIR = Path(__file__).parent
BIN = Path(sys.executable).parent
"""The virtualenv's scripts (``proj``, ``celery``, ``flask``)."""

WORKER_OPTIONS = (
    "--pool=prefork",
    "--concurrency=2",
    "--without-heartbeat",
    "--without-mingle",
    "--without-gossip",
    "--loglevel=INFO",
)


def problems(output: str) -> str:
    """The lines of a log that are not INFO or DEBUG (warnings, errors, tracebacks)."""
    routine = re.compile(r"^\[[^\]]*: (INFO|DEBUG)/")
    return "\n".join(line for line in output.splitlines() if not routine.match(line))


class Command:
    """A running command, its output going to ``log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                args,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # A group of its own: a Ctrl-C meant for pytest does not reach
                # it, and a test can send one to the whole group.
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self, since: int = 0) -> str:
        """What the command has written so far (from byte ``since`` on)."""
        with self.log.open("rb") as log:
            log.seek(since)
            return log.read().decode("utf-8", errors="replace")

    def size(self) -> int:
        """Bytes written so far (an offset for :meth:`output`)."""
        return self.log.stat().st_size

    def wait_for_output(
        self, text: str | re.Pattern[str], *, count: int = 1, since: int = 0, timeout: float = 90.0
    ) -> None:
        """Wait until ``text`` (a string or a pattern) appears ``count`` times;
        fail with the log if the command exits first or time runs out."""

        def seen() -> int:
            output = self.output(since)
            return output.count(text) if isinstance(text, str) else len(text.findall(output))

        with contextlib.suppress(AssertionError):
            wait_for(lambda: seen() >= count or self.popen.poll() is not None, timeout=timeout)
        if seen() < count:
            raise AssertionError(
                f"{self.name}: {text!r} not {count} times in its output "
                f"(exit code {self.popen.poll()}):\n{self.output(since)[-5000:]}"
            )

    def until(self, condition: Callable[[], T], *, timeout: float = 30.0) -> T:
        """:func:`~proj.jobs.testing.wait_for` ``condition``, failing with this
        command's log (where the reason usually is)."""
        try:
            return wait_for(condition, timeout=timeout)
        except AssertionError as exc:
            output = self.output()
            raise AssertionError(
                f"{exc}; {self.name}'s warnings and errors:\n{problems(output)[-5000:]}\n"
                f"the end of its output:\n{output[-3000:]}"
            ) from None

    def children(self) -> list[psutil.Process]:
        """Its living descendants."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig``, wait, then kill it and whatever it left; its exit code."""
        family = self.children()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        _, alive = psutil.wait_procs(family, timeout=10)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=10)
        return self.popen.returncode


class Commands:
    """Starts commands with their logs in ``folder``; :meth:`stop_all` ends them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Command] = []

    def start(self, name: str, *args: str, env: dict[str, str], cwd: Path | None = None) -> Command:
        log = self.folder / f"{name}.log"
        if log.exists():
            log = self.folder / f"{name}-{len(self.started)}.log"
        command = Command(name, list(args), env, log, cwd or self.folder)
        self.started.append(command)
        return command

    def celery(self, name: str, *args: str, env: dict[str, str]) -> Command:
        """``celery -A proj <args>``."""
        return self.start(name, sys.executable, "-m", "celery", "-A", "proj", *args, env=env)

    def worker(self, env: dict[str, str]) -> Command:
        """A prefork worker with two children and the test tasks, once it is ready."""
        node = f"e2e-{uuid.uuid4().hex[:8]}@%h"
        worker = self.celery(
            "worker",
            "worker",
            *WORKER_OPTIONS,
            "-n",
            node,
            "--include=e2e_tasks",
            env=e2e_env(env),
        )
        worker.wait_for_output("ready.")
        return worker

    def web(self, env: dict[str, str]) -> tuple[Command, str]:
        """``flask --app proj.web run`` on a free port, once it answers; its URL."""
        port = free_port()
        web = self.start(
            "web",
            sys.executable,
            *("-m", "flask", "--app", "proj.web", "run", "--port", str(port)),
            env=env,
        )
        web.wait_for_output(f"Running on http://127.0.0.1:{port}")
        return web, f"http://127.0.0.1:{port}"

    def relay(self, env: dict[str, str]) -> Command:
        """``proj relay``, once it has started publishing."""
        relay = self.start("relay", str(BIN / "proj"), "relay", env=env)
        relay.wait_for_output("proj relay: publishing")
        return relay

    def stop_all(self) -> None:
        """Stop every command started (all of them, even if one fails to stop)."""
        problems = []
        for command in reversed(self.started):
            try:
                command.stop()
            except Exception as exc:
                problems.append(exc)
        if problems:
            raise problems[0]


def e2e_env(base: dict[str, str]) -> dict[str, str]:
    """``base`` with the test tasks importable (``--include e2e_tasks``)."""
    path = os.pathsep.join(p for p in (str(E2E_DIR), base.get("PYTHONPATH")) if p)
    return {**base, "PYTHONPATH": path}


def enqueue_effects(env: dict[str, str], tag: str, count: int, seconds: float = 0.0) -> list[str]:
    """In a process of its own on ``env``: enqueue ``count`` ``e2e.record_effect``
    jobs with ``delay_on_commit`` in one transaction (see ``e2e_tasks``); their ids."""
    code = (
        "import sys, e2e_tasks\n"
        "ids = e2e_tasks.enqueue_effects(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))\n"
        "print('\\n'.join(ids))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, tag, str(count), str(seconds)],
        env=e2e_env(env),
        cwd=E2E_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


def api_token(env: dict[str, str], role: str = "operator") -> str:
    """A new API token with ``role``, made by ``proj token add`` on ``env``'s
    database (it prints the token on its last line)."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    done = subprocess.run(
        [str(BIN / "proj"), "token", "add", name, "--role", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()[-1]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
