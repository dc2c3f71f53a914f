//! Syscall User Dispatch (`DAXSHIM_SYSCALLS=trap`): the system calls that
//! `LD_PRELOAD` cannot see — raw `syscall()`, libc's internal calls (the
//! `write` inside `dprintf`), inline `syscall` instructions — raise
//! `SIGSYS`, and the shim's handler routes those that concern its files
//! through the hooks and performs every other one itself.
//!
//! How it fits together:
//! - Each thread of the program turns dispatch on for itself
//!   ([`enable_this_thread`]: the main thread at start-up, threads from
//!   `pthread_create` in their first instruction, a forked child in the
//!   atfork handler; the kernel clears it on `clone` and `exec`). Its
//!   selector byte ([`crate::reentry`]) is `BLOCK` while the program runs
//!   and `ALLOW` while the shim does (entered hooks, calls into libc).
//! - The only code the kernel always lets through is this module's stubs
//!   (one small section): the `SIGSYS` handler's restorer (`rt_sigreturn`
//!   must not trap), the system-call stub the handler performs the
//!   program's calls with, and the trampolines below.
//! - Calls that cannot be performed inside a signal handler are re-issued
//!   in the program's context from a stub: `rt_sigreturn` (the frame is the
//!   program's) and the `clone` family (the child must start where the
//!   parent returns: the stub jumps back through a per-thread slot).
//! - The signal mask is the program's, kept in the handler's `ucontext`:
//!   `rt_sigprocmask` is emulated there. `SIGSYS` is never blocked (a
//!   blocked forced signal kills the process): it is taken out of every
//!   mask the program installs.
//! - A `SIGSYS` the shim did not cause (seccomp's `SECCOMP_RET_TRAP`, a
//!   `kill`) goes to the program's own `SIGSYS` action ([`crate::sigchain`]).
//!
//! # Safety
//! The handler runs in signal context: no allocation, no locks of its own,
//! system calls through the stub; the routed hooks it calls are the ones
//! the program would have called, entered as usual (signals that arrive
//! inside are deferred).

use crate::reentry::{self, Open, BLOCK};
use crate::sigchain;
use crate::sys::{self, Errno};
use libc::{c_int, c_long, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

// The allowed range: everything between `daxshim_sud_begin` and
// `daxshim_sud_end`. The return slot of the clone trampoline is an
// initial-exec TLS variable: the preloaded library's TLS is static.
std::arch::global_asm!(
    ".pushsection .text.daxshim_sud,\"ax\",@progbits",
    ".p2align 4",
    ".globl daxshim_sud_begin",
    ".hidden daxshim_sud_begin",
    "daxshim_sud_begin:",
    // sa_restorer of the SIGSYS action.
    ".globl daxshim_sud_restorer",
    ".hidden daxshim_sud_restorer",
    "daxshim_sud_restorer:",
    "    movl $15, %eax",
    "    syscall",
    "    ud2",
    // A trapped rt_sigreturn, re-issued (rax still holds 15, rsp the frame).
    ".globl daxshim_sud_sigreturn",
    ".hidden daxshim_sud_sigreturn",
    "daxshim_sud_sigreturn:",
    "    syscall",
    "    ud2",
    // A trapped clone/clone3/fork/vfork, re-issued with the program's
    // registers; parent and child go back to the instruction after the
    // program's own `syscall` (rcx and r11 are clobbered by any syscall).
    ".globl daxshim_sud_clone",
    ".hidden daxshim_sud_clone",
    "daxshim_sud_clone:",
    "    syscall",
    "    movq daxshim_sud_ret@GOTTPOFF(%rip), %rcx",
    "    jmp *%fs:(%rcx)",
    // long daxshim_sud_syscall6(nr, a0, a1, a2, a3, a4, a5): raw result.
    ".globl daxshim_sud_syscall6",
    ".hidden daxshim_sud_syscall6",
    "daxshim_sud_syscall6:",
    "    movq %rdi, %rax",
    "    movq %rsi, %rdi",
    "    movq %rdx, %rsi",
    "    movq %rcx, %rdx",
    "    movq %r8, %r10",
    "    movq %r9, %r8",
    "    movq 8(%rsp), %r9",
    "    syscall",
    "    ret",
    ".globl daxshim_sud_end",
    ".hidden daxshim_sud_end",
    "daxshim_sud_end:",
    ".popsection",
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".type daxshim_sud_ret, @tls_object",
    ".size daxshim_sud_ret, 8",
    "daxshim_sud_ret:",
    "    .zero 8",
    ".popsection",
    ".text",
    ".globl daxshim_sud_ret_slot",
    ".hidden daxshim_sud_ret_slot",
    "daxshim_sud_ret_slot:",
    "    movq daxshim_sud_ret@GOTTPOFF(%rip), %rax",
    "    addq %fs:0, %rax",
    "    ret",
    options(att_syntax)
);

extern "C" {
    fn daxshim_sud_begin();
    fn daxshim_sud_end();
    fn daxshim_sud_restorer();
    fn daxshim_sud_sigreturn();
    fn daxshim_sud_clone();
    fn daxshim_sud_syscall6(
        nr: c_long,
        a0: u64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
    ) -> c_long;
    fn daxshim_sud_ret_slot() -> *mut u64;
}

const PR_SET_SYSCALL_USER_DISPATCH: c_int = 59;
const PR_SYS_DISPATCH_ON: u64 = 1;
const SYS_USER_DISPATCH: c_int = 2;
const SA_RESTORER: u64 = 0x0400_0000;
const SIGSYS_BIT: u64 = 1 << (libc::SIGSYS - 1);
const UNBLOCKABLE: u64 = 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);

