# Shared by the end-to-end benchmark scripts (sourced, not run): Debian packages, release
# binaries, a scratch directory and namespaces that are always removed, overlayd started
# in a namespace, and the small helpers every table needs.
# The caller sets P (namespace prefix) and NS (namespace suffixes) first, then calls
# `bench_setup PKG...`.

. scripts/cleanup.sh

bench_setup() {
  local need=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  cargo build --release --bins -q
  BIN=$PWD/target/release; C="$BIN/overlayctl"
  D=$(mktemp -d); chmod 755 "$D"
  trap bench_cleanup EXIT
  trap "exit 130" INT TERM  # so that the EXIT trap cleans up on ^C or kill too
  local n
  for n in $NS; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
}

# Runs to the end whatever already died: every overlayd is asked to stop and waited for
# (it stops its tasks and removes their namespaces) before the namespaces are emptied and
# removed.
bench_cleanup() {
  set +e
  stop_daemons "$D" 30
  remove_namespaces "$P" $NS
  rm -rf "$D"
}

# overlayd runs inside a host namespace entered with nsenter (not `ip netns exec`, whose
# private mount namespace would hide the task namespaces).
start() { # $1 node name, $2 netns, extra args...
  local name=$1 ns=$2; shift 2
  nsenter --net=/run/netns/"$ns" "$BIN/overlayd" --node "$name" --state-dir "$D/$name" \
    --socket "$D/$name.sock" --log-level warn "$@" > "$D/$name.log" 2>&1 &
  echo $! > "$D/$name.pid"
  for _ in $(seq 50); do [ -S "$D/$name.sock" ] && return; sleep 0.1; done
  echo "overlayd $name did not start:"; cat "$D/$name.log"; exit 1
}

wait_ready() { # $1 socket, $2 count: until that many nodes are Ready (placement needs them)
  for _ in $(seq 100); do [ "$($C --socket "$1" node ls | grep -c Ready)" -ge "$2" ] && return; sleep 0.1; done
  echo "only $($C --socket "$1" node ls | grep -c Ready) of $2 nodes ready"; exit 1
}

wait_running() { # $1 socket, $2 service, $3 count
  for _ in $(seq 100); do $C --socket "$1" service ls | awk -v s="$2" -v r="$3/$3" '$2==s && $4==r' | grep -q . && return; sleep 0.1; done
  echo "service $2 not running"; exit 1
}

gbps() { python3 -c 'import json,sys;print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'; }
ratio() { python3 -c "print('%.3f' % ($1/$2))"; }

# The kernel's VXLAN overlay between two hosts as Docker builds it (bridge + vxlan + static
# FDB; see ../shared/bench/anchor-kernel.sh): host namespaces $P-k1/$P-k2 joined by a veth
# underlay 198.18.0.0/24, a task namespace $P-kc1/$P-kc2 on each with 10.0.2.2 and 10.0.2.3.
kernel_vxlan() {
  ip link add u1 netns "$P-k1" type veth peer name u2 netns "$P-k2"
  local i N CN peer
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
}

# CPU time of the whole machine (user, nice, system, irq, softirq, steal) over a run, per GB
# received: the kernel path's work shows as softirq and system time, ours as user time too.
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
iperf_cpu() { # an iperf3 -J command; prints "Gbit/s CPU-seconds-per-GB"
  local b0 b1 out hz; hz=$(getconf CLK_TCK); b0=$(busy); out=$("$@"); b1=$(busy)
  echo "$out" | python3 -c 'import json,sys
e=json.load(sys.stdin)["end"]["sum_received"]; cpu=('"$b1"'-'"$b0"')/'"$hz"'
print("%.2f %.2f" % (e["bits_per_second"]/1e9, cpu/(e["bytes"]/1e9)))'; }

# Two overlayd nodes, a manager in $P-o1 and a worker in $P-o2, over a veth underlay
# 198.18.1.0/24, both Ready; sets M to the manager's socket. Extra args go to both daemons.
overlay_pair() {
  ip link add u1 netns "$P-o1" type veth peer name u2 netns "$P-o2"
  local i
  for i in 1 2; do ip -n "$P-o$i" addr add 198.18.1.$i/24 dev u$i; ip -n "$P-o$i" link set u$i up; done
  start "$P-m" "$P-o1" --advertise-addr 198.18.1.1 --init "$@"
  M="$D/$P-m.sock"
  start "$P-w" "$P-o2" --advertise-addr 198.18.1.2 --join 198.18.1.1 --token "$($C --socket "$M" cluster join-token -q)" "$@"
  # Both nodes Ready before any placement, or the tasks land on one node.
  wait_ready "$M" 2
}

addr_of() { $C --socket "$1" inspect "$2" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["attachments"][0]["address"])'; }
