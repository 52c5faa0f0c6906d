# The nvmed-tcp scenario, sourced by the VM test's init.sh (uses its check/say): nvmed on an
# emulated namespace, nvmed-tcp in front of it on loopback, and the guest kernel's nvme-tcp
# initiator connecting through /dev/nvme-fabrics (what `nvme connect` writes): the namespace's
# size in sysfs, verified direct I/O at several sizes with 1 and 8 threads over every I/O
# queue, the data again after disconnect and reconnect, mkfs + mount + fsck, header and data
# digests, more I/O queues, nvme-cli's discover and connect-all through the discovery
# controller, and a host NQN that is not allowed.
TCP_NQN=nqn.2026-01.io.nvmed:vmtest
TCP_HOST=nqn.2014-08.org.nvmexpress:uuid:6e766d65-6474-6370-0000-000000000001
TCP_OTHER=nqn.2014-08.org.nvmexpress:uuid:6e766d65-6474-6370-0000-000000000002
TCP_BYTES=$((96 << 20))
TCP_DEV=
# e2fsprogs' tools (copied from the host at their paths; busybox's mke2fs applet is in /bin).
MKE2FS=$(ls /usr/sbin/mke2fs /sbin/mke2fs 2>/dev/null | head -1)
E2FSCK=$(ls /usr/sbin/e2fsck /sbin/e2fsck 2>/dev/null | head -1)

