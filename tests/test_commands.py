"""BIND and UDP ASSOCIATE on loopback (tests/test_topology.py runs them across hosts)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import ServerThread, read_reply, recv_exactly, wait_closed
from osocks import socks5
from osocks.socks5 import Command, ReplyCode
from osocks.udp import Reassembly


def request(port: int, command: int, host: str, dport: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(socks5.encode_greeting(b"\x00") + socks5.encode_request(command, host, dport))
    assert recv_exactly(sock, 2) == b"\x05\x00"
    return sock


# -- BIND --------------------------------------------------------------------


def test_bind_accepts_the_named_peer_and_relays(osocks: ServerThread) -> None:
    control = request(osocks.port, Command.BIND, "127.0.0.2", 0)
    code, host, port = read_reply(control)
    assert code == ReplyCode.SUCCEEDED and host == "127.0.0.1" and port
    stranger = socket.create_connection((host, port), timeout=5)  # from 127.0.0.1: not the named peer
    assert wait_closed(stranger) == b""
    stranger.close()
    peer = socket.socket()
    peer.bind(("127.0.0.2", 0))
    peer.connect((host, port))
    code, phost, pport = read_reply(control)
    assert (code, phost, pport) == (ReplyCode.SUCCEEDED, "127.0.0.2", peer.getsockname()[1])
    peer.sendall(b"from peer")
    assert recv_exactly(control, 9) == b"from peer"
    control.sendall(b"from client")
    peer.settimeout(5)
    assert recv_exactly(peer, 11) == b"from client"
    peer.close()
    assert wait_closed(control) == b""
    control.close()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0 and s["replies"]["succeeded"] == 2)


def test_bind_times_out_with_a_second_reply(make_server) -> None:
    server = make_server(bind_timeout=0.3)
    control = request(server.port, Command.BIND, "0.0.0.0", 0)
    code, host, port = read_reply(control)
    assert code == ReplyCode.SUCCEEDED
    assert read_reply(control)[0] == ReplyCode.TTL_EXPIRED
    assert wait_closed(control) == b""
    control.close()
    assert listener_closed(host, port)


def test_bind_client_gone_closes_the_listener(osocks: ServerThread) -> None:
    control = request(osocks.port, Command.BIND, "0.0.0.0", 0)
    _, host, port = read_reply(control)
    control.close()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert listener_closed(host, port)


def listener_closed(host: str, port: int, timeout: float = 3) -> bool:
    """The BIND listener goes away once its cancelled task has run its cleanup."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.02)
    return False


def test_bind_announces_the_external_address(make_server) -> None:
    server = make_server(external_address="127.0.0.3")
    control = request(server.port, Command.BIND, "0.0.0.0", 0)
    code, host, port = read_reply(control)
    assert (code, host) == (ReplyCode.SUCCEEDED, "127.0.0.3")
    peer = socket.create_connection(("127.0.0.3", port), timeout=5)
    assert read_reply(control)[0] == ReplyCode.SUCCEEDED
    peer.close()
    control.close()


# -- UDP ASSOCIATE -------------------------------------------------------------


class UdpEcho:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.received.append(data)
            self.sock.sendto(b"echo:" + data, addr)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_echo():
    echo = UdpEcho()
    yield echo
    echo.close()


def associate(port: int, client: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    control = request(port, Command.UDP_ASSOCIATE, "0.0.0.0", 0)
    code, host, relay_port = read_reply(control)
    assert code == ReplyCode.SUCCEEDED and host == "127.0.0.1" and relay_port
    return control, (host, relay_port)


def exchange(client: socket.socket, relay: tuple[str, int], datagram: bytes, timeout: float = 3) -> bytes | None:
    client.sendto(datagram, relay)
    client.settimeout(timeout)
    try:
        return client.recvfrom(65535)[0]
    except TimeoutError:
        return None


def test_udp_round_trip_with_source_header(osocks: ServerThread, udp_echo: UdpEcho) -> None:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    control, relay = associate(osocks.port, client)
    answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"ping")
    assert answer is not None
    header, used = socks5.parse_udp_header(answer)  # type: ignore[misc]
    assert (header.host, header.port, header.fragment) == ("127.0.0.1", udp_echo.port, 0)
    assert answer[used:] == b"echo:ping"
    by_name = exchange(client, relay, socks5.encode_udp_header("localhost", udp_echo.port) + b"name")
    assert by_name is not None and by_name.endswith(b"echo:name")
    status = osocks.status()
    assert status["udp"]["associations"] == 1 and status["udp"]["datagrams"] == 4
    control.close()
    osocks.wait_for(lambda s: s["sessions"]["live"] == 0)
    client.connect(relay)  # so that the kernel reports the ICMP port unreachable of a closed relay socket
    with pytest.raises(ConnectionRefusedError):
        exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"late", timeout=10)
    assert b"late" not in udp_echo.received
    client.close()


