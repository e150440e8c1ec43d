#!/bin/bash
# Runs inside the test VM as PID 1 after switch_root, on the host's root filesystem
# (read-only 9p) with this kernel's own modules. The host wrote `suites` (one line per
# suite: name, then the command) next to this script; each suite's output goes to
# <name>.log and its exit code to <name>.rc. The VM powers off at the end.
set -u
OUT=$(dirname "$0")
KROOT="$OUT/../root"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TMPDIR=/tmp
# Modules come from the kernel's package (extracted on the host), also when the kernel asks
# for one itself (request_module runs /proc/sys/kernel/modprobe).
printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$KROOT" > /tmp/modprobe
chmod +x /tmp/modprobe
echo /tmp/modprobe > /proc/sys/kernel/modprobe
for m in $(cat "$OUT/modules"); do
    /tmp/modprobe "$m" 2>>"$OUT/modprobe.log" || echo "modprobe $m failed" >> "$OUT/modprobe.log"
done
ip link set lo up
hostname redirector-vm
{
    echo "kernel $(uname -r)"
    echo "cmdline $(cat /proc/cmdline)"
    echo "lockdown $(cat /sys/kernel/security/lockdown 2>/dev/null || echo unknown)"
    echo "uptime $(cut -d' ' -f1 /proc/uptime)"
} > "$OUT/vm.txt"
while IFS=$'\t' read -r name cmd; do
    [ -z "$name" ] && continue
    start=$(date +%s)
    echo "[guest] suite $name: $cmd" > /dev/console
    (eval "$cmd") > "$OUT/$name.log" 2>&1 < /dev/null
    rc=$?
    echo "$rc $(( $(date +%s) - start ))" > "$OUT/$name.rc"
    echo "[guest] suite $name: rc=$rc" > /dev/console
done < "$OUT/suites"
sync
echo "[guest] done" > /dev/console
echo o > /proc/sysrq-trigger
sleep 10
