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
    """A listening socket on `host`, or on the wildcard when `host` is not ours (NAT)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            sock.bind((host, 0))
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _expected_peers(addresses: list[tuple[int, tuple]]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The peer addresses BIND accepts; None (anyone) when the client named the wildcard."""
    peers = {_plain(sockaddr[0]) for _, sockaddr in addresses}
    return None if all(peer.is_unspecified for peer in peers) else peers


async def bind(session: Session, request: socks5.Request) -> None:
    server, settings = session.server, session.settings
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(settings.connect_timeout):
        expected = _expected_peers(await server.resolve(request.host, request.port or 1))
    announced = settings.external_address or session.local_host()
    listener = _listening_socket(announced)
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
