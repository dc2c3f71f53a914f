//! The program's signal actions, and the shim's handlers in front of them.
//!
//! 1. **Deferred handlers.** A handler that interrupts a thread inside the
//!    shim must not run there: its own I/O would pass straight through
//!    (bypassing the shadow), or deadlock on a lock the thread holds. The
//!    shim installs a trampoline in the kernel in place of each handler the
//!    program installs for an asynchronous signal; inside the shim the
//!    trampoline only records the signal ([`crate::reentry`]), and the thread
//!    queues it to itself again when it leaves the shim, so the kernel
//!    delivers it then. Outside the shim the trampoline calls the handler. No system call on the hook
//!    path (blocking signals around every hook cost two).
//! 2. **SIGSEGV for write traps, SIGBUS for lazy faults**: the shim's
//!    handlers stay installed; the program's action runs for every fault
//!    that is not the shim's (a trapped first store, a lazy page to fill).
//!
//! The program sees its own actions through `sigaction`/`signal`
//! ([`sigaction_impl`], called by the exported hooks).
//!
//! # Safety
//! Trampolines run in signal context: they read the program's actions
//! through a per-signal sequence lock (writers block signals while
//! writing), use thread-local storage of the preloaded library (static TLS)
//! and only async-signal-safe calls.

use crate::real;
use crate::reentry::{self, NSIG};
use crate::sys::{self, Errno};
use libc::{c_int, c_void, sighandler_t};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// `SIGSYS` belongs to the shim's Syscall User Dispatch handler
/// ([`crate::sud`]); the program's action runs for the `SIGSYS` it did not
/// cause.
static SIGSYS_OWNED: AtomicBool = AtomicBool::new(false);

/// Takes `SIGSYS` over (the shim's handler is installed): `prev` becomes the
/// program's action.
pub fn own_sigsys(prev: &libc::sigaction) {
    set_program_action(libc::SIGSYS as usize, prev);
    SIGSYS_OWNED.store(true, Ordering::Release);
}

fn sigsys_owned() -> bool {
    SIGSYS_OWNED.load(Ordering::Acquire)
}

/// No mask may block a signal the shim raises on purpose: `SIGSYS` while
/// it owns it (a system call trapped while it is blocked kills the
/// process), `SIGBUS`/`SIGSEGV` while its fault handlers serve them (a
/// fault's blocked signal kills too).
pub fn without_shim_signals(mut mask: libc::sigset_t) -> libc::sigset_t {
    for (sig, owned) in [
        (libc::SIGSYS, sigsys_owned()),
        (libc::SIGBUS, owns_fault(libc::SIGBUS)),
        (libc::SIGSEGV, owns_fault(libc::SIGSEGV)),
    ] {
        if owned {
            // SAFETY: a valid set.
            unsafe { libc::sigdelset(&mut mask, sig) };
        }
    }
    mask
}

/// The program's action for each signal, as it believes it installed it.
struct Actions {
    seq: [AtomicU32; NSIG],
    /// Whether the program (or the kernel's state at start-up) set it.
    known: [AtomicBool; NSIG],
    acts: [UnsafeCell<libc::sigaction>; NSIG],
}

// SAFETY: `acts[i]` is written only by the holder of the odd `seq[i]`
// (signals blocked), read by seqlock readers that retry on change.
unsafe impl Sync for Actions {}

#[allow(clippy::declare_interior_mutable_const)]
const SEQ0: AtomicU32 = AtomicU32::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const NO: AtomicBool = AtomicBool::new(false);
// SAFETY: all-zero is a valid sigaction (SIG_DFL, no flags, empty mask).
#[allow(clippy::declare_interior_mutable_const)]
const DFL: UnsafeCell<libc::sigaction> = UnsafeCell::new(unsafe { std::mem::zeroed() });

static ACTIONS: Actions = Actions {
    seq: [SEQ0; NSIG],
    known: [NO; NSIG],
    acts: [DFL; NSIG],
};

pub fn default_action() -> libc::sigaction {
    // SAFETY: all-zero is SIG_DFL with no flags and an empty mask.
    unsafe { std::mem::zeroed() }
}

fn program_action(sig: usize) -> libc::sigaction {
    loop {
        let s1 = ACTIONS.seq[sig].load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        // SAFETY: a racing write is detected by the sequence check below.
        let a = unsafe { std::ptr::read_volatile(ACTIONS.acts[sig].get()) };
        std::sync::atomic::fence(Ordering::Acquire);
        if ACTIONS.seq[sig].load(Ordering::Relaxed) == s1 {
            return a;
        }
    }
}

