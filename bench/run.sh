#!/usr/bin/env bash
# Compares keyway with HAProxy and nginx, and a direct-to-backend baseline, on this
# machine, in one run:
#   1. HTTP/1.1 throughput, wrk -t1 at each of CONNS_LIST connections, and each proxy's
#      CPU time per request served (utime + stime from /proc, nginx's workers included);
#   2. open-loop latency (loadgen) at RATE req/s, by default half of HAProxy's median at
#      the first entry of CONNS_LIST, and the p50/p99 each proxy adds over direct;
#   3. keyway `workers = 2` vs HAProxy `nbthread 2` at each of CONNS_LIST connections;
#   4. HTTP/2 (h2c by prior knowledge, h2load) and HTTP/1.1 over TLS (wrk, keep-alive),
#      keyway vs HAProxy, with CPU per request;
#   5. the classifier plugin's cost (keyway-pr vs keyway-cls, part of 1 and 2);
#   6. keyway built with PGO (keyway-pgo, in 1, 2 and 4) when bench/pgo.sh has built it
#      from the sources checked out (PGO=0: never).
# Layout on a 2-core box: backend and load generators on core 0, the proxy under test
# alone on core 1, one worker/thread each, keep-alive to the backend. Part 3 cannot keep
# a 2-thread proxy apart from its load on 2 cores: it runs unpinned, with its own backend.
#
#   bash bench/run.sh                          # defaults below: about 13 minutes
#   DURATION=2 ROUNDS=1 bash bench/run.sh      # a quick check of the harness
#   DURATION=10 ROUNDS=5 CONNS_LIST="50 128 256" RATE=8000 bash bench/run.sh
#   TARGETS="direct:18080 keyway-pr:18084 keyway-cls:18085" PARTS= bash bench/run.sh
#
# Everything runs on loopback, every load step under a timeout, and stops by itself.
# Results: printed, and written to bench/results/latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}     # seconds measured per run
WARMUP=${WARMUP:-2}         # seconds of unmeasured load before each throughput run
ROUNDS=${ROUNDS:-3}         # rounds alternate between targets; the median is reported
CONNS_LIST=${CONNS_LIST:-${CONNS:-50 256}}
LAT_CONNS=${LAT_CONNS:-32}  # loadgen's keep-alive connections
H2_CONNS=${H2_CONNS:-50}
H2_STREAMS=${H2_STREAMS:-10}
TLS_CONNS=${TLS_CONNS:-50}
PARTS=${PARTS-2w h2 tls}    # the parts beyond the one-worker HTTP/1.1 rows and latency
RATE=${RATE:-}              # empty: half of HAProxy's median at the first CONNS_LIST entry
TARGETS=${TARGETS:-"direct:18080 keyway:18081 haproxy:18083 nginx:18082 keyway-pr:18084 keyway-cls:18085"}
read -ra conns_list <<<"$CONNS_LIST"
part() { [[ " $PARTS " == *" $1 "* ]]; }

# shellcheck source=bench/common.sh
source bench/common.sh
ensure_tools wrk:wrk haproxy:haproxy nginx:nginx-light h2load:nghttp2-client
# 256 client connections plus as many to the backend, per proxy.
ulimit -n 65536 2>/dev/null || true

cores=$(nproc)
front=0
proxy_core=$((cores > 1 ? 1 : 0))
on_front=(taskset -c "$front")
on_proxy=(taskset -c "$proxy_core")

