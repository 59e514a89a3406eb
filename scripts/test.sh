#!/usr/bin/env bash
# Runs every test: unit and property tests of all crates, then the end-to-end tests (real
# namespaces, TAPs, overlayd processes), which need root: without it this script refuses
# rather than report green having tested nothing end to end (`cargo test --workspace` runs
# the unit tests alone, the end-to-end ones skipping visibly); then every fuzz target for
# FUZZ_SECONDS each (default 10; 0 skips them) on its committed corpus, on stable Rust
# (fuzz/run.sh; its own target directory, fuzz/target).
# Usage: sudo scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh runs the end-to-end tests, which need root: run it as root (sudo scripts/test.sh)" >&2
    exit 1
fi
scripts/install-deps.sh
# The end-to-end tests drive the real binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
fuzz_seconds=${FUZZ_SECONDS:-10}
if [ "$fuzz_seconds" -gt 0 ]; then fuzz/run.sh "$fuzz_seconds"; fi
