#!/bin/sh
# Installs everything the tests need on Debian/Ubuntu, then runs them.
# Arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    python3-venv python3-pip curl nginx-light privoxy apache2-utils \
    microsocks dante-server iproute2 dash busybox procps >/dev/null
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
PATH="$PWD/.venv/bin:$PATH"
export PATH
exec python -m pytest "$@"
