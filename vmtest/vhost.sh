#!/usr/bin/env bash
# The vhost-user-blk test: real QEMU guests (software emulation, memfd guest RAM shared with the
# backend) on vhost-user-blk backends, checked inside each guest (vhost-init.sh) and afterwards
# on the host against the backend's own storage (README.md, "The vhost-user-blk test").
#
#   bash vmtest/vhost.sh                 the test (what scripts/test.sh runs)
#   bash vmtest/vhost.sh --bench [SECS]  the benchmark (what scripts/bench.sh --vhost runs)
#
# Variables:
#   BACKEND=qsd|nvmed-vhost  the backend under test (default nvmed-vhost; qsd is QEMU's
#                            qemu-storage-daemon, a reference with the same socket interface).
#                            nvmed-vhost: `nvmed --emulate` (memory namespaces) on a scratch
#                            socket, one `nvmed-vhost --namespace N` per disk; the host reads the
#                            namespaces back through nvmed (vmcheck dump). qsd: one raw image
#                            file per "namespace" on tmpfs; the host reads the files.
#   RESTART_TEST=auto|1|0    the backend SIGKILLed and restarted under a verified guest load
#                            (QEMU reconnects: chardev reconnect=1). auto: on with nvmed-vhost,
#                            off with qsd (it does not resubmit requests in flight at the kill).
#   NVMED_VHOST=PATH         use this nvmed-vhost binary instead of building the workspace's.
#   RESTART_NVMED_ARGS="..." nvmed options for the restart scenario (default: an asynchronous
#                            device with 5 ms per command, so requests are in flight at the kill)
#   NVMED_ARGS="..."         more nvmed options (nvmed-vhost), e.g. "--emulator-mode async": the
#                            emulated controller then completes out of order, like hardware.
#   VHOST_ARGS="..."         more nvmed-vhost options, e.g. "--poll-us 50".
#   BENCH_A=...              benchmark: the backend measured against qsd (default: $BACKEND).
#   BENCH_B=qsd|nvmed-vhost  benchmark: the backend it is measured against (default qsd; nvmed-vhost
#                            with NVMED_VHOST_B=PATH compares two builds in one boot).
#   BENCH_ROUNDS=3           benchmark: runs per configuration (A and B alternating; medians).
#   BENCH_RW=randread,randwrite BENCH_QD=1,32 BENCH_QUEUES=1,2
#                            benchmark: the workloads, depths and queue counts to run (all by default).
#   ONLY=parallel|restart    run only the parallel guests (A, B, C) or only the restart scenario.
#   NVMED_KILL=0             in the restart scenario, do not also SIGKILL and restart nvmed.
#   KEEP=1                   keep the scratch directory (images, sockets) for inspection.
#
# Scenarios: guests A and B at once, each on its own namespace (2 queues each): size, queue
# count, ringbench-verified O_DIRECT random I/O (512 B to 1 MiB, QD1 to QD16, two pinned jobs
# using both queues), flush, discard, write zeroes, ext4 (mkfs, files, remount, fstrim, e2fsck
# clean), then a SHA-256 of the first $VHT_MIB MiB that the host compares with the namespace.
# Guest C at the same time on a read-only backend of a third namespace the host filled with
# random data: read-only flag, writes fail, reads return that data. With nvmed-vhost, each of the
# three backends' stats lines must show bounced_bytes=0 (zero-bounce-A/B/C: nvmed moved every
# byte of that page-aligned guest I/O by PRPs or SGLs, none through its bounce buffers). Then
# (RESTART_TEST) guest R on namespace 1: verified load while the backend is SIGKILLed and
# restarted, then nvmed itself (on a backing file; NVMED_KILL=0 skips it): the backend
# reconnects its one session for both queues.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
work="$top/target/vhosttest"
mkdir -p "$work"
log() { echo "vhosttest: $*"; }
. vmtest/lib.sh

BACKEND=${BACKEND:-nvmed-vhost}
RESTART_TEST=${RESTART_TEST:-auto}
VHT_MIB=${VHT_MIB:-16}
disk_size=256M
disk_bytes=$((256 << 20))
mode=test
secs=3
if [ "${1:-}" = --bench ]; then
    mode=bench
    secs=${2:-3}
