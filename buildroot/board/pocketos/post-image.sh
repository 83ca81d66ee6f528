#!/usr/bin/env bash
# PocketOS's post-image step for every board (BR2_ROOTFS_POST_IMAGE_SCRIPT):
# the ESP's files for the board's bootloader (the boot scripts in boot/),
# then the disk image from the board's genimage.cfg (which includes the
# shared A/B layout in genimage/), then what update bundles and the
# end-to-end tests take from an image directory: rootfs.ext4, version, and
# the development keys. image/build.sh runs it too, for the QEMU board: it
# is the one place the disk's layout is made.
#
#   post-image.sh BINARIES_DIR BOARD_DIR     (BR2_ROOTFS_POST_SCRIPT_ARGS)
set -euo pipefail

images=$1
board=$(cd "${2:?usage: $0 BINARIES_DIR BOARD_DIR}" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null # the board's facts file
. "$board/meta"
tool() { # the host tool from Buildroot's host dir, else the machine's
    if [ -x "$HOST_DIR/bin/$1" ]; then echo "$HOST_DIR/bin/$1"; else command -v "$1"; fi
}

esp=$images/esp
rm -rf "$esp"
mkdir -p "$esp/EFI"

# U-Boot's boot script, for every board: the board's settings, then
# PocketOS's slot selection (boot/boot.cmd).
cat "$board/boot-defaults.cmd" "$here/boot/boot.cmd" >"$images/boot.cmd"
"$(tool mkimage)" -A arm64 -O linux -T script -C none -n "PocketOS" \
    -d "$images/boot.cmd" "$esp/boot.scr" >/dev/null

case "$BOOTLOADER" in
    grub)
        # GRUB (Buildroot's grub2 with its prefix built in from
        # grub-prefix.cfg, or image/'s) with boot/grub.cfg; A good, B not
        # bootable.
        mkdir -p "$esp/EFI/BOOT" "$esp/EFI/pocketos"
        cp "$images/efi-part/EFI/BOOT/bootaa64.efi" "$esp/EFI/BOOT/BOOTAA64.EFI"
        cp "$here/boot/grub.cfg" "$esp/EFI/pocketos/grub.cfg"
        editenv=$(tool grub-editenv)
        "$editenv" "$esp/EFI/pocketos/grubenv" create
        "$editenv" "$esp/EFI/pocketos/grubenv" set \
            ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0 LAST_GOOD=A
        ;;
    uboot)
        # Zeroed environment copies: a freshly written card starts from
        # U-Boot's defaults and boot.scr's, never from a stale try count.
        dd if=/dev/zero of="$images/uboot-env.bin" bs=64K count=1 status=none
        ;;
    *)
        echo "post-image: $board/meta: unknown BOOTLOADER=$BOOTLOADER" >&2
        exit 1
        ;;
esac

[ -e "$images/rootfs.ext4" ] || ln -s rootfs.ext2 "$images/rootfs.ext4"
rm -rf "$BUILD_DIR/genimage.tmp" "$BUILD_DIR/genimage.root"
mkdir -p "$BUILD_DIR/genimage.root"
# Includes are relative to the board directory (../genimage/...).
export POCKETOS_SLOT_SIZE=${SLOT_SIZE:?$board/meta has no SLOT_SIZE}
(cd "$board" && "$(tool genimage)" \
    --rootpath "$BUILD_DIR/genimage.root" \
    --tmppath "$BUILD_DIR/genimage.tmp" \
    --inputpath "$images" \
    --outputpath "$images" \
    --config genimage.cfg)

cp "$TARGET_DIR/etc/pocketos-version" "$images/version"
if [ -d "$BASE_DIR/pocketos-dev-keys" ]; then
    rm -rf "$images/dev-keys"
    cp -a "$BASE_DIR/pocketos-dev-keys" "$images/dev-keys"
fi
echo "post-image: $BOARD_NAME: $(ls "$images"/*.img)"
