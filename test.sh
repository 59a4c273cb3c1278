#!/bin/sh
# Runtime test, as the packages-feed CI runs it once per built package (for python3-uvloop:
# a name lookup and a round trip on its loop):
#   sh test.sh PKG_NAME PKG_VERSION
# osocks must be on PATH. Needs only busybox and what the package installs (python3 with the
# python3-* packages of its DEPENDS: no curl, no bash, no pip). It runs osocks with two workers and
# a user whose password is hashed by `python3 -m osocks.auth`, and through it: a CONNECT to
# localhost by name, a UDP datagram to localhost by name, a reload (SIGHUP, and over ubus where
# ubus is), and the status over ubus where ubus is.
set -e

case "$1" in
osocks) ;;
python3-uvloop)
	echo "== uvloop: its loop, a name lookup, a TCP round trip on 127.0.0.1"
	python3 - <<'EOF' || { echo "FAIL: python3-uvloop" >&2; exit 1; }
import asyncio, socket, uvloop

async def echo(reader, writer):
    writer.write(await reader.readexactly(4))
    await writer.drain()
    writer.close()

async def main():
    loop = asyncio.get_running_loop()
    if not type(loop).__module__.startswith("uvloop"):
        raise SystemExit(f"not uvloop's loop: {type(loop)}")
    infos = await loop.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)  # the idna codec
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"ping")
    answer = await reader.readexactly(4)
    writer.close()
    server.close()
    print(f"uvloop {uvloop.__version__}: localhost is {infos[0][4][0]}, echoed {answer.decode()}")

uvloop.run(main())
EOF
	echo "PASS"
	exit 0
	;;
*) exit 0 ;;
esac

VERSION="$2"
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

# wait_for SECONDS COMMAND...: until COMMAND succeeds, once a second (slow under qemu)
wait_for() {
	seconds=$1
	shift
	i=0
	until "$@" >/dev/null 2>&1; do
		i=$((i + 1))
		[ "$i" -le "$seconds" ] || return 1
		sleep 1
	done
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
		wait_for 20 ubus list || fail "ubusd did not start: $(cat "$TMP/ubusd.log")"
		UBUS=1
	fi
fi

# An echo server (TCP and UDP on one port of 127.0.0.1) and a SOCKS5 client, in python3 alone
cat >"$TMP/echo.py" <<'EOF'
import os, socket, sys, threading

tcp = socket.socket()
tcp.bind(("127.0.0.1", 0))
tcp.listen(8)
port = tcp.getsockname()[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", port))

def echo_udp():
    while True:
        data, peer = udp.recvfrom(65535)
        udp.sendto(b"echo:" + data, peer)

def echo_tcp(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

threading.Thread(target=echo_udp, daemon=True).start()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(port))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    threading.Thread(target=echo_tcp, args=(tcp.accept()[0],), daemon=True).start()
EOF

cat >"$TMP/client.py" <<'EOF'
# client.py tcp|udp PROXY_PORT USER PASSWORD HOST PORT: one exchange through osocks, by name
import socket, struct, sys, time

mode, proxy, user, password, host, port = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5], sys.argv[5], int(sys.argv[6])
deadline = time.monotonic() + 60  # slow under qemu-user
while True:
    s = socket.socket()  # not create_connection: its getaddrinfo needs the idna codec even for 127.0.0.1
    s.settimeout(20)
    try:
        s.connect(("127.0.0.1", proxy))
        break
    except OSError as e:
        s.close()
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

def reply():
    version, code, _, kind = recv(4)
    if version != 5 or code != 0:
        sys.exit(f"{mode}: version {version}, reply code {code}")
    raw = recv({1: 4, 4: 16}[kind])
    return socket.inet_ntop({1: socket.AF_INET, 4: socket.AF_INET6}[kind], raw), struct.unpack("!H", recv(2))[0]

def address(name, number):
    return b"\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", number)

s.sendall(b"\x05\x01\x02")
if recv(2) != b"\x05\x02":
    sys.exit("osocks did not ask for a username and password")
