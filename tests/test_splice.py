"""splice(2) with the shipped thresholds, its fallback to copying, and --no-splice."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import threading

import pytest
from test_workers import wait_status

from conftest import EchoServer, socks_connect
from osocks import relay
from osocks.socks5 import ReplyCode

MEGABYTES = 10 * 1024 * 1024


def echo_through(port: int, echo: EchoServer, size: int = MEGABYTES) -> None:
    """`size` random bytes to the echo server and back through osocks, checked by length and hash."""
    payload = os.urandom(size)
    sock, code, _, _ = socks_connect(port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = hashlib.sha256()
    total = 0
    sock.settimeout(30)
    while chunk := sock.recv(1 << 16):
        received.update(chunk)
        total += len(chunk)
    sender.join()
    sock.close()
    assert total == size and received.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_bulk_splices_with_the_default_thresholds_whatever_the_fairness_constant(
    make_server, echo: EchoServer, monkeypatch
) -> None:
    """Splicing depends on the bytes a direction moved (SPLICE_AFTER), not on YIELD_AFTER's read size."""
    monkeypatch.setattr(relay, "YIELD_AFTER", 1 << 30)  # no read is ever that large
    server = make_server()
    echo_through(server.port, echo)
    assert server.wait_for(lambda s: s["sessions"]["live"] == 0)["spliced"] == 2


def test_sockets_that_cannot_splice_fall_back_to_copying(make_server, echo: EchoServer, monkeypatch) -> None:
    """EINVAL from splice(2) out of the pipe: what the pipe holds is copied on, then the relay copies."""
    real = os.splice
    refused: list[int] = []

    def pipe_to_socket_refused(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        if stat.S_ISFIFO(os.fstat(src).st_mode):
            refused.append(count)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "splice", pipe_to_socket_refused)
    server = make_server()
    echo_through(server.port, echo)
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert refused and all(count > 0 for count in refused)  # bytes were in the pipe when it fell back


@pytest.mark.parametrize(("flags", "spliced"), [((), 2), (("--no-splice",), 0)])
def test_no_splice_flag(run_osocks, echo: EchoServer, flags: tuple[str, ...], spliced: int) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", *flags)
    echo_through(server.port, echo)
    status = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    assert status["spliced"] == spliced and status["settings"]["splice"] is (spliced > 0)
