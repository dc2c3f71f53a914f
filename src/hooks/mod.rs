//! The exported `extern "C"` functions, by family. Each hook is a few lines:
//! enter the shim (or pass straight through when re-entered or before
//! initialisation), call a safe `*_impl`, set `errno` in one place.

pub mod fd;
pub mod io;
pub mod map;
pub mod signal;
pub mod sync;

use crate::state::READY;
use crate::sys::{self, Errno};
use std::cell::Cell;
use std::sync::atomic::Ordering;

thread_local! {
    // const-initialised, no destructor: touching it never allocates.
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
}

/// Held while a thread runs shim code; nested hooks pass through.
pub struct Entered {
    saved_errno: i32,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = IN_SHIM.try_with(|c| c.set(false));
        // Handlers of signals that arrived inside run now, outside.
        signal::run_deferred();
    }
}

/// Is this thread inside the shim? (Read by signal trampolines.)
#[inline]
pub fn in_shim() -> bool {
    IN_SHIM.try_with(|c| c.get()).unwrap_or(true)
}

/// Enters the shim unless this thread is already inside it or the shim is
/// not initialised yet. Handlers of asynchronous signals that arrive inside
/// are deferred until the thread leaves (see [`signal`]), so that a
/// handler's own I/O never runs nested inside the shim.
#[inline]
pub fn enter() -> Option<Entered> {
    if !READY.load(Ordering::Acquire) {
        return None;
    }
    enter_always()
}

/// Enters even before `READY` (the constructor itself).
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
    })
}

impl Entered {
    /// A handle for a section entered earlier whose guard was forgotten
    /// (the atfork handlers); dropping it leaves the shim.
    pub fn assume_entered() -> Entered {
        Entered {
            saved_errno: sys::get_errno(),
        }
    }

    pub fn restore_errno(&self) {
        sys::set_errno(self.saved_errno);
    }

    /// Converts an impl result to the C convention: the value, or -1 with
    /// errno. On success the caller's errno is left as it was on entry.
    pub fn ret<T: From<i8>>(&self, r: Result<T, Errno>) -> T {
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

/// The result of a real libc call returning -1/errno, as a Result.
pub fn check_int(r: i32) -> Result<i32, Errno> {
    if r < 0 {
        Err(Errno(sys::get_errno()))
    } else {
        Ok(r)
    }
}

pub fn check_ssize(r: isize) -> Result<isize, Errno> {
    if r < 0 {
        Err(Errno(sys::get_errno()))
    } else {
        Ok(r)
    }
}
