#!/usr/bin/env bash
# Fetches libonnxruntime.so for ARCH (x86_64 or aarch64) from the pinned
# onnxruntime wheel on PyPI, checks the wheel's sha256 against
# onnxruntime.lock, and extracts the library into DEST (default
# target/onnxruntime/ARCH). Prints the library's path. Does nothing when the
# library is already there and its wheel checked out.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
arch=${1:-$(uname -m)}
dest=${2:-$root/target/onnxruntime/$arch}
lock=$here/onnxruntime.lock

version=$(awk '$1 == "version" { print $2 }' "$lock")
read -r wheel sha < <(awk -v a="$arch" '$1 == a { print $2, $3 }' "$lock")
if [ -z "${wheel:-}" ]; then
    echo "fetch-onnxruntime: no wheel pinned for $arch in $lock" >&2
    exit 1
fi
lib=$dest/libonnxruntime.so.$version
if [ -f "$lib" ] && [ -f "$dest/.wheel-ok" ] && [ "$(cat "$dest/.wheel-ok")" = "$sha" ]; then
    echo "$lib"
    exit 0
fi

mkdir -p "$dest"
cache=$dest/wheel
mkdir -p "$cache"
if [ ! -f "$cache/$wheel" ]; then
    platform=${wheel##*-}
    platform=${platform%.whl}
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform "$platform" --python-version 3.11 \
        -d "$cache" "onnxruntime==$version" >&2
fi
got=$(sha256sum "$cache/$wheel" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
    echo "fetch-onnxruntime: $wheel has sha256 $got, expected $sha" >&2
    rm -f "$cache/$wheel"
    exit 1
fi
python3 - "$cache/$wheel" "$dest" "$version" <<'PY'
import sys, zipfile, os
wheel, dest, version = sys.argv[1:]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    data = z.read(name)
tmp = os.path.join(dest, f".libonnxruntime.so.{version}.tmp")
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, os.path.join(dest, f"libonnxruntime.so.{version}"))
PY
ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
echo "$sha" > "$dest/.wheel-ok"
echo "$lib"
