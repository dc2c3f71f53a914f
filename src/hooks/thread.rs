//! `pthread_create`: under Syscall User Dispatch a new thread turns dispatch
//! on for itself before the program's start routine runs ([`crate::sud`];
//! the kernel does not pass it on through `clone`).

use crate::real::Next;
use crate::reentry::{in_shim, Open};
use crate::sud::{self, ThreadStart};
use libc::{c_int, c_void, pthread_attr_t, pthread_t};

static NEXT_PTHREAD_CREATE: Next = Next::new(c"pthread_create");

type StartFn = extern "C" fn(*mut c_void) -> *mut c_void;
type CreateFn =
    unsafe extern "C" fn(*mut pthread_t, *const pthread_attr_t, StartFn, *mut c_void) -> c_int;

/// # Safety
/// C ABI, contract of pthread_create(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn pthread_create(
    thread: *mut pthread_t,
    attr: *const pthread_attr_t,
    start: StartFn,
    arg: *mut c_void,
) -> c_int {
    let p = NEXT_PTHREAD_CREATE.addr();
    if p == 0 {
        return libc::ENOSYS;
    }
    // SAFETY: the address of the next `pthread_create`, whose prototype
    // this is.
    let real: CreateFn = unsafe { std::mem::transmute::<usize, CreateFn>(p) };
    // The shim's own threads (fault thread, watcher) stay undispatched.
    if !sud::active() || in_shim() {
        let _open = Open::new();
        // SAFETY: forwarded with the caller's own arguments.
        return unsafe { real(thread, attr, start, arg) };
    }
    let boxed = Box::into_raw(Box::new(ThreadStart { start, arg }));
    let r = {
        // The clone inside must not trap: a trapped clone with a new TLS
        // could not find its way back (crate::sud).
        let _open = Open::new();
        // SAFETY: the caller's arguments; the trampoline takes the box.
        unsafe { real(thread, attr, sud::thread_trampoline, boxed as *mut c_void) }
    };
    if r != 0 {
        // SAFETY: no thread was created: the box is still ours.
        drop(unsafe { Box::from_raw(boxed) });
    }
    r
}

/// `vfork` is a `fork`: a `vfork` child shares the parent's memory until it
/// execs, and the hooks it calls meanwhile (Python's subprocess child closes
/// descriptors and `dup2`s pipes before `execve`) would change the parent's
/// descriptor table and files as if the parent had made those calls. POSIX
/// lets `vfork` be `fork`; `posix_spawn` and `system` keep their own clone
/// (their child calls no hook).
///
/// # Safety
/// C ABI, contract of vfork(2) (which `fork` fulfils).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn vfork() -> libc::pid_t {
    // SAFETY: fork has no preconditions beyond vfork's.
    unsafe { libc::fork() }
}
