"""osocks between hosts: a client on the lan, osocks in its own network namespace, destinations
on the wan (see netns.py for the network).  Every test talks over real sockets across namespaces."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

import netns
from conftest import read_reply, recv_exactly, wait_closed
from netns import (
    CLIENT4,
    CLIENT4_SECOND,
    CLIENT6,
    MISSING_NAME,
    OSOCKS_LAN4,
    OSOCKS_LAN6,
    OSOCKS_WAN4,
    OSOCKS_WAN4_SECOND,
    OSOCKS_WAN6,
    OTHER4,
    SERVER4,
    SERVER6,
    SOCKS_PORT,
    UDP_ECHO_PORT,
    UNANSWERED4,
    V6ONLY6,
    Address,
    OsocksInNamespace,
    Topology,
)
from osocks import socks5
from osocks.socks5 import Command, ReplyCode

StartOsocks = Callable[..., OsocksInNamespace]


@pytest.fixture(scope="module")
def net() -> Iterator[Topology]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.topology() as topology:
        yield topology


@pytest.fixture
def start_osocks(net: Topology) -> Iterator[StartOsocks]:
    """Starts osocks in the osocks namespace with the given flags; stops it after the test."""
    started: list[OsocksInNamespace] = []

    def start(*flags: str) -> OsocksInNamespace:
        process = OsocksInNamespace(net.osocks, *flags)
        started.append(process)
        return process

    yield start
    unclean = [process for process in started if process.stop() != 0]
    assert not unclean, "osocks did not end cleanly:\n" + "\n".join(process.log() for process in unclean)


# -- a SOCKS5 client on the client host ------------------------------------------


class Reply(NamedTuple):
    code: int
    host: str
    port: int


def socks_session(net: Topology, proxy: str = OSOCKS_LAN4, source: str | None = None) -> socket.socket:
    """A connection from the client host to osocks, past the greeting (no authentication)."""
    sock = net.client.connect((proxy, SOCKS_PORT), source=source or (CLIENT6 if ":" in proxy else CLIENT4))
    sock.sendall(socks5.encode_greeting(bytes([socks5.Method.NO_AUTH])))
    assert recv_exactly(sock, 2) == socks5.select_method(socks5.Method.NO_AUTH)
    return sock


def request(sock: socket.socket, command: Command, host: str, port: int) -> Reply:
    sock.sendall(socks5.encode_request(command, host, port))
    return Reply(*read_reply(sock))


def connect_through(net: Topology, host: str, port: int, proxy: str = OSOCKS_LAN4) -> tuple[socket.socket, Reply]:
    sock = socks_session(net, proxy)
    return sock, request(sock, Command.CONNECT, host, port)


def assert_echoed(sock: socket.socket, payload: bytes) -> None:
    """A round trip through an echo server (which has then surely accepted the connection)."""
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def assert_nothing_arrives(sock: socket.socket, within: float = 0.3) -> None:
    timeout = sock.gettimeout()
    sock.settimeout(within)
    try:
        with pytest.raises(TimeoutError):
            sock.recv(1)
    finally:
        sock.settimeout(timeout)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def wan_address(host: str) -> str:
    """osocks's own wan address in the family of `host`."""
    return OSOCKS_WAN6 if ":" in host else OSOCKS_WAN4


# -- the network itself -------------------------------------------------------


def test_the_osocks_host_does_not_forward(net: Topology) -> None:
    """The client has a route to the wan through osocks's host, which drops it: only the proxy gets across."""
    with pytest.raises(TimeoutError):
        net.client.connect((SERVER4, 80), timeout=0.5).close()


# -- CONNECT ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "proxy", "reached"),
    [
        (SERVER4, OSOCKS_LAN4, SERVER4),
        ("v4.osocks.test", OSOCKS_LAN4, SERVER4),
        ("v6.osocks.test", OSOCKS_LAN4, V6ONLY6),  # AAAA only
        (V6ONLY6, OSOCKS_LAN6, V6ONLY6),
    ],
    ids=["ipv4-address", "ipv4-name", "ipv6-only-name", "ipv6-literal-over-ipv6-lan"],
)
def test_connect_reaches_the_destination_host(
    net: Topology, start_osocks: StartOsocks, destination: str, proxy: str, reached: str
) -> None:
    start_osocks()
    sock, reply = connect_through(net, destination, 80, proxy=proxy)
    with sock:
        assert (reply.code, reply.host) == (ReplyCode.SUCCEEDED, wan_address(reached))
        assert_echoed(sock, b"across the hosts")
    # the destination saw the connection coming from osocks's wan address, the one BND names
    assert (wan_address(reached), reply.port) in net.tcp_echoes[(reached, 80)].peers
    if not is_address(destination):
        assert net.dns is not None and destination in net.dns.queries


