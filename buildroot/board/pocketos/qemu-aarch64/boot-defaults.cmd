# QEMU virt: the PL011 serial console; the device tree comes from QEMU.
test -n "${pocketos_console}" || setenv pocketos_console "console=ttyAMA0"
