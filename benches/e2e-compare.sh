#!/usr/bin/env bash
# End-to-end comparison, every path measured in the same run on this machine
# (iperf3, one TCP stream, T seconds, client -> server):
#   same node:   (1) kernel bridge + veth pairs (MTU 1450)
#                (2) overlayd, two tasks on one node (TAP <-> userspace switch <-> TAP)
#   two nodes:   (3) kernel VXLAN overlay as Docker builds it (bridge + vxlan + static FDB)
#                (4) overlayd on two nodes (TAP -> userspace VXLAN over UDP 4789 -> TAP)
# and the ratios (2)/(1) and (4)/(3); plus the small-packet rate across nodes (UDP, 64-byte
# payloads, unlimited rate: packets received per second).
# Services (issue 7), same run: iperf3 through a service VIP next to straight to the task,
# on one node and across nodes; new TCP connections per second through a VIP next to
# straight to its one backend (wrk, nginx, one request per connection); the round trip of a
# VIP hop at p50/p99 (sockperf TCP ping-pong); DNS queries per second at 127.0.0.11 inside a
# task (dnsperf) next to dnsmasq answering the same names (../shared/bench/anchor-dns.sh).
# The data path on every core (issue 10), same run: 4 parallel TCP streams across nodes, the
# machine's CPU-seconds per GB moved (from /proc/stat over each run), the round trip
# (sockperf UDP ping-pong, p50/p99), and UDP bulk as QUIC stacks send it (UDP_SEGMENT
# super-datagrams received with UDP_GRO, benches/udp-bulk.py), kernel VXLAN next to overlayd.
# Usage (root): benches/e2e-compare.sh [seconds]    Builds release binaries first.
set -euo pipefail
T=${1:-5}
cd "$(dirname "$0")/.."
. benches/common.sh
P=bc$$
NS="br c1 c2 k1 k2 kc1 kc2 o1 o2"
bench_setup iperf3 wrk nginx-light sockperf dnsperf dnsmasq-base tinc

# (1) kernel bridge
ip -n "$P-br" link add br0 type bridge; ip -n "$P-br" link set br0 up
for i in 1 2; do
  ip -n "$P-br" link add v$i type veth peer name eth0 netns "$P-c$i"
  ip -n "$P-br" link set v$i mtu 1450 master br0 up
  ip -n "$P-c$i" link set eth0 mtu 1450 up; ip -n "$P-c$i" addr add 10.0.0.$((i+1))/24 dev eth0
done
ip netns exec "$P-c2" iperf3 -s -1 -D; sleep 0.3
bridge_gbps=$(ip netns exec "$P-c1" iperf3 -c 10.0.0.3 -t "$T" -J | gbps)

# (3) kernel VXLAN between two hosts, Docker-style
kernel_vxlan
ip netns exec "$P-kc2" iperf3 -s -1 -D; sleep 0.3
read -r kvx_gbps kvx_cpu <<< "$(iperf_cpu ip netns exec "$P-kc1" iperf3 -c 10.0.2.3 -t "$T" -J)"
ip netns exec "$P-kc2" iperf3 -s -1 -D -p 5203; sleep 0.3
read -r kvx4_gbps kvx4_cpu <<< "$(iperf_cpu ip netns exec "$P-kc1" iperf3 -c 10.0.2.3 -p 5203 -P 4 -t "$T" -J)"
# Round trip: sockperf UDP ping-pong (it reports half the round trip, in microseconds).
lat() { sockperf pp -i "$1" -p 11112 -t "$T" 2>&1 | awk '/percentile 50.000/{p50=$NF} /percentile 99.000/{p99=$NF} END{print p50, p99}'; }
ip netns exec "$P-kc2" sockperf sr -p 11112 > /dev/null 2>&1 &
sp=$!; sleep 0.5
read -r kvx_lat50 kvx_lat99 <<< "$(ip netns exec "$P-kc1" bash -c "$(declare -f lat); T=$T; lat 10.0.2.3")"
kill "$sp"; wait "$sp" 2>/dev/null || true
# UDP bulk as QUIC stacks send it: UDP_SEGMENT super-datagrams, received with UDP_GRO.
UB=$PWD/benches/udp-bulk.py
ip netns exec "$P-kc2" python3 "$UB" recv 7000 "$T" > "$D/kub" & ub=$!; sleep 0.5
ip netns exec "$P-kc1" python3 "$UB" send 10.0.2.3 7000 "$T"; wait "$ub"
kvx_ubulk=$(cat "$D/kub")

