#!/bin/busybox sh
# /init of the ACPI integration guest: report whether the tables loaded cleanly and dump them
# (DSDT, SSDTs and the MADT, base64) to the serial console between markers, then power off.
/bin/busybox mkdir -p /dev /proc /sys
/bin/busybox mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "TPHTRAP-DMESG-BEGIN"
dmesg
echo "TPHTRAP-DMESG-END"
for t in /sys/firmware/acpi/tables/DSDT /sys/firmware/acpi/tables/SSDT* /sys/firmware/acpi/tables/APIC; do
    [ -f "$t" ] || continue
    echo "TPHTRAP-TABLE-BEGIN ${t##*/}"
    base64 "$t"
    echo "TPHTRAP-TABLE-END"
done
for d in /sys/bus/acpi/devices/PNP0A08:* /sys/bus/acpi/devices/PNP0A03:*; do
    [ -f "$d/path" ] && echo "TPHTRAP-HOSTBRIDGE $(cat "$d/path")"
done
echo "TPHTRAP-DONE"
sync
poweroff -f
