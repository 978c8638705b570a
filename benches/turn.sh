#!/bin/bash
# One turn on a copy of a stopped vault (session 14): a cheaper way than a
# 30-minute scale run to compare two builds or settings on a large vault.
# Fill a vault once (benches/scale.sh keeps it in OUTDIR/vault), then run
# turns of each build or setting in between (A B B A), with turns on new
# vaults among them for the ratio. Each turn copies the vault, drops the
# page cache (as root; skipped otherwise, and said), serves the copy with
# the given settings, runs the load tool's default rounds (5 s, 3
# repeats), and stops the server; the copy is then deleted.
#
# usage: benches/turn.sh BINARY VAULT|new OUT [SETTING...]
# (TOML values: quote strings, e.g. engine='"fjall"'; a new vault is on
# the default engine unless a SETTING names one)
# e.g.:  benches/turn.sh target/release/vcn /tmp/scale/vault /tmp/t/a worker_threads=8
#        benches/turn.sh target/release/vcn new /tmp/t/empty-a
# OUT.txt gets the load tool's output, with the server's per-thread CPU
# (1/100 s, user and system) at the end; OUT.json its results.
set -uo pipefail
. "$(dirname "$0")/serve_lib.sh"
bin=$(realpath "$1")
src=$2
out=$(realpath -m "$3")
shift 3
mkdir -p "$(dirname "$out")"
run=$(mktemp -d "${TMPDIR:-/tmp}/vcn-turn.XXXXXX")
if [ "$src" = new ]; then
  echo 'dev_keys = true' >"$run/vcn.toml"
else
  cp -a "$src/." "$run/" || exit 1
fi
for setting in "$@"; do
  echo "${setting%%=*} = ${setting#*=}" >>"$run/vcn.toml"
done
sync
if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
  note="page cache dropped"
else
  note="page cache NOT dropped (not root)"
fi
cd "$run" || exit 1
RUST_LOG=warn start_server "$bin" serve.log --config vcn.toml
{
  echo "# turn: $bin on $src, settings: ${*:-none}; $note"
  VCN_CARDS_KEY=$cards VCN_SWITCH_KEY=$switch "$bin" bench --server "http://127.0.0.1:$port" \
    --server-pid "$pid" --duration 5s --repeat 3 --json-out "$out.json" 2>&1
  status=$?
  echo "server: $(server_memory)"
  thread_times |
    awk '{u[$2] += $3; s[$2] += $4} END {for (k in u) print "server thread CPU", k, u[k], s[k]}' | sort
} >"$out.txt"
kill -TERM "$pid"
wait "$pid"
# The server's log goes with the copy: keep its end when the turn failed.
[ "${status:-1}" = 0 ] || tail -5 "$run/serve.log" >>"$out.txt"
cd / && rm -rf "$run"
grep -v '^vcn bench:' "$out.txt" | sed -n '/^median of/,$p'
exit "${status:-1}"
