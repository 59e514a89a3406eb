#!/usr/bin/env bash
# The longest forwarding gap while a node's overlayd is upgraded in place (issue 24), under
# one iperf3 TCP stream between tasks on two nodes: the e2e bench `upgrade_gap_under_iperf`
# (tests/tests/upgrade.rs) with a UDP probe (a datagram every ms) beside the stream; node 1
# is upgraded N times (SIGUSR2, the binary replaced each time), 4 s apart. Then the same
# run without upgrades, for the machine's own jitter and the stream's own retransmits.
# Usage (root): benches/upgrade-gap.sh [N] [debug]    Release binaries unless "debug".
set -euo pipefail
N=${1:-5}
cd "$(dirname "$0")/.."
profile=(--release)
[ "${2:-}" = debug ] && profile=()
cargo build "${profile[@]}" -p overlay-router --bin overlayd
cargo build "${profile[@]}" -p overlay-cli --bin overlayctl
for n in "$N" 0; do
  UPGRADES=$n CI=true cargo test "${profile[@]}" -p overlay-e2e --test upgrade \
    upgrade_gap_under_iperf -- --ignored --nocapture 2>&1 | grep '^upgrade-gap:'
done
