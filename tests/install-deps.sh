#!/usr/bin/env bash
# Installs what PocketOS's tests and demo need on a Debian/Ubuntu machine,
# only where it is missing: dbus-daemon and dbus-send, curl, shellcheck,
# setpriv, powerprofilesctl, fw_printenv/fw_setenv, grub-editenv, Python's onnx, numpy and onnxruntime (fixture models and the
# inference reference), and the pinned libonnxruntime.so.
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

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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

# The pinned ONNX Runtime library for this machine (daemons/npud).
"$(dirname "$0")/../daemons/npud/fetch-onnxruntime.sh" >/dev/null
