"""The OpenWrt package, checked without make or an SDK: recipe, files, scripts, test.sh."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import osocks
from openwrt import split

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = (ROOT / "Makefile").read_text()
UVLOOP_MAKEFILE = (ROOT / "feeds" / "python3-uvloop" / "Makefile").read_text()
INIT = ROOT / "files" / "osocks.init"
TEST_SH = ROOT / "test.sh"
DEPENDS = {
    "python3-light",
    "python3-asyncio",
    "python3-logging",
    "python3-codecs",
    "python3-openssl",
    "python3-ubus",
    "python3-uci",
    "OSOCKS_UVLOOP:python3-uvloop",  # only recommended: feeds/README.md
}
MAINTAINER = re.compile(r"[^<>]+ <[^@<>\s]+@[^@<>\s]+>")  # OpenWrt's "Name <address>"


def variables(text: str) -> dict[str, str]:
    """`NAME:=value` lines (continuations joined), as make would read the simple ones."""
    text = re.sub(r"\\\n\s*", " ", text)
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s*([A-Z0-9_]+)\s*:?=(.*)$", text, re.M)}


def block(text: str, name: str) -> str:
    m = re.search(rf"^define {re.escape(name)}\n(.*?)^endef", text, re.M | re.S)
    assert m, f"no 'define {name}'"
    return m[1]


def test_version_matches_the_python_package() -> None:
    """PKG_VERSION is written out (as OpenWrt tools expect) and kept equal to __version__."""
    init = (ROOT / "src" / "osocks" / "__init__.py").read_text()
    assert variables(MAKEFILE)["PKG_VERSION"] == osocks.__version__
    assert re.search(rf'^__version__ = "{re.escape(osocks.__version__)}"$', init, re.M)


def test_package_name_license_and_build_dependencies() -> None:
    v = variables(MAKEFILE)
    assert (v["PKG_NAME"], v["PKG_LICENSE"]) == ("osocks", "MIT")
    assert MAINTAINER.fullmatch(v["PKG_MAINTAINER"])
    assert re.fullmatch(r"[1-9][0-9]*", v["PKG_RELEASE"])
    assert "python-setuptools/host" in v["PKG_BUILD_DEPENDS"]  # as make reads it: tests/test_openwrt_imports.py
    assert "include $(TOPDIR)/feeds/packages/lang/python/python3-package.mk" in MAKEFILE
    assert "$(eval $(call Py3Package,osocks))" in MAKEFILE
    assert "$(eval $(call BuildPackage,osocks))" in MAKEFILE


def test_depends_are_exactly_the_runtime_eight() -> None:
    depends = variables(block(MAKEFILE, "Package/osocks"))["DEPENDS"].split()
    assert all(d.startswith("+") for d in depends)
    assert len(depends) == len(DEPENDS) and {d[1:] for d in depends} == DEPENDS


def test_uvloop_is_a_config_option_on_by_default() -> None:
    config = block(MAKEFILE, "Package/osocks/config")
    assert re.search(r"^config OSOCKS_UVLOOP\n\tbool .*\n\tdepends on PACKAGE_osocks\n\tdefault y\n", config, re.M)
    assert variables(MAKEFILE)["PKG_CONFIG_DEPENDS"].split() == ["CONFIG_OSOCKS_UVLOOP"]


def test_wheel_and_console_script_match_the_recipe() -> None:
    """The recipe installs osocks-<PKG_VERSION>-*.whl, its /usr/bin/osocks, from what Build/Prepare copies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == variables(MAKEFILE)["PKG_NAME"]
    assert "osocks" in project["project"]["scripts"]
    assert "$(PKG_INSTALL_DIR)/usr/bin/osocks $(1)/usr/bin/" in MAKEFILE
    prepare = block(MAKEFILE, "Build/Prepare")
    for needed in ("pyproject.toml", "src", project["project"].get("readme")):
        if needed:
            assert f"./{needed}" in prepare, f"Build/Prepare does not copy {needed}"
            assert (ROOT / needed).exists()


