#!/usr/bin/env bash
# Installs the real peers berth's tests run against (DESIGN.md §5), from Debian packages,
# and only those that are missing. Safe to run again: with everything present it changes
# nothing and needs no root.
#
# Garage (the S3-compatible object store behind the shared tier's tests) is not packaged
# by Debian: it is built with `cargo install` into $BERTH_PEERS_DIR (default
# ~/.cache/berth/peers), as the invoking user, no root needed. tests/support/garage.rs
# looks for it in PATH, then $BERTH_PEERS_DIR/bin, then ~/.cache/berth/peers/bin.
# cargo-fuzz (scripts/fuzz.sh, the fuzz targets in fuzz/) is installed the same way and
# found by scripts/fuzz.sh in the same places; so is cargo-deny (scripts/test.sh's `deny`
# step, deny.toml), found by scripts/test.sh.
#
# Services are not started by the install (a policy-rc.d is in place while apt runs):
# docker-registry would otherwise take :5000, berth's own port. The tests start every
# peer themselves, on loopback, with their own configuration.
set -euo pipefail

# nginx, update-ca-certificates and friends live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# command the tests need → Debian package that provides it
peers=(
    "docker-registry docker-registry"
    "skopeo skopeo"
    "ctr containerd"
    "containerd containerd"
    "promtool prometheus"
    "nginx nginx-light"
    "umoci umoci"
    "openssl openssl"
    "jq jq"
    "htpasswd apache2-utils"
    "curl curl"
    "wrk wrk"
    "update-ca-certificates ca-certificates"
    "chromium chromium"
)

# The Garage release the tests are written against (its CLI output and config keys are
# parsed by tests/support/garage.rs); bump both together.
GARAGE_VERSION=2.5.0
# The cargo-fuzz scripts/fuzz.sh drives (its build flags and `list` output).
CARGO_FUZZ_VERSION=0.13.2
# The cargo-deny scripts/test.sh runs (deny.toml's keys are this version's).
CARGO_DENY_VERSION=0.20.2
peers_dir="${BERTH_PEERS_DIR:-$HOME/.cache/berth/peers}"

die() {
    echo "install-test-peers: $*" >&2
    exit 1
}

missing_packages() {
    local entry cmd pkg
    for entry in "${peers[@]}"; do
        read -r cmd pkg <<<"$entry"
        command -v "$cmd" >/dev/null 2>&1 || echo "$pkg"
    done | sort -u
}

garage_present() {
    command -v garage >/dev/null 2>&1 || [ -x "$peers_dir/bin/garage" ]
}

cargo_fuzz_present() {
    command -v cargo-fuzz >/dev/null 2>&1 || [ -x "$peers_dir/bin/cargo-fuzz" ]
}

cargo_deny_present() {
    command -v cargo-deny >/dev/null 2>&1 || [ -x "$peers_dir/bin/cargo-deny" ]
}

install_packages() {
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${packages[*]}, and apt-get is not available (berth's tests expect Debian or Ubuntu)"

    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 ||
            die "missing ${packages[*]}; run this script as root (sudo is not available)"
        as_root=(sudo)
    fi

    echo "install-test-peers: missing, will install: ${packages[*]}"
    "${as_root[@]}" apt-get update -qq || die "apt-get update failed"

    # Newer Debian releases dropped nginx-light; plain nginx serves the benchmarks as well.
    local i
    for i in "${!packages[@]}"; do
        if [ "${packages[$i]}" = nginx-light ] && ! apt-cache show nginx-light >/dev/null 2>&1; then
            packages[i]=nginx
        fi
    done

    # Globals, not locals: the EXIT trap reads them after this function has returned.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
        "${as_root[@]}" chmod +x "$policy"
        trap '"${as_root[@]}" rm -f "$policy"' EXIT
    fi

    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${packages[@]}" ||
        die "apt-get install ${packages[*]} failed"

    local still
    mapfile -t still < <(missing_packages)
    [ "${#still[@]}" -eq 0 ] || die "still missing after install: ${still[*]}"
    echo "install-test-peers: installed ${packages[*]}"
}

install_garage() {
    command -v cargo >/dev/null 2>&1 ||
        die "missing garage, and cargo is not available to build it (install Rust first)"
    echo "install-test-peers: building garage $GARAGE_VERSION into $peers_dir" \
        "(the first build takes ~16+ min on 2 cores; later runs find it there)"
    cargo install garage --locked --version "$GARAGE_VERSION" --root "$peers_dir" ||
        die "cargo install garage $GARAGE_VERSION failed"
    [ -x "$peers_dir/bin/garage" ] || die "garage not found at $peers_dir/bin/garage after install"
    echo "install-test-peers: installed garage $GARAGE_VERSION at $peers_dir/bin/garage"
}

install_cargo_fuzz() {
    command -v cargo >/dev/null 2>&1 ||
        die "missing cargo-fuzz, and cargo is not available to build it (install Rust first)"
    echo "install-test-peers: building cargo-fuzz $CARGO_FUZZ_VERSION into $peers_dir"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$peers_dir" ||
        die "cargo install cargo-fuzz $CARGO_FUZZ_VERSION failed"
    [ -x "$peers_dir/bin/cargo-fuzz" ] ||
        die "cargo-fuzz not found at $peers_dir/bin/cargo-fuzz after install"
    echo "install-test-peers: installed cargo-fuzz $CARGO_FUZZ_VERSION at $peers_dir/bin/cargo-fuzz"
}

install_cargo_deny() {
    command -v cargo >/dev/null 2>&1 ||
        die "missing cargo-deny, and cargo is not available to build it (install Rust first)"
    echo "install-test-peers: building cargo-deny $CARGO_DENY_VERSION into $peers_dir" \
        "(~2 min on 2 cores)"
    cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION" --root "$peers_dir" ||
        die "cargo install cargo-deny $CARGO_DENY_VERSION failed"
    [ -x "$peers_dir/bin/cargo-deny" ] ||
        die "cargo-deny not found at $peers_dir/bin/cargo-deny after install"
    echo "install-test-peers: installed cargo-deny $CARGO_DENY_VERSION at $peers_dir/bin/cargo-deny"
}

mapfile -t packages < <(missing_packages)
need_garage=false
garage_present || need_garage=true
need_cargo_fuzz=false
cargo_fuzz_present || need_cargo_fuzz=true
need_cargo_deny=false
cargo_deny_present || need_cargo_deny=true
if [ "${#packages[@]}" -eq 0 ] && [ "$need_garage" = false ] && [ "$need_cargo_fuzz" = false ] &&
    [ "$need_cargo_deny" = false ]; then
    echo "install-test-peers: all test peers present"
    exit 0
fi

if [ "${#packages[@]}" -gt 0 ]; then
    install_packages
fi
if [ "$need_garage" = true ]; then
    install_garage
fi
if [ "$need_cargo_fuzz" = true ]; then
    install_cargo_fuzz
fi
if [ "$need_cargo_deny" = true ]; then
    install_cargo_deny
fi