fi
BENCH_A=${BENCH_A:-$BACKEND}
BENCH_B=${BENCH_B:-qsd}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
case $BACKEND in qsd | nvmed-vhost) ;; *) log "BACKEND must be qsd or nvmed-vhost"; exit 2 ;; esac
case $BENCH_A in qsd | nvmed-vhost) ;; *) log "BENCH_A must be qsd or nvmed-vhost"; exit 2 ;; esac
case $BENCH_B in qsd | nvmed-vhost) ;; *) log "BENCH_B must be qsd or nvmed-vhost"; exit 2 ;; esac
if [ "$RESTART_TEST" = auto ]; then
    if [ "$BACKEND" = nvmed-vhost ]; then RESTART_TEST=1; else RESTART_TEST=0; fi
fi
uses_nvmed=0
if [ "$BACKEND" = nvmed-vhost ] || { [ $mode = bench ] && [ "$BENCH_A$BENCH_B" != qsdqsd ]; }; then uses_nvmed=1; fi

# 1. Packages and the guest kernel (shared with vmtest/run.sh).
vm_packages qemu-storage-daemon:qemu-system-common mke2fs:e2fsprogs e2fsck:e2fsprogs blkdiscard:util-linux
vm_kernel

# 2. Static binaries (the same build as vmtest/run.sh), and nvmed-vhost.
log "building static binaries"
vm_static_build -p nvmed-server --bin nvmed -p nvmed-vmtest --bin vmcheck -p ringbench --bin ringbench
bins=$vm_bins
vhost_bin=${NVMED_VHOST:-}
if [ $uses_nvmed = 1 ] && [ -z "$vhost_bin" ]; then
    [ -f vhost/Cargo.toml ] || { log "BACKEND=nvmed-vhost but there is no vhost/ crate here (set NVMED_VHOST=PATH)"; exit 2; }
    pkg=$(sed -n 's/^name *= *"\(.*\)"/\1/p' vhost/Cargo.toml | head -1)
    vm_static_build -p "$pkg" --bin nvmed-vhost
    vhost_bin="$bins/nvmed-vhost"
fi

# 3. Initramfs: busybox, virtio-blk and ext4 modules, e2fsprogs and util-linux's blkdiscard
#    (dynamic: copied with their libraries), ringbench.
root="$work/root"
vm_root "$root"
virtio_mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
ext4_mods="crc16 mbcache jbd2 crc32c_generic ext4"
vm_modules "$root" $virtio_mods $ext4_mods
echo "$virtio_mods" > "$root/modules.virtio"
echo "$ext4_mods" > "$root/modules.ext4"
tools=()
for t in mke2fs e2fsck blkdiscard; do tools+=("$(readlink -f "$(PATH=$PATH:/usr/sbin:/sbin command -v $t)")"); done
vm_copy_dynamic "$root" "${tools[@]}"
ln -sf mke2fs "$root$(dirname "${tools[0]}")/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
cp "$bins/ringbench" "$root/bin/"
cp vmtest/vhost-init.sh "$root/init" && chmod +x "$root/init"
vm_pack "$root" "$work/initrd.gz"

# 4. Scratch: sockets, images (tmpfs), the broker.
scratch=$(mktemp -d /dev/shm/nvmed-vhosttest.XXXXXX 2>/dev/null || mktemp -d)
declare -A bpid=()   # backend id -> pid
declare -A bkind=()  # backend id -> qsd|nvmed-vhost
nvmed_pid=
qemu_pids=()
guests=()
cleanup() {
    local p
    for p in "${guests[@]}"; do [ -f "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")" 2>/dev/null || true; done
    for p in "${qemu_pids[@]}" "${bpid[@]}" $nvmed_pid; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] && log "scratch kept in $scratch" || rm -rf "$scratch"
}
trap cleanup EXIT

start_nvmed() { # namespaces
    # shellcheck disable=SC2086 # NVMED_ARGS is a list of options
    "$bins/nvmed" --emulate --namespaces "$1" --size $disk_size --socket "$scratch/nvmed.sock" ${NVMED_ARGS:-} \
        > "$scratch/nvmed.out" 2> "$work/nvmed.log" &
    nvmed_pid=$!
    for _ in $(seq 100); do grep -q ready "$scratch/nvmed.out" 2>/dev/null && return 0; sleep 0.1; done
    log "nvmed did not start:"; cat "$work/nvmed.log"; return 1
}

