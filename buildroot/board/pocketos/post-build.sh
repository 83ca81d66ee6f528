#!/usr/bin/env bash
# PocketOS's post-build step for every board (BR2_ROOTFS_POST_BUILD_SCRIPT),
# run on the target tree after the rootfs overlays: the keyring the image
# trusts, the version, the layout image/build.sh also makes (/data, the
# ESP's mount point, /var links for a read-only rootfs) and the kernel
# under the name both boot flows load, /boot/vmlinuz.
#
#   post-build.sh TARGET_DIR BOARD_DIR     (BR2_ROOTFS_POST_SCRIPT_ARGS)
set -euo pipefail

target=$1
board=$(cd "${2:?usage: $0 TARGET_DIR BOARD_DIR}" && pwd)
repo=$(cd "$(dirname "$0")/../../.." && pwd)
# shellcheck source=/dev/null # the board's facts file
. "$board/meta"

# The one variable that picks the keys: BR2_POCKETOS_KEYS names a release
# key directory; empty means development keys, made once and kept.
keys=$(sed -n 's/^BR2_POCKETOS_KEYS="\(.*\)"$/\1/p' "$BR2_CONFIG")
if [ -z "$keys" ]; then
    keys=$BASE_DIR/pocketos-dev-keys
    publish=$HOST_DIR/bin/pocket-publish
    if [ ! -x "$publish" ]; then
        echo "post-build: development keys need host-pocket-publish (BR2_PACKAGE_HOST_POCKET_PUBLISH=y)" >&2
        exit 1
    fi
    "$repo/image/make-keys.sh" "$keys" "$publish"
fi
if [ ! -d "$keys/keyring" ]; then
    echo "post-build: $keys has no keyring/ (BR2_POCKETOS_KEYS)" >&2
    exit 1
fi
rm -rf "$target/etc/pocketos/keyring"
cp -a "$keys/keyring" "$target/etc/pocketos/keyring"

# The version: the workspace's, from the source the daemons were built of.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$BUILD_DIR"/pocket-otad-*/Cargo.toml | head -1)
echo "${version:?no pocket-otad source in $BUILD_DIR}" >"$target/etc/pocketos-version"
sed -i "s/^compatible = .*/compatible = \"$COMPATIBLE\"/" "$target/etc/pocketos/system.toml"

# A read-only rootfs: what changes lives in tmpfs or on /data.
mkdir -p "$target"/{data,boot/efi,media/usb,var/lib}
ln -sfn ../run/log "$target/var/log"
ln -sfn ../../run/dbus "$target/var/lib/dbus"

# Buildroot's dbus package starts its own daemon; the overlay's S30dbus
# (image/rootfs) starts the system bus, so only one may run.
rm -f "$target/etc/init.d/S30dbus-daemon"

if [ -f "$target/boot/Image" ]; then
    mv "$target/boot/Image" "$target/boot/vmlinuz"
fi
