#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds the
# library, the CLI and the SQLite harness, runs unit and integration tests,
# and ends with one "N passed, N failed" line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --workspace
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace 2>&1 | tee "$log" || status=$?
passed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ /^passed/) s += $i} END {print s + 0}' "$log")
failed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ /^failed/) s += $i} END {print s + 0}' "$log")
echo
echo "$passed passed, $failed failed"
exit "$status"
