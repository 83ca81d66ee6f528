#!/usr/bin/env bash
# Pins a PocketOS release for the Buildroot packages, which otherwise build
# the checkout this tree lives in. It makes the source tarball exactly as
# Buildroot does (its git download backend, then its cargo vendoring step,
# with Buildroot's own scripts), sets POCKETOS_VERSION in external.mk and
# writes the tarball's sha256 into every PocketOS package's .hash. Commit
# that at a release tag; `git checkout buildroot/` goes back to in-tree
# builds.
#
#   BUILDROOT_DIR=/path/to/buildroot buildroot/bump.sh [COMMIT]
#
# COMMIT defaults to HEAD. Vendoring needs crates.io; use the cargo that
# Buildroot's host-rust ships (e.g. RUSTUP_TOOLCHAIN=1.96.1 for 2026.05)
# so the vendored tree, and so the hash, is the one Buildroot makes. With
# BR2_DL_DIR set, the tarball is kept there, where a build then finds it.
set -euo pipefail

tree=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$tree/.." && pwd)
br=$(cd "${BUILDROOT_DIR:?set BUILDROOT_DIR to a Buildroot checkout}" && pwd)
commit=$(git -C "$repo" rev-parse --verify "${1:-HEAD}^{commit}")
tarball=pocketos-$commit-git4-cargo5.tar.gz

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/dl/pocketos" "$work/build" "$work/cargo-home"
(
    cd "$br"
    BUILD_DIR=$work/build CARGO_HOME=$work/cargo-home GIT=git TAR=tar \
        support/download/dl-wrapper -c "$commit" -d "$work/dl/pocketos" \
        -D "$work/dl" -f "$tarball" -n "pocketos-$commit" -N pocketos \
        -o "$work/dl/pocketos/$tarball" -p cargo -u "git+$repo" -q --
)
sum=$(sha256sum "$work/dl/pocketos/$tarball" | cut -d' ' -f1)
if [ -n "${BR2_DL_DIR:-}" ]; then
    mkdir -p "$BR2_DL_DIR/pocketos"
    cp "$work/dl/pocketos/$tarball" "$BR2_DL_DIR/pocketos/$tarball"
fi

sed -i "s/^POCKETOS_VERSION =.*/POCKETOS_VERSION = $commit/" "$tree/external.mk"
for mk in "$tree"/package/*/*.mk; do
    grep -q 'cargo-package' "$mk" || continue
    cat >"${mk%.mk}.hash" <<HASH
# PocketOS at $commit, crates vendored (buildroot/bump.sh)
sha256  $sum  $tarball
# Locally computed
sha256  $(git -C "$repo" show "$commit:LICENSE" | sha256sum | cut -d' ' -f1)  LICENSE
HASH
done
echo "pinned PocketOS $commit: $sum"
