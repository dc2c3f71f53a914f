#!/usr/bin/env bash
# Builds daxshim and installs the CLI and the library side by side
# (default prefix ~/.local: bin/daxshim and lib/libdaxshim.so). The command
# finds the library beside it in ../lib/ (it also carries a copy of its own,
# which it uses only when none is installed: `cargo install --path cli`).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-$HOME/.local}"
scripts/deps.sh
cargo build --release -p daxshim -p daxshim-cli
install -d "$prefix/bin" "$prefix/lib" "$prefix/include"
install -m 0755 target/release/daxshim "$prefix/bin/daxshim"
install -m 0644 target/release/libdaxshim.so "$prefix/lib/libdaxshim.so"
install -m 0644 include/daxshim.h "$prefix/include/daxshim.h"
echo "installed $prefix/bin/daxshim and $prefix/lib/libdaxshim.so"
