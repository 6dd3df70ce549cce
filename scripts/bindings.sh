#!/usr/bin/env bash
# Regenerates the Python, Kotlin and Swift bindings in bindings/ from the
# built library (UniFFI library mode: the API is read from the .so itself).
#
#   scripts/bindings.sh           # rebuild, regenerate, write into bindings/
#   scripts/bindings.sh --check   # rebuild, regenerate, fail if bindings/ differs
#
# The generator is bindings/uniffi-bindgen, a crate of its own pinned to the
# uniffi version the library is built with (its own target folder, so its
# dependencies never change the main build's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-write}"
case "$mode" in
    write | --check) ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

cargo build --release --lib
cargo build --release --manifest-path bindings/uniffi-bindgen/Cargo.toml \
    --target-dir target/uniffi-bindgen
bindgen="target/uniffi-bindgen/release/uniffi-bindgen"
lib="target/release/libnextquill.so"

fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
for language in python kotlin swift; do
    "$bindgen" generate --library "$lib" \
        --language "$language" --out-dir "$fresh/$language" --no-format >/dev/null
done

if [ "$mode" = "--check" ]; then
    stale=0
    for language in python kotlin swift; do
        if ! diff -r -u "bindings/$language/generated" "$fresh/$language" >"$fresh/$language.diff"; then
            stale=1
            echo "error: bindings/$language/generated is stale (the API or its docs in src/ffi changed):" >&2
            head -n 40 "$fresh/$language.diff" >&2
        fi
    done
    if [ "$stale" -ne 0 ]; then
        echo "run scripts/bindings.sh and commit bindings/ with the change to src/ffi" >&2
        exit 1
    fi
    echo "bindings/{python,kotlin,swift}/generated match the library"
    exit 0
fi

for language in python kotlin swift; do
    rm -rf "bindings/$language/generated"
    mkdir -p "bindings/$language"
    cp -r "$fresh/$language" "bindings/$language/generated"
done
echo "wrote bindings/{python,kotlin,swift}/generated from $lib"
