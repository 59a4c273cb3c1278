#!/bin/sh
# Installs everything the tests need on Debian/Ubuntu (apt-get), then runs them.
# Arguments go to pytest.  pytest runs as root (through sudo when needed): the
# network namespace tests need it.
set -eu
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    python3-venv python3-pip curl nginx-light privoxy apache2-utils \
    microsocks dante-server iproute2 dash busybox procps shellcheck nodejs \
    krb5-kdc krb5-admin-server krb5-user libkrb5-dev python3-dev gcc >/dev/null
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
PATH="$PWD/.venv/bin:$PATH"
export PATH
run_pytest() {
    if [ -z "$SUDO" ]; then
        python -m pytest "$@"
    else  # as root, without leaving root-owned caches in the checkout
        sudo env PATH="$PATH" CI="${CI:-}" OSOCKS_TEST_LOOP="${OSOCKS_TEST_LOOP:-}" PYTHONDONTWRITEBYTECODE=1 \
            python -m pytest -p no:cacheprovider "$@"
    fi
}
run_pytest "$@"
# Again on the stock asyncio loop, as where python3-uvloop is not installed (osocks only recommends
# it: feeds/README.md): the in-thread servers use asyncio's loop and every process the tests start
# finds no uvloop (tests/conftest.py). Left out, as they run no event loop of osocks: the benchmark
# smoke runs (the benchmark measures the default, uvloop), the lint and skip-policy checks, the
# static import analysis, the codec, the README, LuCI's views, the package files (test.sh is run
# with and without python3-uvloop in the first pass); and every test parametrized by event loop
# (conftest.py), which the first pass ran on both.
OSOCKS_TEST_LOOP=asyncio
export OSOCKS_TEST_LOOP
run_pytest "$@" --ignore=tests/test_bench_smoke.py --ignore=tests/test_suite_guard.py \
    --ignore=tests/test_openwrt_imports.py --ignore=tests/test_socks5.py --ignore=tests/test_readme.py \
    --ignore=tests/test_luci_app.py --ignore=tests/test_luci_browser.py --ignore=tests/test_package.py
