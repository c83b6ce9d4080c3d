#!/usr/bin/env bash
# Builds every plugin in this folder for wasm32-wasip2 and copies the components to
# plugins/dist/. Installs the target when it is missing. Used by the test suite (through
# tests/build.rs) and by plugin authors.
set -euo pipefail
cd "$(dirname "$0")"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2 >&2
fi
target_dir=${PLUGINS_TARGET_DIR:-../target/plugins}
cargo build --release --locked --target wasm32-wasip2 --target-dir "$target_dir" "$@" >&2
mkdir -p dist
for f in "$target_dir"/wasm32-wasip2/release/*.wasm; do
  name=$(basename "$f" .wasm)
  cp "$f" "dist/${name//_/-}.wasm"
done
ls dist
