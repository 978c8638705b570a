#!/bin/bash
# The scale run of BENCHMARKS.md (sessions 11-13): a real `vcn serve` on a
# new vault, the load tool's first rounds, a fill to CARDS cards, then the
# same rounds again, three times each, with `vmstat` every second for the
# whole run. With TRACE=1 (and `perf` installed), `perf trace -s` on the
# server for 3 s of the first Detokenize round of each phase, with each
# thread's CPU time before and after: which syscalls the server waits in.
# Then a control: the same rounds on a new, empty vault, served the same
# way, right after. The first rounds ran half an hour before the after-fill
# ones, and this machine's speed drifts over that (session 14: an empty
# vault's issue p50 ranged 3.60-4.54 ms over one day's runs), so the p50
# ratios are printed against both: after/first and after/control.
#
# usage: benches/scale.sh BINARY ENGINE CARDS OUTDIR
# e.g.:  benches/scale.sh target/release/vcn fjall3 10000000 /tmp/scale
# env:   CACHE_MIB (cache_capacity_mib), WORKER_THREADS (worker_threads),
#        SETTLE (vcn bench --settle, default 10m), TRACE=1
# OUTDIR gets run.txt (the load tool's output), run.json, vmstat.txt,
# vcn.toml, control.{txt,json} (the control's run), ratios.txt, and with
# TRACE=1 trace{0,1}.raw and tasks{0,1}.{before,after};
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
echo "server at the end: $(server_memory)" >>"$out/run.txt"
kill -TERM "$pid"
wait "$pid"
echo "server exit $?" >>"$out/run.txt"
kill "$vm"
[ -n "$tracer" ] && kill "$tracer" 2>/dev/null
echo "on disk: $(du -sh data | cut -f1)" >>"$out/run.txt"
grep -v '^vcn bench:' "$out/run.txt"

ctl=$out/control
rm -rf "$ctl"
mkdir -p "$ctl"
cd "$ctl" || exit 1
cp "$out/vcn.toml" .
RUST_LOG=warn start_server "$bin" serve.log --config vcn.toml
VCN_CARDS_KEY=$cards VCN_SWITCH_KEY=$switch "$bin" bench --server "http://127.0.0.1:$port" \
  --server-pid "$pid" --duration 5s --repeat 3 --json-out "$out/control.json" >"$out/control.txt" 2>&1
control_status=$?
kill -TERM "$pid"
wait "$pid"
cd "$out" && rm -rf "$ctl"
medians() { # FILE HEADING: operation and p50 of the median table after HEADING
  awk -v h="$2" 'index($0, h) == 1 {m = 1; next} m && /^$/ {m = 0} m && $1 != "operation" {print $1, $3}' "$1"
}
{
  echo "p50 ms: first rounds, after the fill, control (a new vault, right after); after/first, after/control"
  awk 'FILENAME == ARGV[1] {a[$1] = $2; next} FILENAME == ARGV[2] {c[$1] = $2; next}
       ($1 in a) && ($1 in c) {printf "%-14s %6.2f %6.2f %6.2f   %5.2fx %5.2fx\n", $1, $2, a[$1], c[$1], a[$1] / $2, a[$1] / c[$1]}' \
    <(medians run.txt "median of 3 repeats, after the fill") \
    <(medians control.txt "median of 3 repeats, first rounds") \
    <(medians run.txt "median of 3 repeats, first rounds")
} >ratios.txt
cat ratios.txt
[ "$status" = 0 ] && exit $control_status
exit $status
