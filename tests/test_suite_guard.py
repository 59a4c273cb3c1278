"""The suite guards itself: with CI set a skip fails unless the missing piece cannot exist here,
and the linters run as tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci_skips import skip_allowed_in_ci
from conftest import ROOT

PROBE = """
import pytest

def test_needs_a_debian_package():
    pytest.skip("shellcheck is not installed")

def test_needs_openwrt():
    pytest.skip("python-ubus not installed (OpenWrt only)")

@pytest.mark.xfail(strict=True)
def test_expected_to_fail():
    assert False
"""


@pytest.mark.parametrize(
    ("reason", "allowed"),
    [
        ("OpenWrt only, not installed here: ubusd, ubus, python-ubus, pyuci", True),
        ("pyuci (modules euci, uci) is not importable", True),
        ("no KDC on this machine", False),  # Debian has krb5-kdc; tests/kerberos.py makes the realm
        ("shellcheck is not installed", False),
        ("network namespace tests need root (ip netns add)", False),
        ("this machine has a syslog socket", False),
        ("the hard fd limit (1024) holds only 480 sessions", False),
        ("ubusdx is not installed", False),
    ],
)
def test_which_skips_ci_allows(reason: str, allowed: bool) -> None:
    assert skip_allowed_in_ci(reason) is allowed


MODULE_PROBES = {  # whole modules skipped while collected
    "test_module_needs_a_pip_package.py": 'import pytest\npytest.importorskip("no_such_module", reason="not here")\n',
    "test_module_needs_openwrt.py": 'import pytest\npytest.skip("pyuci is not importable", allow_module_level=True)\n',
}
HOOKS = "from ci_skips import pytest_make_collect_report, pytest_runtest_makereport"


def run_probes(tmp_path: Path, files: dict[str, str], ci: str) -> str:
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n{HOOKS}\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    return done.stdout


@pytest.mark.parametrize(("ci", "summary"), [("true", "1 failed, 1 skipped, 1 xfailed"), ("", "2 skipped, 1 xfailed")])
def test_a_skip_fails_under_ci(tmp_path: Path, ci: str, summary: str) -> None:
    output = run_probes(tmp_path, {"test_probe.py": PROBE}, ci)
    assert summary in output, output
    assert ("skipped with CI set: shellcheck is not installed" in output) is bool(ci)


@pytest.mark.parametrize(("ci", "summary"), [("true", "1 skipped, 1 error"), ("", "2 skipped")])
def test_a_skipped_module_fails_under_ci(tmp_path: Path, ci: str, summary: str) -> None:
    """A collection error: pytest stops there, as it does for a module that does not import."""
    output = run_probes(tmp_path, MODULE_PROBES, ci)
    assert summary in output, output
    assert ("ERROR test_module_needs_a_pip_package.py - skipped with CI set: not here" in output) is bool(ci)


def tool(name: str) -> str:
    """A linter from the test extras, next to this Python (the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


def test_ruff_is_clean() -> None:
    done = subprocess.run(
        [tool("ruff"), "check", "src", "tests", "bench"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = subprocess.run([tool("mypy"), "src"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
