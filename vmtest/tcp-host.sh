# Sourced by vmtest/run.sh while it builds the initramfs ($root, with vm_* from lib.sh): adds what
# the nvmed-tcp scenario (vmtest/tcp.sh, run by init.sh) needs: nvmed-tcp and blkcheck, the
# guest kernel's NVMe/TCP initiator and ext4 modules, mke2fs/e2fsck, nvme-cli (for discovery),
# and the scenario itself.
vm_packages mke2fs:e2fsprogs nvme:nvme-cli
# (run.sh builds nvmed-tcp and blkcheck with the other static binaries.)
tcp_mods="crc32c_generic nvme-fabrics nvme-tcp crc16 mbcache jbd2 ext4"
vm_modules "$root" $tcp_mods
echo "$tcp_mods" > "$root/modules.tcp"
cp "$vm_bins/nvmed-tcp" "$vm_bins/blkcheck" "$root/bin/"
vm_copy_dynamic "$root" "$(PATH=$PATH:/sbin:/usr/sbin command -v mke2fs)" "$(PATH=$PATH:/sbin:/usr/sbin command -v e2fsck)" \
    "$(PATH=$PATH:/sbin:/usr/sbin command -v nvme)"
cp vmtest/tcp.sh "$root/tcp.sh"
