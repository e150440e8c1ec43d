#!/bin/busybox sh
# PID 1 of the test VM's initramfs (busybox): loads the modules that mounting the host's
# root over 9p needs, mounts it read-only with writable tmpfs where the tests write, and
# hands over to the guest script (host bash) with switch_root.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "init: insmod $m failed"
done
mkdir -p /newroot
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot; then
    echo "init: mounting the host root over 9p failed"
    echo o > /proc/sysrq-trigger
fi
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/var/tmp
OUT=$(cat /outdir)
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/newroot$OUT"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/bash "$OUT/guest.sh"
