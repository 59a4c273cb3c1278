"""Moves bytes both ways between two transports: the hot path.

Each side of a tunnel is a `RelayEnd` protocol whose `peer` is the other side.
Back-pressure: when a side's transport has too much to write, it stops reading
the peer (`pause_writing` → `peer.pause_reading`).  Half-close: an EOF from one
side becomes a shutdown of writing on the other; the tunnel closes once both
sides have sent EOF.  A reset or error on one side aborts the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import splice

YIELD_AFTER = 1 << 16  # a read this large means more is waiting: read it on the next turn


class RelayEnd(asyncio.Protocol):
    __slots__ = (
        "transport",
        "peer",
        "received",
        "eof",
        "lost",
        "on_closed",
        "early",
        "splice_after",
        "splicer",
        "spliced",
        "held",
        "yielding",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: RelayEnd = None  # type: ignore[assignment]
        self.received = 0  # bytes read from this side
        self.eof = False
        self.lost = False
        self.on_closed: Callable[[], None] | None = None
        self.early: list[bytes] | None = []  # what arrives before the relay starts
        self.splice_after = 0  # switch this direction to splice(2) past this many bytes; 0: never
        self.splicer: splice.Splicer | None = None
        self.spliced = False
        self.held = False  # reading stopped by back-pressure from the peer
        self.yielding = False  # reading stopped until the next turn of the loop (fairness)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.early is not None:
            self.early.append(data)
            self.transport.pause_reading()
            return
        self.peer.transport.write(data)
        if self.splice_after and self.received > self.splice_after:  # bulk: worth a pipe
            self.spliced = splice.try_start(self)
            if self.spliced:
                return
        if len(data) >= YIELD_AFTER:
            # the loop would read this socket again at once (libuv reads up to 32 times an
            # event): let every other connection have its turn first
            self.yielding = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self.yielding = False
        if not (self.held or self.lost or self.splicer is not None):
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.early is not None:
            return True
        peer = self.peer
        if peer.eof:
            self.transport.close()
            peer.transport.close()
        elif not peer.lost:
            peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        source = self.peer
        source.held = True
        if source.splicer is None:
            source.transport.pause_reading()

    def resume_writing(self) -> None:
        source = self.peer
        source.held = False
        if not (source.yielding or source.lost or source.splicer is not None):
            source.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.early is not None:
            return
        peer = self.peer
        if self.splicer is not None or peer.splicer is not None:
            _stop_splicing(self, peer)
        if not peer.lost:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()
            return
        on_closed = self.on_closed
        # no reference cycles left behind
        self.transport = self.peer = self.on_closed = None  # type: ignore[assignment]
        peer.transport = peer.peer = peer.on_closed = None  # type: ignore[assignment]
        if on_closed is not None:
            on_closed()


def _stop_splicing(*ends: RelayEnd) -> None:
    for end in ends:
        if end.splicer is not None:
            end.splicer.close()
            end.splicer = None


def link(client: RelayEnd, upstream: RelayEnd) -> None:
    client.peer, upstream.peer = upstream, client


def start(
    client: RelayEnd,
    upstream: RelayEnd,
    client_transport: asyncio.Transport,
    early_data: bytes,
    client_eof: bool,
    use_splice: bool = False,
) -> None:
    """Hand the client transport to the relay and let bytes flow.

    Whatever the destination sent before this (held in `upstream.early`) goes
    to the client now, after the SOCKS reply; likewise the client's early data.
    """
    client.early = None
    if use_splice and splice.AVAILABLE:
        client.splice_after = upstream.splice_after = splice.SPLICE_AFTER
    client.transport = client_transport
    client_transport.set_protocol(client)
    held, upstream.early = upstream.early or [], None
    for data in held:
        client_transport.write(data)
    if upstream.lost:  # the destination is gone already: close the client once that is flushed
        client_transport.close()
        return
    if early_data:
        client.received += len(early_data)
        upstream.transport.write(early_data)
    if client_eof:
        client.eof = True
        upstream.transport.write_eof()
    if upstream.eof:
        upstream.eof = False
        upstream.eof_received()
    upstream.transport.resume_reading()
    client_transport.resume_reading()


def abort(client: RelayEnd, upstream: RelayEnd) -> None:
    for end in (client, upstream):
        if end.transport is not None and not end.lost:
            end.transport.abort()
