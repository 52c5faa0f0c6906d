#!/usr/bin/env bash
# Benchmark (not part of CI): in one guest boot, the guest kernel's NVMe/TCP initiator against
# nvmed-tcp (in front of nvmed on its emulated memory namespace) and against the kernel's own
# target, nvmet-tcp, on a RAM disk (brd), both over loopback: random 4 KiB reads and writes at
# queue depth 1 and 32 (synchronous O_DIRECT threads), with the CPU time of the whole guest per
# I/O. Prints the ratios nvmed-tcp / nvmet-tcp. Uses KVM when /dev/kvm is usable, else TCG.
#   bash vmtest/tcp-bench.sh [SECONDS_PER_RUN]     (NVMED_ARGS="..." and TCP_ARGS="..." add options,
#   GUEST_APPEND="..." adds to the guest kernel's command line)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
work="$top/target/vmtest-tcp-bench"
mkdir -p "$work"
log() { echo "tcp-bench: $*"; }
secs=${1:-5}
. vmtest/lib.sh
vm_packages
vm_kernel
log "building static binaries"
vm_static_build -p nvmed-server --bin nvmed -p nvmed-tcp --bin nvmed-tcp -p nvmed-vmtest --bin blkcheck
root="$work/root"
vm_root "$root"
mods="crct10dif_common crct10dif_generic crc-t10dif crc64 crc64_rocksoft_generic crc64-rocksoft t10-pi nvme-core"
mods="$mods crc32c_generic nvme-fabrics nvme-tcp configfs nvmet nvmet-tcp brd"
vm_modules "$root" $mods
echo "$mods" > "$root/modules"
echo "$secs" > "$root/secs"
echo "${NVMED_ARGS:-}" > "$root/nvmed_args"
echo "${TCP_ARGS:-}" > "$root/tcp_args"
cp "$vm_bins/nvmed" "$vm_bins/nvmed-tcp" "$vm_bins/blkcheck" "$root/bin/"
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
for m in $(cat /modules); do
    if [ $m = brd ]; then insmod /lib/modules/$m.ko rd_nr=1 rd_size=262144; else insmod /lib/modules/$m.ko; fi
done
ip link set lo up
echo "BENCH clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
SECS=$(cat /secs)
HOST=nqn.2014-08.org.nvmexpress:uuid:6e766d65-6474-6370-0000-0000000000be
# nvmed-tcp on 4420, in front of nvmed's emulated 256 MiB namespace.
nvmed --emulate --size 268435456 --socket /run/nvmed.sock $(cat /nvmed_args) > /tmp/nvmed.out 2> /tmp/nvmed.log &
for i in $(seq 100); do grep -q ready /tmp/nvmed.out 2>/dev/null && break; sleep 0.1; done
nvmed-tcp --listen 127.0.0.1:4420 --nvmed /run/nvmed.sock --subsystem nqn.2026-01.io.nvmed:bench \
    --allow-host $HOST $(cat /tcp_args) > /tmp/tcp.out 2> /tmp/tcp.log &
