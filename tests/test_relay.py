"""The relay: bulk data both ways, half-close, resets, back-pressure, no leaked sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
import uvloop

from conftest import EchoServer, ServerThread, recv_exactly, socks_connect, tunnel, wait_closed
from osocks import splice
from osocks.socks5 import ReplyCode


@pytest.fixture(params=["copy", "splice"])
def relay_mode(request, monkeypatch) -> str:
    """Every test here runs with the copying relay and with splice(2) from the first byte."""
    if request.param == "splice":
        monkeypatch.setattr(splice, "SPLICE_AFTER", 1)
    return request.param


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_factory(request) -> Callable[[], asyncio.AbstractEventLoop]:
    """...and on both event loops (osocks' own transports, tcp.py, on either)."""
    return uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop


@pytest.fixture
def make_server(make_server, relay_mode, loop_factory):
    def make(**options):
        options.setdefault("splice", relay_mode == "splice")
        options.setdefault("loop_factory", loop_factory)
        return make_server(**options)

    return make


@pytest.fixture
def osocks(make_server) -> ServerThread:
    return make_server()


def test_ten_megabytes_both_ways_at_once(osocks: ServerThread, echo: EchoServer, relay_mode: str) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    sock, code, _, _ = socks_connect(osocks.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    received = hashlib.sha256()

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # half-close: the echo's answer must still arrive

    sender = threading.Thread(target=send)
    sender.start()
    total = 0
    sock.settimeout(30)
    while chunk := sock.recv(1 << 16):
        received.update(chunk)
        total += len(chunk)
    sender.join()
    sock.close()
    assert total == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    status = osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert status["bytes"] == {"up": len(payload), "down": len(payload)}
    assert status["spliced"] == (2 if relay_mode == "splice" else 0)


def test_client_half_close_keeps_the_other_direction(make_server) -> None:
    """The client shuts down its write side; the destination still answers after seeing EOF."""
    server = make_server()
    echo = EchoServer(farewell=b"goodbye after your EOF")
    try:
        sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
        sock.sendall(b"question")
        assert recv_exactly(sock, 8) == b"question"
        sock.shutdown(socket.SHUT_WR)
        assert wait_closed(sock) == b"goodbye after your EOF"
        sock.close()
        server.wait_for(lambda s: s["sessions"]["live"] == 0)
    finally:
        echo.close()


def half_close_by_the_destination(make_server, request: bytes, answer: bytes, after: bytes) -> None:
    """The destination reads `request`, sends `answer` and shuts down writing at once, then reads
    to EOF: the client gets the answer and EOF, and `after`, sent then, still reaches the destination."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    got = []

    def destination() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        assert recv_exactly(conn, len(request)) == request
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        got.append(wait_closed(conn))
        conn.close()

    thread = threading.Thread(target=destination)
    thread.start()
    server = make_server()
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", listener.getsockname()[1])
    assert code == ReplyCode.SUCCEEDED
    sock.sendall(request)
    assert wait_closed(sock) == answer  # EOF reaches the client
    sock.sendall(after)
    sock.shutdown(socket.SHUT_WR)
    thread.join(10)
    sock.close()
    listener.close()
    assert got == [after]
    server.wait_for(lambda s: s["sessions"]["live"] == 0)


def test_destination_half_close_keeps_the_other_direction(make_server) -> None:
    """The destination sends FIN first; the client can still send, and the destination reads it."""
    half_close_by_the_destination(make_server, b"", b"banner", b"still talking")


def test_an_answer_with_its_fin_behind_it_ends_one_direction_only(make_server) -> None:
    """The destination answers and shuts down writing at once, so its FIN arrives with the answer
    (osocks takes the end of the stream from the same wake-up): the client gets the answer and EOF,
    and what it sends after still reaches the destination."""
    half_close_by_the_destination(make_server, b"request", b"answer" * 1000, b"and one more thing")


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("resetting", ["client", "destination"])
def test_a_reset_closes_the_other_side_promptly(make_server, resetting: str) -> None:
    server = make_server()
    sock, conn, listener = tunnel(server.port)
    reset, other = (sock, conn) if resetting == "client" else (conn, sock)
    rst_close(reset)
    assert wait_closed(other, timeout=10) == b""  # at once, not at the idle timeout (64 s)
    other.close()
    listener.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)


def kernel_buffers_through_osocks() -> int:
    """What the kernel may hold in one direction through osocks at most: the receiving socket's
    buffer autotuned up to tcp_rmem's maximum (32 MiB on some machines), the sending one's up to
    tcp_wmem's."""
    most = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            most += int(f.read().split()[2])
    return most


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_back_pressure_bounds_what_osocks_buffers(make_server, direction: str) -> None:
    """A peer that stops reading stops the other side too: osocks holds a bounded amount."""
    server = make_server()
    sock, conn, listener = tunnel(server.port)
    writer, reader = (sock, conn) if direction == "upload" else (conn, sock)
    for s in (sock, conn):  # small kernel buffers, so what osocks holds stands out
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    writer.setblocking(False)
    chunk = b"x" * 65536
    pushed = 0
    deadline = time.monotonic() + 10
    stalled_since = None
    while time.monotonic() < deadline and pushed < 512 * 1024 * 1024:
        try:
            pushed += writer.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    # the kernel's buffers on osocks' sockets, the test's own (64 KiB each) and osocks' (a pipe of
    # splice.PIPE_SIZE, or a write buffer of tcp.HIGH_WATER): bounded, never everything pushed
    bound = kernel_buffers_through_osocks() + 4 * 1024 * 1024
    assert pushed < bound, f"osocks kept reading: {pushed} bytes accepted, more than {bound}"
    # the reader now drains everything and sees every byte: nothing was lost either
    writer.setblocking(True)
    writer.shutdown(socket.SHUT_WR)
    reader.settimeout(10)
    total = 0
    while data := reader.recv(1 << 20):
        total += len(data)
    assert total == pushed
    for s in (sock, conn, listener):
        s.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_socket_left_open_after_every_way_of_closing(make_server) -> None:
    server = make_server()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]

    def session(order: str) -> None:
        sock, code, _, _ = socks_connect(server.port, "127.0.0.1", port)
        conn, _ = listener.accept()
        sock.sendall(b"a")
        conn.sendall(b"b")
        if order == "client-fin":
            sock.close()
            wait_closed(conn)
            conn.close()
        elif order == "dest-fin":
            conn.close()
            wait_closed(sock)
            sock.close()
        elif order == "client-rst":
            rst_close(sock)
            wait_closed(conn)
            conn.close()
        elif order == "dest-rst":
            rst_close(conn)
            wait_closed(sock)
            sock.close()
        elif order == "both-half-close":
            sock.shutdown(socket.SHUT_WR)
            conn.shutdown(socket.SHUT_WR)
            wait_closed(sock)
            wait_closed(conn)
            sock.close()
            conn.close()

    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    before = open_fds()
    for _ in range(3):
        for order in ("client-fin", "dest-fin", "client-rst", "dest-rst", "both-half-close"):
            session(order)
    server.wait_for(lambda s: s["sessions"]["live"] == 0 and s["sessions"]["total"] == 15)
    deadline = time.monotonic() + 5
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.close()
    assert open_fds() <= before - 1  # the listener is gone; nothing of the 15 sessions is left
