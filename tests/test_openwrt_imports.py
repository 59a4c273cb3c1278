"""Every module osocks and uvloop import (lazy imports too) comes with a package their recipes'
DEPENDS install on OpenWrt 24.10 and 25.12, read from the sources (tests/openwrt/imports.py) and
the package split (tests/openwrt/python3-packages.toml). The guarded run of the real process is
tests/test_openwrt_stdlib.py; this one needs no process and names the missing package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from openwrt import imports, split
from openwrt.imports import ForeignStdlib, Need, Stdlib

ROOT = split.ROOT
RELEASES = split.releases()
SOURCES = ROOT / "src" / "osocks"


@cache
def stdlib_of(version: str) -> tuple[Stdlib | ForeignStdlib, str]:
    """The sources of Python `version` when it is here, else those of the running Python (and a note)."""
    python = split.find_python(version)
    if python == sys.executable:
        return Stdlib.running(), ""
    if python is None:  # this Python's sources, but what needs a C module from some version on as `version`
        here, running = sys.version.split()[0], Stdlib.running()
        major, minor = (int(x) for x in version.split("."))
        note = f" (Python {version} is not here: its imports were read from Python {here})"
        return Stdlib(running.directory, (major, minor), running.names), note
    return ForeignStdlib(python), ""


def osocks_needs() -> list[Need]:
    return imports.package_needs(SOURCES, "osocks", ROOT)


def uvloop_needs() -> list[Need]:
    uvloop = pytest.importorskip("uvloop")
    directory = Path(uvloop.__file__).parent
    if not list(directory.glob("*.pyx")):
        pytest.skip(f"uvloop at {directory} has no Cython sources to read (an OpenWrt install strips them)")
    needs = imports.package_needs(directory, "uvloop", directory.parent)
    return [need for need in needs if not need.where.startswith("uvloop/_testbase.py")]  # for uvloop's own tests


def problems(release: split.Release, recipe: str, needs: list[Need], installed: set[str]) -> list[str]:
    """One line per need that the packages in `installed` leave unmet, naming the package that would meet it."""
    stdlib, note = stdlib_of(release.python)
    version = stdlib.version
    makefile = split.RECIPES[recipe].relative_to(ROOT)
    needs = [need for need in needs if not need.optional]
    stdlib.prepare({n.module.rstrip("?").split("@")[0] for n in needs})
    found = []
    for need in needs:
        module = need.module
        if module.endswith("?"):  # `from X import Y`: Y may be a submodule
            module = module[:-1]
            if not stdlib.is_stdlib(module) or not stdlib.exists(module):
                continue
        if "@" in module:  # an attribute that needs an optional C module from some Python on
            module, since = module.split("@")
            if version < tuple(int(x) for x in since.split(".")):
                continue
        top = module.partition(".")[0]
        if top == recipe.removeprefix("python3-") or top == "osocks":
            continue  # the package's own modules
        if not stdlib.is_stdlib(module):
            owner = split.SITE_PACKAGES.get(top)
            if owner is None:
                found.append(
                    f"{need.where}: {need.why}: no OpenWrt package we know installs {top!r}; make the import "
                    f"optional (try/except ImportError with a clear error) or name its package in "
                    f"tests/openwrt/split.py SITE_PACKAGES and in DEPENDS of {makefile}"
                )
            elif owner not in installed:
                found.append(f"{need.where}: {need.why}: needs {owner}: add +{owner} to DEPENDS of {makefile}")
            continue
        reported = set()
        for chain in stdlib.chains(module):
            owner = release.owner(chain[-1])
            if owner in installed or owner in reported:
                continue
            reported.add(owner)
            via = " -> ".join(chain)
            if owner is None:
                found.append(f"{need.where}: {need.why}: {via}: OpenWrt {release.name} installs no {chain[-1]}{note}")
            else:
                found.append(
                    f"{need.where}: {need.why}: {via}: {chain[-1]} is in {owner} on OpenWrt {release.name}: "
                    f"add +{owner} to DEPENDS of {makefile}{note}"
                )
    return sorted(set(found))


def own_closure(release: split.Release, recipe: str) -> set[str]:
    """What the recipe's own DEPENDS install, not counting what the other recipe of ours pulls in."""
    recipes = split.feed_recipes()
    mine = {recipe: recipes[recipe], **{other: [] for other in recipes if other != recipe}}
    return release.closure([recipe], mine)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_osocks_imports_are_in_its_own_depends(name: str) -> None:
    """osocks' own needs (hashes: python3-openssl) are met by its DEPENDS, not by uvloop's."""
    release = RELEASES[name]
    found = problems(release, "osocks", osocks_needs(), own_closure(release, "osocks"))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_uvloop_imports_are_in_its_depends(name: str) -> None:
    release = RELEASES[name]
    found = problems(release, "python3-uvloop", uvloop_needs(), own_closure(release, "python3-uvloop"))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("recipe", sorted(split.RECIPES))
