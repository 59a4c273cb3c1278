#!/usr/bin/env python3
"""Which copying relay to build on: the measurement behind src/osocks/relay.py.

    python3 bench/relay_designs.py            # bulk (a) and new sessions (b) per design
    python3 bench/relay_designs.py --smoke

Three minimal SOCKS5 servers on uvloop that differ only in how they move bytes
(no-auth CONNECT to an IPv4 literal, no checks, no counters, no splice), and
osocks itself with --no-splice, each measured with scenarios (a) and (b) of
bench/run.py against the same nginx:

- protocol: asyncio.Protocol; data_received → peer.write; pause_writing of one
  side pauses reading of the other (what osocks does)
- buffered: asyncio.BufferedProtocol reading into one 64 KiB buffer per side;
  the bytes are copied out before the next read may overwrite them
- streams: StreamReader/StreamWriter, a coroutine per direction, read(64 KiB),
  write, await drain()
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
from pathlib import Path

import scenarios
import services
from scenarios import Profile, Target

DESIGNS = ("protocol", "buffered", "streams")
READ_SIZE = 1 << 16
GREETING_REPLY = b"\x05\x00"


def _reply(sock: socket.socket) -> bytes:
    host, port = sock.getsockname()[:2]
    return b"\x05\x00\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


# --- the Protocol designs: a handshake protocol hands its transport to a relay end


class _End(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.eof:  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
            self.peer.transport.close()  # type: ignore[union-attr]
        else:
            self.peer.transport.write_eof()  # type: ignore[union-attr]
        return True

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _BufferedEnd(asyncio.BufferedProtocol, _End):
    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray(READ_SIZE)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.peer.transport.write(self.buffer[:nbytes])  # type: ignore[union-attr]


class _Handshake(asyncio.Protocol):
    def __init__(self, end_type: type[_End]) -> None:
        self.end_type = end_type
        self.data = b""
        self.greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if not self.greeted and len(self.data) >= 3:
            self.transport.write(GREETING_REPLY)
            self.data, self.greeted = self.data[3:], True
        if self.greeted and len(self.data) >= 10:
            host, port = socket.inet_ntoa(self.data[4:8]), int.from_bytes(self.data[8:10], "big")
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._connect(host, port, self.data[10:]))

    async def _connect(self, host: str, port: int, early_data: bytes) -> None:
        upstream, client = self.end_type(), self.end_type()
        upstream.peer, client.peer = client, upstream
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: upstream, host, port)
        self.transport.write(_reply(transport.get_extra_info("socket")))
        if early_data:  # a client may send its first bytes along with the request
            transport.write(early_data)
        client.transport = self.transport
        self.transport.set_protocol(client)
        self.transport.resume_reading()


# --- the streams design


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


async def _streams_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readexactly(3)
        writer.write(GREETING_REPLY)
        request = await reader.readexactly(10)
        host, port = socket.inet_ntoa(request[4:8]), int.from_bytes(request[8:10], "big")
        up_reader, up_writer = await asyncio.open_connection(host, port)
        writer.write(_reply(up_writer.get_extra_info("socket")))
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        up_writer.close()
    except (OSError, asyncio.IncompleteReadError):
        pass
    writer.close()


async def serve(design: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if design == "streams":
        server = await asyncio.start_server(_streams_session, "127.0.0.1", port)
    else:
        end_type = _End if design == "protocol" else _BufferedEnd
        server = await loop.create_server(lambda: _Handshake(end_type), "127.0.0.1", port)
    await server.serve_forever()


# --- the runner


def design_server(design: str) -> services.SocksServer:
    return services.SocksServer(
        name=design,
        program=sys.executable,
        arguments=lambda port, _: [__file__, "--serve", design, str(port)],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run")
    parser.add_argument("--serve", nargs=2, metavar=("DESIGN", "PORT"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        import uvloop

        design, port = arguments.serve
        uvloop.run(serve(design, int(port)))
        return 0

    profile: Profile = scenarios.SMOKE if arguments.smoke else scenarios.FULL
    servers = [design_server(design) for design in DESIGNS] + [services.osocks(["--no-splice"])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="osocks-relays-") as temporary:
        workdir = Path(temporary)
        workdir.chmod(0o755)
        (workdir / "nginx").mkdir()
        with services.nginx(workdir / "nginx", profile.file_sizes(), 4096) as web:
            for server in servers:
                figures: dict[str, float] = {}
                for measure in (scenarios.bulk_download, scenarios.new_sessions):
                    scenario_dir = workdir / f"{server.name.replace(' ', '_')}-{measure.__name__}"
                    scenario_dir.mkdir()
                    with server.serving(scenario_dir) as (proxy, pid):
                        figures |= measure(Target(proxy, pid, web, scenario_dir), profile)
                print(f"[{server.name}] {figures}", file=sys.stderr, flush=True)
                rows.append((server.name, figures))
    print("| relay | bulk MB/s | CPU s per GB | sessions/s | CPU µs per session |")
    print("|---|---:|---:|---:|---:|")
    for name, f in rows:
        print(
            f"| {name} | {f['mb_per_s']:.0f} | {f['cpu_s_per_gb']:.2f} "
            f"| {f['sessions_per_s']:.0f} | {f['cpu_us_per_session']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