fn set_program_action(sig: usize, act: &libc::sigaction) {
    // No trampoline of this thread may read a half-written action.
    let _block = sys::SignalBlock::all();
    loop {
        let s = ACTIONS.seq[sig].load(Ordering::Relaxed);
        if s & 1 == 0
            && ACTIONS.seq[sig]
                .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            break;
        }
        std::hint::spin_loop();
    }
    // SAFETY: we hold the odd sequence number (exclusive writer).
    unsafe { std::ptr::write_volatile(ACTIONS.acts[sig].get(), *act) };
    ACTIONS.known[sig].store(true, Ordering::Release);
    ACTIONS.seq[sig].fetch_add(1, Ordering::Release);
}

/// Signals whose handlers are deferred: the asynchronous ones. Faults
/// (and `abort`'s SIGABRT) concern the instruction that raised them.
fn deferrable(sig: c_int) -> bool {
    (1..NSIG as c_int).contains(&sig)
        && !matches!(
            sig,
            libc::SIGSEGV
                | libc::SIGBUS
                | libc::SIGILL
                | libc::SIGFPE
                | libc::SIGTRAP
                | libc::SIGSYS
                | libc::SIGABRT
                | libc::SIGKILL
                | libc::SIGSTOP
        )
}

fn is_handler(h: sighandler_t) -> bool {
    h != libc::SIG_DFL && h != libc::SIG_IGN && h != libc::SIG_ERR
}

/// The trampoline the kernel runs for a deferrable signal with a handler.
extern "C" fn defer_trampoline(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if reentry::in_shim() {
        reentry::defer_signal(sig as usize, info);
        return;
    }
    call_program(sig, info, ctx, MaskedBy::Kernel);
}

/// Who applies the program's action's signal mask around its handler.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MaskedBy {
    /// The kernel did (the trampoline was installed with the action's mask).
    Kernel,
    /// The shim's own handler ran with the shim's mask (SIGSEGV): applied
    /// here.
    Shim,
}

