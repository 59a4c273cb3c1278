"""UCI sections → Settings (pure), the shipped default config, and real libuci via pyuci."""

from __future__ import annotations

import ipaddress
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from osocks import uci
from osocks.rules import parse_rule
from osocks.settings import DEFAULTS, Settings, SettingsError, User
from osocks.uci import settings_from_sections

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "files" / "osocks.config"
SCRYPT = "$scrypt$1024$8$1$" + "00" * 16 + "$" + "11" * 32  # well formed (no password matches it)


def parse_uci_text(text: str) -> dict[str, dict[str, object]]:
    """A tiny UCI file reader for tests: sections → options, lists as tuples, ".type" added."""
    sections: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "config":
            name = args[1] if len(args) > 1 else f"cfg{number:02x}"
            current = sections[name] = {".type": args[0]}
        elif keyword in ("option", "list") and current is not None and len(args) == 2:
            name, value = args
            if keyword == "list":
                old = current.get(name, ())
                current[name] = (*(old if isinstance(old, tuple) else ()), value)
            else:
                current[name] = value
        else:
            raise ValueError(f"line {number}: cannot parse {line!r}")
    return sections


def main(**options: object) -> dict[str, dict[str, object]]:
    return {"main": {".type": "osocks", **options}}


def test_empty_section_keeps_the_defaults() -> None:
    assert settings_from_sections(main()) == DEFAULTS
    assert settings_from_sections({"main": {}}) == DEFAULTS  # raw pyuci: no ".type"


