#!/usr/bin/env bash
# Benchmarks that print ratios measured in one run, against a peer measured on the same machine
# at the same time. They are not tests: shared machines are noisy, so nothing here is asserted.
#  1. Ring overhead: nvmed no-op round trips vs io_uring NOPs (QD1 latency, QD32/QD128 throughput).
#  2. Data path: nvmed on a memory-backed emulated controller vs io_uring O_DIRECT on a tmpfs file,
#     4 KiB random read/write at QD1 and QD32.
#  3. (--vm) In a VM: nvmed on QEMU's NVMe controller through VFIO vs the kernel nvme driver.
#  4. Zero copy: the device moves every data byte by DMA (checked by a test).
#  5. Idle: broker CPU with connected, idle clients.
#  6. (--vhost) In a VM: vhost-user-blk, nvmed-vhost (on nvmed's emulated memory namespace) vs
#     qemu-storage-daemon (raw file on tmpfs), measured in the guest (vmtest/vhost.sh --bench;
#     BENCH_A=qsd|nvmed-vhost picks the first column, default $BACKEND or qsd).
#  7. (--scale) Client scaling: nvmed-nop and 4 KiB randread throughput for 1..64 clients with 1 and
#     2 broker I/O threads, plus deep-batch nop (scripts/scale_bench.py; table, SVG chart, JSON).
#  8. (--qos, as root) QoS between tenants (uids 1000 and 1001) on a modelled device: a QD1 reader's
#     latency beside a QD256 writer, iops/read-mbps limit accuracy, a 1:3 weight split
#     (scripts/qos_bench.py; fixed run lengths, about 100 s; tables, SVG chart, JSON).
# Usage: bash scripts/bench.sh [seconds-per-run] [--vm] [--vhost] [--scale] [--qos]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=3 vm=0 vhost=0 scale=0 qos=0
for a in "$@"; do
    case $a in
        --vm) vm=1 ;;
        --vhost) vhost=1 ;;
        --scale) scale=1 ;;
        --qos) qos=1 ;;
        *[!0-9.]* | "") echo "usage: bash scripts/bench.sh [seconds-per-run] [--vm] [--vhost] [--scale] [--qos]" >&2; exit 2 ;;
        *) secs=$a ;;
    esac
done
cargo build --release -p ringbench -p nvmed-server --bin ringbench --bin nvmed >/dev/null 2>&1
tdir=${CARGO_TARGET_DIR:-target}
rb=$tdir/release/ringbench
tmp=$(mktemp -d /dev/shm/nvmed-bench.XXXXXX 2>/dev/null || mktemp -d)
trap 'kill $nvmed_pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
nvmed_pid=

field() { python3 -c "import json,sys; r=json.load(sys.stdin); print(r$1)"; }
run() { "$rb" --runtime "$secs" --output-format json "$@"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)," \
    "load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "machine state: $("$rb" --pingpong 0.5 | sed 's/^ringbench: //')"
echo "each figure: one ${secs} s run; nvmed runs its broker in-process (--embedded), one client thread"
echo
echo "1. ring overhead (no device work): nvmed-nop vs io_uring-nop"
# Where CPUs 0 and 1 may both be used, the client on CPU 0 and the broker's I/O thread on CPU 1 (as a
# deployment gives the broker its own core with --cpus); io_uring's one thread on CPU 0 too.
pin_nvmed=() pin_uring=()
if [ "$(nproc)" -ge 2 ] && taskset -c 0 true 2>/dev/null && taskset -c 1 true 2>/dev/null; then
    pin_nvmed=(--broker-cpus 1 --job-cpus 0) pin_uring=(--job-cpus 0)
    echo "  (client pinned to CPU 0, broker I/O thread to CPU 1)"
    # What a ring whose requests and completions travel in separate cache lines costs with no
    # software at all (C, no nvmed code; needs CPUs 0 and 1): see BENCHMARKS.md section 1.
    if command -v cc >/dev/null && cc -O2 -pthread scripts/ring_floor.c -o "$tdir/ring_floor" 2>/dev/null; then
        echo "  scripts/ring_floor.c: $("$tdir/ring_floor" 1000000)"
    fi
fi
for qd in 1 32 128; do
    a=$(run --embedded --null --engine nvmed-nop --iodepth $qd ${pin_nvmed[@]+"${pin_nvmed[@]}"})
    b=$(run --engine io-uring-nop --iodepth $qd ${pin_uring[@]+"${pin_uring[@]}"})
    python3 - "$qd" "$a" "$b" <<'PY'
