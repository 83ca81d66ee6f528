#!/usr/bin/env bash
# Makes a development key set once: root, models and updates keys (one
# pocket-publish keygen each) and the keyring the root key signs. An
# existing set is left alone. image/build.sh and Buildroot's post-build
# script both use it, so both images trust keys of the same shape.
#
#   make-keys.sh DIR POCKET_PUBLISH
#
# DIR/keyring is what an image installs as /etc/pocketos/keyring; the
# *.secret files stay on the build machine (the tests sign with them).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 DIR POCKET_PUBLISH" >&2; exit 2; }
keys=$1
publish=$2

if [ -d "$keys/keyring" ]; then
    exit 0
fi
for role in root models updates; do
    mkdir -p "$keys/$role"
    "$publish" keygen --out "$keys/$role" >/dev/null 2>&1
done
"$publish" keyring create \
    --root "$keys"/root/*.pub --models "$keys"/models/*.pub \
    --updates "$keys"/updates/*.pub --key "$keys"/root/*.secret \
    --out "$keys/keyring"
