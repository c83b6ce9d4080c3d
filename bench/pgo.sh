#!/usr/bin/env bash
# Builds keyway with profile-guided optimisation (PGO): an instrumented build serves the
# bench workloads (HTTP/1.1 at 50 and 256 connections, a primary-replica cluster, h2c,
# HTTP/1.1 over TLS), and the release build is then laid out and inlined by what ran:
# hot code together, cold code out of the way. On this VM keyway spends more of its user
# time on instruction-cache misses than on instructions (`bench/cache-per-request.sh`),
# which is what PGO changes.
#
#   bash bench/pgo.sh      # about 20 minutes on 2 cores: two release builds and a minute of load
#
# Result: target/pgo/release/keyway, and target/pgo/release/keyway.sources (which sources
# it was trained and built from: `sources_id` in bench/common.sh). bench/run.sh adds a
# keyway-pgo row when that names the sources checked out. Needs rustup's llvm-tools
# (installed here when missing), wrk and h2load. Loopback only; every load is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
source bench/common.sh
ensure_tools wrk:wrk h2load:nghttp2-client

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  rustup component add llvm-tools >/dev/null
fi
[ -x "$profdata" ] || { echo "pgo: no llvm-profdata at $profdata (rustup component add llvm-tools)" >&2; exit 1; }

base=${CARGO_TARGET_DIR:-target}
sources=$(sources_id)

# 1. The instrumented build. Its build scripts and the bench tools write their own
# profiles; only keyway's (named by LLVM_PROFILE_FILE below) are merged.
echo "pgo: instrumented build (target dir $base/pgo-gen)" >&2
RUSTFLAGS="-Cprofile-generate=$tmp/unused" CARGO_TARGET_DIR="$base/pgo-gen" \
  cargo build --release -q -p keyway

# 2. Training: the same configs and loads as bench/run.sh, keyway alone on the proxy core.
cores=$(nproc); front=0; proxy_core=$((cores > 1 ? 1 : 0))
taskset -c $front "$bin/bench-backend" 127.0.0.1:18080 2>/dev/null & pids+=($!)
kws=()
for cfg in keyway keyway-pr; do
  LLVM_PROFILE_FILE="$tmp/train/%p-%m.profraw" taskset -c $proxy_core \
    "$base/pgo-gen/release/keyway" run --config "bench/$cfg.toml" >"$tmp/$cfg.log" 2>&1 &
  pids+=($!); kws+=($!)
done
for p in 18080 18081 18084 18091; do wait_port $p; done
load() { timeout -k 5 60 taskset -c $front "$@" >"$tmp/load.out" 2>&1 || { echo "pgo: load failed: $*" >&2; tail -n 3 "$tmp/load.out" >&2; exit 1; }; }
load wrk -t1 -c50 -d6s -H 'Host: bench' http://127.0.0.1:18081/
load wrk -t1 -c256 -d6s -H 'Host: bench' http://127.0.0.1:18081/
load h2load -t1 -c50 -m10 -D 5 http://127.0.0.1:18081/
load wrk -t1 -c50 -d5s -H 'Host: bench' https://127.0.0.1:18091/
load wrk -t1 -c50 -d5s -H 'Host: bench' http://127.0.0.1:18084/
# The profile is written when keyway exits: a graceful stop.
kill -TERM "${kws[@]}"
for p in "${kws[@]}"; do wait "$p" || true; done
shopt -s nullglob
raw=("$tmp"/train/*.profraw)
[ ${#raw[@]} -ge 2 ] || { echo "pgo: keyway wrote no profile (${#raw[@]} files)" >&2; exit 1; }
mkdir -p "$base/pgo"
"$profdata" merge -o "$base/pgo/keyway-$sources.profdata" "${raw[@]}"

# 3. The optimised build. The profile's path names the sources, so new sources rebuild.
echo "pgo: optimised build (target dir $base/pgo)" >&2
RUSTFLAGS="-Cprofile-use=$PWD/$base/pgo/keyway-$sources.profdata" CARGO_TARGET_DIR="$base/pgo" \
  cargo build --release -q -p keyway
echo "$sources" >"$base/pgo/release/keyway.sources"
find "$base/pgo" -maxdepth 1 -name 'keyway-*.profdata' ! -name "keyway-$sources.profdata" -delete
echo "pgo: built $base/pgo/release/keyway at $sources" >&2
