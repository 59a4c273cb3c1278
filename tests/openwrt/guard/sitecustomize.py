"""Python as OpenWrt installs it: a module that the installed python3-* packages lack fails to import.

With this directory first on PYTHONPATH, the interpreter imports this module at start-up. It reads
  OPENWRT_RELEASE    24.10 or 25.12 (the table in ../python3-packages.toml)
  OPENWRT_PACKAGES   the installed packages, space separated (split.installed() computes them)
  OPENWRT_GUARD_LOG  optional: a file that gets one line per refused import
and puts a finder first on sys.meta_path that refuses every standard-library module installed by a
package outside OPENWRT_PACKAGES (or by none), and every other top-level module that is not one of
the feed packages there (osocks, uvloop, ubus, pyuci). Modules imported before it (by site.py) are
dropped from sys.modules when refused, so that importing them again fails too.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _load_split():  # type: ignore[no-untyped-def]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "split.py")
    spec = importlib.util.spec_from_file_location("_openwrt_split", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    return module


class OpenWrtPackages:
    """Meta-path finder: refuses what the installed packages do not install."""

    def __init__(self, release, packages: set[str], log_path: str | None) -> None:  # type: ignore[no-untyped-def]
        self.release = release
        self.packages = packages
        self.log_path = log_path
        self.site_packages = split.SITE_PACKAGES
        self.always = split.ALWAYS
        self.stdlib = set(sys.stdlib_module_names)

    def refusal(self, name: str) -> str | None:
        """Why `name` would not import on the router; None when it would."""
        top = name.partition(".")[0]
        if top in self.always or top == "_openwrt_split":
            return None
        if top in self.stdlib or top.startswith("_sysconfigdata_"):
            owner = self.release.owner(name)
            if owner is None:
                return f"OpenWrt {self.release.name} installs no {name}"
            if owner not in self.packages:
                return f"OpenWrt {self.release.name} installs {name} with {owner}, which is not installed"
            return None
        owner = self.site_packages.get(top)
        if owner is None:
            return f"{top} is not an OpenWrt package osocks depends on"
        if owner not in self.packages:
            return f"{top} comes with {owner}, which is not installed"
        return None

    def find_spec(self, name: str, path=None, target=None):  # type: ignore[no-untyped-def]
        reason = self.refusal(name)
        if reason is None:
            return None
        self.note(name, reason)
        raise ModuleNotFoundError(f"No module named {name!r} ({reason})", name=name)

    def note(self, name: str, reason: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"{os.getpid()} {name}: {reason}\n")


def install() -> None:
    release = split.releases()[os.environ["OPENWRT_RELEASE"]]
    packages = set(os.environ.get("OPENWRT_PACKAGES", "").split())
    finder = OpenWrtPackages(release, packages, os.environ.get("OPENWRT_GUARD_LOG"))
    sys.meta_path.insert(0, finder)
    for name in list(sys.modules):
        if finder.refusal(name) is not None:
            del sys.modules[name]


if os.environ.get("OPENWRT_RELEASE"):
    split = _load_split()
    install()
