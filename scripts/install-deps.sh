#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need on a fresh Debian machine
# (one that has only Rust, gcc, Python and git): docker.io and busybox-static are for the
# Docker plugin's end-to-end test (dockerd runs only inside the test's namespaces);
# etcd-server and etcd-client (etcd 3.4, etcdctl) for the manager's etcd store and its test
# (etcd runs only inside the test's namespace); protobuf-compiler and libprotobuf-dev (its
# well-known .proto files) because the etcd-client crate's build runs protoc.
# prometheus (promtool and the server) for the metrics test (runs only inside its namespace).
# Idempotent; needs root.
set -euo pipefail
need=()
for pkg in iproute2 iputils-ping iperf3 curl python3 tcpdump tshark ethtool bridge-utils procps util-linux dnsutils docker.io busybox-static \
    etcd-server etcd-client protobuf-compiler libprotobuf-dev prometheus; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq
  # Install services without starting them (docker.io would start a host dockerd that makes
  # a bridge and iptables rules outside the tests' namespaces): the standard policy-rc.d.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
