#!/bin/bash
# What a call of Authorize's or Detokenize's shape can reach against the
# health floor on this machine, in turns with the real calls: the ceilings
# behind the throughput targets (BENCHMARKS.md, session 15).
#
# CEILING_BINARY is a build of benches/results/s15-ceiling.patch, where the
# variable VCN_CEILING makes the server
#   answer:  answer Authorize (authenticated, decoded, checked) at once with
#            a reply of the real one's size, without the vault;
#   write:   the same after one durable 64-byte write through the store (a
#            commit round, as every write of the vault);
#   noaudit: answer Detokenize without writing its audit entry.
# Unset, it is the service as committed. Its runs fail their consistency
# checks (the answers are made up); only the rates are read.
#
# usage: benches/ceiling.sh BASE_BINARY CEILING_BINARY [ROUNDS]
# build: git apply benches/results/s15-ceiling.patch && cargo build --release \
#        && cp target/release/vcn /tmp/vcn-ceiling && git checkout src/
set -uo pipefail
base=$1
ceiling=$2
rounds=${3:-3}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
run() { # LABEL OPS BINARY [VCN_CEILING]
  local label=$1 ops=$2 bin=$3 mode=${4:-}
  VCN_CEILING=$mode "$bin" bench --ops "$ops" --duration 4s --quiet 2>/dev/null |
    grep -E "^(authorize|detokenize) " | sed "s/^/$label /" | tee -a "$out"
}
for i in $(seq 1 "$rounds"); do
  echo "# round $i"
  run authorize health,authorize "$base"
  run answer health,authorize "$ceiling" answer
  run write health,authorize "$ceiling" write
  run detokenize health,detokenize "$base"
  run noaudit health,detokenize "$ceiling" noaudit
done
# With VCN_CEILING empty the build must be the service: guard against a
# typo leaving every variant at the real figures unnoticed.
python3 - "$out" <<'PY'
import collections, statistics as st, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    # label op calls/s p50 p99 p999 max floor errors declined srv eng
    rows[f[0]].append((float(f[7].rstrip('%')), float(f[3]), float(f[10])))
print("\nmedians     floor %   p50 ms   server us/call")
for label in ["authorize", "answer", "write", "detokenize", "noaudit"]:
    r = rows.get(label)
    if r:
        print(f"{label:11s} {st.median(x[0] for x in r):7.0f} {st.median(x[1] for x in r):8.2f} "
              f"{st.median(x[2] for x in r):8.0f}   (floor % per round: {[x[0] for x in r]})")
PY
