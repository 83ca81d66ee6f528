#!/usr/bin/env bash
# Checks PocketOS's Buildroot external tree (run by `just lint`).
#
# Offline, always: every package has its .mk, its .hash and a Config.in
# (Config.in.host for host-only ones) that the tree's Config.in sources;
# everything Config.in sources exists; the PocketOS packages build this
# checkout, or agree on one pinned source tarball; every package a defconfig enables is in the tree or in
# Buildroot's naming; the board files the defconfigs name exist.
#
# With BUILDROOT_DIR (a Buildroot release checked out outside this
# repository): Buildroot's own utils/check-package --br2-external over the
# tree, and `make <defconfig>` for each defconfig, every line of which must
# survive into the resulting .config.
set -euo pipefail

tree=$(cd "$(dirname "$0")" && pwd)
failed=0
fail() { echo "buildroot/check: $*" >&2; failed=1; }

cd "$tree"
for dir in package/*/; do
    pkg=$(basename "$dir")
    [ -f "$dir/$pkg.mk" ] || fail "package/$pkg has no $pkg.mk"
    [ -f "$dir/$pkg.hash" ] || fail "package/$pkg has no $pkg.hash"
    if [ -f "$dir/Config.in" ]; then
        grep -qx "source \"\$BR2_EXTERNAL_POCKETOS_PATH/package/$pkg/Config.in\"" Config.in \
            || fail "Config.in does not source package/$pkg/Config.in"
    fi
    if [ -f "$dir/Config.in.host" ]; then
        grep -qx "source \"\$BR2_EXTERNAL_POCKETOS_PATH/package/$pkg/Config.in.host\"" Config.in \
            || fail "Config.in does not source package/$pkg/Config.in.host"
    fi
    [ -f "$dir/Config.in" ] || [ -f "$dir/Config.in.host" ] || fail "package/$pkg has no Config.in"
    if grep -q 'cargo-package' "$dir/$pkg.mk"; then
        # shellcheck disable=SC2016 # a make variable, literally
        grep -qE '^\$\(eval \$\(call pocketos-(source|daemon),' "$dir/$pkg.mk" \
            || fail "package/$pkg does not build POCKETOS_SOURCE"
    fi
done
while read -r path; do
    [ -f "${path/\$BR2_EXTERNAL_POCKETOS_PATH/$tree}" ] || fail "Config.in sources a missing $path"
done < <(sed -n 's/^source "\(.*\)"$/\1/p' Config.in)

# The PocketOS source: this checkout (no pin), or one pinned tarball whose
# sha256 every cargo package's .hash lists (buildroot/bump.sh).
version=$(sed -n 's/^POCKETOS_VERSION =[[:space:]]*//p' external.mk)
for mk in package/*/*.mk; do
    grep -q 'cargo-package' "$mk" || continue
    hash=${mk%.mk}.hash
    grep -qE "^sha256 +[0-9a-f]{64} +LICENSE$" "$hash" || fail "$hash has no sha256 for LICENSE"
    if [ -z "$version" ]; then
        ! grep -q 'pocketos-.*\.tar' "$hash" \
            || fail "$hash pins a tarball, but external.mk builds this checkout"
    else
        grep -qE "^sha256 +[0-9a-f]{64} +pocketos-$version-git4-cargo5.tar.gz$" "$hash" \
            || fail "$hash has no sha256 for PocketOS $version (buildroot/bump.sh re-pins)"
    fi
done
if [ -n "$version" ]; then
    [ "$(cat package/*/*.hash | grep -E " pocketos-$version-git4-cargo5.tar.gz$" | sort -u | wc -l)" -le 1 ] \
        || fail "the packages' .hash files disagree on PocketOS $version"
fi

# Defconfigs: our packages exist; the files they name exist.
for defconfig in configs/*_defconfig; do
    while read -r sym; do
        grep -rqx "config $sym" --include='Config.in*' package \
            || fail "$defconfig enables $sym, which no package here defines"
    done < <(sed -n 's/^\(BR2_PACKAGE_\(HOST_\)\{0,1\}POCKET[A-Z_]*\)=y$/\1/p' "$defconfig")
    # shellcheck disable=SC2016 # a make variable, literally
    while read -r path; do
        [ -e "$path" ] || fail "$defconfig names a missing $path"
    done < <(grep -o '\$(BR2_EXTERNAL_POCKETOS_PATH)[^" ]*' "$defconfig" \
        | sed "s|\$(BR2_EXTERNAL_POCKETOS_PATH)|$tree|")
done

if [ -n "${BUILDROOT_DIR:-}" ]; then
    br=$(cd "$BUILDROOT_DIR" && pwd)
    case "$br/" in
        "$(cd "$tree/.." && pwd)/"*) fail "BUILDROOT_DIR must be outside this repository" ;;
    esac
    echo "buildroot/check: $(cd "$br" && git describe --tags 2>/dev/null || echo "$br")"
    # check-package takes paths relative to the external tree.
    files=$(find . -type f ! -name '*.md' ! -name check.sh ! -name bump.sh | sed 's|^\./||' | sort)
    # shellcheck disable=SC2086 # one argument per file
    (cd "$tree" && "$br/utils/check-package" --br2-external $files) || fail "check-package"
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    for defconfig in configs/*_defconfig; do
        name=$(basename "$defconfig")
        if ! make -s -C "$br" O="$out/$name" BR2_EXTERNAL="$tree" "$name" >"$out/$name.log" 2>&1; then
            cat "$out/$name.log" >&2
            fail "make $name"
            continue
        fi
        while IFS= read -r line; do
            [ -z "$line" ] && continue
            grep -qxF "$line" "$out/$name/.config" || fail "$name: '$line' did not survive into .config"
        done <"$defconfig"
        echo "buildroot/check: $name: $(grep -c . "$defconfig") lines checked"
    done
fi

[ "$failed" -eq 0 ] || exit 1
if [ -n "${BUILDROOT_DIR:-}" ]; then
    echo "buildroot/check: ok, with check-package and make <defconfig>"
else
    echo "buildroot/check: ok (offline; set BUILDROOT_DIR for Buildroot's own checks)"
fi
