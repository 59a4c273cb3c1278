"""luci-app-osocks without LuCI: the views parse, the menu and ACL hold together, every UCI option
has its field, the browser's checks agree with the server's, the translation template is current.

The pages themselves are tried in a real browser against a real LuCI by test_luci_browser.py."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import luci_pot
import pytest

from conftest import ROOT
from osocks import ubus
from osocks.rules import parse_network, parse_rule
from osocks.settings import Settings, SettingsError, check_address, check_port, check_principal_pattern, parse_user

APP = ROOT / "feeds" / "luci-app-osocks"
RESOURCES = APP / "htdocs" / "luci-static" / "resources"
VIEWS = sorted(RESOURCES.rglob("*.js"))
SETTINGS = RESOURCES / "view" / "osocks" / "settings.js"
MENU = APP / "root" / "usr" / "share" / "luci" / "menu.d" / "luci-app-osocks.json"
ACL = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-osocks.json"
READ_ONLY = {"status", "sessions"}  # the methods that change nothing: ACL "read"; the others "write"
TABS = {
    "general": "General",
    "users": "Users",
    "access": "Access",
    "limits": "Limits",
    "advanced": "Logging and advanced",
}


def node() -> str:
    found = shutil.which("node") or shutil.which("nodejs")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed: tests/run.sh installs Debian's nodejs")
        pytest.skip("node is not installed (Debian: apt-get install nodejs)")
    return found


def source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# -- the files -------------------------------------------------------------------------------------


def test_layout() -> None:
    makefile = source(APP / "Makefile")
    assert "include $(TOPDIR)/feeds/luci/luci.mk" in makefile
    assert re.search(r"^LUCI_DEPENDS:=.*\+osocks\b", makefile, re.M)
    assert re.search(r"^LUCI_PKGARCH:=all$", makefile, re.M)
    assert {p.relative_to(RESOURCES).as_posix() for p in VIEWS} >= {
        "view/osocks/settings.js",
        "view/osocks/status.js",
        "view/status/include/70_osocks.js",
    }
    assert (APP / "po" / "templates" / "osocks.pot").exists()


@pytest.mark.parametrize("path", VIEWS, ids=lambda p: p.name)
def test_view_parses(path: Path, tmp_path: Path) -> None:
    """node --check on the view as LuCI runs it: the file is the body of a function (it ends in return)."""
    text = source(path)
    assert text.startswith("'use strict';\n")
    wrapped = tmp_path / path.name
    wrapped.write_text(f"(function(window, document, L) {{{text}\n}});\n", encoding="utf-8")
    done = subprocess.run([node(), "--check", str(wrapped)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_menu() -> None:
    menu = json.loads(source(MENU))
    acl = json.loads(source(ACL))
    top = menu["admin/services/osocks"]
    assert top["depends"]["acl"] == list(acl) == ["luci-app-osocks"]
    assert top["depends"]["uci"] == {"osocks": True}
    views = {node["action"]["path"] for node in menu.values() if node["action"]["type"] == "view"}
    assert views == {"osocks/settings", "osocks/status"}
    for view in views:
        assert (RESOURCES / "view" / f"{view}.js").exists()


def rpc_declarations() -> dict[tuple[str, str], list[str]]:
    """(object, method) → params of every rpc.declare in the app's JS."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in VIEWS:
        for body in re.findall(r"rpc\.declare\(\{(.*?)\}\);", source(path), re.S):
            obj = re.search(r"object:\s*'([^']+)'", body)
            method = re.search(r"method:\s*'([^']+)'", body)
            params = re.search(r"params:\s*\[([^\]]*)\]", body)
            assert obj and method, f"{path.name}: rpc.declare without a literal object and method"
            found[(obj.group(1), method.group(1))] = re.findall(r"'([^']+)'", params.group(1)) if params else []
    return found


def test_acl_grants_exactly_what_the_views_use() -> None:
    (group,) = json.loads(source(ACL)).values()
    declared = rpc_declarations()
    granted = {
        (obj, method, access)
        for access in ("read", "write")
        for obj, ms in group[access]["ubus"].items()
        for method in ms
    }
    used = {(obj, method, "read" if method in READ_ONLY else "write") for obj, method in declared}
    assert granted == used
    configs = {c for path in VIEWS for c in re.findall(r"new form\.Map\('([^']+)'", source(path))}
    assert configs == {"osocks"}
    assert group["read"]["uci"] == group["write"]["uci"] == sorted(configs)
    assert set(group) == {"description", "read", "write"}
    assert set(group["read"]) == set(group["write"]) == {"ubus", "uci"}


def test_views_call_methods_osocks_serves_for_luci() -> None:
    """The object that takes LuCI's ubus_rpc_session, with the arguments the method declares."""
    for (obj, method), params in rpc_declarations().items():
        assert obj == "osocks" + ubus.LUCI_SUFFIX
        assert tuple(params) == ubus.METHODS[method]


# -- every option, a field -------------------------------------------------------------------------


