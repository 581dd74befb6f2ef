#!/usr/bin/env bash
# A fleet of three replicas on one Garage bucket: N concurrent cold GETs of one blob spread
# over the replicas (upstream bytes, wall time, peak RSS), and a blob the bucket holds read
# through a replica without it vs straight from Garage vs redirect mode. Prints markdown
# tables for docs/benchmarks.md.
#   BENCH_BLOB_MIB=256 BENCH_RATE_MIB=10 BENCH_N=1,30,90 BENCH_HERD_ROUNDS=3 BENCH_ROUNDS=5 \
#     scripts/bench-fleet.sh [herd|shared]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-peers.sh
exec cargo bench --locked --bench fleet -- "$@"
