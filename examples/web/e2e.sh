#!/usr/bin/env bash
# End-to-end test of the web banking page: a real `vcn serve` with gRPC-Web
# on, the page built with Vite and served by `vite preview`, driven in
# headless Chromium (Debian's /usr/bin/chromium through playwright-core):
# issue a card from the page, see it listed, and check the page never shows
# the full number. Needs: cargo, node 20.19+ with `npm ci` done here, and
# chromium (`apt-get install chromium`). Every process it starts is stopped
# on exit, whatever happens.
#
#   bash examples/web/e2e.sh            # from anywhere
#   VCN_BIN=path/to/vcn bash e2e.sh     # use that binary instead of building one
#   CHROMIUM=/path/to/chrome bash e2e.sh
set -euo pipefail
web=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$web/../.." && pwd)
started=$(date +%s)

if [ ! -d "$web/node_modules" ]; then
    echo "e2e: run \`npm ci\` in $web first" >&2
    exit 2
fi
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
    echo "e2e: no Chromium at $CHROMIUM (apt-get install chromium, or set CHROMIUM)" >&2
    exit 2
fi

echo "== e2e: generated code is current, the page type-checks"
(cd "$web" && bash scripts/check-generated.sh && node_modules/.bin/tsc --noEmit)

if [ -z "${VCN_BIN:-}" ]; then
    echo "== e2e: cargo build --bin vcn"
    (cd "$root" && cargo build --quiet --bin vcn)
    VCN_BIN="$root/target/debug/vcn"
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() { # PORT PID NAME LOG
    local i
    for i in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$2" 2>/dev/null; then
            echo "e2e: $3 exited before listening:" >&2
            cat "$4" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "e2e: $3 not listening on $1 after 30 s" >&2
    cat "$4" >&2
    return 1
}

grpc_port=$(free_port)
web_port=$(free_port)
page="http://127.0.0.1:$web_port"
cat > "$tmp/vcn.toml" <<TOML
listen = "127.0.0.1:$grpc_port"
data_dir = "$tmp/data"
keys_dir = "$tmp/keys"

[grpc_web]
enabled = true
allowed_origins = ["$page"]
TOML

echo "== e2e: vcn serve (gRPC-Web on, origin $page)"
# The page's session key: role cards, pinned to the customer alice.
key=$("$VCN_BIN" client add web-banking-e2e --role cards --owner alice --keys-dir "$tmp/keys" | tail -n 1)
"$VCN_BIN" serve --config "$tmp/vcn.toml" >"$tmp/vcn.log" 2>&1 &
pids+=($!)
wait_port "$grpc_port" "${pids[-1]}" "vcn serve" "$tmp/vcn.log"

echo "== e2e: vite build (session from the environment, into a temporary directory)"
(cd "$web" && VCN_WEB_SERVER="http://127.0.0.1:$grpc_port" VCN_WEB_API_KEY="$key" VCN_WEB_OWNER=alice \
    node_modules/.bin/vite build --logLevel warn --outDir "$tmp/dist" --emptyOutDir)
(cd "$web" && exec node_modules/.bin/vite preview --outDir "$tmp/dist" --port "$web_port" --strictPort) \
    >"$tmp/preview.log" 2>&1 &
pids+=($!)
wait_port "$web_port" "${pids[-1]}" "vite preview" "$tmp/preview.log"

echo "== e2e: headless Chromium drives the page"
status=0
(cd "$web" && E2E_PAGE_URL="$page" E2E_OWNER=alice E2E_API_KEY="$key" \
    E2E_SERVER="http://127.0.0.1:$grpc_port" E2E_VCN_BIN="$VCN_BIN" E2E_OUT="${E2E_OUT:-$tmp}" \
    node --test --test-reporter=spec e2e/) || status=$?
if [ "$status" != 0 ]; then
    echo "---- vcn serve log" >&2
    cat "$tmp/vcn.log" >&2
fi
echo "== e2e: done in $(( $(date +%s) - started )) s"
exit "$status"
