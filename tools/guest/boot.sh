#!/bin/sh
# Boot a throw-away guest in QEMU (TCG) with the Debian kernel of kernel.sh and an initramfs;
# the serial console goes to standard output.
#
#   tools/guest/boot.sh [-m MACHINE] [-c CPUS] [-t SECONDS] INITRD [-- QEMU_ARGS...]
#
# MACHINE is QEMU's -machine type (default q35), CPUS the -smp count (default 2), SECONDS the
# limit after which QEMU is killed (default 300; exit status 124 then). QEMU_ARGS are added
# as they are, e.g. `-- -acpitable file=ssdt.aml`. The guest has no disk, network or display;
# the kernel runs /init of the initramfs and the guest powers off (or panics) when it ends.
# Set TPHTRAP_GUEST_ACCEL=kvm to use KVM where /dev/kvm is usable.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
machine=q35
cpus=2
limit=300
while getopts m:c:t: opt; do
    case $opt in
        m) machine=$OPTARG ;;
        c) cpus=$OPTARG ;;
        t) limit=$OPTARG ;;
        *) echo "usage: boot.sh [-m MACHINE] [-c CPUS] [-t SECONDS] INITRD [-- QEMU_ARGS...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "boot.sh: give the initramfs" >&2; exit 2; }
initrd=$1
shift
[ "${1:-}" != "--" ] || shift

qemu=${TPHTRAP_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null 2>&1 || { echo "boot.sh: $qemu not found: apt-get install qemu-system-x86" >&2; exit 1; }
kernel=$("$here/kernel.sh")

exec timeout --kill-after=10 "$limit" "$qemu" \
    -machine "$machine,accel=${TPHTRAP_GUEST_ACCEL:-tcg}" \
    -m 512 -smp "$cpus" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 rdinit=/init loglevel=4" \
    -nodefaults -display none -serial stdio -monitor none -no-reboot \
    "$@" </dev/null