# backend_start KIND ID NSID QUEUES rw|ro [BINARY [OPTION...]]: serves namespace NSID (qsd: the
# image ns$NSID.img) on $scratch/ID.sock; BINARY: the nvmed-vhost to run (default $vhost_bin),
# OPTIONs: more nvmed-vhost options for this backend.
backend_start() {
    local kind=$1 id=$2 ns=$3 q=$4 rw=$5 bin=${6:-$vhost_bin} sock="$scratch/$2.sock"
    local extra=("${@:7}")
    rm -f "$sock"
    case $kind in
        qsd)
            local ro=off
            [ "$rw" = ro ] && ro=on
            [ -f "$scratch/ns$ns.img" ] || truncate -s $disk_size "$scratch/ns$ns.img"
            qemu-storage-daemon \
                --blockdev driver=file,node-name=file,filename="$scratch/ns$ns.img",discard=unmap,read-only=$ro \
                --blockdev driver=raw,node-name=raw,file=file,discard=unmap,read-only=$ro \
                --export type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,addr.path="$sock",writable=$([ $ro = on ] && echo off || echo on),num-queues="$q" \
                >> "$work/$id.backend.log" 2>&1 &
            ;;
        nvmed-vhost)
            local flag=()
            [ "$rw" = ro ] && flag=(--read-only)
            # shellcheck disable=SC2086 # VHOST_ARGS is a list of options
            "$bin" --socket "$sock" --nvmed "$scratch/nvmed.sock" --namespace "$ns" --num-queues "$q" "${flag[@]}" \
                "${extra[@]}" ${VHOST_ARGS:-} >> "$work/$id.backend.log" 2>&1 &
            ;;
    esac
    bpid[$id]=$!
    bkind[$id]=$kind
    for _ in $(seq 100); do
        [ -S "$sock" ] && return 0
        kill -0 "${bpid[$id]}" 2>/dev/null || break
        sleep 0.05
    done
    log "backend $id ($kind) did not come up:"; cat "$work/$id.backend.log"; return 1
}
backend_stop() {
    kill -TERM "${bpid[$1]}" 2>/dev/null || true
    wait "${bpid[$1]}" 2>/dev/null || true
    unset "bpid[$1]"
}
# The first MIB MiB of a namespace, as the backend stores it.
host_sha() { # kind nsid mib
    case $1 in
        qsd) dd if="$scratch/ns$2.img" bs=1M count="$3" 2>/dev/null ;;
        nvmed-vhost) "$bins/vmcheck" --socket "$scratch/nvmed.sock" --nsid "$2" dump --len $(($3 << 20)) ;;
    esac | sha256sum | cut -d' ' -f1
}
host_load() { # kind nsid file
    case $1 in
        qsd) truncate -s $disk_size "$scratch/ns$2.img" && dd if="$3" of="$scratch/ns$2.img" conv=notrunc 2>/dev/null ;;
        nvmed-vhost) "$bins/vmcheck" --socket "$scratch/nvmed.sock" --nsid "$2" load --file "$3" >/dev/null ;;
    esac
}

# qemu_args SMP CMDLINE ID:QUEUES...: a guest on the given backends (vda, vdb, ... in that order).
qemu_args() {
    local smp=$1 cmdline=$2 i=0 d
    shift 2
    qargs=(-machine q35,accel=tcg,memory-backend=mem -cpu max -smp "$smp" -m 512
        -object memory-backend-memfd,id=mem,size=512M,share=on
        -nographic -no-reboot -nodefaults -serial stdio
        -kernel "$vm_vmlinux" -initrd "$work/initrd.gz"
        -append "console=ttyS0 quiet panic=-1 $cmdline")
    for d in "$@"; do
        qargs+=(-chardev "socket,id=c$i,path=$scratch/${d%%:*}.sock,reconnect=1"
            -device "vhost-user-blk-pci,chardev=c$i,num-queues=${d#*:},addr=1$i.0")
        i=$((i + 1))
    done
}
# boot NAME TIMEOUT SMP CMDLINE DISKS...: in the background, console in $work/NAME.log, QEMU's
# exit status in $work/NAME.rc.
boot() {
    local name=$1 tmo=$2
    shift 2
    qemu_args "$@"
    qargs+=(-pidfile "$work/$name.pid")
    rm -f "$work/$name.rc" "$work/$name.pid" "$work/$name.log" # a log of an earlier run must not be read as this one's
    ( set +e; timeout "$tmo" qemu-system-x86_64 "${qargs[@]}" < /dev/null 2>&1 \
        | sed -u 's/\r//g; s/Booting from ROM\.\./&\n/' > "$work/$name.log"
      echo "${PIPESTATUS[0]}" > "$work/$name.rc" ) &
    qemu_pids+=($!)
    guests+=("$name")
}

