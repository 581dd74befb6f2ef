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
# cargo deny (deny.toml): licenses, duplicate crate versions, crate sources. Advisories
# need the RustSec database, a git clone from GitHub: they are checked, offline, against
# a copy when there is one ($CARGO_DENY_ADVISORY_DB, else cargo-deny's own
# $CARGO_HOME/advisory-dbs; either as `cargo deny fetch db` fills it), else skipped.
cargo_deny() {
    # Where install-test-peers.sh puts cargo-deny, after anything already in PATH.
    local PATH="$PATH:${BERTH_PEERS_DIR:-$HOME/.cache/berth/peers}/bin:$HOME/.cache/berth/peers/bin"
    cargo deny --locked check licenses bans sources || return
    local db=${CARGO_DENY_ADVISORY_DB:-${CARGO_HOME:-$HOME/.cargo}/advisory-dbs} config=deny.toml
    if ! compgen -G "$db/advisory-db-*/.git" >/dev/null; then
        echo "==> deny: advisories SKIPPED: no RustSec database in $db; fetch one on a"
        echo "    connected machine with 'cargo deny fetch db' (README.md, Tests)"
        return 0
    fi
    if [ -n "${CARGO_DENY_ADVISORY_DB:-}" ]; then
        # deny.toml keeps cargo-deny's default db-path; a copy of it names this one.
        config=target/deny-advisories.toml
        mkdir -p target
        sed "/^\[advisories\]\$/a db-path = '$db'" deny.toml >"$config"
    fi
    cargo deny --locked --offline --config "$config" check advisories
}
step deny cargo_deny
step test cargo test --locked --all-targets "$@"
# Every parser of untrusted input under libFuzzer, 6 s per target (about a minute in
# all; scripts/fuzz.sh 600 is the long run). A crash fails the suite.
step fuzz scripts/fuzz.sh 6
step chart scripts/check-chart.sh
