#!/usr/bin/env bash
# Boots the PocketOS appliance under qemu-system-aarch64 (TCG, `virt`
# board) through AAVMF's UEFI and the image's GRUB (`just qemu`).
#
# POCKETOS_FIRMWARE=uboot boots Debian's U-Boot (qemu_arm64) instead,
# with its environment in the second flash (POCKETOS_UBOOT_ENV, 64 MiB, the
# environment at offset 0, 256 KiB): what a board with U-Boot runs, for
# the U-Boot environment tests. Its boot script lives in that environment.
#
# The serial console is this terminal (Ctrl-A X quits) unless
# POCKETOS_CONSOLE names a file for it. The guest's network is QEMU's user
# networking with restrict=on: it reaches nothing but what is forwarded.
#
# Environment:
#   POCKETOS_DISK      disk image (default target/image/pocketos.img; .qcow2 works)
#   POCKETOS_EFIVARS   UEFI variable store (default: beside the disk)
#   POCKETOS_CONSOLE   file for the serial console
#   POCKETOS_CONTROL   unix socket for a second shell on the virtio console (hvc0)
#   POCKETOS_FORWARDS  forwards for the user network, comma-separated, e.g.
#                      guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:8080,hostfwd=tcp:127.0.0.1:8022-:22
#   POCKETOS_MEMORY    guest memory in MiB (default 2048: an LLM and its KV cache)
#   POCKETOS_FIRMWARE  uefi (default) or uboot
#   POCKETOS_UBOOT_ENV U-Boot's environment flash (default: beside the disk)
# Extra arguments go to QEMU.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
disk=${POCKETOS_DISK:-$root/target/image/pocketos.img}
vars=${POCKETOS_EFIVARS:-${disk%.*}.efivars}
firmware=/usr/share/AAVMF/AAVMF_CODE.fd

[ -f "$disk" ] || { echo "qemu: no disk image at $disk (run: just image)" >&2; exit 1; }
if [ "${POCKETOS_FIRMWARE:-uefi}" = uboot ]; then
    uboot=/usr/lib/u-boot/qemu_arm64/u-boot.bin
    [ -f "$uboot" ] || { echo "qemu: no U-Boot at $uboot (apt install u-boot-qemu)" >&2; exit 1; }
    flash0=${disk%.*}.uboot-flash
    envflash=${POCKETOS_UBOOT_ENV:-${disk%.*}.uboot-env}
    if [ ! -f "$flash0" ]; then
        truncate -s 64M "$flash0"
        dd if="$uboot" of="$flash0" conv=notrunc status=none
    fi
    [ -f "$envflash" ] || truncate -s 64M "$envflash"
    boot=(-drive "if=pflash,format=raw,file=$flash0" -drive "if=pflash,format=raw,file=$envflash")
else
    [ -f "$firmware" ] || { echo "qemu: no UEFI firmware at $firmware (apt install qemu-efi-aarch64)" >&2; exit 1; }
    [ -f "$vars" ] || cp /usr/share/AAVMF/AAVMF_VARS.fd "$vars"
    # splash-time=0: the firmware's boot-manager timeout (5 s otherwise).
    boot=(-drive "if=pflash,format=raw,readonly=on,file=$firmware" -drive "if=pflash,format=raw,file=$vars"
        -boot "menu=on,splash-time=0")
fi
format=raw
case "$disk" in *.qcow2) format=qcow2 ;; esac

console=(-nographic)
if [ -n "${POCKETOS_CONSOLE:-}" ]; then
    console=(-display none -monitor none -serial "file:$POCKETOS_CONSOLE")
fi
control=null,id=control
if [ -n "${POCKETOS_CONTROL:-}" ]; then
    control=socket,id=control,path=$POCKETOS_CONTROL,server=on,wait=off
fi

exec qemu-system-aarch64 \
    -M virt -cpu max,pauth-impdef=on -smp 2 -m "${POCKETOS_MEMORY:-2048}" \
    "${boot[@]}" \
    -drive "if=none,id=disk,format=$format,file=$disk" \
    -device virtio-blk-device,drive=disk \
    -netdev "user,id=net,restrict=on${POCKETOS_FORWARDS:+,$POCKETOS_FORWARDS}" \
    -device virtio-net-device,netdev=net \
    -device virtio-rng-device \
    -device virtio-serial-device -chardev "$control" -device virtconsole,chardev=control \
    "${console[@]}" "$@"
