#!/usr/bin/env bash
# The routing mesh next to its alternatives, every path measured in the same run.
# Underlay: a bridge with two overlayd nodes (m1, m2), a HAProxy host (h) and a client (c).
# Two nginx tasks (one per node) are published on 8080, one iperf3 task on 5201.
#   mesh:    client -> m1:8080 or m2:5201 (the node without the iperf3 task) -> overlayd's
#            proxy -> smoltcp endpoint -> ingress overlay -> task
#   haproxy: client -> h:8080 / h:5201 -> HAProxy (Debian's, TCP mode, round robin over the
#            same tasks) -> kernel VXLAN on the ingress network -> task
#   direct:  client -> task, itself on the ingress network through a kernel VXLAN device
# Rows: requests/s with a new connection per request (wrk, Connection: close, 32 at once)
# and one TCP stream's throughput (iperf3); ratios mesh/haproxy and mesh/direct.
# Usage (root): benches/mesh-compare.sh [seconds]    Builds release binaries first.
set -euo pipefail
T=${1:-5}
cd "$(dirname "$0")/.."
. benches/common.sh
P=mc$$
NS="sw m1 m2 h c"
bench_setup iperf3 wrk nginx-light haproxy ethtool
ip -n "$P-sw" link add br0 type bridge; ip -n "$P-sw" link set br0 up
i=1; for n in m1 m2 h c; do
  ip -n "$P-sw" link add p$i type veth peer name u0 netns "$P-$n"
  ip -n "$P-sw" link set p$i master br0 up
  ip -n "$P-$n" addr add 198.18.6.$i/24 dev u0; ip -n "$P-$n" link set u0 up
  ip netns exec "$P-$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  i=$((i+1))
done
start m1 "$P-m1" --advertise-addr 198.18.6.1 --init
S="$D/m1.sock"
start m2 "$P-m2" --advertise-addr 198.18.6.2 --join 198.18.6.1 --token "$($C --socket "$S" cluster join-token -q)"
wait_ready "$S" 2

