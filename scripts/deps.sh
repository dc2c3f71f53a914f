#!/usr/bin/env bash
# Installs the system packages the build and tests need (idempotent).
set -euo pipefail
need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v tdbtool >/dev/null 2>&1 || need+=(tdb-tools)
command -v kchashmgr >/dev/null 2>&1 || need+=(kyotocabinet-utils)
# Another allocator, to test the shim under a malloc that maps memory itself.
[ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || need+=(libjemalloc2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# Python's lmdb binding (LMDB itself is bundled in the wheel), for the
# LMDB tests.
python3 -c 'import lmdb' 2>/dev/null || python3 -m pip install -q --root-user-action=ignore lmdb
command -v cargo >/dev/null 2>&1 || { echo "deps: cargo (Rust toolchain) is required" >&2; exit 1; }
