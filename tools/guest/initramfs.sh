#!/bin/sh
# Build a busybox-static initramfs whose /init is INIT_SCRIPT.
# Usage: tools/guest/initramfs.sh INIT_SCRIPT OUT.cpio.gz
#   MODULES="virtio_pci virtio_net"  kernel modules to copy in, with what they depend on, as
#                                    /lib/modules/NAME.ko, listed in load order in
#                                    /lib/modules/load-order (needs tools/guest/kernel.sh first)
#   KERNEL_TREE=DIR                  the extracted kernel package (default: what kernel.sh made)
# Needs Debian's busybox-static and cpio.
set -eu

if [ $# -ne 2 ]; then
    echo "usage: $0 INIT_SCRIPT OUT.cpio.gz" >&2
    exit 2
fi
init=$1
out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "initramfs.sh: $busybox missing: apt-get install busybox-static" >&2; exit 1; }
command -v cpio >/dev/null || { echo "initramfs.sh: cpio missing: apt-get install cpio" >&2; exit 1; }
[ -f "$init" ] || { echo "initramfs.sh: $init: no such file" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/sbin" "$work/proc" "$work/sys" "$work/dev" "$work/tmp" "$work/lib/modules"
cp "$busybox" "$work/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$work/bin/$applet" ] || ln -s busybox "$work/bin/$applet"
done
cp "$init" "$work/init"
chmod 755 "$work/init"

if [ -n "${MODULES:-}" ]; then
    tree=${KERNEL_TREE:-$(dirname "$(dirname "$("$root/tools/guest/kernel.sh")")")}
    moddir=$(ls -d "$tree"/lib/modules/*/kernel | head -n 1)
    : >"$work/lib/modules/load-order"
    # Depth-first: a module goes in after everything it depends on (the .modinfo "depends=").
    add_module() {
        local name file deps dep
        name=$1
        grep -qx "$name" "$work/lib/modules/load-order" && return 0
        file=$(find "$moddir" -name "$name.ko" -o -name "$(echo "$name" | tr _ -).ko" | head -n 1)
        [ -n "$file" ] || { echo "initramfs.sh: no module $name in $moddir" >&2; exit 1; }
        deps=$(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | tr , ' ')
        for dep in $deps; do add_module "$dep"; done
        cp "$file" "$work/lib/modules/$name.ko"
        echo "$name" >>"$work/lib/modules/load-order"
    }
    for m in $MODULES; do add_module "$m"; done
fi

mkdir -p "$(dirname "$out")"
(cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -9n >"$out"
