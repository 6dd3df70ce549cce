#!/usr/bin/env bash
# The app SDK's checks: the committed bindings match the library, the Python
# binding tests and the Kotlin program run on the real default model.
# Swift has no toolchain here: its bindings are generated and committed, not
# compiled (see bindings/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch.sh >/dev/null
bash scripts/bindings.sh --check
# The library for the bindings, the CLI the Python tests compare effects with.
cargo build --release --lib --bin nextquill

python3 -m pytest --version >/dev/null 2>&1 ||
    python3 -m pip install --quiet pytest ||
    python3 -m pip install --quiet --break-system-packages pytest
python3 -m pytest -q -rA tests/python

bash scripts/kotlin.sh
