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

# ensure_tools CMD:PACKAGE...: installs (as root, from Debian) the packages whose command
# is missing; otherwise says which to install.
ensure_tools() {
  local t missing=()
  for t in "$@"; do command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t##*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bench: needs ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
}

# sources_id: names the proxy's sources as committed (the crates, the manifest and the
# lock file), with "-dirty" when the work tree differs from them: what a PGO build was
# trained and built from (bench/pgo.sh), compared by bench/run.sh before it uses one.
sources_id() {
  local id
  id=$(git rev-parse HEAD:crates HEAD:Cargo.toml HEAD:Cargo.lock | sha1sum | cut -c1-12)
  [ -n "$(git status --porcelain -- crates Cargo.toml Cargo.lock)" ] && id+="-dirty"
  echo "$id"
}

# wait_port PORT [TRIES]: polls every 0.2 s (default 150 tries: 30 s; valgrind needs more).
wait_port() {
  for _ in $(seq 1 "${2:-150}"); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "bench: nothing listening on port $1" >&2
  exit 1
}

# start_pair [WRAPPER...]: the bench backend on the front core (18080), and keyway
# (bench/keyway.toml, 18081) and HAProxy (bench/haproxy.cfg, 18083) alone on the proxy
# core, each run under WRAPPER when one is given (valgrind: then the ports get longer to
# open). Sets `front` and `proxy_core`, and pid[NAME] and port[NAME] for keyway and
# haproxy, which the caller declares (`declare -A pid port`); returns once all listen.
start_pair() {
  local cores tries=150
  cores=$(nproc); front=0; proxy_core=$((cores > 1 ? 1 : 0))
  [ $# -gt 0 ] && tries=900
  cat config/certs/pvwa.pem config/certs/pvwa.key >"$tmp/haproxy-tls.pem"
  taskset -c $front "$bin/bench-backend" 127.0.0.1:18080 2>/dev/null & pids+=($!)
  taskset -c $proxy_core "$@" "$bin/keyway" run --config bench/keyway.toml >"$tmp/keyway.log" 2>&1 & pids+=($!)
  pid[keyway]=$!
  port[keyway]=18081
  BENCH_TMP=$tmp taskset -c $proxy_core "$@" haproxy -f bench/haproxy.cfg -db >"$tmp/haproxy.log" 2>&1 & pids+=($!)
  pid[haproxy]=$!
  port[haproxy]=18083
  wait_port 18080; wait_port 18081 $tries; wait_port 18083 $tries
}
