#!/usr/bin/env bash
# How close a userspace router on a TAP and a UDP socket can come to the kernel's VXLAN
# path on this machine. Three paths across two hosts, measured alternately in the same run
# (iperf3, T seconds, 1 and 4 TCP streams, the machine's CPU-seconds per GB received from
# /proc/stat, and the round trip: sockperf UDP ping-pong, p50/p99):
#   kernel   the kernel's VXLAN overlay as Docker builds it (bridge + vxlan + static FDB)
#   floor    benches/src/bin/copy-floor.rs: TAP -> one UDP datagram per super-frame -> TAP,
#            nothing else (no switching, no headers, no segmentation; underlay MTU 65535
#            so that 64 KiB datagrams cross whole; a blocking thread per direction): the
#            four copies and four system calls per 64 KiB of a TAP-and-socket relay, and
#            no other work
#   overlayd two nodes, as benches/e2e-compare.sh runs them
# Then the bound the copies alone set, from a profile of the kernel path (perf record -a):
# its two copies of every byte (the sending task's and the receiving task's) give the cost
# of one copy per GB; a TAP-and-socket router adds four (TAP read, socket send, socket
# receive, TAP write), which sets the least CPU per GB it can reach and so the most it can
# move on this machine's cores. Also printed: bytes per packet on the receiving host's
# underlay veth during each iperf3 run (the kernel's VXLAN hands whole super-packets across
# the veth; so does overlayd, with UDP_SEGMENT).
# Usage (root): benches/copy-floor.sh [seconds] [rounds]    Builds release binaries first.
set -euo pipefail
T=${1:-5}; R=${2:-2}
cd "$(dirname "$0")/.."
. benches/common.sh
P=cf$$
NS="k1 k2 kc1 kc2 f1 f2 fc1 fc2 o1 o2"
bench_setup iperf3 sockperf linux-perf

kernel_vxlan

# The floor: a relay per host, its TAP moved into the task namespace.
ip link add u1 netns "$P-f1" type veth peer name u2 netns "$P-f2"
for i in 1 2; do
  ip -n "$P-f$i" link set u$i mtu 65535 up; ip -n "$P-f$i" addr add 198.18.2.$i/24 dev u$i
done
for i in 1 2; do
  peer=$((3-i))
  nsenter --net=/run/netns/"$P-f$i" "$BIN/copy-floor" --tap fl0 \
    --local 198.18.2.$i:4789 --peer 198.18.2.$peer:4789 > "$D/floor$i.log" 2>&1 &
  echo $! > "$D/floor$i.pid"
  for _ in $(seq 50); do ip -n "$P-f$i" link show fl0 >/dev/null 2>&1 && break; sleep 0.1; done
  ip -n "$P-f$i" link set fl0 netns "$P-fc$i"
  # A datagram holds at most 65507 bytes: super-frames stay under it.
  ip -n "$P-fc$i" link set fl0 mtu 1450 gso_max_size 62000 address 02:42:0a:00:03:0$i up
  ip -n "$P-fc$i" addr add 10.0.3.$((i+1))/24 dev fl0
  ip -n "$P-fc$i" neigh add 10.0.3.$((peer+1)) lladdr 02:42:0a:00:03:0$peer dev fl0 nud permanent
done

overlay_pair
$C --socket "$M" network create span >/dev/null
$C --socket "$M" service create --name x --network span --replicas 2 -- iperf3 -s >/dev/null
wait_running "$M" x 2
nodes=$($C --socket "$M" service ps x | awk 'NR>1{print $3}' | sort -u | wc -l)
x2=$(addr_of "$M" x.2)

rx() { ip -n "$1" -s -j link show "$2" | python3 -c 'import json,sys;s=json.load(sys.stdin)[0]["stats64"]["rx"];print(s["bytes"], s["packets"])'; }
run() { # $1 path, $2 streams; prints "Gbit/s CPU-s/GB bytes/packet"
  local ns client dst b0 p0 b1 p1 port=$((5300 + RANDOM % 600)) res
  case $1 in
    kernel) ns=$P-k2; client=(ip netns exec "$P-kc1"); dst=10.0.2.3
            ip netns exec "$P-kc2" iperf3 -s -1 -D -p "$port" ;;
    floor) ns=$P-f2; client=(ip netns exec "$P-fc1"); dst=10.0.3.3
           ip netns exec "$P-fc2" iperf3 -s -1 -D -p "$port" ;;
    overlayd) ns=$P-o2; client=("$C" --socket "$M" exec x.1 --); dst=$x2
              $C --socket "$M" exec x.2 -- iperf3 -s -1 -D -p "$port" ;;
  esac
  sleep 0.3
  read -r b0 p0 <<< "$(rx "$ns" u2)"
  # With PROFILE set, the whole machine is profiled in the middle of the run.
  local prof=
  if [ -n "${PROFILE:-}" ]; then
    (sleep 1; perf record -a -q -o "$PROFILE" -- sleep $((T - 2)) >/dev/null 2>&1) & prof=$!
  fi
  res=$(iperf_cpu "${client[@]}" iperf3 -c "$dst" -p "$port" -P "$2" -t "$T" -J)
  [ -z "$prof" ] || wait "$prof"
  read -r b1 p1 <<< "$(rx "$ns" u2)"
  echo "$res $(( (b1 - b0) / (p1 - p0 > 0 ? p1 - p0 : 1) ))"
}

