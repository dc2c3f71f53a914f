//! `sigaction` and `signal`: the program sees its own actions
//! ([`crate::sigchain`] keeps them and stands in front of them).

use crate::reentry::READY;
use crate::sigchain::{default_action, interposed, sigaction_impl, without_shim_signals};
use crate::{real, sys};
use libc::{c_int, sighandler_t};
use std::sync::atomic::Ordering;

/// # Safety
/// C ABI, contract of sigaction(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    // No `enter`: sigaction is async-signal-safe and takes no shim lock.
    if !READY.load(Ordering::Acquire) || !interposed(sig) {
        // SAFETY: forwarded with the caller's own arguments.
        return unsafe { real::sigaction(sig, act, old) };
    }
    match sigaction_impl(sig, act, old) {
        Ok(r) => r,
        Err(e) => {
            sys::set_errno(e.0);
            -1
        }
    }
}

/// # Safety
/// C ABI, contract of signal(2) (glibc: BSD semantics).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    if !READY.load(Ordering::Acquire) || !interposed(sig) {
        // SAFETY: forwarded with the caller's own arguments.
        return unsafe { real::signal(sig, handler) };
    }
    let mut act = default_action();
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: valid set.
    unsafe { libc::sigaddset(&mut act.sa_mask, sig) };
    let mut old = default_action();
    match sigaction_impl(sig, &act, &mut old) {
        Ok(_) => old.sa_sigaction,
        Err(e) => {
            sys::set_errno(e.0);
            libc::SIG_ERR
        }
    }
}

/// Calls `set_mask` with the set the kernel gets for a mask the program
/// sets: without the signals the shim raises on purpose
/// ([`without_shim_signals`]).
fn with_shim_signals_unblocked(
    how: c_int,
    set: *const libc::sigset_t,
    set_mask: impl FnOnce(*const libc::sigset_t) -> c_int,
) -> c_int {
    if set.is_null() || how == libc::SIG_UNBLOCK || !READY.load(Ordering::Acquire) {
        return set_mask(set);
    }
    // SAFETY: the caller's valid set.
    let fixed = without_shim_signals(unsafe { *set });
    set_mask(&fixed)
}

/// # Safety
/// C ABI, contract of sigprocmask(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: forwarded with the caller's arguments (a copy of its set).
    with_shim_signals_unblocked(how, set, |set| unsafe { real::sigprocmask(how, set, old) })
}

/// # Safety
/// C ABI, contract of pthread_sigmask(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: forwarded with the caller's arguments (a copy of its set).
    with_shim_signals_unblocked(how, set, |set| unsafe {
        real::pthread_sigmask(how, set, old)
    })
}
