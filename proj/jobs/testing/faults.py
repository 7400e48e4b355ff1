"""Fault injection: servers a test owns, so it can take them down without
touching the machine's shared PostgreSQL, Redis and RabbitMQ:

- :class:`TcpProxy`: a forwarder in front of a real server; stopping it
  closes every connection through it and refuses new ones, so for its clients
  the server is down; starting it again listens on the same port;
  blackholing it keeps every connection open but forwards nothing (a network
  partition, a failover that drops packets) until it is restored;
- :class:`RedisServer`: a private ``redis-server`` without persistence, which a
  test kills (its data is lost) and starts again;
- :class:`PostgresCluster`: a private PostgreSQL cluster (``initdb`` in a temp
  folder, run as the ``postgres`` user), stopped and started again by the test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import psycopg2
import redis

from proj.jobs.testing.workers import wait_for


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpProxy:
    """Forwards TCP connections from ``port`` on loopback to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        """The loopback port clients connect to instead of ``target``."""
        self.connections = 0
        """Connections accepted so far (to check that clients do go through it)."""
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen on :attr:`port` (again)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening and close every connection through the proxy."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    def blackhole(self) -> None:
        """Forward nothing more, either way, while every connection stays open
        and new ones are accepted: for its clients the server went silent."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again what was held back, and whatever comes next."""
        self._flowing.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._open |= {client, upstream}
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()  # held, not lost, while blackholed
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, sink}
            _close(source)
            _close(sink)

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class RedisServer:
    """A private ``redis-server`` on a free port: no snapshots, no append-only
    file, so a restart loses everything it held."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, socket_timeout=5)

    def start(self) -> None:
        """Start it (again) and wait until it answers."""
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--dir", str(self.folder)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        wait_for(self._answers, timeout=30)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            assert self.process is not None and self.process.poll() is None, "redis-server exited"
            return False

    def kill(self) -> None:
        """kill -9: whatever it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs, if they are installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def private_postgres_problem() -> str | None:
    """Why a private PostgreSQL cluster cannot run here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    if os.geteuid() != 0:
        return "starting a private PostgreSQL cluster as the postgres user needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres user to run a private cluster as"
    return None


class PostgresCluster:
    """A private PostgreSQL cluster in a temp folder, on a free port, run as
    the ``postgres`` user (trust authentication, no fsync: it is thrown away)."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None, private_postgres_problem()
        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="proj-e2e-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.port = free_port()
        self.started = False

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / program), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def init(self) -> None:
        self._run(
            "initdb",
            *("-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres"),
            *("-E", "UTF8", "--no-sync"),
        )

    def start(self) -> None:
        """Start the server (again) and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            "pg_ctl",
            *("-D", str(self.folder / "data"), "-l", str(self.folder / "server.log")),
            *("-o", options, "-w", "-t", "60", "start"),
        )
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: every session is ended, the server exits."""
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "-t", "60", "stop")
        self.started = False

    def connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=5
        )

    def create_database(self) -> str:
        """A new database on the cluster; its SQLAlchemy URL."""
        name = f"proj_e2e_{uuid.uuid4().hex[:10]}"
        admin = self.connect()
        admin.autocommit = True
        try:
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            admin.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        if self.started:
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            self.init()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.destroy()
