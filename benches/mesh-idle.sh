#!/usr/bin/env bash
# The routing mesh with K idle connections held open, next to HAProxy in the same run.
# Topology as benches/mesh-compare.sh: a bridge with two overlayd nodes (m1, m2), a HAProxy
# host (h) and a client (c); two nginx tasks (one per node) published on 8080; HAProxy
# (TCP mode, round robin over the same tasks' ingress addresses, reached through kernel
# VXLAN). For each K in 0 2000 8000 15000 and for each of mesh (via m1) and HAProxy in turn:
#   - K idle connections are opened by benches/idle-hold.py (one request each, then silent,
#     spread over processes of at most 4 000: the fd limit here is 20 000 per process),
#   - new connections/s (wrk, Connection: close, 32 at once) and keep-alive p99 (wrk
#     --latency, 32 connections) are measured while they stay open,
#   - overlayd's RSS on m1 is read (mesh only): RSS per idle connection is
#     (RSS at K - RSS at 0) / K.
# HAProxy runs as two processes of one thread each on the same address (SO_REUSEPORT): one
# process could not hold 2 x 15 000 fds; two threads is what mesh-compare's HAProxy has.
# Usage (root): benches/mesh-idle.sh [seconds per measurement] [K...]
set -euo pipefail
T=${1:-3}
shift || true
KS=${*:-0 2000 8000 15000}
cd "$(dirname "$0")/.."
. benches/common.sh
P=mi$$
NS="sw m1 m2 h c"
bench_setup wrk nginx-light haproxy ethtool
ip -n "$P-sw" link add br0 type bridge; ip -n "$P-sw" link set br0 up
i=1; for n in m1 m2 h c; do
  ip -n "$P-sw" link add p$i type veth peer name u0 netns "$P-$n"
  ip -n "$P-sw" link set p$i master br0 up
  ip -n "$P-$n" addr add 198.18.7.$i/24 dev u0; ip -n "$P-$n" link set u0 up
  ip netns exec "$P-$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  i=$((i+1))
done
start m1 "$P-m1" --advertise-addr 198.18.7.1 --init --ingress-max-connections 20000
S="$D/m1.sock"
start m2 "$P-m2" --advertise-addr 198.18.7.2 --join 198.18.7.1 --token "$($C --socket "$S" cluster join-token -q)" --ingress-max-connections 20000
wait_ready "$S" 2

