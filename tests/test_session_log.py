"""What the log says of a session: the line an abuse report needs, and a bug said loudly once."""

from __future__ import annotations

import logging
import re
import socket
import time

import pytest

from conftest import EchoServer, read_reply, recv_exactly, socks_connect, wait_closed
from osocks import session as session_module
from osocks import socks5
from osocks.settings import User
from osocks.socks5 import Command, ReplyCode


def session_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " bytes in " in r.getMessage()]


async def echo_test_resolver(host: str, port: int, family: int) -> list[tuple[int, tuple]]:
    if host == "echo.test":
        return [(socket.AF_INET, ("127.0.0.1", port))]
    raise socket.gaierror(socket.EAI_NONAME, "unknown name")


def test_connect_line_names_the_command_and_the_address_a_name_reached(make_server, echo: EchoServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server(resolver=echo_test_resolver)
    sock, code, _, _ = socks_connect(server.port, "echo.test", echo.port)
    assert code == ReplyCode.SUCCEEDED
    sock.sendall(b"hi")
    assert recv_exactly(sock, 2) == b"hi"
    sock.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    (line,) = session_lines(caplog)
    assert re.fullmatch(
        rf"client 127\.0\.0\.1:\d+ CONNECT -> echo\.test:{echo.port} \[127\.0\.0\.1\]: up 2 down 2 bytes in .*", line
    ), line


def test_connect_line_names_the_user_and_no_second_address_for_a_literal(make_server, echo: EchoServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server(users=(User("alice", "secret"),))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(socks5.encode_greeting(b"\x02") + socks5.encode_credentials(b"alice", b"secret"))
        assert recv_exactly(sock, 4) == b"\x05\x02\x01\x00"
        sock.sendall(socks5.encode_request(Command.CONNECT, "127.0.0.1", echo.port))
        assert read_reply(sock)[0] == ReplyCode.SUCCEEDED
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    (line,) = session_lines(caplog)
    assert re.match(rf"client 127\.0\.0\.1:\d+ user alice CONNECT -> 127\.0\.0\.1:{echo.port}: up 0 ", line), line


def test_bind_and_udp_lines_name_their_command(make_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server()
    control = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    control.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.BIND, "127.0.0.2", 0))
    assert recv_exactly(control, 2) == b"\x05\x00"
    _, host, port = read_reply(control)
    peer = socket.socket()
    peer.bind(("127.0.0.2", 0))
    peer.connect((host, port))
    assert read_reply(control)[0] == ReplyCode.SUCCEEDED
    peer.close()
    assert wait_closed(control) == b""
    control.close()
    udp = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    udp.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
    assert recv_exactly(udp, 2) == b"\x05\x00" and read_reply(udp)[0] == ReplyCode.SUCCEEDED
    udp.close()
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    bind_line, udp_line = session_lines(caplog)
    assert re.match(r"client 127\.0\.0\.1:\d+ BIND -> 127\.0\.0\.2:0 \[127\.0\.0\.2\]: up 0 down 0 ", bind_line)
    assert re.match(r"client 127\.0\.0\.1:\d+ UDP -> 0\.0\.0\.0:0: up 0 down 0 ", udp_line), udp_line


def test_a_session_that_ends_in_the_handshake_names_no_command(make_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01")
    server.wait_for(lambda s: s["sessions"]["total"] == 1 and s["sessions"]["live"] == 0)
    (line,) = session_lines(caplog)
    assert re.match(r"client 127\.0\.0\.1:\d+: up 0 down 0 bytes in ", line), line


@pytest.mark.parametrize(
    ("command", "host"),
    [
        (Command.BIND, "127.0.0.1"),
        (Command.UDP_ASSOCIATE, "127.0.0.1"),
        (Command.CONNECT, "127.0.0.1"),  # started from the handshake's data_received, no task
        (Command.CONNECT, "localhost"),  # from the task that resolves the name
    ],
)
def test_a_bug_in_a_command_is_an_error_with_its_traceback(make_server, monkeypatch, caplog, command, host) -> None:
    """A programming error is no destination's fault: not a quiet reply 01, but one ERROR with the traceback."""

    def planted() -> None:
        raise AttributeError("'NoneType' object has no attribute 'planted'")

    async def broken(*args: object) -> None:
        planted()

    monkeypatch.setattr(session_module, "bind", broken)
    monkeypatch.setattr(session_module, "associate", broken)
    monkeypatch.setattr(session_module.Session, "_dial", lambda *args, **kwargs: planted())
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(command, host, 9))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == ReplyCode.GENERAL_FAILURE
        assert wait_closed(sock) == b""
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "planted" in caplog.text and "Traceback" in caplog.text
    (line,) = session_lines(caplog)
    assert "internal error (reply general_failure)" in line


def test_a_bug_in_the_handshake_is_an_error_with_its_traceback(make_server, monkeypatch, caplog, echo) -> None:
    """Before any request: logged as the handshake's (not as a "command 0x00"), the client closed, the
    next one served."""

    def planted(*args: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'planted'")

    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server()
    with monkeypatch.context() as patched:
        patched.setattr(session_module.Session, "_choose_method", planted)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(socks5.encode_greeting(b"\x00"))
            assert wait_closed(sock) == b""
        server.wait_for(lambda s: s["sessions"]["live"] == 0)
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.exc_info is not None and "planted" in caplog.text
    assert "the handshake failed on an internal error" in error.getMessage()
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    sock.close()
    assert code == ReplyCode.SUCCEEDED


@pytest.mark.parametrize("where", ["_send_to_name", "_open_outbound"])
def test_a_bug_in_a_udp_task_is_an_error_with_its_traceback(make_server, monkeypatch, caplog, where: str) -> None:
    """The tasks UDP starts per datagram are kept and their errors logged by osocks, not left to the
    collector's "Task exception was never retrieved"."""
    from osocks import udp

    async def broken(*args: object) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(udp.Association, where, broken)
    caplog.set_level(logging.INFO)
    server = make_server()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        control = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        control.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0))
        assert recv_exactly(control, 2) == b"\x05\x00"
        _, host, port = read_reply(control)
        destination = "localhost" if where == "_send_to_name" else "127.0.0.1"
        client.sendto(socks5.encode_udp_header(destination, 9) + b"x", (host, port))
        deadline = time.monotonic() + 10
        while not [r for r in caplog.records if r.levelno >= logging.ERROR]:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        control.close()
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.name == "osocks" and error.getMessage().endswith("broken failed: planted")
    assert error.exc_info is not None
    assert "never retrieved" not in caplog.text