# (2) overlayd, one node
start "$P-s" "$P-br"
S="$D/$P-s.sock"
$C --socket "$S" network create bench >/dev/null
$C --socket "$S" service create --name srv --network bench -- iperf3 -s >/dev/null
$C --socket "$S" service create --name cli --network bench -- sleep infinity >/dev/null
wait_running "$S" srv 1; wait_running "$S" cli 1; sleep 0.5
single_gbps=$($C --socket "$S" exec cli.1 -- iperf3 -c "$(addr_of "$S" srv.1)" -t "$T" -J | gbps)
vip_of() { $C --socket "$1" service inspect "$2" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0])'; }
single_vip_gbps=$($C --socket "$S" exec cli.1 -- iperf3 -c "$(vip_of "$S" srv)" -t "$T" -J | gbps)

# Services on one node: nginx behind a VIP (one backend), sockperf, and the resolver.
mkdir -p "$D/www"; echo ok > "$D/www/index.html"; chmod -R 755 "$D"
cat > "$D/nginx.conf" <<EOC
worker_processes 1; pid $D/nginx.pid; error_log /dev/null; daemon off;
events { worker_connections 4096; }
http { access_log off; server { listen 80 backlog=4096; root $D/www; keepalive_requests 100000; } }
EOC
# Two identical backends, one per mode: the client's TCP timestamps and initial sequence
# numbers depend on the destination address, so a server that saw direct connections
# rejects VIP ones from the same ports while in TIME_WAIT (and the other way round).
sed "s|nginx.pid|nginx-vip.pid|" "$D/nginx.conf" > "$D/nginx-vip.conf"
$C --socket "$S" service create --name web --network bench -- nginx -c "$D/nginx.conf" >/dev/null
$C --socket "$S" service create --name webv --network bench -- nginx -c "$D/nginx-vip.conf" >/dev/null
$C --socket "$S" service create --name pp --network bench -- sockperf sr --tcp -p 11111 >/dev/null
wait_running "$S" web 1; wait_running "$S" webv 1; wait_running "$S" pp 1; sleep 1
wrk_rps() { $C --socket "$S" exec cli.1 -- wrk -t1 -c32 -d"${T}s" -H 'Connection: close' "http://$1/" | awk '/Requests\/sec/{print $2}'; }
# As ../shared/bench/anchor-lb.sh: a wide port range and TIME_WAIT reuse on the client, so
# fewer new connections collide with the server's TIME_WAIT. Interleaved twice and averaged:
# this rate swings from run to run here.
$C --socket "$S" exec cli.1 -- sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
web_ip=$(addr_of "$S" web.1); web_vip=$(vip_of "$S" webv)
d1=$(wrk_rps "$web_ip"); v1=$(wrk_rps "$web_vip"); d2=$(wrk_rps "$web_ip"); v2=$(wrk_rps "$web_vip")
conn_direct=$(python3 -c "print('%.0f' % (($d1+$d2)/2))"); conn_vip=$(python3 -c "print('%.0f' % (($v1+$v2)/2))")
echo "new connections/s, each run: direct $d1 $d2, VIP $v1 $v2"
pct() { # $1 address; prints "p50 p99" in microseconds (sockperf reports a one-way half-RTT)
  $C --socket "$S" exec cli.1 -- sockperf pp --tcp -i "$1" -p 11111 -t "$T" 2>&1 |
    awk '/percentile 50.000/{p50=$NF} /percentile 99.000/{p99=$NF} END{print p50, p99}'; }
read -r lat_direct50 lat_direct99 <<< "$(pct "$(addr_of "$S" pp.1)")"
read -r lat_vip50 lat_vip99 <<< "$(pct "$(vip_of "$S" pp)")"
printf 'whoami A\ntasks.whoami A\n' > "$D/queries"
$C --socket "$S" service create --name whoami --network bench --replicas 2 -- sleep infinity >/dev/null
wait_running "$S" whoami 2; sleep 1
dns_qps=$($C --socket "$S" exec cli.1 -- dnsperf -s 127.0.0.11 -d "$D/queries" -l "$T" -c 4 -Q 1000000 2>/dev/null | awk '/Queries per second/{print $4}')
dnsmasq_qps=$(bash ../shared/bench/anchor-dns.sh "$T" | awk '/Queries per second/{print $4}')

kpps() { python3 -c 'import json,sys;e=json.load(sys.stdin)["end"]["sum"];print("%.0f" % (e["packets"]*(1-e["lost_percent"]/100)/e["seconds"]/1e3))'; }
# small packets over the kernel VXLAN overlay: UDP, 64-byte payloads, unlimited rate
ip netns exec "$P-kc2" iperf3 -s -1 -D -p 5202; sleep 0.3
kvx_kpps=$(ip netns exec "$P-kc1" iperf3 -c 10.0.2.3 -p 5202 -u -l 64 -b 0 -t "$T" -J | kpps)