def test_udp_only_from_the_client(osocks: ServerThread, udp_echo: UdpEcho) -> None:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    control, relay = associate(osocks.port, client)
    assert exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"mine") is not None
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))  # same IP, another port: the client's port is known by now
    other.sendto(socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"theirs", relay)
    stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stray.bind(("127.0.0.1", 0))
    stray.sendto(b"unsolicited", relay)  # not a destination the client sent to: not passed on
    # the relay reads its socket in order: once the client's next datagram is echoed, those two were handled
    answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"after", 10)
    assert answer is not None and answer.endswith(b"echo:after")  # the first thing the client gets back
    assert udp_echo.received == [b"mine", b"after"]
    other.settimeout(0)
    with pytest.raises(BlockingIOError):
        other.recvfrom(65535)
    for s in (client, other, stray, control):
        s.close()


def test_udp_fragments_are_reassembled(osocks: ServerThread, udp_echo: UdpEcho) -> None:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    control, relay = associate(osocks.port, client)
    for frag, part in ((1, b"one-"), (2, b"two-"), (0x83, b"three")):
        client.sendto(socks5.encode_udp_header("127.0.0.1", udp_echo.port, frag) + part, relay)
    client.settimeout(3)
    answer = client.recvfrom(65535)[0]
    assert answer.endswith(b"echo:one-two-three")
    # a lost fragment (2 missing) discards the queue: nothing is sent
    for frag, part in ((1, b"a"), (0x83, b"c")):
        client.sendto(socks5.encode_udp_header("127.0.0.1", udp_echo.port, frag) + part, relay)
    answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"whole", 10)
    assert answer is not None and answer.endswith(b"echo:whole")  # handled after the broken queue
    assert udp_echo.received == [b"one-two-three", b"whole"]
    control.close()
    client.close()


def test_reassembly_queue_rules() -> None:
    q = Reassembly(timeout=5)
    dst = ("192.0.2.1", 53)
    assert q.add(1, dst, b"a", 0) is None
    assert q.add(0x82, dst, b"b", 1) == b"ab"
    assert q.add(1, dst, b"a", 2) is None and q.add(0x82, dst, b"b", 8) is None  # timer expired
    assert q.add(1, dst, b"a", 10) is None and q.add(1, dst, b"x", 10) is None  # restart at 1
    assert q.add(0x82, dst, b"y", 10) == b"xy"
    assert q.add(1, dst, b"a", 11) is None and q.add(0x82, ("192.0.2.2", 53), b"b", 11) is None  # other destination
    assert q.add(0x81, dst, b"alone", 12) == b"alone"
    big = b"x" * 40000
    assert q.add(1, dst, big, 13) is None and q.add(0x82, dst, big, 13) is None  # over 64 KiB


def test_udp_denied_destination_is_dropped(make_server, udp_echo: UdpEcho) -> None:
    from osocks.settings import parse_rules

    allowed = UdpEcho()
    server = make_server(dest_rules=parse_rules("test", [f"deny 127.0.0.1 port {udp_echo.port}"]))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    control, relay = associate(server.port, client)
    client.sendto(socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"no", relay)
    answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", allowed.port) + b"yes", 10)
    assert answer is not None and answer.endswith(b"echo:yes")  # the first answer: the denied one got none
    assert udp_echo.received == [] and allowed.received == [b"yes"]
    control.close()
    client.close()
    allowed.close()


def test_udp_idle_timeout_ends_the_association(make_server, udp_echo: UdpEcho) -> None:
    """Datagrams keep an association alive past the idle timeout; once they stop, it ends."""
    server = make_server(idle_timeout=1.0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    control, relay = associate(server.port, client)
    control.setblocking(False)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        answer = exchange(client, relay, socks5.encode_udp_header("127.0.0.1", udp_echo.port) + b"tick", 10)
        assert answer is not None and answer.endswith(b"echo:tick")
        with pytest.raises(BlockingIOError):  # the control connection is still open
            control.recv(1)
        time.sleep(0.1)
    assert server.status()["sessions"]["live"] == 1
    assert wait_closed(control, timeout=10) == b""
    control.close()
    client.close()
