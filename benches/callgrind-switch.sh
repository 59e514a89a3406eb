#!/usr/bin/env bash
# Instructions per call of the switch's decision (`switch::from_port`), for each case of the
# criterion bench `benches/benches/switch.rs`, counted by valgrind's callgrind: the same
# figure on every run of the same binary, however busy the machine (criterion's times on
# these 2-core machines move by ±15% between runs). Compare two builds by running this in
# each checkout (e.g. a `git worktree` of the older commit) and dividing.
# Usage: benches/callgrind-switch.sh            (builds the bench, release profile)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
exe=$(cargo bench --no-run -p overlay-benches --bench switch 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -n1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for case in unicast_local_1464B unicast_remote_1464B arp_proxy_reply drop_unknown_destination \
    vip_flow_1464B unicast_local_from_backend_1464B; do
  valgrind --tool=callgrind --callgrind-out-file="$out/$case.out" "$exe" --bench \
    --profile-time 1 --exact "switch/$case" >/dev/null 2>&1
done
python3 - "$out" <<'EOF'
import re, sys, os
def per_call(path, fn="switch::from_port"):
    """Inclusive instructions of `fn` per call, summed over its call sites."""
    lines = open(path).read().split("\n")
    names, callee, calls, cost, i = {}, None, 0, 0, 0
    while i < len(lines):
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", lines[i])
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if m.group(1) == "cfn":
                callee = names.get(m.group(2))
        m = re.match(r"^calls=(\d+)", lines[i])
        if m and callee and callee.endswith(fn):
            calls += int(m.group(1))
            cost += int(lines[i + 1].split()[1])
            i += 1
        i += 1
    return cost / calls if calls else float("nan")
for f in sorted(os.listdir(sys.argv[1])):
    print(f"{f[:-4]:36s} {per_call(os.path.join(sys.argv[1], f)):7.1f} instructions per frame")
EOF
