#!/bin/bash
# Interleaved A/B runs of the load tool: on a shared, noisy machine, two
# builds (or two settings) are only comparable when measured in turns, in
# the same minutes. Each configuration runs ROUNDS times, in turn, with an
# in-process server; the medians per operation are printed at the end.
# A run whose load tool failed (errors, or failed consistency checks) is
# named after the medians, and the script then exits 1.
#
# usage: benches/ab.sh ROUNDS OPS "label|ENV=value ...|binary|extra bench args" ...
# e.g.:  benches/ab.sh 3 health,authorize "before||/tmp/vcn-before|" "after||target/release/vcn|"
#        benches/ab.sh 3 health,authorize "d0||target/release/vcn|--commit-delay-us 0" \
#                                         "d500||target/release/vcn|--commit-delay-us 500"
set -euo pipefail
. "$(dirname "$0")/serve_lib.sh"
rounds=$1
ops=$2
shift 2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
failed=()
for round in $(seq 1 "$rounds"); do
  for cfg in "$@"; do
    IFS="|" read -r label envs bin extra <<<"$cfg"
    # shellcheck disable=SC2086 # envs and extra are word lists
    if ! env $envs "$bin" bench --ops "$ops" --duration 4s --quiet $extra 2>/dev/null |
      label_rows "$label" >>"$out"; then
      failed+=("$label (round $round)")
    fi
  done
done
python3 "$(dirname "$0")/medians.py" "$out"
exit_if_failed
