"""Reload in one process (no workers): listeners opened and closed, live sessions keep the
settings they started with, the `opened` key, a reload that fails keeps everything; SIGHUP on a
real process; `sessions` (Session.describe) for each command."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
from test_commands import UdpEcho, associate, exchange, request
from test_workers import status_of, wait_status

from conftest import EchoServer, ServerThread, free_port, read_reply, recv_exactly, socks_connect, wait_closed
from osocks import socks5
from osocks.server import ListenError
from osocks.settings import User, parse_rules
from osocks.socks5 import Command, ReplyCode


def reload(server: ServerThread, **changes: object) -> dict:
    return server.run(server.server.reload(server.server.settings.replace(**changes)))


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def echoes(sock: socket.socket, payload: bytes = b"ping") -> bool:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def test_reload_opens_and_closes_listeners(make_server, echo: EchoServer) -> None:
    server = make_server(port=free_port())
    port = server.port
    assert refused("127.0.0.2", port)
    answer = reload(server, listen=("127.0.0.1", "127.0.0.2"))
    assert answer["changed"] == ["listen"] and answer["opened"] == [f"127.0.0.2:{port}"]
    assert sorted(answer["listeners"]) == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]
    with socket.create_connection(("127.0.0.2", port), timeout=5) as sock:
        sock.sendall(socks5.encode_greeting(b"\x00"))
        assert recv_exactly(sock, 2) == b"\x05\x00"  # osocks answers there
    held, code, _, _ = socks_connect(port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED

    answer = reload(server, listen=("127.0.0.2",))  # the first listener goes, nothing new opens
    assert (answer["changed"], answer["opened"], answer["listeners"]) == (["listen"], [], [f"127.0.0.2:{port}"])
    assert refused("127.0.0.1", port)
    assert echoes(held)  # a session of the closed listener stays
    answer = reload(server)
    assert (answer["changed"], answer["opened"], answer["listeners"]) == ([], [], [f"127.0.0.2:{port}"])
    held.close()


def test_reload_to_another_port(make_server) -> None:
    server = make_server(port=free_port())
    old, new = server.port, free_port()
    answer = reload(server, port=new)
    assert answer["changed"] == ["port"] and answer["opened"] == [f"127.0.0.1:{new}"]
    assert answer["listeners"] == [f"127.0.0.1:{new}"]
    assert refused("127.0.0.1", old)


def test_live_sessions_keep_their_settings(make_server, echo: EchoServer) -> None:
    """After a reload that denies the destination and shortens the idle timeout, a session from
    before still relays and is not timed out; a new one is refused, or idles out."""
    server = make_server()
    before, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    answer = reload(server, dest_rules=parse_rules("test", [f"deny 127.0.0.1 port {echo.port}"]), idle_timeout=0.5)
    assert set(answer["changed"]) == {"idle_timeout", "dest_rules"}
    denied, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.NOT_ALLOWED
    denied.close()
    other = EchoServer()
    after, code, _, _ = socks_connect(server.port, "127.0.0.1", other.port)
    assert code == ReplyCode.SUCCEEDED
    assert wait_closed(after, timeout=10) == b""  # idle past the new 0.5 s: closed
    before.setblocking(False)
    with pytest.raises(BlockingIOError):  # idle as long, but on the old 64 s: still open
        before.recv(1)
    before.setblocking(True)
    before.settimeout(10)
    assert echoes(before)  # and still relays to the destination the new rules deny
    for sock in (before, after):
        sock.close()
    other.close()


def test_a_reload_that_cannot_listen_keeps_everything(make_server, echo: EchoServer) -> None:
    server = make_server(port=free_port())
    port, settings = server.port, server.server.settings
    held, code, _, _ = socks_connect(port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    bad = settings.replace(listen=("127.0.0.1", "127.0.0.2", "192.0.2.1"), max_sessions=3)  # 192.0.2.1: not here
    with pytest.raises(ListenError, match="192.0.2.1"):
        server.run(server.server.reload(bad))
    assert server.server.settings is settings
    assert server.status()["listeners"] == [f"127.0.0.1:{port}"]
    assert refused("127.0.0.2", port)  # what the failed reload had opened was closed again
    assert echoes(held)
    fresh, code, _, _ = socks_connect(port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    for sock in (held, fresh):
        sock.close()


# -- SIGHUP on a real process ---------------------------------------------------------------------


def login(port: int, user: bytes, password: bytes, dest_port: int) -> int:
    """Username/password login, then CONNECT: the reply code (0xFF when the login failed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(socks5.encode_credentials(user, password))
        if recv_exactly(sock, 2) != b"\x01\x00":
            return 0xFF
        sock.sendall(socks5.encode_request(Command.CONNECT, "127.0.0.1", dest_port))
        return read_reply(sock)[0]


def test_sighup_in_one_process(run_osocks, echo: EchoServer, tmp_path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:one\n")
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-U", str(users))
    assert login(server.port, b"bob", b"two", echo.port) == 0xFF
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as alice:  # a session from before
        alice.sendall(b"\x05\x01\x02" + socks5.encode_credentials(b"alice", b"one"))
        assert recv_exactly(alice, 4) == b"\x05\x02\x01\x00"
        alice.sendall(socks5.encode_request(Command.CONNECT, "127.0.0.1", echo.port))
        assert read_reply(alice)[0] == ReplyCode.SUCCEEDED

        users.write_text("alice:one\nbob:two\n")
        server.signal(signal.SIGHUP)
        wait_status(server, lambda s: s["settings"]["users"] == ["alice", "bob"])
        assert login(server.port, b"bob", b"two", echo.port) == ReplyCode.SUCCEEDED

        users.write_text("alice:one\nnot a user line\n")  # invalid: the reload fails, everything stays
        seen = len(server.lines)
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("reload failed, keeping the running config" in line for line in server.lines[seen:]):
            assert time.monotonic() < deadline, server.lines[seen:]
            time.sleep(0.02)
        status = status_of(server)
        assert status["settings"]["users"] == ["alice", "bob"] and status["listeners"] == [f"127.0.0.1:{server.port}"]
        assert login(server.port, b"bob", b"two", echo.port) == ReplyCode.SUCCEEDED
        assert echoes(alice)  # the session from before the reloads
    assert server.proc.poll() is None


# -- sessions: what each live session says about itself -------------------------------------------


def test_sessions_describe_each_command(make_server, echo: EchoServer) -> None:
    server = make_server(users=(User("carol", "pw"),))
    tunnel = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    tunnel.sendall(b"\x05\x01\x02" + socks5.encode_credentials(b"carol", b"pw"))
    assert recv_exactly(tunnel, 4) == b"\x05\x02\x01\x00"
    tunnel.sendall(socks5.encode_request(Command.CONNECT, "127.0.0.1", echo.port))
    assert read_reply(tunnel)[0] == ReplyCode.SUCCEEDED
    assert echoes(tunnel, b"12345")
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # still in its greeting
    server.wait_for(lambda s: s["sessions"]["live"] == 2)
    described = {d["state"]: d for d in server.call(server.server.sessions)}
    assert set(described) == {"relay", "greeting"}
    relay = described["relay"]
    assert relay["client"] == f"127.0.0.1:{tunnel.getsockname()[1]}"
    assert relay["destination"] == f"127.0.0.1:{echo.port}" and relay["user"] == "carol"
    assert (relay["bytes_up"], relay["bytes_down"]) == (5, 5)
    assert relay["age"] >= 0 and relay["id"]
    greeting = described["greeting"]
    assert (greeting["destination"], greeting["user"], greeting["bytes_up"]) == ("", "", 0)
    assert greeting["id"] != relay["id"]
    for sock in (tunnel, waiting):
        sock.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert server.call(server.server.sessions) == []


def test_sessions_describe_bind_and_udp(osocks: ServerThread) -> None:
    udp_echo = UdpEcho()
    control = request(osocks.port, Command.BIND, "127.0.0.2", 0)
    assert read_reply(control)[0] == ReplyCode.SUCCEEDED
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    udp_control, relay = associate(osocks.port, client)
    answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"hi", 10)
    assert answer is not None and answer.endswith(b"echo:hi")
    by_client = {d["client"]: d for d in osocks.call(osocks.server.sessions)}
    bind = by_client[f"127.0.0.1:{control.getsockname()[1]}"]
    udp = by_client[f"127.0.0.1:{udp_control.getsockname()[1]}"]
    assert bind["destination"] == "127.0.0.2:0" and bind["state"] == "command"  # waiting for its peer
    assert udp["destination"] == "0.0.0.0:0" and udp["state"] == "relay"
    for sock in (control, udp_control, client):
        sock.close()
    udp_echo.close()


# -- -w 2: a reload one worker does not apply is rolled back in the others ------------------------


def test_worker_reload_rolls_back_when_one_worker_does_not_answer(run_osocks, echo: EchoServer, tmp_path) -> None:
    """SLOW (~10 s, the master's reload timeout): one worker stopped (SIGSTOP) during a reload."""
    users = tmp_path / "users"
    users.write_text("alice:one\n")
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-w", "2", "-U", str(users))
    workers = [w["pid"] for w in wait_status(server, lambda s: len(s.get("workers", [])) == 2)["workers"]]
    stopped = workers[1]
    users.write_text("alice:one\nbob:two\n")
    seen = len(server.lines)
    os.kill(stopped, signal.SIGSTOP)  # a child of the osocks this test started
    try:
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not any("reload failed" in line for line in server.lines[seen:]):
            assert time.monotonic() < deadline, server.lines[seen:]
            time.sleep(0.05)
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert re.search(r"reload failed.*: worker \d did not answer the reload within 8 s", "".join(server.lines[seen:]))
    status = wait_status(server, lambda s: len(s.get("workers", [])) == 2)
    assert status["settings"]["users"] == ["alice"]
    # both workers run the old users again: the one that applied bob, and the one that got the reload late
    answers = [login(server.port, b"bob", b"two", echo.port) for _ in range(40)]
    assert answers == [0xFF] * 40
    assert [login(server.port, b"alice", b"one", echo.port) for _ in range(10)] == [0] * 10
    status = wait_status(server, lambda s: s["sessions"]["live"] == 0)
    assert all(w["total"] > 0 for w in status["workers"])  # the logins reached both workers
