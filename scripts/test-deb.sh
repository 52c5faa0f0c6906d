#!/usr/bin/env bash
# The Debian package test: builds the .deb (scripts/build-deb.sh), installs it with dpkg -i in a
# clean Debian root (debootstrap --variant=minbase, cached in target/deb-test/base), and there
#   - checks the man pages (every long option of each program's --help is in its page) and the
#     bash, zsh and fish completions,
#   - runs nvmed.service's ExecStart as parsed from the installed unit, after editing the
#     installed /etc/nvmed/nvmed.toml the way an operator would for the emulated controller
#     (pci commented out, emulate = true): it must become ready, `nvmectl status` must answer,
#     a granted uid (1000, in the socket's group) must run a verified ringbench, an ungranted one
#     must be refused, and SIGTERM must end it cleanly,
#   - starts it the way systemd does with nvmed.socket (the socket made from the installed unit's
#     ListenSequentialPacket, SocketMode and SocketGroup, passed as fd 3 with LISTEN_FDS) and
#     checks that clients are served on that very socket, which stays when nvmed stops,
#   - removes and purges the package (the conffile stays on remove, goes on purge).
# systemd is not needed. Needs root (chroot, mount).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
work="$top/target/deb-test"
base="$work/base"
root="$work/root"
mkdir -p "$work"
log() { echo "test-deb: $*"; }
fail() {
    log "FAIL: $*"
    exit 1
}
t0=$SECONDS
phase() { log "[$((SECONDS - t0)) s] $*"; }

# 1. The package.
phase "building the package"
# The man page generator as `cargo test --workspace` builds it (pkg/tests runs it): after that
# (scripts/test.sh) nothing is compiled, where `cargo run -p nvmed-pkg` would build its
# dependencies again with other features.
gen=$(cargo test --workspace --no-run -q --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == "nvmed-pkg" and "bin" in t.get("kind", []):
        print(m["executable"])')
[ -x "$gen" ] || fail "cargo test --workspace --no-run built no nvmed-pkg"
deb=$(NVMED_PKG=$gen NVMED_DEB_COMPRESS=gzip bash scripts/build-deb.sh | tail -1)
[ -f "$deb" ] || fail "build-deb.sh made no package"

# 2. A clean root: debootstrap once, then a fresh overlay (or copy) of it for every run.
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
if [ ! -f "$base/.nvmed-base-ok" ]; then
    if ! PATH=$PATH:/usr/sbin command -v debootstrap >/dev/null; then
        phase "installing debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq debootstrap >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    fi
    phase "debootstrap --variant=minbase $suite (once; cached in $base)"
    rm -rf "$base"
    PATH=$PATH:/usr/sbin debootstrap --variant=minbase "$suite" "$base" "${DEB_MIRROR:-http://deb.debian.org/debian}" \
        > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$base/var/cache/apt/archives/"*.deb
    touch "$base/.nvmed-base-ok"
fi
nvmed_pid=
cleanup() {
    if [ -n "$nvmed_pid" ] && kill -0 "$nvmed_pid" 2>/dev/null; then
        kill -KILL "$nvmed_pid" 2>/dev/null || true
        wait "$nvmed_pid" 2>/dev/null || true
    fi
    mountpoint -q "$root/proc" && umount "$root/proc"
    mountpoint -q "$root" && umount "$root"
    return 0
}
trap cleanup EXIT
cleanup
# The run's root: an overlay on the base (its writes go to $work/upper), or a copy of it.
rm -rf --one-file-system "$root" "$work/upper" "$work/overlay-work"
mkdir -p "$root" "$work/upper" "$work/overlay-work"
if ! mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/overlay-work" "$root" 2>/dev/null; then
    cp -a --reflink=auto "$base/." "$root"
fi
mount -t proc proc "$root/proc"
# chroot with the clean environment systemd gives a service.
in_root=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C chroot)
in_root() { "${in_root[@]}" "$@"; }

# 3. dpkg -i.
phase "dpkg -i $(basename "$deb")"
cp "$deb" "$root/tmp/"
in_root "$root" dpkg -i "/tmp/$(basename "$deb")" > "$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
in_root "$root" dpkg-query -W -f '${Status}\n' nvmed | grep -qx 'install ok installed' || fail "nvmed is not installed"
in_root "$root" dpkg-query -W -f '${Conffiles}\n' nvmed | grep -q '^ /etc/nvmed/nvmed.toml ' \
    || fail "/etc/nvmed/nvmed.toml is not a conffile"

