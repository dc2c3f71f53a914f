//! Dirty tracking: which pages of this process's shadow mappings were
//! written since the last harvest.
//!
//! Backends: userfaultfd write-protect in async mode with `PAGEMAP_SCAN`
//! (exact, no signals), and full compare (no tracking at all; every sync
//! compares the whole file), which is the correctness oracle.

pub mod uffd;

use crate::config::TrackerKind;
use crate::sys::SysResult;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uffd,
    Compare,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uffd => "uffd",
            Backend::Compare => "compare",
        }
    }
}

static BACKEND: AtomicU8 = AtomicU8::new(1);

pub fn backend() -> Backend {
    if BACKEND.load(Ordering::Relaxed) == 0 {
        Backend::Uffd
    } else {
        Backend::Compare
    }
}

/// Chooses the backend once at start-up. `Uffd` that the kernel refuses is
/// an error for an explicit request and a fallback for `Auto`.
pub fn select(kind: TrackerKind) -> Result<Backend, String> {
    let b = match kind {
        TrackerKind::Compare => Backend::Compare,
        TrackerKind::Uffd => match uffd::init() {
            Ok(()) => Backend::Uffd,
            Err(e) => return Err(format!("userfaultfd tracking unavailable: {e}")),
        },
        TrackerKind::Auto => match uffd::init() {
            Ok(()) => Backend::Uffd,
            Err(e) => {
                info!("userfaultfd tracking unavailable ({e}); comparing whole files at sync");
                Backend::Compare
            }
        },
    };
    BACKEND.store(if b == Backend::Uffd { 0 } else { 1 }, Ordering::Relaxed);
    Ok(b)
}

/// Starts tracking `[addr, addr+len)` (a fresh shadow mapping): nothing in it
/// counts as written yet.
pub fn track(addr: usize, len: usize) -> SysResult<()> {
    match backend() {
        Backend::Uffd => uffd::register_and_arm(addr, len),
        Backend::Compare => Ok(()),
    }
}

/// Arms `[addr, addr+len)` of an already registered range (grown tail).
pub fn arm(addr: usize, len: usize) -> SysResult<()> {
    match backend() {
        Backend::Uffd => uffd::harvest(addr, len, &mut |_, _| {}),
        Backend::Compare => Ok(()),
    }
}

/// Reports every page range written since the last harvest and re-arms it.
pub fn harvest(addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
    match backend() {
        Backend::Uffd => uffd::harvest(addr, len, out),
        Backend::Compare => Ok(()),
    }
}

/// In a forked child: drop the parent's tracker handles and start afresh.
pub fn after_fork_child() -> SysResult<()> {
    match backend() {
        Backend::Uffd => uffd::reinit_in_child(),
        Backend::Compare => Ok(()),
    }
}

/// Falls back to full compare (a forked child that cannot track).
pub fn force_compare() {
    BACKEND.store(1, Ordering::Relaxed);
}
