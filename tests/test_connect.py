"""CONNECT over real sockets: every reply code produced for real."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import EchoServer, ServerThread, read_reply, recv_exactly, socks_connect, wait_closed
from osocks import socks5
from osocks.socks5 import ReplyCode


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_ipv4_relays_and_reports_bound_address(osocks: ServerThread, echo: EchoServer) -> None:
    sock, code, bhost, bport = socks_connect(osocks.port, "127.0.0.1", echo.port)
    with sock:
        assert code == ReplyCode.SUCCEEDED
        assert bhost == "127.0.0.1" and bport != 0
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert echo.peers[-1][1] == bport  # BND is the outbound socket's own address
    status = osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert status["replies"]["succeeded"] == 1
    assert status["bytes"] == {"up": 4, "down": 4}


def test_both_sockets_of_a_session_send_without_nagle(osocks: ServerThread, echo: EchoServer) -> None:
    """TCP_NODELAY on the client's socket (the listener's, which Linux passes on to each accepted
    one) and on the destination's: a small reply is never held back waiting for an ACK."""
    sock, code, _, _ = socks_connect(osocks.port, "127.0.0.1", echo.port)
    with sock:
        assert code == ReplyCode.SUCCEEDED

        def nodelay_of_live_sessions() -> list[tuple[int, int]]:
            def nodelay(transport: asyncio.Transport) -> int:
                return transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

            return [(nodelay(s.transport), nodelay(s.upstream_end.transport)) for s in osocks.server.live]

        (options,) = osocks.call(nodelay_of_live_sessions)
        assert all(options), options


def test_connect_ipv6(
    make_server,
) -> None:
    server = make_server(listen=("::1",))
    echo6 = EchoServer("::1")
    try:
        sock = socket.create_connection(("::1", server.port), timeout=5)
        with sock:
            sock.sendall(b"\x05\x01\x00" + socks5.encode_request(1, "::1", echo6.port) + b"six")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            code, bhost, bport = read_reply(sock)
            assert (code, bhost) == (ReplyCode.SUCCEEDED, "::1") and bport
            assert recv_exactly(sock, 3) == b"six"
    finally:
        echo6.close()


def test_connect_domain_name(osocks: ServerThread, echo: EchoServer) -> None:
    sock, code, _, _ = socks_connect(osocks.port, "localhost", echo.port)
    with sock:
        assert code == ReplyCode.SUCCEEDED
        sock.sendall(b"name")
        assert recv_exactly(sock, 4) == b"name"


def test_name_with_several_addresses_is_tried_in_turn(make_server, echo: EchoServer) -> None:
    async def resolver(host: str, port: int, family: int) -> list:
        # 127.0.0.2 has no listener on that port (refused), 127.0.0.1 has
        return [(socket.AF_INET, ("127.0.0.2", port)), (socket.AF_INET, ("127.0.0.1", port))]

    server = make_server(resolver=resolver)
    sock, code, _, _ = socks_connect(server.port, "two.example", echo.port)
    with sock:
        assert code == ReplyCode.SUCCEEDED
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"


def test_pipelined_greeting_request_and_payload(osocks: ServerThread, echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5.encode_request(1, "127.0.0.1", echo.port) + b"early bytes")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == ReplyCode.SUCCEEDED
        assert recv_exactly(sock, 11) == b"early bytes"


def test_one_byte_per_segment(osocks: ServerThread, echo: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = b"\x05\x02\x02\x00" + socks5.encode_request(1, "localhost", echo.port)
        for i in range(len(message)):
            sock.send(message[i : i + 1])
            time.sleep(0.005)
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == ReplyCode.SUCCEEDED


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", ReplyCode.CONNECTION_REFUSED),  # a closed port
        ("127.255.255.255", ReplyCode.NETWORK_UNREACHABLE),  # Linux: ENETUNREACH at once
    ],
)
def test_failures_map_to_reply_codes(osocks: ServerThread, host: str, expected: ReplyCode) -> None:
    sock, code, _, _ = socks_connect(osocks.port, host, closed_port())
    with sock:
        assert code == expected
        assert wait_closed(sock) == b""  # closed after the failure reply
    status = osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert status["replies"][expected.name.lower()] == 1


def test_name_resolution_failure_is_host_unreachable(make_server) -> None:
    async def resolver(host: str, port: int, family: int) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    server = make_server(resolver=resolver)
    sock, code, _, _ = socks_connect(server.port, "no-such-name.invalid", 80)
    with sock:
        assert code == ReplyCode.HOST_UNREACHABLE
        assert wait_closed(sock) == b""


def test_resolution_runs_off_the_event_loop(make_server, echo: EchoServer) -> None:
    """A lookup that has not answered for one client does not hold up another client."""
    asked, answer = threading.Event(), threading.Event()

    async def slow_resolver(host: str, port: int, family: int) -> list:
        asked.set()
        await asyncio.get_running_loop().run_in_executor(None, answer.wait, 20)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    server = make_server(resolver=slow_resolver)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    slow.sendall(b"\x05\x01\x00" + socks5.encode_request(1, "slow.example", echo.port))
    assert asked.wait(10)
    fast, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)  # served while the lookup hangs
    assert code == ReplyCode.SUCCEEDED and not answer.is_set()
    fast.close()
    answer.set()
    assert recv_exactly(slow, 2) == b"\x05\x00"
    assert read_reply(slow)[0] == ReplyCode.SUCCEEDED  # and the slow one is served once its lookup answers
    slow.close()


