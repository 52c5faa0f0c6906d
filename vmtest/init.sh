#!/bin/sh
# PID 1 of the VM test guest: binds the first NVMe controller to vfio-pci, runs nvmed on it as
# root and the scenarios as an unprivileged user, and reports on the serial console. Then nvmed
# serves it with two I/O threads, and it and a second controller (00:0d.0) in one broker. Then
# each controller of the matrix (00:05.0 and up, set up by run.sh) gets its own nvmed.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
VFIO_DEV=0000:00:03.0
EXTRA_DEV=0000:00:0d.0
MATRIX_SLOTS="05 06 07 08 09 0a 0b 0c"
DISK_BYTES=$(cat /disk_bytes)
EXTRA_BYTES=$(cat /extra_bytes)
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
for s in $MATRIX_SLOTS 0d; do
    echo vfio-pci > /sys/bus/pci/devices/0000:00:$s.0/driver_override
    echo 0000:00:$s.0 > /sys/bus/pci/drivers_probe
done
# The hot-pluggable controller, behind the PCIe root port at 00:0e.0 (scenario surprise-removal).
HOT_DEV=$(ls -d /sys/bus/pci/devices/0000:00:0e.0/0000:??:??.? 2>/dev/null | head -1)
HOT_DEV=${HOT_DEV##*/}
if [ -n "$HOT_DEV" ]; then
    echo vfio-pci > /sys/bus/pci/devices/$HOT_DEV/driver_override
    echo $HOT_DEV > /sys/bus/pci/drivers_probe
fi
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
    LOG_MARK=$(cat /tmp/nvmed.log 2>/dev/null | wc -l)
    # tester is in the admin group: its checks of the broker's own figures (SGL commands, each
    # thread's device commands, sessions left) need an operator's Stats; its I/O is unprivileged.
    nvmed --pci $VFIO_DEV --socket /run/nvmed.sock --socket-mode 666 --admin-group tester $BROKER_ARGS \
        > /tmp/nvmed.out 2>> /tmp/nvmed.log &
    BROKER=$!
    for i in $(seq 300); do grep -q ready /tmp/nvmed.out 2>/dev/null && return 0; sleep 0.1; done
    cat /tmp/nvmed.log
    return 1
}
stop_broker() {
    kill -TERM $BROKER
    wait $BROKER
}
# What the broker logged since start_broker last started it.
broker_log() { tail -n +$((LOG_MARK + 1)) /tmp/nvmed.log; }
# rb_verified OUTPUT JOBS: a ringbench --verify run (its output in OUTPUT, its exit status in
# $rc) passed and each of its JOBS jobs verified reads (a mismatch fails ringbench).
rb_verified() {
    cat $1
    [ $rc = 0 ] || { echo "ringbench --verify failed ($rc)"; return 1; }
    [ "$(grep -c '^  job [0-9]*:.* reads verified' $1)" = $2 ] \
        || { echo "not every one of the $2 jobs verified reads"; return 1; }
}

check broker-starts-on-vfio start_broker
check identify as_user vmcheck identify --size $DISK_BYTES --lba 512
check verify-random-io as_user vmcheck verify --at-mib 0 --mib 8 --rounds 3
# 48-64 MiB: used again later only by pattern-for-host, which writes after this.
check max-transfer-prp-list as_user vmcheck max-transfer --at-mib 48
# 24-27 MiB: vectored requests; QEMU's controller takes SGLs (Identify SGLS = 1).
check vectored-prp-and-sgl as_user vmcheck vectored --at-mib 24 --expect-sgl
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
# Resilience (issue 10): the broker is SIGKILLed in the middle of a verified ringbench load and
# started again; the kernel reset the device when the dead broker's VFIO fds closed, the new
# broker resets and reuses it, and the clients reconnect and send again what had not completed:
# ringbench ends with no error and no mismatch, and says it reconnected.
broker_killed_mid_io() {
    as_user ringbench --socket /run/nvmed.sock --rw randrw --bs 4k --iodepth 8 --numjobs 2 \
        --runtime 5 --offset 56M --size 4M --verify > /tmp/rbk 2>&1 &
    rb=$!
    sleep 2
    kill -9 $BROKER; wait $BROKER 2>/dev/null
    start_broker || return 1
    wait $rb; rc=$?
    rb_verified /tmp/rbk 2 || return 1
    grep -q "the clients reconnected 1 time" /tmp/rbk || { echo "ringbench did not reconnect"; return 1; }
}
check broker-sigkilled-mid-io-clients-reconnect broker_killed_mid_io
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