failed=0
passed=0
host_check() { # name, command...
    local check=$1
    shift
    if "$@"; then log "PASS $check"; passed=$((passed + 1)); else log "FAIL $check"; failed=$((failed + 1)); fi
}
# A guest's verdict: it finished, reported every check passed, and its disk checksum is what
# the backend stores (checked while the backend's storage is still there).
guest_verdict() { # name kind nsid
    local g=$1 rc
    rc=$(cat "$work/$g.rc" 2>/dev/null || echo "?")
    grep -a -E 'VHOSTTEST|^  \||Kernel panic|qemu-system' "$work/$g.log" | sed "s/^/  [$g] /" || true
    log "guest $g: qemu exit $rc"
    guest_ok() {
        [ "$rc" = 0 ] || { log "guest $g did not finish (qemu exit $rc, 124 = timeout); log: $work/$g.log"; return 1; }
        grep -aq 'VHOSTTEST DONE failed=0' "$work/$g.log" && ! grep -aq 'VHOSTTEST FAIL' "$work/$g.log"
    }
    host_check "guest-$g-all-checks" guest_ok
    sha_matches() { # kind nsid
        local line want got
        line=$(grep -a 'VHOSTTEST SHA256' "$work/$g.log" | tail -1)
        [ -n "$line" ] || { log "guest $g printed no checksum"; return 1; }
        want=${line##* }
        got=$(host_sha "$1" "$2" "$VHT_MIB")
        log "guest $g saw $want; the backend's storage has $got (first $VHT_MIB MiB, namespace $2)"
        [ "$want" = "$got" ]
    }
    host_check "guest-$g-data-on-host-equals-guest-view" sha_matches "$2" "$3"
}

common="vht_bytes=$disk_bytes vht_mib=$VHT_MIB"
# nvmed-vhost offers flush, discard and write zeroes: the guest must see all three.
[ "$BACKEND" = nvmed-vhost ] && common="$common vht_require=1"

# Guests A and B (read-write, 2 queues each, own namespace) and C (read-only, 1 queue) at once.
scenario_parallel() {
    # Namespace 3 gets random data first: the read-only guest must read exactly that.
    head -c $((VHT_MIB << 20)) /dev/urandom > "$scratch/ro-pattern"
    local ro_sha t0 g
    ro_sha=$(sha256sum < "$scratch/ro-pattern" | cut -d' ' -f1)
    host_load "$BACKEND" 3 "$scratch/ro-pattern"
    # Fresh logs: the zero-bounce check reads every stats line of this run.
    for g in A B C; do : > "$work/$g.backend.log"; done
    backend_start "$BACKEND" A 1 2 rw
    # B's two queues share one thread (--queue-threads 1), unless VHOST_ARGS asks for polling.
    if [ "$BACKEND" = nvmed-vhost ] && [[ "${VHOST_ARGS:-}" != *--poll-us* ]]; then
        backend_start "$BACKEND" B 2 2 rw "$vhost_bin" --queue-threads 1
    else
        backend_start "$BACKEND" B 2 2 rw
    fi
    backend_start "$BACKEND" C 3 1 ro
    log "booting guests A, B (read-write, 2 queues; B's served by one thread) and C (read-only, 1 queue) at once (software emulation)"
    t0=$(date +%s)
    boot A 400 2 "vht_role=rw vht_queues=2 $common" A:2
    boot B 400 2 "vht_role=rw vht_queues=2 $common" B:2
    boot C 400 1 "vht_role=ro vht_queues=1 vht_sha=$ro_sha $common" C:1
    wait "${qemu_pids[@]}" || true
    qemu_pids=()
    log "guests A, B, C ran $(( $(date +%s) - t0 )) s"
    for g in A B C; do backend_stop $g; done
    guest_verdict A "$BACKEND" 1
    guest_verdict B "$BACKEND" 2
    guest_verdict C "$BACKEND" 3
    host_check "namespace-3-unchanged-by-read-only-guest" \
        test "$(host_sha "$BACKEND" 3 "$VHT_MIB")" = "$ro_sha"
    if [ "$BACKEND" = nvmed-vhost ]; then
        for g in A B C; do host_check "zero-bounce-$g" zero_bounce $g; done
    fi
}

# nvmed-vhost prints `nvmed-vhost stats: ... data_bytes=N bounced_bytes=M` when a connection
# ends (after reading nvmed's per-session counters) and at SIGTERM. The guests' I/O is
# page-aligned (O_DIRECT with aligned buffers, ext4, the page cache), so nvmed must have
# bounced nothing: every request reached guest RAM by PRPs or SGLs.
zero_bounce() { # backend id
    local lines line data=0 d
    lines=$(grep -a 'nvmed-vhost stats:' "$work/$1.backend.log" || true)
    [ -n "$lines" ] || { log "backend $1 printed no stats line (log: $work/$1.backend.log)"; return 1; }
    log "backend $1: $(echo "$lines" | tail -1 | sed 's/^.*stats: //')"
    while read -r line; do
        case " $line " in *" bounced_bytes=0 "*) ;; *) log "backend $1: nvmed bounced data: $line"; return 1 ;; esac
        d=$(echo "$line" | sed -n 's/.* data_bytes=\([0-9]*\).*/\1/p')
        [ "${d:-0}" -gt "$data" ] && data=$d
    done <<< "$lines"
    [ "$data" -gt 0 ] || { log "backend $1 moved no data: the check would prove nothing"; return 1; }
}

