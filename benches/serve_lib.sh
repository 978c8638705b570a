# Sourced by the scripts that drive a real `vcn serve` (served.sh,
# scale.sh, turn.sh, pinned.sh): start one, register the clients the load
# tool needs, and read what the server used; and by those that collect the
# load tool's result rows (ab.sh, pinned.sh, served.sh): label_rows,
# exit_if_failed.

# start_server BINARY LOG [SERVE ARGS...]: runs `BINARY serve` on a random
# local port, in the current directory (its vault goes there), stderr to
# LOG; waits for the port, then adds a cards and a switch client. Sets
# port, pid, cards and switch (the clients' API keys).
start_server() {
  local bin=$1 log=$2
  shift 2
  port=$((20000 + RANDOM % 20000))
  "$bin" serve --listen "127.0.0.1:$port" "$@" 2>"$log" &
  pid=$!
  for _ in $(seq 1 100); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  # Names of their own: a vault served again already has the last run's.
  local tag=$RANDOM$RANDOM
  cards=$("$bin" client add "bench-cards-$tag" --role cards 2>/dev/null | tail -1)
  switch=$("$bin" client add "bench-switch-$tag" --role switch 2>/dev/null | tail -1)
  sleep 1.5 # clients are picked up within a second
}

# thread_times: each thread of the server started last (pid): id, name,
# user and system CPU in 1/100 s.
thread_times() {
  cat /proc/$pid/task/*/stat | awk '{print $1, $2, $14, $15}'
}

# server_memory: its resident memory now and at its peak, on one line.
server_memory() {
  grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s '\t\n' '  '
}

# label_rows LABEL: the load tool's result rows from stdin (one per
# operation), each prefixed with LABEL; fails when there is none.
label_rows() {
  grep -E "^(health|issue|authorize|authorize_hot|detokenize|lifecycle) " | sed "s/^/$1 /"
}

# exit_if_failed: names the runs in the array `failed` (runs whose load
# tool reported errors or failed checks) and exits 1, if there are any.
exit_if_failed() {
  if [ ${#failed[@]} -gt 0 ]; then
    echo "runs whose load tool failed (errors or checks): ${failed[*]}" >&2
    exit 1
  fi
}