def test_connect_to_a_name_that_does_not_exist_is_host_unreachable(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks()
    sock, reply = connect_through(net, MISSING_NAME, 80)
    with sock:
        assert reply.code == ReplyCode.HOST_UNREACHABLE
        assert wait_closed(sock) == b""
    assert net.dns is not None and MISSING_NAME in net.dns.queries  # NXDOMAIN came from the topology


def test_outgoing_connections_leave_from_the_bind_address(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks("-b", OSOCKS_WAN4_SECOND)
    sock, reply = connect_through(net, SERVER4, 80)
    with sock:
        assert reply.code == ReplyCode.SUCCEEDED and reply.host == OSOCKS_WAN4_SECOND
        assert_echoed(sock, b"from b")
    assert net.tcp_echoes[(SERVER4, 80)].peers[-1] == (OSOCKS_WAN4_SECOND, reply.port)


@pytest.mark.parametrize(
    ("flag", "destination", "expected", "reached"),
    [
        ("-4", SERVER6, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, None),
        ("-4", "v6.osocks.test", ReplyCode.HOST_UNREACHABLE, None),  # it has no A record
        ("-4", "dual.osocks.test", ReplyCode.SUCCEEDED, SERVER4),
        ("-6", SERVER4, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, None),
        ("-6", "v4.osocks.test", ReplyCode.HOST_UNREACHABLE, None),  # it has no AAAA record
        ("-6", "dual.osocks.test", ReplyCode.SUCCEEDED, SERVER6),
    ],
)
def test_one_address_family_only(
    net: Topology, start_osocks: StartOsocks, flag: str, destination: str, expected: ReplyCode, reached: str | None
) -> None:
    start_osocks(flag)
    proxy, unused_listener = (OSOCKS_LAN4, OSOCKS_LAN6) if flag == "-4" else (OSOCKS_LAN6, OSOCKS_LAN4)
    with pytest.raises(ConnectionRefusedError):
        net.client.connect((unused_listener, SOCKS_PORT)).close()
    sock, reply = connect_through(net, destination, 80, proxy=proxy)
    with sock:
        assert reply.code == expected
        if reached is not None:
            assert reply.host == wan_address(reached)
            assert_echoed(sock, b"one family")


def test_a_silent_destination_times_out_with_ttl_expired(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks("-T", "1000")
    with socks_session(net) as sock:
        asked = time.monotonic()
        reply = request(sock, Command.CONNECT, UNANSWERED4, 80)
        waited = time.monotonic() - asked
    assert reply.code == ReplyCode.TTL_EXPIRED
    assert 0.9 <= waited < 10, f"the reply came after {waited:.2f}s"  # not before -T


# -- access rules -------------------------------------------------------------


def test_client_rule_closes_a_denied_client_at_once(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks("--client-rule", f"deny {CLIENT4}/32")
    with net.client.connect((OSOCKS_LAN4, SOCKS_PORT), source=CLIENT4) as denied:
        with contextlib.suppress(ConnectionError):  # osocks may have reset it already
            denied.sendall(socks5.encode_greeting(bytes([socks5.Method.NO_AUTH])))
        assert wait_closed(denied, timeout=3) == b""  # no method selected: closed
    with socks_session(net, source=CLIENT4_SECOND) as allowed:
        assert request(allowed, Command.CONNECT, SERVER4, 80).code == ReplyCode.SUCCEEDED


@pytest.mark.parametrize(
    ("destination", "port", "expected", "reached"),
    [
        (SERVER4, 80, ReplyCode.NOT_ALLOWED, None),
        (SERVER4, 8080, ReplyCode.SUCCEEDED, SERVER4),
        ("v4.osocks.test", 80, ReplyCode.NOT_ALLOWED, None),  # the rule is checked after resolving
        ("dual.osocks.test", 80, ReplyCode.SUCCEEDED, SERVER6),  # its other address is allowed
    ],
    ids=["address-low-port", "address-high-port", "name-of-denied-address", "name-with-an-allowed-address"],
)
def test_dest_rule_denies_low_ports_of_one_address(
    net: Topology, start_osocks: StartOsocks, destination: str, port: int, expected: ReplyCode, reached: str | None
) -> None:
    start_osocks("--dest-rule", f"deny {SERVER4}/32 port 1-1023")
    sock, reply = connect_through(net, destination, port)
    with sock:
        assert reply.code == expected
        if reached is not None:
            assert reply.host == wan_address(reached)
            assert_echoed(sock, b"allowed")
            assert (reply.host, reply.port) in net.tcp_echoes[(reached, port)].peers


@pytest.mark.parametrize("destination", [OSOCKS_WAN4, OSOCKS_WAN6, OSOCKS_LAN4, "127.0.0.1", "::1"])
def test_destinations_on_the_osocks_host_are_denied(net: Topology, start_osocks: StartOsocks, destination: str) -> None:
    start_osocks()
    sock, reply = connect_through(net, destination, SOCKS_PORT)
    with sock:
        assert reply.code == ReplyCode.NOT_ALLOWED


def test_allow_local_lifts_the_local_deny(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks("--allow-local")
    sock, reply = connect_through(net, OSOCKS_LAN4, SOCKS_PORT)  # osocks, through itself
    with sock:
        assert reply.code == ReplyCode.SUCCEEDED


# -- BIND ---------------------------------------------------------------------


def test_bind_accepts_the_named_host_only(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks("--external", OSOCKS_WAN4)
    with socks_session(net) as client:
        first = request(client, Command.BIND, SERVER4, 0)
        assert (first.code, first.host) == (ReplyCode.SUCCEEDED, OSOCKS_WAN4) and first.port
        with net.other.connect((OSOCKS_WAN4, first.port)) as stranger:
            assert wait_closed(stranger, timeout=3) == b""  # accepted by the kernel, closed by osocks
        assert_nothing_arrives(client)  # still waiting for the named host
        with net.server.connect((OSOCKS_WAN4, first.port)) as peer:
            assert read_reply(client) == (ReplyCode.SUCCEEDED, SERVER4, peer.getsockname()[1])
            client.sendall(b"to the peer")
            assert recv_exactly(peer, 11) == b"to the peer"
            peer.sendall(b"to the client")
            assert recv_exactly(client, 13) == b"to the client"


NAT_EXTERNAL4 = "198.18.3.1"  # a router's address in front of osocks: not on any host here


def refused(host, address: Address) -> bool:
    try:
        host.connect(address, timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize(
    ("flags", "listens_on", "closed_on"),
    [
        ((), OSOCKS_WAN4, OSOCKS_WAN4_SECOND),  # the route's source towards the peer
        (("-b", OSOCKS_WAN4_SECOND), OSOCKS_WAN4_SECOND, OSOCKS_WAN4),  # -b's address
    ],
)
def test_bind_behind_nat_listens_where_the_forwarded_peer_arrives(
    net: Topology, start_osocks: StartOsocks, flags: tuple[str, ...], listens_on: str, closed_on: str
) -> None:
    """--external names an address that is not osocks's (a router's, which forwards the port): the
    listener is on the one address the forwarded peer reaches, never on every interface."""
    start_osocks("--external", NAT_EXTERNAL4, *flags)
    with socks_session(net) as client:
        first = request(client, Command.BIND, SERVER4, 0)
        assert (first.code, first.host) == (ReplyCode.SUCCEEDED, NAT_EXTERNAL4) and first.port
        assert refused(net.client, (OSOCKS_LAN4, first.port))  # not open on the lan
        assert refused(net.server, (closed_on, first.port))  # nor on osocks's other wan address
        with net.server.connect((listens_on, first.port)) as peer:  # what the router's forward delivers
            assert read_reply(client) == (ReplyCode.SUCCEEDED, SERVER4, peer.getsockname()[1])
            peer.sendall(b"through the nat")
            assert recv_exactly(client, 15) == b"through the nat"


def test_bind_behind_nat_for_any_peer_listens_where_the_client_reached_osocks(
    net: Topology, start_osocks: StartOsocks
) -> None:
    start_osocks("--external", NAT_EXTERNAL4)
    with socks_session(net) as client:
        first = request(client, Command.BIND, "0.0.0.0", 0)
        assert (first.code, first.host) == (ReplyCode.SUCCEEDED, NAT_EXTERNAL4)
        assert refused(net.server, (OSOCKS_WAN4, first.port))
        with net.client.connect((OSOCKS_LAN4, first.port), source=CLIENT4_SECOND) as peer:
            assert read_reply(client) == (ReplyCode.SUCCEEDED, CLIENT4_SECOND, peer.getsockname()[1])


# -- UDP ASSOCIATE ------------------------------------------------------------


class UdpAssociation:
    """The client's side of UDP ASSOCIATE: the control connection and a UDP socket talking to the relay."""

    def __init__(self, net: Topology, proxy: str = OSOCKS_LAN4, source: str = CLIENT4) -> None:
        self.udp = net.client.udp_socket((source, 0))
        self.udp.settimeout(2)
        try:
            self.control = socks_session(net, proxy, source)
            self.reply = request(self.control, Command.UDP_ASSOCIATE, source, self.udp.getsockname()[1])
            assert self.reply.code == ReplyCode.SUCCEEDED, self.reply
            self.relay: Address = (self.reply.host, self.reply.port)
            self.udp.connect(self.relay)
        except BaseException:
            self.close()
            raise

    def send(self, host: str, port: int, payload: bytes) -> None:
        self.udp.send(socks5.encode_udp_header(host, port) + payload)

    def receive(self) -> tuple[str, int, bytes]:
        """(source host, source port, payload) of the next datagram from the relay."""
        datagram = self.udp.recv(65535)
        parsed = socks5.parse_udp_header(datagram)
        assert parsed is not None, datagram
        header, used = parsed
        return header.host, header.port, datagram[used:]

    def relay_refuses(self) -> bool:
        """True once the relay port is closed (the kernel answers port unreachable)."""
        try:
            self.send(SERVER4, UDP_ECHO_PORT, b"still there?")
            self.udp.settimeout(0.2)
            self.udp.recv(65535)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            pass
        finally:
            self.udp.settimeout(2)
        return False

    def close(self) -> None:
        self.udp.close()
        if hasattr(self, "control"):
            self.control.close()

    def __enter__(self) -> UdpAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.mark.parametrize(
    ("source", "proxy", "destination", "answering"),
    [
        (CLIENT4, OSOCKS_LAN4, SERVER4, SERVER4),
        (CLIENT4, OSOCKS_LAN4, SERVER6, SERVER6),
        (CLIENT6, OSOCKS_LAN6, SERVER6, SERVER6),
        (CLIENT4, OSOCKS_LAN4, "v4.osocks.test", SERVER4),
    ],
    ids=["ipv4", "ipv6-over-ipv4-control", "ipv6", "name"],
)
def test_udp_associate_relays_to_a_destination_host(
    net: Topology, start_osocks: StartOsocks, source: str, proxy: str, destination: str, answering: str
) -> None:
    start_osocks()
    with UdpAssociation(net, proxy, source) as association:
        assert association.relay[0] == proxy  # the relay is on the address the client reached
        association.send(destination, UDP_ECHO_PORT, b"datagram")
        assert association.receive() == (answering, UDP_ECHO_PORT, b"datagram")
    payload, sender = net.udp_echoes[(answering, UDP_ECHO_PORT)].received[-1]
    assert payload == b"datagram" and sender[0] == wan_address(answering)


def test_udp_leaves_from_the_bind_address(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks("-b", OSOCKS_WAN4_SECOND)
    with UdpAssociation(net) as association:
        association.send(SERVER4, UDP_ECHO_PORT, b"from b")
        assert association.receive() == (SERVER4, UDP_ECHO_PORT, b"from b")
    payload, sender = net.udp_echoes[(SERVER4, UDP_ECHO_PORT)].received[-1]
    assert payload == b"from b" and sender[0] == OSOCKS_WAN4_SECOND


def test_udp_from_another_host_is_not_relayed(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks()
    echo = net.udp_echoes[(SERVER4, UDP_ECHO_PORT)]
    with UdpAssociation(net) as association:
        association.send(SERVER4, UDP_ECHO_PORT, b"first")
        assert association.receive() == (SERVER4, UDP_ECHO_PORT, b"first")
        arrived_before = net.osocks.udp_datagrams_received()
        with net.other.udp_socket((OTHER4, 0)) as stranger:
            stranger.sendto(socks5.encode_udp_header(SERVER4, UDP_ECHO_PORT) + b"stray", association.relay)
            wait_until(
                lambda: net.osocks.udp_datagrams_received() > arrived_before,
                "the stray datagram reaches the relay port",
            )
            association.send(SERVER4, UDP_ECHO_PORT, b"second")
            assert association.receive() == (SERVER4, UDP_ECHO_PORT, b"second")
            assert_nothing_arrives(association.udp)
            stranger.settimeout(2)
            assert_nothing_arrives(stranger)
    assert b"stray" not in [payload for payload, _ in echo.received]


def test_udp_association_ends_with_its_control_connection(net: Topology, start_osocks: StartOsocks) -> None:
    start_osocks()
    with UdpAssociation(net) as association:
        association.send(SERVER4, UDP_ECHO_PORT, b"alive")
        assert association.receive() == (SERVER4, UDP_ECHO_PORT, b"alive")
        association.control.close()
        wait_until(association.relay_refuses, "the relay port closes after the control connection")