# (4) overlayd, two nodes over a veth underlay
overlay_pair
$C --socket "$M" network create span >/dev/null
$C --socket "$M" service create --name x --network span --replicas 2 -- iperf3 -s >/dev/null
wait_running "$M" x 2; sleep 0.5
# x.1 and x.2 are spread over the two nodes; run the client in x.1 against x.2.
x2=$(addr_of "$M" x.2)
read -r multi_gbps multi_cpu <<< "$(iperf_cpu $C --socket "$M" exec x.1 -- iperf3 -c "$x2" -t "$T" -J)"
read -r multi4_gbps multi4_cpu <<< "$(iperf_cpu $C --socket "$M" exec x.1 -- iperf3 -c "$x2" -P 4 -t "$T" -J)"
$C --socket "$M" exec x.2 -- sockperf sr -p 11112 > /dev/null 2>&1 &
sp=$!; sleep 0.5
read -r multi_lat50 multi_lat99 <<< "$($C --socket "$M" exec x.1 -- bash -c "$(declare -f lat); T=$T; lat $x2")"
kill "$sp"; wait "$sp" 2>/dev/null || true
nodes=$($C --socket "$M" service ps x | awk 'NR>1{print $3}' | sort -u | wc -l)
$C --socket "$M" exec x.2 -- python3 "$UB" recv 7000 "$T" > "$D/oub" & ub=$!; sleep 0.5
$C --socket "$M" exec x.1 -- python3 "$UB" send "$x2" 7000 "$T"; wait "$ub"
multi_ubulk=$(cat "$D/oub")
$C --socket "$M" exec x.2 -- iperf3 -s -1 -D -p 5202; sleep 0.3
multi_kpps=$($C --socket "$M" exec x.1 -- iperf3 -c "$(addr_of "$M" x.2)" -p 5202 -u -l 64 -b 0 -t "$T" -J | kpps)
# Through a VIP across nodes: service v's one task, from the x task on the other node.
$C --socket "$M" service create --name v --network span -- iperf3 -s >/dev/null
wait_running "$M" v 1; sleep 1
vnode=$($C --socket "$M" inspect v.1 | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["node"])')
xc=$($C --socket "$M" service ps x | awk -v n="$vnode" 'NR>1 && $3!=n{print $2; exit}')
multi_direct_gbps=$($C --socket "$M" exec "$xc" -- iperf3 -c "$(addr_of "$M" v.1)" -t "$T" -J | gbps)
multi_vip_gbps=$($C --socket "$M" exec "$xc" -- iperf3 -c "$(vip_of "$M" v)" -t "$T" -J | gbps)

# Encrypted network across the same two nodes (issue 9), and tinc with AES next to it.
$C --socket "$M" network create -o encrypted sec >/dev/null
$C --socket "$M" service create --name y --network sec --replicas 2 -- iperf3 -s >/dev/null
wait_running "$M" y 2; sleep 1
ynodes=$($C --socket "$M" service ps y | awk 'NR>1{print $3}' | sort -u | wc -l)
enc_gbps=$($C --socket "$M" exec y.1 -- iperf3 -c "$(addr_of "$M" y.2)" -t "$T" -J | gbps)
tinc_gbps=$(bash ../shared/bench/anchor-tinc.sh "$T" aes-256-cbc | awk '{print $(NF-1)}')