# Round trip: sockperf UDP ping-pong, half the round trip in microseconds, "p50 p99".
lat() {
  local client srv dst
  case $1 in
    kernel) srv=(ip netns exec "$P-kc2"); client=(ip netns exec "$P-kc1"); dst=10.0.2.3 ;;
    floor) srv=(ip netns exec "$P-fc2"); client=(ip netns exec "$P-fc1"); dst=10.0.3.3 ;;
    overlayd) srv=("$C" --socket "$M" exec x.2 --); client=("$C" --socket "$M" exec x.1 --); dst=$x2 ;;
  esac
  "${srv[@]}" sockperf sr -p 11112 > /dev/null 2>&1 & local sp=$!; sleep 0.5
  "${client[@]}" sockperf pp -i "$dst" -p 11112 -t "$T" 2>&1 |
    awk '/percentile 50.000/{p50=$NF} /percentile 99.000/{p99=$NF} END{print p50, p99}'
  kill "$sp" 2>/dev/null || true; wait "$sp" 2>/dev/null || true
}

declare -A sum
printf '%-9s %-8s %10s %12s %12s\n' round path streams "Gbit/s" "CPU-s/GB"
for r in $(seq "$R"); do
  for s in 1 4; do
    for path in kernel floor overlayd; do
      read -r g c bpp <<< "$(run "$path" "$s")"
      printf '%-9s %-8s %10s %12s %12s   (%s bytes per underlay packet)\n' "$r" "$path" "$s" "$g" "$c" "$bpp"
      sum[$path$s.g]=$(python3 -c "print(${sum[$path$s.g]:-0}+$g)")
      sum[$path$s.c]=$(python3 -c "print(${sum[$path$s.c]:-0}+$c)")
    done
  done
done
for r in $(seq "$R"); do
  for path in kernel floor overlayd; do
    read -r p50 p99 <<< "$(lat "$path")"
    printf '%-9s %-8s half round trip p50 / p99 %8s / %s us\n' "$r" "$path" "$p50" "$p99"
    sum[$path.l50]=$(python3 -c "print(${sum[$path.l50]:-0}+$p50)")
    sum[$path.l99]=$(python3 -c "print(${sum[$path.l99]:-0}+$p99)")
  done
done
# The cost of one copy of every byte, from a profile of the kernel path (a run of its own,
# so that the profiler does not slow the runs compared above): its two copies (the
# sender's tcp_sendmsg, the receiver's tcp_recvmsg) as a share of the busy samples
# (idle = the halt and idle loops), times its CPU-seconds per GB, halved.
copy_share() {
  perf report -i "$1" --sort symbol --stdio 2>/dev/null | awk '
    /^ +[0-9.]+%/ { p = $1 + 0; sym = $NF
                    if ($0 ~ /_copy_(to|from)_iter/) c += p
                    if ($0 ~ /halt|idle/) idle += p }
    END { printf "%.4f\n", c / (100 - idle) }'
}
mean() { python3 -c "print('%.2f' % (${sum[$1]}/$R))"; }
echo "-- means over $R rounds; overlayd's tasks on $nodes distinct nodes --"
for s in 1 4; do
  for path in kernel floor overlayd; do
    printf '%-40s %8s Gbit/s %6s CPU-s/GB\n' "$path, $s stream(s)" "$(mean "$path$s.g")" "$(mean "$path$s.c")"
  done
  printf '%-40s %8s %13s\n' "floor / kernel, $s stream(s)" \
    "$(ratio "$(mean "floor$s.g")" "$(mean "kernel$s.g")")" "$(ratio "$(mean "floor$s.c")" "$(mean "kernel$s.c")")"
  printf '%-40s %8s %13s\n' "overlayd / floor, $s stream(s)" \
    "$(ratio "$(mean "overlayd$s.g")" "$(mean "floor$s.g")")" "$(ratio "$(mean "overlayd$s.c")" "$(mean "floor$s.c")")"
done
for path in floor overlayd; do
  printf '%-40s %8s us\n' "added round trip p50 / p99, $path" "$(python3 -c "
k50, k99 = ${sum[kernel.l50]}/$R, ${sum[kernel.l99]}/$R
print('%.1f / %.1f' % (2*(${sum[$path.l50]}/$R-k50), 2*(${sum[$path.l99]}/$R-k99)))")"
done
echo "-- what the copies alone cost (the kernel path profiled in one more run each) --"
for s in 1 4; do
  PROFILE=$D/perf-$s.data run kernel "$s" > /dev/null
  share=$(copy_share "$D/perf-$s.data")
  python3 - "$s" "$share" "$(mean "kernel$s.c")" "$(mean "kernel$s.g")" "$(nproc)" <<'EOP'
import sys
s, share, kcpu, kg, cores = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
copy = share * kcpu / 2            # CPU-s per GB for one copy of every byte
least = kcpu + 4 * copy            # the kernel path's work and a TAP-and-socket router's four copies
print("%s stream(s): the kernel path's 2 copies are %.1f%% of its busy CPU: %.3f CPU-s per GB per copy" % (s, 100 * share, copy))
print("   a TAP-and-socket router needs at least %.2f CPU-s per GB (%.2fx the kernel's), so at most %.1f Gbit/s on %d cores (%.2fx the kernel's %.1f)"
      % (least, least / kcpu, cores * 8 / least, cores, cores * 8 / least / kg, kg))
EOP
done
