#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit/property/integration tests,
# and the loom model of the ring protocol.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# ---- issue 11: C library and fio engine (branch capi) --------------------------------------
# The fio tests (tests/fio.rs, run by `cargo test` below) need fio, and the fio engine is built
# against the headers of the installed fio's own source package: a deb-src entry for this suite
# and dpkg-dev (for `apt-get source`). NVMED_REQUIRE_FIO=1 makes the tests fail, not skip,
# when fio is missing.
echo "== fio and its source package for the fio engine tests (issue 11)"
if ! grep -rqsE '^(Types: *deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    . /etc/os-release
    printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n' \
        http://deb.debian.org/debian "$VERSION_CODENAME $VERSION_CODENAME-updates" \
        http://deb.debian.org/debian-security "$VERSION_CODENAME-security" \
        >/etc/apt/sources.list.d/nvmed-deb-src.sources
    apt-get update -qq
fi
if ! command -v fio >/dev/null || ! command -v dpkg-source >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fio dpkg-dev >/dev/null
fi
export NVMED_REQUIRE_FIO=1
# ---- end of issue 11 block -----------------------------------------------------------------

echo "== cargo test (unit, property and end-to-end tests against a real nvmed process)"
cargo test --workspace

echo "== loom model of the ring's head/tail publication"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p nvmed-proto --test loom_ring --release

echo "== VM test: nvmed on QEMU's NVMe controller through VFIO (software emulation)"
bash vmtest/run.sh

echo "== vhost-user-blk test: guests on vhost-user-blk backends (BACKEND=${BACKEND:-nvmed-vhost}; software emulation)"
bash vmtest/vhost.sh

echo "== Debian package: build the .deb (reusing the VM tests' static release binaries), dpkg -i in a clean"
echo "   debootstrap'd root, nvmed.service's ExecStart on the emulated controller, clients, man pages, completions"
bash scripts/test-deb.sh