def test_every_option(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# comment\n\ncarol:secret3\n")
    s = settings_from_sections(
        main(
            enabled="1",
            listen=("192.168.1.1", "::1"),
            interface=("lan", "guest"),
            port="1081",
            max_sessions="64",
            connect_timeout="2500",
            idle_timeout="120000",
            handshake_timeout="3000",
            bind_timeout="4500",
            family="ipv4",
            syslog="1",
            verbose="1",
            workers="0",
            user=("alice:secret1", f"bob:{SCRYPT}"),
            user_file=str(users),
            anonymous=("192.168.1.0/24", "fd00::/8"),
            client_rule=("allow 192.168.1.0/24", "deny all"),
            dest_rule=("deny 10.0.0.0/8 port 1-1023",),
            allow_local="1",
            bind_address="192.168.2.1",
            external_address="203.0.113.7",
            splice="0",
            loop="asyncio",
            gssapi_keytab="/etc/osocks.keytab",
            gssapi_service="socks",
            gssapi_min_protection="integrity",
            gssapi_max_protection="integrity",
            gssapi_principal=("alice@EXAMPLE.ORG", "*@OTHER.ORG"),
        )
    )
    assert s == Settings(
        listen=("192.168.1.1", "::1"),
        interfaces=("lan", "guest"),
        port=1081,
        max_sessions=64,
        connect_timeout=2.5,
        idle_timeout=120.0,
        handshake_timeout=3.0,
        bind_timeout=4.5,
        family="ipv4",
        syslog=True,
        verbosity=1,
        workers=0,
        users=(User("alice", "secret1"), User("bob", SCRYPT), User("carol", "secret3")),
        anonymous=(ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00::/8")),
        client_rules=(parse_rule("allow 192.168.1.0/24"), parse_rule("deny all")),
        dest_rules=(parse_rule("deny 10.0.0.0/8 port 1-1023"),),
        allow_local=True,
        bind_address="192.168.2.1",
        external_address="203.0.113.7",
        splice=False,
        loop="asyncio",
        gssapi_keytab="/etc/osocks.keytab",
        gssapi_service="socks",
        gssapi_min_protection="integrity",
        gssapi_max_protection="integrity",
        gssapi_principals=("alice@EXAMPLE.ORG", "*@OTHER.ORG"),
    )
    assert [u.secret for u in s.users] == ["secret1", SCRYPT, "secret3"]


@pytest.mark.parametrize("verbose, level", [("0", 0), ("1", 1), ("-1", -1), ("-2", -2)])
def test_verbose(verbose: str, level: int) -> None:
    assert settings_from_sections(main(verbose=verbose)).verbosity == level


@pytest.mark.parametrize("wrap", [tuple, list, lambda items: items[0]], ids=["tuple", "list", "str"])
def test_a_list_may_be_a_tuple_a_list_or_a_string(wrap: Callable[[list[str]], object]) -> None:
    s = settings_from_sections(
        main(
            listen=wrap(["10.0.0.1"]),
            interface=wrap(["lan"]),
            user=wrap(["a:b"]),
            anonymous=wrap(["10.0.0.0/8"]),
            client_rule=wrap(["deny all"]),
            dest_rule=wrap(["deny all port 25"]),
        )
    )
    assert (s.listen, s.interfaces, s.users) == (("10.0.0.1",), ("lan",), (User("a", "b"),))
    assert (s.anonymous, s.client_rules) == ((ipaddress.ip_network("10.0.0.0/8"),), (parse_rule("deny all"),))
    assert s.dest_rules == (parse_rule("deny all port 25"),)


def test_user_given_as_option_string() -> None:
    assert settings_from_sections(main(user="alice:pw with spaces")).users == (User("alice", "pw with spaces"),)


def test_addresses_interfaces_networks_may_be_space_separated() -> None:
    s = settings_from_sections(
        main(listen="10.0.0.1  10.0.0.2", interface=("lan guest", "iot"), anonymous="10.0.0.0/8 fd00::/8")
    )
    assert s.listen == ("10.0.0.1", "10.0.0.2")
    assert s.interfaces == ("lan", "guest", "iot")
    assert [str(n) for n in s.anonymous] == ["10.0.0.0/8", "fd00::/8"]


def test_rules_are_not_split() -> None:
    rules = settings_from_sections(main(client_rule="deny all port 25")).client_rules
    assert rules == (parse_rule("deny all port 25"),)


def test_interface_without_listen_listens_on_the_interfaces_only() -> None:
    s = settings_from_sections(main(interface="lan"))
    assert (s.listen, s.interfaces) == ((), ("lan",))
    s = settings_from_sections(main(interface="lan", listen="127.0.0.1"))
    assert (s.listen, s.interfaces) == (("127.0.0.1",), ("lan",))


def test_no_listen_and_no_interface_is_an_error() -> None:
    with pytest.raises(SettingsError, match=r"^uci osocks\.main\.listen: no listen address and no interface"):
        settings_from_sections(main(listen=()))


@pytest.mark.parametrize("text", ["1", "yes", "on", "true", "enabled", "YES", "True", "On"])
def test_true_forms(text: str) -> None:
    s = settings_from_sections(main(syslog=text, allow_local=text, splice=text, enabled=text))
    assert (s.syslog, s.allow_local, s.splice) == (True, True, True)


@pytest.mark.parametrize("text", ["0", "no", "off", "false", "disabled", "NO", "False"])
def test_false_forms(text: str) -> None:
    s = settings_from_sections(main(syslog=text, allow_local=text, splice=text, enabled=text))
    assert (s.syslog, s.allow_local, s.splice) == (False, False, False)


def test_empty_option_is_unset() -> None:
    assert settings_from_sections(main(bind_address="", port="", syslog="", user_file="")) == DEFAULTS


def test_options_not_given_keep_the_base() -> None:
    base = Settings(port=9999, workers=4, users=(User("x", "y"),))
    s = settings_from_sections(main(workers="2"), base)
    assert (s.port, s.workers, s.users) == (9999, 2, (User("x", "y"),))


def test_metadata_keys_are_ignored() -> None:
    sections = {"cfg01abcd": {".type": "osocks", ".name": "cfg01abcd", ".anonymous": True, ".index": 0, "port": "1"}}
    assert settings_from_sections(sections).port == 1


def test_the_one_osocks_section_is_used_whatever_its_name() -> None:
    sections = {"other": {".type": "ui", "port": "junk"}, "cfg0235f7": {".type": "osocks", "port": "2"}}
    assert settings_from_sections(sections).port == 2


def test_no_osocks_section() -> None:
    with pytest.raises(SettingsError, match=r"^uci osocks: no 'config osocks' section"):
        settings_from_sections({"main": {".type": "osock", "port": "1"}})
    with pytest.raises(SettingsError, match="no 'config osocks' section"):
        settings_from_sections({})


def test_two_osocks_sections() -> None:
    with pytest.raises(SettingsError, match=r"more than one 'config osocks' section \(main, cfg02\)"):
        settings_from_sections({"main": {".type": "osocks"}, "cfg02": {".type": "osocks"}})


def test_error_names_the_config() -> None:
    with pytest.raises(SettingsError, match=r"^uci proxy\.main\.port: 'x' is not a number$"):
        settings_from_sections(main(port="x"), config="proxy")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("port", "abc", "port: 'abc' is not a number"),
        ("port", "70000", "port: 70000 is not a port number (0-65535)"),
        ("port", "-1", "port: -1 is not a port number"),
        ("port", ("1080", "1081"), "port: one value expected, not a list of 2"),
        ("max_sessions", "-1", "max_sessions: -1 must be 0 (unlimited) or more"),
        ("max_sessions", "many", "max_sessions: 'many' is not a number"),
        ("connect_timeout", "0", "connect_timeout: '0' must be more than 0 (milliseconds)"),
        ("connect_timeout", "1.5", "connect_timeout: '1.5' is not a number"),
        ("idle_timeout", "-5", "idle_timeout: '-5' must be more than 0 (milliseconds)"),
        ("handshake_timeout", "10s", "handshake_timeout: '10s' is not a number"),
        ("bind_timeout", "0", "bind_timeout: '0' must be more than 0 (milliseconds)"),
        ("family", "ipv5", "family: 'ipv5' is not one of any, ipv4, ipv6"),
        ("syslog", "maybe", "syslog: 'maybe' is not a boolean (1/0, yes/no, on/off, true/false, enabled/disabled)"),
        ("verbose", "loud", "verbose: 'loud' is not a number"),
        ("workers", "-1", "workers: -1 must be 0 (one per core) or more"),
        ("workers", "two", "workers: 'two' is not a number"),
        ("listen", "lan", "listen: 'lan' is not an IPv4 or IPv6 address"),
        ("user", ("alice",), "user: 'alice' must be written user:password"),
        ("user", ":pw", "user: the user name before ':' is empty"),
        ("user_file", "/nonexistent/osocks.users", "user_file: '/nonexistent/osocks.users': No such file"),
        ("anonymous", "192.168.1.300/24", "anonymous: '192.168.1.300/24' is not a network"),
        ("client_rule", "permit all", "client_rule: 'permit all' is not a rule"),
        ("dest_rule", "deny all port 0", "dest_rule: '0' is not a port range"),
        ("allow_local", "2", "allow_local: '2' is not a boolean"),
        ("bind_address", "example.com", "bind_address: 'example.com' is not an IPv4 or IPv6 address"),
        ("external_address", "1.2.3", "external_address: '1.2.3' is not an IPv4 or IPv6 address"),
        ("splice", "sometimes", "splice: 'sometimes' is not a boolean"),
        ("loop", "tokio", "loop: 'tokio' is not one of uvloop, asyncio"),
        ("gssapi_service", "rcmd/x", "gssapi_service: 'rcmd/x' must be a service name"),
        ("gssapi_min_protection", "some", "gssapi_min_protection: 'some' is not one of none, integrity"),
        ("gssapi_max_protection", "all", "gssapi_max_protection: 'all' is not one of none, integrity"),
        ("gssapi_principal", "alice", "gssapi_principal: 'alice' must be name@REALM or *@REALM"),
        ("enabled", "y", "enabled: 'y' is not a boolean"),
        ("prot", "1080", "prot: unknown option"),
        ("interfaces", "lan", "interfaces: unknown option"),
    ],
)
def test_bad_values(option: str, value: object, message: str) -> None:
    with pytest.raises(SettingsError) as e:
        settings_from_sections(main(**{option: value}))
    assert str(e.value).startswith("uci osocks.main." + message), str(e.value)


