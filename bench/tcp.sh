#!/usr/bin/env bash
# keyway vs HAProxy `mode tcp`: bytes per second through one proxy core, and the proxy's
# CPU per GB. Layout on a 2-core box: the backend and the load generator (`tcpgen`) on
# core 0, the proxy under test alone on core 1, one thread each; CONNS connections of
# 64 KiB writes, upload and download measured apart, DURATION seconds each.
#
#   bash bench/tcp.sh                     # DURATION=4 ROUNDS=1: about 30 s of load
#   DURATION=5 ROUNDS=3 bash bench/tcp.sh
#
# Everything listens on loopback and stops with the script.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-4}
ROUNDS=${ROUNDS:-1}
CONNS=${CONNS:-16}

if ! command -v haproxy >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
  else
    echo "bench: needs haproxy (apt-get install haproxy)" >&2
    exit 1
  fi
fi
source bench/common.sh

cat >"$tmp/keyway.toml" <<CFG
[proxy]
workers = 1
[[tcp_listener]]
listen = "127.0.0.1:18181"
cluster = "bulk"
[cluster.bulk]
protocol_check = "none"
backends = [{ id = "a", address = "127.0.0.1:18180" }]
CFG
cat >"$tmp/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn 1000
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
listen bulk
    bind 127.0.0.1:18182
    server s1 127.0.0.1:18180
CFG

taskset -c 0 "$bin/tcpgen" serve --listen 127.0.0.1:18180 & pids+=($!)
taskset -c 1 "$bin/keyway" run --config "$tmp/keyway.toml" >"$tmp/keyway.log" 2>&1 & pids+=($!)
keyway_pid=$!
taskset -c 1 haproxy -f "$tmp/haproxy.cfg" -db >"$tmp/haproxy.log" 2>&1 & pids+=($!)
haproxy_pid=$!
for p in 18180 18181 18182; do wait_port $p; done

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
printf "%-8s %-5s %5s %10s %14s\n" target dir round "MB/s" "CPU ms per GB"
for round in $(seq 1 "$ROUNDS"); do
  for target in direct:18180: keyway:18181:$keyway_pid haproxy:18182:$haproxy_pid; do
    IFS=: read -r name port pid <<<"$target"
    for mode in up down; do
      before=0; [ -n "$pid" ] && before=$(cpu_ticks "$pid")
      out=$(taskset -c 0 "$bin/tcpgen" run --addr "127.0.0.1:$port" --mode "$mode" --conns "$CONNS" --secs "$DURATION")
      bytes=${out#all=}; bytes=${bytes%% *}; mbps=${out##*mbps=}
      cpu="-"
      if [ -n "$pid" ]; then
        used=$(( $(cpu_ticks "$pid") - before ))
        cpu=$(awk -v t="$used" -v hz="$ticks" -v b="$bytes" 'BEGIN { printf "%.0f", t * 1000 / hz / (b / 1e9) }')
      fi
      printf "%-8s %-5s %5s %10s %14s\n" "$name" "$mode" "$round" "$mbps" "$cpu"
    done
  done
done
