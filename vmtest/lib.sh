# Shared by the VM tests (sourced, not run): vmtest/run.sh (nvmed on QEMU's NVMe controller
# through VFIO) and vmtest/vhost.sh (vhost-user-blk backends serving real guests).
#   vm_packages [CMD:PACKAGE ...]  install QEMU, busybox, cpio, kmod (and the extras) if missing
#   vm_kernel                      Debian's linux-image-amd64, decompressed once to an ELF vmlinux:
#                                  sets vm_ver, vm_vmlinux, vm_mods (the modules tree)
#   vm_static_build CARGO-ARGS     static release binaries (own target dir): sets vm_bins
#   vm_root DIR                    an initramfs tree with busybox and its applet links
#   vm_modules DIR MODULE...       copy kernel modules (decompressed) to DIR/lib/modules/NAME.ko
#   vm_copy_dynamic DIR FILE...    copy dynamic executables and every library ldd names, same paths
#   vm_pack DIR OUT                pack DIR into a gzip'd newc cpio
# The caller sets $top (repository root) and defines log().

vm_kdir="$top/target/vmtest" # kernel cache, shared by both tests

vm_packages() {
    local need=() p
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    # (grep without -q reads all of the list: with pipefail, -q could make busybox die of SIGPIPE)
    [ -x /bin/busybox ] && /bin/busybox --list | grep -x su >/dev/null || need+=(busybox-static)
    command -v cpio >/dev/null || need+=(cpio)
    command -v depmod >/dev/null || need+=(kmod)
    for p in "$@"; do
        PATH=$PATH:/usr/sbin:/sbin command -v "${p%%:*}" >/dev/null || need+=("${p#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

vm_kernel() {
    mkdir -p "$vm_kdir"
    if [ ! -f "$vm_kdir/kernel.ok" ]; then
        apt-cache policy linux-image-amd64 | grep -q 'Candidate: [0-9]' || apt-get update -qq
        local pkg
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
        log "fetching $pkg"
        rm -rf "$vm_kdir/kpkg" && mkdir -p "$vm_kdir/kpkg"
        (cd "$vm_kdir/kpkg" && apt-get download "$pkg" >/dev/null && dpkg -x ./*.deb tree)
        local v
        v=$(ls "$vm_kdir/kpkg/tree/lib/modules")
        python3 - "$vm_kdir/kpkg/tree/boot/vmlinuz-$v" "$vm_kdir/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
i = data.find(b'\xfd7zXZ\x00')
out = lzma.LZMADecompressor().decompress(data[i:]) if i >= 0 else b''
if out[:4] == b'\x7fELF':
    open(sys.argv[2], 'wb').write(out)
else:
    open(sys.argv[2], 'wb').write(data)  # boot the bzImage as it is
PY
        echo "$v" > "$vm_kdir/kernel.ok"
    fi
    vm_ver=$(cat "$vm_kdir/kernel.ok")
    vm_mods="$vm_kdir/kpkg/tree/lib/modules/$vm_ver"
    vm_vmlinux="$vm_kdir/vmlinux"
}

vm_static_build() {
    RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$top/target/vmtest-build" \
        cargo build --release --target x86_64-unknown-linux-gnu -q "$@"
    vm_bins="$top/target/vmtest-build/x86_64-unknown-linux-gnu/release"
}

vm_root() {
    local root=$1 a
    rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,etc,mnt,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
    echo "root:x:0:0::/root:/bin/sh" > "$root/etc/passwd"
    echo "root:x:0:" > "$root/etc/group"
}

vm_modules() {
    local root=$1 m f
    shift
    for m in "$@"; do
        f=$(find "$vm_mods" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
        [ -n "$f" ] || { log "module $m not found in $vm_ver"; return 1; }
        case "$f" in
            *.xz) python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$root/lib/modules/$m.ko" ;;
            *) cp "$f" "$root/lib/modules/$m.ko" ;;
        esac
    done
}

vm_copy_dynamic() {
    local root=$1 f lib
    shift
    for f in "$@"; do
        mkdir -p "$root$(dirname "$f")"
        rm -f "$root$f" # may be a busybox applet link: never write through it
        cp -L "$f" "$root$f"
        for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
            [ -e "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
}

vm_pack() {
    (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1 > "$2")
}