def test_user_file_lines_are_named(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("good:pw\nbad\n")
    with pytest.raises(SettingsError, match=r"^uci osocks\.main\.user_file .*users:2: 'bad' must be written"):
        settings_from_sections(main(user_file=str(users)))


# The package's default /etc/config/osocks


def test_default_config_is_safe_on_a_router() -> None:
    sections = parse_uci_text(DEFAULT_CONFIG.read_text())
    assert list(sections) == ["main"]
    assert sections["main"].get("enabled") == "1"
    s = settings_from_sections(sections)
    assert s.interfaces == ("lan",)
    assert s.listen == ()  # not 0.0.0.0: never on the WAN
    assert s.allow_local is False
    assert s.port == 1080
    assert (s.client_rules, s.dest_rules, s.users, s.anonymous) == ((), (), (), ())


def test_default_config_examples_are_known_and_valid() -> None:
    """Every commented `#option x 'v'` / `#list x 'v'` example parses when uncommented."""
    text = DEFAULT_CONFIG.read_text()
    examples = re.findall(r"^\s*#\s*((?:option|list)\s+(\w+)\s+'[^']*')\s*$", text, re.M)
    names = {name for _, name in examples}
    assert names >= set(uci.SCALARS) - {"enabled", "port", "allow_local"} | set(uci.LISTS) - {"interface"}
    assert names <= set(uci.SCALARS) | set(uci.LISTS)
    lines = "\n\t".join(line for line, name in examples if name != "user_file")
    settings_from_sections(parse_uci_text(f"config osocks 'main'\n\t{lines}\n"))


# Without pyuci


def test_without_pyuci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "euci", None)
    assert not uci.available()
    with pytest.raises(SettingsError, match=r"^uci osocks: pyuci is not installed"):
        uci.load()


# Real libuci through pyuci

needs_pyuci = pytest.mark.skipif(not uci.available(), reason="pyuci (modules euci, uci) is not importable")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    confdir, savedir = tmp_path / "config", tmp_path / "save"
    confdir.mkdir()
    savedir.mkdir()
    return confdir, savedir


