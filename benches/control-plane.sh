#!/usr/bin/env bash
# The control plane of a large cluster: a real manager (overlayd --init, its own node drained)
# and N simulated nodes (benches/src/bin/control-sim.rs: real member sessions in one process,
# each applying every push and reporting its tasks Running every second), S services of R
# tasks created one after another through the API. Four runs, each with a fresh manager:
#   file  deltas   --store file (state.json)            pushes what changed (the default)
#   file  full     --store file --control-full-snapshots every push the whole state
#   etcd  deltas   --store etcd (one etcd member beside the manager)
#   etcd  full     --store etcd --control-full-snapshots
# Per run: a create's latency until committed (the API's answer) and until every node holds
# it (p50/p99), and the control plane's bytes per second to the nodes, during the creates and
# once settled. Results: one JSON line per run, then a table.
# Usage (root): [RUNS="file-deltas file-full etcd-deltas etcd-full"] benches/control-plane.sh
#   [nodes] [services] [replicas]   (default 50 1000 10; RUNS picks the runs, all by default)
set -euo pipefail
N=${1:-50}; S=${2:-1000}; R=${3:-10}
cd "$(dirname "$0")/.."
. benches/common.sh
P=cp$$
NS="m s"
bench_setup etcd-server etcd-client
ip link add u1 netns "$P-m" type veth peer name u2 netns "$P-s"
ip -n "$P-m" addr add 198.18.9.1/24 dev u1; ip -n "$P-m" link set u1 up
ip -n "$P-s" addr add 198.18.9.2/24 dev u2; ip -n "$P-s" link set u2 up
RESULTS="$D/results.jsonl"
: > "$RESULTS"
ETCD_PID=

etcd_start() {
  rm -rf "$D/etcd"
  ip netns exec "$P-m" etcd --name e1 --data-dir "$D/etcd" \
    --listen-client-urls http://198.18.9.1:2379 --advertise-client-urls http://198.18.9.1:2379 \
    --listen-peer-urls http://198.18.9.1:2380 --initial-advertise-peer-urls http://198.18.9.1:2380 \
    --initial-cluster e1=http://198.18.9.1:2380 --initial-cluster-state new \
    --max-txn-ops 2048 > "$D/etcd.log" 2>&1 &
  ETCD_PID=$!
  for _ in $(seq 100); do
    ip netns exec "$P-m" etcdctl --endpoints http://198.18.9.1:2379 endpoint health >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "etcd did not start:"; tail -20 "$D/etcd.log"; exit 1
}

etcd_stop() {
  [ -n "$ETCD_PID" ] || return 0
  kill "$ETCD_PID" 2>/dev/null || true; wait "$ETCD_PID" 2>/dev/null || true; ETCD_PID=
}

one_run() { # $1 label, extra overlayd args...
  local label=$1; shift
  rm -rf "$D/m"
  start m "$P-m" --advertise-addr 198.18.9.1 --init "$@"
  local token
  token=$($C --socket "$D/m.sock" cluster join-token -q)
  nsenter --net=/run/netns/"$P-s" "$BIN/control-sim" --manager 198.18.9.1:2377 --token "$token" \
    --socket "$D/m.sock" --bind 198.18.9.2 --nodes "$N" --services "$S" --replicas "$R" \
    --label "$label" >> "$RESULTS" 2> "$D/sim-$label.log" \
    || { echo "control-sim failed ($label):"; tail -20 "$D/sim-$label.log"; tail -20 "$D/m.log"; exit 1; }
  stop_daemons "$D" 30
  rm -f "$D"/*.pid
}

RUNS=${RUNS:-file-deltas file-full etcd-deltas etcd-full}
ETCD_ARGS=(--store etcd --etcd-endpoints http://198.18.9.1:2379)
for r in $RUNS; do
  case $r in
    file-deltas) one_run "file deltas" ;;
    file-full) one_run "file full" --control-full-snapshots ;;
    etcd-deltas) etcd_start; one_run "etcd deltas" "${ETCD_ARGS[@]}"; etcd_stop ;;
    etcd-full) etcd_start; one_run "etcd full" "${ETCD_ARGS[@]}" --control-full-snapshots; etcd_stop ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done

cat "$RESULTS"
python3 - "$RESULTS" "$N" "$S" "$R" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n, s, r = sys.argv[2:5]
print(f"\n{n} simulated nodes, {s} services x {r} tasks, created one after another; "
      f"whole snapshot {rows[0]['snapshot_bytes'] / 1e6:.2f} MB once settled")
print("| store, pushes | create committed p50 / p99 | create on every node p50 / p99 "
      "| bytes/s to nodes while creating | bytes/s to nodes settled |")
print("|---|---|---|---|---|")
for x in rows:
    c, e = x["create_committed_ms"], x["create_everywhere_ms"]
    print(f"| {x['label']} | {c['p50']:.1f} / {c['p99']:.1f} ms | {e['p50']:.1f} / {e['p99']:.1f} ms "
          f"| {x['create_phase_rx_bytes_per_s'] / 1e6:.2f} MB/s "
          f"| {x['settled_rx_bytes_per_s'] / 1e3:.1f} kB/s |")
by = {x["label"]: x for x in rows}
for store in ("file", "etcd"):
    d, f = by.get(f"{store} deltas"), by.get(f"{store} full")
    if d and f and d["settled_rx_bytes_per_s"] > 0:
        print(f"{store}: settled bytes/s, full / deltas = "
              f"{f['settled_rx_bytes_per_s'] / d['settled_rx_bytes_per_s']:.0f}x; while creating "
              f"{f['create_phase_rx_bytes_per_s'] / max(d['create_phase_rx_bytes_per_s'], 1):.1f}x")
EOF