@contextlib.contextmanager
def full_listener() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A listener whose accept queue is full (one connection it has not accepted): a SYN to it is
    dropped, and the connecting side tries again a second later.  (listener, that connection)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.socket()
    filler.setblocking(False)
    filler.connect_ex(listener.getsockname())
    try:
        _, established, _ = select.select([], [filler], [], 10)
        assert established  # the accept queue holds it now: it is full
        yield listener, filler
    finally:
        filler.close()
        listener.close()


def send_connect(port: int, host: str, dport: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(socks5.Command.CONNECT, host, dport))
    assert recv_exactly(sock, 2) == b"\x05\x00"
    return sock


def test_connect_timeout_is_ttl_expired(make_server) -> None:
    """A destination whose accept queue is full drops our SYN: no answer until -T."""
    server = make_server(connect_timeout=0.5)
    with full_listener() as (listener, _):
        started = time.monotonic()
        sock, code, _, _ = socks_connect(server.port, "127.0.0.1", listener.getsockname()[1])
        with sock:
            assert code == ReplyCode.TTL_EXPIRED
            assert 0.4 < time.monotonic() - started < 10  # not before -T
    server.wait_for(lambda s: s["sessions"]["live"] == 0)


def test_a_connection_still_under_way_completes_later(make_server) -> None:
    """The SYN is dropped, so connect() is still under way when osocks has tried twice: the session
    waits for the socket to be writable and relays once the destination takes the retried SYN."""
    server = make_server()
    with full_listener() as (listener, _), send_connect(server.port, "127.0.0.1", listener.getsockname()[1]) as sock:
        time.sleep(0.2)  # osocks' SYN has been dropped by now (the kernel retries it after a second)
        listener.accept()[0].close()  # room in the queue for the retried SYN
        code, _, _ = read_reply(sock)
        assert code == ReplyCode.SUCCEEDED
        conn, _ = listener.accept()
        with conn:
            sock.sendall(b"late but there")
            assert recv_exactly(conn, 14) == b"late but there"
    assert server.status()["replies"]["succeeded"] == 1


def test_a_connection_refused_while_under_way_is_connection_refused(make_server) -> None:
    """The retried SYN finds the port closed: the connection under way fails, and the reply says why."""
    server = make_server()
    with full_listener() as (listener, filler):
        port = listener.getsockname()[1]
        with send_connect(server.port, "127.0.0.1", port) as sock:
            time.sleep(0.2)
            filler.close()
            listener.close()
            code, _, _ = read_reply(sock)
            assert code == ReplyCode.CONNECTION_REFUSED
            assert wait_closed(sock) == b""
    server.wait_for(lambda s: s["sessions"]["live"] == 0)


def test_denied_destination_is_not_allowed(make_server, echo: EchoServer) -> None:
    server = make_server(allow_local=False)
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    with sock:
        assert code == ReplyCode.NOT_ALLOWED
    assert not echo.peers


def test_unknown_command(osocks: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5.encode_request(0x09, "127.0.0.1", 80))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == ReplyCode.COMMAND_NOT_SUPPORTED
        assert wait_closed(sock) == b""


def test_unknown_address_type(osocks: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x07" + b"\x00" * 6)
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        assert wait_closed(sock) == b""


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"\x05\x01\x00\x03\x00\x00\x50", ReplyCode.HOST_UNREACHABLE),  # domain of length 0
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00", ReplyCode.GENERAL_FAILURE),  # port 0
    ],
)
def test_bad_requests_get_a_reply_and_close(osocks: ServerThread, request_bytes: bytes, expected: ReplyCode) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00" + request_bytes)
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == expected
        assert wait_closed(sock) == b""


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b""),  # SOCKS4: no answer
        (b"GET / HTTP/1.0\r\n\r\n", b""),
        (b"\x05\x01\x00\x04", b"\x05\x00"),  # a good greeting, then a request of version 4
    ],
    ids=["socks4", "http", "request-version-4"],
)
def test_wrong_version_is_closed_cleanly(osocks: ServerThread, data: bytes, answer: bytes) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(data)
        assert wait_closed(sock) == answer
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)


def test_no_acceptable_method(osocks: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(b"\x05\x02\x01\x02")  # GSSAPI, username/password only
        assert wait_closed(sock) == b"\x05\xff"
    with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
        sock.sendall(b"\x05\x00")  # no method at all
        assert wait_closed(sock) == b"\x05\xff"


def test_next_client_is_served_after_bad_ones(osocks: ServerThread, echo: EchoServer) -> None:
    for junk in (b"\x00", b"\x05", b"\x05\x01\x00\x05\x01\x00\x09", b"\xff" * 1000):
        with socket.create_connection(("127.0.0.1", osocks.port), timeout=5) as sock:
            sock.sendall(junk)
    sock, code, _, _ = socks_connect(osocks.port, "127.0.0.1", echo.port)
    sock.close()
    assert code == ReplyCode.SUCCEEDED
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)


def test_stock_asyncio_loop_works_too(make_server, echo: EchoServer) -> None:
    server = make_server(loop_factory=asyncio.new_event_loop)
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    with sock:
        assert code == ReplyCode.SUCCEEDED
        sock.sendall(b"stock")
        assert recv_exactly(sock, 5) == b"stock"
