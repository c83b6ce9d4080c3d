#!/usr/bin/env bash
# Compares keyway with HAProxy and nginx, and a direct-to-backend baseline, on this
# machine. Layout on a 2-core box: backend and load generators on core 0, the proxy
# under test alone on core 1, each proxy with one worker/thread and upstream keep-alive.
#
#   bash bench/run.sh                 # defaults below
#   DURATION=20 CONNS=128 RATE=8000 bash bench/run.sh
#
# Throughput: wrk (closed loop, CONNS connections). Latency: bench's own open-loop
# generator at RATE req/s, corrected for coordinated omission. Everything runs on
# loopback and stops by itself. Results: printed, and written to bench/results/latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
RATE=${RATE:-4000}
LAT_CONNS=${LAT_CONNS:-32}
ROUNDS=${ROUNDS:-3}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need haproxy || ! need nginx; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk haproxy nginx-light >/dev/null
  else
    echo "bench: needs wrk, haproxy and nginx (apt-get install wrk haproxy nginx-light)" >&2
    exit 1
  fi
fi

source bench/common.sh

cores=$(nproc)
front=0
proxy_core=$((cores > 1 ? 1 : 0))

bash plugins/build.sh >/dev/null
taskset -c $front "$bin/bench-backend" 127.0.0.1:18080 2>/dev/null & pids+=($!)
taskset -c $front "$bin/bench-backend" 127.0.0.1:18090 2>/dev/null & pids+=($!)
wait_port 18080; wait_port 18090
taskset -c $proxy_core "$bin/keyway" run --config bench/keyway.toml >"$tmp/keyway.log" 2>&1 & pids+=($!)
# The classifier plugin's cost: the same primary-replica cluster with the native
# classifier (keyway-pr) and with pam-classifier.wasm (keyway-cls).
taskset -c $proxy_core "$bin/keyway" run --config bench/keyway-pr.toml >"$tmp/keyway-pr.log" 2>&1 & pids+=($!)
taskset -c $proxy_core "$bin/keyway" run --config bench/keyway-cls.toml >"$tmp/keyway-cls.log" 2>&1 & pids+=($!)
sed "s|@TMP@|$tmp|g" bench/nginx.conf.in >"$tmp/nginx.conf"
mkdir -p "$tmp/body" "$tmp/proxy"
taskset -c $proxy_core nginx -p "$tmp" -c "$tmp/nginx.conf" 2>"$tmp/nginx.stderr" & pids+=($!)
taskset -c $proxy_core haproxy -f bench/haproxy.cfg -db >"$tmp/haproxy.log" 2>&1 & pids+=($!)
wait_port 18081; wait_port 18082; wait_port 18083; wait_port 18084; wait_port 18085

# Rounds alternate between targets so a noisy neighbour hurts all of them alike; the
# median of the rounds is reported.
declare -A all_rps all_p50 all_p99
targets=${TARGETS:-"direct:18080 keyway:18081 haproxy:18083 nginx:18082 keyway-pr:18084 keyway-cls:18085"}
for round in $(seq 1 "$ROUNDS"); do
  for target in $targets; do
    name=${target%%:*}; port=${target##*:}
    url="http://127.0.0.1:$port/"
    taskset -c $front wrk -t1 -c"$CONNS" -d2s -H 'Host: bench' "$url" >/dev/null
    out=$(taskset -c $front wrk -t1 -c"$CONNS" -d"${DURATION}s" -H 'Host: bench' "$url")
    r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    errs=$(awk '/Non-2xx|Socket errors/' <<<"$out")
    [ -n "$errs" ] && echo "bench: $name: $errs" >&2
    lat=$(taskset -c $front "$bin/loadgen" --addr "127.0.0.1:$port" --rate "$RATE" --seconds "$DURATION" --connections "$LAT_CONNS")
    all_rps[$name]+="$r "
    all_p50[$name]+="$(sed -E 's/.*"p50_us":([0-9]+).*/\1/' <<<"$lat") "
    all_p99[$name]+="$(sed -E 's/.*"p99_us":([0-9]+).*/\1/' <<<"$lat") "
    lerr=$(sed -E 's/.*"errors":([0-9]+).*/\1/' <<<"$lat")
    [ "$lerr" != 0 ] && echo "bench: $name: $lerr errors in the latency run" >&2
    echo "bench: round $round: $name $r req/s, $lat" >&2
  done
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A rps p50 p99
for target in $targets; do
  name=${target%%:*}
  rps[$name]=$(median "${all_rps[$name]}")
  p50[$name]=$(median "${all_p50[$name]}")
  p99[$name]=$(median "${all_p99[$name]}")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", a - b }'; }

mkdir -p bench/results
{
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')); wrk -c$CONNS ${DURATION}s; open-loop latency at $RATE req/s over $LAT_CONNS connections; median of $ROUNDS alternating rounds."
  echo
  echo "| target | req/s (wrk) | p50 µs | p99 µs | added p50 µs | added p99 µs |"
  echo "|---|---:|---:|---:|---:|---:|"
  for target in $targets; do
    n=${target%%:*}
    if [ "$n" = direct ]; then a50="-"; a99="-"; else a50=$(added "${p50[$n]}" "${p50[direct]}"); a99=$(added "${p99[$n]}" "${p99[direct]}"); fi
    echo "| $n | ${rps[$n]} | ${p50[$n]} | ${p99[$n]} | $a50 | $a99 |"
  done
  echo
  [ -n "${rps[haproxy]:-}" ] && echo "keyway/HAProxy throughput: $(ratio "${rps[keyway]}" "${rps[haproxy]}"); keyway/nginx: $(ratio "${rps[keyway]}" "${rps[nginx]}")"
  [ -n "${rps[keyway-cls]:-}" ] && echo "classifier plugin on/off (keyway-cls/keyway-pr) throughput: $(ratio "${rps[keyway-cls]}" "${rps[keyway-pr]}")"
  true
} | tee bench/results/latest.md