# Guest R on namespace 1: a verified load while its backend is SIGKILLed and started again.
scenario_restart() {
    local t0 k restart_args= killed=0 nvmed_killed=0
    if [ "$BACKEND" = nvmed-vhost ]; then
        # A device that takes its time, so requests are really in flight when the backend dies
        # and the restarted one must resubmit them (INFLIGHT_SHMFD).
        # On a backing file, so that nvmed itself can be killed and started again under the
        # load too (the disk must outlive it).
        kill "$nvmed_pid" && wait "$nvmed_pid" 2>/dev/null || true
        restart_args="${NVMED_ARGS:-} ${RESTART_NVMED_ARGS:---emulator-mode async --emulator-latency-us 5000} --backing $scratch/restart.img"
        NVMED_ARGS="$restart_args" start_nvmed 3
    fi
    backend_start "$BACKEND" R 1 2 rw
    log "booting guest R: verified load while its backend is SIGKILLed and restarted"
    t0=$(date +%s)
    boot R 180 2 "vht_role=restart vht_queues=2 vht_secs=8 $common" R:2
    for _ in $(seq 1200); do
        grep -aq RESTART-BACKEND-NOW "$work/R.log" 2>/dev/null && break
        [ -f "$work/R.rc" ] && break
        sleep 0.1
    done
    if grep -aq RESTART-BACKEND-NOW "$work/R.log"; then
        log "guest R's load is running (+$(( $(date +%s) - t0 )) s); SIGKILL of its backend in 2 s"
        sleep 2
        kill -KILL "${bpid[R]}" && killed=1
        wait "${bpid[R]}" 2>/dev/null || true
        k=$(date +%s%N)
        backend_start "$BACKEND" R 1 2 rw
        log "backend R SIGKILLed under load and restarted in $(( ($(date +%s%N) - k) / 1000000 )) ms"
        if [ "$BACKEND" = nvmed-vhost ] && [ "${NVMED_KILL:-1}" = 1 ]; then
            # Then nvmed itself: the backend's one session reconnects for both queues, each
            # queue's ring is created again and its requests in flight are sent again.
            sleep 1
            kill -KILL "$nvmed_pid" && nvmed_killed=1
            wait "$nvmed_pid" 2>/dev/null || true
            k=$(date +%s%N)
            NVMED_ARGS="$restart_args" start_nvmed 3
            log "nvmed SIGKILLed under guest R's load and restarted in $(( ($(date +%s%N) - k) / 1000000 )) ms"
        fi
    fi
    wait "${qemu_pids[@]}" || true
    qemu_pids=()
    log "guest R ran $(( $(date +%s) - t0 )) s"
    grep -a "resubmitting requests" "$work/R.backend.log" | sed 's/^/    /' || log "(no request was in flight at the kill)"
    # The scenario happened: a guest whose load ended before the kill would pass without it.
    host_check "backend-sigkilled-under-guest-load" test "$killed" = 1
    if [ "$BACKEND" = nvmed-vhost ]; then
        # With a 5 ms device the guest always has requests in flight: the new process must
        # have found them in QEMU's inflight region and sent them again.
        host_check "restarted-backend-resubmitted-inflight-requests" \
            grep -aq "resubmitting requests" "$work/R.backend.log"
        [ "${NVMED_KILL:-1}" = 1 ] && host_check "nvmed-sigkilled-under-guest-load" test "$nvmed_killed" = 1
    fi
    backend_stop R
    guest_verdict R "$BACKEND" 1
}

