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
if [ -z "$SUDO" ]; then
    exec python -m pytest "$@"
fi
# as root, without leaving root-owned caches in the checkout
exec sudo env PATH="$PATH" CI="${CI:-}" PYTHONDONTWRITEBYTECODE=1 python -m pytest -p no:cacheprovider "$@"
