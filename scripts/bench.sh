#!/usr/bin/env bash
# Warm blob throughput (berth and distribution's proxy mode vs nginx; berth over h2c, TLS
# HTTP/1.1 and TLS HTTP/2 vs its plain HTTP/1.1), cached manifests (berth and
# distribution's proxy vs nginx, plain and TLS) and cold pull (berth and distribution's
# proxy vs the registry directly), measured in one run against real peers, curl and wrk as
# the clients. Prints markdown tables for docs/benchmarks.md.
#   BENCH_BLOB_MIB=256 BENCH_ROUNDS=5 BENCH_SECS=5 BENCH_CDN_RATE_MIB=100 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-peers.sh
exec cargo bench --locked --bench e2e -- pull manifest