import json, sys
qd, a, b = sys.argv[1], json.loads(sys.argv[2])["total"], json.loads(sys.argv[3])["total"]
print(f"  QD{qd:<4} nvmed {a['iops']/1e6:6.2f} M ops/s, mean {a['latency']['mean_ns']:7.0f} ns | "
      f"io_uring {b['iops']/1e6:6.2f} M ops/s, mean {b['latency']['mean_ns']:7.0f} ns | "
      f"throughput x{a['iops']/b['iops']:.2f}, latency x{a['latency']['mean_ns']/b['latency']['mean_ns']:.2f}")
PY
done
echo
echo "2. data path, 4 KiB random I/O: nvmed (emulated controller, memory) vs io_uring O_DIRECT on tmpfs ($tmp)"
for rw in randread randwrite; do
    for qd in 1 32; do
        a=$(run --embedded --size 256M --rw $rw --iodepth $qd)
        b=$(run --engine io-uring --filename "$tmp/f.img" --size 256M --rw $rw --iodepth $qd)
        python3 - "$rw" "$qd" "$a" "$b" <<'PY'
import json, sys
rw, qd, a, b = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])["total"], json.loads(sys.argv[4])["total"]
print(f"  {rw:<9} QD{qd:<3} nvmed {a['iops']/1e3:8.1f} kIOPS p99 {a['latency']['p99_ns']/1e3:7.1f} us | "
      f"io_uring {b['iops']/1e3:8.1f} kIOPS p99 {b['latency']['p99_ns']/1e3:7.1f} us | x{a['iops']/b['iops']:.2f}")
PY
    done
done
echo
if [ $vm = 1 ]; then
    echo "3. in a VM (software emulation, same boot): nvmed on VFIO vs the kernel nvme driver"
    bash vmtest/run.sh 2>&1 | grep 'VMTEST BENCH' | sed 's/^VMTEST BENCH /  /'
else
    echo "3. in a VM: run 'bash scripts/bench.sh $secs --vm' (or see the VM test's log: VMTEST BENCH lines)"
fi
echo
echo "4. zero copy: every data byte moved by device DMA, none by the broker"
if cargo test -q -p nvmed-server --test data_path data_moves_by_device_dma_only >/dev/null 2>&1; then
    echo "  data_moves_by_device_dma_only: pass (device DMA bytes == bytes read + written)"
else
    echo "  data_moves_by_device_dma_only: FAILED"
fi
echo
echo "5. idle: broker CPU with 8 connected clients doing nothing"
"$tdir/release/nvmed" --emulate --size 64M --socket "$tmp/nvmed.sock" > "$tmp/ready" 2>/dev/null &
nvmed_pid=$!
for _ in $(seq 100); do grep -q ready "$tmp/ready" 2>/dev/null && break; sleep 0.05; done
"$rb" --socket "$tmp/nvmed.sock" --idle 3 --numjobs 8 | sed 's/^/  /'
echo
if [ $vhost = 1 ]; then
    echo "6. in a VM (software emulation, same boot): vhost-user-blk, 4 KiB random I/O measured in the guest"
    bash vmtest/vhost.sh --bench "$secs" 2>&1 | grep -v '^vhosttest: building'
else
    echo "6. vhost-user-blk in a VM: run 'bash scripts/bench.sh $secs --vhost' (or 'bash vmtest/vhost.sh --bench $secs')"
fi
echo
if [ $scale = 1 ]; then
    echo "7. client scaling (1..64 clients, 1 and 2 broker I/O threads): scripts/scale_bench.py"
    python3 scripts/scale_bench.py --quiet --secs "$secs" --ringbench "$rb" 2>&1 | sed 's/^/  /'
else
    echo "7. client scaling: run 'bash scripts/bench.sh $secs --scale' (or 'python3 scripts/scale_bench.py --secs $secs')"
fi
echo
if [ $qos = 1 ]; then
    echo "8. QoS between tenants on a modelled device (latency isolation, limits, weights): scripts/qos_bench.py"
    python3 scripts/qos_bench.py --quiet --ringbench "$rb" --nvmed "$tdir/release/nvmed" 2>&1 | sed 's/^/  /'
else
    echo "8. QoS between tenants: run 'sudo bash scripts/bench.sh $secs --qos' (or 'sudo python3 scripts/qos_bench.py')"
fi
