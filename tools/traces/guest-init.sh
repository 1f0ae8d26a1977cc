#!/bin/busybox sh
# /init of the guest that `make traces` records: load the virtio drivers (their MSI-X vectors
# get programmed), move every movable MSI-X vector to the other CPU and back, with traffic in
# between (x86 moves a vector without interrupt remapping at its next interrupt), power off.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || echo "guest: insmod $m failed"
done
sleep 1
nics=$(ls /sys/class/net | grep -v '^lo$')
for nic in $nics; do ip link set "$nic" up; done

# tphtrap=flr: what a TPH-aware driver does to the first NIC, on the registers of the TPH
# Requester capability that `tphtrap replay --overlay 0000:01:00.0=fixtures/devices/nic-st-in-cap.lspci`
# grafts at 0x100 (QEMU's virtio NIC has none there: it ignores the writes, the trace keeps
# them): ST entry 0 <- tag 0x01, then Interrupt Vector mode with TPH Requester Enable; a Function
# Level Reset (QEMU's virtio-pci advertises FLR on PCI Express); the same enable again, with
# the entry not rewritten.
cfg_write() { # OFFSET SIZE BYTES: one aligned config write of SIZE bytes through sysfs
    printf "$3" | dd of=/sys/bus/pci/devices/0000:01:00.0/config bs="$2" seek=$(($1 / $2)) \
        count=1 conv=notrunc 2>/dev/null || echo "guest: config write at $1 failed"
}
if grep -q 'tphtrap=flr' /proc/cmdline; then
    cfg_write 0x10c 2 '\001\000'
    cfg_write 0x108 4 '\001\001\000\000'
    echo 1 >/sys/bus/pci/devices/0000:01:00.0/reset || echo "guest: reset failed"
    cfg_write 0x108 4 '\001\001\000\000'
    echo "guest: TPH enabled, FLR, enabled again"
    echo "guest: done"
    poweroff -f
fi

# Traffic that makes every vector fire: ARP between the two NICs (they share a QEMU hub with
# no host side) and direct reads from the disk.
traffic() {
    for nic in $nics; do arping -c 2 -w 1 -I "$nic" 192.0.2.1 >/dev/null 2>&1; done
    dd if=/dev/vda of=/dev/null bs=4096 count=64 iflag=direct 2>/dev/null
}

vectors=$(awk -F: '/virtio/ {gsub(/ /, "", $1); print $1}' /proc/interrupts)
traffic
for mask in 2 1; do
    for irq in $vectors; do
        # managed vectors (virtio-blk's queues) refuse: that is expected
        echo "$mask" >"/proc/irq/$irq/smp_affinity" 2>/dev/null
    done
    traffic
done
echo "guest: moved vectors $(echo $vectors)"
grep virtio /proc/interrupts
echo "guest: done"
poweroff -f