def config_options() -> set[str]:
    """Options of files/osocks.config, set or shown commented out."""
    return set(re.findall(r"^\s*#?\s*(?:option|list)\s+(\w+)\s", source(ROOT / "files" / "osocks.config"), re.M))


def settings_fields() -> dict[str, str]:
    """UCI option → the tab its field is in."""
    calls = re.findall(r"s\.taboption\('(\w+)',\s*[\w.]+,\s*'(\w+)'", source(SETTINGS))
    fields = {option: tab for tab, option in calls}
    assert len(fields) == len(calls), "an option has two fields"
    return fields


def test_every_option_has_a_field_and_every_field_an_option() -> None:
    assert settings_fields().keys() == config_options()


def test_fields_are_in_the_tabs() -> None:
    text = source(SETTINGS)
    assert re.findall(r"s\.tab\('(\w+)', _\('([^']+)'\)\)", text) == list(TABS.items())
    fields = settings_fields()
    assert set(fields.values()) <= set(TABS)
    expected = {
        "general": {"enabled", "interface", "listen", "port", "workers"},
        "users": {"user", "user_file", "anonymous"},
        "access": {"client_rule", "dest_rule", "allow_local", "bind_address", "external_address"},
        "limits": {"max_sessions", "connect_timeout", "idle_timeout", "handshake_timeout", "bind_timeout"},
        "advanced": {"family", "syslog", "verbose", "splice"},
    }
    for tab, options in expected.items():
        assert {o for o in options if o in fields} <= {o for o, t in fields.items() if t == tab}, tab
    assert all(fields[o] == "users" for o in fields if o.startswith("gssapi_"))


def test_field_ids_are_cbid_osocks_main_option() -> None:
    """One Map over config osocks, one NamedSection main: LuCI names each field cbid.osocks.main.<option>."""
    text = source(SETTINGS)
    assert len(re.findall(r"new form\.Map\(", text)) == 1 and "new form.Map('osocks'" in text
    assert re.findall(r"m\.section\(([^)]*)\)", text) == ["form.NamedSection, 'main', 'osocks'"]


def test_users_are_stored_hashed() -> None:
    """The user field hashes through ubus hash_password and shows names only."""
    text = source(SETTINGS)
    assert "s.taboption('users', UserOption, 'user'" in text
    assert "name + ':' + reply.hash" in text and "type': 'password'" in text


# -- the browser's checks are the server's ---------------------------------------------------------

CASES: dict[str, list[str]] = {
    "port": ["0", "1080", "65535", "65536", "-1", "80a", "1e3", " 80", "+80", "08", "99999999999999999999"],
    "count": ["0", "7", "-1", "1.5", "x", "00"],
    "milliseconds": ["1", "8000", "0", "-5", "1.5", "ten"],
    "address": [
        "127.0.0.1",
        "192.168.1.1",
        "256.1.1.1",
        "1.2.3",
        "01.2.3.4",
        "1.2.3.4.5",
        "::",
        "::1",
        "fd00::1",
        "2001:db8::",
        "2001:db8:0:0:0:0:0:1",
        "2001:db8:0:0:0:0:0:0:1",
        "1::2::3",
        "::ffff:192.0.2.1",
        "fe80::1%eth0",
        "fe80::1%",
        "12345::",
        "g::1",
        ":1::",
        "1:2:3:4:5:6:7::",
        "::1:2:3:4:5:6:7",
        "1:2:3:4:5:6:7:8",
        ":::",
        "1:2:3:4:5:6:1.2.3.4",
        "localhost",
        "1.2.3.4/24",
        " 1.2.3.4",
    ],
    "networks": [
        "192.168.1.0/24",
        "192.168.1.5/24",
        "10.0.0.0/8 fd00::/8",
        "fd00::/129",
        "10.0.0.0/33",
        "10.0.0.1",
        "10.0.0.0/",
        "10.0.0.0/8/8",
        "all",
        "10.0.0.0/+8",
        "fe80::%eth0/64",
        "::/0",
    ],
    "rule": [
        "allow 192.168.1.0/24",
        "deny all",
        "deny all port 25",
        "deny 10.0.0.0/8 port 1-1023,3306",
        "deny 10.0.0.0/8,fd00::/8 port 80",
        "Allow all",
        "allow",
        "allow all port",
        "allow all ports 25",
        "deny all port 0",
        "deny all port 70000",
        "deny all port 30-20",
        "deny all port 25,",
        "permit all",
        "allow 10.0.0.0/8, 192.168.0.0/16",
        "allow  10.0.0.0/8   port  80",
        "deny 300.0.0.0/8",
        "allow all port 1-2-3",
    ],
    "serviceName": ["rcmd", "socks", "HTTP", "rcmd/host", "rcmd@", "r cmd", "r\tcmd", "*"],
    "principal": [
        "alice@EXAMPLE.ORG",
        "*@EXAMPLE.ORG",
        "alice/admin@EXAMPLE.ORG",
        "a@b@EXAMPLE.ORG",
        "alice",
        "@EXAMPLE.ORG",
        "alice@",
        "*@*",
        "a*@EXAMPLE.ORG",
        "**@EXAMPLE.ORG",
        "*",
    ],
}


