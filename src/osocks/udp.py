"""UDP ASSOCIATE (RFC 1928 §7): a relay socket for one client, alive while its
TCP control connection is.

The client-facing socket is bound to the address the control connection came
in on; datagrams are taken only from the client's IP (and port, once known).
Outgoing datagrams leave from one socket per address family; answers are
taken only from destinations the client has sent to, and wrapped in the RFC
header naming their source.  Fragments (FRAG ≠ 0) are reassembled (§7).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import socks5, tasks
from .netinfo import plain_address as _plain
from .socks5 import AddressType, ProtocolError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("osocks")

REASSEMBLY_TIMEOUT = 5.0  # the RFC asks for no less than 5 seconds
MAX_DATAGRAM = 65535
MAX_PEERS = 1024  # destinations remembered per association, for accepting answers
NAME_CACHE_SECONDS = 30.0


class Reassembly:
    """The §7 queue: fragments 1, 2, … n|0x80 become one datagram.

    A fragment out of order, a different destination, a queue over 64 KiB or
    older than the timer discards the queue.
    """

    __slots__ = ("timeout", "parts", "destination", "expected", "started", "size")

    def __init__(self, timeout: float = REASSEMBLY_TIMEOUT) -> None:
        self.timeout = timeout
        self.parts: list[bytes] = []
        self.destination: tuple[str, int] | None = None
        self.expected = 1
        self.started = 0.0
        self.size = 0

    def discard(self) -> None:
        self.parts, self.destination, self.expected, self.size = [], None, 1, 0

    def add(self, fragment: int, destination: tuple[str, int], payload: bytes, now: float) -> bytes | None:
        """Returns the whole datagram when `fragment` ends a sequence, else None."""
        if self.parts and now - self.started > self.timeout:
            self.discard()
        position, last = fragment & 0x7F, bool(fragment & 0x80)
        if position == 1:
            self.discard()
            self.started = now
            self.destination = destination
        elif position != self.expected or destination != self.destination:
            self.discard()
            return None
        self.size += len(payload)
        if self.size > MAX_DATAGRAM:
            self.discard()
            return None
        self.parts.append(payload)
        self.expected = position + 1
        if not last:
            return None
        whole = b"".join(self.parts)
        self.discard()
        return whole


class _Datagrams(asyncio.DatagramProtocol):
    """Hands each datagram of one socket to a method of the association."""

    __slots__ = ("received",)

    def __init__(self, received: Callable[[bytes, tuple], None]) -> None:
        self.received = received

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.received(data, addr)


class Association:
    __slots__ = (
        "session",
        "client_ip",
        "client_port",
        "client_side",
        "outbound",
        "peers",
        "names",
        "reassembly",
        "up",
        "down",
        "closed",
        "tasks",
        "protect",
    )

    def __init__(self, session: Session, client_port: int) -> None:
        self.session = session
        self.client_ip = _plain(session.client[0])
        self.client_port = client_port  # 0: learnt from the first datagram
        self.client_side: asyncio.DatagramTransport | None = None
        self.outbound: dict[int, asyncio.DatagramTransport] = {}
        self.peers: dict[tuple[str, int], None] = {}
        self.names: dict[tuple[str, int], tuple[float, list[tuple[int, tuple]]]] = {}
        self.reassembly = Reassembly()
        self.up = self.down = 0
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()  # name lookups and outbound sockets being opened
        from .gss import Channel  # here, not at import: 0.2 MB that a server without UDP clients need not hold

        transport = session.transport
        self.protect = transport if isinstance(transport, Channel) else None  # GSSAPI per-message protection

    async def open(self, local_host: str) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self.from_client), local_addr=(local_host, 0)
        )
        self.client_side = transport  # type: ignore[assignment]
        return transport.get_extra_info("sockname")[:2]

    # client → destination

    def from_client(self, data: bytes, addr: tuple) -> None:
        if self.closed or _plain(addr[0]) != self.client_ip:
            return
        if self.client_port and addr[1] != self.client_port:
            return
        if self.protect is not None:
            unsealed = self.protect.unseal(data)
            if unsealed is None:
                self._invalid("not a GSSAPI-protected datagram of this session")
                return
            data = unsealed
        self.client_port = addr[1]
        try:
            parsed = socks5.parse_udp_header(data)
        except ProtocolError as e:
            self._invalid(str(e))
            return
        if parsed is None:
            self._invalid("truncated header")
            return
        header, used = parsed
        payload = data[used:]
        if header.fragment:
            whole = self.reassembly.add(header.fragment, (header.host, header.port), payload, time.monotonic())
            if whole is None:
                return
            payload = whole
        if header.port == 0:
            self._invalid("destination port 0")
            return
        if header.address_type == AddressType.DOMAIN:
            tasks.start(self._send_to_name(header.host, header.port, payload), self.tasks)
            return
        self._send(header.host, header.port, payload)

    def _invalid(self, why: str) -> None:
        """A datagram no destination could be found for: counted, and one line at debug level."""
        self.session.server.counters.udp_invalid += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("udp: client %s: datagram dropped: %s", self.client_ip, why)

    async def _send_to_name(self, host: str, port: int, payload: bytes) -> None:
        now = time.monotonic()
        cached = self.names.get((host, port))
        if cached is not None and now - cached[0] < NAME_CACHE_SECONDS:
            addresses = cached[1]
        else:
            try:
                addresses = await self.session.server.resolve(host, port)
            except (OSError, ProtocolError) as e:
                self._invalid(f"{host}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
                return
            if len(self.names) > MAX_PEERS:
                self.names.clear()
            self.names[(host, port)] = (now, addresses)
        if addresses and not self.closed:
            self._send(addresses[0][1][0], port, payload)

    def _send(self, host: str, port: int, payload: bytes) -> None:
        server = self.session.server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        refused = server.family_off(family) or server.destination_refused(host, port)
        if refused is not None:
            server.counters.udp_denied += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("udp: client %s: datagram to %s:%d dropped: %s", self.client_ip, host, port, refused)
            return
        transport = self.outbound.get(family)
        if transport is None:
            tasks.start(self._open_outbound(family, host, port, payload), self.tasks)
            return
        self._sendto(transport, host, port, payload)

    def _sendto(self, transport: asyncio.DatagramTransport, host: str, port: int, payload: bytes) -> None:
        key = (str(_plain(host)), port)
        if key not in self.peers:
            if len(self.peers) >= MAX_PEERS:
                self.peers.pop(next(iter(self.peers)))
            self.peers[key] = None
        transport.sendto(payload, (host, port))
        self.up += len(payload)
        counters = self.session.server.counters
        counters.udp_datagrams += 1
        counters.udp_bytes += len(payload)

    async def _open_outbound(self, family: int, host: str, port: int, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        source = self.session.server.source_address(family)
        wildcard = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        try:
            if family not in self.outbound:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self.from_destination), local_addr=source or wildcard, family=family
                )
                if self.closed:
                    transport.close()
                    return
                self.outbound[family] = transport  # type: ignore[assignment]
        except OSError as e:
            log.debug("udp: cannot open an outbound socket: %s", e)
            return
        self._sendto(self.outbound[family], host, port, payload)

    # destination → client

    def from_destination(self, data: bytes, addr: tuple) -> None:
        if self.closed or not self.client_port or self.client_side is None:
            return
        source = str(_plain(addr[0]))
        if (source, addr[1]) not in self.peers:
            return
        datagram = socks5.encode_udp_header(source, addr[1]) + data
        if self.protect is not None:
            sealed = self.protect.seal(datagram)
            if sealed is None:  # too large to wrap into one datagram
                return
            datagram = sealed
        self.client_side.sendto(datagram, (str(self.session.client[0]), self.client_port))
        self.down += len(data)
        counters = self.session.server.counters
        counters.udp_datagrams += 1
        counters.udp_bytes += len(data)

    def close(self) -> None:
        self.closed = True
        for task in list(self.tasks):
            task.cancel()
        if self.client_side is not None:
            self.client_side.close()
        for transport in self.outbound.values():
            transport.close()
        self.outbound.clear()


async def associate(session: Session, request: socks5.Request) -> None:
    association = Association(session, request.port)
    session.udp = association
    try:
        host, port = await association.open(session.local_host())
    except OSError:
        session.udp = None
        association.close()
        raise
    session.server.counters.udp_associations += 1
    session.start_udp(host, port)
