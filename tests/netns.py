"""A small network of Linux network namespaces for the multi-host tests.

    client ──(lan)── osocks ──(wan)── switch ──┬── server   dual-stack: TCP and UDP echo, the DNS server
                                               ├── v6only   IPv6 only: TCP echo
                                               └── other    a third host; it does not forward, so what
                                                            is routed through it (UNANSWERED_NET) vanishes

Namespaces are named osockstest-<pid>-<role>, so parallel runs do not collide.  The veth pairs
are created straight inside their namespaces and die with them; outside the namespaces only
/etc/netns/<name>/ is written (the resolv.conf, nsswitch.conf and hosts that `ip netns exec`
bind-mounts for osocks, so names resolve on the topology's own DNS server and no query leaves
the machine).

osocks runs as `ip netns exec NS python3 -m osocks ...`.  Clients and destinations live in the
test process: a socket stays in the namespace it was made in, and a short-lived thread makes it
there after entering the namespace with setns(2) (through ctypes: os.setns is Python 3.12+).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Address = tuple[str, int]

ROOT = Path(__file__).resolve().parent.parent
NETNS_RUN_DIR = Path("/var/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
NAME_PREFIX = "osockstest"
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
COMMAND_TIMEOUT = 10.0

# Test-only ranges: 198.18.0.0/15 (RFC 2544) and 2001:db8::/32 (RFC 3849).
CLIENT4, CLIENT4_SECOND, CLIENT6 = "198.18.1.2", "198.18.1.3", "2001:db8:1::2"
OSOCKS_LAN4, OSOCKS_LAN6 = "198.18.1.1", "2001:db8:1::1"
OSOCKS_WAN4, OSOCKS_WAN4_SECOND, OSOCKS_WAN6 = "198.18.2.1", "198.18.2.11", "2001:db8:2::1"
SERVER4, SERVER6 = "198.18.2.2", "2001:db8:2::2"
V6ONLY6 = "2001:db8:2::3"
OTHER4, OTHER6 = "198.18.2.4", "2001:db8:2::4"
LAN_NET4, WAN_NET4 = "198.18.1.0/24", "198.18.2.0/24"
UNANSWERED_NET, UNANSWERED4 = "198.19.0.0/24", "198.19.0.1"  # routed to `other`, which drops it

SOCKS_PORT = 1080
ECHO_PORTS = (80, 8080)  # TCP echo on the server (both families) and on v6only
UDP_ECHO_PORT = 7
DNS_PORT = 53

TEST_NAMES: dict[str, tuple[str, ...]] = {
    "dual.osocks.test": (SERVER4, SERVER6),
    "v4.osocks.test": (SERVER4,),
    "v6.osocks.test": (V6ONLY6,),  # AAAA only
}
MISSING_NAME = "missing.osocks.test"  # NXDOMAIN

_libc = ctypes.CDLL(None, use_errno=True)


class CommandError(RuntimeError):
    """A command that builds the topology failed; the message holds its stderr."""


def run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if done.returncode:
        raise CommandError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- namespaces --------------------------------------------------------------


class Namespace:
    """One host: a network namespace, reached by `ip -n` and by setns(2) from a thread."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def ip(self, *args: str) -> None:
        run("ip", "-n", self.name, *args)

    def command(self, *argv: str) -> list[str]:
        """argv that runs inside this namespace (with /etc/netns/<name>/ mounted over /etc)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a fresh thread that has entered this namespace; the thread then ends."""
        outcome: dict[str, object] = {}

        def enter_and_run() -> None:
            try:
                fd = os.open(NETNS_RUN_DIR / self.name, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        error = ctypes.get_errno()
                        raise OSError(error, f"setns({self.name}): {os.strerror(error)}")
                finally:
                    os.close(fd)
                outcome["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                outcome["error"] = e

        thread = threading.Thread(target=enter_and_run, name=f"in {self.name}")
        thread.start()
        thread.join(COMMAND_TIMEOUT)
        if thread.is_alive():
            raise TimeoutError(f"a call in namespace {self.name} did not return")
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    def new_socket(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return self.call(lambda: socket.socket(family, kind))

    def connect(self, address: Address, source: str | None = None, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from this host (from `source` when given)."""
        sock = self.new_socket(family_of(address[0]))
        try:
            sock.settimeout(timeout)
            if source is not None:
                sock.bind((source, 0))
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def tcp_listener(self, address: Address) -> socket.socket:
        sock = self.new_socket(family_of(address[0]))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock

    def udp_socket(self, address: Address) -> socket.socket:
        sock = self.new_socket(family_of(address[0]), socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def set_sysctl(self, path: str, value: str) -> None:
        """Write /proc/sys/<path> of this namespace, e.g. ("net/ipv4/ip_forward", "0")."""
        self.call(lambda: Path("/proc/sys", path).write_text(value))

    def udp_datagrams_received(self) -> int:
        """The Udp InDatagrams counter of this namespace: datagrams delivered to its sockets."""
        snmp = self.call(lambda: Path("/proc/thread-self/net/snmp").read_text())
        names, values = (line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:"))
        return int(dict(zip(names, values, strict=True))["InDatagrams"])


def add_namespace(name: str) -> Namespace:
    run("ip", "netns", "add", name)
    return Namespace(name)


def remove_namespace(name: str) -> None:
    """Delete the namespace (its veth ends go with it) and its /etc/netns directory."""
    if (NETNS_RUN_DIR / name).exists():
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=COMMAND_TIMEOUT)
    shutil.rmtree(NETNS_ETC_DIR / name, ignore_errors=True)


def remove_stale_namespaces() -> None:
    """Namespaces left by runs that were killed (their pid is gone)."""
    if not NETNS_RUN_DIR.is_dir():
        return
    pattern = re.compile(rf"{NAME_PREFIX}-(\d+)-\w+")
    for path in NETNS_RUN_DIR.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not Path("/proc", match.group(1)).exists():
            remove_namespace(path.name)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2's ip"
    probe = f"{NAME_PREFIX}-{os.getpid()}-probe"
    try:
        add_namespace(probe)
    except (CommandError, OSError, subprocess.TimeoutExpired) as e:
        return f"ip netns is unavailable: {e}"
    try:
        Namespace(probe).call(lambda: None)
    except OSError as e:
        return f"cannot enter a network namespace: {e}"
    finally:
        remove_namespace(probe)
    return None


def veth(a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
    """A veth pair made straight inside the two namespaces, both ends up."""
    run("ip", "link", "add", a_name, "netns", a.name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    a.ip("link", "set", a_name, "up")
    b.ip("link", "set", b_name, "up")


def add_address(host: Namespace, device: str, cidr: str) -> None:
    extra = ("nodad",) if ":" in cidr else ()  # usable at once, no 1-2 s duplicate detection
    host.ip("address", "add", cidr, "dev", device, *extra)


# -- services in the namespaces ---------------------------------------------


class Service:
    """A thread serving one socket until close(); every blocking call wakes up to check."""

    POLL = 0.2

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(self.POLL)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.serve_once()
            except TimeoutError:
                continue
            except OSError:
                return

    def serve_once(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the thread to end (within POLL); close() waits for it."""
        self._stopped.set()

    def close(self) -> None:
        self.stop()
        self._thread.join(2 * self.POLL + 1)
        self.sock.close()


class TcpEchoServer(Service):
    """Echoes every connection; `peers` is what accept() reported for each."""

    def __init__(self, sock: socket.socket) -> None:
        self.peers: list[Address] = []
        super().__init__(sock)

    def serve_once(self) -> None:
        conn, peer = self.sock.accept()
        self.peers.append(peer[:2])
        threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                conn.sendall(chunk)


class UdpEchoServer(Service):
    """Sends every datagram back; `received` is (payload, source) of each."""

    def __init__(self, sock: socket.socket) -> None:
        self.received: list[tuple[bytes, Address]] = []
        super().__init__(sock)

    def serve_once(self) -> None:
        data, source = self.sock.recvfrom(65535)
        self.received.append((data, source[:2]))
        self.sock.sendto(data, source)


DNS_A, DNS_AAAA, DNS_CLASS_IN = 1, 28, 1
DNS_NXDOMAIN = 3


class DnsServer(Service):
    """Just enough DNS over UDP: A and AAAA from `records`, NXDOMAIN for any other name.

    `queries` lists the names asked for, so a test can see the lookup happened here.
    """

    def __init__(self, sock: socket.socket, records: dict[str, tuple[str, ...]]) -> None:
        self.records = {name.lower().rstrip("."): addresses for name, addresses in records.items()}
        self.queries: list[str] = []
        super().__init__(sock)

    def serve_once(self) -> None:
        query, source = self.sock.recvfrom(4096)
        answer = self.answer(query)
        if answer is not None:
            self.sock.sendto(answer, source)

    def answer(self, query: bytes) -> bytes | None:
        parsed = parse_dns_question(query)
        if parsed is None:
            return None
        name, qtype, question_end = parsed
        self.queries.append(name)
        addresses = self.records.get(name)
        rcode = DNS_NXDOMAIN if addresses is None else 0
        family = {DNS_A: socket.AF_INET, DNS_AAAA: socket.AF_INET6}.get(qtype)
        rdatas = [socket.inet_pton(family, a) for a in addresses or () if family and family_of(a) == family]
        qid, qflags = struct.unpack("!HH", query[:4])
        flags = 0x8000 | (qflags & 0x7900) | 0x0400 | 0x0080 | rcode  # QR, opcode+RD, AA, RA
        header = struct.pack("!HHHHHH", qid, flags, 1, len(rdatas), 0, 0)
        answers = b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", qtype, DNS_CLASS_IN, 60, len(rdata)) + rdata for rdata in rdatas
        )
        return header + query[12:question_end] + answers


def parse_dns_question(query: bytes) -> tuple[str, int, int] | None:
    """(name, qtype, end of the question) of a standard query with one question, or None."""
    if len(query) < 12:
        return None
    qdcount = struct.unpack("!H", query[4:6])[0]
    if query[2] & 0x80 or qdcount != 1:
        return None
    labels, offset = [], 12
    while True:
        if offset >= len(query):
            return None
        length = query[offset]
        offset += 1
        if length == 0:
            break
        if length > 63 or offset + length > len(query):
            return None
        labels.append(query[offset : offset + length].decode("ascii", "replace").lower())
        offset += length
    if offset + 4 > len(query):
        return None
    qtype = struct.unpack("!H", query[offset : offset + 2])[0]
    return ".".join(labels), qtype, offset + 4


# -- the topology -------------------------------------------------------------

ROLES = ("client", "osocks", "switch", "server", "v6only", "other")


@dataclass
class Topology:
    client: Namespace
    osocks: Namespace
    switch: Namespace
    server: Namespace
    v6only: Namespace
    other: Namespace
    dns: DnsServer | None = None
    tcp_echoes: dict[Address, TcpEchoServer] = field(default_factory=dict)
    udp_echoes: dict[Address, UdpEchoServer] = field(default_factory=dict)

    def namespaces(self) -> list[Namespace]:
        return [getattr(self, role) for role in ROLES]

    def close(self) -> None:
        services: list[Service] = [*self.tcp_echoes.values(), *self.udp_echoes.values()]
        if self.dns is not None:
            services.append(self.dns)
        for service in services:
            service.stop()
        for service in services:
            service.close()
        for namespace in self.namespaces():
            remove_namespace(namespace.name)
        with contextlib.suppress(OSError):  # only when no other run still uses it
            NETNS_ETC_DIR.rmdir()


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """The network above, with its services running; everything is removed on exit."""
    remove_stale_namespaces()
    prefix = f"{NAME_PREFIX}-{os.getpid()}"
    hosts: dict[str, Namespace] = {}
    net: Topology | None = None
    try:
        for role in ROLES:
            hosts[role] = add_namespace(f"{prefix}-{role}")
        net = Topology(
            client=hosts["client"], osocks=hosts["osocks"], switch=hosts["switch"],
            server=hosts["server"], v6only=hosts["v6only"], other=hosts["other"],
        )  # fmt: skip
        _wire(net)
        _start_services(net)
        _write_resolver_files(net.osocks)
    except BaseException:
        if net is not None:
            net.close()
        for namespace in hosts.values():
            remove_namespace(namespace.name)
        raise
    try:
        yield net
    finally:
        net.close()


def _wire(net: Topology) -> None:
    for host in net.namespaces():
        host.ip("link", "set", "lo", "up")
    net.switch.ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0")
    net.switch.ip("link", "set", "br0", "up")
    veth(net.client, "eth0", net.osocks, "lan")
    for host, device in ((net.osocks, "wan"), (net.server, "eth0"), (net.v6only, "eth0"), (net.other, "eth0")):
        port = f"to-{host.name.rsplit('-', 1)[1]}"
        veth(host, device, net.switch, port)
        net.switch.ip("link", "set", port, "master", "br0")

    for cidr in (f"{CLIENT4}/24", f"{CLIENT4_SECOND}/24", f"{CLIENT6}/64"):
        add_address(net.client, "eth0", cidr)
    for cidr in (f"{OSOCKS_LAN4}/24", f"{OSOCKS_LAN6}/64"):
        add_address(net.osocks, "lan", cidr)
    for cidr in (f"{OSOCKS_WAN4}/24", f"{OSOCKS_WAN4_SECOND}/24", f"{OSOCKS_WAN6}/64"):
        add_address(net.osocks, "wan", cidr)
    for cidr in (f"{SERVER4}/24", f"{SERVER6}/64"):
        add_address(net.server, "eth0", cidr)
    add_address(net.v6only, "eth0", f"{V6ONLY6}/64")
    for cidr in (f"{OTHER4}/24", f"{OTHER6}/64"):
        add_address(net.other, "eth0", cidr)

    # osocks is a proxy, not a router; `other` drops what is routed through it.  IPv4
    # settings of a new namespace are inherited from the host's, so say it explicitly.
    for host in (net.osocks, net.other):
        host.set_sysctl("net/ipv4/ip_forward", "0")
        host.set_sysctl("net/ipv6/conf/all/forwarding", "0")
    net.client.ip("route", "add", WAN_NET4, "via", OSOCKS_LAN4)  # only to show it leads nowhere
    net.osocks.ip("route", "add", UNANSWERED_NET, "via", OTHER4)
    net.other.ip("route", "add", LAN_NET4, "via", OSOCKS_WAN4)  # lets `other` reach the UDP relay port


def _start_services(net: Topology) -> None:
    net.dns = DnsServer(net.server.udp_socket((SERVER4, DNS_PORT)), TEST_NAMES)
    for host, address in ((net.server, SERVER4), (net.server, SERVER6), (net.v6only, V6ONLY6)):
        for port in ECHO_PORTS:
            net.tcp_echoes[(address, port)] = TcpEchoServer(host.tcp_listener((address, port)))
    for address in (SERVER4, SERVER6):
        net.udp_echoes[(address, UDP_ECHO_PORT)] = UdpEchoServer(net.server.udp_socket((address, UDP_ECHO_PORT)))


def _write_resolver_files(host: Namespace) -> None:
    """/etc files `ip netns exec` mounts for `host`: names resolve on the topology's DNS server only."""
    etc = NETNS_ETC_DIR / host.name
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {SERVER4}\noptions timeout:1 attempts:1\n")
    (etc / "nsswitch.conf").write_text("hosts: files dns\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")


# -- osocks inside its namespace ------------------------------------------------


class OsocksInNamespace:
    """`ip netns exec NS python3 -m osocks ...`, listening on the lan addresses; ended by its pid."""

    START_TIMEOUT = 10.0

    def __init__(self, host: Namespace, *flags: str) -> None:
        argv = host.command(
            sys.executable, "-m", "osocks", "--no-uci",
            "-l", OSOCKS_LAN4, "-l", OSOCKS_LAN6, "-p", str(SOCKS_PORT), *flags,
        )  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=_terminate_with_parent,
        )  # fmt: skip
        self.pid = self.process.pid  # `ip netns exec` execs the command: this is osocks itself
        self.lines: list[str] = []
        self.listening = False
        self._started_or_ended = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        self._started_or_ended.wait(self.START_TIMEOUT)
        if not self.listening:
            self.stop()
            raise RuntimeError(f"osocks {' '.join(flags)} did not start:\n{self.log()}")

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if " listening on " in line:
                self.listening = True
                self._started_or_ended.set()
        self._started_or_ended.set()  # stderr closed: osocks ended

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends, so a test
    run that is killed (no finalizers) leaves no osocks behind."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
