"""With CI set, a skipped test fails unless its reason names a piece that cannot exist on a CI
host: everything else the suite needs is installed by tests/run.sh, so a skip would hide a test
that never ran.  conftest.py imports the hook."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

# OpenWrt's own pieces are in no package registry: a skip whose reason names one of these is a
# true skip, even in CI.  (A KDC is not one: Debian's krb5-kdc, and tests/kerberos.py makes the realm.)
CANNOT_EXIST_HERE = ("ubusd", "ubus", "python-ubus", "libubus", "pyuci", "libuci", "procd", "rpcd", "LuCI")
_CANNOT_EXIST = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, CANNOT_EXIST_HERE)) + r")(?![\w-])", re.I)


def skip_allowed_in_ci(reason: str) -> bool:
    return _CANNOT_EXIST.search(reason) is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    _fail_if_not_allowed(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped (pytest.importorskip, pytest.skip(allow_module_level=True))."""
    outcome = yield
    _fail_if_not_allowed(outcome.get_result())  # type: ignore[attr-defined]


def _fail_if_not_allowed(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not skip_allowed_in_ci(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped with CI set: {reason}\n"
            f"only a piece that cannot exist on a CI host may skip ({', '.join(CANNOT_EXIST_HERE)}); "
            "install what this test needs in tests/run.sh"
        )
