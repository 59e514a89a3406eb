# Cleanup for the scripts that start overlayd in namespaces (scripts/demo.sh, the benches
# through benches/common.sh): sourced, not run. Both functions run to the end whatever
# already died and never fail, so a cleanup trap that calls them under `set -e` cannot be
# cut short by a daemon that is already gone.

# Whether process $1 still runs (a zombie does not).
pid_running() {
  local state
  state=$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# Stops the overlayd processes whose pids the files $1/NODE.pid hold: SIGTERM to each, then
# waits for each to exit, at most $2 seconds in all (default 30); one still running then
# gets SIGKILL. A stopped overlayd leaves its tasks running for its next start to adopt;
# these nodes do not start again, so their tasks (processes, namespaces, TAPs) are removed
# here.
stop_daemons() {
  local dir=$1 limit=${2:-30} f pid pids=() nodes=()
  for f in "$dir"/*.pid; do
    [ -f "$f" ] || continue
    nodes+=("$(basename "$f" .pid)")
    pid=$(cat "$f" 2>/dev/null) || continue
    [[ $pid =~ ^[0-9]+$ ]] || continue
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  local deadline=$((SECONDS + limit))
  for pid in ${pids[@]+"${pids[@]}"}; do
    while pid_running "$pid"; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "cleanup: overlayd (pid $pid) still stopping after ${limit} s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
  done
  for n in ${nodes[@]+"${nodes[@]}"}; do
    remove_tasks_of "$n"
  done
  return 0
}

# Removes the tasks node $1 left running: its task namespaces ov-$1-TASK (killing what runs
# there, which deletes their TAPs) and their pinned mount namespaces.
remove_tasks_of() {
  local node=$1 ns m
  for ns in /run/netns/ov-"$node"-*; do
    [ -e "$ns" ] || continue
    ns=$(basename "$ns")
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  for m in /run/overlay/mntns/ov-"$node"-*; do
    [ -e "$m" ] || continue
    umount -l "$m" 2>/dev/null || true
    rm -f "$m" 2>/dev/null || true
  done
  return 0
}

# Removes the namespaces $1-$2, $1-$3, ...: whatever still runs in one is killed first.
remove_namespaces() {
  local prefix=$1 n
  shift
  for n in "$@"; do
    ip netns pids "$prefix-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$prefix-$n" 2>/dev/null || true
  done
  return 0
}
