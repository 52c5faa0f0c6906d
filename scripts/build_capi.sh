#!/usr/bin/env bash
# Builds the C library and the fio engine:
#   <target>/<profile>/libnvmed.so, libnvmed.a, nvmed.pc  (cargo, crate nvmed-capi)
#   <target>/<profile>/libnvmed.so.0.1                    (the static library relinked with the
#                                                          symbol versions of capi/nvmed.map)
#   <target>/<profile>/libfio_nvmed.so                    (fio external engine, C, on libnvmed)
#
# Usage: scripts/build_capi.sh [--release] [--no-cargo] [--libdir DIR] [--no-fio]
#   --no-cargo    the crate is already built
#   --libdir DIR  the built libnvmed.a and libnvmed.so are in DIR (not <target>/<profile>); the
#                 outputs go there too; implies --no-cargo (the tests use this from `cargo test`)
#   --no-fio      only the library
#
# The engine is compiled against the headers of the fio the machine runs: the source package of
# the installed fio version (`apt-get source fio`, which needs a deb-src entry for the suite and
# dpkg-dev), configured only to get config-host.h, cached under <target>/fio-src/.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
cargo_flags=()
run_cargo=1
build_fio=1
libdir=
while [ $# -gt 0 ]; do
    a=$1; shift
    case "$a" in
        --release) profile=release; cargo_flags+=(--release) ;;
        --no-cargo) run_cargo=0 ;;
        --libdir) libdir=$1; shift; run_cargo=0 ;;
        --no-fio) build_fio=0 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done

target=${CARGO_TARGET_DIR:-target}
target=$(cd "$(dirname "$target")" && echo "$PWD/$(basename "$target")")
out=${libdir:-$target/$profile}
# One build at a time into $out (test runners such as nextest start one per test process).
mkdir -p "$out"
exec 9> "$out/.build_capi.lock"
flock 9
if [ "$run_cargo" = 1 ]; then
    cargo build -p nvmed-capi "${cargo_flags[@]}"
fi
[ -f "$out/libnvmed.a" ] || { echo "no $out/libnvmed.a: build nvmed-capi first" >&2; exit 1; }

# The versioned shared library (see capi/README.md: symbol versioning).
ver=$(sed -n 's/^#define NVMED_VERSION_STRING "\(.*\)"/\1/p' capi/include/nvmed.h)
major=${ver%%.*}; rest=${ver#*.}; minor=${rest%%.*}
if [ "$major" = 0 ]; then soname="libnvmed.so.0.$minor"; else soname="libnvmed.so.$major"; fi
cc -shared -o "$out/$soname.tmp" \
    -Wl,--whole-archive "$out/libnvmed.a" -Wl,--no-whole-archive \
    -Wl,--version-script=capi/nvmed.map -Wl,-soname,"$soname" -Wl,--gc-sections \
    -lpthread -ldl -lm -lc
mv "$out/$soname.tmp" "$out/$soname"
echo "built $out/$soname"

[ "$build_fio" = 1 ] || exit 0

if ! command -v fio >/dev/null; then
    echo "fio is not installed (apt-get install fio)" >&2
    exit 1
fi
fio_ver=$(dpkg-query -W -f='${Version}' fio)      # e.g. 3.33-3
upstream=${fio_ver%-*}; upstream=${upstream#*:}
cache=$target/fio-src
[ -z "$libdir" ] || cache="$(cd "$libdir/.." && pwd)/fio-src"
src="$cache/fio-$fio_ver"
if [ ! -f "$src/fio-$upstream/config-host.h" ]; then
    echo "fetching the source of fio $fio_ver for its headers into $src"
    rm -rf "$src"; mkdir -p "$src"
    (cd "$src" && apt-get source -qq "fio=$fio_ver" >/dev/null) || {
        echo "apt-get source fio=$fio_ver failed: it needs a deb-src entry for this suite and dpkg-dev" >&2
        exit 1
    }
    # Only for config-host.h (the options that shape fio's structs); nothing is built.
    (cd "$src/fio-$upstream" && ./configure --disable-native >"$src/configure.log" 2>&1)
fi
fsrc="$src/fio-$upstream"
# The engine links libnvmed from its own directory ($ORIGIN): keep the two together.
cc -std=gnu11 -O2 -g -Wall -Wno-unused-parameter -fPIC -shared -D_GNU_SOURCE \
    -include "$fsrc/config-host.h" -I"$fsrc" -Icapi/include \
    -o "$out/libfio_nvmed.so" capi/fio/fio_nvmed.c \
    -L"$out" -lnvmed -Wl,-rpath,'$ORIGIN'
echo "built $out/libfio_nvmed.so (fio $fio_ver)"
