#!/usr/bin/env bash
# N concurrent cold pulls of one blob through berth and through distribution's proxy mode,
# behind an upstream limited per connection. Prints a markdown table.
#   BENCH_BLOB_MIB=256 BENCH_RATE_MIB=10 BENCH_N=1,10,50,200 scripts/bench-herd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-peers.sh
exec cargo bench --locked --bench e2e -- herd
