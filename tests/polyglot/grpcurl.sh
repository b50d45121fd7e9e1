#!/usr/bin/env bash
# Checks the gateway through grpcurl (1.8.x, which speaks only reflection
# v1alpha), using nothing but server reflection: no .proto files.
#
# Usage: grpcurl.sh HOST:PORT   (GRPCURL names the binary; default `grpcurl`)
# Expects the demo upstreams behind the gateway and the aggregations of
# examples/gateway.toml. Prints `ok  - ...` per passing check and
# `not ok - ...` per failing one; exits 1 if any check failed.
set -uo pipefail

addr=${1:?usage: grpcurl.sh HOST:PORT}
grpcurl=${GRPCURL:-grpcurl}
passed=0
failed=0
out=
rc=0
problems=()

# Runs grpcurl, keeping its combined output in $out and its exit code in $rc.
run() {
  out=$("$grpcurl" -plaintext -max-time 10 "$@" 2>&1)
  rc=$?
  problems=()
}

# check NAME WANT_RC PATTERN...: the last run exited WANT_RC ("0" or "fail"),
# its output contains every fixed-string PATTERN, and no other problem was noted.
check() {
  local name=$1 want_rc=$2 line
  shift 2
  if [[ $want_rc == 0 && $rc != 0 ]] || [[ $want_rc == fail && $rc == 0 ]]; then
    problems+=("exit code $rc, wanted $want_rc")
  fi
  for pattern in "$@"; do
    grep -qF -- "$pattern" <<<"$out" || problems+=("missing: $pattern")
  done
  if ((${#problems[@]} == 0)); then
    echo "ok  - $name"
    passed=$((passed + 1))
  else
    echo "not ok - $name"
    printf '    %s\n' "${problems[@]}"
    while IFS= read -r line; do echo "    | $line"; done <<<"$out"
    failed=$((failed + 1))
  fi
}

run "$addr" list
check "list: aggregator.v1.Aggregator and grpc.health.v1.Health" 0 \
  aggregator.v1.Aggregator grpc.health.v1.Health

run "$addr" describe aggregator.v1.Aggregator
check "describe aggregator.v1.Aggregator: both RPCs" 0 \
  "rpc Aggregate ( .aggregator.v1.AggregateRequest ) returns ( .aggregator.v1.AggregateResponse );" \
  "rpc FetchAll ( .aggregator.v1.FetchAllRequest ) returns ( .aggregator.v1.FetchAllResponse );"

run "$addr" describe google.rpc.ErrorInfo
check "describe google.rpc.ErrorInfo: error-detail types are served" 0 \
  "message ErrorInfo {"

run -d '{"aggregation":"user_dashboard","params":{"user_id":"42"}}' \
  "$addr" aggregator.v1.Aggregator/Aggregate
check "Aggregate user_dashboard 42: profile and orders merged, complete" 0 \
  '"profile": {' '"orders": {' '"user_id": "42"' '"complete": true'

run -d '{"aggregation":"user_dashboard","params":{"user_id":"42"}}' \
  "$addr" aggregator.v1.Aggregator/FetchAll
order=$(grep -o '"source": "[^"]*"' <<<"$out" | cut -d'"' -f4 | paste -sd, -)
[[ $order == profile,orders ]] || problems+=("result order: '$order'")
check "FetchAll user_dashboard 42: results in order [profile, orders]" 0 '"complete": true'

# User 0 has no profile in the demo (but an empty order list).
run -d '{"aggregation":"user_dashboard","params":{"user_id":"0"}}' \
  "$addr" aggregator.v1.Aggregator/Aggregate
check "Aggregate user 0: NOT_FOUND naming profile, with its ErrorInfo" fail \
  "Code: NotFound" "Message: source 'profile': no user '0'" \
  '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' '"reason":"SOURCE_FAILED"' '"source":"profile"'

run "$addr" grpc.health.v1.Health/Check
check "health Check '': SERVING" 0 '"status": "SERVING"'

run -d '{"service":"aggregator.v1.Aggregator"}' "$addr" grpc.health.v1.Health/Check
check "health Check aggregator.v1.Aggregator: SERVING" 0 '"status": "SERVING"'

echo "grpcurl: $passed passed, $failed failed"
((failed == 0))
