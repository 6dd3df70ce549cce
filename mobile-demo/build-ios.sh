#!/usr/bin/env bash
# Builds NextQuillFFI.xcframework (a static library per Apple target plus the
# generated C header and module map) and copies the model and the made-up
# demo users into the app's resources. Then `cd ios && xcodegen generate` and
# open NextQuillDemo.xcodeproj in Xcode.
#
# Needs: macOS with Xcode, the Rust targets (`rustup target add
# aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios`), cmake, and
# models/fetch.sh done. XcodeGen (`brew install xcodegen`) for the project.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="$here/ios/build"

cd "$root"
models/fetch.sh
# A static library per target: iOS apps link Rust statically. The crate's
# crate-type is lib + cdylib, so ask rustc for a staticlib here.
for target in aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios; do
    cargo rustc --release --lib --target "$target" --crate-type staticlib
done

rm -rf "$out" && mkdir -p "$out/headers" "$out/sim"
cp bindings/swift/generated/NextQuillFFI.h "$out/headers/"
cp bindings/swift/generated/NextQuillFFI.modulemap "$out/headers/module.modulemap"
# One simulator library for both Mac architectures.
lipo -create target/aarch64-apple-ios-sim/release/libnextquill.a \
    target/x86_64-apple-ios/release/libnextquill.a -output "$out/sim/libnextquill.a"
xcodebuild -create-xcframework \
    -library target/aarch64-apple-ios/release/libnextquill.a -headers "$out/headers" \
    -library "$out/sim/libnextquill.a" -headers "$out/headers" \
    -output "$out/NextQuillFFI.xcframework"

resources="$here/ios/NextQuillDemo/Resources"
mkdir -p "$resources"
cp models/SmolLM2-135M-Instruct.Q4_1.gguf "$resources/"
cp src/cli/demo_users.jsonl "$resources/"
echo "wrote $out/NextQuillFFI.xcframework; model and demo users in $resources"