printf '%-52s %8s Gbit/s\n' "(1) kernel bridge + veth, same host" "$bridge_gbps"
printf '%-52s %8s Gbit/s\n' "(2) overlayd, two tasks on one node" "$single_gbps"
printf '%-52s %8s Gbit/s\n' "(3) kernel VXLAN overlay, two hosts" "$kvx_gbps"
printf '%-52s %8s Gbit/s\n' "(4) overlayd, two nodes ($nodes distinct), VXLAN/UDP 4789" "$multi_gbps"
printf '%-52s %8s kpps\n' "(3) kernel VXLAN, 64 B UDP received" "$kvx_kpps"
printf '%-52s %8s kpps\n' "(4) overlayd two nodes, 64 B UDP received" "$multi_kpps"
printf '%-52s %8s\n' "ratio (2)/(1) same node" "$(ratio "$single_gbps" "$bridge_gbps")"
printf '%-52s %8s\n' "ratio (4)/(3) across nodes" "$(ratio "$multi_gbps" "$kvx_gbps")"
printf '%-52s %8s\n' "ratio (4)/(3) across nodes, 64 B UDP packets" "$(ratio "$multi_kpps" "$kvx_kpps")"
echo "-- services --"
printf '%-52s %8s Gbit/s\n' "(2) one node, straight to the task" "$single_gbps"
printf '%-52s %8s Gbit/s\n' "(2v) one node, through the service VIP" "$single_vip_gbps"
printf '%-52s %8s Gbit/s\n' "(4d) two nodes, straight to the task" "$multi_direct_gbps"
printf '%-52s %8s Gbit/s\n' "(4v) two nodes, through the service VIP" "$multi_vip_gbps"
printf '%-52s %8s conn/s\n' "new connections/s straight to the backend" "$conn_direct"
printf '%-52s %8s conn/s\n' "new connections/s through the VIP" "$conn_vip"
printf '%-52s %8s us\n' "sockperf half-RTT p50/p99, straight" "$lat_direct50/$lat_direct99"
printf '%-52s %8s us\n' "sockperf half-RTT p50/p99, through the VIP" "$lat_vip50/$lat_vip99"
printf '%-52s %8s q/s\n' "DNS at 127.0.0.11 in a task (overlayd)" "$dns_qps"
printf '%-52s %8s q/s\n' "DNS, dnsmasq in a namespace (anchor)" "$dnsmasq_qps"
printf '%-52s %8s\n' "ratio (2v)/(2) VIP throughput, one node" "$(ratio "$single_vip_gbps" "$single_gbps")"
printf '%-52s %8s\n' "ratio (4v)/(4d) VIP throughput, two nodes" "$(ratio "$multi_vip_gbps" "$multi_direct_gbps")"
printf '%-52s %8s\n' "ratio new connections/s, VIP / direct" "$(ratio "$conn_vip" "$conn_direct")"
printf '%-52s %8s\n' "ratio DNS q/s, overlayd / dnsmasq" "$(ratio "$dns_qps" "$dnsmasq_qps")"
printf '%-52s %8s Gbit/s\n' "(4e) encrypted network, two nodes ($ynodes distinct), ESP" "$enc_gbps"
printf '%-52s %8s Gbit/s\n' "tinc switch mode, aes-256-cbc (anchor)" "$tinc_gbps"
printf '%-52s %8s\n' "ratio (4e)/(3) encrypted vs kernel VXLAN" "$(ratio "$enc_gbps" "$kvx_gbps")"
printf '%-52s %8s\n' "ratio (4e)/(4) encrypted vs our plain overlay" "$(ratio "$enc_gbps" "$multi_gbps")"
printf '%-52s %8s\n' "ratio (4e)/tinc" "$(ratio "$enc_gbps" "$tinc_gbps")"
echo "-- the data path on every core (issue 10) --"
printf '%-52s %8s Gbit/s\n' "(3) kernel VXLAN, 4 parallel streams" "$kvx4_gbps"
printf '%-52s %8s Gbit/s\n' "(4) overlayd, 4 parallel streams" "$multi4_gbps"
printf '%-52s %8s\n' "CPU-s per GB, kernel VXLAN, 1 / 4 streams" "$kvx_cpu / $kvx4_cpu"
printf '%-52s %8s\n' "CPU-s per GB, overlayd, 1 / 4 streams" "$multi_cpu / $multi4_cpu"
printf '%-52s %8s Gbit/s\n' "(3) kernel VXLAN, UDP bulk (UDP_SEGMENT/UDP_GRO)" "$kvx_ubulk"
printf '%-52s %8s Gbit/s\n' "(4) overlayd, UDP bulk (UDP_SEGMENT/UDP_GRO)" "$multi_ubulk"
printf '%-52s %8s us\n' "half round trip p50/p99, kernel VXLAN" "$kvx_lat50/$kvx_lat99"
printf '%-52s %8s us\n' "half round trip p50/p99, overlayd" "$multi_lat50/$multi_lat99"
printf '%-52s %8s\n' "ratio 1 stream, overlayd / kernel" "$(ratio "$multi_gbps" "$kvx_gbps")"
printf '%-52s %8s\n' "ratio 4 streams, overlayd / kernel" "$(ratio "$multi4_gbps" "$kvx4_gbps")"
printf '%-52s %8s\n' "ratio UDP bulk, overlayd / kernel" "$(ratio "$multi_ubulk" "$kvx_ubulk")"
printf '%-52s %8s\n' "ratio CPU per GB, 1 stream, overlayd / kernel" "$(ratio "$multi_cpu" "$kvx_cpu")"
printf '%-52s %8s\n' "ratio CPU per GB, 4 streams, overlayd / kernel" "$(ratio "$multi4_cpu" "$kvx4_cpu")"
printf '%-52s %8s us\n' "added round trip p50 / p99 (2 x half-RTT difference)" "$(python3 -c "print('%.1f / %.1f' % (2*($multi_lat50-$kvx_lat50), 2*($multi_lat99-$kvx_lat99)))")"
