#!/usr/bin/env bash
# Builds the PocketOS appliance image for aarch64 (`just image`):
#
#   target/image/pocketos.img     GPT disk: esp, rootfs-a, rootfs-b, data
#   target/image/rootfs.ext4      the rootfs-a image (what an update bundle carries)
#   target/image/vmlinuz, initrd.img  the slot's kernel and initramfs
#   target/image/dev-keys/        the keys the image trusts (unless POCKETOS_KEYS)
#
# Inputs are pinned: Debian arm64 packages (image/debs.lock), the aarch64
# ONNX Runtime wheel (daemons/npud/onnxruntime.lock), the Rust toolchain
# (rust-toolchain.toml) and Cargo.lock. Timestamps, UUIDs and file order are
# fixed, so the same inputs give the same bytes. The disk is made by the
# Buildroot tree's post-image step for its QEMU board (genimage), the same
# layout and boot files a Buildroot build of that board has.
#
# Environment:
#   POCKETOS_VERSION  the rootfs version (default: the workspace version)
#   POCKETOS_KEYS     a key directory (root/, models/, updates/ with
#                     pocket-publish keygen files); default: dev keys made
#                     once in target/image/dev-keys
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$root/target/image
work=$out/work
triple=aarch64-unknown-linux-gnu
cd "$root"

version=${POCKETOS_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
keys=${POCKETOS_KEYS:-$out/dev-keys}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1767225600)}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
compatible=$(sed -n 's/^compatible = "\(.*\)"/\1/p' image/rootfs/etc/pocketos/system.toml)

# The rootfs file system (what a bundle carries) is smaller than its
# 192 MiB slot, leaving the slots room to grow. The partitions (their sizes,
# names and UUIDs) are the Buildroot tree's: buildroot/board/pocketos/
# genimage/ and the QEMU board's meta.
rootfs_fs_mb=144

step() { printf '== %s\n' "$*"; }

step "PocketOS $version for $compatible"
mkdir -p "$out" "$work"

step "daemons, dashboard and pocketctl for $triple (release)"
cargo build --release --locked --target "$triple" \
    -p pocket-modeld -p pocket-npud -p pocket-powerd -p pocket-otad -p pocket-webd -p pocketctl
bindir=$root/target/$triple/release
# The host's pocket-publish makes the keyring.
cargo build --locked -p pocket-publish
publish=$root/target/debug/pocket-publish

step "ONNX Runtime for aarch64"
ort=$(daemons/npud/fetch-onnxruntime.sh aarch64)

step "Debian arm64 packages"
image/fetch-debs.sh "$out/debs"

step "the keys the image trusts ($keys)"
image/make-keys.sh "$keys" "$publish"

