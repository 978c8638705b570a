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
      grep -E "^(health|issue|authorize|authorize_hot|detokenize|lifecycle) " |
      sed "s/^/$label /" >>"$out"; then
      failed+=("$label (round $round)")
    fi
  done
done
python3 - "$out" <<'PY'
import collections, statistics as st, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    # label op calls/s p50 p99 p999 max floor errors declined srv_us eng_us
    rows[(f[0], f[1])].append((float(f[2]), float(f[4]), f[7], f[8], float(f[10]), float(f[11])))
for (label, op), v in sorted(rows.items(), key=lambda x: (x[0][1], x[0][0])):
    print(f"{op:14} {label:10} calls/s {st.median(x[0] for x in v):8.0f}"
          f"  p99 ms {st.median(x[1] for x in v):6.2f}  floor {[x[2] for x in v]}"
          f"  errors {sum(int(x[3]) for x in v)}"
          f"  server us/call {st.median(x[4] for x in v):5.0f} {[int(x[4]) for x in v]}"
          f"  engine {st.median(x[5] for x in v):4.0f}")
PY
if [ ${#failed[@]} -gt 0 ]; then
  echo "runs whose load tool failed (errors or checks): ${failed[*]}" >&2
  exit 1
fi