for i in $(seq 100); do grep -q ready /tmp/tcp.out 2>/dev/null && break; sleep 0.1; done
# nvmet-tcp on 4421, on /dev/ram0 (256 MiB).
mount -t configfs none /sys/kernel/config
k=/sys/kernel/config/nvmet
mkdir $k/subsystems/kbench
echo 1 > $k/subsystems/kbench/attr_allow_any_host
mkdir $k/subsystems/kbench/namespaces/1
echo /dev/ram0 > $k/subsystems/kbench/namespaces/1/device_path
echo 1 > $k/subsystems/kbench/namespaces/1/enable
mkdir $k/ports/1
echo tcp > $k/ports/1/addr_trtype; echo ipv4 > $k/ports/1/addr_adrfam
echo 127.0.0.1 > $k/ports/1/addr_traddr; echo 4421 > $k/ports/1/addr_trsvcid
ln -s $k/subsystems/kbench $k/ports/1/subsystems/kbench
dev_of() {
    for i in $(seq 100); do
        for b in /sys/block/nvme*n*; do
            [ -e "$b" ] || continue
            n=${b##*/}; case $n in *c*) continue ;; esac
            [ "$(cat $b/device/subsysnqn 2>/dev/null)" = $1 ] && [ -b /dev/$n ] && { echo /dev/$n; return; }
        done
        sleep 0.1
    done
}
run() { # LABEL PORT NQN
    echo "transport=tcp,traddr=127.0.0.1,trsvcid=$2,nqn=$3,hostnqn=$HOST" > /dev/nvme-fabrics
    d=$(dev_of $3)
    [ -n "$d" ] || { echo "BENCH FAIL no device for $3"; return; }
    blkcheck --dev $d --mib 256 --threads 4 --seed 9 --sizes 1048576 > /dev/null # written once
    for rw in randread randwrite; do
        for qd in 1 32; do
            blkcheck --dev $d --mib 256 --bench $rw --threads $qd --secs $SECS --label $1 &
            b=$!
            if [ $rw = randread ]; then # where the guest's CPU goes, halfway through
                sleep $((SECS / 2)); top -b -n 1 | head -14 | sed "s/^/BENCH top $1 qd$qd: /"
            fi
            wait $b
        done
    done
    for c in /sys/class/nvme/nvme*; do [ "$(cat $c/subsysnqn)" = $3 ] && echo 1 > $c/delete_controller; done
    sleep 1
}
run nvmed-tcp 4420 nqn.2026-01.io.nvmed:bench
run nvmet-tcp 4421 kbench
echo "BENCH DONE"
poweroff -f
INIT
chmod +x "$root/init"
vm_pack "$root" "$work/initrd.gz"
boot() { # ACCEL CPU
    log "booting ($1, $secs s per run)"
    timeout 900 qemu-system-x86_64 -machine q35,accel=$1 -cpu $2 -m 1024 -smp 2 -nographic -no-reboot \
        -kernel "$vm_vmlinux" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1 ${GUEST_APPEND:-}" \
        < /dev/null 2>&1 | stdbuf -oL tr -d '\r' | tee "$work/console.log" | grep -a --line-buffered -E "BLKBENCH|BENCH" || true
    grep -aq "BENCH DONE" "$work/console.log"
}
accel=kvm
if ! { [ -w /dev/kvm ] && boot kvm host; }; then
    accel=tcg
    boot tcg max || { log "the guest did not finish (see $work/console.log)"; exit 1; }
fi
python3 - "$work/console.log" "$accel" "nvmed ${NVMED_ARGS:-(defaults)}, nvmed-tcp ${TCP_ARGS:-(defaults)}" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"BLKBENCH (\S+) (\S+) qd=(\d+) iops=(\d+) cpu_s=\S+ cpu_us_per_io=([\d.]+)", line)
    if m:
        rows[(m[1], m[2], int(m[3]))] = (int(m[4]), float(m[5]))
print(f"\nguest: 2 vCPUs ({sys.argv[2]}), kernel nvme-tcp initiator over loopback, 4 KiB random I/O; options: {sys.argv[3]}")
print(f"{'workload':<16}{'nvmed-tcp IOPS':>15}{'nvmet-tcp IOPS':>15}{'ratio':>7}{'CPU us/IO nvmed':>17}{'CPU us/IO nvmet':>17}")
for rw in ("randread", "randwrite"):
    for qd in (1, 32):
        a, b = rows.get(("nvmed-tcp", rw, qd)), rows.get(("nvmet-tcp", rw, qd))
        if not a or not b:
            print(f"{rw} qd{qd}: missing"); continue
        print(f"{rw + ' qd' + str(qd):<16}{a[0]:>15}{b[0]:>15}{a[0] / b[0]:>7.2f}{a[1]:>17.1f}{b[1]:>17.1f}")
PY
