#!/usr/bin/env bash
# Runs the integration tests inside a throw-away QEMU guest whose pmem
# directory is a real ext4 (or xfs: DAXVM_FS=xfs) file system mounted -o dax
# on an emulated NVDIMM (../shared/daxvm/daxvm.sh). No DAXSHIM_PMEM there: the
# shim must find DAX files by itself. Exit status: the tests' (125: the VM
# could not be started).
set -euo pipefail
cd "$(dirname "$0")/.."
DAXVM=${DAXVM:-$(cd .. && pwd)/shared/daxvm/daxvm.sh}
[ -f "$DAXVM" ] || { echo "test-dax: $DAXVM not found" >&2; exit 125; }
[ "$(id -u)" = 0 ] || { echo "test-dax: the VM needs root" >&2; exit 125; }

scripts/deps.sh
cargo build --release --workspace
# Every integration test executable cargo built: tests/NAME.rs and the
# multi-file ones, tests/NAME/main.rs.
mapfile -t bins < <(cargo test --release --workspace --no-run 2>&1 |
  sed -n 's/.*Executable tests\/[a-z_]*\(\/main\)\{0,1\}\.rs (\(.*\))$/\2/p')
shopt -s nullglob
targets=(tests/*.rs tests/*/main.rs)
want=${#targets[@]}
[ ${#bins[@]} = "$want" ] || { echo "test-dax: expected $want test executables, got: ${bins[*]}" >&2; exit 1; }
# Compile the C examples here (the guest's gcc is slow; the tests reuse
# binaries newer than their sources).
mkdir -p target/release/c-examples
for c in examples/c/*.c; do
  gcc -O2 -Wall -D_GNU_SOURCE -Iinclude -o "target/release/c-examples/$(basename "$c" .c)" "$c" -lpthread
done
guest=target/dax-guest.sh
{
  echo 'set -u; rc=0'
  echo 'echo "guest kernel $(uname -r); DAX mount: $(grep " $DAX_DIR " /proc/mounts)"'
  for b in "${bins[@]}"; do
    echo "DAXSHIM_TEST_DAX_DIR=\$DAX_DIR $PWD/$b --include-ignored --test-threads=2 || rc=1"
  done
  echo 'exit $rc'
} > "$guest"
# Without hardware virtualization (a KVM-less or PVM host) the guest runs on
# TCG, ~20x slower than the host: the whole suite takes ~12 minutes there.
DAXVM_TIMEOUT=${DAXVM_TIMEOUT:-1500} bash "$DAXVM" bash "$guest"
