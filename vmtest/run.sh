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

# 1. Packages.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx su || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. Guest kernel (Debian's current linux-image-amd64), decompressed once to an ELF for fast boots.
if [ ! -f "$work/kernel.ok" ]; then
    apt-cache policy linux-image-amd64 | grep -q 'Candidate: [0-9]' || apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    log "fetching $pkg"
    rm -rf "$work/kpkg" && mkdir -p "$work/kpkg"
    (cd "$work/kpkg" && apt-get download "$pkg" >/dev/null && dpkg -x ./*.deb tree)
    ver=$(ls "$work/kpkg/tree/lib/modules")
    python3 - "$work/kpkg/tree/boot/vmlinuz-$ver" "$work/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
i = data.find(b'\xfd7zXZ\x00')
out = lzma.LZMADecompressor().decompress(data[i:]) if i >= 0 else b''
if out[:4] == b'\x7fELF':
    open(sys.argv[2], 'wb').write(out)
else:
    open(sys.argv[2], 'wb').write(data)  # boot the bzImage as it is
PY
    echo "$ver" > "$work/kernel.ok"
fi
ver=$(cat "$work/kernel.ok")
mods="$work/kpkg/tree/lib/modules/$ver"

# 3. Static binaries.
log "building static binaries"
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$top/target/vmtest-build" \
    cargo build --release --target x86_64-unknown-linux-gnu -q \
    -p nvmed-server --bin nvmed -p nvmed-vmtest --bin vmcheck -p ringbench --bin ringbench
bins="$top/target/vmtest-build/x86_64-unknown-linux-gnu/release"

# 4. Initramfs.
disk_bytes=$((64 << 20))
root="$work/root"
rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
vfio_mods="irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci"
nvme_mods="crct10dif_common crct10dif_generic crc-t10dif crc64 crc64_rocksoft_generic crc64-rocksoft t10-pi nvme-core nvme"
for m in $vfio_mods $nvme_mods; do
    f=$(find "$mods" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
    [ -n "$f" ] || { log "module $m not found in $ver"; exit 1; }
    case "$f" in
        *.xz) python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
echo "$vfio_mods" > "$root/modules.vfio"
echo "$nvme_mods" > "$root/modules.nvme"
echo "$disk_bytes" > "$root/disk_bytes"
echo "root:x:0:0::/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
cp "$bins/nvmed" "$bins/vmcheck" "$bins/ringbench" "$root/bin/"
cp vmtest/init.sh "$root/init" && chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/initrd.gz")

# 5. Boot once, run everything.
rm -f "$work/disk.img" "$work/disk2.img" "$work"/mx-*.img
truncate -s "$disk_bytes" "$work/disk.img"
truncate -s "$disk_bytes" "$work/disk2.img"
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
log "booting (software emulation)"
start=$(date +%s)
set +e
timeout 900 qemu-system-x86_64 -machine q35,kernel-irqchip=split,accel=tcg -cpu max -m 1024 -smp 2 \
    -nographic -no-reboot -device intel-iommu,intremap=on \
    -kernel "$work/vmlinux" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 intel_iommu=on iommu=pt quiet panic=-1" \
    -drive file="$work/disk.img",if=none,id=nvm,format=raw -device nvme,serial=nvmed0,drive=nvm,addr=03.0 \
    -drive file="$work/disk2.img",if=none,id=nvm2,format=raw -device nvme,serial=kernel0,drive=nvm2,addr=04.0 \
    "${matrix[@]}" \
    < /dev/null 2>&1 | tr -d '\r' | tee "$work/console.log" | grep --line-buffered -E 'VMTEST|  \||VMCHECK|panic|Kernel'
rc=${PIPESTATUS[0]}
set -e
log "guest ran $(( $(date +%s) - start )) s (qemu exit $rc)"

# 6. Verdict.
grep -aq 'VMTEST DONE failed=0' "$work/console.log" || { log "FAILED (see $work/console.log)"; exit 1; }
if grep -aq 'VMTEST FAIL' "$work/console.log"; then log "FAILED"; exit 1; fi
"$bins/vmcheck" check-file --file "$work/disk.img" --offset 50331648 --len 65536 --seed 6 \
    || { log "the data nvmed wrote is not on the controller's disk image"; exit 1; }
passed=$(grep -ac 'VMTEST PASS' "$work/console.log")
log "all scenarios passed"
echo "vmtest: $passed passed, 0 failed"
