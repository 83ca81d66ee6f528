#!/usr/bin/env bash
# Installs what PocketOS's tests and demo need on a Debian/Ubuntu machine,
# only where it is missing: dbus-daemon and dbus-send, curl, shellcheck,
# setpriv, powerprofilesctl, fw_printenv/fw_setenv, grub-editenv, Python's
# onnx, numpy and onnxruntime (fixture models and the inference reference),
# the pinned libonnxruntime.so, and for the appliance image: the aarch64
# cross toolchain and Rust target, GRUB's and the file-system tools,
# qemu-system-aarch64 and its UEFI firmware; Chromium, Node.js and
# playwright-core for the dashboard's browser tests; genimage and mkimage for the
# Buildroot tree's image step.
set -euo pipefail

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
fi

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need dbus-daemon dbus-daemon
need dbus-send dbus-bin
need curl curl
need shellcheck shellcheck
need setpriv util-linux
need sha256sum coreutils
# Only its client, powerprofilesctl, runs in the tests (against powerd).
need powerprofilesctl power-profiles-daemon
# The real bootloader-environment tools otad's environments are checked
# against.
need fw_printenv libubootenv-tool
need grub-editenv grub-common
# The appliance image (image/build.sh) and its QEMU runs.
need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
need grub-mkimage grub-common
need mkfs.vfat dosfstools
need mcopy mtools
need cpio cpio
need sfdisk fdisk
need debugfs e2fsprogs
need strings binutils
need socat socat
# The dashboard's browser tests: headless Chromium driven by playwright-core.
need chromium chromium
need node nodejs
need npm npm
# The Buildroot tree's image step (tests/tests/buildroot.rs).
need genimage genimage
need mkimage u-boot-tools
need qemu-img qemu-utils
[ -f /usr/share/AAVMF/AAVMF_CODE.fd ] || missing+=(qemu-efi-aarch64)
[ -f /usr/lib/u-boot/qemu_arm64/u-boot.bin ] || missing+=(u-boot-qemu)

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# qemu-system-aarch64 must come from the same release as the machine's
# qemu-utils: where that is a backport, installing the release's own
# qemu-system-arm would replace it with an older one.
if ! command -v qemu-system-aarch64 >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    from=()
    if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
        codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
        list=/etc/apt/sources.list.d/${codename}-backports.list
        if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "deb http://deb.debian.org/debian ${codename}-backports main" | "${sudo_cmd[@]}" tee "$list" >/dev/null
        fi
        from=(-t "${codename}-backports")
    fi
    echo "installing: qemu-system-arm ${from[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${from[@]}" qemu-system-arm >/dev/null
fi

# The aarch64 standard library for the image's cross build.
if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
        || rustup target add aarch64-unknown-linux-gnu
fi

if ! python3 -c "import onnx, numpy, onnxruntime" 2>/dev/null; then
    echo "installing: python onnx numpy onnxruntime"
    python3 -m pip install --quiet onnx numpy onnxruntime 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages onnx numpy onnxruntime
fi

# The admin group of the bus policy; the access tests run callers in it.
if [ "$(id -u)" -eq 0 ] && ! getent group pocket >/dev/null; then
    groupadd -r pocket
fi

# playwright-core at the version tests/browser/package-lock.json pins.
browser_dir="$(dirname "$0")/browser"
if [ ! -d "$browser_dir/node_modules/playwright-core" ]; then
    echo "installing: playwright-core (npm ci in tests/browser)"
    (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

# The pinned ONNX Runtime library for this machine (daemons/npud).
"$(dirname "$0")/../daemons/npud/fetch-onnxruntime.sh" >/dev/null
