"""Access rules: `allow|deny NETWORK [port P[-Q][,...]]`, first match wins.

    allow 192.168.1.0/24
    deny 10.0.0.0/8 port 1-1023,3306
    deny all

A network is a CIDR (IPv4 or IPv6), a single address, or `all`.  A list with no
match allows; end it with `deny all` to deny by default.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALL = "all"


def parse_network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a network (CIDR) or address") from None


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    networks: tuple[Network, ...]  # empty: all addresses
    ports: tuple[tuple[int, int], ...]  # empty: all ports

    def matches(self, address: Address, port: int | None = None) -> bool:
        if self.networks and not any(address in net for net in self.networks):
            return False
        if self.ports and port is not None:
            return any(low <= port <= high for low, high in self.ports)
        return True

    def __str__(self) -> str:
        text = ("allow " if self.allow else "deny ") + (
            ",".join(str(n) for n in self.networks) if self.networks else ALL
        )
        if self.ports:
            text += " port " + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        return text


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{text!r} is not a port list like 80,443,8000-8999") from None
        if not 0 < lo <= hi <= 65535:
            raise ValueError(f"{part!r} is not a port range within 1-65535")
        ranges.append((lo, hi))
    return tuple(ranges)


def parse_rule(text: str) -> Rule:
    words = text.split()
    if len(words) not in (2, 4) or words[0] not in ("allow", "deny"):
        raise ValueError(f"{text!r} is not a rule like 'allow 192.168.1.0/24' or 'deny all port 25'")
    networks = () if words[1] == ALL else tuple(parse_network(n) for n in words[1].split(","))
    ports: tuple[tuple[int, int], ...] = ()
    if len(words) == 4:
        if words[2] != "port":
            raise ValueError(f"{text!r}: expected 'port' after the network, not {words[2]!r}")
        ports = parse_ports(words[3])
    return Rule(words[0] == "allow", networks, ports)


def first_match(rules: tuple[Rule, ...], address: Address, port: int | None = None) -> Rule | None:
    for rule in rules:
        if rule.matches(address, port):
            return rule
    return None


def allowed(rules: tuple[Rule, ...], address: Address, port: int | None = None) -> bool:
    rule = first_match(rules, address, port)
    return rule is None or rule.allow
