# PocketOS's U-Boot boot script (mkimage -T script turns it into boot.scr).
# It picks the slot with RAUC's documented scheme: the first slot in
# BOOT_ORDER with tries left in BOOT_<slot>_LEFT. One try is used and saved
# before that slot boots; otad gives the tries back once the slot passes its
# health check, so a slot that keeps failing runs out and the next one in
# BOOT_ORDER boots. When every slot has used its tries, the slot otad last
# confirmed good (BOOT_LAST_GOOD) boots, without counting: never a slot
# that an install left half-written, nor one that never passed its check.
#
# From the board or U-Boot's boot flow: devtype and devnum (the boot disk),
# kernel_addr_r, ramdisk_addr_r, fdt_addr_r, and optionally fdtfile (a
# device tree in the slot's /boot) and pocketos_console. Partitions: 1 esp,
# 2 rootfs-a, 3 rootfs-b, 4 data.

test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 0
test -n "${BOOT_LAST_GOOD}" || setenv BOOT_LAST_GOOD A

setenv bootslot
for s in ${BOOT_ORDER}; do
    if test -z "${bootslot}"; then
        if test "${s}" = A && test ${BOOT_A_LEFT} -gt 0; then
            setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
            setenv bootslot A
            setenv bootpart 2
            setenv bootlabel rootfs-a
        elif test "${s}" = B && test ${BOOT_B_LEFT} -gt 0; then
            setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
            setenv bootslot B
            setenv bootpart 3
            setenv bootlabel rootfs-b
        fi
    fi
done
if test -z "${bootslot}"; then
    # Every slot has used its tries: boot the last one that passed its
    # health check, without counting; the check then decides again.
    echo "PocketOS U-Boot: no slot left to try; booting the last good slot ${BOOT_LAST_GOOD}"
    if test "${BOOT_LAST_GOOD}" = B; then
        setenv bootslot B
        setenv bootpart 3
        setenv bootlabel rootfs-b
    else
        setenv bootslot A
        setenv bootpart 2
        setenv bootlabel rootfs-a
    fi
fi
saveenv
echo "PocketOS U-Boot: booting slot ${bootslot}"

setenv bootargs "${pocketos_console} loglevel=4 panic=5 root=PARTLABEL=${bootlabel} rootfstype=ext4 rootwait ro pocketos.root=${bootlabel} pocketos.slot=${bootslot} rauc.slot=${bootslot}"
load ${devtype} ${devnum}:${bootpart} ${kernel_addr_r} /boot/vmlinuz
setenv bootfdt ${fdtcontroladdr}
if test -n "${fdtfile}"; then
    if load ${devtype} ${devnum}:${bootpart} ${fdt_addr_r} /boot/${fdtfile}; then
        setenv bootfdt ${fdt_addr_r}
    fi
fi
if load ${devtype} ${devnum}:${bootpart} ${ramdisk_addr_r} /boot/initrd.img; then
    booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${bootfdt}
else
    booti ${kernel_addr_r} - ${bootfdt}
fi
