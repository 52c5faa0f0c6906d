#!/usr/bin/env bash
# Benchmarks that print ratios measured in one run (not tests: numbers on shared machines are noisy).
#  1. Ring overhead: nvmed no-op round trips vs io_uring NOPs, QD1 latency and QD32/QD128 throughput.
#  2. Data path: nvmed on a memory-backed emulated controller vs io_uring O_DIRECT on a tmpfs file,
#     4 KiB random read/write at QD1 and QD32.
# Usage: bash scripts/bench.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
cargo build --release -p ringbench >/dev/null
rb=./target/release/ringbench
tmp=$(mktemp -d /dev/shm/nvmed-bench.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$tmp"' EXIT

field() { python3 -c "import json,sys; r=json.load(sys.stdin); print(r['total']$1)"; }
run() { "$rb" --runtime "$secs" --output-format json "$@"; }

echo "machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
echo "1. ring overhead (no device work)"
for qd in 1 32 128; do
    a=$(run --embedded --null --engine nvmed-nop --iodepth $qd)
    b=$(run --engine io-uring-nop --iodepth $qd)
    na=$(echo "$a" | field "['latency']['mean_ns']"); nb=$(echo "$b" | field "['latency']['mean_ns']")
    ia=$(echo "$a" | field "['iops']"); ib=$(echo "$b" | field "['iops']")
    python3 -c "print(f'  QD{$qd:<4} nvmed-nop {$ia/1e6:6.2f} M ops/s mean {$na:8.0f} ns | io_uring-nop {$ib/1e6:6.2f} M ops/s mean {$nb:8.0f} ns | nvmed/io_uring ops ratio {$ia/$ib:.2f}x, latency ratio {$na/$nb:.2f}')"
done
echo
echo "2. data path, 4 KiB random I/O (nvmed: emulated controller in memory; kernel: io_uring O_DIRECT on $tmp)"
for rw in randread randwrite; do
    for qd in 1 32; do
        a=$(run --embedded --size 256M --rw $rw --iodepth $qd)
        b=$(run --engine io-uring --filename "$tmp/f.img" --size 256M --rw $rw --iodepth $qd)
        ia=$(echo "$a" | field "['iops']"); ib=$(echo "$b" | field "['iops']")
        python3 -c "print(f'  {\"$rw\":<9} QD{$qd:<3} nvmed {$ia/1e3:8.1f} kIOPS | io_uring {$ib/1e3:8.1f} kIOPS | ratio {$ia/$ib:.2f}x')"
    done
done
