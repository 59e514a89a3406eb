#!/usr/bin/env bash
# End-to-end comparison, measured in one run on this machine:
#   (1) kernel bridge: two namespaces joined by veth pairs on a Linux bridge (MTU 1450);
#   (2) overlayd, one node: two tasks on one overlay network, switched in userspace.
# Both: iperf3 TCP, one stream, client -> server, T seconds; plus a ratio (2)/(1).
# Usage (root): benches/e2e-compare.sh [seconds]    Builds release binaries first.
set -euo pipefail
T=${1:-5}
cd "$(dirname "$0")/.."
cargo build --release --bins -q
BIN=$PWD/target/release
P=bc$$; D=$(mktemp -d)
cleanup() {
  [ -f "$D/pid" ] && kill -TERM "$(cat "$D/pid")" 2>/dev/null && sleep 1
  for n in br c1 c2; do ip netns pids "$P-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$P-$n" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT
gbps() { python3 -c 'import json,sys;print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'; }

# (1) kernel bridge
for n in br c1 c2; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip -n "$P-br" link add br0 type bridge; ip -n "$P-br" link set br0 up
for i in 1 2; do
  ip -n "$P-br" link add v$i type veth peer name eth0 netns "$P-c$i"
  ip -n "$P-br" link set v$i mtu 1450 master br0 up
  ip -n "$P-c$i" link set eth0 mtu 1450 up; ip -n "$P-c$i" addr add 10.0.0.$((i+1))/24 dev eth0
done
ip netns exec "$P-c2" iperf3 -s -1 -D; sleep 0.3
kernel=$(ip netns exec "$P-c1" iperf3 -c 10.0.0.3 -t "$T" -J | gbps)

# (2) overlayd, one node. The daemon runs in $P-br's network namespace, entered with nsenter
# (not `ip netns exec`, whose private mount namespace would hide the task namespaces).
export OVERLAY_SOCKET=$D/api.sock
nsenter --net=/run/netns/"$P-br" "$BIN/overlayd" --node "$P" --state-dir "$D/state" --socket "$OVERLAY_SOCKET" --log-level warn &
echo $! > "$D/pid"
for _ in $(seq 50); do [ -S "$OVERLAY_SOCKET" ] && break; sleep 0.1; done
C="$BIN/overlayctl"
$C network create bench >/dev/null
$C service create --name srv --network bench -- iperf3 -s >/dev/null
$C service create --name cli --network bench -- sleep infinity >/dev/null
for _ in $(seq 100); do [ "$($C service ls | grep -c ' 1/1 ')" = 2 ] && break; sleep 0.1; done
SRV=$($C inspect srv.1 | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["attachments"][0]["address"])')
sleep 0.5
overlay=$($C exec cli.1 -- iperf3 -c "$SRV" -t "$T" -J | gbps)
kill -TERM "$(cat "$D/pid")"; wait "$(cat "$D/pid")" 2>/dev/null || true; rm -f "$D/pid"

printf '%-44s %8s Gbit/s\n' "kernel bridge + veth (MTU 1450)" "$kernel"
printf '%-44s %8s Gbit/s\n' "overlayd single node, TAP <-> TAP" "$overlay"
printf '%-44s %8s\n' "ratio overlayd / kernel bridge" "$(python3 -c "print('%.3f' % ($overlay/$kernel))")"
