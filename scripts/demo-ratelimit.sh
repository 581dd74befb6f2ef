#!/usr/bin/env bash
# A burst of pulls straight at a Docker Hub rate-limit emulator (in front of a real
# registry), then the same burst through berth, side by side. Prints a table.
#   DEMO_LIMIT=10 DEMO_NODES=20 scripts/demo-ratelimit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-peers.sh
exec cargo bench --locked --bench e2e -- ratelimit
