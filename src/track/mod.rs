//! Dirty tracking: which pages of this process's shadow mappings were
//! written since the last harvest. One trait, [`DirtyTracker`], three
//! backends, one chosen at start-up:
//!
//! - [`uffd::UffdTracker`]: userfaultfd write-protect in async mode with
//!   `PAGEMAP_SCAN` (exact, no signals, in-kernel);
//! - [`mprotect::MprotectTracker`]: write-protection and SIGSEGV (kernels
//!   without uffd write-protect in async mode);
//! - [`CompareTracker`]: tracks nothing; every sync compares the whole file
//!   (the correctness oracle).

pub mod marks;
pub mod mprotect;
pub mod traps;
pub mod uffd;

pub use traps::{Apply, MarkAt, Protect};

use crate::config::TrackerKind;
use crate::sys::SysResult;
use std::sync::atomic::{AtomicU8, Ordering};

/// Whether a mapping's stores are tracked (a shared mapping of a writable
/// descriptor) or cannot happen / do not matter.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    Tracked,
    Untracked,
}

impl Stores {
    pub fn tracked_if(tracked: bool) -> Stores {
        if tracked {
            Stores::Tracked
        } else {
            Stores::Untracked
        }
    }
}

pub trait DirtyTracker: Sync {
    fn name(&self) -> &'static str;
    /// Whether harvests are exact. `false`: syncs must compare everything.
    fn is_exact(&self) -> bool;
    /// Starts tracking a fresh shadow mapping: nothing in it counts as
    /// written yet. Its first `within` bytes lie inside the file (see
    /// [`DirtyTracker::arm`]).
    fn track(&self, addr: usize, len: usize, within: usize) -> SysResult<()>;
    /// `track` for a mapping the program asked `prot` for.
    fn track_with_prot(&self, addr: usize, len: usize, within: usize, _prot: i32) -> SysResult<()> {
        self.track(addr, len, within)
    }
    /// The range is gone (unmapped, moved or replaced).
    fn untrack(&self, _addr: usize, _len: usize) {}
    /// Arms part of an already tracked range (a tail grown in place), of
    /// which the first `within` bytes lie inside the file. A tracker that
    /// reports a page it never armed as written may leave the rest unarmed:
    /// nothing can be stored beyond the end of the file, and the
    /// userfaultfd tracker arms a page by giving it a page table entry,
    /// which every later truncation of the file walks.
    fn arm(&self, addr: usize, len: usize, within: usize) -> SysResult<()>;
    /// Reports every page range written since the last harvest (address,
    /// length) and re-arms it.
    fn harvest(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()>;
    /// In a forked child: drop the parent's handles and start afresh (the
    /// caller then tracks its ranges again).
    fn after_fork_child(&self) -> SysResult<()>;
    /// The kernel is about to store into `[addr, addr+len)` for the program
    /// (only called where [`write_protects_pages`]).
    fn before_kernel_stores(&self, _addr: usize, _len: usize) {}
    /// The program changes the protection of `[addr, addr+len)` (`apply`
    /// does it and gives `mprotect`'s result, which this returns).
    fn on_program_mprotect(&self, _addr: usize, _len: usize, _prot: i32, apply: Apply) -> i32 {
        apply()
    }
    /// A tracked shared mapping the program asked `prot` for: where the
    /// tracker scans for written pages, traps first stores to its regions
    /// so that a harvest scans only regions written since the last one
    /// (the userfaultfd tracker, for mappings of `DAXSHIM_TRAP_MIN` or
    /// more).
    /// `force`: whatever its size (a remapped range that was trapped: its
    /// regions may be read-only). `protect`: how it starts
    /// ([`Protect::Later`]: the caller maps it without `PROT_WRITE`).
    /// `marks`: where its stores are marked for other processes (a lazy
    /// shared shadow). True if its regions are trapped.
    fn trap_stores(
        &self,
        _addr: usize,
        _len: usize,
        _prot: i32,
        _force: bool,
        _protect: Protect,
        _marks: &dyn Fn() -> Option<MarkAt>,
    ) -> bool {
        false
    }
    /// The protection recorded for a trapped range holding `addr`.
    fn trapped_prot(&self, _addr: usize) -> Option<i32> {
        None
    }
    /// The parts of `[addr, addr+len)` that may hold pages written since
    /// the last harvest (regions reported whole are trapped again before
    /// they are reported). The caller harvests only these.
    fn take_hot(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) {
        out(addr, len)
    }
    /// Can missing pages of shadow mappings be filled on first access
    /// ([`crate::lazy`])? Needs a userfaultfd that serves the kernel's own
    /// faults too.
    fn fills_lazily(&self) -> bool {
        false
    }
    /// Registers a lazily filled mapping (missing and minor faults go to the
    /// fault thread), its stores tracked or not.
    fn register_lazy(
        &self,
        _addr: usize,
        _len: usize,
        _stores: Stores,
        _shared: bool,
    ) -> SysResult<()> {
        Err(crate::sys::Errno(libc::ENOTSUP))
    }
    /// Is `fd` one of the tracker's own descriptors?
    fn owns_fd(&self, _fd: i32) -> bool {
        false
    }
}

pub struct CompareTracker;

impl DirtyTracker for CompareTracker {
    fn name(&self) -> &'static str {
        "compare"
    }
    fn is_exact(&self) -> bool {
        false
    }
    fn track(&self, _: usize, _: usize, _: usize) -> SysResult<()> {
        Ok(())
    }
    fn arm(&self, _: usize, _: usize, _: usize) -> SysResult<()> {
        Ok(())
    }
    fn harvest(&self, _: usize, _: usize, _: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
        Ok(())
    }
    fn after_fork_child(&self) -> SysResult<()> {
        Ok(())
    }
}

