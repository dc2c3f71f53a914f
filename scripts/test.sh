#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds the
# library and the CLI, runs unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --workspace
cargo test --release --workspace
