//! Re-entrancy: is this thread running shim code, and is the shim ready?
//!
//! A hook entered while the thread is already inside the shim (the shim's
//! own libc calls, an allocator that maps memory) or before the constructor
//! finished passes straight through to the real function. Signals whose
//! handlers arrive while a thread is inside are recorded here by the
//! trampolines of [`crate::sigchain`] and queued again to the thread when it
//! leaves ([`Entered`]'s drop), so that a handler's own I/O never runs
//! nested inside the shim.
//!
//! # Safety
//! The thread-locals are const-initialised without destructors: touching
//! them never allocates, so they are usable from signal handlers.

use crate::sys;
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the constructor once the configuration is parsed and the real
/// functions are resolved; cleared at exit after the final writeback.
pub static READY: AtomicBool = AtomicBool::new(false);

/// Signal numbers are below this.
pub const NSIG: usize = 65;

thread_local! {
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
    /// This thread's Syscall User Dispatch selector ([`crate::sud`]): the
    /// kernel reads it at every system call once dispatch is on for the
    /// thread. `BLOCK` while the program runs, `ALLOW` while the shim does.
    static SELECTOR: Cell<u8> = const { Cell::new(ALLOW) };
    /// Dispatch is on for this thread (its resting selector is `BLOCK`).
    static DISPATCHED: Cell<bool> = const { Cell::new(false) };
    /// Deferred signals of this thread (bit n: signal n).
    static PENDING: Cell<u64> = const { Cell::new(0) };
    static INFOS: UnsafeCell<[libc::siginfo_t; NSIG]> = const { UnsafeCell::new(no_infos()) };
}

const fn no_infos() -> [libc::siginfo_t; NSIG] {
    // SAFETY: an all-zero siginfo is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Selector values (`SYSCALL_DISPATCH_FILTER_*`).
pub const ALLOW: u8 = 0;
pub const BLOCK: u8 = 1;

/// Sets this thread's selector; returns the previous value.
#[inline]
pub fn set_selector(v: u8) -> u8 {
    SELECTOR.try_with(|c| c.replace(v)).unwrap_or(ALLOW)
}

/// The address of this thread's selector (handed to the kernel).
pub fn selector_addr() -> *mut u8 {
    SELECTOR
        .try_with(|c| c.as_ptr())
        .unwrap_or(std::ptr::null_mut())
}

/// Records that dispatch is on for this thread.
pub fn set_dispatched(on: bool) {
    let _ = DISPATCHED.try_with(|c| c.set(on));
}

/// The selector of this thread outside the shim.
fn resting_selector() -> u8 {
    if DISPATCHED.try_with(|c| c.get()).unwrap_or(false) {
        BLOCK
    } else {
        ALLOW
    }
}

/// While held, this thread's system calls are not dispatched: the shim's
/// own calls into libc (whose `syscall` instructions are outside the
/// shim's allowed range) go to the kernel directly. Free when dispatch is
/// off: the kernel never reads the byte.
pub struct Open(u8);

impl Open {
    #[inline]
    pub fn new() -> Open {
        Open(set_selector(ALLOW))
    }
}

impl Drop for Open {
    #[inline]
    fn drop(&mut self) {
        set_selector(self.0);
    }
}

/// Held while a thread runs shim code; nested hooks pass through.
pub struct Entered {
    saved_errno: i32,
    /// The selector is `ALLOW` inside; this is the one to restore.
    selector: u8,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = IN_SHIM.try_with(|c| c.set(false));
        // The selector first: a handler run by the requeue below is the
        // program's code, whose system calls trap.
        set_selector(self.selector);
        // Signals that arrived inside are delivered now, outside.
        requeue_deferred();
    }
}

/// Is this thread inside the shim? (Read by signal trampolines.)
#[inline]
pub fn in_shim() -> bool {
    IN_SHIM.try_with(|c| c.get()).unwrap_or(true)
}

/// Enters the shim unless this thread is already inside it or the shim is
/// not initialised yet.
#[inline]
pub fn enter() -> Option<Entered> {
    if !READY.load(Ordering::Acquire) {
        return None;
    }
    enter_always()
}

/// Enters even before `READY` (the constructor, the fault thread).
pub fn enter_always() -> Option<Entered> {
    let fresh = IN_SHIM
        .try_with(|c| {
            if c.get() {
                false
            } else {
                c.set(true);
                true
            }
        })
        .unwrap_or(false);
    fresh.then(|| Entered {
        saved_errno: sys::get_errno(),
        selector: set_selector(ALLOW),
    })
}

impl Entered {
    /// A handle for a section entered earlier whose guard was forgotten
    /// (the atfork handlers); dropping it leaves the shim.
    pub fn assume_entered() -> Entered {
        Entered {
            saved_errno: sys::get_errno(),
            selector: resting_selector(),
        }
    }

    /// Leaves the shim with the selector at `BLOCK` (dispatch was turned on
    /// for this thread inside).
    pub fn block_on_leave(&mut self) {
        self.selector = BLOCK;
    }

    pub fn restore_errno(&self) {
        sys::set_errno(self.saved_errno);
    }

    /// Converts an impl result to the C convention: the value, or -1 with
    /// errno. On success the caller's errno is left as it was on entry.
    pub fn ret<T: From<i8>>(&self, r: Result<T, sys::Errno>) -> T {
        match r {
            Ok(v) => {
                sys::set_errno(self.saved_errno);
                v
            }
            Err(e) => {
                sys::set_errno(e.0);
                T::from(-1)
            }
        }
    }
}

/// Called from a signal trampoline while this thread is inside the shim:
/// remember the signal and its `siginfo` for [`requeue_deferred`].
pub fn defer_signal(sig: usize, info: *const libc::siginfo_t) {
    if !info.is_null() {
        let _ = INFOS.try_with(|v| {
            // SAFETY: this thread's own storage; the signal is blocked
            // while its trampoline runs (unless SA_NODEFER, when a nested
            // copy of the same info is harmless); `info` is the kernel's.
            unsafe { (*v.get())[sig] = *info };
        });
    }
    let _ = PENDING.try_with(|p| p.set(p.get() | 1 << sig));
}

/// Signals that arrived while this thread was inside are queued again to
/// it, with their `siginfo`, so that the kernel delivers them now (or, if
/// the thread blocks them, e.g. inside the handler of the same signal, when
/// it unblocks them), with its own rules for masks, nesting and the machine
/// context. No system call unless a signal is pending.
#[inline]
fn requeue_deferred() {
    if PENDING.try_with(|p| p.get()).unwrap_or(0) != 0 {
        requeue_deferred_slow();
    }
}

#[cold]
fn requeue_deferred_slow() {
    let pending = PENDING.try_with(|p| p.replace(0)).unwrap_or(0);
    for sig in 1..NSIG {
        if pending & (1 << sig) == 0 {
            continue;
        }
        // SAFETY: an all-zero siginfo is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let _ = INFOS.try_with(|v| {
            // SAFETY: this thread's own storage.
            info = unsafe { (*v.get())[sig] };
        });
        sys::preserving_errno(|| sys::requeue_signal(sig as i32, &info));
    }
}
