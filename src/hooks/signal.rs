//! sigaction/signal for SIGSEGV while the mprotect tracker runs: the shim's
//! handler stays installed in the kernel; the program's action is kept here,
//! reported back to it as if installed, and run for every fault that is not
//! a tracked first store.
//!
//! # Safety
//! The trampoline runs in signal context: it reads an atomic pointer to an
//! immutable action and uses only async-signal-safe calls.

use crate::real;
use crate::sys::{self, Errno};
use libc::{c_int, c_void, sighandler_t};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// The program's action for SIGSEGV (never freed: the trampoline may be
/// reading an older one).
static PROGRAM: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
/// The tracker's test: true if the fault was a tracked first store.
static OURS: AtomicUsize = AtomicUsize::new(0);

fn leak(act: libc::sigaction) -> *mut libc::sigaction {
    Box::into_raw(Box::new(act))
}

fn default_action() -> libc::sigaction {
    // SAFETY: all-zero is SIG_DFL with no flags and an empty mask.
    unsafe { std::mem::zeroed() }
}

/// Installs the shim's SIGSEGV handler; what was installed becomes the
/// program's action.
pub fn install_segv_handler(ours: fn(&libc::siginfo_t) -> bool) -> Result<(), String> {
    OURS.store(ours as *const () as usize, Ordering::Release);
    let mut act = default_action();
    act.sa_sigaction = trampoline as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER | libc::SA_RESTART;
    let mut old = default_action();
    // SAFETY: valid sigaction structs.
    let r = unsafe { real::sigaction(libc::SIGSEGV, &act, &mut old) };
    if r != 0 {
        return Err(format!(
            "cannot install the SIGSEGV handler: {}",
            Errno(sys::get_errno())
        ));
    }
    PROGRAM.store(leak(old), Ordering::Release);
    Ok(())
}

fn tracking() -> bool {
    OURS.load(Ordering::Acquire) != 0
}

extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let ours = OURS.load(Ordering::Acquire);
    if ours != 0 && !info.is_null() {
        // SAFETY: stored from a `fn(&siginfo_t) -> bool` in install.
        let f: fn(&libc::siginfo_t) -> bool = unsafe { std::mem::transmute(ours) };
        // SAFETY: the kernel's siginfo for this signal.
        if sys::preserving_errno(|| f(unsafe { &*info })) {
            return;
        }
    }
    chain(sig, info, ctx);
}

/// Runs the program's action for a fault that is not ours.
fn chain(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let p = PROGRAM.load(Ordering::Acquire);
    // SAFETY: actions are leaked, never freed.
    let act = if p.is_null() {
        default_action()
    } else {
        unsafe { *p }
    };
    let h = act.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Put the default back and return: the instruction faults again
        // and the kernel's default action (core dump) follows, as without
        // the shim. (A fault's SIGSEGV cannot be ignored.)
        let dfl = default_action();
        // SAFETY: valid sigaction; async-signal-safe.
        unsafe { real::sigaction(sig, &dfl, std::ptr::null_mut()) };
        return;
    }
    if act.sa_flags & libc::SA_RESETHAND != 0 {
        PROGRAM.store(std::ptr::addr_of!(DEFAULT) as *mut _, Ordering::Release);
    }
    // The program's mask for its handler.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_sigmask is async-signal-safe; valid sets.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &act.sa_mask, &mut old) };
    if act.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed a three-argument handler.
        let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed a one-argument handler.
        let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
}

/// SIG_DFL for SA_RESETHAND (a static, so the trampoline never allocates).
static DEFAULT: libc::sigaction = unsafe { std::mem::zeroed() };

fn sigaction_impl(act: *const libc::sigaction, old: *mut libc::sigaction) -> Result<i32, Errno> {
    let prev = PROGRAM.load(Ordering::Acquire);
    if !old.is_null() {
        // SAFETY: the caller's out-parameter; `prev` is a leaked action.
        unsafe {
            *old = if prev.is_null() {
                default_action()
            } else {
                *prev
            }
        };
    }
    if !act.is_null() {
        // SAFETY: the caller's action.
        PROGRAM.store(leak(unsafe { *act }), Ordering::Release);
    }
    Ok(0)
}

/// # Safety
/// C ABI, contract of sigaction(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if sig != libc::SIGSEGV || !tracking() {
        // SAFETY: forwarded with the caller's own arguments.
        return unsafe { real::sigaction(sig, act, old) };
    }
    match super::enter() {
        // SAFETY: as above.
        None => unsafe { real::sigaction(sig, act, old) },
        Some(g) => g.ret(sigaction_impl(act, old)),
    }
}

/// # Safety
/// C ABI, contract of signal(2) (glibc: BSD semantics).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    if sig != libc::SIGSEGV || !tracking() {
        // SAFETY: forwarded with the caller's own arguments.
        return unsafe { real::signal(sig, handler) };
    }
    let mut act = default_action();
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    let mut old = default_action();
    match sigaction_impl(&act, &mut old) {
        Ok(_) => old.sa_sigaction,
        Err(_) => libc::SIG_ERR,
    }
}

/// # Safety
/// C ABI, contract of mprotect(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: libc::size_t, prot: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments.
    let r = unsafe { real::mprotect(addr, len, prot) };
    if r == 0 && crate::track::mprotect::active() {
        if let Some(_g) = super::enter() {
            crate::track::mprotect::on_mprotect(addr as usize, len, prot);
        }
    }
    r
}
