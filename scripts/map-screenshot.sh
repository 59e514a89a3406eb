#!/usr/bin/env bash
# Makes docs/map.png: the cluster map (overlayd --metrics-addr, page `/`) drawn by a headless
# Chromium during the services test (tests/tests/services.rs: three nodes, whoami x3 under a
# bounded load through its VIP from a client task). Root; installs chromium if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "ok installed" ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
cargo build --workspace -q
OVERLAY_MAP_SCREENSHOT="$PWD/docs/map.png" CI=true cargo test -q -p overlay-e2e --test services -- --nocapture
echo "wrote docs/map.png"