def test_every_file_is_installed_where_it_belongs() -> None:
    install = block(MAKEFILE, "Py3Package/osocks/install")
    expected = {
        "osocks.init": "$(INSTALL_BIN) ./files/osocks.init $(1)/etc/init.d/osocks",
        "osocks.config": "$(INSTALL_CONF) ./files/osocks.config $(1)/etc/config/osocks",
        "osocks.rpcd-acl.json": "$(INSTALL_DATA) ./files/osocks.rpcd-acl.json $(1)/usr/share/rpcd/acl.d/osocks.json",
        "osocks.ubus-acl.json": "$(INSTALL_DATA) ./files/osocks.ubus-acl.json $(1)/usr/share/acl.d/osocks.json",
    }
    assert sorted(p.name for p in (ROOT / "files").iterdir()) == sorted(expected)
    for line in expected.values():
        assert line in install


def test_conffiles() -> None:
    assert block(MAKEFILE, "Package/osocks/conffiles").split() == ["/etc/config/osocks"]


def test_user_osocks_everywhere() -> None:
    assert variables(block(MAKEFILE, "Package/osocks"))["USERID"] == "osocks:osocks"
    init = INIT.read_text()
    assert "procd_set_param user osocks" in init and "procd_set_param group osocks" in init
    assert json.loads((ROOT / "files" / "osocks.ubus-acl.json").read_text())["user"] == "osocks"


def test_ubus_acl_lets_osocks_publish_and_read_interfaces() -> None:
    acl = json.loads((ROOT / "files" / "osocks.ubus-acl.json").read_text())
    assert acl["publish"] == ["osocks", "osocks.luci"]
    assert acl["access"]["network.interface.*"]["methods"] == ["status"]


def test_rpcd_acl() -> None:
    acl = json.loads((ROOT / "files" / "osocks.rpcd-acl.json").read_text())
    (group,) = acl.values()
    # through rpcd's /ubus every call has ubus_rpc_session: only osocks.luci takes it (README, ubus.py)
    assert group["read"]["ubus"] == {"osocks.luci": ["status", "sessions"]}
    assert group["write"]["ubus"] == {"osocks.luci": ["reload"]}
    assert group["read"]["uci"] == group["write"]["uci"] == ["osocks"]


def test_init_script_and_config_agree_on_section_main() -> None:
    assert re.search(r"^config osocks 'main'$", (ROOT / "files" / "osocks.config").read_text(), re.M)
    assert "config_get_bool enabled main enabled 1" in INIT.read_text()
    assert INIT.read_text().startswith("#!/bin/sh /etc/rc.common\n")


# --- shell syntax -------------------------------------------------------------------------------

SHELLS = [["sh", "-n"]] + [cmd for cmd in (["dash", "-n"], ["busybox", "sh", "-n"]) if shutil.which(cmd[0])]


