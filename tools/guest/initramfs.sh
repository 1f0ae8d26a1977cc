#!/bin/sh
# Build a busybox initramfs whose /init is INIT_SCRIPT.
#
#   tools/guest/initramfs.sh INIT_SCRIPT OUT.cpio.gz [FILE=PATH_IN_GUEST ...]
#
# The archive holds Debian's static busybox (package busybox-static) as /bin/busybox, the
# script as /init (run by busybox sh; it should start with `#!/bin/busybox sh`), empty
# /proc /sys /dev /tmp, and any extra FILE copied to PATH_IN_GUEST. It is made with cpio
# (newc) and gzip and needs no root: the init script mounts devtmpfs itself, so the archive
# has no device nodes (the kernel warns that it has no initial console until then).
set -eu

die() { echo "initramfs.sh: $*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: initramfs.sh INIT_SCRIPT OUT.cpio.gz [FILE=PATH_IN_GUEST ...]"
init=$1
out=$2
shift 2
[ -f "$init" ] || die "$init: no such init script"
busybox=${TPHTRAP_GUEST_BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || die "$busybox not found: apt-get install busybox-static"
if ! LC_ALL=C ldd "$busybox" 2>&1 | grep -q "not a dynamic"; then
    die "$busybox is not statically linked: apt-get install busybox-static"
fi
command -v cpio >/dev/null 2>&1 || die "cpio not found: apt-get install cpio"

root=$(mktemp -d "${TMPDIR:-/tmp}/tphtrap-initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp"
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$init" "$root/init"
chmod 755 "$root/init"
for spec in "$@"; do
    src=${spec%%=*}
    dst=${spec#*=}
    [ "$src" != "$spec" ] || die "$spec: give FILE=PATH_IN_GUEST"
    mkdir -p "$root/$(dirname "$dst")"
    cp "$src" "$root/$dst"
done
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
