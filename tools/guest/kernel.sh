#!/bin/sh
# Fetch a Debian kernel package and extract its kernel image for booting test guests.
#
#   tools/guest/kernel.sh            print the path of the cached vmlinuz (fetching it first)
#   tools/guest/kernel.sh --modules  print the cached module tree (lib/modules/VERSION) instead
#
# The package is the one linux-image-amd64 depends on (override: TPHTRAP_GUEST_KERNEL_PKG),
# fetched with `apt-get download` (no installation) and unpacked with `dpkg-deb -x` into the
# cache directory (default .cache/guest/ of the repository, ignored by git; override:
# TPHTRAP_GUEST_CACHE). Debian's kernel has ACPI, the 8250 serial console and initramfs
# support built in, so a guest needs no modules; drivers such as virtio_pci are modules, kept
# (with --modules) only when asked for.
set -eu

want=image
[ "${1:-}" != "--modules" ] || want=modules

repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${TPHTRAP_GUEST_CACHE:-$repo/.cache/guest}
pkg=${TPHTRAP_GUEST_KERNEL_PKG:-}

die() { echo "kernel.sh: $*" >&2; exit 1; }

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian system"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found: this script needs a Debian system"

if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    [ -n "$pkg" ] || die "apt-cache knows no linux-image-amd64: run 'apt-get update' first"
fi

image="$cache/$pkg.vmlinuz"
modules="$cache/$pkg.modules"
if [ "$want" = image ] && [ -s "$image" ]; then
    echo "$image"
    exit 0
fi
if [ "$want" = modules ] && [ -d "$modules" ]; then
    echo "$modules"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
(cd "$work" && apt-get download -q "$pkg" </dev/null >&2) || die "apt-get download $pkg failed"
deb=$(ls "$work"/*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || die "apt-get download $pkg left no .deb"
dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb could not unpack $deb"
found=$(ls "$work"/root/boot/vmlinuz-* 2>/dev/null | head -n 1)
[ -n "$found" ] || die "$deb has no /boot/vmlinuz-*"
cp "$found" "$image.tmp"
mv "$image.tmp" "$image"
if [ "$want" = modules ]; then
    tree=$(ls -d "$work"/root/lib/modules/* 2>/dev/null | head -n 1)
    [ -n "$tree" ] || die "$deb has no /lib/modules/VERSION"
    mv "$tree" "$modules"
    echo "$modules"
else
    echo "$image"
fi
