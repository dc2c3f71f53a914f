//! The core shim, topic by topic (issue: "Core shim"). Every test runs a
//! real program under LD_PRELOAD on emulated pmem and observes the backing
//! file from this process, which has no shim. The probe's scripts are
//! strings, one command per line (`common::script_args`).

#[path = "../common/mod.rs"]
mod common;

// In reading order (one group each, so that rustfmt keeps it).
/// Which mappings get a shadow and which map the file directly.
mod mapping;

/// What each sync call persists, and only that; failed writebacks.
mod sync;

/// File I/O, mappings and other processes see one file, as with the page cache.
mod io;

/// Exit, `_exit`, `SIGKILL`, `exec`, `fork`, threads, inherited descriptors.
mod processes;

/// stdio streams on pmem files go through the shim.
mod stdio;

/// Writers the shim cannot intercept are never undone, and are seen.
mod foreign;

/// `DAXSHIM_SYSCALLS=trap`: raw and libc-internal system calls go through
/// the shim.
mod syscalls;

/// The shadow store: private, never stale, and a safe fallback when refused.
mod shadows;

/// `errno` and signals exactly as the kernel's.
mod errors;

/// Configuration errors, the `daxshim` command, another allocator.
mod config;

const PAGE: usize = 4096;

fn zeros(n: usize) -> Vec<u8> {
    vec![0u8; n]
}

/// A probe under the shim maps `f` (8 KiB) and runs `before`; once
/// `meanwhile` ran (it gets the path it must create when done), the probe
/// runs `after`. Returns the probe's output (it must exit 0).
fn while_mapped(
    w: &common::World,
    f: &std::path::Path,
    before: &str,
    after: &str,
    meanwhile: impl FnOnce(&std::path::Path),
) -> std::process::Output {
    use common::s;
    let (ready, done) = (w.root.join("ready"), w.root.join("done"));
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&done);
    let mut probe = w.probe_cmd(&*format!(
        "open {f} rw
         map 8192
         {before}
         touch {ready}
         waitfor {done}
         {after}",
        f = s(f),
        ready = s(&ready),
        done = s(&done),
    ));
    let a = probe
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for(&ready);
    meanwhile(&done);
    let o = a.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        common::stdout(&o),
        common::stderr(&o)
    );
    o
}
