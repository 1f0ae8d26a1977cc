#!/bin/sh
# Fetch Debian's current amd64 kernel package and extract it into .cache/guest/ (ignored by git).
# Prints the path of the extracted kernel image (vmlinuz) on standard output.
# Usage: tools/guest/kernel.sh        (CACHE=DIR overrides .cache/guest)
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CACHE:-$root/.cache/guest}
mkdir -p "$cache"
cd "$cache"

# linux-image-amd64 is the meta package; it depends on the versioned image package.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    echo "kernel.sh: cannot find the kernel package behind linux-image-amd64 (run apt-get update)" >&2
    exit 1
fi
version=${pkg#linux-image-}
tree=$cache/$pkg
if [ ! -f "$tree/boot/vmlinuz-$version" ]; then
    if ! ls "$cache/${pkg}_"*.deb >/dev/null 2>&1; then
        apt-get download "$pkg" >&2
    fi
    rm -rf "$tree.tmp"
    dpkg-deb -x "$cache/${pkg}_"*.deb "$tree.tmp"
    mv "$tree.tmp" "$tree"
fi
echo "$tree/boot/vmlinuz-$version"