# 4. Man pages and completions.
phase "man pages and completions"
for entry in nvmed:8 nvmectl:8 ringbench:1 nvmed-vhost:1 nvmed-tcp:8; do
    prog=${entry%:*} sec=${entry#*:}
    page="$root/usr/share/man/man$sec/$prog.$sec.gz"
    [ -f "$page" ] || fail "no man page $page"
    text=$(zcat "$page" | sed 's/\\-/-/g')
    grep -q "^\.TH $prog $sec " <<< "$text" || fail "$prog.$sec has no .TH $prog $sec header"
    opts=$(in_root "$root" "$prog" --help | grep -o -- '--[a-z][a-z0-9-]*' | sort -u)
    [ -n "$opts" ] || fail "$prog --help lists no options"
    for o in $opts; do grep -q -- "$o" <<< "$text" || fail "$prog.$sec lacks $o"; done
    b="$root/usr/share/bash-completion/completions/$prog"
    z="$root/usr/share/zsh/vendor-completions/_$prog"
    f="$root/usr/share/fish/vendor_completions.d/$prog.fish"
    [ -f "$b" ] && bash -n "$b" || fail "no usable bash completion $b"
    head -1 "$z" | grep -qx "#compdef $prog" || fail "no zsh completion $z"
    grep -q "^complete -c $prog " "$f" || fail "no fish completion $f"
    log "$prog: man $sec ($(wc -w <<< "$opts") options), bash, zsh, fish"
done
for s in $(in_root "$root" nvmectl --help | sed -n '/^Commands:/,/^$/s/^  \([a-z]*\) .*/\1/p'); do
    [ "$s" = help ] || [ -f "$root/usr/share/man/man8/nvmectl-$s.8.gz" ] || fail "no man page nvmectl-$s(8)"
done

# 5. The service's ExecStart, on the emulated controller.
unit="$root/usr/lib/systemd/system/nvmed.service"
sock_unit="$root/usr/lib/systemd/system/nvmed.socket"
[ -f "$unit" ] && [ -f "$sock_unit" ] || fail "nvmed.service or nvmed.socket not installed"
exec_start=$(sed -n 's/^ExecStart=[-@:+!]*//p' "$unit" | tail -1)
plain='^/[A-Za-z0-9/._= -]+$'
[[ $exec_start =~ $plain ]] || fail "ExecStart is not a plain command line: $exec_start"
config=$(sed -n 's/.*--config[ =]\([^ ]*\).*/\1/p' <<< "$exec_start")
[ -n "$config" ] && [ -f "$root$config" ] || fail "ExecStart has no --config naming an installed file: $exec_start"
sed -i 's/^pci = /# pci = /' "$root$config"
printf '\n# test-deb.sh: the emulated controller\nemulate = true\nsize = "64M"\n' >> "$root$config"
socket=$(grep -o '^socket *= *"[^"]*"' "$root$config" | cut -d'"' -f2)
[ -n "$socket" ] || fail "$config names no socket"

# Runs "$@" (a command that execs ExecStart, so that its pid is nvmed's) in the background and
# waits for the ready line. Sets nvmed_pid.
start_nvmed() {
    : > "$work/nvmed.out"
    "$@" > "$work/nvmed.out" 2> "$work/nvmed.err" &
    nvmed_pid=$!
    local i
    for i in $(seq 200); do
        grep -q ready "$work/nvmed.out" && return 0
        kill -0 "$nvmed_pid" 2>/dev/null || { cat "$work/nvmed.err"; fail "nvmed exited: $exec_start"; }
        sleep 0.1
    done
    cat "$work/nvmed.err"
    fail "nvmed not ready after 20 s"
}
# Clients against the running broker.
check_clients() {
    local st rb
    st=$(in_root "$root" nvmectl --json status) || fail "nvmectl status"
    python3 -c 'import json,sys; s=json.load(sys.stdin); assert s, "empty status"' <<< "$st" \
        || fail "nvmectl --json status: $st"
    # uid 1000 holds grant 1000:1 in the packaged configuration; gid 6 (disk) may use the socket.
    rb=$(in_root --userspec=1000:6 "$root" ringbench --socket "$socket" --rw randrw --bs 4k --iodepth 8 \
        --runtime 1 --verify --output-format json) || fail "ringbench --verify as uid 1000"
    python3 -c 'import json,sys; t=json.load(sys.stdin)["total"]
assert t["ios"] > 0 and t["verified_reads"] > 0, t
print("test-deb: ringbench --verify as uid 1000: %d I/Os, %d reads verified" % (t["ios"], t["verified_reads"]))' <<< "$rb" \
        || fail "ringbench report: $rb"
    # uid 1003 has no grant and default-access is none.
    if in_root --userspec=1003:6 "$root" ringbench --socket "$socket" --runtime 0.2 > /dev/null 2> "$work/refused.err"; then
        fail "uid 1003 (no grant) ran I/O"
    fi
    log "uid 1003 (no grant) refused: $(head -1 "$work/refused.err")"
}
stop_nvmed() {
    kill -TERM "$nvmed_pid"
    local i
    for i in $(seq 200); do
        kill -0 "$nvmed_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$nvmed_pid" 2>/dev/null && fail "nvmed still running 20 s after SIGTERM"
    wait "$nvmed_pid" || fail "nvmed exited with status $? after SIGTERM"
    nvmed_pid=
}

phase "ExecStart: $exec_start (config: pci commented out, emulate = true)"
# shellcheck disable=SC2086 # ExecStart is split into words, as systemd does
start_nvmed "${in_root[@]}" "$root" $exec_start
log "$(cat "$work/nvmed.out")"
mode=$(stat -c '%a %G' "$root$socket")
[ "$mode" = "660 disk" ] || fail "$socket is '$mode', not '660 disk' as the configuration says"
check_clients
stop_nvmed
[ -e "$root$socket" ] && fail "$socket left behind after SIGTERM"

# 6. Socket activation, as systemd does it with nvmed.socket.
# (SOCKET_ACTIVATION=0 skips it.)
if [ "${SOCKET_ACTIVATION:-1}" = 1 ]; then
    phase "socket activation (nvmed.socket)"
    listen=$(sed -n 's/^ListenSequentialPacket=//p' "$sock_unit")
    [ "$listen" = "$socket" ] || fail "nvmed.socket listens on $listen, the configuration on $socket"
    smode=$(sed -n 's/^SocketMode=//p' "$sock_unit")
    sgroup=$(sed -n 's/^SocketGroup=//p' "$sock_unit")
    # python3 makes the listening socket, chroots and execs ExecStart with it as fd 3.
    cat > "$work/activate.py" <<'PY'
import grp, os, socket, subprocess, sys
root, path, mode, group, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
os.chroot(root)
os.chdir("/")
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(path)
os.chmod(path, int(mode, 8))
os.chown(path, -1, grp.getgrnam(group).gr_gid)  # the chroot's /etc/group
s.listen(socket.SOMAXCONN)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)  # (dup2 onto itself would keep close-on-exec)
env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()),
       "LISTEN_FDNAMES": "nvmed.socket"}
