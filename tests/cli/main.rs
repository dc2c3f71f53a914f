//! The `daxshim` command (issue: "The daxshim command"), run as a user
//! would: installed into a prefix the way scripts/install.sh lays it out
//! (bin/daxshim, lib/libdaxshim.so), started from a directory outside the
//! repository; and installed by `cargo install --path cli`, with no library
//! beside it and its build tree gone (issue #11).

#[path = "../common/mod.rs"]
mod common;

// In reading order (one group each, so that rustfmt keeps it).
/// `--help` of every subcommand, usage errors, shell completions.
mod help;

/// `daxshim run`: the installed library, the command's exit status, `--dax`.
mod run;

/// `status`, `drop`, `sync` and `gc` of the shadows crashed processes left.
mod status;

/// `daxshim stats`: counters and the latency chart.
mod stats;

/// `daxshim crashtest`: SQLite under crashes, a failing check, the progress bar.
mod crashtest;

/// `cargo install --path cli`: a command that needs no build tree (issue #11).
mod install;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An installed copy: prefix/bin/daxshim and prefix/lib/libdaxshim.so.
fn install(w: &World) -> PathBuf {
    let prefix = w.root.join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("lib")).unwrap();
    std::fs::copy(target_dir().join("daxshim"), prefix.join("bin/daxshim")).unwrap();
    std::fs::copy(lib(), prefix.join("lib/libdaxshim.so")).unwrap();
    prefix.join("bin/daxshim")
}

/// `daxshim ARGS` from the world's root (outside the repository), with the
/// world's shadow directory.
fn daxshim(w: &World, exe: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(exe);
    c.current_dir(&w.root)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env_remove("LD_PRELOAD")
        .env_remove("DAXSHIM_PMEM")
        .env_remove("DAXSHIM_LIB")
        .args(args);
    run(c)
}
