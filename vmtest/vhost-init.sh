#!/bin/sh
# PID 1 of the vhost-user-blk test guests (vmtest/vhost.sh boots several at once). The kernel
# command line says what this guest is for:
#   vht_role=rw|ro|restart|bench  vht_bytes=DISK-BYTES  vht_queues=N  vht_mib=CHECKSUM-MIB
#   vht_sha=SHA256 (ro: what the first vht_mib MiB must hash to)  vht_secs=N (restart, bench)
#   vht_require=1: checks of optional features (flush, discard, write zeroes) fail, not skip
#   vht_disks=a1,b1,.. vht_rounds=N vht_rw=randread,.. vht_qd=1,.. vht_qs=1,.. (bench)
# and it reports on the serial console: VHOSTTEST PASS|FAIL|SKIP <name>, VHOSTTEST SHA256 <mib>
# <hex> (checked against the backend's storage on the host), VHOSTTEST DONE failed=N.
export PATH=/usr/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for w in $(cat /proc/cmdline); do
    case $w in vht_*=*) eval "${w%%=*}=${w#*=}" ;; esac
done
FAILED=0
say() { echo "VHOSTTEST $*"; }
check() {
    name=$1
    shift
    if "$@" > /tmp/check.out 2>&1; then say "PASS $name"; else say "FAIL $name"; FAILED=$((FAILED + 1)); fi
    sed 's/^/  | /' /tmp/check.out
}
# A check that may not apply: exit status 2 means skipped, with the reason as its last line.
check_or_skip() {
    name=$1
    shift
    "$@" > /tmp/check.out 2>&1
    rc=$?
    # A backend known to offer the feature (vht_require=1: nvmed-vhost offers flush, discard
    # and write zeroes) must not lose it in negotiation: a skip is then a failure.
    [ $rc = 2 ] && [ "${vht_require:-0}" = 1 ] && rc=1
    case $rc in
        0) say "PASS $name" ;;
        2) say "SKIP $name: $(tail -1 /tmp/check.out)" ;;
        *) say "FAIL $name"; FAILED=$((FAILED + 1)) ;;
    esac
    sed 's/^/  | /' /tmp/check.out
}
done_() {
    say "DONE failed=$FAILED"
    sync
    poweroff -f
}

for m in $(cat /modules.virtio) $(cat /modules.ext4); do insmod /lib/modules/$m.ko || say "FAIL insmod-$m"; done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
DEV=/dev/vda
SYS=/sys/block/vda
[ -b $DEV ] || { say "FAIL no-disk"; FAILED=1; done_; }
for q in /sys/block/vd*/queue/scheduler; do echo none > $q 2>/dev/null; done
mkdir -p /sys/kernel/debug && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

VIRTIO=$(basename "$(readlink $SYS/device)") # virtio0, ...
queue_irqs() { # "req.N total" per virtqueue of the disk
    grep "$VIRTIO-req" /proc/interrupts | awk '{n = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i; print $NF, n}'
}
# Negotiated virtio feature bit N (Documentation: /sys/bus/virtio/devices/*/features).
feature() { [ "$(cut -c$(($1 + 1)) /sys/bus/virtio/devices/$VIRTIO/features)" = 1 ]; }
# util-linux's blkdiscard (-z), by path: busybox ash runs its own applet for a bare name.
for BLKDISCARD in /usr/sbin/blkdiscard /sbin/blkdiscard /usr/bin/blkdiscard; do [ -x $BLKDISCARD ] && break; done
stat_field() { awk -v f=$1 '{print $f}' $SYS/stat; } # 12: discards, 16: flushes (Documentation/block/stat.rst)
size() {
    echo "$(cat $SYS/size) sectors, want $((vht_bytes / 512))"
    [ "$(cat $SYS/size)" -eq $((vht_bytes / 512)) ]
}
queues() {
    n=$(ls $SYS/mq | wc -l)
    echo "$n hardware queues (/sys/block/vda/mq), want $vht_queues"
    [ "$n" -eq "$vht_queues" ]
}
checksum() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
    sha=$(dd if=$DEV bs=1M count=$vht_mib iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    say "SHA256 $vht_mib $sha"
}
# ringbench's io_uring engine, O_DIRECT, every block self-checking (offset + seed + checksum);
# reads of blocks written in the same run are verified. Fails on any I/O error or mismatch, and
# when nothing was verified at all.
rb_verify() { # bs iodepth ios offset size [taskset-cpu]
    cpu=${6:+taskset -c $6}
    $cpu ringbench --engine io-uring --filename $DEV --rw randrw --bs $1 --iodepth $2 --verify \
        --number-ios $3 --offset $4 --size $5 > /tmp/rb.$4 2>&1
    r=$?
    cat /tmp/rb.$4
    [ $r -eq 0 ] && grep -q 'reads verified' /tmp/rb.$4
}

