#!/usr/bin/env bash
# The project's test command. Checks the shim's layering
# (scripts/check-layers.py), installs what the tests need, builds the
# library, the CLI and the SQLite harness, then runs:
#   1. unit and integration tests (userfaultfd tracker where the kernel has it);
#   2. the core, robustness, programs, SQLite and failure-atomic suites again on the
#      full-compare tracker (the oracle), with emulated pmem written back by
#      stores and cache flushes through the mapping, as real pmem is;
#      and once more on the mprotect+SIGSEGV fallback tracker, and once
#      with Syscall User Dispatch on (DAXSHIM_SYSCALLS=trap);
#   3. the integration suite inside a QEMU guest on a real -o dax file system
#      (scripts/test-dax.sh), when the VM can be started here (root, qemu).
#      DAXSHIM_TEST_DAX=0 skips it, DAXSHIM_TEST_DAX=1 makes a VM that
#      cannot start a failure.
# Fails if the run left anything in the working tree (a test that wrote into
# the source tree). Ends with one "N passed, N failed" line over everything.
set -uo pipefail
cd "$(dirname "$0")/.."
# The working tree as the run found it (untracked files one by one): the run
# must leave it so. A developer's uncommitted work is there at both ends.
tree_state() { git status --porcelain --untracked-files=all 2>/dev/null; }
tree_before=$(tree_state)
[ -z "$tree_before" ] || echo "note: the working tree has uncommitted changes; only what this run adds to them fails it"
scripts/deps.sh || exit 1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
logged() { "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }

# Layers: nothing below hooks/ imports it, no upward use, no import circle.
python3 scripts/check-layers.py || status=1
cargo build --release --workspace || exit 1

logged cargo test --release --no-fail-fast --workspace || status=1
echo "== the same suites on the full-compare tracker (the correctness oracle), writeback by stores"
DAXSHIM_TEST_TRACKER=compare DAXSHIM_TEST_WRITEBACK=stores logged cargo test --release --no-fail-fast --test core --test robust --test programs --test sqlite --test atomic || status=1
echo "== the same suites on the mprotect+SIGSEGV fallback tracker"
DAXSHIM_TEST_TRACKER=mprotect logged cargo test --release --no-fail-fast --test core --test robust --test programs --test sqlite --test atomic || status=1
echo "== the same suites with the regions of every shadow mapping trapped (DAXSHIM_TRAP_MIN=0)"
DAXSHIM_TEST_TRAP_MIN=0 logged cargo test --release --no-fail-fast --test core --test robust --test programs --test sqlite --test lazy --test atomic || status=1
echo "== the same suites with every system call outside the hooks trapped (DAXSHIM_SYSCALLS=trap)"
DAXSHIM_TEST_SYSCALLS=trap logged cargo test --release --no-fail-fast --test core --test robust --test programs --test sqlite --test atomic || status=1

if [ "${DAXSHIM_TEST_DAX:-auto}" != 0 ]; then
  echo "== the integration suite on a real -o dax file system (QEMU guest)"
  logged scripts/test-dax.sh
  rc=$?
  if [ "$rc" = 125 ]; then
    echo "note: the DAX VM could not be started on this machine; the real-DAX run did not happen"
    [ "${DAXSHIM_TEST_DAX:-auto}" = 1 ] && status=1
  elif [ "$rc" != 0 ]; then
    status=1
  fi
fi

tree_after=$(tree_state)
if [ "$tree_after" != "$tree_before" ]; then
  echo
  echo "FAILED: the run changed the working tree (git status --porcelain, before -> after):"
  diff <(printf '%s\n' "$tree_before") <(printf '%s\n' "$tree_after") | sed -n 's/^> /  now: /p; s/^< /  was: /p'
  status=1
fi

sum() { awk -v w="$1" '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ "^" w) s += $i} END {print s + 0}' "$log"; }
echo
echo "$(sum passed) passed, $(sum failed) failed"
exit "$status"
