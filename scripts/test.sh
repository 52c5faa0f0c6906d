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
