#!/usr/bin/env bash
# User-space instructions keyway executes per request (valgrind's callgrind), for
# configurations that differ in one feature (default: the native classifier,
# bench/keyway-pr.toml, vs the pam-classifier plugin, bench/keyway-cls.toml).
#
# Instruction counts do not move with what else the machine is doing, so this resolves
# costs of a few percent that throughput and CPU-time runs on a shared machine cannot.
# keyway starts with instrumentation off; after a warm-up (connections pooled, plugin
# instances made) it is switched on for exactly REQUESTS requests. Kernel time (the
# system calls) is not counted: compare user-space work, and remember the kernel's share.
#
#   bash bench/instructions-per-request.sh
#   REQUESTS=4000 RATE=400 CONFIGS="pr cls" bash bench/instructions-per-request.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-4000}
RATE=${RATE:-400}
CONFIGS=${CONFIGS:-"pr cls"}

command -v valgrind >/dev/null || { apt-get install -y -qq valgrind >/dev/null 2>&1 || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }; }
source bench/common.sh
bash plugins/build.sh >/dev/null
"$bin/bench-backend" 127.0.0.1:18080 2>/dev/null & pids+=($!)
"$bin/bench-backend" 127.0.0.1:18090 2>/dev/null & pids+=($!)
wait_port 18080; wait_port 18090
port_of() { sed -nE 's/^listen = "127\.0\.0\.1:([0-9]+)"/\1/p' "bench/keyway-$1.toml" | head -1; }

declare -A per
for v in $CONFIGS; do
  port=$(port_of "$v")
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$tmp/$v.out" \
    "$bin/keyway" run --config "bench/keyway-$v.toml" >"$tmp/$v.log" 2>&1 &
  vg=$!; pids+=($vg)
  wait_port "$port" 900
  "$bin/loadgen" --addr "127.0.0.1:$port" --rate 200 --seconds 2 --connections 4 >/dev/null
  callgrind_control -i on "$vg" >/dev/null
  out=$("$bin/loadgen" --addr "127.0.0.1:$port" --rate "$RATE" --seconds $((REQUESTS / RATE)) --connections 4)
  callgrind_control -i off "$vg" >/dev/null
  kill -TERM "$vg"; wait "$vg" || true
  n=$(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$out")
  errors=$(sed -E 's/.*"errors":([0-9]+).*/\1/' <<<"$out")
  ir=$(awk '/^totals:/ {print $2}' "$tmp/$v.out")
  per[$v]=$((ir / n))
  echo "keyway-$v: $n requests ($errors errors), $ir instructions, ${per[$v]} per request" >&2
  mkdir -p bench/results && cp "$tmp/$v.out" "bench/results/callgrind-$v.out"
done
set -- $CONFIGS
if [ $# -eq 2 ]; then
  awk -v a="${per[$1]}" -v b="${per[$2]}" -v x="$1" -v y="$2" \
    'BEGIN { printf "keyway-%s vs keyway-%s: %+d instructions per request (%+.1f%%)\n", y, x, b - a, (b - a) / a * 100 }'
fi
echo "(callgrind_annotate bench/results/callgrind-NAME.out shows where they go)"
