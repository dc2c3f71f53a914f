//! The fallback tracker for kernels without userfaultfd write-protect in
//! async mode: write traps ([`super::traps`]) with a granule of one page.
//! Clean shadow pages are mapped read-only, the first store to one raises
//! SIGSEGV, and the shim's handler records the page and makes it writable;
//! a harvest write-protects again what it reports. The program's own
//! SIGSEGV handler keeps working: `sigaction`/`signal` for SIGSEGV are
//! interposed while write traps are in use (see `sigchain`), faults that are
//! not ours go to the program's action.

use super::traps::{Apply, Protect, Traps};
use crate::sys::SysResult;

/// Granule: one page; a set bit is a written page.
pub(super) static PAGES: Traps = Traps::new(12);

pub fn init() -> Result<(), String> {
    crate::sigchain::install_fault_handler(libc::SIGSEGV, on_segv)?;
    Ok(())
}

fn on_segv(info: &libc::siginfo_t) -> bool {
    PAGES.on_segv(info)
}

pub struct MprotectTracker;

impl super::DirtyTracker for MprotectTracker {
    fn name(&self) -> &'static str {
        "mprotect"
    }
    fn is_exact(&self) -> bool {
        true
    }
    fn track(&self, addr: usize, len: usize, _within: usize) -> SysResult<()> {
        PAGES.track(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            Protect::Now,
            None,
        )
    }
    fn track_with_prot(&self, addr: usize, len: usize, _within: usize, prot: i32) -> SysResult<()> {
        PAGES.track(addr, len, prot, Protect::Now, None)
    }
    fn untrack(&self, addr: usize, len: usize) {
        PAGES.untrack(addr, len)
    }
    fn arm(&self, addr: usize, len: usize, _within: usize) -> SysResult<()> {
        // A tail grown in place: reported whole at the next sync. (Pages
        // beyond the end of the file are protected too: a store there
        // after the file grows would otherwise go unseen.)
        PAGES.grow(addr, len)
    }
    fn harvest(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
        PAGES.harvest(addr, len, out);
        Ok(())
    }
    fn after_fork_child(&self) -> SysResult<()> {
        // Protections, the handler and the table are inherited as they are.
        Ok(())
    }
    fn before_kernel_stores(&self, addr: usize, len: usize) {
        PAGES.before_kernel_stores(addr, len)
    }
    fn on_program_mprotect(&self, addr: usize, len: usize, prot: i32, apply: Apply) -> i32 {
        PAGES.on_mprotect(addr, len, prot, apply)
    }
}
