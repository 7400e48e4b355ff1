"""The testing kit's TCP proxy, against an echo server of the test's own:
stopped, it cuts connections; blackholed, it keeps them open and forwards
nothing until restored."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from proj.jobs.testing.faults import TcpProxy


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(client,), daemon=True).start()

    def answer(client: socket.socket) -> None:
        with client:
            while data := client.recv(1024):
                client.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[:2]
    server.close()


def exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(1024)


def test_a_blackholed_proxy_holds_everything_until_restored(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(0.5)
        assert exchange(sock, b"one") == b"one"
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            exchange(sock, b"two")
        late = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
        with late, pytest.raises(TimeoutError):
            exchange(late, b"late")  # accepted, then silent
        proxy.restore()
        assert sock.recv(1024) == b"two"  # held back, not lost
        assert exchange(sock, b"three") == b"three"


def test_a_stopped_proxy_cuts_connections_and_refuses_new_ones(echo: tuple[str, int]) -> None:
    proxy = TcpProxy(echo)
    proxy.start()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    assert exchange(sock, b"one") == b"one"
    proxy.stop()
    assert sock.recv(1024) == b""  # closed from the proxy's side
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    proxy.start()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as again:
        assert exchange(again, b"back") == b"back"
    proxy.stop()
