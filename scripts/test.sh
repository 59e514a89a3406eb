#!/usr/bin/env bash
# Runs every test: unit and property tests of all crates, then the end-to-end tests (real
# namespaces, TAPs, overlayd processes; they need root and skip visibly without it), then
# every fuzz target for FUZZ_SECONDS each (default 10; 0 skips them) on its committed
# corpus, on stable Rust (fuzz/run.sh; its own target directory, fuzz/target).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then scripts/install-deps.sh; fi
# The end-to-end tests drive the real binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
fuzz_seconds=${FUZZ_SECONDS:-10}
if [ "$fuzz_seconds" -gt 0 ]; then fuzz/run.sh "$fuzz_seconds"; fi
