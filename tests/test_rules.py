"""Access rules: syntax, order, and what they do to clients and destinations."""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest

from conftest import EchoServer, socks_connect, wait_closed
from osocks import netinfo
from osocks.rules import allowed, parse_rule
from osocks.settings import SettingsError, parse_networks, parse_rules
from osocks.socks5 import ReplyCode

ip = ipaddress.ip_address


def test_syntax_and_first_match_wins() -> None:
    rules = tuple(
        parse_rule(t)
        for t in ["allow 10.1.0.0/16", "deny 10.0.0.0/8 port 1-1023,3306", "deny all port 25", "allow ::1"]
    )
    assert allowed(rules, ip("10.1.2.3"), 22)
    assert not allowed(rules, ip("10.2.2.3"), 22)
    assert not allowed(rules, ip("10.2.2.3"), 3306)
    assert allowed(rules, ip("10.2.2.3"), 8080)
    assert not allowed(rules, ip("192.0.2.1"), 25)
    assert allowed(rules, ip("192.0.2.1"), 80)  # no match: allowed
    assert not allowed((parse_rule("deny all"),), ip("2001:db8::1"), 1)
    assert str(rules[1]) == "deny 10.0.0.0/8 port 1-1023,3306"


@pytest.mark.parametrize(
    "text",
    [
        "permit all",
        "allow",
        "allow 10.0.0.0/33",
        "deny all ports 25",
        "deny all port 0",
        "deny all port 80-20",
        "allow all port x",
        "allow nonsense",
    ],
)
def test_bad_rules_are_named(text: str) -> None:
    with pytest.raises(SettingsError, match="--dest-rule"):
        parse_rules("--dest-rule", [text])


def test_local_addresses() -> None:
    for host in ("127.0.0.5", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"):
        assert netinfo.is_local_host(host), host
    assert all(netinfo.is_local_host(str(a)) for a in netinfo.local_addresses())
    assert not netinfo.is_local_host("198.18.0.1") and not netinfo.is_local_host("2001:db8::1")


def test_client_rule_denies_at_once(make_server) -> None:
    server = make_server(client_rules=parse_rules("t", ["allow 127.0.0.2", "deny all"]))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert wait_closed(sock) == b""
    allowed_client = socket.socket()
    allowed_client.bind(("127.0.0.2", 0))
    allowed_client.connect(("127.0.0.1", server.port))
    allowed_client.sendall(b"\x05\x01\x00")
    allowed_client.settimeout(5)
    assert allowed_client.recv(2) == b"\x05\x00"
    allowed_client.close()
    assert server.wait_for(lambda s: s["sessions"]["denied"] == 1)["sessions"]["total"] == 1


def test_destination_rule_is_checked_after_resolution(make_server, echo: EchoServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server(dest_rules=parse_rules("t", [f"deny 127.0.0.1 port {echo.port}"]))
    for host in ("127.0.0.1", "localhost"):
        sock, code, _, _ = socks_connect(server.port, host, echo.port)
        sock.close()
        assert code == ReplyCode.NOT_ALLOWED
    assert not echo.peers
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert f"denied by rule 'deny 127.0.0.1/32 port {echo.port}'" in caplog.text  # the log says which rule


def test_local_destinations_denied_by_default(make_server, echo: EchoServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="osocks")
    server = make_server(allow_local=False)
    own = sorted(str(a) for a in netinfo.local_addresses() if a.version == 4 and not a.is_loopback)
    for host in ["127.0.0.1", "localhost", "0.0.0.0", *own[:1]]:
        sock, code, _, _ = socks_connect(server.port, host, echo.port)
        sock.close()
        assert code == ReplyCode.NOT_ALLOWED, host
    server.wait_for(lambda s: s["sessions"]["live"] == 0)
    assert "is on this host (--allow-local, UCI allow_local, allows it)" in caplog.text


def test_client_rules_see_ipv4_clients_of_a_dual_stack_listener(make_server) -> None:
    """On a listener on ::, an IPv4 client appears as ::ffff:a.b.c.d; IPv4 rules still apply to it."""
    server = make_server(listen=("::",), client_rules=parse_rules("t", ["deny 127.0.0.1"]))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert wait_closed(sock) == b""
    assert server.wait_for(lambda s: s["sessions"]["denied"] == 1)["sessions"]["total"] == 0


def test_anonymous_networks_see_ipv4_clients_of_a_dual_stack_listener(make_server) -> None:
    from osocks.settings import User

    server = make_server(listen=("::",), users=(User("u", "p"),), anonymous=parse_networks("t", ["127.0.0.0/8"]))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        sock.settimeout(5)
        assert sock.recv(2) == b"\x05\x00"
