#!/usr/bin/env bash
# A working overlay on this machine: one overlayd node, two networks, tasks that ping each
# other and move real TCP traffic, isolation between networks, scaling. Cleans up on exit.
# Usage (root): scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bins -q
BIN=$PWD/target/release; D=$(mktemp -d); NODE=demo$$
export OVERLAY_SOCKET=$D/api.sock
C="$BIN/overlayctl"
cleanup() {
  [ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

"$BIN/overlayd" --node "$NODE" --state-dir "$D/state" --socket "$OVERLAY_SOCKET" --log-level warn &
PID=$!
for _ in $(seq 50); do [ -S "$OVERLAY_SOCKET" ] && break; sleep 0.1; done

step $C network create my-demo
step $C network create --subnet 10.0.9.0/24 backend
step $C network ls
step $C service create --name web --network my-demo --replicas 2 -- iperf3 -s
step $C service create --name db --network backend -- sleep infinity
for _ in $(seq 100); do [ "$($C service ls | grep -c -E ' (2/2|1/1) ')" = 2 ] && break; sleep 0.1; done
step $C service ls
step $C service ps web
W1=$($C inspect web.1 | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["attachments"][0]["address"])')
W2=$($C inspect web.2 | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["attachments"][0]["address"])')
step $C exec web.1 -- ip -br addr show eth0
step $C exec web.1 -- ping -c 2 "$W2"
step $C exec web.1 -- ping -c 1 10.0.0.1
step $C exec web.1 -- iperf3 -c "$W2" -t 3
echo; echo "# db (network backend) cannot reach web (network my-demo):"
$C exec db.1 -- ping -c 1 -W 1 "$W1" || echo "-> unreachable, as it should be"
step $C service scale web=3
for _ in $(seq 100); do $C service ls | grep -q ' 3/3 ' && break; sleep 0.1; done
step $C service ps web
step $C network inspect my-demo
step $C stats
echo; echo "demo done; stopping overlayd (tasks, namespaces and TAPs go with it)"
