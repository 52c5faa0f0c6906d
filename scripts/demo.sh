#!/usr/bin/env bash
# The main job: start the nvmed broker on the emulated NVMe controller and run client
# workloads against it (quickstart, the guest-RAM example and a verified ringbench load), then
# stop it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin nvmed --bin ringbench --examples
dir=$(mktemp -d)
sock="$dir/nvmed.sock"
./target/release/nvmed --emulate --size 1G --socket "$sock" > "$dir/ready" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q ready "$dir/ready" 2>/dev/null && break; sleep 0.05; done

echo "== quickstart"
./target/release/examples/quickstart "$sock"
echo "== guest RAM"
./target/release/examples/guest_ram "$sock"

echo "== ringbench: 2 clients, 4 KiB random read/write with verification, QD32, 3 s"
./target/release/ringbench --socket "$sock" --rw randrw --bs 4k --iodepth 32 --numjobs 2 --runtime 3 --verify --size 512M

kill -TERM $pid
wait $pid
echo "== broker stopped cleanly"
