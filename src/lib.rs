//! daxshim: an `LD_PRELOAD` library that gives programs unaware of
//! persistent memory the page-cache semantics they were written for.
//!
//! A `MAP_SHARED` mapping of a file on pmem (a `DAXSHIM_PMEM` directory, or a
//! real DAX file) becomes a mapping of a *shadow* — a shared-memory copy
//! attached by every process using the file. Syncs (`msync`, `fsync`,
//! `fdatasync`, `sync_file_range`, `syncfs`, `sync`) write back only the
//! cachelines that changed, flush them and make them durable. DAX-aware
//! callers (`MAP_SHARED_VALIDATE|MAP_SYNC`, [`MAP_DAX`], `DAXSHIM_DAX`) get
//! the direct mapping.
//!
//! Environment (read once at load, [`config`]; an invalid value exits with
//! status 125 before `main`): `DAXSHIM_PMEM`, `DAXSHIM_DAX`,
//! `DAXSHIM_SHADOW_DIR`, `DAXSHIM_LOG`, `DAXSHIM_STATS`, `DAXSHIM_TRACKER`,
//! `DAXSHIM_LAZY`, `DAXSHIM_CACHE_MAX`, `DAXSHIM_WRITEBACK`, `DAXSHIM_FLUSH`
//! and the testing knobs `DAXSHIM_DEBUG_CRASH_AFTER_LINES`,
//! `DAXSHIM_DEBUG_FAIL_SYNCS`; the README's table says what each means.
//!
//! The design as built, its layers and their order, is in
//! `docs/ARCHITECTURE.md`; `scripts/check-layers.py` keeps the order.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// The constructor and everything only it reaches are cfg(not(test)).
#![cfg_attr(test, allow(dead_code))]

// Layers, lowest first (docs/ARCHITECTURE.md; scripts/check-layers.py).
// 0: system calls, locks, configuration, re-entrancy.
#[macro_use]
mod log;
mod alloc;
mod config;
mod fdcache;
mod lock;
mod ranges;
mod real;
mod reentry;
mod stats;
mod sys;
// 1: the shared shadow store, dirty tracking, persistence, signal chaining.
mod persist;
mod shadow;
mod sigchain;
mod sud;
mod track;
// 2: lazy filling (fault thread, eviction).
mod lazy;
// 3: this process's files, descriptors, mappings, syncs and lifecycle.
mod classify;
mod fdtable;
mod file;
mod fileio;
mod lifecycle;
mod mapping;
mod registry;
mod runtime;
mod stdio;
mod watcher;
mod writeback;
// 4: the exported hooks (nothing below imports them).
mod hooks;

/// The shim's memory is its own (`alloc.rs`): the program's `malloc` is the
/// program's.
#[cfg_attr(not(test), global_allocator)]
static SHIM_ALLOC: alloc::ShimAlloc = alloc::ShimAlloc;

/// Per-mapping DAX opt-in flag (also in `include/daxshim.h`).
pub const MAP_DAX: i32 = hooks::map::MAP_DAX;

// The whole exported ABI, in one list.
pub use hooks::fd::{
    __open64_2, __open_2, __openat64_2, __openat_2, close, close_range, closefrom, creat, creat64,
    dup, dup2, dup3, fcntl, fcntl64, open, open64, openat, openat64, rename, renameat, renameat2,
};
pub use hooks::io::{
    __pread64_chk, __pread_chk, __read_chk, copy_file_range, fallocate, fallocate64, ftruncate,
    ftruncate64, posix_fallocate, posix_fallocate64, pread, pread64, preadv, preadv2, preadv64,
    preadv64v2, pwrite, pwrite64, pwritev, pwritev2, pwritev64, pwritev64v2, read, readv, truncate,
    truncate64, write, writev,
};
pub use hooks::map::{madvise, mmap, mmap64, mprotect, mremap, munmap};
pub use hooks::signal::{pthread_sigmask, sigaction, signal, sigprocmask};
pub use hooks::stdio::{fdopen, fileno, fileno_unlocked, fopen, fopen64, freopen, freopen64};
pub use hooks::sync::{fdatasync, fsync, msync, sync, sync_file_range, syncfs};
pub use hooks::thread::pthread_create;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

fn config_error(msg: &str) -> ! {
    sys::write_all_fd(2, format!("daxshim: {msg}\n").as_bytes());
    sys::exit_group(125)
}

extern "C" fn atfork_prepare() {
    if let Some(g) = reentry::enter() {
        crate::lifecycle::atfork_prepare();
        std::mem::forget(g); // stay "inside" until parent/child handler
    }
}

extern "C" fn atfork_parent() {
    crate::lifecycle::atfork_parent();
    leave_after_fork();
}

extern "C" fn atfork_child() {
    crate::lifecycle::atfork_child();
    if sud::active() {
        // The kernel turned dispatch off in the child.
        if let Err(e) = sud::enable_this_thread() {
            warn!("the forked child runs without Syscall User Dispatch ({e})");
            reentry::set_dispatched(false);
        }
    }
    leave_after_fork();
}

fn leave_after_fork() {
    drop(reentry::Entered::assume_entered());
}

