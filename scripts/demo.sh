#!/usr/bin/env bash
# A working multi-node overlay on this one machine: three overlayd nodes, each in its own
# network namespace on a bridged underlay (198.18.0.0/24), joined into one cluster over QUIC
# with mutual TLS. One overlay network spans them (VXLAN over UDP 4789, in userspace); tasks
# on different nodes ping each other and move real TCP traffic; a published port answers on
# every node (the routing mesh); an encrypted network carries ESP; a container made through
# the CNI plugin joins the network. Cleans up on exit.
# Usage (root): scripts/demo.sh    (DEMO_PROFILE=debug: debug binaries, quicker to build)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cleanup.sh
scripts/install-deps.sh
PROFILE=${DEMO_PROFILE:-release}
if [ "$PROFILE" = release ]; then cargo build --release --bins -q; else cargo build --bins -q; fi
BIN=${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE; D=$(mktemp -d); P=demo$$
C="$BIN/overlayctl"
# Runs to the end whatever already died: every daemon is asked to stop and waited for (it
# stops its tasks and removes their namespaces), then the demo's namespaces go.
cleanup() {
  set +e
  stop_daemons "$D" 30
  remove_namespaces "$P" sw n1 n2 n3 ctr
  rm -rf "$D"
}
trap cleanup EXIT
trap "exit 130" INT TERM  # so that the EXIT trap cleans up on ^C or kill too
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
addr_of() { $C inspect "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["attachments"][0]["address"])'; }

echo "# underlay: three hosts on a bridge, 198.18.0.1-3"
ip netns add "$P-sw"; ip -n "$P-sw" link add br0 type bridge; ip -n "$P-sw" link set br0 up
for i in 1 2 3; do
  ip netns add "$P-n$i"; ip -n "$P-n$i" link set lo up
  ip -n "$P-sw" link add p$i type veth peer name u0 netns "$P-n$i"
  ip -n "$P-sw" link set p$i master br0 up
  ip -n "$P-n$i" addr add 198.18.0.$i/24 dev u0; ip -n "$P-n$i" link set u0 up
done
start() { # $1 node index, extra args...
  local i=$1; shift
  nsenter --net=/run/netns/"$P-n$i" "$BIN/overlayd" --node n$i --advertise-addr 198.18.0.$i \
    --state-dir "$D/n$i" --socket "$D/n$i.sock" --log-level warn "$@" > "$D/n$i.log" 2>&1 &
  echo $! > "$D/n$i.pid"
  for _ in $(seq 50); do [ -S "$D/n$i.sock" ] && return; sleep 0.1; done
  cat "$D/n$i.log"; exit 1
}
start 1 --init
export OVERLAY_SOCKET=$D/n1.sock
step $C cluster join-token
TOKEN=$($C cluster join-token -q)
start 2 --join 198.18.0.1 --token "$TOKEN"
start 3 --join 198.18.0.1 --token "$TOKEN"
sleep 1
step $C node ls

step $C network create my-demo
step $C service create --name whoami --network my-demo --replicas 3 -- iperf3 -s
for _ in $(seq 100); do $C service ls | grep -q ' 3/3 ' && break; sleep 0.1; done
step $C service ps whoami
step $C network inspect my-demo
T2=$(addr_of whoami.2); T3=$(addr_of whoami.3)
echo; echo "# whoami.1 pings whoami.2 and whoami.3 on other nodes, through userspace VXLAN"
step $C exec whoami.1 -- ping -c 2 "$T2"
step $C exec whoami.1 -- ping -c 2 "$T3"
step $C exec whoami.1 -- iperf3 -c "$T3" -t 3
echo; echo "# the same cluster seen from a worker: it reads, but changes are the manager's (its certificate says worker)"
step $C --socket "$D/n3.sock" service ps whoami
step $C --socket "$D/n2.sock" service scale whoami=4 || true
step $C service scale whoami=4
for _ in $(seq 100); do $C service ls | grep -q ' 4/4 ' && break; sleep 0.1; done
echo; echo "# drain n2: its tasks move to the other nodes"
step $C node update --availability drain n2
# (past tasks, listed as \_ whoami.N under their slot, are left out of the check)
for _ in $(seq 100); do $C service ls | grep -q ' 4/4 ' && ! $C service ps whoami | grep -v '\\_' | awk '{print $3}' | grep -qx n2 && break; sleep 0.1; done
step $C service ps whoami
step $C node update --availability active n2
echo; echo "# the routing mesh: publish a port, and every node answers on it, from each replica in turn"
cat > "$D/hello.py" <<'EOP'
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + os.environ["OVERLAY_TASK_NAME"] + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()
EOP
step $C service create --name hello --network my-demo --replicas 2 -p 8080:8000 -- python3 "$D/hello.py"
for _ in $(seq 100); do $C service ls | grep -q ' 2/2 ' && break; sleep 0.1; done
step $C service ls
sleep 0.5
for i in 1 2 3 1 2 3; do step nsenter --net=/run/netns/"$P-n1" curl -s --max-time 5 "198.18.0.$i:8080"; done
echo; echo "# an encrypted network: frames between nodes sealed in ESP (AES-256-GCM) under keys the manager hands out"
step $C network create -o encrypted vault
step $C service create --name safe --network vault --replicas 2 -- sleep infinity
for _ in $(seq 100); do [ "$($C service ps safe | grep -c ' Running ')" = 2 ] && break; sleep 0.1; done
step $C exec safe.1 -- ping -c 2 "$(addr_of safe.2)"
step $C network rotate-key vault
step $C exec safe.1 -- ping -c 2 "$(addr_of safe.2)"
echo; echo "# a container from another runtime, through the CNI plugin (a namespace stands in for it)"
ip netns add "$P-ctr"
CONF='{"cniVersion":"1.0.0","name":"my-demo","type":"overlay-cni","socket":"'"$D/n2.sock"'"}'
cni() { echo "$CONF" | CNI_COMMAND=$1 CNI_CONTAINERID=demo-ctr CNI_NETNS=/run/netns/$P-ctr CNI_IFNAME=eth0 "$BIN/overlay-cni"; }
step cni ADD
step ip netns exec "$P-ctr" ping -c 2 "$T3"
step ip netns exec "$P-ctr" dig +short @127.0.0.11 whoami tasks.whoami
step cni DEL
echo; echo "# stop node n3: the manager marks it down within seconds"
kill -TERM "$(cat "$D/n3.pid")"; sleep 5  # its tasks keep running, cut off, until cleanup
step $C node ls
step $C stats
echo; echo "demo done; stopping the nodes and removing their tasks (namespaces, TAPs)"
