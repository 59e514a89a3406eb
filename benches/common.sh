# Shared by the end-to-end benchmark scripts (sourced, not run): Debian packages, release
# binaries, a scratch directory and namespaces that are always removed, overlayd started
# in a namespace, and the small helpers every table needs.
# The caller sets P (namespace prefix) and NS (namespace suffixes) first, then calls
# `bench_setup PKG...`.

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
  local n
  for n in $NS; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
}

bench_cleanup() {
  local f n
  for f in "$D"/*.pid; do kill -TERM "$(cat "$f" 2>/dev/null)" 2>/dev/null || true; done; sleep 1
  for n in $NS; do ip netns pids "$P-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$P-$n" 2>/dev/null || true; done
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