/// Runs the program's action for `sig`.
fn call_program(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void, masked_by: MaskedBy) {
    let apply_mask = masked_by == MaskedBy::Shim;
    let i = sig as usize;
    let act = program_action(i);
    let h = act.sa_sigaction;
    if !is_handler(h) {
        if h == libc::SIG_DFL {
            // Changed meanwhile to the default: let the kernel apply it.
            let dfl = default_action();
            // SAFETY: valid sigaction; async-signal-safe calls.
            unsafe {
                real::sigaction(sig, &dfl, std::ptr::null_mut());
                libc::raise(sig);
            }
        }
        return;
    }
    if act.sa_flags & libc::SA_RESETHAND != 0 {
        // Emulated (the trampoline is installed without it, so that a
        // queued-again signal still reaches it): the default from now on.
        set_program_action(i, &default_action());
        if deferrable(sig) {
            let dfl = default_action();
            // SAFETY: valid sigaction; async-signal-safe.
            unsafe { real::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
    }
    // SAFETY: an all-zero sigset is a valid (empty) set.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    if apply_mask {
        let mut mask = without_shim_signals(act.sa_mask);
        if act.sa_flags & libc::SA_NODEFER == 0 {
            // SAFETY: valid set.
            unsafe { libc::sigaddset(&mut mask, sig) };
        }
        // SAFETY: async-signal-safe; valid sets.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &mask, &mut old) };
    }
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
    if apply_mask {
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
}

/// At start-up: handlers installed before the shim (another library's
/// constructor) are deferred too.
pub fn adopt_installed_handlers() {
    for sig in 1..NSIG as c_int {
        if !deferrable(sig) {
            continue;
        }
        let mut cur = default_action();
        // SAFETY: query only.
        if unsafe { real::sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
            continue;
        }
        set_program_action(sig as usize, &cur);
        if is_handler(cur.sa_sigaction) {
            let _ = install_kernel_action(sig, &cur);
        }
    }
}

/// Installs in the kernel what stands for the program's action `act`.
fn install_kernel_action(sig: c_int, act: &libc::sigaction) -> Result<(), Errno> {
    let mut k = *act;
    k.sa_mask = without_shim_signals(k.sa_mask);
    if deferrable(sig) && is_handler(act.sa_sigaction) {
        k.sa_sigaction = defer_trampoline as *const () as usize;
        k.sa_flags = (k.sa_flags | libc::SA_SIGINFO) & !libc::SA_RESETHAND;
    }
    // SAFETY: a valid sigaction.
    if unsafe { real::sigaction(sig, &k, std::ptr::null_mut()) } != 0 {
        return Err(Errno(sys::get_errno()));
    }
    Ok(())
}

// ---- SIGSEGV (write traps) and SIGBUS (lazy faults in the faulting thread)

/// The shim's tests, per fault signal: true if the fault was the shim's
/// (a trapped first store; a lazy page now filled).
static OURS_SEGV: AtomicUsize = AtomicUsize::new(0);
static OURS_BUS: AtomicUsize = AtomicUsize::new(0);

fn ours_slot(sig: c_int) -> Option<&'static AtomicUsize> {
    match sig {
        libc::SIGSEGV => Some(&OURS_SEGV),
        libc::SIGBUS => Some(&OURS_BUS),
        _ => None,
    }
}

/// Installs the shim's handler for a fault signal (SIGSEGV or SIGBUS);
/// what was installed becomes the program's action.
pub fn install_fault_handler(sig: c_int, ours: fn(&libc::siginfo_t) -> bool) -> Result<(), String> {
    let Some(slot) = ours_slot(sig) else {
        return Err(format!("signal {sig} is not a fault signal"));
    };
    let mut act = default_action();
    act.sa_sigaction = fault_trampoline as *const () as usize;
    // SIGSEGV may be a stack overflow: the program's alternate stack, if
    // it has one. A lazy fill (SIGBUS) needs more stack than an alternate
    // stack is sized for, and the faulting thread's own is fine.
    let onstack = if sig == libc::SIGSEGV {
        libc::SA_ONSTACK
    } else {
        0
    };
    act.sa_flags = libc::SA_SIGINFO | onstack | libc::SA_NODEFER | libc::SA_RESTART;
    let mut old = default_action();
    // SAFETY: valid sigaction structs.
    let r = unsafe { real::sigaction(sig, &act, &mut old) };
    if r != 0 {
        return Err(format!(
            "cannot install the handler of signal {sig}: {}",
            Errno(sys::get_errno())
        ));
    }
    set_program_action(sig as usize, &old);
    slot.store(ours as *const () as usize, Ordering::Release);
    Ok(())
}

/// Does the shim's handler stand in front of this fault signal?
pub fn owns_fault(sig: c_int) -> bool {
    ours_slot(sig).is_some_and(|s| s.load(Ordering::Acquire) != 0)
}

extern "C" fn fault_trampoline(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let ours = ours_slot(sig).map_or(0, |s| s.load(Ordering::Acquire));
    if ours != 0 && !info.is_null() {
        // SAFETY: stored from a `fn(&siginfo_t) -> bool` in install.
        let f: fn(&libc::siginfo_t) -> bool = unsafe { std::mem::transmute(ours) };
        // SAFETY: the kernel's siginfo for this signal.
        if sys::preserving_errno(|| f(unsafe { &*info })) {
            return;
        }
    }
    let act = program_action(sig as usize);
    if !is_handler(act.sa_sigaction) {
        // Put the default back and return: the instruction faults again
        // and the kernel's default action (core dump) follows, as without
        // the shim. (A fault's signal cannot be ignored.)
        let dfl = default_action();
        // SAFETY: valid sigaction; async-signal-safe.
        unsafe { real::sigaction(sig, &dfl, std::ptr::null_mut()) };
        return;
    }
    call_program(sig, info, ctx, MaskedBy::Shim);
}

// ---- the program's view ---------------------------------------------------

/// Does the shim stand in front of the program's action for `sig`?
pub fn interposed(sig: c_int) -> bool {
    owns_fault(sig) || (sig == libc::SIGSYS && sigsys_owned()) || deferrable(sig)
}

/// Runs the program's action for a signal the shim's own handler took but
/// did not cause (a seccomp `SIGSYS`).
pub fn run_program_action(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    call_program(sig, info, ctx, MaskedBy::Shim);
}

/// `sigaction` as the program sees it: its own action is kept (and, for a
/// deferrable handler, a trampoline installed in the kernel).
pub fn sigaction_impl(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> Result<i32, Errno> {
    let i = sig as usize;
    let prev = if ACTIONS.known[i].load(Ordering::Acquire) {
        program_action(i)
    } else {
        let mut cur = default_action();
        // SAFETY: query only.
        if unsafe { real::sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
            return Err(Errno(sys::get_errno()));
        }
        cur
    };
    if !act.is_null() {
        // SAFETY: the caller's action.
        let a = unsafe { *act };
        let shim_owned = owns_fault(sig) || (sig == libc::SIGSYS && sigsys_owned());
        if !shim_owned {
            install_kernel_action(sig, &a)?;
        }
        set_program_action(i, &a);
    }
    if !old.is_null() {
        // SAFETY: the caller's out-parameter.
        unsafe { *old = prev };
    }
    Ok(0)
}
