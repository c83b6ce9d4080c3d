#!/usr/bin/env bash
# CPU time keyway spends per request, for configurations that differ in one feature
# (default: the native classifier vs the pam-classifier plugin). Throughput on a shared
# or noisy machine varies by tens of percent between rounds; the proxy's own CPU time
# (utime + stime from /proc) for a fixed number of requests at a fixed rate varies far
# less, so small costs such as one plugin call per request become visible.
#
#   bash bench/cpu-per-request.sh                     # keyway-pr.toml vs keyway-cls.toml
#   RATE=4000 SECONDS_EACH=10 ROUNDS=5 bash bench/cpu-per-request.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-4000}
SECONDS_EACH=${SECONDS_EACH:-10}
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-32}

source bench/common.sh
bash plugins/build.sh >/dev/null
cores=$(nproc); front=0; proxy_core=$((cores > 1 ? 1 : 0))
taskset -c $front "$bin/bench-backend" 127.0.0.1:18080 2>/dev/null & pids+=($!)
taskset -c $front "$bin/bench-backend" 127.0.0.1:18090 2>/dev/null & pids+=($!)
declare -A pid port
for v in pr cls; do
  taskset -c $proxy_core "$bin/keyway" run --config "bench/keyway-$v.toml" >"$tmp/$v.log" 2>&1 & pids+=($!)
  pid[$v]=$!
done
port[pr]=18084; port[cls]=18085
wait_port 18080; wait_port 18090; wait_port 18084; wait_port 18085
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A all
for round in $(seq 1 "$ROUNDS"); do
  for v in pr cls; do
    before=$(cpu "${pid[$v]}")
    out=$(taskset -c $front "$bin/loadgen" --addr "127.0.0.1:${port[$v]}" --rate "$RATE" --seconds "$SECONDS_EACH" --connections "$CONNS")
    after=$(cpu "${pid[$v]}")
    n=$(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$out")
    us=$(awk -v d=$((after - before)) -v t="$ticks" -v n="$n" 'BEGIN { printf "%.2f", d / t * 1e6 / n }')
    all[$v]+="$us "
    echo "round $round: keyway-$v $us µs CPU/request ($n requests)" >&2
  done
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
p=$(median "${all[pr]}"); c=$(median "${all[cls]}")
echo "keyway CPU per request, median of $ROUNDS rounds of $((RATE * SECONDS_EACH)) requests at $RATE req/s:"
echo "  native classifier (keyway-pr):   $p µs"
echo "  pam-classifier.wasm (keyway-cls): $c µs"
awk -v p="$p" -v c="$c" 'BEGIN { printf "  plugin cost: %+.2f µs per request (%+.1f%%)\n", c - p, (c - p) / p * 100 }'