tcp_setup() {
    for m in $(cat /modules.tcp); do insmod /lib/modules/$m.ko || { echo "insmod $m failed"; return 1; }; done
    ip link set lo up || return 1
    nvmed --emulate --size $TCP_BYTES --socket /run/tcp-nvmed.sock > /tmp/tcp-nvmed.out 2> /tmp/tcp-nvmed.log &
    TCP_BROKER=$!
    for i in $(seq 100); do grep -q ready /tmp/tcp-nvmed.out 2>/dev/null && break; sleep 0.1; done
    grep -q ready /tmp/tcp-nvmed.out || { cat /tmp/tcp-nvmed.log; return 1; }
    nvmed-tcp --listen 127.0.0.1:4420 --discovery-listen 127.0.0.1:8009 --nvmed /run/tcp-nvmed.sock \
        --subsystem $TCP_NQN --allow-host $TCP_HOST > /tmp/tcp.out 2> /tmp/tcp.log &
    TCP_TARGET=$!
    for i in $(seq 100); do grep -q ready /tmp/tcp.out 2>/dev/null && break; sleep 0.1; done
    grep -q ready /tmp/tcp.out || { cat /tmp/tcp.log; return 1; }
}
# tcp_connect HOSTNQN [,OPTIONS]: connects and sets TCP_DEV (the namespace's block device).
tcp_connect() {
    echo "transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$TCP_NQN,hostnqn=$1$2" > /dev/nvme-fabrics || return 1
    tcp_find_dev
}
tcp_find_dev() {
    TCP_DEV=
    for i in $(seq 100); do
        for b in /sys/block/nvme*n*; do
            [ -e "$b" ] || continue
            n=${b##*/}
            case $n in *c*) continue ;; esac
            [ "$(cat $b/device/subsysnqn 2>/dev/null)" = $TCP_NQN ] && [ -b /dev/$n ] && TCP_DEV=/dev/$n
        done
        [ -n "$TCP_DEV" ] && break
        sleep 0.1
    done
    [ -n "$TCP_DEV" ] || { echo "no block device of $TCP_NQN appeared"; dmesg | tail -20; return 1; }
    echo "connected: $TCP_DEV ($(cat /sys/block/${TCP_DEV#/dev/}/size) sectors)"
}
tcp_disconnect() {
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat $c/subsysnqn 2>/dev/null)" = $TCP_NQN ] && echo 1 > $c/delete_controller
    done
    for i in $(seq 100); do [ -b "$TCP_DEV" ] || return 0; sleep 0.1; done
    echo "$TCP_DEV still there after delete_controller"; return 1
}
tcp_size() {
    s=$(cat /sys/block/${TCP_DEV#/dev/}/size)
    [ $((s * 512)) = $TCP_BYTES ] || { echo "size $((s * 512)), expected $TCP_BYTES"; return 1; }
}
tcp_queues() { # the I/O queues nvmed-tcp served for the current controller
    grep -c "I/O queue connected" /tmp/tcp.log
}
tcp_io() {
    tcp_size || return 1
    blkcheck --dev $TCP_DEV --mib 8 --threads 1 --seed 1 --sizes 512,4096,12288,131072 || return 1
    blkcheck --dev $TCP_DEV --mib 16 --threads 8 --seed 2 --sizes 4096,8192,65536,131072,1048576 || return 1
    q=$(tcp_queues); echo "I/O queues connected so far: $q"; [ "$q" -ge 2 ]
}
tcp_reconnect() {
    tcp_disconnect || return 1
    tcp_connect $TCP_HOST || return 1
    tcp_size && blkcheck --dev $TCP_DEV --mib 16 --threads 8 --seed 2 --verify-only \
        --sizes 4096,8192,65536,131072,1048576
}
tcp_fs() {
    $MKE2FS -q -F -t ext4 $TCP_DEV || return 1
    $E2FSCK -fn $TCP_DEV || return 1
    mkdir -p /mnt/tcp && mount -t ext4 $TCP_DEV /mnt/tcp || return 1
    dd if=/dev/urandom of=/tmp/tcp-file bs=1M count=8 2>/dev/null
    cp /tmp/tcp-file /mnt/tcp/file && sync && umount /mnt/tcp || return 1
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 $TCP_DEV /mnt/tcp && cmp /tmp/tcp-file /mnt/tcp/file && umount /mnt/tcp || return 1
    $E2FSCK -fn $TCP_DEV
}
tcp_digests() {
    tcp_disconnect || return 1
    before=$(tcp_queues)
    tcp_connect $TCP_HOST ",hdr_digest,data_digest,nr_write_queues=2" || return 1
    # The filesystem written without digests reads back clean with them; then new verified I/O.
    tcp_size && $E2FSCK -fn $TCP_DEV || return 1
    blkcheck --dev $TCP_DEV --mib 16 --threads 8 --seed 3 --sizes 512,8192,131072,1048576 || return 1
    q=$(( $(tcp_queues) - before )); echo "I/O queues of this controller: $q"; [ "$q" -ge 4 ]
}
# nvme-cli's discovery (Debian's nvme, copied from the host): the discovery controller on 8009
# lists the subsystem to the allowed host and nothing to another; connect-all then connects
# to what it lists, and the namespace serves verified I/O.
tcp_discovery() {
    tcp_disconnect || return 1
    nvme discover -t tcp -a 127.0.0.1 -s 8009 -q $TCP_HOST > /tmp/disc.out 2>&1
    cat /tmp/disc.out
    grep -q "subnqn: *$TCP_NQN" /tmp/disc.out || { echo "the subsystem is not listed"; return 1; }
    grep -q "trsvcid: *4420" /tmp/disc.out && grep -q "traddr: *127.0.0.1" /tmp/disc.out || return 1
    nvme discover -t tcp -a 127.0.0.1 -s 8009 -q $TCP_OTHER > /tmp/disc2.out 2>&1
    if grep -q "subnqn: *$TCP_NQN" /tmp/disc2.out; then echo "listed to $TCP_OTHER"; return 1; fi
    nvme connect-all -t tcp -a 127.0.0.1 -s 8009 -q $TCP_HOST || return 1
    tcp_find_dev || return 1
    blkcheck --dev $TCP_DEV --mib 8 --threads 2 --seed 7 --sizes 4096,65536
}
tcp_refused() {
    tcp_disconnect || return 1
    if tcp_connect $TCP_OTHER 2>/dev/null; then echo "host $TCP_OTHER was let in"; return 1; fi
    grep "not allowed" /tmp/tcp.log | tail -1 | grep -q "$TCP_OTHER" || { echo "nvmed-tcp did not log the refusal"; return 1; }
    dmesg | grep -i "not allowed\|connect" | tail -2
}
tcp_stop() {
    kill -TERM $TCP_TARGET; wait $TCP_TARGET
    kill -TERM $TCP_BROKER; wait $TCP_BROKER
}

t0=$(cut -d. -f1 /proc/uptime)
check tcp-target-starts tcp_setup
check tcp-kernel-connects tcp_connect $TCP_HOST
check tcp-verified-io tcp_io
check tcp-disconnect-reconnect tcp_reconnect
check tcp-mkfs-mount-fsck tcp_fs
check tcp-digests-more-queues tcp_digests
check tcp-discovery-nvme-cli tcp_discovery
check tcp-host-refused tcp_refused
tcp_stop
grep -E "WARN|ERROR" /tmp/tcp.log | tail -20 | sed 's/^/  nvmed-tcp| /'
echo "VMTEST TIME tcp $(( $(cut -d. -f1 /proc/uptime) - t0 )) s"
