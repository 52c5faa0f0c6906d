#!/usr/bin/env bash
# fio on nvmed (the external engine) against two peers measured in the same run (not a test):
#  a. fio --ioengine=io_uring, O_DIRECT with registered file and buffers, on a tmpfs file: the
#     same peer as BENCHMARKS.md section 2 (what a user would otherwise use for a RAM-backed file);
#  b. ringbench on the same nvmed with the same workload: the two load tools should agree (the
#     fio engine adds fio's own per-I/O work, not a different path through nvmed).
# nvmed runs as its own process (emulated controller, memory, 256 MiB, one I/O thread) for both
# fio and ringbench. 4 KiB random reads and writes at QD1 and QD32, one job.
# Usage: bash scripts/fio_bench.sh [seconds-per-run] [repetitions of the fio vs ringbench pair]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
reps=${2:-3}
tdir=${CARGO_TARGET_DIR:-target}
cargo build --release -p ringbench -p nvmed-server --bin nvmed --bin ringbench >/dev/null 2>&1
bash scripts/build_capi.sh --release >/dev/null 2>&1
engine=$(cd "$tdir/release" && pwd)/libfio_nvmed.so
rb=$tdir/release/ringbench
tmp=$(mktemp -d /dev/shm/nvmed-fio-bench.XXXXXX 2>/dev/null || mktemp -d)
nvmed_pid=
trap 'kill $nvmed_pid 2>/dev/null || true; rm -rf "$tmp"' EXIT

"$tdir/release/nvmed" --emulate --size 256M --socket "$tmp/nvmed.sock" >"$tmp/ready" 2>/dev/null &
nvmed_pid=$!
for _ in $(seq 100); do grep -q ready "$tmp/ready" 2>/dev/null && break; sleep 0.05; done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)," \
    "load $(cut -d' ' -f1-3 /proc/loadavg); $(fio --version)"
echo "machine state: $("$rb" --pingpong 0.5 | sed 's/^ringbench: //')"
echo "each figure: one ${secs} s run (fio and ringbench on nvmed: the best of $reps alternating runs), 4 KiB, one job;" \
    "nvmed: separate process, emulated memory namespace, one I/O thread"

fio_run() {
    fio --name=bench --bs=4k --size=256m --time_based --runtime="$secs" --norandommap --randrepeat=0 \
        --lat_percentiles=1 --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p'
}
# "IOPS p50-latency-ns" of a fio JSON report (submission to completion, as ringbench measures).
fio_iops() {
    python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
d = j["read"] if j["read"]["iops"] >= j["write"]["iops"] else j["write"]
print(j["read"]["iops"] + j["write"]["iops"], d["lat_ns"]["percentile"]["50.000000"])'
}
rb_iops() { python3 -c 'import json,sys; t=json.load(sys.stdin)["total"]; print(t["iops"], t["latency"]["p50_ns"])'; }

# tmpfs file for io_uring, written once.
fio --name=layout --filename="$tmp/f.img" --size=256m --rw=write --bs=1m --output=/dev/null

printf '\n| workload | fio on nvmed | fio on nvmed, batched | fio on nvmed, busy_poll | ringbench on nvmed | fio / ringbench: IOPS (batched), p50 | fio io_uring O_DIRECT tmpfs | fio nvmed / io_uring: IOPS, p50 | fio null engine |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
best() { if python3 -c 'import sys; sys.exit(0 if float(sys.argv[2].split()[0]) > float(sys.argv[1].split()[0]) else 1)' "$1" "$2"; then echo "$2"; else echo "$1"; fi; }
nvfio() { fio_run --ioengine=external:"$engine" --filename="$tmp/nvmed.sock" "$@" | fio_iops; }
for rw in randread randwrite; do
    for qd in 1 32; do
        # fio and ringbench alternate $reps times; the best run of each counts (on a shared machine a
        # run loses most to CPUs taken by others, so the best is the least disturbed).
        nv="0 0" rbi="0 0"
        for _ in $(seq "$reps"); do
            nv=$(best "$nv" "$(nvfio --rw=$rw --iodepth=$qd)")
            rbi=$(best "$rbi" "$("$rb" --socket "$tmp/nvmed.sock" --rw $rw --bs 4k --iodepth $qd --size 256M \
                --runtime "$secs" --output-format json | rb_iops)")
        done
        # fio's default submits each I/O alone (iodepth_batch_submit=1); batched: as ringbench does.
        if [ $qd -gt 1 ]; then
            nvb=$(nvfio --rw=$rw --iodepth=$qd --iodepth_batch_submit=16 --iodepth_batch_complete_max=$qd)
        else
            nvb=$nv
        fi
        nvp=$(nvfio --busy_poll --rw=$rw --iodepth=$qd)
        iu=$(fio_run --ioengine=io_uring --filename="$tmp/f.img" --direct=1 --registerfiles --fixedbufs \
            --rw=$rw --iodepth=$qd | fio_iops)
        null=$(fio_run --ioengine=null --rw=$rw --iodepth=$qd | fio_iops)
        python3 - "$rw" "$qd" $nv $nvb $nvp $rbi $iu $null <<'PY'
import sys
rw, qd = sys.argv[1], sys.argv[2]
nv, nvl, nvb, _, nvp, _, rb, rbl, iu, iul, null, _ = map(float, sys.argv[3:])
k = lambda v: f"{v/1e3:.1f}k"
us = lambda v: f"{v/1e3:.1f} us"
batched = f"{k(nvb)}" if qd != "1" else "(same)"
print(f"| {rw} QD{qd} | {k(nv)}, p50 {us(nvl)} | {batched} | {k(nvp)} | {k(rb)}, p50 {us(rbl)} | "
      f"{nv/rb:.2f} ({nvb/rb:.2f}), {nvl/rbl:.2f} | {k(iu)}, p50 {us(iul)} | {nv/iu:.2f}x, {nvl/iul:.2f}x | {k(null)} |")
PY
    done
done
echo "(IOPS and median latency; batched: --iodepth_batch_submit=16 --iodepth_batch_complete_max=QD; the null engine is fio's own ceiling)"
