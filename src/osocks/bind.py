"""BIND (RFC 1928 §4): listen, announce, accept the one expected peer, relay."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from typing import TYPE_CHECKING

from . import relay, socks5
from .netinfo import plain_address as _plain
from .socks5 import ProtocolError, ReplyCode

if TYPE_CHECKING:
    from .session import Session


def _listening_socket(host: str) -> socket.socket:
    """A listening socket on `host` (OSError EADDRNOTAVAIL when `host` is not this host's)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def behind_nat(session: Session, announced: str, peers: list[str]) -> str:
    """Where BIND listens when the announced address is not this host's: osocks sits behind NAT
    (--external names the router's address), and the listener belongs on the address the forwarded
    peer reaches: -b's address, or the source address of the route towards the expected peer, or
    (any peer) the address the client reached osocks on.  Never the wildcard: the port would be
    open on every interface for as long as BIND waits."""
    version = ipaddress.ip_address(announced).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    source = session.settings.bind_address
    if source is not None and ipaddress.ip_address(source).version == version:
        return source
    for peer in peers:
        if _plain(peer).version == version and not _plain(peer).is_unspecified:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:  # connect() on UDP only picks the route
                probe.connect((str(_plain(peer)), 9))
                return str(probe.getsockname()[0])
    local = _plain(session.local_host())
    if local.version == version:
        return str(local)
    raise OSError(errno.EADDRNOTAVAIL, f"no address of this host for a BIND announced as {announced}")


def _expected_peers(addresses: list[tuple[int, tuple]]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The peer addresses BIND accepts; None (anyone) when the client named the wildcard."""
    peers = {_plain(sockaddr[0]) for _, sockaddr in addresses}
    return None if all(peer.is_unspecified for peer in peers) else peers


async def bind(session: Session, request: socks5.Request) -> None:
    server, settings = session.server, session.settings
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(settings.connect_timeout):
        addresses = await server.resolve(request.host, request.port or 1)
    expected = _expected_peers(addresses)
    announced = settings.external_address or session.local_host()
    try:
        listener = _listening_socket(announced)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        listener = _listening_socket(behind_nat(session, announced, [str(sockaddr[0]) for _, sockaddr in addresses]))
    try:
        port = listener.getsockname()[1]
        session.transport.write(socks5.encode_reply(ReplyCode.SUCCEEDED, announced, port))
        server.counters.replied(ReplyCode.SUCCEEDED)
        async with asyncio.timeout(settings.bind_timeout):
            while True:
                conn, peer = await loop.sock_accept(listener)
                if expected is None or _plain(peer[0]) in expected:
                    break
                conn.close()  # not the peer the client named
        refused = server.destination_refused(peer[0], peer[1])
        if refused is not None:
            conn.close()
            raise ProtocolError(f"BIND peer {peer[0]} {refused}", ReplyCode.NOT_ALLOWED)
    finally:
        listener.close()
    upstream = relay.RelayEnd()
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: upstream, conn)
    except BaseException:
        conn.close()
        raise
    session.reached = str(_plain(peer[0]))
    session.succeed(transport, upstream, bound=peer)  # type: ignore[arg-type]