# pid[NAME]: the process whose CPU time (with its children's: nginx's workers) is NAME's.
declare -A pid
bash plugins/build.sh >/dev/null
"${on_front[@]}" "$bin/bench-backend" 127.0.0.1:18080 2>/dev/null & pids+=("$!")
"${on_front[@]}" "$bin/bench-backend" 127.0.0.1:18090 2>/dev/null & pids+=("$!")
wait_port 18080; wait_port 18090
# keyway.toml also has the TLS listener (18091); its plain listener takes h2c too.
"${on_proxy[@]}" "$bin/keyway" run --config bench/keyway.toml >"$tmp/keyway.log" 2>&1 & pids+=("$!")
pid[keyway]=$!
# The classifier plugin's cost: the same primary-replica cluster with the native
# classifier (keyway-pr) and with pam-classifier.wasm (keyway-cls).
"${on_proxy[@]}" "$bin/keyway" run --config bench/keyway-pr.toml >"$tmp/keyway-pr.log" 2>&1 & pids+=("$!")
pid[keyway-pr]=$!
"${on_proxy[@]}" "$bin/keyway" run --config bench/keyway-cls.toml >"$tmp/keyway-cls.log" 2>&1 & pids+=("$!")
pid[keyway-cls]=$!
sed "s|@TMP@|$tmp|g" bench/nginx.conf.in >"$tmp/nginx.conf"
mkdir -p "$tmp/body" "$tmp/proxy"
"${on_proxy[@]}" nginx -p "$tmp" -c "$tmp/nginx.conf" 2>"$tmp/nginx.stderr" & pids+=("$!")
pid[nginx]=$!
# haproxy.cfg's TLS bind (18089) reads one PEM holding the certificate and its key.
cat config/certs/pvwa.pem config/certs/pvwa.key >"$tmp/haproxy-tls.pem"
export BENCH_TMP=$tmp
"${on_proxy[@]}" haproxy -f bench/haproxy.cfg -db >"$tmp/haproxy.log" 2>&1 & pids+=("$!")
pid[haproxy]=$!
for p in 18081 18082 18083 18084 18085 18088 18089 18091; do wait_port "$p"; done
# keyway built with PGO (bench/pgo.sh), when that build is of the sources checked out:
# the same config on its own ports, in every part but 2w.
pgo_bin=${CARGO_TARGET_DIR:-target}/pgo/release/keyway
pgo_note="no PGO build (bash bench/pgo.sh makes one)"
if [ "${PGO:-1}" = 0 ]; then
  pgo_note="PGO=0"
elif [ -x "$pgo_bin" ] && [ "$(cat "$pgo_bin.sources" 2>/dev/null)" = "$(sources_id)" ]; then
  "${on_proxy[@]}" "$pgo_bin" run --config bench/keyway-pgo.toml >"$tmp/keyway-pgo.log" 2>&1 & pids+=("$!")
  pid[keyway-pgo]=$!
  wait_port 18093; wait_port 18094
  [[ " $TARGETS " == *" keyway:"* ]] && TARGETS+=" keyway-pgo:18093"
  pgo_note="keyway-pgo: $pgo_bin, built by bench/pgo.sh from these sources ($(sources_id))"
elif [ -x "$pgo_bin" ]; then
  pgo_note="the PGO build is of other sources ($(cat "$pgo_bin.sources" 2>/dev/null || echo unknown), checked out $(sources_id)): not measured; bash bench/pgo.sh rebuilds it"
fi
echo "bench: $pgo_note" >&2
if part 2w; then
  # Unpinned, on both cores, with their own backend so the pinned one stays on core 0.
  "$bin/bench-backend" 127.0.0.1:18092 2>/dev/null & pids+=("$!")
  wait_port 18092
  "$bin/keyway" run --config bench/keyway-2w.toml >"$tmp/keyway-2w.log" 2>&1 & pids+=("$!")
  pid[keyway-2w]=$!
  haproxy -f bench/haproxy-2t.cfg -db >"$tmp/haproxy-2t.log" 2>&1 & pids+=("$!")
  pid[haproxy-2t]=$!
  wait_port 18086; wait_port 18087
fi

ticks=$(getconf CLK_TCK)
# cpu_ticks PID: utime + stime of PID (all its threads) and of its children; empty when
# PID is gone. Fields counted after the command name, which may hold spaces.
cpu_ticks() {
  [ -r "/proc/$1/stat" ] || return 0
  local p sum=0 t
  for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null || true); do
    t=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || true)
    sum=$((sum + ${t:-0}))
  done
  echo "$sum"
}
num() { [[ ${1:-} =~ ^[0-9]+([.][0-9]+)?$ ]]; }

