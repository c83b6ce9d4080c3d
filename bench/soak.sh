#!/usr/bin/env bash
# Soak: does keyway's memory stay flat under sustained load, and what does one idle
# keep-alive client connection cost? keyway alone (bench/keyway-soak.toml, one worker, no
# /metrics scraper) in front of bench-backend, on loopback, stopping by itself.
#
#   bash bench/soak.sh                       # 1 M then 5 M requests, 10 000 idle connections
#   REQUESTS_1=200000 REQUESTS_2=1000000 IDLE=2000 bash bench/soak.sh
#
# Reports keyway's VmRSS (/proc/PID/status) after start, after a 10 000-request warm-up,
# after REQUESTS_1 and after REQUESTS_2 requests in all, and the RSS delta of IDLE idle
# keep-alive connections (each served one request first) divided by IDLE. Ports 18180-1.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS_1=${REQUESTS_1:-1000000}
REQUESTS_2=${REQUESTS_2:-5000000}
IDLE=${IDLE:-10000}
CONNS=${CONNS:-32}

# IDLE client sockets here, IDLE accepted sockets in keyway (which inherits the limit).
ulimit -n $((IDLE + 1000))

source bench/common.sh

cores=$(nproc)
proxy_core=$((cores > 1 ? 1 : 0))
taskset -c 0 "$bin/bench-backend" 127.0.0.1:18180 2>/dev/null & pids+=($!)
wait_port 18180
taskset -c $proxy_core "$bin/keyway" run --config bench/keyway-soak.toml >"$tmp/keyway.log" 2>&1 &
keyway=$!; pids+=($keyway)
wait_port 18181

rss() { awk '/^VmRSS/ {print $2}' "/proc/$keyway/status"; }  # kB
send() {
  out=$(taskset -c 0 "$bin/soak-client" requests --addr 127.0.0.1:18181 --count "$1" --connections "$CONNS")
  echo "soak: $out" >&2
  errors=$(sed -E 's/.*"errors":([0-9]+).*/\1/' <<<"$out")
  [ "$errors" = 0 ] || { echo "soak: $errors errors" >&2; exit 1; }
}

rss_start=$(rss)
send 10000
rss_warm=$(rss)
send $((REQUESTS_1 - 10000))
rss_1=$(rss)
send $((REQUESTS_2 - REQUESTS_1))
rss_2=$(rss)
growth=$(( (rss_2 - rss_1) * 1024 / (REQUESTS_2 - REQUESTS_1) ))

# Idle keep-alive connections: open, hold, measure, close; twice, so the second round
# shows whether the memory of the first was freed for reuse (the allocator keeps freed
# pages mapped, so RSS after closing does not fall).
hold_idle() {
  taskset -c 0 "$bin/soak-client" idle --addr 127.0.0.1:18181 --count "$IDLE" --hold-seconds 10 >"$tmp/idle.out" &
  local idle=$!; pids+=($idle)
  for _ in $(seq 1 600); do grep -q ready "$tmp/idle.out" 2>/dev/null && break; sleep 0.2; done
  grep -q ready "$tmp/idle.out" || { echo "soak: idle connections not opened" >&2; exit 1; }
  sleep 2
  rss >"$tmp/rss.held"
  wait $idle
  sleep 2
}
sleep 2
rss_before_idle=$(rss)
hold_idle
rss_idle=$(cat "$tmp/rss.held")
rss_after_idle=$(rss)
hold_idle
rss_idle_2=$(cat "$tmp/rss.held")
rss_after_idle_2=$(rss)
per_conn=$(( (rss_idle - rss_before_idle) * 1024 / IDLE ))

cat <<REPORT
keyway VmRSS (kB)
  after start                      $rss_start
  after 10 000 requests (warm-up)  $rss_warm
  after $REQUESTS_1 requests        $rss_1
  after $REQUESTS_2 requests        $rss_2
  growth from $REQUESTS_1 to $REQUESTS_2: $growth bytes/request
idle keep-alive connections ($IDLE, each served one request)
  before                           $rss_before_idle
  while held                       $rss_idle
  after closing                    $rss_after_idle
  second round, while held         $rss_idle_2
  second round, after closing      $rss_after_idle_2
  per connection                   $per_conn bytes
REPORT