static UFFD: uffd::UffdTracker = uffd::UffdTracker;
static MPROTECT: mprotect::MprotectTracker = mprotect::MprotectTracker;
static COMPARE: CompareTracker = CompareTracker;
const USE_UFFD: u8 = 0;
const USE_MPROTECT: u8 = 1;
const USE_COMPARE: u8 = 2;
static CHOSEN: AtomicU8 = AtomicU8::new(USE_COMPARE);

/// The tracker this process uses.
pub fn tracker() -> &'static dyn DirtyTracker {
    match CHOSEN.load(Ordering::Relaxed) {
        USE_UFFD => &UFFD,
        USE_MPROTECT => &MPROTECT,
        _ => &COMPARE,
    }
}

/// Chooses the backend once at start-up. An explicit choice the kernel
/// refuses is an error; `auto` falls back from uffd to mprotect to compare.
pub fn select(kind: TrackerKind) -> Result<&'static dyn DirtyTracker, String> {
    let chosen = match kind {
        TrackerKind::Compare => USE_COMPARE,
        TrackerKind::Uffd => match uffd::init() {
            Ok(()) => USE_UFFD,
            Err(e) => return Err(format!("userfaultfd tracking unavailable: {e}")),
        },
        TrackerKind::Mprotect => match mprotect::init() {
            Ok(()) => USE_MPROTECT,
            Err(e) => return Err(format!("mprotect tracking unavailable: {e}")),
        },
        TrackerKind::Auto => match uffd::init() {
            Ok(()) => USE_UFFD,
            Err(e) => {
                info!("userfaultfd tracking unavailable ({e}); write-protecting instead");
                match mprotect::init() {
                    Ok(()) => USE_MPROTECT,
                    Err(e) => {
                        info!("{e}; comparing whole files at sync");
                        USE_COMPARE
                    }
                }
            }
        },
    };
    CHOSEN.store(chosen, Ordering::Relaxed);
    Ok(tracker())
}

/// Does the tracker in use make every clean page read-only (the mprotect
/// tracker)? Then a remapped range is tracked afresh. One relaxed load.
#[inline]
pub fn write_protects_pages() -> bool {
    CHOSEN.load(Ordering::Relaxed) == USE_MPROTECT
}

/// Can a page of a shadow mapping be read-only to trap stores (the
/// mprotect tracker, or region traps of the userfaultfd tracker)? Then the
/// kernel's own stores need [`DirtyTracker::before_kernel_stores`] first and
/// the program's `mprotect` calls [`DirtyTracker::on_program_mprotect`].
#[inline]
pub fn traps_stores() -> bool {
    write_protects_pages() || uffd::traps_in_use()
}

/// Fork: the write-trap tables (see `lifecycle`).
pub fn hold_for_fork() {
    mprotect::PAGES.hold_for_fork();
    uffd::REGIONS.hold_for_fork();
}

/// # Safety
/// After [`hold_for_fork`], in the parent or (`child`) the child.
pub unsafe fn release_after_fork(child: bool) {
    // SAFETY: per the contract.
    unsafe {
        uffd::REGIONS.release_after_fork(child);
        mprotect::PAGES.release_after_fork(child);
    }
}

/// Falls back to full compare (a forked child that cannot track).
pub fn force_compare() {
    CHOSEN.store(USE_COMPARE, Ordering::Relaxed);
}
