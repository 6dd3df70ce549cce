#!/usr/bin/env bash
# Builds libnextquill.so for Android with cargo-ndk into the app's jniLibs and
# copies the model and the made-up demo users into its assets. Then open
# android/ in Android Studio (or run `gradle :app:assembleDebug` there).
#
# Needs: the Android NDK (ANDROID_NDK_HOME), `cargo install cargo-ndk`, the
# Rust targets (`rustup target add aarch64-linux-android x86_64-linux-android`),
# cmake and libclang (scripts/setup.sh), and models/fetch.sh done.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
app="$here/android/app/src/main"

cd "$root"
models/fetch.sh
# Phones: arm64; the emulator on a PC: x86_64. API 28 is the app's minSdk.
# llama.cpp links the NDK's shared C++ runtime; --link-libcxx-shared packs it
# next to libnextquill.so. (OpenMP stays off: the crate builds llama.cpp
# without default features.)
cargo ndk --platform 28 -t arm64-v8a -t x86_64 -o "$app/jniLibs" --link-libcxx-shared \
    build --release --lib
# Line tables are for desktop profiling; strip them from the phone library.
for so in "$app"/jniLibs/*/libnextquill.so; do
    "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME}"/toolchains/llvm/prebuilt/*/bin/llvm-strip "$so"
done

mkdir -p "$app/assets"
cp models/SmolLM2-135M-Instruct.Q4_1.gguf "$app/assets/"
cp src/cli/demo_users.jsonl "$app/assets/"
echo "native libraries in $app/jniLibs, model and demo users in $app/assets"
