#!/usr/bin/env bash
# Downloads every .deb pinned in image/debs.lock into DEST (default
# target/image/debs) and checks its sha256; files already there and
# matching are kept. Fails, naming the package, when a pinned file is gone
# from the mirror (run image/lock-debs.py to move the pins) or differs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
dest=${1:-$root/target/image/debs}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$dest"

grep -v '^#' "$here/debs.lock" | while read -r name version sha path; do
    file=$dest/$(basename "$path")
    if [ -f "$file" ] && [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$sha" ]; then
        continue
    fi
    if ! curl -fsS --retry 3 -o "$file.part" "$mirror/$path"; then
        echo "fetch-debs: $name $version is not on $mirror ($path); re-pin with image/lock-debs.py" >&2
        exit 1
    fi
    got=$(sha256sum "$file.part" | cut -d' ' -f1)
    if [ "$got" != "$sha" ]; then
        echo "fetch-debs: $name $version has sha256 $got, the lock says $sha" >&2
        rm -f "$file.part"
        exit 1
    fi
    mv "$file.part" "$file"
done
