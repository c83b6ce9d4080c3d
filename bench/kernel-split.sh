#!/usr/bin/env bash
# Where a proxy's CPU per request goes: user and system time, and how often its sends
# wake a sleeping peer (the load generator or the backend). keyway and HAProxy, each alone
# on the proxy core, the same load for both.
#
# On loopback a send runs the receiver's TCP path in the sender's system call, and when
# the receiver sleeps in epoll_wait the sender also pays for waking it (on a VM an
# inter-processor interrupt is a VM exit). Two proxies that make the same system calls
# can therefore differ in system time per request by how often their peers are asleep.
#
#   bash bench/kernel-split.sh                  # wrk -c50 and -c256, saturating
#   CONNS="50" SECONDS_EACH=5 ROUNDS=3 bash bench/kernel-split.sh
#
# Wakeups and IPIs come from perf's scheduler tracepoints (sched:sched_waking,
# ipi:ipi_send_cpu) counted on the proxy's process; without perf or permission for
# tracepoints those columns read "-". Every load goes to 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-"50 256"}
SECONDS_EACH=${SECONDS_EACH:-5}
ROUNDS=${ROUNDS:-2}

command -v wrk >/dev/null || { echo "kernel-split: needs wrk (apt-get install wrk)" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "kernel-split: needs haproxy (apt-get install haproxy)" >&2; exit 1; }
source bench/common.sh
declare -A pid port
start_pair

tracing=0
if command -v perf >/dev/null &&
  perf stat -e sched:sched_waking,ipi:ipi_send_cpu -p "${pid[keyway]}" -- sleep 0.1 >/dev/null 2>&1; then
  tracing=1
fi
ticks=$(getconf CLK_TCK)
# user ticks, system ticks
times() { awk '{print $14, $15}' "/proc/$1/stat"; }

printf '%-8s %5s %10s %12s %12s %12s %10s %10s\n' proxy conns "req/s" "user µs/req" "sys µs/req" "CPU µs/req" "wakes/req" "IPIs/req"
for c in $CONNS; do
  for round in $(seq 1 "$ROUNDS"); do
    for p in keyway haproxy; do
      taskset -c $front wrk -t1 -c"$c" -d1s "http://127.0.0.1:${port[$p]}/" >/dev/null 2>&1
      read -r u1 s1 < <(times "${pid[$p]}")
      if [ $tracing = 1 ]; then
        perf stat -x, -e sched:sched_waking,ipi:ipi_send_cpu -p "${pid[$p]}" -o "$tmp/perf.txt" \
          -- sleep "$SECONDS_EACH" >/dev/null 2>&1 &
        perf_pid=$!
      fi
      out=$(taskset -c $front wrk -t1 -c"$c" -d"${SECONDS_EACH}s" "http://127.0.0.1:${port[$p]}/" 2>&1)
      read -r u2 s2 < <(times "${pid[$p]}")
      wakes=-; ipis=-
      if [ $tracing = 1 ]; then
        wait "$perf_pid" || true
        wakes=$(awk -F, '/sched_waking/ {print $1}' "$tmp/perf.txt")
        ipis=$(awk -F, '/ipi_send_cpu/ {print $1}' "$tmp/perf.txt")
        # A count perf could not take reads "<not counted>": shown as "-", never as 0.
        [[ $wakes =~ ^[0-9]+$ ]] || wakes=-
        [[ $ipis =~ ^[0-9]+$ ]] || ipis=-
      fi
      n=$(awk '/requests in/ {print $1}' <<<"$out")
      [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "kernel-split: $p served no requests: $out" >&2; exit 1; }
      awk -v p=$p -v c="$c" -v n="$n" -v s="$SECONDS_EACH" -v u=$((u2 - u1)) -v sy=$((s2 - s1)) \
        -v t="$ticks" -v w="$wakes" -v i="$ipis" 'BEGIN {
          us = u / t * 1e6 / n; ss = sy / t * 1e6 / n
          printf "%-8s %5d %10.0f %12.2f %12.2f %12.2f %10s %10s\n", p, c, n / s, us, ss, us + ss,
            (w == "-" ? "-" : sprintf("%.3f", w / n)), (i == "-" ? "-" : sprintf("%.3f", i / n)) }'
    done
  done
done
