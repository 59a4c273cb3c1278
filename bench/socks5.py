"""A minimal SOCKS5 client (no authentication, CONNECT to an IPv4 address) for the benchmark.

Two forms share the wire format: a blocking one for the single-stream download,
where recv_into() into one buffer is the cheapest way to read, and an asyncio
protocol for many concurrent short or held sessions.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

GREETING = b"\x05\x01\x00"  # version 5, one method offered: no authentication
METHOD_CHOSEN = b"\x05\x00"
REPLY_HEAD_LENGTH = 5  # VER REP RSV ATYP and the first address byte (a name's length)
_DOMAIN_NAME = 3
_ADDRESS_LENGTH_BY_TYPE = {1: 4, 4: 16}  # IPv4, IPv6
_PORT_LENGTH = 2
_HTTP_HEADER_END = b"\r\n\r\n"


class SocksError(Exception):
    """The proxy refused or broke the SOCKS5 exchange."""


@dataclass(frozen=True)
class Endpoint:
    host: str  # an IPv4 address
    port: int


def connect_request(destination: Endpoint) -> bytes:
    """CONNECT to an IPv4 address."""
    return b"\x05\x01\x00\x01" + socket.inet_aton(destination.host) + struct.pack("!H", destination.port)


def reply_length(head: bytes | bytearray) -> int:
    """Length of a CONNECT reply, known from its first REPLY_HEAD_LENGTH bytes.

    Raises SocksError if the proxy did not grant the request.
    """
    version, status, _, address_type, first_address_byte = head[:REPLY_HEAD_LENGTH]
    if version != 5 or status != 0:
        raise SocksError(f"CONNECT refused: reply {bytes(head[:2]).hex()}")
    if address_type == _DOMAIN_NAME:
        address_length = 1 + first_address_byte
    elif address_type in _ADDRESS_LENGTH_BY_TYPE:
        address_length = _ADDRESS_LENGTH_BY_TYPE[address_type]
    else:
        raise SocksError(f"bad address type {address_type} in reply")
    return REPLY_HEAD_LENGTH - 1 + address_length + _PORT_LENGTH


def http_get(path: str, host: Endpoint, keep_alive: bool) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (f"GET {path} HTTP/1.1\r\nHost: {host.host}:{host.port}\r\nConnection: {connection}\r\n\r\n").encode()


def check_status_ok(response_start: bytes | bytearray) -> None:
    status_line = bytes(response_start).split(b"\r\n", 1)[0]
    if not status_line.startswith(b"HTTP/1.1 200"):
        raise SocksError(f"unexpected HTTP status line {status_line[:60]!r}")


def complete_response_length(buffer: bytes | bytearray) -> int | None:
    """Length of the HTTP response with Content-Length at the start of buffer, or None if incomplete."""
    header_end = buffer.find(_HTTP_HEADER_END)
    if header_end < 0:
        return None
    for line in bytes(buffer[:header_end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            total = header_end + len(_HTTP_HEADER_END) + int(value)
            return total if len(buffer) >= total else None
    raise SocksError("response without Content-Length")


# --- blocking client ---------------------------------------------------------


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise SocksError("proxy closed the connection during the handshake")
        data += chunk
    return data


def open_tunnel(proxy: Endpoint, destination: Endpoint, timeout: float) -> socket.socket:
    """A blocking socket through which bytes flow to destination."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    try:
        sock.sendall(GREETING)
        if _receive_exactly(sock, 2) != METHOD_CHOSEN:
            raise SocksError("proxy did not accept 'no authentication'")
        sock.sendall(connect_request(destination))
        reply_head = _receive_exactly(sock, REPLY_HEAD_LENGTH)
        _receive_exactly(sock, reply_length(reply_head) - REPLY_HEAD_LENGTH)
    except BaseException:
        sock.close()
        raise
    return sock


def download(proxy: Endpoint, server: Endpoint, path: str, timeout: float, size: int) -> tuple[memoryview, float]:
    """GET path (a file of `size` bytes) through the proxy and read to EOF: (the body, seconds taken).

    The response goes into one buffer, so that checking it (by the caller: length, hash) is not
    part of the time taken."""
    started = time.perf_counter()
    buffer = bytearray(size + (64 << 10) + 1)  # the headers, and a byte more than expected
    view = memoryview(buffer)
    received = 0
    with open_tunnel(proxy, server, timeout) as sock:
        sock.sendall(http_get(path, server, keep_alive=False))
        while received < len(buffer) and (count := sock.recv_into(view[received:])):
            received += count
    seconds = time.perf_counter() - started
    header_end = buffer.find(_HTTP_HEADER_END, 0, received)
    if header_end < 0:
        raise SocksError(f"no complete HTTP header in {received} bytes")
    check_status_ok(buffer[:header_end])
    return view[header_end + len(_HTTP_HEADER_END) : received], seconds


# --- asyncio client ----------------------------------------------------------


class HttpOverSocks(asyncio.Protocol):
    """One SOCKS5 session carrying one HTTP GET.

    With hold=False the response is read to EOF and `done` gets the byte count.
    With hold=True the request is keep-alive; `done` gets the byte count once
    the whole response has arrived and the connection stays open (in relay
    state on the proxy) until the caller closes `transport`.
    """

    def __init__(self, destination: Endpoint, request: bytes, hold: bool) -> None:
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._destination = destination
        self._request = request
        self._hold = hold
        self._buffer = bytearray()
        self._stage: Callable[[], None] = self._await_method_choice
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._stage()
        except Exception as error:  # noqa: BLE001 - any failure ends the session
            self._fail(error)

    def eof_received(self) -> bool:
        if self._stage != self._read_to_eof:
            self._fail(SocksError("connection closed early"))
        elif not self.done.done():
            self.done.set_result(self._received)
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(error or SocksError("connection closed early"))

    def _await_method_choice(self) -> None:
        if len(self._buffer) < 2:
            return
        if self._buffer[:2] != METHOD_CHOSEN:
            raise SocksError("proxy did not accept 'no authentication'")
        del self._buffer[:2]
        self._send(connect_request(self._destination), then=self._await_connect_reply)

    def _await_connect_reply(self) -> None:
        if len(self._buffer) < REPLY_HEAD_LENGTH:
            return
        length = reply_length(self._buffer)
        if len(self._buffer) < length:
            return
        del self._buffer[:length]
        self._send(self._request, then=self._await_status_line)

    def _await_status_line(self) -> None:
        if b"\r\n" not in self._buffer:
            return
        check_status_ok(self._buffer)
        self._stage = self._await_whole_response if self._hold else self._read_to_eof
        self._stage()

    def _read_to_eof(self) -> None:
        self._received += len(self._buffer)
        self._buffer.clear()

    def _await_whole_response(self) -> None:
        if complete_response_length(self._buffer) is not None and not self.done.done():
            self.done.set_result(len(self._buffer))

    def _send(self, message: bytes, then: Callable[[], None]) -> None:
        assert self.transport is not None
        self._stage = then
        self.transport.write(message)

    def _fail(self, error: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


async def open_http_session(proxy: Endpoint, destination: Endpoint, request: bytes, hold: bool) -> HttpOverSocks:
    """Connect and run the session; returns once the response is read (or held)."""
    loop = asyncio.get_running_loop()
    _, session = await loop.create_connection(lambda: HttpOverSocks(destination, request, hold), proxy.host, proxy.port)
    await session.done
    return session
