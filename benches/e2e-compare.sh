#!/usr/bin/env bash
# End-to-end comparison, every path measured in the same run on this machine
# (iperf3, one TCP stream, T seconds, client -> server):
#   same node:   (1) kernel bridge + veth pairs (MTU 1450)
#                (2) overlayd, two tasks on one node (TAP <-> userspace switch <-> TAP)
#   two nodes:   (3) kernel VXLAN overlay as Docker builds it (bridge + vxlan + static FDB)
#                (4) overlayd on two nodes (TAP -> userspace VXLAN over UDP 4789 -> TAP)
# and the ratios (2)/(1) and (4)/(3); plus the small-packet rate across nodes (UDP, 64-byte
# payloads, unlimited rate: packets received per second).
# Usage (root): benches/e2e-compare.sh [seconds]    Builds release binaries first.
set -euo pipefail
T=${1:-5}
cd "$(dirname "$0")/.."
cargo build --release --bins -q
BIN=$PWD/target/release; C="$BIN/overlayctl"
P=bc$$; D=$(mktemp -d)
NS="br c1 c2 k1 k2 kc1 kc2 o1 o2"
cleanup() {
  for f in "$D"/*.pid; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done; sleep 1
  for n in $NS; do ip netns pids "$P-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$P-$n" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT
gbps() { python3 -c 'import json,sys;print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'; }
for n in $NS; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done

# (1) kernel bridge
ip -n "$P-br" link add br0 type bridge; ip -n "$P-br" link set br0 up
for i in 1 2; do
  ip -n "$P-br" link add v$i type veth peer name eth0 netns "$P-c$i"
  ip -n "$P-br" link set v$i mtu 1450 master br0 up
  ip -n "$P-c$i" link set eth0 mtu 1450 up; ip -n "$P-c$i" addr add 10.0.0.$((i+1))/24 dev eth0
done
ip netns exec "$P-c2" iperf3 -s -1 -D; sleep 0.3
bridge_gbps=$(ip netns exec "$P-c1" iperf3 -c 10.0.0.3 -t "$T" -J | gbps)

# (3) kernel VXLAN between two hosts, Docker-style (see ../shared/bench/anchor-kernel.sh)
ip link add u1 netns "$P-k1" type veth peer name u2 netns "$P-k2"
for i in 1 2; do ip -n "$P-k$i" addr add 198.18.0.$i/24 dev u$i; ip -n "$P-k$i" link set u$i up; done
for i in 1 2; do
  N="$P-k$i"; CN="$P-kc$i"; peer=$((3-i))
  ip -n "$N" link add br0 type bridge; ip -n "$N" link set br0 up
  ip -n "$N" link add vxlan0 type vxlan id 4097 dstport 4789 local 198.18.0.$i nolearning
  ip -n "$N" link set vxlan0 mtu 1450 master br0 up
  ip -n "$N" link add veth0 type veth peer name eth0 netns "$CN"
  ip -n "$N" link set veth0 mtu 1450 master br0 up
  ip -n "$CN" link set eth0 mtu 1450 address 02:42:0a:00:02:0$i up
  ip -n "$CN" addr add 10.0.2.$((i+1))/24 dev eth0
  bridge -n "$N" fdb add 02:42:0a:00:02:0$peer dev vxlan0 dst 198.18.0.$peer self permanent
  ip -n "$CN" neigh add 10.0.2.$((peer+1)) lladdr 02:42:0a:00:02:0$peer dev eth0 nud permanent
done
ip netns exec "$P-kc2" iperf3 -s -1 -D; sleep 0.3
kvx_gbps=$(ip netns exec "$P-kc1" iperf3 -c 10.0.2.3 -t "$T" -J | gbps)

# overlayd runs inside a host namespace entered with nsenter (not `ip netns exec`, whose
# private mount namespace would hide the task namespaces).
start() { # $1 name, $2 netns, extra args...
  local name=$1 ns=$2; shift 2
  nsenter --net=/run/netns/"$ns" "$BIN/overlayd" --node "$name" --state-dir "$D/$name" \
    --socket "$D/$name.sock" --log-level warn "$@" > "$D/$name.log" 2>&1 &
  echo $! > "$D/$name.pid"
  for _ in $(seq 50); do [ -S "$D/$name.sock" ] && return; sleep 0.1; done
  echo "overlayd $name did not start:"; cat "$D/$name.log"; exit 1
}
wait_running() { # $1 socket, $2 service, $3 count
  for _ in $(seq 100); do $C --socket "$1" service ls | grep -q " $3/$3 " && return; sleep 0.1; done
  echo "service $2 not running"; exit 1
}
addr_of() { $C --socket "$1" inspect "$2" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["attachments"][0]["address"])'; }

# (2) overlayd, one node
start "$P-s" "$P-br"
S="$D/$P-s.sock"
$C --socket "$S" network create bench >/dev/null
$C --socket "$S" service create --name srv --network bench -- iperf3 -s >/dev/null
$C --socket "$S" service create --name cli --network bench -- sleep infinity >/dev/null
wait_running "$S" srv 1; wait_running "$S" cli 1; sleep 0.5
single_gbps=$($C --socket "$S" exec cli.1 -- iperf3 -c "$(addr_of "$S" srv.1)" -t "$T" -J | gbps)

kpps() { python3 -c 'import json,sys;e=json.load(sys.stdin)["end"]["sum"];print("%.0f" % (e["packets"]*(1-e["lost_percent"]/100)/e["seconds"]/1e3))'; }
# small packets over the kernel VXLAN overlay: UDP, 64-byte payloads, unlimited rate
ip netns exec "$P-kc2" iperf3 -s -1 -D -p 5202; sleep 0.3
kvx_kpps=$(ip netns exec "$P-kc1" iperf3 -c 10.0.2.3 -p 5202 -u -l 64 -b 0 -t "$T" -J | kpps)

# (4) overlayd, two nodes over a veth underlay
ip link add u1 netns "$P-o1" type veth peer name u2 netns "$P-o2"
for i in 1 2; do ip -n "$P-o$i" addr add 198.18.1.$i/24 dev u$i; ip -n "$P-o$i" link set u$i up; done
start "$P-m" "$P-o1" --advertise-addr 198.18.1.1 --init
M="$D/$P-m.sock"
start "$P-w" "$P-o2" --advertise-addr 198.18.1.2 --join 198.18.1.1 --token "$($C --socket "$M" cluster join-token -q)"
$C --socket "$M" network create span >/dev/null
$C --socket "$M" service create --name x --network span --replicas 2 -- iperf3 -s >/dev/null
wait_running "$M" x 2; sleep 0.5
# x.1 and x.2 are spread over the two nodes; run the client in x.1 against x.2.
multi_gbps=$($C --socket "$M" exec x.1 -- iperf3 -c "$(addr_of "$M" x.2)" -t "$T" -J | gbps)
nodes=$($C --socket "$M" service ps x | awk 'NR>1{print $3}' | sort -u | wc -l)
$C --socket "$M" exec x.2 -- iperf3 -s -1 -D -p 5202; sleep 0.3
multi_kpps=$($C --socket "$M" exec x.1 -- iperf3 -c "$(addr_of "$M" x.2)" -p 5202 -u -l 64 -b 0 -t "$T" -J | kpps)

ratio() { python3 -c "print('%.3f' % ($1/$2))"; }
printf '%-52s %8s Gbit/s\n' "(1) kernel bridge + veth, same host" "$bridge_gbps"
printf '%-52s %8s Gbit/s\n' "(2) overlayd, two tasks on one node" "$single_gbps"
printf '%-52s %8s Gbit/s\n' "(3) kernel VXLAN overlay, two hosts" "$kvx_gbps"
printf '%-52s %8s Gbit/s\n' "(4) overlayd, two nodes ($nodes distinct), VXLAN/UDP 4789" "$multi_gbps"
printf '%-52s %8s kpps\n' "(3) kernel VXLAN, 64 B UDP received" "$kvx_kpps"
printf '%-52s %8s kpps\n' "(4) overlayd two nodes, 64 B UDP received" "$multi_kpps"
printf '%-52s %8s\n' "ratio (2)/(1) same node" "$(ratio "$single_gbps" "$bridge_gbps")"
printf '%-52s %8s\n' "ratio (4)/(3) across nodes" "$(ratio "$multi_gbps" "$kvx_gbps")"
printf '%-52s %8s\n' "ratio (4)/(3) across nodes, 64 B UDP packets" "$(ratio "$multi_kpps" "$kvx_kpps")"
