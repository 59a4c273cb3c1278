"""What a client sends before the reply: more than osocks holds (64 KiB), and a half-close."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import EchoServer, ServerThread, read_reply, recv_exactly, wait_closed
from osocks import socks5
from osocks.session import MAX_EARLY_DATA
from osocks.socks5 import Command, ReplyCode

MOST_ONE_READ = 256 * 1024  # the largest read either loop makes


class HeldResolver:
    """Resolves every name to 127.0.0.1 once released: the CONNECT waits meanwhile."""

    def __init__(self) -> None:
        self.released = threading.Event()

    async def __call__(self, host: str, port: int, family: int) -> list[tuple[int, tuple]]:
        await asyncio.get_running_loop().run_in_executor(None, self.released.wait, 10)
        return [(socket.AF_INET, ("127.0.0.1", port))]


@pytest.fixture
def held() -> Iterator[HeldResolver]:
    resolver = HeldResolver()
    yield resolver
    resolver.released.set()


def wait_for(server: ServerThread, probe, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (value := server.call(probe)):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return value


@pytest.mark.parametrize("size", [MAX_EARLY_DATA + 1, 4 * 1024 * 1024])
def test_early_data_over_what_osocks_holds_arrives_whole(make_server, held: HeldResolver, size: int) -> None:
    echo = EchoServer()
    server = make_server(resolver=held)
    payload = os.urandom(size)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.CONNECT, "held.test", echo.port)
    sender = threading.Thread(target=sock.sendall, args=(head + payload,))
    sender.start()

    def session_buffer() -> tuple[int, bool] | None:
        live = list(server.server.live)
        if not live or len(live[0].buffer) <= MAX_EARLY_DATA:
            return None
        return len(live[0].buffer), live[0].transport.is_reading()

    buffered, reading = wait_for(server, session_buffer, "osocks holds more than MAX_EARLY_DATA")
    assert buffered <= MAX_EARLY_DATA + MOST_ONE_READ and not reading  # it stopped reading the client
    held.released.set()
    assert recv_exactly(sock, 2) == b"\x05\x00"
    assert read_reply(sock)[0] == ReplyCode.SUCCEEDED
    digest = hashlib.sha256()
    got = 0
    while got < size:
        chunk = sock.recv(1 << 16)
        assert chunk
        digest.update(chunk)
        got += len(chunk)
    sender.join(10)
    assert got == size and digest.digest() == hashlib.sha256(payload).digest()
    sock.close()
    echo.close()


def test_client_half_close_before_the_reply(make_server, held: HeldResolver) -> None:
    """The request, some data and a FIN, all before osocks answers: the reply, the data, the EOF
    all reach their side, and the destination's answer to the EOF reaches the client."""
    echo = EchoServer(farewell=b"goodbye")
    server = make_server(resolver=held)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.CONNECT, "held.test", echo.port))
    sock.sendall(b"early bytes")
    sock.shutdown(socket.SHUT_WR)
    wait_for(server, lambda: any(s.client_eof for s in server.server.live), "osocks saw the client's EOF")
    held.released.set()
    assert recv_exactly(sock, 2) == b"\x05\x00"
    assert read_reply(sock)[0] == ReplyCode.SUCCEEDED
    assert wait_closed(sock, timeout=10) == b"early bytesgoodbye"
    sock.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    echo.close()