# nvmectl (issue 9) on the broker serving 00:03.0 (as root; the admin socket is 0660, group tester): status
# and health must show what QEMU's controller itself reports, cross-checked with the kernel
# driver's view of its twin 00:04.0 (same QEMU: same model and firmware) and with QEMU's SMART
# code (hw/nvme/ctrl.c, nvme_smart_info: temperature fixed at 0x143 = 323 K, spare fields left
# 0, data and commands counted per namespace since QEMU started). sessions must list a running
# ringbench, and the SMART counters must grow by exactly that run's I/O.
t0=$(cut -d. -f1 /proc/uptime)
ADMIN_SOCK=/run/nvmed-admin.sock # nvmed's default: beside --socket /run/nvmed.sock
ctl() { nvmectl --admin-socket $ADMIN_SOCK "$@"; }
# vmcheck_qemu CHECK ARGS...: a vmcheck ctl-* check that nvmectl shows QEMU's controller.
vmcheck_qemu() { c=$1; shift; vmcheck $c --device $VFIO_DEV --model "QEMU NVMe Ctrl" --serial nvmed0 "$@"; }
QEMU_SMART="--kelvin 323 --spare 0 --spare-threshold 0"
ctl_status() {
    ctl status --json > /tmp/status.json || return 1
    fw=$(cat /sys/class/nvme/nvme0/firmware_rev)
    echo "the kernel's nvme0 (00:04.0): model \"$(cat /sys/class/nvme/nvme0/model)\" firmware \"$fw\""
    # QEMU's default MDTS is 7: 2^7 pages of 4 KiB.
    vmcheck_qemu ctl-status --file /tmp/status.json --firmware "$fw" --max-transfer 524288 \
        --expect 1:512:$DISK_BYTES
}
check nvmectl-status-identify ctl_status
ctl_health() {
    ctl health --json > /tmp/health0.json || return 1
    vmcheck_qemu ctl-health --file /tmp/health0.json $QEMU_SMART
}
check nvmectl-health-smart ctl_health
ctl_sessions() {
    ctl health --json > /tmp/health1.json || return 1
    # su execs the shell, which execs ringbench: $! is ringbench's pid.
    su -s /bin/sh tester -c "exec ringbench --socket /run/nvmed.sock --rw randrw --bs 64k --iodepth 4 \
        --numjobs 2 --runtime 3 --offset 28M --size 4M --output-format json" > /tmp/rb.json 2> /tmp/rb.err &
    rb=$!
    for i in $(seq 50); do
        ctl sessions --interval 0 --json > /tmp/sessions.json \
            && grep '"rings": 2' /tmp/sessions.json > /dev/null && break
        sleep 0.1
    done
    ctl sessions --interval 0.5 --json > /tmp/sessions.json; r=$?
    comm=$(cat /proc/$rb/comm)
    wait $rb || { echo "ringbench failed"; cat /tmp/rb.err; return 1; }
    [ $r = 0 ] || return 1
    [ "$comm" = ringbench ] || { echo "pid $rb is \"$comm\", not a running ringbench"; return 1; }
    vmcheck ctl-sessions --file /tmp/sessions.json --pid $rb --uid 1000 --rings 2 || r=1
    ctl health --json > /tmp/health2.json || return 1
    vmcheck_qemu ctl-health --file /tmp/health2.json $QEMU_SMART \
        --since /tmp/health1.json --ringbench /tmp/rb.json || r=1
    return $r
}
check nvmectl-sessions-and-smart-counters ctl_sessions
# nvmectl reset under a verified load: QEMU's controller is disabled and enabled again twice
# while ringbench --verify runs (32-36 MiB); the I/O thread creates its queue again each time and
# sends what was in flight again: every request completes, no error, no mismatch, and the
# controller is running after.
ctl_reset() {
    n0=$(broker_log | grep -c "I/O queue created again")
    su -s /bin/sh tester -c "exec ringbench --socket /run/nvmed.sock --rw randrw --bs 4k --iodepth 16 \
        --numjobs 2 --runtime 4 --offset 32M --size 4M --verify" > /tmp/rbr 2>&1 &
    rb=$!
    sleep 1
    ctl reset 0 || { kill $rb; return 1; }
    sleep 0.5
    ctl reset 0 --json > /tmp/reset.json || { kill $rb; return 1; }
    cat /tmp/reset.json
    wait $rb; rc=$?
    rb_verified /tmp/rbr 2 || return 1
    grep -q '"state": "running"' /tmp/reset.json || { echo "not running after the reset"; return 1; }
    n=$(( $(broker_log | grep -c "I/O queue created again") - n0 ))
    echo "nvmed: I/O queue created again $n times (one I/O thread, two resets)"
    [ "$n" = 2 ] || { echo "expected the I/O queue to be created again after each reset"; return 1; }
}
check nvmectl-reset-under-verified-io ctl_reset
echo "VMTEST TIME nvmectl $(( $(cut -d. -f1 /proc/uptime) - t0 )) s"

