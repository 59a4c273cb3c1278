"""A SOCKS5 server (no authentication, CONNECT only) that changes one byte of what it relays
towards the client, after the first MiB: the benchmark must notice (tests/test_bench_smoke.py).

    python3 tests/corrupting_socks.py PORT
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

FLIP_AT = 1 << 20


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flip: bool) -> None:
    moved = 0
    try:
        while chunk := await reader.read(1 << 16):
            if flip and moved <= FLIP_AT < moved + len(chunk):
                at = FLIP_AT - moved
                chunk = chunk[:at] + bytes((chunk[at] ^ 0xFF,)) + chunk[at + 1 :]
            moved += len(chunk)
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _, count = await reader.readexactly(2)
    await reader.readexactly(count)
    writer.write(b"\x05\x00")
    _, _, _, kind = await reader.readexactly(4)
    if kind != 1:
        writer.close()
        return
    host = socket.inet_ntoa(await reader.readexactly(4))
    (port,) = struct.unpack("!H", await reader.readexactly(2))
    up_reader, up_writer = await asyncio.open_connection(host, port)
    writer.write(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", 0))
    await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True), return_exceptions=True)


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
