#!/usr/bin/env bash
# The VM test: nvmed drives QEMU's emulated NVMe controller (behind an emulated Intel IOMMU,
# bound to vfio-pci inside a guest) through its VFIO backend. Installs what it needs, builds
# static binaries, packs a busybox initramfs, boots once, runs every scenario, and exits
# non-zero on any failure or timeout. See ../shared/docs/vm-recipe.md for the facts it relies on.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
work="$top/target/vmtest"
mkdir -p "$work"
log() { echo "vmtest: $*"; }

# 1. Packages, 2. guest kernel (shared with vhost.sh, see lib.sh).
. vmtest/lib.sh
vm_packages
vm_kernel

# 3. Static binaries.
log "building static binaries"
vm_static_build -p nvmed-server --bin nvmed -p nvmed-vmtest --bin vmcheck -p ringbench --bin ringbench \
    -p nvmectl --bin nvmectl -p nvmed-tcp --bin nvmed-tcp -p nvmed-vmtest --bin blkcheck
bins=$vm_bins

# 4. Initramfs.
disk_bytes=$((64 << 20))
extra_bytes=$((16 << 20))
root="$work/root"
vm_root "$root"
vfio_mods="irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci"
nvme_mods="crct10dif_common crct10dif_generic crc-t10dif crc64 crc64_rocksoft_generic crc64-rocksoft t10-pi nvme-core nvme"
vm_modules "$root" $vfio_mods $nvme_mods
echo "$vfio_mods" > "$root/modules.vfio"
echo "$nvme_mods" > "$root/modules.nvme"
echo "$disk_bytes" > "$root/disk_bytes"
echo "$extra_bytes" > "$root/extra_bytes"
cp "$bins/nvmed" "$bins/vmcheck" "$bins/ringbench" "$bins/nvmectl" "$root/bin/"
cp vmtest/init.sh "$root/init" && chmod +x "$root/init"
. vmtest/tcp-host.sh # the nvmed-tcp scenario's files (vmtest/tcp.sh, run by init.sh)
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/initrd.gz")

# 5. Boot once, run everything.
rm -f "$work/disk.img" "$work/disk2.img" "$work/disk3.img" "$work"/mx-*.img
truncate -s "$disk_bytes" "$work/disk.img"
truncate -s "$disk_bytes" "$work/disk2.img"
# A second, smaller controller for nvmed serving two controllers at once (scenario
# two-controllers-one-broker in init.sh, at 00:0d.0): its size tells its namespace apart.
truncate -s "$extra_bytes" "$work/disk3.img"
# The controller matrix (scenarios matrix-* in init.sh): more controllers on the same boot, each
# set up the way some real controllers differ, at 00:05.0 and up (init.sh expects these slots).
matrix=()
disk() { truncate -s "$2" "$work/mx-$1.img"; matrix+=(-drive "file=$work/mx-$1.img,if=none,id=mx-$1,format=raw"); }
ctrl() { matrix+=(-device "nvme,serial=mx-$1,addr=$2${3:+,$3}"); }
ns() { matrix+=(-device "nvme-ns,bus=mx-$1,drive=mx-$2,nsid=$3${4:+,$4}"); }
disk lba4k 32M;  ctrl lba4k 05.0 drive=mx-lba4k,logical_block_size=4096,physical_block_size=4096
disk mdts0 32M;  ctrl mdts0 06.0 drive=mx-mdts0,mdts=0
disk mdts1 32M;  ctrl mdts1 07.0 drive=mx-mdts1,mdts=1
disk msixbar 32M; ctrl msixbar 08.0 drive=mx-msixbar,msix-exclusive-bar=on
disk msix1 32M;  ctrl msix1 09.0 drive=mx-msix1,msix_qsize=1
disk two1 32M; disk two2 24M; ctrl two 0a.0 id=mx-two
ns two two1 1; ns two two2 2
disk mix1 32M; disk meta 8M; disk pi 8M; disk zoned 16M; ctrl mix 0b.0 id=mx-mix
ns mix mix1 1; ns mix meta 2 ms=8; ns mix pi 3 ms=8,pi=1; ns mix zoned 4 zoned=on,zoned.zone_size=4M
disk lba16k 8M;  ctrl lba16k 0c.0 drive=mx-lba16k,mdts=1,logical_block_size=16384,physical_block_size=16384
# The main controller, 00:03.0, offers 4 I/O queue pairs (QEMU's default is 64): nvmed
# --io-threads 2 takes one per I/O thread (scenario io-threads-two in init.sh).
log "booting (software emulation)"
start=$(date +%s)
set +e
timeout 900 qemu-system-x86_64 -machine q35,kernel-irqchip=split,accel=tcg -cpu max -m 1024 -smp 2 \
    -nographic -no-reboot -device intel-iommu,intremap=on \
    -kernel "$work/vmlinux" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 intel_iommu=on iommu=pt quiet panic=-1" \
    -drive file="$work/disk.img",if=none,id=nvm,format=raw -device nvme,serial=nvmed0,drive=nvm,addr=03.0,max_ioqpairs=4 \
    -drive file="$work/disk2.img",if=none,id=nvm2,format=raw -device nvme,serial=kernel0,drive=nvm2,addr=04.0 \
    "${matrix[@]}" \
    -drive file="$work/disk3.img",if=none,id=nvm3,format=raw -device nvme,serial=nvmed1,drive=nvm3,addr=0d.0 \
    < /dev/null 2>&1 | tr -d '\r' | tee "$work/console.log" | grep --line-buffered -E 'VMTEST|  \||VMCHECK|panic|Kernel'
rc=${PIPESTATUS[0]}
set -e
log "guest ran $(( $(date +%s) - start )) s (qemu exit $rc)"

# 6. Verdict.
grep -aq 'VMTEST DONE failed=0' "$work/console.log" || { log "FAILED (see $work/console.log)"; exit 1; }
if grep -aq 'VMTEST FAIL' "$work/console.log"; then log "FAILED"; exit 1; fi
"$bins/vmcheck" check-file --file "$work/disk.img" --offset 50331648 --len 65536 --seed 6 \
    || { log "the data nvmed wrote is not on the controller's disk image"; exit 1; }
# The pattern nvmed wrote to broker-wide namespace 2 while serving two controllers must be on
# the second controller's disk (00:0d.0, disk3.img), and not at that offset of the first one's.
"$bins/vmcheck" check-file --file "$work/disk3.img" --offset 8388608 --len 65536 --seed 12 \
    || { log "the data written to namespace 2 is not on the second controller's disk image"; exit 1; }
if "$bins/vmcheck" check-file --file "$work/disk.img" --offset 8388608 --len 65536 --seed 12 >/dev/null 2>&1; then
    log "the data written to namespace 2 is on the first controller's disk image"; exit 1
fi
passed=$(grep -ac 'VMTEST PASS' "$work/console.log")
log "all scenarios passed"
echo "vmtest: $passed passed, 0 failed"
