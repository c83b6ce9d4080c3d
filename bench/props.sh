#!/usr/bin/env bash
# The long run of the property tests CI runs at proptest's default 256 cases each: the
# front door's path normaliser, the route glob matcher, cookie parsing and header
# rewriting, each with CASES generated inputs (default 200000; stable toolchain, release
# build). Prints the total case count.
#   bash bench/props.sh            # 200 000 cases per property
#   CASES=1000000 bash bench/props.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${CASES:-200000}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
PROPTEST_CASES=$cases cargo test --release -q -p keyway-proxy --lib props -- --test-threads 2 2>&1 | tee "$log"
n=$(grep -cE '^test .*props::.* \.\.\. ok$' "$log" || true)
[ "$n" -gt 0 ] || n=$(grep -oE '[0-9]+ passed' "$log" | tail -1 | grep -oE '[0-9]+')
echo "properties: $n, cases each: $cases, total cases: $((n * cases)), seconds: $(( $(date +%s) - start ))"