mkdir -p "$D/www"; echo ok > "$D/www/index.html"; chmod -R 755 "$D/www"
# Idle connections are kept (keepalive_timeout) and many (worker_connections) per task.
cat > "$D/nginx.sh" <<EOC
#!/bin/sh
conf=$D/nginx-\$OVERLAY_TASK_NAME.conf
echo "worker_processes 1; worker_rlimit_nofile 20000; pid $D/nginx-\$OVERLAY_TASK_NAME.pid; error_log /dev/null; daemon off;
events { worker_connections 19000; }
http { access_log off; keepalive_timeout 600s; server { listen 80 backlog=4096; root $D/www; keepalive_requests 1000000; } }" > \$conf
exec nginx -c \$conf
EOC
chmod 755 "$D/nginx.sh"
$C --socket "$S" network create front >/dev/null
$C --socket "$S" service create --name web --network front --replicas 2 -p 8080:80 -- "$D/nginx.sh" >/dev/null
wait_running "$S" web 2
ingress_of() { $C --socket "$S" inspect "$1" | python3 -c 'import json,sys;print([a["address"] for a in json.load(sys.stdin)[0]["attachments"] if a["network"]=="ingress"][0])'; }
node_of() { $C --socket "$S" inspect "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["node"])'; }
declare -A NODE_ADDR=([m1]=198.18.7.1 [m2]=198.18.7.2)
w1=$(ingress_of web.1); w2=$(ingress_of web.2)

kvtep() { # $1 namespace suffix, $2 underlay address, $3 ingress address
  local ns="$P-$1" mac
  mac=$(printf '02:42:%02x:%02x:%02x:%02x' $(echo "$3" | tr . ' '))
  $C --socket "$S" network vtep add ingress --address "$2" --mac "$mac" --ip "$3" >/dev/null
  ip -n "$ns" link add vx0 type vxlan id 4096 dstport 4789 local "$2" nolearning
  ip -n "$ns" link set vx0 mtu 1450 address "$mac" up
  ip -n "$ns" addr add "$3/16" dev vx0
  ip netns exec "$ns" ethtool -K vx0 tx off >/dev/null
  for t in web.1 web.2; do
    local tip tmac at
    tip=$(ingress_of $t); tmac=$(printf '02:42:%02x:%02x:%02x:%02x' $(echo "$tip" | tr . ' '))
    at=${NODE_ADDR[$(node_of $t)]}
    bridge -n "$ns" fdb add "$tmac" dev vx0 dst "$at" self permanent
    ip -n "$ns" neigh add "$tip" lladdr "$tmac" dev vx0 nud permanent
  done
}
kvtep h 198.18.7.3 10.255.201.1
for n in 1 2; do
  cat > "$D/haproxy$n.cfg" <<EOC
global
  maxconn 9000
  nbthread 1
  pidfile $D/haproxy$n.pid
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
frontend web
  bind 198.18.7.3:8080
  default_backend web
backend web
  balance roundrobin
  server w1 $w1:80
  server w2 $w2:80
EOC
  ip netns exec "$P-h" haproxy -D -f "$D/haproxy$n.cfg"
done
ip netns exec "$P-c" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
ip netns exec "$P-h" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
sleep 1
cx() { ip netns exec "$P-c" "$@"; }
MESH=198.18.7.1; HAP=198.18.7.3
for host in $MESH $HAP; do
  cx curl -sf --max-time 5 "http://$host:8080/" >/dev/null || { echo "no answer from $host"; cat "$D"/m*.log; exit 1; }
done

active() { $C --socket "$S" stats 2>/dev/null | python3 -c 'import json,sys
try: print(json.load(sys.stdin)["ingress"]["8080/tcp"]["active"])
except Exception: print("?")'; }
HOLDERS=()
hold() { # $1 host, $2 count: K idle connections over processes of at most 4 000
  local left=$2 n i=0
  HOLDERS=()
  while [ "$left" -gt 0 ]; do
    n=$((left < 4000 ? left : 4000)); left=$((left - n)); i=$((i + 1))
    rm -f "$D/hold$i"
    # Not through cx: $! must be the holder itself, so that release() ends it.
    ip netns exec "$P-c" python3 benches/idle-hold.py "$1" 8080 "$n" > "$D/hold$i" 2>&1 &
    HOLDERS+=("$!:$D/hold$i")
  done
  local h pid f
  for h in ${HOLDERS[@]+"${HOLDERS[@]}"}; do
    pid=${h%%:*}; f=${h#*:}
    while ! grep -q ready "$f" 2>/dev/null; do
      pid_running "$pid" || { echo "idle holder failed: $(cat "$f")"; exit 1; }
      sleep 0.2
    done
  done
}
release() {
  local h
  for h in ${HOLDERS[@]+"${HOLDERS[@]}"}; do kill "${h%%:*}" 2>/dev/null || true; done
  for h in ${HOLDERS[@]+"${HOLDERS[@]}"}; do wait "${h%%:*}" 2>/dev/null || true; done
  HOLDERS=()
  # The closes go through before the next point (the mesh's are counted: at most 20 s).
  local i
  for i in $(seq 100); do [ "$(active)" = 0 ] && break; sleep 0.2; done
  [ "$(active)" = 0 ] || echo "after release: $(active) mesh connections still open"
  sleep 1
}
new_conns() { cx wrk -t1 -c32 -d"${T}s" -H 'Connection: close' "http://$1:8080/" | awk '/Requests\/sec/{print $2}'; }
p99_ms() {
  cx wrk -t1 -c32 -d"${T}s" --latency "http://$1:8080/" | awk '$1=="99%"{v=$2;
    if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}
    printf "%.2f", v}'
}
rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$(cat "$D/m1.pid")/status"; }

declare -A R
for K in $KS; do
  hold $MESH "$K"
  R[mesh_act$K]=$(active)
  R[rss$K]=$(rss_kib)
  R[mesh_cps$K]=$(new_conns $MESH)
  R[mesh_p99$K]=$(p99_ms $MESH)
  release
  hold $HAP "$K"
  R[hap_cps$K]=$(new_conns $HAP)
  R[hap_p99$K]=$(p99_ms $HAP)
  release
  echo "K=$K: mesh ${R[mesh_cps$K]} conn/s p99 ${R[mesh_p99$K]} ms (active ${R[mesh_act$K]}, RSS ${R[rss$K]} KiB);" \
    "HAProxy ${R[hap_cps$K]} conn/s p99 ${R[hap_p99$K]} ms"
done

K0=${KS%% *}
printf '\n| idle K | mesh conn/s | vs K=%s | HAProxy conn/s | vs K=%s | mesh/HAProxy | mesh p99 ms | HAProxy p99 ms | overlayd RSS MiB | KiB per idle conn |\n' "$K0" "$K0"
echo '|---|---|---|---|---|---|---|---|---|---|'
for K in $KS; do
  per=-; [ "$K" != 0 ] && per=$(python3 -c "print('%.1f' % ((${R[rss$K]}-${R[rss$K0]})/$K))")
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$K" \
    "${R[mesh_cps$K]}" "$(ratio "${R[mesh_cps$K]}" "${R[mesh_cps$K0]}")" \
    "${R[hap_cps$K]}" "$(ratio "${R[hap_cps$K]}" "${R[hap_cps$K0]}")" \
    "$(ratio "${R[mesh_cps$K]}" "${R[hap_cps$K]}")" \
    "${R[mesh_p99$K]}" "${R[hap_p99$K]}" \
    "$(python3 -c "print('%.1f' % (${R[rss$K]}/1024))")" "$per"
done
