"""OpenWrt's standard library split into python3-* packages (python3-packages.toml), and what our
recipes' DEPENDS install: which package a module comes from, and the closure of a package list.

Loaded by the tests and, by path, by guard/sitecustomize.py inside the processes it guards: it
imports only modules that python3-light installs.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TABLE = HERE / "python3-packages.toml"
GUARD_DIR = HERE / "guard"
RECIPES = {"osocks": ROOT / "Makefile", "python3-uvloop": ROOT / "feeds" / "python3-uvloop" / "Makefile"}

# Top-level modules outside the standard library, by the package that installs them on OpenWrt
SITE_PACKAGES = {
    "osocks": "osocks",
    "uvloop": "python3-uvloop",
    "ubus": "python3-ubus",
    "uci": "python3-uci",
    "euci": "python3-uci",
}
ALWAYS = {"sitecustomize", "usercustomize", "__main__"}  # names the interpreter itself looks up


def _module_pattern(path: str) -> str:
    """A filespec path (relative to the stdlib directory) as a dotted module name or fnmatch pattern."""
    path = path.removeprefix("lib-dynload/")
    path = re.sub(r"(/__init__)?\.(py|so)$", "", path)
    return path.replace("/", ".")


@dataclass(frozen=True)
class Package:
    name: str
    depends: tuple[str, ...]
    modules: tuple[str, ...]  # module names or fnmatch patterns; a package name covers its submodules
    files: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    name: str
    commit: str
    python: str
    packages: dict[str, Package]
    not_installed: tuple[str, ...]  # light_excludes: modules no package installs
    host_python_setuptools: str  # the setuptools the host Python bundles; "" when it bundles none
    light_excludes_files: tuple[str, ...] = ()  # light_excludes as paths

    def owner(self, module: str) -> str | None:
        """The package installing stdlib module `module`; None when no package installs it."""
        best: tuple[int, str] | None = None
        for package in self.packages.values():
            for pattern in package.modules:
                if _covers(pattern, module) and (best is None or len(pattern) > best[0]):
                    best = (len(pattern), package.name)
        if best is not None:
            return best[1]
        if any(_covers(pattern, module) for pattern in self.not_installed):
            return None
        return "python3-light"

    def closure(self, names: Iterable[str], recipes: dict[str, list[str]], conditions: Iterable[str] = ()) -> set[str]:
        """`names` and everything their DEPENDS pull in, through this release's packages and our recipes;
        a dependency COND:pkg counts only where COND is in `conditions` (a config symbol set to y)."""
        found: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in found:
                continue
            found.add(name)
            depends = recipes[name] if name in recipes else self.packages[name].depends if name in self.packages else ()
            for depend in depends:
                condition, _, package = depend.rpartition(":")
                if not condition or condition in conditions:
                    todo.append(package)
        return found


def _covers(pattern: str, module: str) -> bool:
    return module == pattern or module.startswith(pattern + ".") or fnmatch.fnmatchcase(module, pattern)


def releases() -> dict[str, Release]:
    table = tomllib.loads(TABLE.read_text())
    found = {}
    for name, branch in table["branch"].items():
        packages = {
            pkg: Package(pkg, tuple(p["depends"]), tuple(_module_pattern(f) for f in p["files"]), tuple(p["files"]))
            for pkg, p in branch["packages"].items()
        }
        excluded = tuple(_module_pattern(f) for f in branch["light_excludes"])
        found[name] = Release(
            name,
            branch["commit"],
            branch["python"],
            packages,
            excluded,
            branch["host_python_setuptools"],
            tuple(branch["light_excludes"]),
        )
    return found


def release_for_running_python() -> Release | None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return next((r for r in releases().values() if r.python == version), None)


# -- our recipes ---------------------------------------------------------------------------------


def recipe_depends(text: str, package: str) -> list[str]:
    """The DEPENDS of `define Package/<package>`, without the '+'."""
    text = re.sub(r"\\\n\s*", " ", text)
    block = re.search(rf"^define Package/{re.escape(package)}\n(.*?)^endef", text, re.M | re.S)
    if block is None:
        raise ValueError(f"no 'define Package/{package}'")
    line = re.search(r"^\s*DEPENDS\s*:?=(.*)$", block[1], re.M)
    return [d.lstrip("+") for d in line[1].split()] if line else []


def feed_recipes(overrides: dict[str, str] | None = None) -> dict[str, list[str]]:
    """DEPENDS of our two recipes, read from their Makefiles (or from `overrides`: package -> Makefile text)."""
    overrides = overrides or {}
    return {pkg: recipe_depends(overrides.get(pkg) or path.read_text(), pkg) for pkg, path in RECIPES.items()}


DEFAULT_CONFIG = ("OSOCKS_UVLOOP",)  # config symbols of our recipes that default to y


def installed(release: Release, conditions: Iterable[str] = DEFAULT_CONFIG) -> set[str]:
    """What installing osocks from our feed puts on a router of `release`, built with `conditions` set."""
    return release.closure(["osocks"], feed_recipes(), conditions)


def guard_env(
    packages: set[str], release: Release, log: Path | None = None, base: dict[str, str] | None = None
) -> dict:
    """Environment for a process that may import only what `packages` install (see guard/sitecustomize.py)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD_DIR), env.get("PYTHONPATH", "")) if p)
    env["OPENWRT_RELEASE"] = release.name
    env["OPENWRT_PACKAGES"] = " ".join(sorted(packages))
    if log is not None:
        env["OPENWRT_GUARD_LOG"] = str(log)
    return env


def find_python(version: str) -> str | None:
    """An interpreter of Python `version` here: the running one, pythonX.Y on PATH, or one pyenv installed."""
    import glob  # here, not above: the guard loads this module into the processes it guards
    import shutil
    import subprocess

    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    pyenv = Path.home() / ".pyenv" / "versions"
    candidates = [shutil.which(f"python{version}"), *sorted(glob.glob(f"{pyenv}/{version}.*/bin/python{version}"))]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None