# measure KIND NAME PORT CONNS: a warm-up run, then a measured one. KIND: h1 (wrk,
# pinned), 2w (wrk, unpinned), h2 (h2load, h2c), tls (wrk over https). Sets rps and
# cpu (µs of NAME's CPU time per request served; "-" without a proxy or a result).
measure() {
  local kind=$1 name=$2 port=$3 c=$4 url out n bad before after
  local load=("${on_front[@]}")
  [ "$kind" = 2w ] && load=()
  url="http://127.0.0.1:$port/"
  [ "$kind" = tls ] && url="https://127.0.0.1:$port/"
  local limit=$((DURATION + 30)) warm=$((WARMUP + 30))
  if [ "$kind" = h2 ]; then
    local h2=(h2load -t1 -c"$c" -m"$H2_STREAMS")
    [ "$WARMUP" -gt 0 ] && { timeout -k 5 "$warm" "${load[@]}" "${h2[@]}" -D "$WARMUP" "$url" >/dev/null 2>&1 || true; }
    before=$(cpu_ticks "${pid[$name]:-0}")
    out=$(timeout -k 5 "$limit" "${load[@]}" "${h2[@]}" -D "$DURATION" "$url" 2>&1) || true
    after=$(cpu_ticks "${pid[$name]:-0}")
    rps=$(awk '/^finished in/ { print $4 }' <<<"$out")
    n=$(awk '/^requests:/ { print $8 }' <<<"$out")
    bad=$(awk '/^requests:/ && $10 + $12 + $14 > 0 { print $10 " failed, " $12 " errored, " $14 " timeout" }
               /^status codes:/ && $5 + $7 + $9 > 0 { print $5 " 3xx, " $7 " 4xx, " $9 " 5xx" }' <<<"$out")
  else
    local wrk=(wrk -t1 -c"$c" -H 'Host: bench')
    [ "$WARMUP" -gt 0 ] && { timeout -k 5 "$warm" "${load[@]}" "${wrk[@]}" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true; }
    before=$(cpu_ticks "${pid[$name]:-0}")
    out=$(timeout -k 5 "$limit" "${load[@]}" "${wrk[@]}" -d"${DURATION}s" "$url" 2>&1) || true
    after=$(cpu_ticks "${pid[$name]:-0}")
    rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
    n=$(awk '/ requests in / { print $1 }' <<<"$out")
    bad=$(awk '/Non-2xx|Socket errors/' <<<"$out")
  fi
  [ -n "$bad" ] && echo "bench: $kind $name c$c: $bad" >&2
  num "$rps" || { echo "bench: $kind $name c$c: no result: $(tail -n 3 <<<"$out")" >&2; rps="-"; }
  cpu="-"
  if [ -n "${pid[$name]:-}" ] && num "$before" && num "$after" && num "$n" && [ "$n" -gt 0 ]; then
    cpu=$(awk -v d=$((after - before)) -v t="$ticks" -v n="$n" 'BEGIN { printf "%.1f", d / t * 1e6 / n }')
  fi
}

# Cases as KIND:NAME:PORT:CONNS. Rounds alternate between them so a noisy neighbour
# hurts all alike; the median of the rounds is reported.
cases=()
for c in "${conns_list[@]}"; do
  for t in $TARGETS; do cases+=("h1:${t%%:*}:${t##*:}:$c"); done
done
if part 2w; then
  for c in "${conns_list[@]}"; do
    cases+=("2w:direct-2w:18092:$c" "2w:keyway-2w:18086:$c" "2w:haproxy-2t:18087:$c")
  done
fi
if part h2; then cases+=("h2:keyway:18081:$H2_CONNS" "h2:haproxy:18088:$H2_CONNS"); fi
if part tls; then cases+=("tls:keyway:18091:$TLS_CONNS" "tls:haproxy:18089:$TLS_CONNS"); fi
if [ -n "${pid[keyway-pgo]:-}" ]; then
  part h2 && cases+=("h2:keyway-pgo:18093:$H2_CONNS")
  part tls && cases+=("tls:keyway-pgo:18094:$TLS_CONNS")
fi

declare -A all_rps all_cpu all_p50 all_p99
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq 1 "$ROUNDS"); do
  for case in "${cases[@]}"; do
    IFS=: read -r kind name port c <<<"$case"
    measure "$kind" "$name" "$port" "$c"
    all_rps["$kind/$name/$c"]+="$rps "
    all_cpu["$kind/$name/$c"]+="$cpu "
    echo "bench: round $round: $kind $name c$c: $rps req/s, $cpu µs CPU/request" >&2
  done
done

