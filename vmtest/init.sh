#!/bin/sh
# PID 1 of the VM test guest: binds the first NVMe controller to vfio-pci, runs nvmed on it as
# root and the scenarios as an unprivileged user, and reports on the serial console.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
VFIO_DEV=0000:00:03.0
DISK_BYTES=$(cat /disk_bytes)
FAILED=0
say() { echo "VMTEST $*"; }
check() {
    name=$1; shift
    if "$@" > /tmp/check.out 2>&1; then say "PASS $name"; else say "FAIL $name"; FAILED=1; fi
    sed 's/^/  | /' /tmp/check.out
}
as_user() { su -s /bin/sh tester -c "$*"; }

for m in $(cat /modules.vfio); do insmod /lib/modules/$m.ko || say "FAIL insmod $m"; done
echo vfio-pci > /sys/bus/pci/devices/$VFIO_DEV/driver_override
echo $VFIO_DEV > /sys/bus/pci/drivers_probe
for m in $(cat /modules.nvme); do
    if [ "$m" = nvme ]; then insmod /lib/modules/$m.ko poll_queues=1; else insmod /lib/modules/$m.ko; fi
done
for i in $(seq 50); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -e /sys/block/nvme0n1/queue/scheduler ] && echo none > /sys/block/nvme0n1/queue/scheduler
echo "tester:x:1000:1000::/tmp:/bin/sh" >> /etc/passwd
echo "tester:x:1000:" >> /etc/group
ls /dev/vfio

start_broker() {
    rm -f /tmp/nvmed.out
    nvmed --pci $VFIO_DEV --socket /run/nvmed.sock --socket-mode 666 $BROKER_ARGS > /tmp/nvmed.out 2>> /tmp/nvmed.log &
    BROKER=$!
    for i in $(seq 300); do grep -q ready /tmp/nvmed.out 2>/dev/null && return 0; sleep 0.1; done
    cat /tmp/nvmed.log
    return 1
}
stop_broker() {
    kill -TERM $BROKER
    wait $BROKER
}

check broker-starts-on-vfio start_broker
check identify as_user vmcheck identify --size $DISK_BYTES --lba 512
check verify-random-io as_user vmcheck verify --at-mib 0 --mib 8 --rounds 3
# 48-64 MiB: used again later only by pattern-for-host, which writes after this.
check max-transfer-prp-list as_user vmcheck max-transfer --at-mib 48
two_clients() {
    as_user vmcheck verify --at-mib 8 --mib 4 --seed 2 --rounds 2 & a=$!
    as_user vmcheck verify --at-mib 12 --mib 4 --seed 3 --rounds 2 & b=$!
    wait $a && wait $b
}
check two-clients two_clients
killed_client() {
    as_user vmcheck hammer --at-mib 40 > /tmp/hammer.out 2>&1 &
    for i in $(seq 100); do grep -q HAMMERING /tmp/hammer.out && break; sleep 0.1; done
    grep -q HAMMERING /tmp/hammer.out || return 1
    as_user vmcheck verify --at-mib 16 --mib 4 --seed 4 --rounds 2 & v=$!
    sleep 1
    for p in /proc/[0-9]*; do
        if grep -q hammer $p/cmdline 2>/dev/null; then kill -9 ${p#/proc/} 2>/dev/null; fi
    done
    wait $v || return 1
    as_user vmcheck sessions --expect 1
}
check client-sigkilled-mid-io killed_client
restart() {
    as_user vmcheck write-pattern --offset 33554432 --len 524288 --seed 5 || return 1
    stop_broker || return 1
    start_broker || return 1
    as_user vmcheck check-pattern --offset 33554432 --len 524288 --seed 5
}
check restart-keeps-data restart
check pattern-for-host as_user vmcheck write-pattern --offset 50331648 --len 65536 --seed 6
not_vfio() {
    nvmed --pci 0000:00:04.0 --socket /tmp/x.sock > /tmp/err 2>&1 && return 1
    cat /tmp/err
    grep -q "bound to \"nvme\", not vfio-pci" /tmp/err && grep -q drivers_probe /tmp/err
}
check error-device-not-bound-to-vfio not_vfio
unprivileged() {
    as_user nvmed --pci $VFIO_DEV --socket /tmp/y.sock > /tmp/err 2>&1 && return 1
    cat /tmp/err
    grep -q "cannot open /dev/vfio" /tmp/err
}
check error-unprivileged-vfio-access unprivileged
polled_queue() {
    stop_broker || return 1
    BROKER_ARGS=--no-interrupts
    start_broker || return 1
    as_user vmcheck verify --at-mib 20 --mib 2 --seed 8 --rounds 1 || return 1
    BROKER_ARGS=
    stop_broker && start_broker
}
check polled-io-queue polled_queue
unprivileged_broker() {
    stop_broker || return 1
    chown tester /dev/vfio/vfio /dev/vfio/[0-9]*
    su -s /bin/sh tester -c "ulimit -l 64; nvmed --pci $VFIO_DEV --socket /tmp/u.sock" > /tmp/err 2>&1 && return 1
    cat /tmp/err
    grep -q "RLIMIT_MEMLOCK is 65536 bytes" /tmp/err || return 1
    ( ulimit -l 262144; su -s /bin/sh tester -c "nvmed --pci $VFIO_DEV --socket /tmp/u.sock > /tmp/u.out 2>/tmp/u.log" ) &
    for i in $(seq 300); do grep -q ready /tmp/u.out 2>/dev/null && break; sleep 0.1; done
    grep -q ready /tmp/u.out || { cat /tmp/u.log; return 1; }
    as_user vmcheck --socket /tmp/u.sock verify --at-mib 22 --mib 2 --seed 9 --rounds 1; r=$?
    for p in /proc/[0-9]*; do grep -q u.sock $p/cmdline 2>/dev/null && kill -TERM ${p#/proc/} 2>/dev/null; done
    sleep 1
    chown root /dev/vfio/vfio /dev/vfio/[0-9]*
    start_broker && return $r
}
check unprivileged-broker-with-memlock unprivileged_broker

echo "VMTEST BENCH side by side, same boot, 4 KiB random reads (software emulation: noisy, not asserted)"
bench() { grep -m1 IOPS "$1" | awk '{print $2}'; }
for qd in 1 32; do
    as_user ringbench --socket /run/nvmed.sock --rw randread --bs 4k --iodepth $qd --runtime 3 --size 32M > /tmp/b1 2>&1
    ringbench --engine io-uring --filename /dev/nvme0n1 --rw randread --bs 4k --iodepth $qd --runtime 3 --size 32M > /tmp/b2 2>&1
    ringbench --engine io-uring-passthru --filename /dev/ng0n1 --rw randread --bs 4k --iodepth $qd --runtime 3 --size 32M > /tmp/b3 2>&1
    echo "VMTEST BENCH QD$qd nvmed-vfio $(bench /tmp/b1) IOPS | kernel nvme + io_uring O_DIRECT $(bench /tmp/b2) IOPS | kernel io_uring NVMe passthrough $(bench /tmp/b3) IOPS"
    cat /tmp/b1 /tmp/b2 /tmp/b3 | sed 's/^/  | /'
done

check broker-clean-shutdown stop_broker
sed 's/^/  nvmed| /' /tmp/nvmed.log | tail -40
say "DONE failed=$FAILED"
sync
poweroff -f