def server_accepts(kind: str, text: str) -> bool:
    """The server's verdict on one value of this kind (an empty value is an unset option)."""
    try:
        if text == "":
            return True
        if kind == "port":
            check_port("port", int(text.strip()))
        elif kind in ("count", "milliseconds"):
            value = int(text.strip())
            if value < (1 if kind == "milliseconds" else 0):
                return False
        elif kind == "address":
            check_address("address", text)
        elif kind == "networks":
            for word in text.split():
                parse_network(word)
        elif kind == "rule":
            parse_rule(text)
        elif kind == "serviceName":
            Settings(gssapi_service=text)
        elif kind == "principal":
            check_principal_pattern("principal", text)
    except (ValueError, SettingsError):
        return False
    return True


HARNESS = r"""
const fs = require('fs');
const [file, casesFile] = process.argv.slice(2);
const baseclass = { extend: members => members };
const factory = new Function('baseclass', '_', fs.readFileSync(file, 'utf8'));
const check = factory(baseclass, s => s);
const cases = JSON.parse(fs.readFileSync(casesFile, 'utf8'));
const verdicts = {};
for (const kind in cases)
    verdicts[kind] = cases[kind].map(value => check[kind](value) === true);
console.log(JSON.stringify(verdicts));
"""


def browser_verdicts(cases: dict[str, list[str]], tmp_path: Path) -> dict[str, list[bool]]:
    harness, data = tmp_path / "harness.js", tmp_path / "cases.json"
    harness.write_text(HARNESS)
    data.write_text(json.dumps(cases))
    validate = RESOURCES / "osocks" / "validate.js"
    done = subprocess.run([node(), str(harness), str(validate), str(data)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_browser_refuses_what_the_server_refuses(tmp_path: Path) -> None:
    """Each value the browser lets through, the server takes; and the two agree on all but a few
    spellings the browser is stricter on (a sign or a space in a number, a scope in a network)."""
    verdicts = browser_verdicts(CASES, tmp_path)
    stricter = []
    for kind, values in CASES.items():
        for value, browser in zip(values, verdicts[kind], strict=True):
            server = server_accepts(kind, value)
            assert server or not browser, f"{kind} {value!r}: the browser accepts what osocks refuses"
            if server != browser:
                stricter.append(value)
    assert sorted(stricter) == [" 80", "+80", "fe80::%eth0/64"], stricter


def test_browser_accepts_every_address_the_server_does(tmp_path: Path) -> None:
    """IPv6 spellings are where a hand-written check goes wrong: compare on many."""
    addresses = [
        str(ipaddress.ip_address(n)) for n in (0, 1, 2**32 - 1, 2**32, 2**64, 2**96 + 5, 2**128 - 1, 0xFFFF << 32)
    ]
    addresses += [ipaddress.ip_address(a).exploded for a in addresses if ":" in a]
    addresses += ["1:0:0:0:0:0:0:0", "0:0:0:0:0:0:0:1", "1::", "::1.2.3.4", "1:2::3:4", "1:2:3:4:5:6:7:8%1"]
    verdicts = browser_verdicts({"address": addresses}, tmp_path)["address"]
    assert all(verdicts), [a for a, ok in zip(addresses, verdicts, strict=True) if not ok]


def test_user_names_and_passwords(tmp_path: Path) -> None:
    names = ["alice", "", "a:b", "é" * 127, "é" * 128]
    passwords = ["secret", "", "x" * 255, "x" * 256]
    verdicts = browser_verdicts({"userName": names, "password": passwords}, tmp_path)
    assert verdicts == {"userName": [True, False, False, True, False], "password": [True, False, True, False]}
    for name, ok in zip(names, verdicts["userName"], strict=True):
        if ok:
            assert parse_user(f"{name}:$pbkdf2-sha256$1$00${'00' * 32}").name == name


# -- translations ----------------------------------------------------------------------------------


def test_pot_is_up_to_date() -> None:
    assert luci_pot.POT.read_text(encoding="utf-8") == luci_pot.template(), "run python3 tests/luci_pot.py"


def test_pot_has_every_string() -> None:
    msgids = luci_pot.messages()
    assert "Save & Apply" not in msgids  # LuCI's own, not ours
    for expected in ("Disconnect", "Add user", "osocks refused the new settings", "SOCKS proxy (osocks)"):
        assert expected in msgids
    assert luci_pot.unquote(r"'it\'s'") == "it's" and luci_pot.po_quote('a "b"\n') == r'"a \"b\"\n"'


def test_browser_test_script_parses() -> None:
    """tests/luci_browser.js runs only against a real LuCI: here at least it must parse."""
    done = subprocess.run(
        [node(), "--check", str(ROOT / "tests" / "luci_browser.js")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
