#!/usr/bin/env bash
# Instructions and simulated cache misses per request, keyway vs HAProxy, under the same
# saturating load (wrk), from valgrind's callgrind with its cache simulation.
#
# For when two proxies spend the same user time on different instruction counts: this
# VM exposes no hardware counters, and callgrind's simulated first-level caches show
# which of the two touches more code and data per request (and, with callgrind_annotate,
# where). Both run under valgrind, alone on the proxy core, with instrumentation off
# until a warm-up has passed; then on for one wrk run of SECONDS_EACH. Under valgrind a
# proxy serves about a thousand requests a second, so every wakeup finds many ready
# connections: read the counts per request as the work of a busy turn.
#
#   bash bench/cache-per-request.sh               # wrk -c50, 6 s each
#   CONNS=256 SECONDS_EACH=10 bash bench/cache-per-request.sh
#
# Everything listens on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-50}
SECONDS_EACH=${SECONDS_EACH:-6}

for tool in wrk haproxy valgrind; do
  command -v "$tool" >/dev/null || { echo "cache-per-request: needs $tool (apt-get install $tool)" >&2; exit 1; }
done
source bench/common.sh
declare -A pid port
# %p: each proxy's file is named by its process id.
start_pair valgrind --tool=callgrind --cache-sim=yes --instr-atstart=no --callgrind-out-file="$tmp/callgrind.%p"

declare -A served
for p in keyway haproxy; do
  url="http://127.0.0.1:${port[$p]}/"
  timeout -k 5 60 taskset -c $front wrk -t1 -c"$CONNS" -d2s "$url" >/dev/null 2>&1 || true
  callgrind_control -i on "${pid[$p]}" >/dev/null 2>&1
  out=$(timeout -k 5 $((SECONDS_EACH + 60)) taskset -c $front wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" "$url" 2>&1) || true
  callgrind_control -i off "${pid[$p]}" >/dev/null 2>&1
  served[$p]=$(awk '/ requests in / { print $1 }' <<<"$out")
  [ -n "${served[$p]}" ] || { echo "cache-per-request: $p: no result: $(tail -n 3 <<<"$out")" >&2; exit 1; }
done
# callgrind writes its counts when the process ends.
for p in keyway haproxy; do kill -TERM "${pid[$p]}" 2>/dev/null || true; done
for p in keyway haproxy; do
  for _ in $(seq 1 150); do kill -0 "${pid[$p]}" 2>/dev/null || break; sleep 0.2; done
done

printf '%-8s %9s %12s %10s %10s %10s %10s\n' proxy requests "instr/req" "I1 miss" "D1 read" "D1 write" "LL miss"
for p in keyway haproxy; do
  f=$(ls "$tmp/callgrind.${pid[$p]}"* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "cache-per-request: $p wrote no callgrind output" >&2; exit 1; }
  awk -v n="${served[$p]}" -v p="$p" '
    /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
    /^totals:/ { for (i = 2; i <= NF; i++) t[i] = $i }
    END {
      printf "%-8s %9d %12.0f %10.0f %10.0f %10.0f %10.0f\n", p, n, t[col["Ir"]] / n,
        t[col["I1mr"]] / n, t[col["D1mr"]] / n, t[col["D1mw"]] / n,
        (t[col["ILmr"]] + t[col["DLmr"]] + t[col["DLmw"]]) / n
    }' "$f"
  cp "$f" "bench/results/cache-$p.out"
done
echo "(callgrind_annotate --sort=D1mw bench/results/cache-keyway.out shows where they are)"
