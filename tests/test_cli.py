"""The command line, and osocks as a real process: flags, errors, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, EchoServer, free_port, read_reply, recv_exactly, socks_connect, wait_closed
from osocks import __version__, cli, socks5
from osocks.settings import DEFAULTS
from osocks.socks5 import ReplyCode


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "osocks", "--no-uci", *args], capture_output=True, text=True, timeout=20, cwd=ROOT
    )


def test_defaults_are_the_synopsis() -> None:
    s = cli.parse([]).settings()
    assert s.listen == ("0.0.0.0",) and s.port == 1080 and s.max_sessions == 0
    assert s.connect_timeout == 8.0 and s.idle_timeout == 64.0 and s.handshake_timeout == 10.0
    assert not s.syslog and s.verbosity == 0 and s.family == "any"


def test_flags_map_to_settings() -> None:
    s = cli.parse(
        [
            "-l",
            "127.0.0.1",
            "-l",
            "::1",
            "-p",
            "1081",
            "-n",
            "5",
            "-T",
            "250",
            "-I",
            "1500",
            "--handshake-timeout",
            "700",
            "-4",
            "-s",
            "-vv",
            "-w",
            "2",
            "--loop",
            "asyncio",
        ]
    ).settings()
    assert s.listen == ("127.0.0.1", "::1") and s.port == 1081 and s.max_sessions == 5
    assert (s.connect_timeout, s.idle_timeout, s.handshake_timeout) == (0.25, 1.5, 0.7)
    assert s.family == "ipv4" and s.syslog and s.verbosity == 2 and s.workers == 2 and s.loop == "asyncio"


def test_gssapi_flags() -> None:
    s = cli.parse(
        [
            "--gssapi-keytab",
            "/etc/osocks.keytab",
            "--gssapi-service",
            "socks",
            "--gssapi-min-protection",
            "integrity",
            "--gssapi-max-protection",
            "integrity",
            "--gssapi-principal",
            "alice@EXAMPLE.ORG",
            "--gssapi-principal",
            "*@OTHER.ORG",
        ]
    ).settings()
    assert (s.gssapi_keytab, s.gssapi_service) == ("/etc/osocks.keytab", "socks")
    assert (s.gssapi_min_protection, s.gssapi_max_protection) == ("integrity", "integrity")
    assert s.gssapi_principals == ("alice@EXAMPLE.ORG", "*@OTHER.ORG")
    defaults = cli.parse([]).settings()
    assert (defaults.gssapi_keytab, defaults.gssapi_service) == (None, "rcmd")
    assert (defaults.gssapi_min_protection, defaults.gssapi_max_protection) == ("none", "confidentiality")
    assert "--gssapi-keytab FILE" in cli.usage() and "--gssapi-principal P" in cli.usage()


def test_ipv6_only_listens_on_the_ipv6_wildcard() -> None:
    assert cli.parse(["-6"]).settings().listen == ("::",)


def test_flags_override_a_base() -> None:
    base = DEFAULTS.replace(port=2000, max_sessions=9)
    s = cli.parse(["-p", "3000"]).settings(base)
    assert (s.port, s.max_sessions) == (3000, 9)


@pytest.mark.parametrize(
    ("args", "config"),
    [
        ([], None),
        (["--uci"], "osocks"),
        (["--uci", "proxy"], "proxy"),
        (["--uci=proxy"], "proxy"),
        (["-c", "proxy"], "proxy"),
    ],
)
def test_uci_config_name(args: list[str], config: str | None) -> None:
    assert cli.parse([*args, "-p", "1"]).uci == config


def test_short_flags_cluster_and_take_attached_values() -> None:
    s = cli.parse(["-svv", "-p1081", "-l127.0.0.1", "--handshake-timeout=700"]).settings()
    assert s.syslog and s.verbosity == 2 and s.port == 1081 and s.listen == ("127.0.0.1",)
    assert s.handshake_timeout == 0.7


def test_version_and_help() -> None:
    assert run("-V").stdout == f"osocks {__version__}\n"
    out = run("-h")
    assert out.returncode == 0 and out.stdout.startswith("Usage: osocks [-l addr]")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "unknown option '-x'"),
        (["-p", "70000"], "'70000' is not a port number"),
        (["-p", "http"], "'http' is not a whole number"),
        (["-T", "-5"], "-T"),
        (["-I", "0"], "must be more than 0 ms"),
        (["-l", "localhost"], "-l: 'localhost' is not an IPv4 or IPv6 address"),
        (["-b", "example.com"], "-b: 'example.com' is not an IPv4 or IPv6 address"),
        (["--external", "1.2.3"], "--external: '1.2.3' is not an IPv4 or IPv6 address"),
        (["-4", "-6"], "-4 and -6 exclude each other"),
        (["-6", "-l", "::1", "-4"], "-4 and -6 exclude each other"),
        (["-w", "-1"], "'-1' must be 0 or more"),
        (["-n", "many"], "'many' is not a whole number"),
        (["extra"], "unexpected argument"),
        (["-p"], "-p needs a value"),
        (["--no-s"], "unknown option '--no-s'"),  # no abbreviations: a typo is not another flag
        (["--allow-local=yes"], "--allow-local takes no value"),
        (["--loop", "trio"], "--loop: 'trio' is not one of uvloop, asyncio"),
        (["--gssapi-max-protection", "all"], "--gssapi-max-protection: 'all' is not one of none, integrity"),
        (["--gssapi-principal", "alice"], "--gssapi-principal: 'alice' must be name@REALM or *@REALM"),
        (["--gssapi-principal", "a*@R"], "--gssapi-principal: 'a*@R' must be name@REALM or *@REALM"),
        (["--gssapi-service", "rcmd/host"], "--gssapi-service: 'rcmd/host' must be a service name"),
        (["--gssapi-min-protection", "confidentiality", "--gssapi-max-protection", "integrity"], "is above"),
    ],
)
def test_bad_flags_print_one_line_and_exit_nonzero(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("osocks: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        out = run("-l", "127.0.0.1", "-p", str(taken.getsockname()[1]))
    assert out.returncode == 1
    assert "Address already in use" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_serves_logs_and_exits_zero_on_sigterm(run_osocks, echo: EchoServer) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local")
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    sock.sendall(b"hi")
    assert recv_exactly(sock, 2) == b"hi"
    sock.close()
    held, _, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    held.settimeout(5)
    assert held.recv(10) == b""  # live sessions are closed
    held.close()
    log = "".join(server.lines)
    assert f"-> 127.0.0.1:{echo.port}: up 2 down 2 bytes" in log  # one line per finished session


def test_sigint_exits_zero(run_osocks) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0")
    server.signal(signal.SIGINT)
    assert server.proc.wait(10) == 0


def test_several_listen_addresses(run_osocks, echo: EchoServer) -> None:
    port = free_port()
    server = run_osocks("-l", "127.0.0.1", "-l", "::1", "-p", str(port), "--allow-local")
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
    assert server.proc.poll() is None


def test_runs_without_uvloop(tmp_path, echo: EchoServer, run_osocks) -> None:
    blocker = tmp_path / "uvloop.py"
    blocker.write_text("raise ImportError('uvloop hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT / 'src'}")
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", env=env)
    assert any("uvloop is not installed" in line for line in server.lines)
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_loop_asyncio_serves_on_the_stock_loop(run_osocks, echo: EchoServer, workers: str) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "--loop", "asyncio", "-w", workers)
    sock, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    sock.sendall(b"hi")
    assert recv_exactly(sock, 2) == b"hi"
    sock.close()
    assert "uvloop" not in Path(f"/proc/{server.proc.pid}/maps").read_text()  # not even loaded


def test_quiet_drops_session_lines(run_osocks, echo: EchoServer) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", str(free_port()), "--allow-local", "-q")
    sock, _, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    sock.close()
    assert server.stop() == 0
    assert not any("->" in line for line in server.lines)


def test_interface_without_netifd_uses_the_kernel_device(run_osocks) -> None:
    """Off OpenWrt, -i names a Linux device: osocks listens on its addresses."""
    port = free_port()
    server = run_osocks("-i", "lo", "-p", str(port))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
    assert server.proc.poll() is None


def test_interface_names_need_netifd_where_they_are_no_device(tmp_path) -> None:
    """-i lan (the packaged default) with no ubus to ask netifd: one line and exit 2, not listening on nothing."""
    out = run("-i", "lan0x", "-p", "0", "--ubus-socket", str(tmp_path / "no-ubusd.sock"))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("osocks: interface 'lan0x': ") and "needs netifd over ubus" in last, out.stderr
    assert "Traceback" not in out.stderr


def test_syslog_lines_reach_the_syslog_socket(tmp_path, monkeypatch) -> None:
    import logging

    from osocks import __main__ as app

    path = str(tmp_path / "log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(path)
    syslog.settimeout(5)
    monkeypatch.setattr(app, "SYSLOG_SOCKET", path)
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        app.setup_logging(DEFAULTS.replace(syslog=True))
        logging.getLogger("osocks").info("a line for syslog")
        line = syslog.recv(4096).decode()
    finally:
        logging.getLogger().handlers[:], level = saved
        logging.getLogger().setLevel(level)
        syslog.close()
    assert line.startswith("<30>osocks[") and line.rstrip("\0").endswith("]: a line for syslog")  # daemon.info


def test_syslog_missing_falls_back_to_stderr(tmp_path, monkeypatch, capsys) -> None:
    import logging

    from osocks import __main__ as app

    missing = str(tmp_path / "no-syslog-here")  # whether or not this machine has /dev/log
    monkeypatch.setattr(app, "SYSLOG_SOCKET", missing)
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        app.setup_logging(DEFAULTS.replace(syslog=True))
        logging.getLogger("osocks").info("a line for stderr")
    finally:
        logging.getLogger().handlers[:], level = saved
        logging.getLogger().setLevel(level)
    assert capsys.readouterr().err.splitlines() == [
        f"osocks: WARNING -s: no syslog at {missing}, logging to stderr",
        "osocks: INFO a line for stderr",
    ]


def test_sighup_in_one_process_logs_the_reload_once(run_osocks, tmp_path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:one\n")
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "-U", str(users))
    users.write_text("alice:one\nbob:two\n")
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any("reloaded:" in line for line in server.lines):
        assert time.monotonic() < deadline, server.lines
        time.sleep(0.02)
    server.signal(signal.SIGUSR1)  # a line logged after the reload's
    while not any(" status " in line for line in server.lines):
        assert time.monotonic() < deadline, server.lines
        time.sleep(0.02)
    assert [line for line in server.lines if "reloaded:" in line] == ["osocks: INFO reloaded: users changed\n"]


# -- flags, each seen doing its job in a real process ------------------------------------------------


def status_line(server, timeout: float = 10) -> dict:
    """SIGUSR1, then the status it logs (at any verbosity): also the mark that what came before is in."""
    import json

    seen = len(server.lines)
    server.signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while True:
        for line in server.lines[seen:]:
            if " status {" in line:
                return json.loads(line.split(" status ", 1)[1])
        assert time.monotonic() < deadline, server.lines[-5:]
        time.sleep(0.02)


def bind_request(port: int, host: str = "0.0.0.0") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x00" + socks5.encode_request(socks5.Command.BIND, host, 0))
    assert recv_exactly(sock, 2) == b"\x05\x00"
    return sock


def test_bind_timeout_flag(run_osocks) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "--bind-timeout", "300")
    with bind_request(server.port) as control:
        assert read_reply(control)[0] == ReplyCode.SUCCEEDED
        assert read_reply(control)[0] == ReplyCode.TTL_EXPIRED  # nobody came within 300 ms
    assert status_line(server)["settings"]["bind_timeout"] == 0.3


def test_external_flag_is_announced_by_bind(run_osocks) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "--external", "127.0.0.3")
    with bind_request(server.port) as control:
        code, host, port = read_reply(control)
        assert (code, host) == (ReplyCode.SUCCEEDED, "127.0.0.3")
        with socket.create_connection(("127.0.0.3", port), timeout=5) as peer:
            assert read_reply(control) == (ReplyCode.SUCCEEDED, "127.0.0.1", peer.getsockname()[1])


def test_b_flag_is_the_source_of_outgoing_connections(run_osocks, echo: EchoServer) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--allow-local", "-b", "127.0.0.2")
    sock, code, host, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    with sock:
        assert (code, host) == (ReplyCode.SUCCEEDED, "127.0.0.2")
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    assert echo.peers[-1][0] == "127.0.0.2"


def test_client_rule_flag(run_osocks) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", "0", "--client-rule", "allow 127.0.0.2", "--client-rule", "deny all")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as denied:
        denied.sendall(b"\x05\x01\x00")
        assert wait_closed(denied) == b""  # closed before a byte is answered
    allowed = socket.socket()
    allowed.bind(("127.0.0.2", 0))
    allowed.connect(("127.0.0.1", server.port))
    with allowed:
        allowed.sendall(b"\x05\x01\x00")
        assert recv_exactly(allowed, 2) == b"\x05\x00"
    status = status_line(server)
    assert status["sessions"]["denied"] == 1 and status["sessions"]["total"] == 1


@pytest.mark.parametrize(("flag", "warned"), [("-q", True), ("-qq", False)])
def test_qq_leaves_errors_only(run_osocks, echo: EchoServer, flag: str, warned: bool) -> None:
    server = run_osocks("-l", "127.0.0.1", "-p", str(free_port()), "--allow-local", "-n", "1", flag)
    deadline = time.monotonic() + 10
    while (status := status_line(server)["sessions"])["live"] or not status["total"]:
        assert time.monotonic() < deadline  # the start-up probe's connection accepted, and gone (-n 1)
    held, code, _, _ = socks_connect(server.port, "127.0.0.1", echo.port)
    assert code == ReplyCode.SUCCEEDED
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:  # over -n: refused, a warning
        assert wait_closed(extra) == b""
    assert status_line(server)["sessions"]["refused"] == 1
    held.close()
    assert any("refused: 1 sessions live (limit)" in line for line in server.lines) is warned
    assert not any(" INFO " in line and " status " not in line for line in server.lines)
