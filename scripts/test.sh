#!/usr/bin/env bash
# Runs every test: unit and property tests of all crates, then the end-to-end tests (real
# namespaces, TAPs, overlayd processes; they need root and skip visibly without it).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then scripts/install-deps.sh; fi
# The end-to-end tests drive the real binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
