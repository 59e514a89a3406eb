#!/usr/bin/env bash
# Builds every fuzz target on stable Rust and runs each for SECONDS on its committed corpus
# (fuzz/corpus/TARGET/); fails on any crash, naming the input that caused it.
#
# No nightly and no cargo-fuzz: libfuzzer-sys brings libFuzzer (a C++ compiler builds it),
# and the coverage libFuzzer steers by comes from LLVM's SanitizerCoverage with the flags
# `cargo fuzz build --sanitizer none` passes (stable rustc takes them). Like cargo-fuzz, the
# targets are built in release with debug assertions and overflow checks, for the host
# triple given explicitly so that build scripts and proc macros are not instrumented.
#
# Usage: fuzz/run.sh SECONDS [TARGET...]   (default: every [[bin]] of fuzz/Cargo.toml)
# Environment: FUZZ_TARGET_DIR (default fuzz/target), FUZZ_ARTIFACTS (default
# fuzz/artifacts): where crashing inputs are written.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n '/^\[\[bin\]\]/,/^name/s/^name = "\(.*\)"/\1/p' Cargo.toml)
fi
target_dir=${FUZZ_TARGET_DIR:-$PWD/target}
artifacts=${FUZZ_ARTIFACTS:-$PWD/artifacts}
host=$(rustc -vV | sed -n 's/^host: //p')

flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    --cfg fuzzing
    -Cdebug-assertions
    -Coverflow-checks
)
start=$SECONDS
echo "== fuzz: building ${#targets[@]} targets ($(rustc --version))"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTFLAGS="${flags[*]}" cargo build --release --target "$host" \
    --target-dir "$target_dir" "${bins[@]}"
echo "== fuzz: built in $((SECONDS - start)) s; ${seconds} s per target"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
passed=0
failed=()
for t in "${targets[@]}"; do
    corpus=corpus/$t
    if [ ! -d "$corpus" ]; then
        echo "fuzz $t: no corpus at fuzz/$corpus" >&2
        failed+=("$t")
        continue
    fi
    # New inputs go to a scratch corpus (the first directory), never into the tree.
    mkdir -p "$scratch/$t" "$artifacts/$t"
    log=$scratch/$t.log
    if "$target_dir/$host/release/$t" -max_total_time="$seconds" -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$t/" \
        "$scratch/$t" "$corpus" >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
        cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([^ ]*\).*/cov \1, features \2, corpus \3/p' <<<"$done_line")
        echo "fuzz $t: ok, ${runs:-?} runs in ${seconds} s (${cov:-no stats})"
        passed=$((passed + 1))
    else
        tail -n 40 "$log" >&2
        found=$(ls -t "$artifacts/$t" 2>/dev/null | head -3 | sed "s|^|$artifacts/$t/|" | tr '\n' ' ')
        echo "fuzz $t: FAILED; crashing input: ${found:-none written (see the log above)}" >&2
        echo "  reproduce: $target_dir/$host/release/$t ${found%% *}" >&2
        failed+=("$t")
    fi
done
echo "== fuzz: $((SECONDS - start)) s in all"
echo "fuzz: ${passed} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
