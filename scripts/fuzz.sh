#!/usr/bin/env bash
# Fuzzes every parser of untrusted input (the cargo-fuzz targets in fuzz/): builds them
# once, then runs each for SECONDS_PER_TARGET (default 600), one after the other, and
# prints per target the inputs run, libFuzzer's coverage and any crash. Exits non-zero
# if any target crashed; the crashing input is kept in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                  # 10 minutes per target
#   scripts/fuzz.sh 6                # a smoke run (CI)
#   scripts/fuzz.sh 600 wire route   # only these targets
#   nice -n 19 scripts/fuzz.sh 600
#
# Each target starts from its committed seeds (fuzz/seeds/<target>/) and from the corpus
# earlier runs grew (fuzz/corpus/<target>/, not committed). To replay a crash:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz <target> fuzz/artifacts/<target>/<file>
#
# cargo-fuzz comes from scripts/install-test-peers.sh. The toolchain is stable; cargo
# fuzz needs nightly flags (-Zsanitizer=address), which RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/fuzz.sh [SECONDS_PER_TARGET (default 600)] [TARGET...]"
seconds=${1:-600}
case $seconds in
'' | *[!0-9]* | 0)
    echo "$usage" >&2
    exit 2
    ;;
esac
shift $(($# > 0 ? 1 : 0))

# rustup installs into ~/.cargo/bin, which a non-login shell (CI, sudo) may not have.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
# Where install-test-peers.sh puts cargo-fuzz, after anything already in PATH.
peers_dir="${BERTH_PEERS_DIR:-$HOME/.cache/berth/peers}"
export PATH="$PATH:$peers_dir/bin:$HOME/.cache/berth/peers/bin"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is not installed; run scripts/install-test-peers.sh" >&2
    exit 1
fi

export RUSTC_BOOTSTRAP=1
# The same flags for build and run, so `cargo fuzz run` (replaying a crash) reuses this
# build: optimised, with debug assertions and overflow checks, under AddressSanitizer.
build_flags=(--fuzz-dir fuzz --release --debug-assertions --sanitizer address)

start=$SECONDS
echo "==> fuzz: building the targets"
cargo fuzz build "${build_flags[@]}"
echo "==> fuzz: built in $((SECONDS - start))s"

mapfile -t all < <(cargo fuzz list --fuzz-dir fuzz)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")
for target in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $target "* ]] || {
        echo "fuzz: no target $target (there are: ${all[*]})" >&2
        exit 2
    }
done
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
logs=fuzz/target/logs
mkdir -p "$logs"

# The number libFuzzer prints after `name:` on its last status line.
last_figure() {
    local n
    n=$(grep -o "$1: *[0-9][0-9]*" "$2" | tail -n 1 | grep -o '[0-9]*$' || true)
    echo "${n:-?}"
}

crashed=()
summary=()
for target in "${targets[@]}"; do
    corpus=fuzz/corpus/$target
    artifacts=fuzz/artifacts/$target
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
    log=$logs/$target.log
    echo "==> fuzz: $target for ${seconds}s"
    t0=$SECONDS
    rc=0
    # New inputs go to the first directory (the corpus); the seeds are only read.
    "$bin_dir/$target" "$corpus" "${seeds[@]}" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    took=$((SECONDS - t0))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    line=$(printf '%-10s %10s execs in %4ss, cov %s, ft %s, corpus %s' "$target" \
        "${execs:-?}" "$took" "$(last_figure cov "$log")" "$(last_figure ft "$log")" \
        "$(find "$corpus" -type f | wc -l)")
    if [ "$rc" -ne 0 ]; then
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        line="$line  CRASH (exit $rc): ${crash:-see $log}"
        crashed+=("$target")
        # The panic message or sanitizer report; the whole story is in the log.
        grep -m 1 -A 3 -E 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' \
            "$log" | sed "s/^/    $target: /" || true
    fi
    echo "$line"
    summary+=("$line")
done

echo "==> fuzz: ${#targets[@]} targets, ${seconds}s each, $((SECONDS - start))s in all"
printf '    %s\n' "${summary[@]}"
if [ "${#crashed[@]}" -gt 0 ]; then
    echo "==> fuzz: crashes in ${crashed[*]}; inputs under fuzz/artifacts/" >&2
    exit 1
fi
