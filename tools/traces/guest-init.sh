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