/// The signals no mask may block while dispatch is on: `SIGSYS`, and the
/// fault signals the shim's handlers serve (see `sigchain`).
fn shim_bits() -> u64 {
    let mut bits = SIGSYS_BIT;
    for sig in [libc::SIGBUS, libc::SIGSEGV] {
        if sigchain::owns_fault(sig) {
            bits |= 1 << (sig - 1);
        }
    }
    bits
}

/// Routes a trapped system call through the shim: `Some(result)` in the
/// kernel's convention (`-errno` on failure), `None` to perform it as is.
pub type Router = fn(c_long, &[u64; 6]) -> Option<c_long>;

static ROUTER: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Trapped system calls (all threads), for the stats.
pub static TRAPPED: AtomicUsize = AtomicUsize::new(0);

/// Is dispatch on in this process?
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// A system call through the allowed stub (never dispatched).
fn perform(nr: c_long, a: &[u64; 6]) -> c_long {
    // SAFETY: the stub is a plain system call; the arguments are the
    // program's own (or buffers of this frame) and the kernel checks them.
    unsafe { daxshim_sud_syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// The kernel's `struct sigaction`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KernelSigaction {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

/// Turns dispatch on for the process: installs the `SIGSYS` handler (the
/// action before becomes the program's) and enables the calling thread.
pub fn start(router: Router) -> Result<(), String> {
    ROUTER.store(router as usize, Ordering::Release);
    let act = KernelSigaction {
        handler: on_sigsys as *const () as u64,
        flags: (libc::SA_SIGINFO | libc::SA_NODEFER) as u64 | SA_RESTORER,
        restorer: daxshim_sud_restorer as *const () as u64,
        mask: 0,
    };
    let mut old = KernelSigaction::default();
    let r = perform(
        libc::SYS_rt_sigaction,
        &[
            libc::SIGSYS as u64,
            &act as *const _ as u64,
            &mut old as *mut _ as u64,
            8,
            0,
            0,
        ],
    );
    if r < 0 {
        return Err(format!(
            "cannot install the SIGSYS handler: {}",
            Errno(-r as i32)
        ));
    }
    sigchain::own_sigsys(&to_libc(&old));
    ACTIVE.store(true, Ordering::Release);
    enable_this_thread().map_err(|e| {
        format!("Syscall User Dispatch is not available ({e}; it needs Linux 5.11 or later)")
    })
}

/// Turns dispatch on for the calling thread (its selector stays as it is:
/// the caller sets `BLOCK` when it leaves the shim).
pub fn enable_this_thread() -> Result<(), Errno> {
    let begin = daxshim_sud_begin as *const () as u64;
    let end = daxshim_sud_end as *const () as u64;
    let r = perform(
        libc::SYS_prctl,
        &[
            PR_SET_SYSCALL_USER_DISPATCH as u64,
            PR_SYS_DISPATCH_ON,
            begin,
            end - begin,
            reentry::selector_addr() as u64,
            0,
        ],
    );
    if r < 0 {
        return Err(Errno(-r as i32));
    }
    reentry::set_dispatched(true);
    Ok(())
}

/// The start routine of a thread the program creates: dispatch on, then
/// the program's own routine.
pub struct ThreadStart {
    pub start: extern "C" fn(*mut c_void) -> *mut c_void,
    pub arg: *mut c_void,
}

/// `pthread_create`'s start routine for [`ThreadStart`] boxes.
pub extern "C" fn thread_trampoline(p: *mut c_void) -> *mut c_void {
    // SAFETY: the pthread_create hook passed a leaked Box<ThreadStart>.
    let ts = unsafe { Box::from_raw(p as *mut ThreadStart) };
    if let Err(e) = enable_this_thread() {
        warn!("a new thread runs without Syscall User Dispatch ({e})");
    } else {
        reentry::set_selector(BLOCK);
    }
    (ts.start)(ts.arg)
}

fn to_libc(k: &KernelSigaction) -> libc::sigaction {
    let mut a = sigchain::default_action();
    a.sa_sigaction = k.handler as usize;
    a.sa_flags = k.flags as c_int;
    // SAFETY: sigset_t starts with the kernel's 64-bit mask.
    unsafe { *(&mut a.sa_mask as *mut libc::sigset_t as *mut u64) = k.mask };
    a
}

fn to_kernel(a: &libc::sigaction) -> KernelSigaction {
    KernelSigaction {
        handler: a.sa_sigaction as u64,
        flags: a.sa_flags as u64 | SA_RESTORER,
        restorer: daxshim_sud_restorer as *const () as u64,
        // SAFETY: as in `to_libc`.
        mask: unsafe { *(&a.sa_mask as *const libc::sigset_t as *const u64) },
    }
}

/// Copies `len` bytes between this handler's `local` buffer and the
/// program's address `remote`, in the kernel (`process_vm_readv`/`writev`
/// on ourselves): `EFAULT` where the program's memory is not there.
fn copy_user(nr: c_long, local: *const u8, remote: u64, len: usize) -> Result<(), c_long> {
    let local = libc::iovec {
        iov_base: local as *mut c_void,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: remote as *mut c_void,
        iov_len: len,
    };
    let pid = perform(libc::SYS_getpid, &[0; 6]) as u64;
    let (l, r) = (&local as *const _ as u64, &remote as *const _ as u64);
    let r = perform(nr, &[pid, l, 1, r, 1, 0]);
    if r == len as c_long {
        Ok(())
    } else {
        Err(-(libc::EFAULT as c_long))
    }
}

/// Copies `len` bytes from the program's `src` (EFAULT if not readable).
fn read_user(src: u64, dst: *mut u8, len: usize) -> Result<(), c_long> {
    copy_user(libc::SYS_process_vm_readv, dst, src, len)
}

/// Copies `len` bytes to the program's `dst` (EFAULT if not writable).
fn write_user(dst: u64, src: *const u8, len: usize) -> Result<(), c_long> {
    copy_user(libc::SYS_process_vm_writev, src, dst, len)
}

fn read_mask(src: u64) -> Result<u64, c_long> {
    let mut m = 0u64;
    read_user(src, &mut m as *mut u64 as *mut u8, 8)?;
    Ok(m)
}

/// The kernel's 64-bit signal mask inside a `ucontext_t`.
fn uc_mask(uc: &mut libc::ucontext_t) -> &mut u64 {
    // SAFETY: sigset_t starts with the kernel's 64-bit mask.
    unsafe { &mut *(&mut uc.uc_sigmask as *mut libc::sigset_t as *mut u64) }
}

/// `rt_sigprocmask` on the mask the program returns to.
fn sigprocmask(a: &[u64; 6], uc: &mut libc::ucontext_t) -> c_long {
    let (how, set, oset, size) = (a[0] as c_int, a[1], a[2], a[3]);
    if size != 8 {
        return -(libc::EINVAL as c_long);
    }
    let old = *uc_mask(uc);
    if set != 0 {
        let s = match read_mask(set) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let new = match how {
            libc::SIG_BLOCK => old | s,
            libc::SIG_UNBLOCK => old & !s,
            libc::SIG_SETMASK => s,
            _ => return -(libc::EINVAL as c_long),
        };
        *uc_mask(uc) = new & !(UNBLOCKABLE | shim_bits());
    }
    if oset != 0 {
        if let Err(e) = write_user(oset, &old as *const u64 as *const u8, 8) {
            return e;
        }
    }
    0
}

/// `rt_sigaction`: the program's `SIGSYS` action is kept, not installed;
/// deferred handlers go through [`sigchain`]; no mask may block `SIGSYS`.
fn sigaction(a: &[u64; 6]) -> c_long {
    let (sig, act, oact, size) = (a[0] as c_int, a[1], a[2], a[3]);
    if size != 8 {
        return -(libc::EINVAL as c_long);
    }
    let mut k = KernelSigaction::default();
    if act != 0 {
        if let Err(e) = read_user(
            act,
            &mut k as *mut KernelSigaction as *mut u8,
            std::mem::size_of::<KernelSigaction>(),
        ) {
            return e;
        }
    }
    if !sigchain::interposed(sig) {
        k.mask &= !shim_bits();
        let kp = if act != 0 { &k as *const _ as u64 } else { 0 };
        return perform(libc::SYS_rt_sigaction, &[a[0], kp, oact, 8, 0, 0]);
    }
    let new = to_libc(&k);
    let mut old = sigchain::default_action();
    let r = {
        let _open = Open::new();
        sigchain::sigaction_impl(
            sig,
            if act != 0 { &new } else { std::ptr::null() },
            &mut old,
        )
    };
    if let Err(e) = r {
        return -(e.0 as c_long);
    }
    if oact != 0 {
        let ko = to_kernel(&old);
        if let Err(e) = write_user(
            oact,
            &ko as *const KernelSigaction as *const u8,
            std::mem::size_of::<KernelSigaction>(),
        ) {
            return e;
        }
    }
    0
}

/// A call whose argument `idx` points at a signal mask installed while it
/// waits (`sigsuspend`, `ppoll`, `epoll_pwait`): the same without `SIGSYS`.
fn with_mask_arg(nr: c_long, a: &[u64; 6], idx: usize) -> c_long {
    if a[idx] == 0 {
        return perform(nr, a);
    }
    let m = match read_mask(a[idx]) {
        Ok(m) => m & !shim_bits(),
        Err(e) => return e,
    };
    let mut b = *a;
    b[idx] = &m as *const u64 as u64;
    perform(nr, &b)
}

/// `pselect6`: its sixth argument points at `{ mask pointer, size }`.
fn pselect6(a: &[u64; 6]) -> c_long {
    if a[5] == 0 {
        return perform(libc::SYS_pselect6, a);
    }
    let mut ms = [0u64; 2];
    if let Err(e) = read_user(a[5], ms.as_mut_ptr() as *mut u8, 16) {
        return e;
    }
    if ms[0] == 0 {
        return perform(libc::SYS_pselect6, a);
    }
    let m = match read_mask(ms[0]) {
        Ok(m) => m & !shim_bits(),
        Err(e) => return e,
    };
    let local = [&m as *const u64 as u64, ms[1]];
    let mut b = *a;
    b[5] = local.as_ptr() as u64;
    perform(libc::SYS_pselect6, &b)
}

fn handle(nr: c_long, a: &[u64; 6], uc: &mut libc::ucontext_t) -> Option<c_long> {
    let rip = libc::REG_RIP as usize;
    match nr {
        libc::SYS_rt_sigreturn => {
            uc.uc_mcontext.gregs[rip] = daxshim_sud_sigreturn as *const () as i64;
            None
        }
        libc::SYS_clone | libc::SYS_clone3 | libc::SYS_fork | libc::SYS_vfork => {
            // SAFETY: this thread's own slot, read back by the trampoline
            // (by the child too: same TLS for fork and vfork; a new thread
            // with its own TLS comes from pthread_create, which the shim
            // performs with the selector open, so it never traps).
            unsafe { *daxshim_sud_ret_slot() = uc.uc_mcontext.gregs[rip] as u64 };
            uc.uc_mcontext.gregs[rip] = daxshim_sud_clone as *const () as i64;
            None
        }
        libc::SYS_rt_sigprocmask => Some(sigprocmask(a, uc)),
        libc::SYS_rt_sigaction => Some(sigaction(a)),
        libc::SYS_rt_sigsuspend => Some(with_mask_arg(nr, a, 0)),
        libc::SYS_ppoll => Some(with_mask_arg(nr, a, 3)),
        libc::SYS_epoll_pwait | libc::SYS_epoll_pwait2 => Some(with_mask_arg(nr, a, 4)),
        libc::SYS_pselect6 => Some(pselect6(a)),
        _ => {
            let router = ROUTER.load(Ordering::Acquire);
            let routed = if router == 0 {
                None
            } else {
                // SAFETY: stored from a `Router` in `start`.
                let f: Router = unsafe { std::mem::transmute::<usize, Router>(router) };
                let _open = Open::new();
                f(nr, a)
            };
            Some(routed.unwrap_or_else(|| perform(nr, a)))
        }
    }
}

extern "C" fn on_sigsys(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel's siginfo for this signal.
    if info.is_null() || ctx.is_null() || unsafe { (*info).si_code } != SYS_USER_DISPATCH {
        // seccomp's SECCOMP_RET_TRAP, or a SIGSYS sent by someone.
        sigchain::run_program_action(sig, info, ctx);
        return;
    }
    TRAPPED.fetch_add(1, Ordering::Relaxed);
    let errno = sys::get_errno();
    // SAFETY: the kernel's ucontext for this delivery, ours until we return.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let g = &uc.uc_mcontext.gregs;
    let nr = g[libc::REG_RAX as usize] as c_long;
    let a = [
        g[libc::REG_RDI as usize] as u64,
        g[libc::REG_RSI as usize] as u64,
        g[libc::REG_RDX as usize] as u64,
        g[libc::REG_R10 as usize] as u64,
        g[libc::REG_R8 as usize] as u64,
        g[libc::REG_R9 as usize] as u64,
    ];
    if let Some(r) = handle(nr, &a, uc) {
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = r;
    }
    sys::set_errno(errno);
}

/// Is `sig` in the 64-bit mask `m`?
#[cfg(test)]
fn has(m: u64, sig: c_int) -> bool {
    m & (1 << (sig - 1)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_and_libc_sigactions_round_trip() {
        let k = KernelSigaction {
            handler: 0x1234,
            flags: libc::SA_SIGINFO as u64,
            restorer: 0,
            mask: 1 << 4 | SIGSYS_BIT,
        };
        let back = to_kernel(&to_libc(&k));
        assert_eq!(back.handler, 0x1234);
        assert_eq!(back.mask, k.mask);
        assert!(back.flags & SA_RESTORER != 0);
        assert!(has(back.mask, libc::SIGSYS) && has(back.mask, 5));
    }

    #[test]
    fn the_stub_performs_system_calls() {
        let pid = perform(libc::SYS_getpid, &[0; 6]);
        assert_eq!(pid as i32, std::process::id() as i32);
        let r = perform(libc::SYS_close, &[u64::MAX, 0, 0, 0, 0, 0]);
        assert_eq!(r, -(libc::EBADF as c_long));
    }

    #[test]
    fn user_memory_is_copied_with_efault_on_bad_addresses() {
        let src = 0x5555_aaaa_u64;
        let mut m = 0u64;
        read_user(&src as *const u64 as u64, &mut m as *mut u64 as *mut u8, 8).unwrap();
        assert_eq!(m, src);
        assert_eq!(read_mask(8), Err(-(libc::EFAULT as c_long)));
    }
}
