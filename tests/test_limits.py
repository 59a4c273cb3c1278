"""Limits and timeouts with small values."""

from __future__ import annotations

import os
import socket
import time

import pytest

from conftest import EchoServer, ServerThread, recv_exactly, socks_connect, wait_closed
from osocks.socks5 import ReplyCode


def test_session_limit_refuses_cleanly_and_counts(make_server, echo: EchoServer) -> None:
    server: ServerThread = make_server(max_sessions=2)
    held = [socks_connect(server.port, "127.0.0.1", echo.port)[0] for _ in range(2)]
    extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    extra.sendall(b"\x05\x01\x00")
    assert wait_closed(extra) == b""
    extra.close()
    status = server.wait_for(lambda s: s["sessions"]["refused"] == 1)
    assert status["sessions"]["live"] == 2 and status["sessions"]["peak"] == 2
    for sock in held:
        sock.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)  # a slot is free again
    assert code == ReplyCode.SUCCEEDED
    sock.close()


def test_handshake_timeout_closes_silent_clients(make_server, echo: EchoServer) -> None:
    server: ServerThread = make_server(handshake_timeout=0.3, max_sessions=1)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    started = time.monotonic()
    assert wait_closed(silent) == b""
    assert 0.25 < time.monotonic() - started < 10  # not before the timeout
    silent.close()
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)  # the slot is free
    assert code == ReplyCode.SUCCEEDED
    sock.close()


def test_half_finished_handshake_times_out_too(make_server) -> None:
    server: ServerThread = make_server(handshake_timeout=0.3)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"\x05\x01\x00\x05\x01\x00\x03\x10abc")  # a request cut short
    assert wait_closed(sock) == b"\x05\x00"
    sock.close()


def test_idle_timeout_closes_quiet_sessions_only(make_server, echo: EchoServer) -> None:
    server: ServerThread = make_server(idle_timeout=0.6)
    quiet, _, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    busy, _, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    started = time.monotonic()
    busy.settimeout(5)
    while time.monotonic() - started < 1.5:  # keep one session busy past the idle timeout
        busy.sendall(b".")
        assert recv_exactly(busy, 1) == b"."
        time.sleep(0.1)
    assert wait_closed(quiet, timeout=1) == b""
    busy.sendall(b"alive")
    assert recv_exactly(busy, 5) == b"alive"
    quiet.close()
    busy.close()


def test_disconnect_closes_the_session_with_that_id(osocks: ServerThread, echo: EchoServer) -> None:
    """Server.disconnect, behind ubus `disconnect`: the id is one that `sessions` lists."""
    kept, _, _, _ = socks_connect(osocks.port, "127.0.0.1", echo.port)
    closed, _, _, _ = socks_connect(osocks.port, "127.0.0.1", echo.port)
    listed = {s["client"]: s["id"] for s in osocks.call(osocks.server.sessions)}
    pid = os.getpid()
    assert all(i.startswith(f"{pid}-") for i in listed.values()) and len(set(listed.values())) == 2
    target = listed[f"127.0.0.1:{closed.getsockname()[1]}"]
    assert osocks.call(lambda: osocks.server.disconnect(target)) == {"disconnected": target}
    assert wait_closed(closed) == b""
    with pytest.raises(LookupError, match=f"no live session {target}"):
        osocks.call(lambda: osocks.server.disconnect(target))
    kept.sendall(b"hi")
    assert recv_exactly(kept, 2) == b"hi"
    assert osocks.wait_for(lambda s: s["sessions"]["live"] == 1)
    kept.close()
    closed.close()


def test_sweep_keeps_the_pace_of_sessions_from_before_a_reload(make_server, echo: EchoServer) -> None:
    """A reload to long timeouts must not slow the sweep that times out sessions keeping the old short ones."""
    server: ServerThread = make_server(idle_timeout=0.4)
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    lazy = server.server.settings.replace(idle_timeout=1000.0, handshake_timeout=1000.0, connect_timeout=1000.0)
    server.run(server.server.reload(lazy))

    def next_sweep_in() -> float:
        s = server.server
        s._ticker.cancel()  # sweep now, and see when the sweep schedules the next one
        s._tick()
        return s._ticker.when() - server.loop.time()

    assert server.call(next_sweep_in) <= 0.4 / 8 + 0.01
    assert wait_closed(sock, timeout=10) == b""  # the old session's 0.4 s idle timeout still holds
    sock.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert server.call(next_sweep_in) == pytest.approx(1.0, abs=0.01)  # none left: the newest settings' pace