# Which file this is: inode and birth time (a replacement may reuse the inode number).
print(subprocess.run(["stat", "-c", "%i %w", path], capture_output=True, text=True, check=True).stdout.strip(),
      file=sys.stderr, flush=True)
os.execve(argv[0], argv, env)
PY
    # shellcheck disable=SC2086
    start_nvmed python3 "$work/activate.py" "$root" "$listen" "$smode" "$sgroup" $exec_start
    made=$(head -1 "$work/nvmed.err")
    check_clients
    [ "$(stat -c '%i %w' "$root$socket")" = "$made" ] || fail "nvmed replaced the activated socket $socket"
    stop_nvmed
    [ -S "$root$socket" ] || fail "nvmed removed $socket, which the service manager owns"
else
    log "socket activation: skipped (SOCKET_ACTIVATION=$SOCKET_ACTIVATION)"
fi

# 7. Remove, purge.
phase "dpkg -r, dpkg -P"
in_root "$root" dpkg -r nvmed > "$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -r"; }
[ -e "$root/usr/sbin/nvmed" ] && fail "dpkg -r left /usr/sbin/nvmed"
[ -f "$root$config" ] || fail "dpkg -r removed the conffile $config"
in_root "$root" dpkg -P nvmed > "$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -P"; }
[ -e "$root$config" ] && fail "dpkg -P left $config"
phase "passed"
