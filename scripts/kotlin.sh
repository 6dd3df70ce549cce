#!/usr/bin/env bash
# Compiles the generated Kotlin bindings, the mobile demo's plain-Kotlin logic
# and tests/kotlin/SdkLoop.kt, then runs that program on the real default
# model: the loop an Android app runs, on the JVM with the desktop library.
#
# The Kotlin compiler is the one the PyPI package kotlin-jupyter-kernel
# 0.19.0.944 ships (Debian's kotlin is too old for the generated code); JNA is
# Debian's libjna-java. Both are installed when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jars="target/kotlin/jars"
kernel="$jars/kotlin-jupyter-kernel-0.19.0-944-all.jar"
if [ ! -f "$kernel" ]; then
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps kotlin-jupyter-kernel==0.19.0.944 -d "$tmp"
    mkdir -p "$jars"
    python3 - "$tmp"/kotlin_jupyter_kernel-0.19.0.944-py3-none-any.whl "$jars" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("run_kotlin_kernel/jars/") and name.endswith(".jar"):
            with open(os.path.join(out, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
    rm -rf "$tmp"
fi
need=()
[ -f /usr/share/java/jna.jar ] || need+=(libjna-java)
command -v java >/dev/null || need+=(default-jdk-headless)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
stdlib="$jars/kotlin-stdlib-2.3.10-RC.jar"
json="$jars/kotlinx-serialization-json-jvm-1.9.0.jar:$jars/kotlinx-serialization-core-jvm-1.9.0.jar"
classpath="$stdlib:/usr/share/java/jna.jar:$json"

models/fetch.sh >/dev/null
cargo build --release --lib

classes="target/kotlin/classes"
rm -rf "$classes"
# The README's Kotlin example must compile too (it is not run: it trains a
# full adapter).
readme_example="target/kotlin/ReadmeExample.kt"
awk '/^## Use it from an app/ { inside = 1 } inside && /^```kotlin/ { grab = 1; next }
     grab && /^```/ { exit } grab { print }' README.md >"$readme_example"
[ -s "$readme_example" ] || { echo "error: no kotlin example in README.md's 'Use it from an app'" >&2; exit 1; }
start=$(date +%s)
java -cp "$kernel" org.jetbrains.kotlin.cli.jvm.K2JVMCompiler \
    -no-stdlib -no-reflect -nowarn -classpath "$classpath" -d "$classes" \
    bindings/kotlin/generated/org/nextquill/nextquill.kt \
    mobile-demo/android/app/src/main/java/org/nextquill/demo/core/DemoController.kt \
    tests/kotlin/SdkLoop.kt "$readme_example"
echo "compiled the Kotlin bindings, the demo logic, SdkLoop and the README example in $(($(date +%s) - start)) s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
java -Djna.library.path=target/release -cp "$classes:$classpath" org.nextquill.test.SdkLoopKt \
    models/SmolLM2-135M-Instruct.Q4_1.gguf src/cli/demo_users.jsonl "$work"
