#!/bin/bash
# The scale run of BENCHMARKS.md (sessions 11-13): a real `vcn serve` on a
# new vault, the load tool's first rounds, a fill to CARDS cards, then the
# same rounds again, three times each, with `vmstat` every second for the
# whole run. With TRACE=1 (and `perf` installed), `perf trace -s` on the
# server for 3 s of the first Detokenize round of each phase, with each
# thread's CPU time before and after: which syscalls the server waits in.
#
# usage: benches/scale.sh BINARY ENGINE CARDS OUTDIR
# e.g.:  benches/scale.sh target/release/vcn fjall3 10000000 /tmp/scale
# env:   CACHE_MIB (cache_capacity_mib), WORKER_THREADS (worker_threads),
#        SETTLE (vcn bench --settle, default 10m), TRACE=1
# OUTDIR gets run.txt (the load tool's output), run.json, vmstat.txt,
# vcn.toml, and with TRACE=1 trace{0,1}.raw and tasks{0,1}.{before,after};
# the vault is OUTDIR/vault (about 420 bytes a card on fjall 3), kept.
set -uo pipefail
. "$(dirname "$0")/serve_lib.sh"
bin=$(realpath "$1")
engine=$2
cards_n=$3
out=$(realpath -m "$4")
mkdir -p "$out"
dir=$out/vault
rm -rf "$dir"
mkdir -p "$dir"
cd "$dir" || exit 1
{
  printf 'engine = "%s"\ndev_keys = true\n' "$engine"
  [ -n "${CACHE_MIB:-}" ] && echo "cache_capacity_mib = $CACHE_MIB"
  [ -n "${WORKER_THREADS:-}" ] && echo "worker_threads = $WORKER_THREADS"
} >vcn.toml
cp vcn.toml "$out/vcn.toml"
RUST_LOG=warn start_server "$bin" serve.log --config vcn.toml
vmstat -t 1 >"$out/vmstat.txt" &
vm=$!
thread_times() { # each server thread: id, name, user and system ticks
  cat /proc/$pid/task/*/stat | awk '{print $1, $2, $14, $15}'
}
trace_round() { # PHASE: 0 before the fill, 1 after
  until grep -q "detokenize for 5s (phase $1, repeat 1)" "$out/run.txt" 2>/dev/null; do
    sleep 0.5
  done
  sleep 0.5
  thread_times >"$out/tasks$1.before"
  perf trace -s -p "$pid" -o "$out/trace$1.raw" -- sleep 3 2>/dev/null
  thread_times >"$out/tasks$1.after"
}
tracer=
if [ "${TRACE:-0}" = 1 ]; then
  (trace_round 0 && trace_round 1) &
  tracer=$!
fi
VCN_CARDS_KEY=$cards VCN_SWITCH_KEY=$switch "$bin" bench --server "http://127.0.0.1:$port" \
  --server-pid "$pid" --fill "$cards_n" --settle "${SETTLE:-10m}" --duration 5s --repeat 3 \
  --json-out "$out/run.json" >"$out/run.txt" 2>&1
status=$?
echo "server at the end: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s '\t\n' '  ')" >>"$out/run.txt"
kill -TERM "$pid"
wait "$pid"
echo "server exit $?" >>"$out/run.txt"
kill "$vm"
[ -n "$tracer" ] && kill "$tracer" 2>/dev/null
echo "on disk: $(du -sh data | cut -f1)" >>"$out/run.txt"
grep -v '^vcn bench:' "$out/run.txt"
exit $status
