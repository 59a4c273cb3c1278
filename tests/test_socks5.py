"""The codec, fed with bytes: every message, every truncation, wrong bytes."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from osocks import socks5
from osocks.socks5 import AddressType, Command, GssMessage, ProtocolError, ReplyCode

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63), min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: len(name) < 256),
)
ports = st.integers(0, 65535)


def test_greeting() -> None:
    assert socks5.parse_greeting(b"\x05\x02\x00\x02") == (socks5.Greeting(b"\x00\x02"), 4)
    assert socks5.parse_greeting(b"\x05\x00") == (socks5.Greeting(b""), 2)
    assert socks5.parse_greeting(b"\x05\x01\x00rest") == (socks5.Greeting(b"\x00"), 3)


@given(st.binary(min_size=0, max_size=255))
def test_greeting_roundtrip_and_every_truncation(methods: bytes) -> None:
    data = socks5.encode_greeting(methods)
    assert socks5.parse_greeting(data + b"tail") == (socks5.Greeting(methods), len(data))
    for cut in range(len(data)):
        assert socks5.parse_greeting(data[:cut]) is None


@given(st.integers(0, 255).filter(lambda v: v != 5), st.binary(max_size=10))
def test_greeting_wrong_version(version: int, rest: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        socks5.parse_greeting(bytes((version,)) + rest)
    assert e.value.reply is None  # nothing to answer a non-SOCKS5 client: close


@given(st.binary(max_size=255), st.binary(max_size=255))
def test_credentials_roundtrip_and_truncation(user: bytes, password: bytes) -> None:
    data = socks5.encode_credentials(user, password)
    assert socks5.parse_credentials(data) == (socks5.Credentials(user, password), len(data))
    for cut in range(len(data)):
        assert socks5.parse_credentials(data[:cut]) is None


def test_credentials_wrong_version() -> None:
    with pytest.raises(ProtocolError):
        socks5.parse_credentials(b"\x05\x01a\x01b")


def test_credentials_repr_hides_password() -> None:
    assert "secret" not in repr(socks5.Credentials(b"me", b"secret"))


gss_kinds = st.sampled_from([GssMessage.CONTEXT, GssMessage.PROTECTION, GssMessage.ENCAPSULATED])


@given(gss_kinds, st.binary(max_size=300) | st.binary(min_size=65535, max_size=65535))
def test_gss_frame_roundtrip_and_every_truncation(kind: GssMessage, token: bytes) -> None:
    data = socks5.encode_gss_frame(kind, token)
    assert data[:4] == bytes((1, kind, len(token) >> 8, len(token) & 0xFF))
    assert socks5.parse_gss_frame(data + b"\x01\x03") == (socks5.GssFrame(kind, token), len(data))
    for cut in (*range(min(len(data), 40)), len(data) - 1):
        assert socks5.parse_gss_frame(data[:cut]) is None


def test_gss_frames() -> None:
    assert socks5.parse_gss_frame(b"\x01\x01\x00\x03abcd") == (socks5.GssFrame(GssMessage.CONTEXT, b"abc"), 7)
    assert socks5.parse_gss_frame(b"\x01\x02\x00\x00") == (socks5.GssFrame(GssMessage.PROTECTION, b""), 4)
    assert socks5.parse_gss_frame(b"\x01\xff") == (socks5.GssFrame(GssMessage.ABORT, b""), 2)
    assert socks5.GSS_ABORT == b"\x01\xff"
    with pytest.raises(ValueError):
        socks5.encode_gss_frame(GssMessage.ENCAPSULATED, bytes(65536))


@pytest.mark.parametrize(
    "data",
    [b"\x05\x01\x00\x01a", b"\x00", b"\x02\x01", b"\x01\x00\x00\x00", b"\x01\x04\x00\x00", b"\x01\xfe"],
)
def test_gss_frame_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        socks5.parse_gss_frame(data)
    assert e.value.reply is None  # a broken GSSAPI exchange is answered [1][0xFF] by the session, not a reply


@given(st.sampled_from(list(Command)), hosts, ports)
def test_request_roundtrip_and_every_truncation(command: Command, host: str, port: int) -> None:
    data = socks5.encode_request(command, host, port)
    request, used = socks5.parse_request(data + b"payload")  # type: ignore[misc]
    assert used == len(data)
    assert (request.command, request.port) == (command, port)
    if request.address_type == AddressType.DOMAIN:
        assert request.host == host
    else:
        assert ipaddress.ip_address(request.host) == ipaddress.ip_address(host)
    for cut in range(len(data)):
        assert socks5.parse_request(data[:cut]) is None


def test_request_types() -> None:
    assert socks5.parse_request(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")[0] == socks5.Request(  # type: ignore[index]
        1, "127.0.0.1", 80, AddressType.IPV4
    )
    six = socks5.parse_request(b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x01\xbb")
    assert six is not None and six[0].host == "::1" and six[0].port == 443
    name = socks5.parse_request(b"\x05\x01\x00\x03\x0bexample.com\x00\x50")
    assert name is not None and name[0].host == "example.com"


@pytest.mark.parametrize("name", [b"..", b".", b"a..b", b".a", b"a" * 64, b"b." + b"a" * 64 + b".c"])
def test_names_no_resolver_can_encode_are_host_unreachable(name: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid host name") as e:
        socks5.parse_request(b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50")
    assert e.value.reply == ReplyCode.HOST_UNREACHABLE


def test_a_trailing_dot_and_long_labels_are_fine() -> None:
    for name in (b"example.org.", b"a" * 63 + b"." + b"b" * 63):
        request = socks5.parse_request(b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50")
        assert request is not None and request[0].host == name.decode()


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"\x05\x01\x00\x07\x00", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x00", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x00", ReplyCode.HOST_UNREACHABLE),  # empty name
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", ReplyCode.HOST_UNREACHABLE),  # not ASCII
        (b"\x05\x01\x00\x03\x02a\x00\x00\x50", ReplyCode.HOST_UNREACHABLE),  # NUL
        (b"\x04\x01\x00\x01", None),
    ],
)
def test_request_errors(data: bytes, reply: ReplyCode | None) -> None:
    with pytest.raises(ProtocolError) as e:
        socks5.parse_request(data)
    assert e.value.reply == reply


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    parsers = (
        socks5.parse_greeting,
        socks5.parse_credentials,
        socks5.parse_request,
        socks5.parse_udp_header,
        socks5.parse_gss_frame,
    )
    for parse in parsers:
        try:
            result = parse(data)
        except ProtocolError:
            continue
        if result is not None:
            assert 0 < result[1] <= len(data)


@given(st.integers(0, 255), hosts, ports, st.binary(max_size=100))
def test_udp_header_roundtrip(fragment: int, host: str, port: int, payload: bytes) -> None:
    header = socks5.encode_udp_header(host, port, fragment)
    parsed = socks5.parse_udp_header(header + payload)
    assert parsed is not None
    assert parsed[0].fragment == fragment and parsed[0].port == port and parsed[1] == len(header)


def test_udp_header_reserved_must_be_zero() -> None:
    with pytest.raises(ProtocolError):
        socks5.parse_udp_header(b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35")


@given(st.sampled_from(list(ReplyCode)), st.ip_addresses().map(str), ports)
def test_reply_encoding(code: ReplyCode, host: str, port: int) -> None:
    data = socks5.encode_reply(code, host, port)
    assert data[:3] == bytes((5, code, 0))
    parsed = socks5.parse_request(data)  # a reply has the request's shape
    assert parsed is not None and parsed[0].port == port


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (OSError(errno.ENETUNREACH, "x"), ReplyCode.NETWORK_UNREACHABLE),
        (OSError(errno.ENETDOWN, "x"), ReplyCode.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "x"), ReplyCode.HOST_UNREACHABLE),
        (OSError(errno.EHOSTDOWN, "x"), ReplyCode.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "x"), ReplyCode.HOST_UNREACHABLE),
        (OSError(errno.ECONNREFUSED, "x"), ReplyCode.CONNECTION_REFUSED),
        (TimeoutError(), ReplyCode.TTL_EXPIRED),
        (OSError(errno.ETIMEDOUT, "x"), ReplyCode.TTL_EXPIRED),
        (OSError(errno.EACCES, "x"), ReplyCode.NOT_ALLOWED),
        (OSError(errno.EADDRNOTAVAIL, "x"), ReplyCode.GENERAL_FAILURE),
        (RuntimeError("x"), ReplyCode.GENERAL_FAILURE),
    ],
)
def test_one_table_from_errors_to_replies(error: BaseException, reply: ReplyCode) -> None:
    assert socks5.reply_for_error(error) == reply
