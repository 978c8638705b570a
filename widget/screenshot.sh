#!/usr/bin/env bash
# Takes docs/widget.png: the real widget window under Xvfb (Mesa's software
# OpenGL, no GPU), against a demo vcn server in a temporary directory.
#
#   widget/screenshot.sh [OUT.png]       (from anywhere; default docs/widget.png)
#
# Needs (Debian): xvfb xdotool imagemagick libgl1-mesa-dri. The demo server
# has a throwaway development key and test card numbers (4111 1111 1111 1111
# is the well-known Visa test number); nothing real is shown.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/widget.png}

for tool in Xvfb xdotool import; do
    command -v "$tool" >/dev/null || {
        echo "screenshot.sh: $tool is missing (apt-get install xvfb xdotool imagemagick libgl1-mesa-dri)" >&2
        exit 2
    }
done

CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build -q -p vcn -p vcn-widget
BIN=$PWD/target/debug
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# A free port, then the demo server on it.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export VCN_SERVER="http://127.0.0.1:$PORT"
"$BIN/vcn" serve --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" --keys-dir "$TMP/keys" \
    >"$TMP/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done

WIDGET_KEY=$("$BIN/vcn" client add widget-alice --role cards --owner alice --keys-dir "$TMP/keys" | tail -n 1)
SWITCH_KEY=$("$BIN/vcn" client add switch-demo --role switch --keys-dir "$TMP/keys" | tail -n 1)

# Two older cards: one paused, one to pay with once the widget is up.
issue() {
    VCN_API_KEY=$WIDGET_KEY "$BIN/vcn" card issue --funding-pan 4111111111111111 \
        --limit "$1" --valid-for 7d --json
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
issue 80.00EUR >"$TMP/shop.json"
VISA=$(field card_id <"$TMP/shop.json")
PAUSED=$(issue 15.00EUR | field card_id)
# The widget names its funding cards by a card issued on each.
MASTERCARD=$(VCN_API_KEY=$WIDGET_KEY "$BIN/vcn" card issue --funding-pan 5555555555554444 \
    --limit 1.00EUR --json | field card_id)
VCN_API_KEY=$WIDGET_KEY "$BIN/vcn" card close "$MASTERCARD" >/dev/null
VCN_API_KEY=$WIDGET_KEY "$BIN/vcn" card pause "$PAUSED" >/dev/null

# The widget refuses a config file others can read: create it 0600.
touch "$TMP/widget.toml" && chmod 600 "$TMP/widget.toml"
cat >"$TMP/widget.toml" <<EOF
server = "$VCN_SERVER"
api_key = "$WIDGET_KEY"
reveal_seconds = 120

[[funding_cards]]
label = "Visa debit ••1111"
card_id = "$VISA"

[[funding_cards]]
label = "Mastercard ••4444"
card_id = "$MASTERCARD"
EOF

# The window, on a virtual display with software OpenGL.
DISPLAY_NUM=:$((90 + RANDOM % 100))
Xvfb "$DISPLAY_NUM" -screen 0 1024x900x24 -nolisten tcp >"$TMP/xvfb.log" 2>&1 &
PIDS+=($!)
export DISPLAY=$DISPLAY_NUM LIBGL_ALWAYS_SOFTWARE=1
sleep 1
"$BIN/vcn-widget" --config "$TMP/widget.toml" >"$TMP/widget.log" 2>&1 &
PIDS+=($!)
WID=$(timeout 30 xdotool search --sync --class vcn-widget | head -n 1) || true
if [ -z "$WID" ]; then
    echo "screenshot.sh: the widget window did not appear; its output:" >&2
    cat "$TMP/widget.log" >&2
    exit 1
fi
# No window manager: give the window the keyboard focus by hand.
xdotool windowfocus --sync "$WID" 2>/dev/null || xdotool windowfocus "$WID"
sleep 2

# Fill the amount and press Generate (positions in the 460x720 window,
# laid out as it is before any notification).
click_at() { xdotool mousemove --window "$WID" "$1" "$2" click 1; sleep 0.3; }
click_at "${AMOUNT_X:-140}" "${AMOUNT_Y:-163}"
xdotool type --delay 50 "25.00"
click_at "${GENERATE_X:-90}" "${GENERATE_Y:-290}"
sleep 2

# A purchase on the older card: it arrives live as a notification.
shop() { field "$1" <"$TMP/shop.json"; }
VCN_API_KEY=$SWITCH_KEY "$BIN/vcn" authorize --pan "$(shop pan)" --expiry "$(shop expiry)" \
    --cvv "$(shop cvv)" --amount 12.50EUR --merchant grocer-17 --mcc 5411 >/dev/null
sleep 1
xdotool mousemove --window "$WID" 455 715
sleep 0.5

mkdir -p "$(dirname "$OUT")"
import -window "$WID" "$OUT"
echo "wrote $OUT"