# Scale out (issue 8): --io-threads, and several --pci in one broker.
t0=$(cut -d. -f1 /proc/uptime)
# 00:03.0 offers 4 I/O queue pairs (max_ioqpairs=4): two I/O threads must start, each with its
# own device queue, and a verified ringbench load of 4 jobs (one session, a ring per job, rings
# placed on the threads by load) must pass with every job verifying reads and both threads
# completing commands (the broker's per-thread counters).
io_threads_two() {
    stop_broker || return 1
    BROKER_ARGS="--io-threads 2"
    start_broker; r=$?
    BROKER_ARGS=
    [ $r = 0 ] || return 1
    broker_log | grep "I/O thread started" > /tmp/threads
    sed 's/^[^ ]* *//; s/^/nvmed: /' /tmp/threads
    [ "$(wc -l < /tmp/threads)" = 2 ] || { echo "expected 2 \"I/O thread started\" lines"; return 1; }
    [ "$(grep -o 'queue=[0-9]*' /tmp/threads | sort -u | wc -l)" = 2 ] \
        || { echo "the two I/O threads do not have a device queue each"; return 1; }
    as_user ringbench --socket /run/nvmed.sock --rw randrw --bs 4k --iodepth 8 --numjobs 4 \
        --runtime 2 --offset 36M --size 4M --verify > /tmp/rb 2>&1; rc=$?
    rb_verified /tmp/rb 4 || return 1
    as_user vmcheck io-threads --expect 2 --min-commands 100
}
check io-threads-two io_threads_two
# One broker on two controllers (and two I/O threads, each with a queue pair on both):
# 00:03.0's namespace is broker-wide nsid 1 (64 MiB), 00:0d.0's nsid 2 (16 MiB). Verified
# ringbench loads on both at once, then a pattern written to nsid 2 (found again below by an
# nvmed serving 00:0d.0 alone, and by the host in 00:0d.0's disk image, not in 00:03.0's).
two_controllers() {
    stop_broker || return 1
    BROKER_ARGS="--pci $EXTRA_DEV --io-threads 2"
    start_broker; r=$?
    BROKER_ARGS=
    [ $r = 0 ] || return 1
    broker_log | grep -E "controller ready|namespace|I/O thread started" | sed 's/^[^ ]* *//; s/^/nvmed: /'
    [ "$(broker_log | grep "I/O thread started" | grep -c "controllers=2")" = 2 ] \
        || { echo "expected 2 I/O threads, each on both controllers"; return 1; }
    as_user vmcheck --nsid 1 identify --size $DISK_BYTES --lba 512 || return 1
    as_user vmcheck --nsid 2 identify --size $EXTRA_BYTES --lba 512 || return 1
    rbargs="--rw randrw --bs 16k --iodepth 8 --numjobs 2 --runtime 2 --size 4M --verify"
    as_user ringbench --nsid 1 --offset 44M $rbargs > /tmp/rb1 2>&1 & a=$!
    as_user ringbench --nsid 2 --offset 0 $rbargs > /tmp/rb2 2>&1 & b=$!
    wait $a; rc=$?
    rb_verified /tmp/rb1 2 || r=1
    wait $b; rc=$?
    rb_verified /tmp/rb2 2 || r=1
    [ $r = 0 ] || return 1
    as_user vmcheck --nsid 2 write-pattern --offset 8388608 --len 65536 --seed 12
}
check two-controllers-one-broker two_controllers
# Stopping a broker of two controllers shuts both down (CC.SHN).
shutdown_both() {
    stop_broker || return 1
    n=$(broker_log | grep -c "controller shut down")
    [ "$n" = 2 ] || { echo "$n controllers shut down, expected 2"; return 1; }
}
# On its own: the pattern written through the two-controller broker to nsid 2 is on 00:0d.0.
extra_alone() {
    rm -f /tmp/m.out /tmp/m.log
    nvmed --pci $EXTRA_DEV --socket /run/m.sock --socket-mode 666 > /tmp/m.out 2> /tmp/m.log &
    pid=$!
    for i in $(seq 300); do grep -q ready /tmp/m.out 2>/dev/null && break; sleep 0.1; done
    r=1
    grep -q ready /tmp/m.out && as_user vmcheck --socket /run/m.sock identify --size $EXTRA_BYTES --lba 512 \
        && as_user vmcheck --socket /run/m.sock check-pattern --offset 8388608 --len 65536 --seed 12 && r=0
    kill -TERM $pid; wait $pid || r=1
    return $r
}
check broker-clean-shutdown-two-controllers shutdown_both
check second-controller-alone-has-the-data extra_alone
echo "VMTEST TIME scale-out $(( $(cut -d. -f1 /proc/uptime) - t0 )) s"

