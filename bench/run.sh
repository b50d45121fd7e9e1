#!/usr/bin/env bash
# The benchmark in one command: builds the gateway and the load generator in
# release mode, then runs bench/bench.py (demo upstreams, gateways and load,
# pinned with taskset), which prints the table and writes bench/results/.
#
# Usage: bench/run.sh [--duration 5s] [--rounds 3] [--pin auto|none] ...
# Needs: the Rust toolchain, python3, taskset (util-linux); h2load (nghttp2-client)
# and redis-server for their rows. Takes about 7 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin aggregator --example loadgen --example otlp_sink --example naive
exec python3 bench/bench.py "$@"