/// Load-time constructor: resolve real functions, parse the configuration,
/// pick the flush instruction and the tracker, adopt inherited descriptors.
extern "C" fn daxshim_init() {
    let Some(mut g) = reentry::enter_always() else {
        return;
    };
    let mut missing = real::resolve_all();
    missing.extend(real::resolve_variadic());
    let required = [
        "mmap64", "munmap", "mremap", "msync", "fsync", "read", "write", "close",
    ];
    if let Some(m) = missing.iter().find(|m| required.contains(m)) {
        config_error(&format!("cannot resolve the real `{m}`; refusing to run"));
    }
    let cfg = config::parse(
        |k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()),
        |p: &Path| std::fs::canonicalize(p).ok().filter(|c| c.is_dir()),
        sys::geteuid(),
    )
    .unwrap_or_else(|e| config_error(&e.to_string()));
    log::set_level(cfg.log);
    for v in
        config::unknown_vars(std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()))
    {
        warn!(
            "unknown variable {v} ignored (known: {})",
            config::KNOWN_VARS.join(", ")
        );
    }
    let flush = persist::flush::select(cfg.flush, persist::flush::detect());
    track::uffd::set_sigbus_wanted(
        cfg.lazy && cfg.lazy_in_thread && lazy::sigbus::install_handler(),
    );
    let tracker = match track::select(cfg.tracker) {
        Ok(b) => b,
        Err(e) => config_error(&format!("DAXSHIM_TRACKER: {e}")),
    };
    track::uffd::set_trap_min(cfg.trap_min);
    persist::FAIL_BUDGET.store(cfg.fail_syncs, Ordering::Relaxed);
    if let Some(n) = cfg.crash_after_lines {
        persist::CRASH_BUDGET.store(n, Ordering::Relaxed);
    }
    let pmem_devs = cfg
        .pmem_dirs
        .iter()
        .filter_map(|d| std::fs::metadata(d).ok())
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        .collect();
    let shadow_dir = cfg.shadow_dir.to_string_lossy().into_owned();
    let dax_devs = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| dax_mount_devices(&s))
        .unwrap_or_default();
    info!(
        "tracker {}, flush {}, pmem {:?}, shadows in {shadow_dir}",
        tracker.name(),
        flush.name(),
        cfg.pmem_dirs
    );
    let rt_cache_max = cfg.cache_max;
    let trap_syscalls = cfg.trap_syscalls;
    let _ = crate::runtime::RT.set(crate::runtime::Runtime {
        cfg,
        flush,
        pmem_devs,
        dax_devs,
        shadow_dir,
        shadow_dir_bad: AtomicBool::new(false),
        shadow_dir_ok: AtomicBool::new(false),
    });
    // SAFETY: registering plain extern "C" handlers.
    unsafe {
        libc::pthread_atfork(
            Some(atfork_prepare),
            Some(atfork_parent),
            Some(atfork_child),
        );
    }
    sigchain::adopt_installed_handlers();
    lazy::init(&registry::LazyHost, rt_cache_max);
    reentry::READY.store(true, Ordering::Release);
    crate::fdtable::scan_inherited_fds();
    hooks::stdio::adopt_standard_streams();
    if trap_syscalls {
        if let Err(e) = sud::start(hooks::syscall::route) {
            config_error(&format!("DAXSHIM_SYSCALLS=trap: {e}"));
        }
        g.block_on_leave();
    }
}

/// Devices of file systems mounted with `dax` or `dax=always` (not
/// `dax=inode`/`dax=never`, where statx tells file by file).
fn dax_mount_devices(mountinfo: &str) -> Vec<u64> {
    mountinfo
        .lines()
        .filter_map(|l| {
            // "id parent major:minor root mountpoint opts ... - fstype source superopts"
            let mut halves = l.splitn(2, " - ");
            let left: Vec<&str> = halves.next()?.split(' ').collect();
            let right: Vec<&str> = halves.next()?.split(' ').collect();
            let opts = format!("{},{}", left.get(5)?, right.get(2)?);
            let dax = opts.split(',').any(|o| o == "dax" || o == "dax=always");
            let (maj, min) = left.get(2)?.split_once(':')?;
            let dev = libc::makedev(maj.parse().ok()?, min.parse().ok()?);
            dax.then_some(dev)
        })
        .collect()
}

/// Runs at exit (after the program's own destructors): write back
/// everything, detach from every shadow, write the stats.
extern "C" fn daxshim_fini() {
    if !reentry::READY.load(Ordering::Acquire) {
        return;
    }
    // Outside the shim: the flushed bytes go through its write hook.
    if !reentry::in_shim() {
        hooks::stdio::flush_streams();
    }
    let Some(_g) = reentry::enter() else {
        return;
    };
    crate::lifecycle::shutdown();
    reentry::READY.store(false, Ordering::Release);
    let rt = crate::runtime::rt();
    if let Some(p) = &rt.cfg.stats {
        let path = stats::expand_path(p, sys::getpid());
        let json = stats::STATS.to_json(track::tracker().name(), rt.flush.name());
        if let Err(e) = std::fs::write(&path, json) {
            warn!("cannot write stats to {path}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dax_mounts_are_found_in_mountinfo() {
        let mi = "\
22 1 259:0 / / rw,relatime - ext4 /dev/vda rw
30 22 259:1 / /mnt/dax rw,relatime - ext4 /dev/pmem0 rw,dax=always
31 22 259:2 / /mnt/x rw - xfs /dev/pmem1 rw,attr2,dax
32 22 259:3 / /mnt/i rw - ext4 /dev/pmem2 rw,dax=inode
33 22 0:25 / /dev/shm rw - tmpfs tmpfs rw";
        assert_eq!(
            super::dax_mount_devices(mi),
            vec![libc::makedev(259, 1), libc::makedev(259, 2)]
        );
    }
}

#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = daxshim_init;

#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = daxshim_fini;
