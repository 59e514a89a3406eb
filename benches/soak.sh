#!/usr/bin/env bash
# A soak: three overlayd nodes under mixed load for DURATION seconds, each daemon's memory,
# file descriptors and flow table sampled every 10 s; fails when any of them grows.
# Underlay: a bridge (198.18.7.0/24) with nodes n1 (manager), n2, n3 and a client host c.
# Load, every loop bounded in count and in time (it ends with DURATION):
#   - TCP streams between tasks, across nodes (iperf3, rate-capped), on a plain network
#     and on an encrypted one, whose key is rotated every ROTATE_EVERY s (`network
#     rotate-key`);
#   - UDP between tasks (iperf3 -u, rate-capped);
#   - short connections (one HTTP GET each) from a task through the service VIP, and from
#     the client host through the routing mesh (published port 8080 on every node);
#   - DNS queries at 127.0.0.11 from a task (the service, tasks.SERVICE, a name that does
#     not exist);
#   - the web service scaled between 2 and 4 replicas every SCALE_EVERY s.
# Samples: $D/soak.csv (copied next to the plot): seconds, node, rss_kb (VmRSS), fds
# (/proc/PID/fd), flows (load-balanced flows in the node's connection table: the sum of
# `overlayctl stats` .services[].active_flows) and mesh (routing-mesh connections open:
# .ingress[].active). Verdict: after a warm-up (the first sixth of the run, at least 20 s),
# the mean of each series over the last third of the run must not exceed its mean over
# the first third after warm-up by more than 10% (plus a small absolute slack for the
# count series: 8 fds, 32 flows or connections, which otherwise swing with the load
# pattern). Exit 1 otherwise. Plot: PNG of every series per node.
# Usage (root): benches/soak.sh DURATION [PNG]   (default PNG docs/soak.png; CSV beside it)
# Environment: SCALE_EVERY (default 30), ROTATE_EVERY (default 60), SAMPLE_EVERY (10).
set -euo pipefail
DURATION=${1:?usage: benches/soak.sh DURATION [PNG]}
cd "$(dirname "$0")/.."
PNG=${2:-$PWD/docs/soak.png}
case $PNG in /*) ;; *) PNG=$PWD/$PNG ;; esac
SCALE_EVERY=${SCALE_EVERY:-30}
ROTATE_EVERY=${ROTATE_EVERY:-60}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
[ "$DURATION" -ge 60 ] || { echo "soak: DURATION must be at least 60 s"; exit 2; }
. benches/common.sh
P=sk$$
NS="sw n1 n2 n3 c"
bench_setup iperf3 curl bind9-dnsutils
# The plot: matplotlib if Debian has it, else gnuplot, else none (the verdict stands alone).
# Debian's matplotlib is for Debian's python3, which may not be the first on PATH.
python3 -c 'import matplotlib' 2>/dev/null || /usr/bin/python3 -c 'import matplotlib' 2>/dev/null \
  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib >/dev/null 2>&1 \
  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null 2>&1 \
  || echo "soak: no plotting package; no plot"
PLOT_PY=python3
python3 -c 'import matplotlib' 2>/dev/null || PLOT_PY=/usr/bin/python3

ip -n "$P-sw" link add br0 type bridge; ip -n "$P-sw" link set br0 up
i=1; for n in n1 n2 n3 c; do
  ip -n "$P-sw" link add p$i type veth peer name u0 netns "$P-$n"
  ip -n "$P-sw" link set p$i master br0 up
  ip -n "$P-$n" addr add 198.18.7.$i/24 dev u0; ip -n "$P-$n" link set u0 up
  i=$((i+1))
done
start "$P-n1" "$P-n1" --advertise-addr 198.18.7.1 --init
S="$D/$P-n1.sock"
tok=$($C --socket "$S" cluster join-token -q)
start "$P-n2" "$P-n2" --advertise-addr 198.18.7.2 --join 198.18.7.1 --token "$tok"
start "$P-n3" "$P-n3" --advertise-addr 198.18.7.3 --join 198.18.7.1 --token "$tok"
wait_ready "$S" 3

cx() { $C --socket "$S" "$@"; }
cx network create front >/dev/null
cx network create -o encrypted sec >/dev/null
mkdir -p "$D/www"; echo ok > "$D/www/index.html"; chmod -R 755 "$D/www"
cx service create --name web --network front --replicas 2 -p 8080:80 -- \
  python3 -m http.server 80 --bind 0.0.0.0 --directory "$D/www" >/dev/null
cx service create --name bulk --network front -- iperf3 -s >/dev/null
cx service create --name sbulk --network sec -- iperf3 -s >/dev/null
# Clients: one task on each network (the scheduler spreads them over the nodes).
cx service create --name cli --network front --network sec -- sleep 1000000 >/dev/null
for s in web:2 bulk:1 sbulk:1 cli:1; do wait_running "$S" "${s%%:*}" "${s##*:}"; done
node_of() { cx inspect "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["node"])'; }
cli_ns="ov-$(node_of cli.1)-cli.1"
tx() { ip netns exec "$cli_ns" "$@"; }
# `ip netns exec` gives the host's resolv.conf: names are resolved once, by the embedded
# resolver itself (which the DNS loop below keeps asking).
vip() { local a; a=$(tx dig +short +tries=3 +time=1 @127.0.0.11 "$1" | head -1)
  [ -n "$a" ] || { echo "soak: 127.0.0.11 in cli.1 does not know $1"; cat "$D"/*.log; exit 1; }; echo "$a"; }
WEB=$(vip web); BULK=$(vip bulk); SBULK=$(vip sbulk)
tx curl -sf --max-time 5 "http://$WEB/" >/dev/null || { echo "soak: web ($WEB) unreachable from cli.1"; cat "$D"/*.log; exit 1; }
echo "soak: VIPs web $WEB, bulk $BULK, sbulk $SBULK; cli.1 in $cli_ns; ${DURATION} s of load"

end=$((SECONDS + DURATION))
pids=()
# Each loop: at most N rounds, and none past $end.
loop() { # $1 rounds, then the command (one round)
  local n=$1; shift
  ( for ((k = 0; k < n && SECONDS < end; k++)); do "$@" || true; done ) >/dev/null 2>&1 &
  pids+=($!)
}
left() { local l=$((end - SECONDS)); [ $l -gt 0 ] && echo $l || echo 1; }
nap() { local t; t=$(left); [ "$t" -gt "$1" ] && t=$1; sleep "$t"; } # never past the end
stream() { # $1 server name, $2 seconds at most: TCP then UDP, rate-capped
  local t; t=$(left); [ "$t" -gt "$2" ] && t=$2
  timeout $((t + 10)) ip netns exec "$cli_ns" iperf3 -c "$1" -t "$t" -b 300M
  t=$(left); [ "$t" -gt 5 ] && t=5
  timeout $((t + 10)) ip netns exec "$cli_ns" iperf3 -c "$1" -u -t "$t" -b 20M -l 1200
}
short_vip() { for _ in $(seq 50); do tx curl -s -o /dev/null --max-time 2 "http://$WEB/"; done; }
short_mesh() {
  local n
  for n in 1 2 3; do
    for _ in $(seq 20); do ip netns exec "$P-c" curl -s -o /dev/null --max-time 2 "http://198.18.7.$n:8080/"; done
  done
}
dns() {
  for _ in $(seq 20); do
    tx dig +short +tries=1 +time=1 @127.0.0.11 web
    tx dig +short +tries=1 +time=1 @127.0.0.11 tasks.web
    tx dig +short +tries=1 +time=1 @127.0.0.11 nothing.here
  done
  sleep 1
}
scale() { # up and down in turn
  nap "$SCALE_EVERY"; [ $SECONDS -lt $end ] || return 0
  cx service scale web=4 >/dev/null
  nap "$SCALE_EVERY"; [ $SECONDS -lt $end ] || return 0
  cx service scale web=2 >/dev/null
}
rotate() { nap "$ROTATE_EVERY"; [ $SECONDS -lt $end ] && cx network rotate-key sec >/dev/null; }
# Bounds: no loop can run more rounds than DURATION allows even if every round were instant
# (each takes at least a second or so); the time bound ends them first in practice.
loop $((DURATION / 5 + 1)) stream "$BULK" 20
loop $((DURATION / 5 + 1)) stream "$SBULK" 20
loop $((DURATION * 2)) short_vip
loop $((DURATION * 2)) short_mesh
loop $((DURATION)) dns
loop $((DURATION / SCALE_EVERY + 1)) scale
loop $((DURATION / ROTATE_EVERY + 1)) rotate

csv=$D/soak.csv
echo "seconds,node,rss_kb,fds,flows,mesh" > "$csv"
t0=$SECONDS
sample() {
  local n pid rss fds stats
  for n in n1 n2 n3; do
    pid=$(cat "$D/$P-$n.pid")
    pid_running "$pid" || { echo "soak: overlayd $n (pid $pid) died"; tail -20 "$D/$P-$n.log"; exit 1; }
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$pid/status")
    fds=$(ls "/proc/$pid/fd" | wc -l)
    stats=$($C --socket "$D/$P-$n.sock" stats | python3 -c 'import json,sys
s=json.load(sys.stdin)
print(sum(v["active_flows"] for v in s["services"].values()), sum(v["active"] for v in s["ingress"].values()))')
    echo "$((SECONDS - t0)),$n,$rss,$fds,${stats/ /,}" >> "$csv"
  done
}
while [ $SECONDS -lt $end ]; do
  sample
  echo "soak: $((SECONDS - t0)) s of $DURATION: $(tail -3 "$csv" | cut -d, -f2- | tr '\n' ' ')"
  nap "$SAMPLE_EVERY"
done
sample
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done

mkdir -p "$(dirname "$PNG")"
cp "$csv" "${PNG%.png}.csv"
verdict=0
"$PLOT_PY" - "$csv" "$PNG" "$DURATION" <<'EOF' || verdict=$?
import csv, sys
path, png, duration = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(path)))
series = ["rss_kb", "fds", "flows", "mesh"]
slack = {"rss_kb": 0, "fds": 8, "flows": 32, "mesh": 32}
warm = max(20, duration // 6)
nodes = sorted({r["node"] for r in rows})
bad = []
for n in nodes:
    pts = [r for r in rows if r["node"] == n]
    for s in series:
        after = [(int(r["seconds"]), float(r[s])) for r in pts if int(r["seconds"]) >= warm]
        early = [v for t, v in after if t < warm + (duration - warm) / 3] or [after[0][1]]
        late = [v for t, v in after if t >= duration * 2 / 3] or [after[-1][1]]
        base, tail = sum(early) / len(early), sum(late) / len(late)
        limit = base * 1.10 + slack[s]
        verdict = "GROWS" if tail > limit else "flat"
        print(f"soak {n} {s:7}: after warm-up {base:10.0f}, last third {tail:10.0f} "
              f"(limit {limit:.0f}): {verdict}")
        if tail > limit:
            bad.append(f"{n} {s}")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 10), sharex=True)
    for ax, s in zip(axes, series):
        for n in nodes:
            pts = [r for r in rows if r["node"] == n]
            ax.plot([int(r["seconds"]) for r in pts], [float(r[s]) for r in pts], label=n)
        ax.axvline(warm, color="grey", linestyle=":")
        ax.set_ylabel({"rss_kb": "RSS (KiB)", "fds": "open fds", "flows": "LB flows",
                       "mesh": "mesh conns"}[s])
        ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("seconds (dotted: end of warm-up)")
    fig.suptitle(f"overlayd soak, {duration} s, 3 nodes, mixed load")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    print(f"soak: plot {png}")
except ImportError:
    print("soak: no matplotlib")
if bad:
    print("soak: FAILED, grows after warm-up: " + ", ".join(bad))
    sys.exit(1)
print("soak: passed, every series flat after warm-up")
EOF
if [ ! -s "$PNG" ] && command -v gnuplot >/dev/null; then
  plots=""
  for n in n1 n2 n3; do
    grep ",$n," "$csv" > "$D/$n.dat"
  done
  for col in 3:RSS_KiB 4:open_fds 5:LB_flows 6:mesh_conns; do
    plots+="set ylabel '${col#*:}'; plot "
    for n in n1 n2 n3; do plots+="'$D/$n.dat' using 1:${col%%:*} with lines title '$n', "; done
    plots="${plots%, }; "
  done
  gnuplot -e "set terminal png size 720,800; set output '$PNG'; set datafile separator ','; set multiplot layout 4,1; $plots unset multiplot" \
    && echo "soak: plot $PNG (gnuplot)"
fi
exit "$verdict"
