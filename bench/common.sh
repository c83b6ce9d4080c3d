# Shared by the bench scripts (sourced, not run): builds keyway and the bench tools,
# and gives a temp dir, background processes that stop with the script, and a wait for
# a listening port. Everything listens on loopback.
cargo build --release -q -p keyway -p keyway-bench
mkdir -p bench/results  # results, and the bench configs' state files
bin=${CARGO_TARGET_DIR:-target}/release
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

# wait_port PORT [TRIES]: polls every 0.2 s (default 150 tries: 30 s; valgrind needs more).
wait_port() {
  for _ in $(seq 1 "${2:-150}"); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "bench: nothing listening on port $1" >&2
  exit 1
}