@pytest.mark.parametrize("script", [INIT, TEST_SH], ids=["osocks.init", "test.sh"])
@pytest.mark.parametrize("shell", SHELLS, ids=[" ".join(s[:-1]) for s in SHELLS])
def test_shell_syntax(shell: list[str], script: Path) -> None:
    result = subprocess.run([*shell, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize(
    "script",
    [INIT, TEST_SH, ROOT / "tests" / "run.sh", ROOT / ".ci" / "run"],
    ids=["osocks.init", "test.sh", "tests/run.sh", ".ci/run"],
)
def test_shellcheck(script: Path) -> None:
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- the init script, run with stand-ins for OpenWrt's shell functions ---------------------------

STUBS = """
config_load() { echo "config_load $*"; }
config_get_bool() { eval "$1=\\$ENABLED"; echo "config_get_bool $2 $3 $4"; }
config_get() { eval "$1=\\$INTERFACES"; echo "config_get $2 $3"; }
procd_open_instance() { echo "procd_open_instance"; }
procd_set_param() { echo "procd_set_param $*"; }
procd_close_instance() { echo "procd_close_instance"; }
procd_add_reload_trigger() { echo "procd_add_reload_trigger $*"; }
procd_add_interface_trigger() { echo "procd_add_interface_trigger $*"; }
chgrp() { echo "chgrp $*"; }
chmod() { echo "chmod $*"; }
ubus() { echo "ubus $*"; [ "$1" != list ] || [ -n "$UBUS_UP" ]; }
start() { echo "start"; }
stop() { echo "stop"; }
"""


def run_init(function: str, **env: str) -> list[str]:
    script = f"{STUBS}\n. '{INIT}'\n{function}\n"
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_init_start_service() -> None:
    assert run_init("start_service", ENABLED="1") == [
        "config_load osocks",
        "config_get_bool main enabled 1",
        "chgrp osocks /etc/config/osocks",
        "chmod 0640 /etc/config/osocks",
        "procd_open_instance",
        "procd_set_param command /usr/bin/osocks --uci osocks",
        "procd_set_param user osocks",
        "procd_set_param group osocks",
        "procd_set_param respawn",
        "procd_set_param limits nofile=16384 16384",  # osocks raises its soft limit to the hard one
        "procd_set_param stdout 1",
        "procd_set_param stderr 1",
        "procd_close_instance",
    ]


def test_init_disabled_starts_nothing() -> None:
    assert "procd_open_instance" not in run_init("start_service", ENABLED="0")


def test_init_triggers_follow_the_interfaces() -> None:
    assert run_init("service_triggers", INTERFACES="lan guest") == [
        "procd_add_reload_trigger osocks",
        "config_load osocks",
        "config_get main interface",
        "procd_add_interface_trigger interface.* lan /etc/init.d/osocks reload",
        "procd_add_interface_trigger interface.* guest /etc/init.d/osocks reload",
    ]
    assert run_init("service_triggers", INTERFACES="") == [
        "procd_add_reload_trigger osocks",
        "config_load osocks",
        "config_get main interface",
    ]


def test_init_reload_keeps_sessions_over_ubus() -> None:
    assert run_init("reload_service", UBUS_UP="1") == [
        "chgrp osocks /etc/config/osocks",
        "chmod 0640 /etc/config/osocks",
        "ubus call osocks reload",
        "start",
    ]


def test_init_reload_restarts_when_osocks_is_not_on_ubus() -> None:
    assert run_init("reload_service")[-2:] == ["stop", "start"]


# --- the uvloop recipe --------------------------------------------------------------------------


def test_uvloop_recipe() -> None:
    v = variables(UVLOOP_MAKEFILE)
    assert re.fullmatch(r"[0-9a-f]{64}", v["PKG_HASH"])
    assert v["PYPI_NAME"] == "uvloop" and re.fullmatch(r"\d+\.\d+\.\d+", v["PKG_VERSION"])
    depends = variables(block(UVLOOP_MAKEFILE, "Package/python3-uvloop"))["DEPENDS"].split()
    assert set(depends) == {
        "+python3-light",
        "+python3-asyncio",
        "+python3-logging",
        "+python3-codecs",
        "+python3-openssl",
        "+libuv",
    }
    assert v["PKG_LICENSE"].split() == ["Apache-2.0", "MIT"]  # OpenWrt splits on spaces: no "OR"
    assert MAINTAINER.fullmatch(v["PKG_MAINTAINER"])
    assert "python-cython/host" in v["PKG_BUILD_DEPENDS"] and "python-setuptools/host" in v["PKG_BUILD_DEPENDS"]
    assert "--build-option=--use-system-libuv" in v["PYTHON3_PKG_BUILD_CONFIG_SETTINGS"].split()
    assert "$(eval $(call BuildPackage,python3-uvloop))" in UVLOOP_MAKEFILE


# --- the optional GSSAPI recipes ---------------------------------------------------------------


def test_gssapi_recipes() -> None:
    """python3-gssapi (and decorator, which it imports) over the packages feed's krb5-libs; osocks itself
    does not depend on them: GSSAPI is optional (--gssapi-keytab says so when it is missing)."""
    gssapi = (ROOT / "feeds" / "python3-gssapi" / "Makefile").read_text()
    decorator = (ROOT / "feeds" / "python3-decorator" / "Makefile").read_text()
    for text, pypi, package, depends in (
        (gssapi, "gssapi", "python3-gssapi", {"+python3-light", "+python3-decorator", "+krb5-libs"}),
        (decorator, "decorator", "python3-decorator", {"+python3-light"}),
    ):
        v = variables(text)
        assert re.fullmatch(r"[0-9a-f]{64}", v["PKG_HASH"]) and v["PYPI_NAME"] == pypi
        assert re.fullmatch(r"\d+\.\d+\.\d+", v["PKG_VERSION"])
        assert set(variables(block(text, f"Package/{package}"))["DEPENDS"].split()) == depends
        assert f"$(eval $(call BuildPackage,{package}))" in text
    v = variables(gssapi)
    assert {"krb5", "python-cython/host"} <= set(v["PKG_BUILD_DEPENDS"].split())
    assert "GSSAPI_SUPPORT_DETECT=false" in v["PYTHON3_PKG_BUILD_VARS"]  # no dlopen of the target's library
    assert "--skip-dependency-check" in v["PYTHON3_PKG_BUILD_ARGS"].split()  # gssapi pins an exact Cython
    assert "python3-gssapi" not in variables(block(MAKEFILE, "Package/osocks"))["DEPENDS"]


# --- test.sh against the installed osocks (pip install -e .) ------------------------------------


def busybox_path(bin_dir: Path, hide_ubus: bool) -> str:
    """A PATH as on the router: busybox's applets, python3 and osocks of the package, ubus if present."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is not installed (tests/run.sh installs it)"
    bin_dir.mkdir()
    for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split():
        (bin_dir / applet).symlink_to(busybox)
    venv_bin = Path(sys.executable).parent  # where pip install -e . put the osocks script
    osocks_script = shutil.which("osocks", path=os.pathsep.join((str(venv_bin), os.environ["PATH"])))
    assert osocks_script, f"osocks is neither in {venv_bin} nor on PATH: pip install -e ."
    for name, target in (("python3", sys.executable), ("osocks", osocks_script)):
        (bin_dir / name).unlink(missing_ok=True)
        (bin_dir / name).write_text(f'#!{busybox} sh\nexec {target} "$@"\n')  # a venv's python needs its path
        (bin_dir / name).chmod(0o755)
    if not hide_ubus:
        for name in ("ubus", "ubusd"):
            found = shutil.which(name)
            if found:
                (bin_dir / name).unlink(missing_ok=True)
                (bin_dir / name).symlink_to(found)
    return str(bin_dir)


def run_test_sh(
    tmp_path: Path, *args: str, hide_ubus: bool = False, with_uvloop: bool = False, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """test.sh as the packages-feed CI runs it on the router: busybox sh with only busybox's applets,
    and python3 with only the standard library the package's DEPENDS install (tests/openwrt/guard),
    and python3-uvloop if asked for."""
    release = split.release_for_running_python()
    env = {**os.environ, "PATH": busybox_path(tmp_path / "bin", hide_ubus)}
    if release is not None:  # for python3-uvloop: its own DEPENDS alone
        if args[0] == "python3-uvloop":  # uvloop itself, also in the suite's stock-loop pass
            hidden = str(ROOT / "tests" / "no_uvloop")
            env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p != hidden)
            packages = release.closure(["python3-uvloop"], split.feed_recipes())
        else:
            packages = split.installed(release, split.DEFAULT_CONFIG if with_uvloop else ())
        env = split.guard_env(packages, release, tmp_path / "refused.log", env)
    busybox = shutil.which("busybox") or "busybox"
    argv = [*prefix, busybox, "sh", str(TEST_SH), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


UBUS_RUN_DIR = Path("/var/run/ubus")  # where test.sh starts its ubusd (libubus' default socket)


def private_ubus_run_dir() -> tuple[str, ...]:
    """A prefix that runs a command in a mount namespace of its own with an empty UBUS_RUN_DIR:
    the ubusd it starts is seen by no other process (a ubusd or an osocks of this host); () when
    that needs root or util-linux's unshare that are not here."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if os.geteuid() != 0 or unshare is None or mount is None:
        return ()
    UBUS_RUN_DIR.mkdir(parents=True, exist_ok=True)
    script = f'{mount} -t tmpfs osocks-test "{UBUS_RUN_DIR}" && exec "$@"'
    return (unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh")


@pytest.mark.parametrize("with_uvloop", [False, True], ids=["as-depends", "with-python3-uvloop"])
def test_test_sh_without_ubus(tmp_path: Path, with_uvloop: bool) -> None:
    result = run_test_sh(tmp_path, "osocks", osocks.__version__, hide_ubus=True, with_uvloop=with_uvloop)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        "echoed: hello through osocks",
        "udp echoed: echo:datagram",
        "bob logs in",
        "ubus: not available, skipping status check",
    ):
        assert line in result.stdout
    assert "-w 2" in result.stdout and result.stdout.rstrip().endswith("PASS")


def other_osocks() -> bool:
    """Whether some process runs osocks (it would take the ubus object "osocks")."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg == b"osocks" or arg.endswith(b"/osocks") for arg in argv[:3]):
            return True
    return False


@pytest.mark.skipif(shutil.which("ubusd") is None, reason="ubusd is not installed (OpenWrt only)")
def test_test_sh_with_ubus(tmp_path: Path) -> None:
    """test.sh starts its own ubusd; one already running may carry another osocks."""
    if shutil.which("ubus") is None:
        pytest.skip("ubus is not installed (OpenWrt only)")
    if importlib.util.find_spec("ubus") is None:
        pytest.skip("python-ubus is not installed (OpenWrt only): osocks could not publish its status")
    private = private_ubus_run_dir()
    if not private:  # then test.sh's ubusd is this host's: no other may run, and no other osocks
        if subprocess.run(["ubus", "list"], capture_output=True, timeout=10).returncode == 0:
            pytest.skip("a ubusd is already running: its osocks object may belong to another process")
        deadline = time.monotonic() + 5  # an osocks of an earlier test may still be exiting
        while other_osocks() and time.monotonic() < deadline:
            time.sleep(0.1)
        if other_osocks():
            pytest.skip("another osocks is running: it would register on the ubusd test.sh starts")
    result = run_test_sh(tmp_path, "osocks", osocks.__version__, prefix=private)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== ubus call osocks status" in result.stdout and "carol logs in" in result.stdout
    assert result.stdout.rstrip().endswith("PASS")


def test_test_sh_checks_the_version(tmp_path: Path) -> None:
    result = run_test_sh(tmp_path, "osocks", "0.0.0-not-this", hide_ubus=True)
    assert result.returncode != 0 and "FAIL: osocks -V: expected 'osocks 0.0.0-not-this'" in result.stderr


def test_test_sh_ignores_other_packages() -> None:
    result = subprocess.run(["sh", str(TEST_SH), "osocks-src", "0.1.0"], capture_output=True, timeout=10)
    assert result.returncode == 0 and not result.stdout


def test_test_sh_of_python3_uvloop_with_its_own_depends(tmp_path: Path) -> None:
    """The packages-feed CI runs test.sh for python3-uvloop too: a name lookup on its loop needs only its DEPENDS."""
    result = run_test_sh(tmp_path, "python3-uvloop", "0.22.1", hide_ubus=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "localhost is" in result.stdout and "echoed ping" in result.stdout
    assert result.stdout.rstrip().endswith("PASS")
