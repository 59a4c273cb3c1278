"""The SOCKS5 wire codec (RFC 1928, RFC 1929, RFC 1961's framing): bytes in, records out, no sockets.

Each `parse_*` takes the bytes received so far and returns `(message, used)`,
where `used` is how many bytes the message took, or `None` when more bytes are
needed.  Malformed input raises `ProtocolError`, which carries the reply code
to send before closing, or `None` when the only answer is to close.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from enum import IntEnum

VERSION = 5
AUTH_VERSION = 1
GSS_VERSION = 1
MAX_GSS_TOKEN = 0xFFFF  # LEN is two bytes


class Method(IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class ReplyCode(IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class GssMessage(IntEnum):
    """RFC 1961 MTYP."""

    CONTEXT = 0x01  # a context establishment token
    PROTECTION = 0x02  # protection-level negotiation
    ENCAPSULATED = 0x03  # a per-message protected SOCKS message or relayed data
    ABORT = 0xFF  # [1][0xFF], no LEN: the sender gives up


class Protection(IntEnum):
    """RFC 1961 protection levels, and the de-facto 0 (no per-message protection) that curl asks for."""

    NONE = 0
    INTEGRITY = 1
    CONFIDENTIALITY = 2
    SELECTIVE = 3  # integrity or confidentiality chosen per message


class ProtocolError(Exception):
    def __init__(self, message: str, reply: ReplyCode | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(slots=True)
class Greeting:
    methods: bytes


@dataclass(slots=True)
class Credentials:
    username: bytes
    password: bytes

    def __repr__(self) -> str:
        return f"Credentials({self.username!r})"


@dataclass(slots=True)
class Request:
    command: int  # a Command, or an unknown value the session answers with 07
    host: str  # an IP literal, or a domain name
    port: int
    address_type: int  # an AddressType


@dataclass(slots=True)
class GssFrame:
    kind: int  # a GssMessage
    token: bytes


@dataclass(slots=True)
class UdpHeader:
    fragment: int
    host: str
    port: int
    address_type: int  # an AddressType


def parse_greeting(data: bytes) -> tuple[Greeting, int] | None:
    """VER NMETHODS METHODS..."""
    if len(data) < 2:
        if data and data[0] != VERSION:
            raise ProtocolError(f"not SOCKS5: version byte {data[0]:#04x}")
        return None
    if data[0] != VERSION:
        raise ProtocolError(f"not SOCKS5: version byte {data[0]:#04x}")
    end = 2 + data[1]
    if len(data) < end:
        return None
    return Greeting(bytes(data[2:end])), end


def parse_credentials(data: bytes) -> tuple[Credentials, int] | None:
    """RFC 1929: VER ULEN UNAME PLEN PASSWD, ULEN and PLEN 0..255."""
    if not data:
        return None
    if data[0] != AUTH_VERSION:
        raise ProtocolError(f"username/password version {data[0]:#04x}, expected 0x01")
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    return Credentials(bytes(data[2 : 2 + ulen]), bytes(data[3 + ulen : end])), end


def _parse_address(data: bytes, offset: int) -> tuple[int, str, int, int] | None:
    """ATYP ADDR PORT starting at offset: (type, host, port, end) or None."""
    if len(data) <= offset:
        return None
    atyp = data[offset]
    if atyp == AddressType.IPV4:
        end = offset + 1 + 4 + 2
        if len(data) < end:
            return None
        host = socket.inet_ntop(socket.AF_INET, data[offset + 1 : offset + 5])
    elif atyp == AddressType.IPV6:
        end = offset + 1 + 16 + 2
        if len(data) < end:
            return None
        host = socket.inet_ntop(socket.AF_INET6, data[offset + 1 : offset + 17])
    elif atyp == AddressType.DOMAIN:
        if len(data) < offset + 2:
            return None
        length = data[offset + 1]
        if length == 0:
            raise ProtocolError("invalid host name (empty)", ReplyCode.HOST_UNREACHABLE)
        end = offset + 2 + length + 2
        if len(data) < end:
            return None
        host = _host_name(bytes(data[offset + 2 : offset + 2 + length]))
    else:
        raise ProtocolError(f"unknown address type {atyp:#04x}", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
    port = (data[end - 2] << 8) | data[end - 1]
    return atyp, host, port, end


def _host_name(raw: bytes) -> str:
    """A DOMAIN address as text; ProtocolError (reply 04) for a name no resolver could look up."""
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("invalid host name (not ASCII)", ReplyCode.HOST_UNREACHABLE) from None
    if "\0" in host:
        raise ProtocolError("invalid host name (a NUL byte)", ReplyCode.HOST_UNREACHABLE)
    # what IDNA encoding (and so every resolver) refuses: an empty label, or one over 63 bytes
    if host[0] == "." or ".." in host or (len(host) > 63 and max(map(len, host.split("."))) > 63):
        raise ProtocolError("invalid host name (an empty label or one over 63 bytes)", ReplyCode.HOST_UNREACHABLE)
    return host


def parse_request(data: bytes) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP DST.ADDR DST.PORT"""
    if not data:
        return None
    if data[0] != VERSION:
        raise ProtocolError(f"request version {data[0]:#04x}, expected 0x05")
    if len(data) < 3:
        return None
    parsed = _parse_address(data, 3)
    if parsed is None:
        return None
    atyp, host, port, end = parsed
    return Request(data[1], host, port, atyp), end