@pytest.mark.parametrize("name", sorted(RELEASES))
def test_every_python_dependency_is_needed(name: str, recipe: str) -> None:
    """No python3-* in DEPENDS that nothing imports (a leftover costs flash on every router)."""
    release = RELEASES[name]
    stdlib, _ = stdlib_of(release.python)
    needs = osocks_needs() if recipe == "osocks" else uvloop_needs()
    stdlib.prepare({n.module.rstrip("?").split("@")[0] for n in needs})
    used = {"python3-light"}
    for need in needs:
        module = need.module.rstrip("?").split("@")[0]
        if stdlib.is_stdlib(module):
            used |= {release.owner(chain[-1]) or "" for chain in stdlib.chains(module)}
        else:
            used.add(split.SITE_PACKAGES.get(module.partition(".")[0], ""))
    declared = {d.rpartition(":")[2] for d in split.feed_recipes()[recipe]} - {""}
    declared = {d for d in declared if d.startswith("python3-")}
    assert declared - used == set(), (
        f"DEPENDS of {split.RECIPES[recipe].relative_to(ROOT)} names packages nothing imports"
    )


def test_the_analysis_sees_what_broke_names_and_hashes() -> None:
    """Without python3-codecs a name lookup fails; on 25.12 without python3-openssl so does pbkdf2."""
    release = RELEASES["25.12"]
    installed = release.closure(["python3-light", "python3-asyncio", "python3-logging"], {})
    found = "\n".join(problems(release, "osocks", osocks_needs(), installed))
    assert re.search(
        r"a host name lookup \(the idna codec\): encodings.idna( -> \S+)* -> unicodedata: "
        r"unicodedata is in python3-codecs",
        found,
    )
    assert re.search(r"src/osocks/auth.py:\d+: hashlib.pbkdf2_hmac: _hashlib: _hashlib is in python3-openssl", found)
    assert re.search(r"src/osocks/auth.py:\d+: hashlib.scrypt: _hashlib: _hashlib is in python3-openssl", found)
    found_2410 = "\n".join(problems(RELEASES["24.10"], "osocks", osocks_needs(), installed))
    assert "hashlib.pbkdf2_hmac" not in found_2410 and "hashlib.scrypt: _hashlib" in found_2410


def test_lazy_imports_count(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import decimal\n"
        "def f():\n    import sqlite3\n"
        "try:\n    import lzma\nexcept ImportError:\n    lzma = None\n"
        "import importlib\nimportlib.import_module('curses')\n"
        "import contextlib\nwith contextlib.suppress(ImportError):\n    import uuid\n"
    )
    needs = imports.python_needs(source, "pkg", "m.py")
    required = {need.module for need in needs if not need.optional}
    assert {"sqlite3", "curses", "typing", "importlib"} <= required
    assert "decimal" not in {need.module for need in needs}
    assert "lzma" not in required and "lzma" in {need.module for need in needs}
    assert "uuid" not in required


