#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each, one after the other:
#   bash scripts/fuzz.sh SECONDS [TARGET...]
# Stable toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly flags; ASan works).
# Seeds: fuzz/corpus/TARGET (in git, made by `cargo run --example gen_seeds` in fuzz/); new
# inputs go to fuzz/target/corpus/TARGET (not in git); crashes to fuzz/artifacts/TARGET.
# Prints one summary line per target; exits 1 if any target crashed, timed out or failed
# to build. Needs no network except to install cargo-fuzz the first time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
export RUSTC_BOOTSTRAP=1
# TERN_FUZZ_DEV=1: unoptimized targets (CI: quicker to build, slower to run).
profile=()
if [ -n "${TERN_FUZZ_DEV:-}" ]; then profile=(--dev); fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
    if [ -z "$(ls -A "fuzz/corpus/$t" 2>/dev/null)" ]; then
        cargo run --quiet --manifest-path fuzz/Cargo.toml --example gen_seeds
        break
    fi
done
# Limits per input: a hang or a blow-up is a finding like a panic.
flags=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=32768 -print_final_stats=1)
build_start=$(date +%s)
if [ "$#" -gt 0 ]; then
    for t in "${targets[@]}"; do cargo fuzz build "${profile[@]}" "$t"; done
else
    cargo fuzz build "${profile[@]}"
fi
echo "fuzz: built ${#targets[@]} targets in $(( $(date +%s) - build_start )) s"
failed=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/target/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/target/fuzz-$t.log"
    start=$(date +%s)
    if cargo fuzz run "${profile[@]}" "$t" "fuzz/target/corpus/$t" "fuzz/corpus/$t" -- "${flags[@]}" >"$log" 2>&1; then
        result=ok
    else
        result="FAILED ($(grep -m1 -oE 'Test unit written to [^ ]+|ERROR: libFuzzer: [a-z-]+|panicked at [^,]+' "$log" || echo "see $log"))"
        failed=1
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
    [ -n "$runs" ] || runs=$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#')
    echo "fuzz $t: runs=${runs:-0} seconds=$(( $(date +%s) - start )) result=$result"
done
exit "$failed"
