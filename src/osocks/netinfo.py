"""Which addresses are this host's own (Linux /proc), and which are never a fair destination."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import socket
import time

from .rules import Address

_CACHE_SECONDS = 5.0
_cache: tuple[float, frozenset[Address], frozenset[bytes]] = (-1e9, frozenset(), frozenset())
_V4_MAPPED = bytes(10) + b"\xff\xff"
_NEVER_FAIR = frozenset({bytes(4), bytes(16), bytes(15) + b"\x01"})  # 0.0.0.0, ::, ::1


def _ipv4_local() -> set[Address]:
    found: set[Address] = set()
    last = ""
    with open("/proc/net/fib_trie") as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("|--"):
                last = stripped[3:].strip()
            elif stripped == "/32 host LOCAL" and last:
                found.add(ipaddress.IPv4Address(last))
    return found


def _ipv6_local() -> set[Address]:
    found: set[Address] = set()
    with open("/proc/net/if_inet6") as f:
        for line in f:
            fields = line.split()
            if fields:
                found.add(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    return found


def _refresh() -> tuple[float, frozenset[Address], frozenset[bytes]]:
    global _cache
    now = time.monotonic()
    if now - _cache[0] >= _CACHE_SECONDS:
        found: set[Address] = set()
        for read in (_ipv4_local, _ipv6_local):
            with contextlib.suppress(OSError, ValueError):
                found |= read()
        _cache = (now, frozenset(found), frozenset(address.packed for address in found))
    return _cache


def local_addresses() -> frozenset[Address]:
    """Every address configured on this host (read again every few seconds)."""
    return _refresh()[1]


@functools.lru_cache(maxsize=256)
def plain_address(host: str) -> Address:
    """An address from text, with any %scope dropped and IPv4-mapped IPv6 made IPv4 (cached)."""
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_LOOPBACK: dict[int, Address] = {4: ipaddress.IPv4Address("127.0.0.1"), 6: ipaddress.IPv6Address("::1")}


@functools.lru_cache(maxsize=256)
def reached_address(host: str) -> Address:
    """The address a connection to host really reaches: plain_address, with an unspecified address
    (0.0.0.0, ::) as the loopback the kernel delivers it to (cached)."""
    address = plain_address(host)
    return _LOOPBACK[address.version] if address.is_unspecified else address


def is_local_host(host: str) -> bool:
    """Loopback, unspecified, or one of this host's own addresses (an IP in text; no ipaddress object)."""
    host = host.partition("%")[0]
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    if packed[:12] == _V4_MAPPED:
        packed = packed[12:]
    if len(packed) == 4 and packed[0] == 127:
        return True
    return packed in _NEVER_FAIR or packed in _refresh()[2]


def is_device(name: str) -> bool:
    """Whether the kernel has a network device of this name."""
    return "/" not in name and name not in ("", ".", "..") and os.path.exists(f"/sys/class/net/{name}")


def linux_interface_addresses(name: str) -> list[str]:
    """The addresses of a Linux network device (primary IPv4, global IPv6); [] when it has none.

    Where netifd is not there to ask (osocks -i on a plain Linux host), the
    interface name is the kernel's device name.
    """
    import fcntl
    import struct

    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack("256s", name.encode()[:15])
            answer = fcntl.ioctl(sock.fileno(), 0x8915, request)  # SIOCGIFADDR
            found.append(socket.inet_ntoa(answer[20:24]))
        except OSError:
            pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 6 and fields[5] == name and fields[3] in ("00", "10"):  # global or host scope
                    found.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    except OSError:
        pass
    return found