@pytest.mark.parametrize(("attribute", "fact"), sorted(imports.USES_NEEDING.items()))
def test_uses_needing_match_the_pythons_here(attribute: tuple[str, str], fact: tuple[str, tuple[int, int]]) -> None:
    """The table's facts, checked on every Python of the two releases that is on this machine."""
    module, name = attribute
    backend, since = fact
    probe = f"import sys; sys.modules[{backend!r}] = None; import {module}; print(hasattr({module}, {name!r}))"
    checked = 0
    for release in RELEASES.values():
        python = split.find_python(release.python)
        if python is None:
            continue
        result = subprocess.run([python, "-W", "ignore", "-c", probe], capture_output=True, text=True, timeout=30)
        version = tuple(int(x) for x in release.python.split("."))
        assert result.stdout.strip() == str(version < since), f"Python {release.python}: {result.stderr}"
        checked += 1
    assert checked, "no Python of either release here"


# -- the recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_recipes_depend_on_codecs_and_openssl(name: str) -> None:
    installed = split.installed(RELEASES[name])
    assert {"python3-codecs", "python3-openssl", "python3-logging", "python3-uvloop"} <= installed
    for recipe in split.RECIPES:
        depends = split.feed_recipes()[recipe]
        assert "python3-codecs" in depends and "python3-openssl" in depends and "python3-logging" in depends


MAKE_BUILD_DEPENDS = """
include $(RECIPE_LINES)
all:
\t@echo '$(strip $(PKG_BUILD_DEPENDS))'
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
@pytest.mark.parametrize("recipe", sorted(split.RECIPES))
@pytest.mark.parametrize("name", sorted(RELEASES))
def test_build_depends_name_host_packages_the_release_has(tmp_path: Path, name: str, recipe: str) -> None:
    """make reads PKG_BUILD_DEPENDS as the SDK would: python-setuptools/host only where that package
    has a host build (25.12); 24.10's host Python bundles setuptools."""
    release = RELEASES[name]
    version_mk = tmp_path / "feeds" / "packages" / "lang" / "python" / "python3-version.mk"
    version_mk.parent.mkdir(parents=True)
    major, minor = release.python.split(".")
    lines = [f"PYTHON3_VERSION_MAJOR:={major}", f"PYTHON3_VERSION_MINOR:={minor}"]
    if release.host_python_setuptools:
        lines.append(f"PYTHON3_SETUPTOOLS_VERSION:={release.host_python_setuptools}")
    version_mk.write_text("\n".join(lines) + "\n")
    text = split.RECIPES[recipe].read_text()
    head = text[: text.index("include $(INCLUDE_DIR)/package.mk")]
    head = "\n".join(line for line in head.splitlines() if not line.startswith("include $(TOPDIR)/rules.mk"))
    head = head.replace("include $(TOPDIR)/feeds/packages/lang/python/pypi.mk", "")
    (tmp_path / "recipe.mk").write_text(head + "\n")
    (tmp_path / "Makefile").write_text(MAKE_BUILD_DEPENDS)
    out = subprocess.run(
        ["make", "-s", "-C", str(tmp_path), f"TOPDIR={tmp_path}", f"RECIPE_LINES={tmp_path / 'recipe.mk'}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    build_depends = out.stdout.split()
    assert ("python-setuptools/host" in build_depends) == (not release.host_python_setuptools)
    if recipe == "python3-uvloop":
        assert "python-cython/host" in build_depends


def test_feeds_readme_lists_what_gets_installed() -> None:
    """feeds/README.md's table names every package that installing osocks pulls in, on both releases."""
    text = (ROOT / "feeds" / "README.md").read_text()
    section = text[text.index("## What gets installed") :]
    section = section[: section.index("\n## ")]
    rows = {m[1] for m in re.finditer(r"^\| ([a-z0-9][a-z0-9-]+) \|", section, re.M)} - {"package"}  # the header
    also = section[section.index("Also installed") :]
    for release in RELEASES.values():
        installed = split.installed(release)
        python = {p for p in installed if p.startswith(("python3-", "libpython3")) or p == "osocks"}
        assert rows == python, f"OpenWrt {release.name}: the table has {sorted(rows)}, osocks pulls in {sorted(python)}"
        missing = [p for p in installed - python if p not in also]
        assert not missing, f"OpenWrt {release.name}: 'Also installed' misses {missing}"
