#!/bin/bash
# What the floor ratios become when the load tool stops sharing the
# server's cores: the nearest this two-core machine comes to "the load
# tool on a second machine". In turns, each round runs a real `vcn serve`
# on a new vault twice:
#   shared: server and load tool on both cores, as the issue measures;
#   split:  the server's threads on core 0, the load tool on core 1.
# In `split` each side has one core, so both the floor and each operation
# are bound by whichever side runs out first: with the server's work per
# call several times health's, the ratio then compares the server's CPU
# per call alone, with none of the load tool's in either figure.
#
# usage: benches/pinned.sh BINARY ROUNDS [OPS]
# e.g.:  benches/pinned.sh target/release/vcn 3
set -uo pipefail
. "$(dirname "$0")/serve_lib.sh"
bin=$(realpath "$1")
rounds=$2
ops=${3:-health,issue,authorize,detokenize}
medians=$(realpath "$(dirname "$0")/medians.py")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
out=$dir/lines
failed=()

# run LABEL SERVER_CPUS TOOL_CPUS
run() {
  local label=$1 server_cpus=$2 tool_cpus=$3 vault
  vault=$(mktemp -d -p "$dir")
  cd "$vault" || exit 1
  RUST_LOG=warn start_server "$bin" "$vault/serve.log"
  # Every thread it has now; the ones it starts later inherit it.
  taskset -a -p -c "$server_cpus" "$pid" >/dev/null
  if ! VCN_CARDS_KEY=$cards VCN_SWITCH_KEY=$switch taskset -c "$tool_cpus" "$bin" bench \
    --server "http://127.0.0.1:$port" --server-pid "$pid" --ops "$ops" --duration 4s \
    --quiet 2>/dev/null |
    label_rows "$label" >>"$out"; then
    failed+=("$label (round $round)")
  fi
  kill -TERM "$pid"
  wait "$pid"
  cd "$dir" || exit 1
  rm -rf "$vault"
}

for round in $(seq 1 "$rounds"); do
  run shared 0,1 0,1
  run split 0 1
done
python3 "$medians" "$out"
exit_if_failed