s.sendall(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
if recv(2) != b"\x01\x00":
    sys.exit(f"login of {user} refused")
if mode == "tcp":
    s.sendall(b"\x05\x01\x00" + address(host, port))
    reply()
    payload = b"hello through osocks"
    s.sendall(payload)
    echoed = recv(len(payload))
    if echoed != payload:
        sys.exit(f"echoed {echoed!r}, expected {payload!r}")
    print("echoed:", echoed.decode())
else:
    s.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    relay = reply()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(20)
    u.sendto(b"\x00\x00\x00" + address(host, port) + b"datagram", relay)
    answer = u.recvfrom(65535)[0]
    if not answer.endswith(b"echo:datagram"):
        sys.exit(f"UDP answer {answer!r}")
    print("udp echoed:", answer[-13:].decode())
EOF

echo "== echo server on 127.0.0.1"
python3 "$TMP/echo.py" "$TMP/echo.port" &
PIDS="$PIDS $!"
wait_for 60 test -s "$TMP/echo.port" || fail "echo server did not start"
ECHO_PORT=$(cat "$TMP/echo.port")

echo "== python3 -m osocks.auth alice (a pbkdf2 hash)"
echo "wonderland" | python3 -m osocks.auth alice >"$TMP/users" || fail "python3 -m osocks.auth: $(cat "$TMP/users")"
grep -q '^alice:.pbkdf2-sha256.' "$TMP/users" || fail "osocks.auth wrote: $(cat "$TMP/users")"

echo "== osocks --no-uci -l 127.0.0.1 -p 0 --allow-local -U users -w 2"
osocks --no-uci -l 127.0.0.1 -p 0 --allow-local -U "$TMP/users" -w 2 >"$TMP/osocks.log" 2>&1 &
OSOCKS=$!
PIDS="$PIDS $OSOCKS"
wait_for 60 grep -q "listening on 127.0.0.1:" "$TMP/osocks.log" || fail "osocks did not start"
PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$TMP/osocks.log" | head -n 1)
echo "osocks listens on port $PORT"

echo "== CONNECT to localhost:$ECHO_PORT by name, as alice"
python3 "$TMP/client.py" tcp "$PORT" alice wonderland localhost "$ECHO_PORT" || fail "CONNECT through osocks"
python3 "$TMP/client.py" tcp "$PORT" alice wonderland localhost "$ECHO_PORT" >/dev/null || fail "second CONNECT"

echo "== UDP ASSOCIATE, a datagram to localhost:$ECHO_PORT by name"
python3 "$TMP/client.py" udp "$PORT" alice wonderland localhost "$ECHO_PORT" || fail "UDP through osocks"

echo "== reload (SIGHUP): a new user bob"
echo "bob:builder" >>"$TMP/users"
kill -HUP "$OSOCKS"
wait_for 30 python3 "$TMP/client.py" tcp "$PORT" bob builder localhost "$ECHO_PORT" || fail "bob after SIGHUP"
echo "bob logs in"

if [ -n "$UBUS" ]; then
	echo "== ubus call osocks status"
	i=0
	until status=$(ubus call osocks status 2>&1); do
		i=$((i + 1))
		[ "$i" -le 20 ] || fail "ubus call osocks status: $status"
		sleep 1
	done
	echo "$status" | grep '"sessions"' || fail "ubus status has no \"sessions\""
	echo "$status" | grep -E "\"port\": $PORT([^0-9]|\$)" || fail "ubus object osocks is not this osocks (port $PORT)"
	echo "== reload over ubus: user carol"
	echo "carol:carol-pw" >>"$TMP/users"
	ubus call osocks reload || fail "ubus call osocks reload"
	wait_for 30 python3 "$TMP/client.py" tcp "$PORT" carol carol-pw localhost "$ECHO_PORT" || fail "carol after reload"
	echo "carol logs in"
else
	echo "ubus: not available, skipping status check"
fi

if grep -q -e Traceback -e "unknown encoding" "$TMP/osocks.log"; then
	fail "osocks logged an error"
fi
echo "PASS"
