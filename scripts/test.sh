#!/usr/bin/env bash
# Everything CI checks, in order: test peers, formatting, lints, then every test.
# Extra arguments go to `cargo test` (a test name filter, `-- --nocapture`, ...).
#
#   scripts/test.sh
#   scripts/test.sh blob_fill -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."

# rustup installs into ~/.cargo/bin, which a non-login shell (CI, sudo) may not have.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

step() {
    local name=$1 start=$SECONDS
    shift
    echo "==> $name: $*"
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "==> $name: FAILED (exit $rc) after $((SECONDS - start))s" >&2
        exit "$rc"
    fi
    echo "==> $name: ok in $((SECONDS - start))s"
}

step peers scripts/install-test-peers.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "==> note: not root. The integration tests run a real containerd, which needs root;"
    echo "    those tests fail or are skipped. Run 'sudo -E scripts/test.sh' for the full suite."
fi

step fmt cargo fmt --all -- --check
step clippy cargo clippy --all-targets --locked -- -D warnings
step test cargo test --locked --all-targets "$@"
# Every parser of untrusted input under libFuzzer, 6 s per target (about a minute in
# all; scripts/fuzz.sh 600 is the long run). A crash fails the suite.
step fuzz scripts/fuzz.sh 6
step chart scripts/check-chart.sh
