#!/bin/sh
# Runtime test, as the packages-feed CI runs it once per built package:
#   sh test.sh PKG_NAME PKG_VERSION
# osocks must be on PATH. Needs only busybox and python3 (no curl).
set -e

case "$1" in
osocks) ;;
*) exit 0 ;;
esac

VERSION="$2"
PORT=$((18080 + $$ % 1000))
TMP=$(mktemp -d)
PIDS=""

cleanup() {
	for pid in $PIDS; do
		kill "$pid" 2>/dev/null || true
	done
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

fail() {
	echo "FAIL: $*" >&2
	if [ -s "$TMP/osocks.log" ]; then
		echo "--- osocks output:" >&2
		cat "$TMP/osocks.log" >&2
	fi
	exit 1
}

echo "== osocks -V"
out=$(osocks -V 2>&1) || fail "osocks -V exited with status $?: $out"
echo "$out"
case "$(echo "$out" | head -n 1)" in
"osocks $VERSION" | "osocks $VERSION "*) ;;
*) fail "osocks -V: expected 'osocks $VERSION'" ;;
esac

# ubusd first, so that osocks finds it when it starts
UBUS=""
if command -v ubus >/dev/null 2>&1; then
	if ubus list >/dev/null 2>&1; then
		UBUS=1
	elif command -v ubusd >/dev/null 2>&1; then
		echo "== starting ubusd"
		mkdir -p /var/run/ubus
		ubusd >"$TMP/ubusd.log" 2>&1 &
		PIDS="$PIDS $!"
		i=0
		until ubus list >/dev/null 2>&1; do
			i=$((i + 1))
			[ "$i" -le 20 ] || fail "ubusd did not start: $(cat "$TMP/ubusd.log")"
			sleep 1
		done
		UBUS=1
	fi
fi

echo "== echo server on 127.0.0.1"
python3 -c '
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    c, _ = s.accept()
    with c:
        while data := c.recv(65536):
            c.sendall(data)
' "$TMP/echo.port" &
PIDS="$PIDS $!"
i=0
until [ -s "$TMP/echo.port" ]; do
	i=$((i + 1))
	[ "$i" -le 60 ] || fail "echo server did not start"
	sleep 1
done
ECHO_PORT=$(cat "$TMP/echo.port")

echo "== osocks --no-uci -l 127.0.0.1 -p $PORT --allow-local"
osocks --no-uci -l 127.0.0.1 -p "$PORT" --allow-local >"$TMP/osocks.log" 2>&1 &
PIDS="$PIDS $!"

echo "== SOCKS5 CONNECT through osocks to the echo server on port $ECHO_PORT"
python3 -c '
import socket, struct, sys, time

proxy, target = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 60  # slow under qemu-user
while True:
    try:
        s = socket.create_connection(("127.0.0.1", proxy), timeout=10)
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"cannot connect to osocks on port {proxy}: {e}")
        time.sleep(0.2)

def recv(n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            sys.exit(f"osocks closed the connection after {data!r}")
        data += chunk
    return data

s.sendall(b"\x05\x01\x00")
if recv(2) != b"\x05\x00":
    sys.exit("osocks refused the no-authentication method")
s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", target))
version, reply, _, kind = recv(4)
if version != 5 or reply != 0:
    sys.exit(f"CONNECT failed: version {version}, reply code {reply}")
recv({1: 4, 4: 16}[kind] + 2)
payload = b"hello through osocks"
s.sendall(payload)
echoed = recv(len(payload))
if echoed != payload:
    sys.exit(f"echoed {echoed!r}, expected {payload!r}")
print("echoed:", echoed.decode())
' "$PORT" "$ECHO_PORT" || fail "SOCKS5 CONNECT through osocks"

if [ -n "$UBUS" ]; then
	echo "== ubus call osocks status"
	i=0
	until status=$(ubus call osocks status 2>&1); do
		i=$((i + 1))
		[ "$i" -le 20 ] || fail "ubus call osocks status: $status"
		sleep 1
	done
	echo "$status"
	echo "$status" | grep '"sessions"' || fail "ubus status has no \"sessions\""
	echo "$status" | grep -E "\"port\": $PORT([^0-9]|\$)" || fail "ubus object osocks is not this osocks (port $PORT)"
else
	echo "ubus: not available, skipping status check"
fi

echo "PASS"
