#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine to build and run nextquill: the
# system packages llama.cpp's build needs, and the default model.
# Needs a Rust toolchain (rustup) and python3 with pip already present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)
# bindgen (llama.cpp's Rust bindings) needs libclang; no clang compiler is needed.
# (checked by package: a base image may carry libclang-cpp, which bindgen cannot use)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v c++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null || {
    echo "error: no Rust toolchain; install one with rustup (https://rustup.rs) and run this again" >&2
    exit 1
}

models/fetch.sh
