#!/usr/bin/env bash
# Fails when src/gen/ is not exactly what `npm run generate` makes from
# ../../proto with the pinned protoc-gen-es: regenerates into a temporary
# directory and compares.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npx --no-install buf generate --output "$tmp"
if ! diff -ru src/gen "$tmp/src/gen"; then
    echo "src/gen/ is stale: run \`npm run generate\` in examples/web and commit the result" >&2
    exit 1
fi
echo "src/gen/ matches proto/"
