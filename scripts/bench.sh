#!/usr/bin/env bash
# Warm throughput and cached manifests (berth vs nginx, curl and wrk as clients) and cold
# pull (berth vs the registry directly), measured in one run against real peers. Prints markdown tables for docs/benchmarks.md.
#   BENCH_BLOB_MIB=256 BENCH_ROUNDS=5 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-peers.sh
exec cargo bench --locked --bench e2e -- pull manifest