if [ $mode = test ]; then
    case ${ONLY:-} in
        "") ;;
        parallel) RESTART_TEST=0 ;;
        restart) RESTART_TEST=1 ;;
        *) log "ONLY must be parallel or restart"; exit 2 ;;
    esac
    log "backend: $BACKEND, restart scenario: $([ "$RESTART_TEST" = 1 ] && echo on || echo off)"
    # Backends append to their logs (a restarted one continues the file): start them empty, so
    # that what the checks find there is this run's.
    rm -f "$work"/{A,B,C,R}.backend.log
    [ "$BACKEND" = nvmed-vhost ] && start_nvmed 3
    [ "${ONLY:-parallel}" = parallel ] && scenario_parallel
    if [ "$RESTART_TEST" = 1 ]; then
        scenario_restart
    else
        log "SKIP backend-sigkill-restart (RESTART_TEST=0; with BACKEND=qsd it is off by default:" \
            "qemu-storage-daemon does not track requests in flight for a restarted backend)"
    fi
    log "backend: $BACKEND"
    log "$passed passed, $failed failed"
    [ $failed = 0 ] || exit 1
    exit 0
fi

# --bench: one guest, four disks: A and B (BENCH_A vs BENCH_B), each with 1 and with 2 queues; the
# same boot measures every configuration, alternating A and B. A with nvmed-vhost serves
# nvmed's emulated memory namespaces; qsd serves raw files on tmpfs.
machine() {
    echo "  machine $1: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
        "load $(cut -d' ' -f1-3 /proc/loadavg), $("$bins/ringbench" --pingpong 0.3 | sed 's/^ringbench: //')"
}
machine before
# nvmed namespaces 1 and 2 serve A, 3 and 4 B (qsd: images 11 and 12).
[ $uses_nvmed = 1 ] && start_nvmed 4
backend_start "$BENCH_A" a1 1 1 rw
backend_start "$BENCH_A" a2 2 2 rw
b_ns=(11 12)
[ "$BENCH_B" = nvmed-vhost ] && b_ns=(3 4)
backend_start "$BENCH_B" b1 "${b_ns[0]}" 1 rw "${NVMED_VHOST_B:-$vhost_bin}"
backend_start "$BENCH_B" b2 "${b_ns[1]}" 2 rw "${NVMED_VHOST_B:-$vhost_bin}"
pids=()
for d in a1 a2 b1 b2; do
    p=${bpid[$d]}
    if [ "${bkind[$d]}" = nvmed-vhost ]; then
        p="$p,$nvmed_pid"
        pids+=(--stats-log "$d=$work/$d.backend.log")
    fi
    pids+=(--pids "$d=$p")
done
log "benchmark: A = $BENCH_A, B = $BENCH_B${NVMED_VHOST_B:+ ($NVMED_VHOST_B)}; 4 KiB random read and write, QD1 and QD32, 1 queue (one job)" \
    "and 2 queues (two jobs pinned to the two vCPUs, each at that depth); $secs s per run, $BENCH_ROUNDS rounds"
qemu_args 2 "vht_role=bench vht_secs=$secs vht_rounds=$BENCH_ROUNDS vht_disks=a1,b1,a2,b2 vht_rw=${BENCH_RW:-randread,randwrite} vht_qd=${BENCH_QD:-1,32} vht_qs=${BENCH_QUEUES:-1,2}" a1:1 b1:1 a2:2 b2:2
python3 vmtest/vhost_bench.py --log "$work/bench.log" --a "$BENCH_A" --b "$BENCH_B" --secs "$secs" "${pids[@]}" -- \
    timeout 900 qemu-system-x86_64 "${qargs[@]}"
machine after
