#!/usr/bin/env python3
"""A TCP echo server on 127.0.0.1 for the fairness scenario (e).

    python3 bench/echo.py PORT LIFETIME_SECONDS

It runs as its own process, so the benchmark client times its round trips
without sharing an event loop with the server's side of them. It stops after
LIFETIME_SECONDS even if nobody stops it.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

try:
    import uvloop
except ImportError:  # plain asyncio, slower
    uvloop = None  # type: ignore[assignment]

LOCALHOST = "127.0.0.1"


class Echo(asyncio.Protocol):
    """Sends back every byte it receives, as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def serve(port: int, lifetime: float) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, LOCALHOST, port)
    async with server:
        await asyncio.sleep(lifetime)


def main(argv: list[str]) -> int:
    port, lifetime = int(argv[0]), float(argv[1])
    if uvloop is not None:
        uvloop.run(serve(port, lifetime))
    else:
        asyncio.run(serve(port, lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
