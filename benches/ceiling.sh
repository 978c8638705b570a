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
ab=$(dirname "$0")/ab.sh
# The ceiling build's runs fail their checks, so ab.sh names them and
# exits 1: expected here. The service's own runs are named too if they fail.
"$ab" "$rounds" health,authorize "authorize||$base|" \
  "answer|VCN_CEILING=answer|$ceiling|" "write|VCN_CEILING=write|$ceiling|"
"$ab" "$rounds" health,detokenize "detokenize||$base|" "noaudit|VCN_CEILING=noaudit|$ceiling|"
exit 0