median() {
  tr ' ' '\n' <<<"${1:-}" | { grep -E '^[0-9]+([.][0-9]+)?$' || true; } | sort -g |
    awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)]; else print "-" }'
}
declare -A rps_m cpu_m p50 p99
for key in "${!all_rps[@]}"; do
  rps_m[$key]=$(median "${all_rps[$key]}")
  cpu_m[$key]=$(median "${all_cpu[$key]}")
done

# Latency at a fixed rate, after the throughput rounds so the rate can follow HAProxy's.
c1=${conns_list[0]}
if [ -n "$RATE" ]; then
  rate_note="set by RATE"
elif num "${rps_m[h1/haproxy/$c1]:-}"; then
  RATE=$(awk -v r="${rps_m[h1/haproxy/$c1]}" 'BEGIN { r = int(r / 2); print (r < 1 ? 1 : r) }')
  rate_note="half of HAProxy's median at c$c1"
else
  RATE=4000
  rate_note="HAProxy not measured: fixed"
fi
for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    name=${t%%:*}; port=${t##*:}
    lat=$(timeout -k 5 $((DURATION + 30)) "${on_front[@]}" "$bin/loadgen" --addr "127.0.0.1:$port" \
      --rate "$RATE" --seconds "$DURATION" --connections "$LAT_CONNS" 2>"$tmp/loadgen.err") || true
    all_p50[$name]+="$(sed -nE 's/.*"p50_us":([0-9]+).*/\1/p' <<<"$lat") "
    all_p99[$name]+="$(sed -nE 's/.*"p99_us":([0-9]+).*/\1/p' <<<"$lat") "
    lerr=$(sed -nE 's/.*"errors":([0-9]+).*/\1/p' <<<"$lat")
    [ "${lerr:-x}" != 0 ] && echo "bench: $name: latency run: ${lerr:-no result;} errors $(head -n 1 "$tmp/loadgen.err")" >&2
    echo "bench: round $round: latency $name at $RATE req/s: $lat" >&2
  done
done
for t in $TARGETS; do
  name=${t%%:*}
  p50[$name]=$(median "${all_p50[$name]:-}")
  p99[$name]=$(median "${all_p99[$name]:-}")
done

for name in "${!pid[@]}"; do
  if ! kill -0 "${pid[$name]}" 2>/dev/null; then
    echo "bench: $name exited during the run; its log ends:" >&2
    tail -n 5 "$tmp/$name.log" "$tmp/$name.stderr" 2>/dev/null >&2 || true
  fi
done

# Formatting; every helper prints "-" when a value is missing.
int() { if num "${1:-}"; then printf "%.0f" "$1"; else echo "-"; fi; }
ratio() { if num "${1:-}" && num "${2:-}" && [ "$(int "$2")" != 0 ]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; else echo "-"; fi; }
added() { if num "${1:-}" && num "${2:-}"; then echo $(($1 - $2)); else echo "-"; fi; }
r() { int "${rps_m[$1]:-}"; }
u() { echo "${cpu_m[$1]:--}"; }
# each_c FN: "c50 $(FN 50), c256 $(FN 256)" over CONNS_LIST.
each_c() {
  local out="" c
  for c in "${conns_list[@]}"; do out+="${out:+, }c$c $("$@" "$c")"; done
  echo "$out"
}
# throughput_table KIND NAME...: req/s, then CPU µs/request, per connection count.
throughput_table() {
  local kind=$1 hdr="| target |" sep="|---|" row c n
  shift
  for c in "${conns_list[@]}"; do hdr+=" req/s c$c |"; sep+="---:|"; done
  for c in "${conns_list[@]}"; do hdr+=" CPU µs/req c$c |"; sep+="---:|"; done
  echo "$hdr"; echo "$sep"
  for n in "$@"; do
    row="| $n |"
    for c in "${conns_list[@]}"; do row+=" $(r "$kind/$n/$c") |"; done
    for c in "${conns_list[@]}"; do row+=" $(u "$kind/$n/$c") |"; done
    echo "$row"
  done
}
names=()
for t in $TARGETS; do names+=("${t%%:*}"); done
has() { [[ " ${names[*]} " == *" $1 "* ]]; }
kh() { ratio "${rps_m[h1/keyway/$1]:-}" "${rps_m[h1/haproxy/$1]:-}"; }
kn() { ratio "${rps_m[h1/keyway/$1]:-}" "${rps_m[h1/nginx/$1]:-}"; }
kc() { echo "$(u "h1/keyway/$1") vs $(u "h1/haproxy/$1")"; }
cls() { ratio "${rps_m[h1/keyway-cls/$1]:-}" "${rps_m[h1/keyway-pr/$1]:-}"; }
scale() { ratio "${rps_m[2w/keyway-2w/$1]:-}" "${rps_m[h1/keyway/$1]:-}"; }
k2h2() { ratio "${rps_m[2w/keyway-2w/$1]:-}" "${rps_m[2w/haproxy-2t/$1]:-}"; }
# paired KEY_A KEY_B: A/B within each round (the two ran within a minute, on the machine
# as it was then), listed, and their median. The ratio of the two medians can pair a slow
# round of one with a fast round of the other: on this VM whole rounds move by 20%.
paired() {
  paste -d' ' <(tr ' ' '\n' <<<"${all_rps[$1]:-}") <(tr ' ' '\n' <<<"${all_rps[$2]:-}") |
    awk '$1 ~ /^[0-9.]+$/ && $2 ~ /^[0-9.]+$/ && $2 > 0 { r[++n] = $1 / $2; l = l sprintf("%s%.2f", n > 1 ? " " : "", r[n]) }
         END { if (!n) { print "-"; exit }
               for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
               printf "%.2f (%s)", r[int((n + 1) / 2)], l }'
}
pkh() { paired "h1/keyway/$1" "h1/haproxy/$1"; }
paired2w() { paired "2w/keyway-2w/$1" "2w/haproxy-2t/$1"; }
pcls() { paired "h1/keyway-cls/$1" "h1/keyway-pr/$1"; }
pgh() { ratio "${rps_m[h1/keyway-pgo/$1]:-}" "${rps_m[h1/haproxy/$1]:-}"; }
ppgh() { paired "h1/keyway-pgo/$1" "h1/haproxy/$1"; }
pgc() { echo "$(u "h1/keyway-pgo/$1") vs $(u "h1/haproxy/$1")"; }

mkdir -p bench/results
{
  echo "Measured $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $cores cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), load average $load_at_start at the start; wrk -t1, ${WARMUP} s warm-up then ${DURATION} s measured per run; median of $ROUNDS alternating rounds."
  echo
  echo "HTTP/1.1, one worker/thread per proxy alone on core $proxy_core; backend and wrk on core $front. CPU: the proxy's utime + stime over the requests wrk completed (nginx: master and worker)."
  echo
  throughput_table h1 "${names[@]}"
  echo
  echo "Open-loop latency (loadgen, $LAT_CONNS connections, ${DURATION} s) at $RATE req/s ($rate_note):"
  echo
  echo "| target | p50 µs | p99 µs | added p50 µs | added p99 µs |"
  echo "|---|---:|---:|---:|---:|"
  for n in "${names[@]}"; do
    if [ "$n" = direct ] || ! has direct; then a50="-"; a99="-"; else a50=$(added "${p50[$n]}" "${p50[direct]}"); a99=$(added "${p99[$n]}" "${p99[direct]}"); fi
    echo "| $n | ${p50[$n]} | ${p99[$n]} | $a50 | $a99 |"
  done
  if part 2w; then
    echo
    echo "Two workers/threads (keyway \`workers = 2\`, HAProxy \`nbthread 2\`), UNPINNED: the proxy, its own backend (18092) and wrk share all $cores cores, so a second worker competes with the load it serves. keyway-2w/keyway below compares this layout with the pinned one-worker row: what a second worker buys on this machine, load generator included."
    echo
    throughput_table 2w direct-2w keyway-2w haproxy-2t
  fi
  if part h2 || part tls; then
    echo
    echo "HTTP/2 and TLS, one worker/thread on core $proxy_core: h2c by prior knowledge (h2load -t1 -c$H2_CONNS -m$H2_STREAMS); HTTP/1.1 over TLS with keep-alive (wrk -t1 -c$TLS_CONNS: one handshake per connection and run, ECDSA P-256 certificate)."
    echo
    echo "| protocol | target | req/s | CPU µs/req |"
    echo "|---|---|---:|---:|"
    for k in h2:$H2_CONNS tls:$TLS_CONNS; do
      part "${k%%:*}" || continue
      for n in keyway keyway-pgo haproxy; do
        [ "$n" = keyway-pgo ] && [ -z "${pid[keyway-pgo]:-}" ] && continue
        label=${k%%:*}; [ "$label" = h2 ] && label=h2c; [ "$label" = tls ] && label=https
        echo "| $label | $n | $(r "${k%%:*}/$n/${k##*:}") | $(u "${k%%:*}/$n/${k##*:}") |"
      done
    done
  fi
  echo
  if has keyway && has haproxy; then
    echo "keyway/HAProxy throughput: $(each_c kh)"
    echo "keyway/HAProxy throughput per round, median (rounds): $(each_c pkh)"
    echo "CPU µs/request keyway vs HAProxy: $(each_c kc)"
    echo "added p99 at $RATE req/s, keyway vs HAProxy: $(added "${p99[keyway]}" "${p99[direct]:-}") vs $(added "${p99[haproxy]}" "${p99[direct]:-}") µs (added p50: $(added "${p50[keyway]}" "${p50[direct]:-}") vs $(added "${p50[haproxy]}" "${p50[direct]:-}") µs)"
  fi
  echo "PGO: $pgo_note"
  if has keyway-pgo && has haproxy; then
    echo "keyway-pgo/HAProxy throughput: $(each_c pgh); per round $(each_c ppgh)"
    echo "CPU µs/request keyway-pgo vs HAProxy: $(each_c pgc)"
    echo "added p99 at $RATE req/s, keyway-pgo vs HAProxy: $(added "${p99[keyway-pgo]}" "${p99[direct]:-}") vs $(added "${p99[haproxy]}" "${p99[direct]:-}") µs (added p50: $(added "${p50[keyway-pgo]}" "${p50[direct]:-}") vs $(added "${p50[haproxy]}" "${p50[direct]:-}") µs)"
    part h2 && echo "h2c keyway-pgo/HAProxy throughput: $(ratio "${rps_m[h2/keyway-pgo/$H2_CONNS]:-}" "${rps_m[h2/haproxy/$H2_CONNS]:-}"), per round $(paired "h2/keyway-pgo/$H2_CONNS" "h2/haproxy/$H2_CONNS")"
    part tls && echo "TLS keyway-pgo/HAProxy throughput: $(ratio "${rps_m[tls/keyway-pgo/$TLS_CONNS]:-}" "${rps_m[tls/haproxy/$TLS_CONNS]:-}"), per round $(paired "tls/keyway-pgo/$TLS_CONNS" "tls/haproxy/$TLS_CONNS")"
  fi
  has keyway && has nginx && echo "keyway/nginx throughput: $(each_c kn)"
  if part 2w; then
    echo "workers = 2 (unpinned): keyway-2w/keyway (pinned, one worker) $(each_c scale); keyway-2w/haproxy-2t $(each_c k2h2), per round $(each_c paired2w)"
  fi
  part h2 && echo "h2c keyway/HAProxy throughput: $(ratio "${rps_m[h2/keyway/$H2_CONNS]:-}" "${rps_m[h2/haproxy/$H2_CONNS]:-}"), per round $(paired "h2/keyway/$H2_CONNS" "h2/haproxy/$H2_CONNS"); CPU µs/request $(u "h2/keyway/$H2_CONNS") vs $(u "h2/haproxy/$H2_CONNS")"
  part tls && echo "TLS keyway/HAProxy throughput: $(ratio "${rps_m[tls/keyway/$TLS_CONNS]:-}" "${rps_m[tls/haproxy/$TLS_CONNS]:-}"), per round $(paired "tls/keyway/$TLS_CONNS" "tls/haproxy/$TLS_CONNS"); CPU µs/request $(u "tls/keyway/$TLS_CONNS") vs $(u "tls/haproxy/$TLS_CONNS")"
  has keyway-cls && has keyway-pr && echo "classifier plugin on/off (keyway-cls/keyway-pr) throughput: $(each_c cls); per round $(each_c pcls)"
  true
} | tee bench/results/latest.md