mkdir -p "$D/www"; echo ok > "$D/www/index.html"; chmod -R 755 "$D/www"
# Two replicas of one command: each writes its own config (its own pid file) at start.
cat > "$D/nginx.sh" <<EOC
#!/bin/sh
conf=$D/nginx-\$OVERLAY_TASK_NAME.conf
echo "worker_processes 1; pid $D/nginx-\$OVERLAY_TASK_NAME.pid; error_log /dev/null; daemon off;
events { worker_connections 4096; }
http { access_log off; server { listen 80 backlog=4096; root $D/www; keepalive_requests 100000; } }" > \$conf
exec nginx -c \$conf
EOC
chmod 755 "$D/nginx.sh"
$C --socket "$S" network create front >/dev/null
$C --socket "$S" service create --name web --network front --replicas 2 -p 8080:80 -- "$D/nginx.sh" >/dev/null
$C --socket "$S" service create --name bulk --network front -p 5201:5201 -- iperf3 -s >/dev/null
wait_running "$S" web 2; wait_running "$S" bulk 1
ingress_of() { $C --socket "$S" inspect "$1" | python3 -c 'import json,sys;print([a["address"] for a in json.load(sys.stdin)[0]["attachments"] if a["network"]=="ingress"][0])'; }
node_of() { $C --socket "$S" inspect "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["node"])'; }
declare -A NODE_ADDR=([m1]=198.18.6.1 [m2]=198.18.6.2)
w1=$(ingress_of web.1); w2=$(ingress_of web.2); b1=$(ingress_of bulk.1)
bulk_node=$(node_of bulk.1)
via=198.18.6.1; [ "$bulk_node" = m1 ] && via=198.18.6.2

# The HAProxy host and the client join the ingress network through kernel VXLAN devices,
# declared to the cluster as external VTEPs (static FDB and neighbours, as Docker programs).
kvtep() { # $1 namespace suffix, $2 underlay address, $3 ingress address
  local ns="$P-$1" mac
  mac=$(printf '02:42:%02x:%02x:%02x:%02x' $(echo "$3" | tr . ' '))
  $C --socket "$S" network vtep add ingress --address "$2" --mac "$mac" --ip "$3" >/dev/null
  ip -n "$ns" link add vx0 type vxlan id 4096 dstport 4789 local "$2" nolearning
  ip -n "$ns" link set vx0 mtu 1450 address "$mac" up
  ip -n "$ns" addr add "$3/16" dev vx0
  ip netns exec "$ns" ethtool -K vx0 tx off >/dev/null
  for t in web.1 web.2 bulk.1; do
    local tip tmac at
    tip=$(ingress_of $t); tmac=$(printf '02:42:%02x:%02x:%02x:%02x' $(echo "$tip" | tr . ' '))
    at=${NODE_ADDR[$(node_of $t)]}
    bridge -n "$ns" fdb add "$tmac" dev vx0 dst "$at" self permanent
    ip -n "$ns" neigh add "$tip" lladdr "$tmac" dev vx0 nud permanent
  done
}
kvtep h 198.18.6.3 10.255.200.1
kvtep c 198.18.6.4 10.255.200.2
cat > "$D/haproxy.cfg" <<EOC
global
  maxconn 9000
  pidfile $D/haproxy.pid
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend web
  bind 198.18.6.3:8080
  default_backend web
backend web
  balance roundrobin
  server w1 $w1:80
  server w2 $w2:80
frontend bulk
  bind 198.18.6.3:5201
  default_backend bulk
backend bulk
  server b1 $b1:5201
EOC
ip netns exec "$P-h" haproxy -D -f "$D/haproxy.cfg"
ip netns exec "$P-c" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
sleep 1
cx() { ip netns exec "$P-c" "$@"; }
for url in "http://$via:8080/" "http://198.18.6.3:8080/" "http://$w1/"; do
  cx curl -sf --max-time 5 "$url" >/dev/null || { echo "no answer from $url"; cat "$D"/m*.log; exit 1; }
done
wrk_rps() { cx wrk -t1 -c32 -d"${T}s" -H 'Connection: close' "$1" | awk '/Requests\/sec/{print $2}'; }
# Interleaved twice and averaged: these rates swing from run to run here.
declare -A rps
for round in 1 2; do
  rps[mesh$round]=$(wrk_rps "http://$via:8080/")
  rps[haproxy$round]=$(wrk_rps "http://198.18.6.3:8080/")
  rps[direct$round]=$(wrk_rps "http://$w1/")
done
avg() { python3 -c "print('%.0f' % (($1+$2)/2))"; }
mesh_rps=$(avg "${rps[mesh1]}" "${rps[mesh2]}")
hap_rps=$(avg "${rps[haproxy1]}" "${rps[haproxy2]}")
direct_rps=$(avg "${rps[direct1]}" "${rps[direct2]}")
echo "requests/s, each run: mesh ${rps[mesh1]} ${rps[mesh2]}, haproxy ${rps[haproxy1]} ${rps[haproxy2]}, direct ${rps[direct1]} ${rps[direct2]}"
mesh_gbps=$(cx iperf3 -c "$via" -p 5201 -t "$T" -J | gbps)
hap_gbps=$(cx iperf3 -c 198.18.6.3 -p 5201 -t "$T" -J | gbps)
direct_gbps=$(cx iperf3 -c "$b1" -p 5201 -t "$T" -J | gbps)
# The other direction (a download: the task sends).
mesh_rgbps=$(cx iperf3 -R -c "$via" -p 5201 -t "$T" -J | gbps)
hap_rgbps=$(cx iperf3 -R -c 198.18.6.3 -p 5201 -t "$T" -J | gbps)
direct_rgbps=$(cx iperf3 -R -c "$b1" -p 5201 -t "$T" -J | gbps)

printf '%-52s %10s req/s\n' "mesh (overlayd proxy via node $via)" "$mesh_rps"
printf '%-52s %10s req/s\n' "HAProxy TCP mode + kernel VXLAN" "$hap_rps"
printf '%-52s %10s req/s\n' "direct to one task (kernel VXLAN)" "$direct_rps"
printf '%-52s %10s Gbit/s\n' "one stream through the mesh" "$mesh_gbps"
printf '%-52s %10s Gbit/s\n' "one stream through HAProxy" "$hap_gbps"
printf '%-52s %10s Gbit/s\n' "one stream direct to the task" "$direct_gbps"
printf '%-52s %10s Gbit/s\n' "one stream from the task, through the mesh" "$mesh_rgbps"
printf '%-52s %10s Gbit/s\n' "one stream from the task, through HAProxy" "$hap_rgbps"
printf '%-52s %10s Gbit/s\n' "one stream from the task, direct" "$direct_rgbps"
printf '%-52s %10s\n' "ratio requests/s, mesh / HAProxy" "$(ratio "$mesh_rps" "$hap_rps")"
printf '%-52s %10s\n' "ratio requests/s, mesh / direct" "$(ratio "$mesh_rps" "$direct_rps")"
printf '%-52s %10s\n' "ratio throughput, mesh / direct" "$(ratio "$mesh_gbps" "$direct_gbps")"
printf '%-52s %10s\n' "ratio throughput, mesh / HAProxy" "$(ratio "$mesh_gbps" "$hap_gbps")"
printf '%-52s %10s\n' "ratio throughput from the task, mesh / direct" "$(ratio "$mesh_rgbps" "$direct_rgbps")"
printf '%-52s %10s\n' "ratio throughput from the task, mesh / HAProxy" "$(ratio "$mesh_rgbps" "$hap_rgbps")"
