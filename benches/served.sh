#!/bin/bash
# The load tool against a real `vcn serve` (not in-process), with the
# server's stderr going to a file as in production: what logging costs,
# which the in-process server (no log subscriber) never shows.
#
# usage: benches/served.sh BINARY RUST_LOG LABEL [OPS]
# e.g.:  for i in 1 2 3; do benches/served.sh target/release/vcn info info; \
#                          benches/served.sh target/release/vcn warn warn; done
set -uo pipefail
. "$(dirname "$0")/serve_lib.sh"
bin=$(realpath "$1")
level=$2
label=$3
ops=${4:-health,authorize,detokenize}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir" || exit 1
RUST_LOG=$level start_server "$bin" "$dir/serve.log"
VCN_CARDS_KEY=$cards VCN_SWITCH_KEY=$switch "$bin" bench --server "http://127.0.0.1:$port" \
  --server-pid "$pid" --ops "$ops" --duration 4s --quiet 2>&1 |
  label_rows "$label"
kill -TERM "$pid"
wait "$pid"
echo "$label: server exited with $?, $(wc -l <"$dir/serve.log") log lines"
