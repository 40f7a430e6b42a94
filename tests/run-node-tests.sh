#!/usr/bin/env bash
# The checks that need a real client: the GraphiQL playground in headless Chromium with every
# other host blocked (tests/browser), graphql-http's GraphQL-over-HTTP audit (tests/graphql-http)
# and the graphql-ws reference client (tests/graphql-ws), all against one dev-mode gateway.
#
# Installs Debian's chromium when /usr/bin/chromium is missing, runs `npm ci` in each node
# project, builds target/debug/smd-gateway (a no-op when it is current), starts it on free
# loopback ports with a fresh data directory, runs the three checks, stops it. Exits 1 if any
# check failed. Works unattended (CI=true, no stdin); takes about a minute once built.
set -euo pipefail
cd "$(dirname "$0")/.."
repository=$(pwd)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}
if [ ! -x /usr/bin/chromium ]; then
  echo "-- installing chromium (Debian)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version 2>/dev/null  # its wrapper script warns about memory on stderr

for project in browser graphql-http graphql-ws; do
  echo "-- npm ci (tests/$project)"
  (cd "tests/$project" && npm ci --no-audit --no-fund --loglevel=error)
done

# Always asked: cargo does nothing when the binary is current, and a stale binary would test
# an older playground than the one being committed.
echo "-- cargo build -p smd-gateway"
cargo build -q -p smd-gateway
binary="${CARGO_TARGET_DIR:-$repository/target}/debug/smd-gateway"

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/smd-node-tests.XXXXXX")
gateway_pid=""
stop_gateway() {
  if [ -n "$gateway_pid" ] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  gateway_pid=""
}
cleanup() {
  stop_gateway
  rm -rf "$data_dir"
}
trap cleanup EXIT

port=$(free_port)
sandbox_port=$(free_port)
log="$data_dir/gateway.log"
echo "-- starting the dev gateway on 127.0.0.1:$port (sandbox 127.0.0.1:$sandbox_port)"
SMD_DATA_DIR="$data_dir/data" SMD_LISTEN="127.0.0.1:$port" SMD_SANDBOX_LISTEN="127.0.0.1:$sandbox_port" \
  RUST_LOG="${RUST_LOG:-warn}" "$binary" </dev/null >"$log" 2>&1 &
gateway_pid=$!
for _ in $(seq 1 600); do
  grep -q '^ready playground=' "$log" && break
  if ! kill -0 "$gateway_pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if ! grep -q '^ready playground=' "$log"; then
  echo "the gateway did not start:" >&2
  cat "$log" >&2
  exit 1
fi
# The banner prints each demo user's token on the line after their name.
token=$(grep -A1 'practitioner  Dr Mei Chen' "$log" | tail -n1 | tr -d '[:space:]')
if [[ "$token" != eyJ* ]]; then
  echo "no demo practitioner token in the banner:" >&2
  cat "$log" >&2
  exit 1
fi
export GATEWAY_URL="http://127.0.0.1:$port"
export GATEWAY_TOKEN="$token"
grep '^ready ' "$log"

passed=0
failed=0
failures=()
run_check() {
  local name=$1 directory=$2 script=$3
  echo "-- $name (tests/$directory)"
  if (cd "tests/$directory" && timeout 180 node "$script"); then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name")
  fi
}
run_check "browser: the playground in headless Chromium" browser playground.mjs
run_check "graphql-http server audit" graphql-http audit.mjs
run_check "graphql-ws client" graphql-ws client.mjs

stop_gateway
if [ "$failed" -gt 0 ]; then
  echo "failed: ${failures[*]}" >&2
  echo "gateway log (last 40 lines):" >&2
  grep -v '^ *eyJ' "$log" | tail -n 40 >&2 || true
fi
echo "node-checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
