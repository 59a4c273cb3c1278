"""File descriptors: the limit raised at start, and running out of them noticed, counted and
warned about (rate-limited), on uvloop (where libuv never lets accept() fail with EMFILE) and on
the stock loop alike."""

from __future__ import annotations

import resource
import signal
import socket
import time

import pytest
from test_hardening import FD_LIMIT, echo_round_trip, fd_count, open_hogs, open_tunnel, start_osocks, wait_hogs_gone
from test_workers import status_of, wait_status

from conftest import EchoServer

LOOPS = ("uvloop", "asyncio")
WARNING = "out of file descriptors (limit 64, RLIMIT_NOFILE): "


def warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if WARNING in line]


def wait_warnings(server, count: int, timeout: float = 20.0) -> list[tuple[float, str]]:
    """Wait for `count` warnings; each with the time the test saw it."""
    seen: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        assert time.monotonic() < deadline, f"{len(seen)} of {count} warnings: {server.lines[-5:]}"
        for line in warnings(server.lines)[len(seen) :]:
            seen.append((time.monotonic(), line))
        time.sleep(0.02)
    return seen


@pytest.mark.parametrize("loop", LOOPS)
def test_running_out_of_fds_is_counted_and_warned_every_few_seconds(loop: str, run_osocks, echo: EchoServer) -> None:
    server = start_osocks(run_osocks, "--handshake-timeout", "60000", "--loop", loop, nofile=FD_LIMIT)
    wait_status(server, lambda s: s["fd_limit"] == FD_LIMIT)  # the limit set from outside is seen
    tunnel = open_tunnel(server.port, echo.port)
    hogs = open_hogs(server.port, 3 * FD_LIMIT)
    try:
        (first,) = wait_warnings(server, 1)
        more = open_hogs(server.port, FD_LIMIT)  # refused too, but said in the next warning
        hogs += more
        second = wait_warnings(server, 2)[1]
        assert second[0] - first[0] >= 4.5  # at most one warning every 5 s
        refused = sum(int(line.split(WARNING)[1].split()[0]) for _, line in (first, second))
        status = status_of(server)
        assert status["sessions"]["out_of_fds"] >= refused >= FD_LIMIT
        assert fd_count(server.proc.pid) <= FD_LIMIT
        echo_round_trip(tunnel, b"still here")  # a live session is served meanwhile
    finally:
        for sock in hogs:
            sock.close()
    tunnel.close()
    assert server.stop() == 0
    assert not [line for line in server.lines if "ERROR" in line or "Traceback" in line]


def test_the_soft_limit_is_raised_to_the_hard_one(run_osocks) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, hard, 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the osocks started now
    try:
        server = run_osocks("-l", "127.0.0.1", "-p", "0", "-v")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    expected = f"file descriptors: limit raised from {low} to {hard}" if low < hard else f"limit {hard}"
    assert any(expected in line and "DEBUG" in line for line in server.lines), server.lines
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0


def test_sockets_are_closed_not_leaked_when_refused(run_osocks, echo: EchoServer) -> None:
    server = start_osocks(run_osocks, "--handshake-timeout", "60000", nofile=FD_LIMIT)
    wait_status(server, lambda s: s["fd_limit"] == FD_LIMIT)
    hogs = open_hogs(server.port, 2 * FD_LIMIT)
    wait_warnings(server, 1)
    for sock in hogs:
        sock.close()
    wait_hogs_gone(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    fresh = open_tunnel(server.port, echo.port)
    echo_round_trip(fresh)
    fresh.close()