@needs_pyuci
def test_libuci_reads_the_default_config(dirs: tuple[Path, Path]) -> None:
    confdir, savedir = dirs
    (confdir / "osocks").write_text(DEFAULT_CONFIG.read_text())
    s = uci.load(confdir=str(confdir), savedir=str(savedir))
    assert s == settings_from_sections(parse_uci_text(DEFAULT_CONFIG.read_text()))


@needs_pyuci
def test_libuci_lists_anonymous_sections_and_other_types(dirs: tuple[Path, Path]) -> None:
    confdir, savedir = dirs
    (confdir / "proxy").write_text(
        "config ui 'web'\n\toption port 'junk'\n\n"
        "config osocks\n\tlist listen '127.0.0.1'\n\tlist listen '::1'\n\toption port '1082'\n"
        "\tlist user 'alice:pw'\n\toption syslog 'yes'\n"
    )
    s = uci.load("proxy", confdir=str(confdir), savedir=str(savedir))
    assert (s.listen, s.port, s.users, s.syslog) == (("127.0.0.1", "::1"), 1082, (User("alice", "pw"),), True)


@needs_pyuci
def test_libuci_each_load_rereads_the_file(dirs: tuple[Path, Path]) -> None:
    confdir, savedir = dirs
    path = confdir / "osocks"
    path.write_text("config osocks 'main'\n\toption port '1'\n")
    assert uci.load(confdir=str(confdir), savedir=str(savedir)).port == 1
    path.write_text("config osocks 'main'\n\toption port '2'\n")
    assert uci.load(confdir=str(confdir), savedir=str(savedir)).port == 2


@needs_pyuci
def test_libuci_errors(dirs: tuple[Path, Path]) -> None:
    confdir, savedir = dirs
    with pytest.raises(SettingsError, match=r"^uci osocks: .*/config/osocks not found$"):
        uci.load(confdir=str(confdir), savedir=str(savedir))
    (confdir / "osocks").write_text("config osocks 'main'\n\toption port '1\n")
    with pytest.raises(SettingsError, match=r"^uci osocks: .*/config/osocks is not valid UCI$"):
        uci.load(confdir=str(confdir), savedir=str(savedir))
    (confdir / "osocks").write_text("config osocks 'main'\n\toption port 'x'\n")
    with pytest.raises(SettingsError, match=r"^uci osocks\.main\.port: 'x' is not a number$"):
        uci.load(confdir=str(confdir), savedir=str(savedir))


def test_a_user_file_without_users_is_refused(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# nobody yet\n\n")
    with pytest.raises(SettingsError, match=rf"^uci osocks\.main\.user_file: '{users}' lists no user"):
        settings_from_sections(main(user_file=str(users), user=("alice:pw",)))


def test_a_user_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^uci osocks\.main\.user: user 'alice' is listed twice"):
        settings_from_sections(main(user=("alice:one", "bob:x", "alice:two")))
    users = tmp_path / "users"
    users.write_text("bob:y\n")
    message = rf"^uci osocks\.main\.user_file {users}:1: user 'bob' is listed twice \(also at uci osocks\.main\.user\)"
    with pytest.raises(SettingsError, match=message):
        settings_from_sections(main(user=("alice:one", "bob:x"), user_file=str(users)))


@needs_pyuci
def test_libuci_user_file_without_users_refuses_to_start_and_a_reload_keeps_the_users(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real osocks process reading UCI: an empty user_file stops it at start (exit 2, one line naming
    the file); the same file emptied under a running osocks fails the reload, and the users stay."""
    import signal
    import socket
    import subprocess
    import threading
    import time

    from conftest import ROOT, free_port, recv_exactly

    confdir, _ = dirs
    users = tmp_path / "users"
    users.write_text("# nobody\n")
    port = free_port()
    (confdir / "osocks").write_text(
        f"config osocks 'main'\n\tlist listen '127.0.0.1'\n\toption port '{port}'\n\toption user_file '{users}'\n"
    )
    command = [sys.executable, "-m", "osocks", "--uci", "osocks", "--uci-dir", str(confdir)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"osocks: uci osocks.main.user_file: '{users}' lists no user (only blank lines or comments)")

    users.write_text("alice:wonderland\n")
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True).start()

    def method_offered() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x05\x02\x00\x02")
            return recv_exactly(sock, 2)

    try:
        deadline = time.monotonic() + 10
        while not any("listening on" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.02)
        assert method_offered() == b"\x05\x02"
        users.write_text("\n")
        proc.send_signal(signal.SIGHUP)
        while not any("reload failed" in line for line in lines):
            assert time.monotonic() < deadline + 10, "".join(lines)
            time.sleep(0.02)
        assert f"uci osocks.main.user_file: '{users}' lists no user" in "".join(lines)
        assert method_offered() == b"\x05\x02"  # still asks for a password: not an open proxy
    finally:
        proc.terminate()
        proc.wait(10)