step "root file system"
rootfs=$work/rootfs
rm -rf "$rootfs" "$work/kernel" "$work/grub"
mkdir -p "$rootfs"
for deb in "$out"/debs/*.deb; do
    case "$(basename "$deb")" in
        linux-image-*) dpkg -x "$deb" "$work/kernel" ;;
        grub-efi-arm64-bin_*) dpkg -x "$deb" "$work/grub" ;;
        *) dpkg -x "$deb" "$rootfs" ;;
    esac
done
# Merged /usr, as Debian's usrmerge lays it out.
for d in bin sbin lib; do
    if [ -d "$rootfs/$d" ] && [ ! -L "$rootfs/$d" ]; then
        mkdir -p "$rootfs/usr/$d"
        cp -a "$rootfs/$d/." "$rootfs/usr/$d/"
        rm -rf "${rootfs:?}/$d"
    fi
    ln -sfn "usr/$d" "$rootfs/$d"
done
rm -rf "$rootfs"/usr/share/{doc,man,info,locale,lintian,bug,bash-completion,gdb} "$rootfs"/etc/{default,init.d,apparmor.d} \
    "$rootfs"/usr/lib/aarch64-linux-gnu/gconv
# BusyBox's applets, as links to the one static binary.
while read -r applet; do
    [ -n "$applet" ] && [ ! -e "$rootfs/usr/bin/$applet" ] && ln -s busybox "$rootfs/usr/bin/$applet"
done < <(grep -v '^#' image/busybox-applets)
mkdir -p "$rootfs/usr/sbin"
ln -sfn ../bin/busybox "$rootfs/usr/sbin/init"
mkdir -p "$rootfs"/{proc,sys,dev,run,tmp,data,root,boot/efi,media/usb,var/lib}
ln -sfn ../run "$rootfs/var/run"
ln -sfn ../run/log "$rootfs/var/log"
ln -sfn ../../run/dbus "$rootfs/var/lib/dbus"
cp -a image/rootfs/. "$rootfs/"

# PocketOS: daemons, CLI, ONNX Runtime, bus policies, init scripts, boards,
# keyring, version.
for bin in pocket-modeld pocket-npud pocket-powerd pocket-otad pocket-webd pocketctl; do
    aarch64-linux-gnu-strip -o "$rootfs/usr/bin/$bin" "$bindir/$bin"
done
install -m 0755 "$ort" "$rootfs/usr/lib/$(basename "$ort")"
ln -sfn "$(basename "$ort")" "$rootfs/usr/lib/libonnxruntime.so"
install -D -m 0644 crates/pocket-daemon/data/pocket-service "$rootfs/usr/libexec/pocketos/pocket-service"
for d in modeld npud powerd otad; do
    install -D -m 0644 -t "$rootfs/usr/share/dbus-1/system.d" daemons/$d/data/*.conf
    install -D -m 0755 -t "$rootfs/etc/init.d" daemons/$d/data/S*
done
install -D -m 0755 -t "$rootfs/etc/init.d" daemons/webd/data/S*
install -D -m 0644 daemons/powerd/boards/*.toml -t "$rootfs/etc/pocketos/boards/"
cp -a "$keys/keyring" "$rootfs/etc/pocketos/keyring"
echo "$version" >"$rootfs/etc/pocketos-version"

step "kernel and initramfs"
kver=$(basename "$work"/kernel/lib/modules/*)
kmod=$work/kernel/lib/modules/$kver/kernel
initrd=$work/initramfs
rm -rf "$initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$rootfs/usr/bin/busybox" "$initrd/bin/"
for applet in sh mount umount insmod sleep grep cat switch_root reboot; do
    ln -s busybox "$initrd/bin/$applet"
done
install -m 0755 image/initramfs/init "$initrd/init"
# The modules the kernel needs for the disk, the ESP, the virtio console
# and the network, each after what it depends on (from its modinfo).
: >"$initrd/lib/modules/order"
add_module() {
    local name=$1 path deps dep
    grep -qx "$name" "$initrd/lib/modules/order" && return 0
    path=$(find "$kmod" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) | head -1)
    [ -n "$path" ] || { echo "build: kernel $kver has no module $name" >&2; exit 1; }
    deps=$(strings "$path" | sed -n 's/^depends=//p' | tr ',' ' ')
    for dep in $deps; do
        add_module "$(echo "$dep" | tr '-' '_')"
    done
    cp "$path" "$initrd/lib/modules/$name.ko"
    echo "$name" >>"$initrd/lib/modules/order"
}
for m in virtio_mmio virtio_pci virtio_blk virtio_console virtio_net virtio_rng vfat nls_cp437 nls_ascii nls_utf8; do
    add_module "$m"
done
find "$initrd" "$rootfs" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$initrd" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible -R 0:0 | gzip -9 -n) >"$out/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
install -D -m 0644 "$out/vmlinuz" "$rootfs/boot/vmlinuz"
install -D -m 0644 "$out/initrd.img" "$rootfs/boot/initrd.img"
touch -h -d "@$SOURCE_DATE_EPOCH" "$rootfs/boot" "$rootfs/boot/vmlinuz" "$rootfs/boot/initrd.img"

step "file systems"
make_ext4() { # IMAGE SIZE_MB LABEL UUID [DIR]
    rm -f "$1"
    mkfs.ext4 -q -F -L "$3" -U "$4" -E "root_owner=0:0,hash_seed=$4" -m 0 -T default \
        ${5:+-d "$5"} "$1" "$2M"
    # mke2fs copies each file's ctime, which no one can set: pin it (and
    # the root's and lost+found's times) to SOURCE_DATE_EPOCH.
    {
        if [ -n "${5:-}" ]; then
            (cd "$5" && find . -mindepth 1) | sed 's|^\.||; s|.*|sif "&" ctime @'"$SOURCE_DATE_EPOCH"'|'
        fi
        for f in / /lost+found; do
            for t in ctime mtime atime crtime; do echo "sif $f $t @$SOURCE_DATE_EPOCH"; done
        done
    } >"$work/pin-times"
    debugfs -w -f "$work/pin-times" "$1" >/dev/null 2>&1
}
make_ext4 "$out/rootfs.ext4" "$rootfs_fs_mb" rootfs 8d2a6f0e-0c1b-4d39-9a51-5f0a3a2b7c01 "$rootfs"

step "disk image: the Buildroot tree's QEMU board (one layout for both)"
# GRUB for arm64 EFI from Debian's package, with its prefix built in; the
# Buildroot tree's post-image step puts it on the ESP with boot/grub.cfg
# and a grubenv, and genimage makes the disk from the board's genimage.cfg
# (buildroot/board/pocketos/: GPT, partition names and UUIDs, the data
# partition). The staging directories are what Buildroot would pass.
grub-mkimage -O arm64-efi -d "$work/grub/usr/lib/grub/arm64-efi" \
    -p '(hd0,gpt1)/EFI/pocketos' -o "$work/BOOTAA64.EFI" \
    part_gpt fat ext2 normal linux boot configfile loadenv test echo sleep reboot halt
stage=$work/buildroot
rm -rf "$stage"
mkdir -p "$stage"/{images/efi-part/EFI/BOOT,host/bin,build,base,target/etc}
ln -s "$out/rootfs.ext4" "$stage/images/rootfs.ext4"
cp "$work/BOOTAA64.EFI" "$stage/images/efi-part/EFI/BOOT/bootaa64.efi"
echo "$version" >"$stage/target/etc/pocketos-version"
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
HOST_DIR=$stage/host BUILD_DIR=$stage/build TARGET_DIR=$stage/target BASE_DIR=$stage/base \
    buildroot/board/pocketos/post-image.sh "$stage/images" buildroot/board/pocketos/qemu-aarch64 >/dev/null
disk=$out/pocketos.img
mv "$stage/images/pocketos.img" "$disk"
# Slot B starts as a copy of A that the bootloader does not boot (B_OK=0)
# until an update is installed into it.
echo "$version" >"$out/version"
du -h --apparent-size "$disk" "$out/rootfs.ext4" | sed 's/^/   /'
echo "   $(du -sh "$rootfs" | cut -f1) in the rootfs; image: $disk"