def parse_udp_header(data: bytes) -> tuple[UdpHeader, int] | None:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT; a datagram is whole, so None means malformed."""
    if len(data) < 4:
        return None
    if data[0] or data[1]:
        raise ProtocolError("UDP header reserved bytes are not zero")
    parsed = _parse_address(data, 3)
    if parsed is None:
        return None
    atyp, host, port, end = parsed
    return UdpHeader(data[2], host, port, atyp), end


def parse_gss_frame(data: bytes) -> tuple[GssFrame, int] | None:
    """RFC 1961: VER MTYP LEN(2) TOKEN, or the two bytes VER 0xFF of a peer that gives up."""
    if not data:
        return None
    if data[0] != GSS_VERSION:
        raise ProtocolError(f"GSSAPI message version {data[0]:#04x}, expected 0x01")
    if len(data) < 2:
        return None
    kind = data[1]
    if kind == GssMessage.ABORT:
        return GssFrame(kind, b""), 2
    if kind not in (GssMessage.CONTEXT, GssMessage.PROTECTION, GssMessage.ENCAPSULATED):
        raise ProtocolError(f"unknown GSSAPI message type {kind:#04x}")
    if len(data) < 4:
        return None
    end = 4 + ((data[2] << 8) | data[3])
    if len(data) < end:
        return None
    return GssFrame(kind, bytes(data[4:end])), end


def encode_gss_frame(kind: GssMessage, token: bytes) -> bytes:
    if len(token) > MAX_GSS_TOKEN:
        raise ValueError(f"GSSAPI token of {len(token)} bytes (at most {MAX_GSS_TOKEN})")
    return bytes((GSS_VERSION, kind)) + len(token).to_bytes(2, "big") + token


GSS_ABORT = bytes((GSS_VERSION, GssMessage.ABORT))


def select_method(method: Method) -> bytes:
    return _METHOD_SELECTED[method]


_METHOD_SELECTED = {method: bytes((VERSION, method)) for method in Method}


def auth_reply(ok: bool) -> bytes:
    return bytes((AUTH_VERSION, 0 if ok else 1))


def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT for an IP literal or a domain name."""
    six = ":" in host
    try:
        packed = socket.inet_pton(socket.AF_INET6 if six else socket.AF_INET, host.partition("%")[0])
    except OSError:
        pass
    else:
        return bytes((AddressType.IPV6 if six else AddressType.IPV4,)) + packed + port.to_bytes(2, "big")
    name = host.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError(f"domain name of {len(name)} bytes")
    return bytes((AddressType.DOMAIN, len(name))) + name + port.to_bytes(2, "big")


def encode_reply(code: ReplyCode, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes((VERSION, code, 0)) + encode_address(host, port)


def encode_udp_header(host: str, port: int, fragment: int = 0) -> bytes:
    return bytes((0, 0, fragment)) + encode_address(host, port)


def encode_greeting(methods: bytes) -> bytes:
    return bytes((VERSION, len(methods))) + methods


def encode_credentials(username: bytes, password: bytes) -> bytes:
    return bytes((AUTH_VERSION, len(username))) + username + bytes((len(password),)) + password


def encode_request(command: int, host: str, port: int) -> bytes:
    return bytes((VERSION, command, 0)) + encode_address(host, port)


_REPLY_BY_ERRNO = {
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ETIMEDOUT: ReplyCode.TTL_EXPIRED,
    errno.EACCES: ReplyCode.NOT_ALLOWED,
    errno.EPERM: ReplyCode.NOT_ALLOWED,
}


def reply_for_error(error: BaseException) -> ReplyCode:
    """The one table from a failure to reach a destination to the SOCKS reply code."""
    if isinstance(error, socket.gaierror):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(error, TimeoutError):  # the -T connect timeout, or the kernel's
        return ReplyCode.TTL_EXPIRED
    if isinstance(error, OSError) and error.errno is not None:
        return _REPLY_BY_ERRNO.get(error.errno, ReplyCode.GENERAL_FAILURE)
    return ReplyCode.GENERAL_FAILURE
