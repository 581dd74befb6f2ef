#!/usr/bin/env bash
# Installs the real peers berth's tests run against (DESIGN.md §5), from Debian packages,
# and only those that are missing. Safe to run again: with everything present it changes
# nothing and needs no root.
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
    "curl curl"
    "update-ca-certificates ca-certificates"
    "chromium chromium"
)

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

mapfile -t packages < <(missing_packages)
if [ "${#packages[@]}" -eq 0 ]; then
    echo "install-test-peers: all test peers present"
    exit 0
fi

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
for i in "${!packages[@]}"; do
    if [ "${packages[$i]}" = nginx-light ] && ! apt-cache show nginx-light >/dev/null 2>&1; then
        packages[i]=nginx
    fi
done

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod +x "$policy"
    trap '"${as_root[@]}" rm -f "$policy"' EXIT
fi

"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${packages[@]}" ||
    die "apt-get install ${packages[*]} failed"

mapfile -t still < <(missing_packages)
[ "${#still[@]}" -eq 0 ] || die "still missing after install: ${still[*]}"
echo "install-test-peers: installed ${packages[*]}"
