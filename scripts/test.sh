#!/usr/bin/env bash
# The tests: formatting, lints, unit and deterministic-simulation tests, and integration
# tests that bring the real lab up and down (as root). Installs what it needs first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets --quiet -- -D warnings
cargo test --release --locked --workspace
# Every fuzz target briefly (docs/fuzzing.md): they keep building and their seeds keep
# passing. Unoptimized build (compiles faster); longer runs: bash scripts/fuzz.sh 600.
TERN_FUZZ_DEV=1 bash scripts/fuzz.sh 10
