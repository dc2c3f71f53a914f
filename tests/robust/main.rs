//! Robustness (issue: "Robustness"): signals, fork during syncs, calls from
//! signal handlers, fuzzed arguments compared with the kernel's answers,
//! descriptor juggling, files renamed, unlinked and truncated under their
//! mappings, hostile shadow directories.

#[path = "../common/mod.rs"]
mod common;

// In reading order (one group each, so that rustfmt keeps it).
/// The program's own signal handlers; hooked calls from inside them.
mod signals;

/// `fork` during a sync, `posix_spawn`, `vfork`, a daemon's double fork.
mod processes;

/// Duplicated descriptors, `O_APPEND`, `O_DIRECT`, kernel-side copies.
mod io;

/// Files renamed, unlinked, truncated, linked; hostile shadow directories.
mod files;

/// Fuzzed mapping calls and `DAXSHIM_*` values.
mod fuzz;

/// The program's descriptors are its own: many files, low numbers, a
/// daemon's "close everything".
mod limits;

use common::*;

/// Runs examples/c/hostile.c with `args`, under the shim or without it.
fn hostile(w: &World, shim: bool, args: &[&str]) -> std::process::Output {
    let mut c = if shim {
        w.shim_cmd(c_example("hostile"))
    } else {
        w.cmd(c_example("hostile"))
    };
    c.args(args);
    run(c)
}