# The controller matrix: one nvmed per controller. It must offer exactly the expected
# namespaces (vmcheck matrix --expect NSID:LBA_SIZE:BYTES), say in its log why it refuses each
# other one, pass verified random I/O and one request of exactly the advertised max_transfer on
# every namespace, and exit 0 on SIGTERM after shutting the controller down (CC.SHN).
# "index:bytes" of each BAR a PCI device has.
bars() {
    i=0
    while read -r a b f; do
        [ $((a)) = 0 ] || printf ' %s:%s' $i $((b - a + 1))
        i=$((i + 1))
    done < /sys/bus/pci/devices/$1/resource
}
matrix_log() { grep -E "WARN|ERROR|namespace|controller (ready|shut)" /tmp/m.log | sed 's/^[^ ]* *//; s/^/nvmed: /'; }
# matrix_serves SLOT MAX_TRANSFER MSIX_VECTORS "--expect NSID:LBA:BYTES..." ["LOG LINE|LOG LINE"]
matrix_serves() {
    bdf=0000:00:$1.0 max=$2 vectors=$3 expect=$4 reasons=$5
    rm -f /tmp/m.out /tmp/m.log
    nvmed --pci $bdf --socket /run/m.sock --socket-mode 666 > /tmp/m.out 2> /tmp/m.log &
    pid=$!
    for i in $(seq 300); do
        grep -q ready /tmp/m.out 2>/dev/null && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    r=0
    if grep -q ready /tmp/m.out; then
        as_user vmcheck --socket /run/m.sock matrix $expect --max-transfer $max || r=1
        v=$(grep -c "vfio-msix.*$bdf" /proc/interrupts)
        echo "$bdf: BARs (index:bytes)$(bars $bdf); MSI-X vectors in use: $v"
        [ "$v" = "$vectors" ] || { echo "expected $vectors MSI-X vectors in use"; r=1; }
    else
        echo "nvmed did not start"; r=1
    fi
    old_ifs=$IFS; IFS='|'
    for want in $reasons; do grep -qF "$want" /tmp/m.log || { echo "nvmed's log does not say: $want"; r=1; }; done
    IFS=$old_ifs
    kill -TERM $pid 2>/dev/null; wait $pid; rc=$?
    [ $rc = 0 ] || { echo "nvmed exited $rc after SIGTERM"; r=1; }
    grep -q "controller shut down" /tmp/m.log || { echo "no clean controller shutdown (CC.SHN)"; r=1; }
    matrix_log
    return $r
}
# A controller without a usable namespace: nvmed exits non-zero, naming why, after CC.SHN.
matrix_refuses() {
    bdf=0000:00:$1.0 want=$2
    rm -f /tmp/m.out /tmp/m.log
    nvmed --pci $bdf --socket /run/m.sock > /tmp/m.out 2> /tmp/m.log &
    pid=$!
    for i in $(seq 300); do
        kill -0 $pid 2>/dev/null || break
        grep -q ready /tmp/m.out 2>/dev/null && break
        sleep 0.1
    done
    if kill -0 $pid 2>/dev/null; then
        echo "nvmed did not exit (it should refuse this controller)"
        kill -TERM $pid; wait $pid
        return 1
    fi
    wait $pid; rc=$?
    matrix_log
    r=0
    [ $rc != 0 ] || { echo "nvmed exited 0"; r=1; }
    grep -qF "nvmed: $want" /tmp/m.log || { echo "nvmed's exit message does not say: $want"; r=1; }
    grep -q "controller shut down" /tmp/m.log || { echo "no clean controller shutdown (CC.SHN)"; r=1; }
    return $r
}
M16=16777216
t0=$(cut -d. -f1 /proc/uptime)
check matrix-lba-4096 matrix_serves 05 $M16 2 "--expect 1:4096:33554432"
check matrix-mdts-0-no-limit matrix_serves 06 $M16 2 "--expect 1:512:33554432"
check matrix-mdts-1 matrix_serves 07 $M16 2 "--expect 1:512:33554432"
check matrix-msix-exclusive-bar matrix_serves 08 $M16 2 "--expect 1:512:33554432"
check matrix-msix-one-vector matrix_serves 09 $M16 1 "--expect 1:512:33554432"
check matrix-two-namespaces matrix_serves 0a $M16 2 "--expect 1:512:33554432 --expect 2:512:25165824"
check matrix-metadata-pi-zoned-refused matrix_serves 0b $M16 2 "--expect 1:512:33554432" \
    "namespace 2: formatted with 8 bytes of metadata per block: not served|namespace 3: formatted with 8 bytes of metadata per block, protection information type 1: not served|namespace 4: zoned namespace (CSI 2): not served"
