#!/usr/bin/env bash
# Polyglot client checks: Python (grpcio), Node (@grpc/grpc-js) and grpcurl
# against a real gateway in front of the demo upstreams.
#
# Usage: bash tests/polyglot/run.sh [AGGREGATOR_BINARY]
#   default binary: target/release/aggregator (build it first: cargo build --release)
#
# Installs the clients into tests/polyglot/.venv and tests/polyglot/node_modules
# (reused while requirements.txt / package-lock.json are unchanged), starts the
# demo upstreams (50 ms delay) and the gateway on free ports, runs the three
# clients and exits non-zero if any of them fails.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

bin=${1:-$root/target/release/aggregator}
if [[ ! -x $bin ]]; then
  echo "run.sh: no aggregator binary at '$bin' (cargo build --release)" >&2
  exit 2
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

started_at=$SECONDS
say() { echo "== $*"; }

# --- clients --------------------------------------------------------------

venv=$here/.venv
if ! cmp -s "$here/requirements.txt" "$venv/.installed-requirements.txt"; then
  say "installing Python clients into tests/polyglot/.venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/.installed-requirements.txt"
fi

if ! cmp -s "$here/package-lock.json" "$here/node_modules/.installed-package-lock.json"; then
  say "installing Node clients into tests/polyglot/node_modules"
  # No install scripts are needed (protobufjs's only prints version hints).
  (cd "$here" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  cp "$here/package-lock.json" "$here/node_modules/.installed-package-lock.json"
fi

# --- servers --------------------------------------------------------------

tmp=$(mktemp -d "${TMPDIR:-/tmp}/aggregator-polyglot.XXXXXX")
pids=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  # The gateway drains in-flight calls on SIGTERM; don't wait for ever.
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((rc != 0)); then
    for log in "$tmp"/*.log; do
      [[ -s $log ]] || continue
      echo "-- last lines of $(basename "$log"):"
      tail -n 20 "$log"
    done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_ready LOG PID MESSAGE: polls LOG for a JSON log line with MESSAGE,
# for at most 10 s, failing early if PID exits.
wait_ready() {
  local log=$1 pid=$2 message=$3
  for _ in $(seq 1 200); do
    if grep -q "\"message\":\"$message\"" "$log"; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run.sh: process $pid exited before logging '$message'" >&2
      return 1
    fi
    sleep 0.05
  done
  echo "run.sh: no '$message' in $log after 10 s" >&2
  return 1
}

# field LOG MESSAGE NAME: the string field NAME of the JSON log line MESSAGE.
field() {
  grep -m1 "\"message\":\"$2\"" "$1" | grep -o "\"$3\":\"[^\"]*\"" | cut -d'"' -f4
}

# JSON logs are parsed here; RUST_LOG is pinned so the INFO ready lines appear.
export RUST_LOG=info

say "starting demo upstreams (50 ms delay)"
"$bin" --log-format json demo-upstreams --grpc 127.0.0.1:0 --http 127.0.0.1:0 --delay 50ms \
  2>"$tmp/upstreams.log" &
pids+=($!)
wait_ready "$tmp/upstreams.log" "${pids[-1]}" "demo upstreams ready"
grpc_addr=$(field "$tmp/upstreams.log" "demo upstreams ready" grpc)
http_addr=$(field "$tmp/upstreams.log" "demo upstreams ready" http)

# The example config itself, pointed at the upstreams just started, so the
# clients test what the README documents.
sed -e "s/127\.0\.0\.1:50061/$grpc_addr/g" \
    -e "s/127\.0\.0\.1:8081/$http_addr/g" \
    -e 's/^listen = "127\.0\.0\.1:50051"/listen = "127.0.0.1:0"/' \
    -e 's/^drain_timeout = .*/drain_timeout = "1s"/' \
    "$root/examples/gateway.toml" >"$tmp/gateway.toml"
if ! grep -q "^listen = \"127.0.0.1:0\"" "$tmp/gateway.toml"; then
  echo "run.sh: examples/gateway.toml no longer sets listen = \"127.0.0.1:50051\"" >&2
  exit 1
fi
for name in user_dashboard user_profile; do
  if ! grep -q "^\[aggregations\.$name\]" "$tmp/gateway.toml"; then
    echo "run.sh: examples/gateway.toml has no [aggregations.$name], which the clients call" >&2
    exit 1
  fi
done

say "starting the gateway"
"$bin" --log-format json --config "$tmp/gateway.toml" 2>"$tmp/gateway.log" &
pids+=($!)
wait_ready "$tmp/gateway.log" "${pids[-1]}" "aggregator ready"
addr=$(field "$tmp/gateway.log" "aggregator ready" addr)
say "gateway on $addr (upstreams: grpc $grpc_addr, http $http_addr)"

# --- clients --------------------------------------------------------------

passed=0
failed=()
run_client() {
  local name=$1
  shift
  say "$name"
  if timeout 120 "$@"; then
    passed=$((passed + 1))
  else
    failed+=("$name")
  fi
}

run_client python "$venv/bin/python" "$here/client.py" "$addr" "$root/proto"
run_client node node "$here/client.mjs" "$addr" "$root/proto"
run_client grpcurl env GRPCURL="$venv/bin/grpcurl" bash "$here/grpcurl.sh" "$addr"

echo
echo "== done in $((SECONDS - started_at)) s"
echo "polyglot: $passed passed, ${#failed[@]} failed"
if ((${#failed[@]} > 0)); then
  echo "failed: ${failed[*]}"
  exit 1
fi