role_rw() {
    check disk-size size
    check queue-count queues
    check writable sh -c "cat $SYS/ro; [ \$(cat $SYS/ro) = 0 ]"
    # Verified random I/O: several block sizes and depths, each on its own range (256 blocks
    # per job so most reads hit blocks written in the same run).
    check verify-bs512-qd1 rb_verify 512 1 600 0 128k
    check verify-bs4k-qd1 rb_verify 4k 1 600 1M 1M
    check verify-bs64k-qd8 rb_verify 64k 8 400 16M 16M
    check verify-bs1m-qd4 rb_verify 1m 4 60 32M 64M
    # One job pinned to each vCPU: blk-mq maps each CPU to its own queue, so every queue must
    # carry I/O (each virtqueue has its own MSI-X vector: its interrupt count must grow).
    two_queues() {
        queue_irqs > /tmp/irq0
        rb_verify 4k 16 1500 2M 1M 0 & a=$!
        rb_verify 4k 16 1500 3M 1M 1 & b=$!
        wait $a || return 1
        wait $b || return 1
        queue_irqs > /tmp/irq1
        paste /tmp/irq0 /tmp/irq1 | awk '{print "queue " $1 ": " $2 " -> " $4 " interrupts"; if ($4 <= $2) bad = 1} END {exit bad}' || return 1
        [ "$(wc -l < /tmp/irq1)" -eq "$vht_queues" ]
    }
    check verify-bs4k-qd16-two-cpus-every-queue two_queues

    flush() {
        echo "write cache: $(cat $SYS/queue/write_cache)"
        feature 9 || { echo "the device offers no flush (VIRTIO_BLK_F_FLUSH)"; return 2; }
        if [ "$(cat $SYS/queue/write_cache)" != "write back" ]; then
            # qemu-storage-daemon starts write-through (config wce=0): turn its cache on through
            # the virtio config (VIRTIO_BLK_F_CONFIG_WCE) so the kernel sends flushes.
            echo "write back" > $SYS/cache_type || { echo "a write-through device that cannot switch to write back"; return 2; }
            echo "switched the device to write back: $(cat $SYS/queue/write_cache)"
        fi
        f0=$(stat_field 16)
        dd if=/dev/urandom of=/tmp/pat bs=64k count=1 2>/dev/null
        dd if=/tmp/pat of=$DEV bs=64k seek=$((96 * 16)) oflag=direct conv=fsync || return 1
        f1=$(stat_field 16)
        echo "flushes completed: $f0 -> $f1"
        [ "$f1" -gt "$f0" ] || return 1
        dd if=$DEV bs=64k skip=$((96 * 16)) count=1 iflag=direct 2>/dev/null | cmp - /tmp/pat
    }
    check_or_skip flush-after-direct-write flush

    discard() {
        max=$(cat $SYS/queue/discard_max_bytes)
        echo "discard_max_bytes $max write_zeroes_max_bytes $(cat $SYS/queue/write_zeroes_max_bytes)"
        [ "$max" -gt 0 ] || { echo "the device offers no discard (VIRTIO_BLK_F_DISCARD)"; return 2; }
        at=$((100 << 20))
        dd if=/dev/urandom of=/tmp/pat bs=1M count=1 2>/dev/null
        dd if=/tmp/pat of=$DEV bs=1M seek=100 oflag=direct conv=fsync 2>/dev/null || return 1
        d0=$(stat_field 12)
        $BLKDISCARD -o $at -l $((1 << 20)) $DEV || return 1
        d1=$(stat_field 12)
        echo "discards completed: $d0 -> $d1"
        [ "$d1" -gt "$d0" ] || return 1
        if dd if=$DEV bs=1M skip=100 count=1 iflag=direct 2>/dev/null | cmp -s - /tmp/pat; then
            echo "the discarded range still reads the old data (allowed)"
        else
            echo "the discarded range reads back changed (zeroes or deallocated)"
        fi
    }
    check_or_skip discard discard

    write_zeroes() {
        [ "$(cat $SYS/queue/write_zeroes_max_bytes)" -gt 0 ] || { echo "the device offers no write zeroes (VIRTIO_BLK_F_WRITE_ZEROES)"; return 2; }
        dd if=/tmp/pat of=$DEV bs=1M seek=101 oflag=direct conv=fsync 2>/dev/null || return 1
        $BLKDISCARD -z -o $((101 << 20)) -l $((1 << 20)) $DEV || return 1
        dd if=/dev/zero bs=1M count=1 2>/dev/null > /tmp/zero
        dd if=$DEV bs=1M skip=101 count=1 iflag=direct 2>/dev/null | cmp - /tmp/zero
    }
    check_or_skip write-zeroes-reads-zeroes write_zeroes

    # The guest driver unbound and bound again: the device is reset and set up anew (its rings
    # stopped and started again); the write cache mode the guest chose stays as QEMU shows it
    # (that the backend keeps following it across restarts is the crate's unit test), and
    # verified I/O works on the new rings.
    rebind() {
        dev=$(basename "$(readlink -f $SYS/device)")
        echo "write through" > $SYS/cache_type || return 1
        echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/unbind || return 1
        echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/bind || return 1
        for i in $(seq 100); do [ -b $DEV ] && [ -e $SYS/queue/write_cache ] && break; sleep 0.1; done
        echo "$dev rebound; write cache: $(cat $SYS/queue/write_cache)"
        [ "$(cat $SYS/queue/write_cache)" = "write through" ] || return 1
        rb_verify 4k 8 300 4M 1M || return 1
        echo "write back" > $SYS/cache_type
    }
    check driver-rebind-keeps-write-cache-and-serves rebind

    ext4() {
        mkfs.ext4 -q -F $DEV || return 1 # discards the whole device first
        mount -t ext4 $DEV /mnt || return 1
        dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null || return 1
        mkdir /mnt/dir
        for i in $(seq 40); do head -c $((i * 997)) /dev/urandom > /mnt/dir/f$i; done
        cp /bin/ringbench /mnt/dir/ringbench || return 1
        (cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums
        sync
        umount /mnt || return 1
        echo 3 > /proc/sys/vm/drop_caches
        mount -t ext4 $DEV /mnt || return 1
        (cd /mnt && sha256sum -c -s /tmp/sums) || { echo "files changed across umount/mount"; return 1; }
        rm /mnt/big
        fstrim -v /mnt || echo "fstrim failed"
        umount /mnt || return 1
        e2fsck -f -n $DEV
    }
    check ext4-mkfs-files-fsck-clean ext4
    check no-io-errors-in-dmesg sh -c '! dmesg | grep -iE "I/O error|blk_update_request|virtio_blk.*error|EXT4-fs error"'
    checksum
}

role_ro() {
    check disk-size size
    check queue-count queues
    check read-only-flag sh -c "cat $SYS/ro; [ \$(cat $SYS/ro) = 1 ]"
    refused() {
        if dd if=/dev/zero of=$DEV bs=4k count=1 oflag=direct; then echo "a write succeeded"; return 1; fi
        if dd if=/dev/zero of=$DEV bs=4k count=1 seek=100 conv=fsync; then echo "a buffered write succeeded"; return 1; fi
        return 0
    }
    check writes-fail refused
    reads() {
        sha=$(dd if=$DEV bs=1M count=$vht_mib iflag=direct | sha256sum | cut -d' ' -f1)
        echo "first $vht_mib MiB: $sha, want $vht_sha"
        [ "$sha" = "$vht_sha" ]
    }
    check reads-return-the-backend-data reads
    check no-io-errors-in-dmesg sh -c '! dmesg | grep -iE "blk_update_request|virtio_blk.*error"'
    checksum
}

# The host SIGKILLs the backend and starts it again while this load runs (QEMU reconnects).
role_restart() {
    check disk-size size
    check queue-count queues
    dd if=/dev/zero of=$DEV bs=1M count=8 oflag=direct 2>/dev/null
    load() {
        ringbench --engine io-uring --filename $DEV --rw randrw --bs 4k --iodepth 16 --verify \
            --runtime $vht_secs --size 1M > /tmp/l0 2>&1 & a=$!
        ringbench --engine io-uring --filename $DEV --rw randrw --bs 64k --iodepth 8 --verify \
            --runtime $vht_secs --offset 4M --size 4M > /tmp/l1 2>&1 & b=$!
        sleep 1
        say "RESTART-BACKEND-NOW" > /dev/console
        wait $a; ra=$?
        wait $b; rb=$?
        cat /tmp/l0 /tmp/l1
        [ $ra -eq 0 ] && [ $rb -eq 0 ] && grep -q 'reads verified' /tmp/l0 && grep -q 'reads verified' /tmp/l1
    }
    check verified-load-across-backend-restart load
    again() { rb_verify 4k 8 500 8M 1M; }
    check verified-io-after-restart again
    check no-io-errors-in-dmesg sh -c '! dmesg | grep -iE "I/O error|blk_update_request|virtio_blk.*error"'
    checksum
}

# Benchmark: every disk vdX is one backend configuration; the host names them (vht_disks=a1,a2,..)
# and samples each backend's CPU time between the BEGIN and RESULT lines. Each configuration
# runs vht_rounds times, alternating A and B.
# The interrupts of disk $1's virtio device so far (all queues, all CPUs).
irqs_of() {
    v=$(basename "$(readlink -f /sys/block/${1#/dev/}/device)")
    awk -v v="$v-" 'index($NF, v) == 1 { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break } END { print s + 0 }' /proc/interrupts
}

role_bench() {
    i=0
    for d in $(echo "$vht_disks" | tr , ' '); do
        dev=/dev/vd$(echo abcdefgh | cut -c$((i + 1)))
        i=$((i + 1))
        eval "dev_$d=$dev"
        q=$(ls /sys/block/${dev#/dev/}/mq | wc -l)
        echo "VHOSTBENCH DISK $d $dev queues=$q"
        dd if=/dev/zero of=$dev bs=1M count=64 oflag=direct 2>/dev/null # reads hit written data
    done
    for rw in $(echo "${vht_rw:-randread,randwrite}" | tr , ' '); do
        for qd in $(echo "${vht_qd:-1,32}" | tr , ' '); do
            for qs in $(echo "${vht_qs:-1,2}" | tr , ' '); do
                for side in $(for r in $(seq ${vht_rounds:-1}); do echo a b; done); do
                    d=$side$qs
                    eval "dev=\$dev_$d"
                    echo "VHOSTBENCH BEGIN $d"
                    irq0=$(irqs_of $dev)
                    if [ $qs = 1 ]; then
                        ringbench --engine io-uring --filename $dev --rw $rw --bs 4k --iodepth $qd \
                            --runtime $vht_secs --size 64M > /tmp/b0 2>&1
                        iops=$(awk '/total:/{print $2; exit}' /tmp/b0)
                    else
                        # One job per vCPU, pinned, each with the full depth: both queues busy.
                        taskset -c 0 ringbench --engine io-uring --filename $dev --rw $rw --bs 4k --iodepth $qd \
                            --runtime $vht_secs --size 32M > /tmp/b0 2>&1 &
                        taskset -c 1 ringbench --engine io-uring --filename $dev --rw $rw --bs 4k --iodepth $qd \
                            --runtime $vht_secs --offset 32M --size 32M > /tmp/b1 2>&1
                        wait
                        iops=$(cat /tmp/b0 /tmp/b1 | awk '/total:/{s += $2} END {print s + 0}')
                    fi
                    irqs=$(($(irqs_of $dev) - irq0))
                    echo "VHOSTBENCH RESULT $d $rw $qd $qs ${iops:-0} $irqs"
                    grep -h 'lat (us)' /tmp/b0 | head -1 | sed 's/^/  | /'
                done
            done
        done
    done
    check no-io-errors-in-dmesg sh -c '! dmesg | grep -iE "I/O error|blk_update_request|virtio_blk.*error"'
}

case $vht_role in
    rw) role_rw ;;
    ro) role_ro ;;
    restart) role_restart ;;
    bench) role_bench ;;
    *) say "FAIL unknown-role-$vht_role"; FAILED=1 ;;
esac
done_