check matrix-only-namespace-unusable matrix_refuses 0c \
    "the controller has no usable namespace: namespace 1: LBA size 16384 bytes exceeds the controller's maximum transfer of 8192 bytes"
echo "VMTEST TIME matrix $(( $(cut -d. -f1 /proc/uptime) - t0 )) s"
sed 's/^/  nvmed| /' /tmp/nvmed.log | tail -40
# Surprise removal (issue 10): the host deletes the hot-pluggable controller (QEMU device_del)
# while nvmed serves it a verified ringbench load. The guest's pciehp removes it; vfio-pci asks
# nvmed for it back; nvmed stops its DMA, fails everything with DeviceGone, releases it, and the
# removal completes. ringbench fails with the clear error, nothing hangs, the broker still
# answers (ListNamespaces: Gone) and exits 0 on SIGTERM.
surprise_removal() {
    [ -n "$HOT_DEV" ] || { echo "no controller behind the root port 00:0e.0"; return 1; }
    rm -f /tmp/h.out
    nvmed --pci $HOT_DEV --socket /run/h.sock --socket-mode 666 > /tmp/h.out 2> /tmp/h.log &
    hp=$!
    for i in $(seq 300); do grep -q ready /tmp/h.out 2>/dev/null && break; sleep 0.1; done
    grep -q ready /tmp/h.out || { cat /tmp/h.log; return 1; }
    as_user ringbench --socket /run/h.sock --rw randrw --bs 4k --iodepth 8 --runtime 60 --size 4M \
        --verify > /tmp/rbh 2>&1 &
    rb=$!
    sleep 2
    r=0
    # (Said again while waiting: a guest idle on the serial console may leave its last line
    # unsent; the host acts on the first one it sees.)
    for i in $(seq 900); do
        [ -e /sys/bus/pci/devices/$HOT_DEV ] || break
        # (To the console itself: this check's output is collected for later.)
        [ $((i % 10)) = 1 ] && say "UNPLUG-NOW" > /dev/console
        sleep 0.1
    done
    if [ -e /sys/bus/pci/devices/$HOT_DEV ]; then echo "$HOT_DEV was not removed in 90 s"; r=1; fi
    wait $rb; rc=$?
    cat /tmp/rbh
    [ $rc != 0 ] && grep -q "the controller is gone" /tmp/rbh \
        || { echo "ringbench did not end with DeviceGone ($rc)"; r=1; }
    as_user vmcheck --socket /run/h.sock expect-gone || r=1
    kill -TERM $hp; wait $hp; rc=$?
    [ $rc = 0 ] || { echo "nvmed exited $rc after SIGTERM"; r=1; }
    grep -E "WARN|ERROR" /tmp/h.log | sed 's/^[^ ]* *//; s/^/nvmed: /' | head -20
    return $r
}
check surprise-removal-device-del surprise_removal

[ -f /tcp.sh ] && . /tcp.sh # nvmed-tcp: the guest kernel's NVMe/TCP initiator (vmtest/tcp.sh)

# Durability, last (it ends the guest): a write completed with FUA and a write followed by a
# completed Flush, through nvmed on 00:03.0; then the host kills QEMU with SIGKILL (a power cut
# for the guest: no shutdown, no sync) and finds both in the disk image (run.sh).
power_cut() {
    start_broker || return 1
    as_user vmcheck write-durable --offset 62914560 --len 65536 --seed 21
}
check durable-writes-before-power-cut power_cut
say "DONE failed=$FAILED"
# Until the host cuts the power (said again: a guest idle on the serial console may leave its
# last line unsent).
for i in $(seq 600); do say "POWER-CUT-NOW"; sleep 1; done
poweroff -f
