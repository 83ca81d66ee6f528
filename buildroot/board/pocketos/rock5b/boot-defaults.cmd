# ROCK 5B: the debug UART at 1.5 Mbaud, the device tree from the slot.
test -n "${pocketos_console}" || setenv pocketos_console "console=ttyS2,1500000n8"
setenv fdtfile rockchip/rk3588-rock-5b.dtb
