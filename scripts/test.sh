#!/usr/bin/env bash
# Runs every test: the Rust unit and integration tests on the real default
# model, then the app SDK's checks (scripts/test-sdk.sh: stale bindings,
# Python and Kotlin on the same model). One cargo profile (release) serves
# tests, benches and the CLI, so llama.cpp's C++ build happens once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch.sh
cargo test --release --all-targets
cargo test --release --doc
# The app SDK: stale-bindings check, Python binding tests, the Kotlin program.
bash scripts/test-sdk.sh
