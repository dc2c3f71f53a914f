//! The next definitions of the functions the shim interposes, resolved once
//! with `dlsym(RTLD_NEXT)` from the load-time constructor.
//!
//! Until resolution (a call from another library's constructor) each wrapper
//! falls back to the raw system call, which has the kernel's semantics.
//!
//! # Safety
//! Every wrapper is an `unsafe fn` with the contract of the libc function it
//! names; the transmuted pointer types match the glibc prototypes (variadic
//! ones are called through variadic pointer types).

use libc::{c_char, c_int, c_long, c_uint, c_void, iovec, mode_t, off64_t, size_t, ssize_t};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

macro_rules! real_fns {
    ($( fn $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty => $fallback:expr ; )*) => {
        #[allow(non_upper_case_globals)]
        mod slots {
            use super::AtomicUsize;
            $( pub static $name: AtomicUsize = AtomicUsize::new(0); )*
        }

        $(
            #[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
            pub unsafe fn $name($($arg: $ty),*) -> $ret {
                let p = slots::$name.load(Relaxed);
                if p != 0 {
                    // SAFETY: `p` was returned by dlsym for this very symbol,
                    // whose C prototype is the one spelled here.
                    let f: unsafe extern "C" fn($($ty),*) -> $ret =
                        // SAFETY: as above.
                        unsafe { std::mem::transmute::<usize, _>(p) };
                    // libc's system calls are outside the range Syscall User
                    // Dispatch allows: open the selector around them.
                    let _open = crate::reentry::Open::new();
                    // SAFETY: the caller upholds the libc function's contract.
                    return unsafe { f($($arg),*) };
                }
                // SAFETY: the raw system call with the same arguments.
                #[allow(unused_unsafe)]
                unsafe { $fallback }
            }
        )*

        /// Resolves every symbol; returns the names of the missing ones.
        pub fn resolve_all() -> Vec<&'static str> {
            let mut missing = Vec::new();
            $(
                let name = concat!(stringify!($name), "\0");
                // SAFETY: name is NUL-terminated; RTLD_NEXT is valid in a
                // shared object.
                let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) };
                if p.is_null() {
                    missing.push(stringify!($name));
                } else {
                    slots::$name.store(p as usize, Relaxed);
                }
            )*
            missing
        }
    };
}

use libc::syscall as sc;
use libc::*;

real_fns! {
    fn mmap64(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, off: off64_t) -> *mut c_void
        => sc(SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void;
    fn munmap(addr: *mut c_void, len: size_t) -> c_int => sc(SYS_munmap, addr, len) as c_int;
    fn mremap(old: *mut c_void, old_len: size_t, new_len: size_t, flags: c_int, new_addr: *mut c_void) -> *mut c_void
        => sc(SYS_mremap, old, old_len, new_len, flags, new_addr) as *mut c_void;
    fn msync(addr: *mut c_void, len: size_t, flags: c_int) -> c_int => sc(SYS_msync, addr, len, flags) as c_int;
    fn mprotect(addr: *mut c_void, len: size_t, prot: c_int) -> c_int => sc(SYS_mprotect, addr, len, prot) as c_int;
    fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int
        => { let _ = (sig, act, old); *__errno_location() = ENOSYS; -1 };
    fn signal(sig: c_int, handler: sighandler_t) -> sighandler_t
        => { let _ = (sig, handler); *__errno_location() = ENOSYS; SIG_ERR };
    fn sigprocmask(how: c_int, set: *const sigset_t, old: *mut sigset_t) -> c_int
        => sc(SYS_rt_sigprocmask, how, set, old, 8usize) as c_int;
    fn pthread_sigmask(how: c_int, set: *const sigset_t, old: *mut sigset_t) -> c_int
        => if sc(SYS_rt_sigprocmask, how, set, old, 8usize) < 0 { *__errno_location() } else { 0 };
    fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int => sc(SYS_madvise, addr, len, advice) as c_int;
    fn fsync(fd: c_int) -> c_int => sc(SYS_fsync, fd) as c_int;
    fn fdatasync(fd: c_int) -> c_int => sc(SYS_fdatasync, fd) as c_int;
    fn sync_file_range(fd: c_int, off: off64_t, n: off64_t, flags: c_uint) -> c_int
        => sc(SYS_sync_file_range, fd, off, n, flags) as c_int;
    fn syncfs(fd: c_int) -> c_int => sc(SYS_syncfs, fd) as c_int;
    fn sync() -> () => { sc(SYS_sync); };
    fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t => sc(SYS_read, fd, buf, n) as ssize_t;
    fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: off64_t) -> ssize_t
        => sc(SYS_pread64, fd, buf, n, off) as ssize_t;
    fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t => sc(SYS_readv, fd, iov, cnt) as ssize_t;
    fn preadv64(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t) -> ssize_t
        => sc(SYS_preadv, fd, iov, cnt, off, 0) as ssize_t;
    fn preadv64v2(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t, flags: c_int) -> ssize_t
        => sc(SYS_preadv2, fd, iov, cnt, off, 0, flags) as ssize_t;
    fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t => sc(SYS_write, fd, buf, n) as ssize_t;
    fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: off64_t) -> ssize_t
        => sc(SYS_pwrite64, fd, buf, n, off) as ssize_t;
    fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t => sc(SYS_writev, fd, iov, cnt) as ssize_t;
    fn pwritev64(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t) -> ssize_t
        => sc(SYS_pwritev, fd, iov, cnt, off, 0) as ssize_t;
    fn pwritev64v2(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t, flags: c_int) -> ssize_t
        => sc(SYS_pwritev2, fd, iov, cnt, off, 0, flags) as ssize_t;
    fn ftruncate64(fd: c_int, len: off64_t) -> c_int => sc(SYS_ftruncate, fd, len) as c_int;
    fn truncate64(path: *const c_char, len: off64_t) -> c_int => sc(SYS_truncate, path, len) as c_int;
    fn fallocate64(fd: c_int, mode: c_int, off: off64_t, len: off64_t) -> c_int
        => sc(SYS_fallocate, fd, mode, off, len) as c_int;
    fn posix_fallocate64(fd: c_int, off: off64_t, len: off64_t) -> c_int
        => if sc(SYS_fallocate, fd, 0, off, len) == 0 { 0 } else { *__errno_location() };
    fn __open64_2(path: *const c_char, flags: c_int) -> c_int
        => sc(SYS_openat, AT_FDCWD, path, flags, 0) as c_int;
    fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int
        => sc(SYS_openat, dirfd, path, flags, 0) as c_int;
    fn close(fd: c_int) -> c_int => sc(SYS_close, fd) as c_int;
    fn dup(fd: c_int) -> c_int => sc(SYS_dup, fd) as c_int;
    fn dup2(fd: c_int, new: c_int) -> c_int => sc(SYS_dup2, fd, new) as c_int;
    fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int => sc(SYS_dup3, fd, new, flags) as c_int;
    fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int
        => sc(SYS_close_range, first, last, flags) as c_int;
    fn closefrom(first: c_int) -> () => { sc(SYS_close_range, first, !0u32, 0); };
    fn renameat2(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char, flags: c_uint) -> c_int
        => sc(SYS_renameat2, olddir, old, newdir, new, flags) as c_int;
    fn sendfile64(out: c_int, inp: c_int, off: *mut off64_t, n: size_t) -> ssize_t
        => sc(SYS_sendfile, out, inp, off, n) as ssize_t;
    fn copy_file_range(inp: c_int, off_in: *mut off64_t, out: c_int, off_out: *mut off64_t, n: size_t, flags: c_uint) -> ssize_t
        => sc(SYS_copy_file_range, inp, off_in, out, off_out, n, flags) as ssize_t;
    fn splice(inp: c_int, off_in: *mut off64_t, out: c_int, off_out: *mut off64_t, n: size_t, flags: c_uint) -> ssize_t
        => sc(SYS_splice, inp, off_in, out, off_out, n, flags) as ssize_t;
    fn __read_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t) -> ssize_t
        => { let _ = buflen; sc(SYS_read, fd, buf, n) as ssize_t };
    fn __pread64_chk(fd: c_int, buf: *mut c_void, n: size_t, off: off64_t, buflen: size_t) -> ssize_t
        => { let _ = buflen; sc(SYS_pread64, fd, buf, n, off) as ssize_t };
}

/// The variadic functions, called through variadic pointer types.
macro_rules! real_variadic {
    ($( fn $name:ident ( $($arg:ident : $ty:ty),* ; $var:ident : $vty:ty ) -> $ret:ty => $fallback:expr ; )*) => {
        #[allow(non_upper_case_globals)]
        mod vslots {
            use super::AtomicUsize;
            $( pub static $name: AtomicUsize = AtomicUsize::new(0); )*
        }
        $(
            #[allow(clippy::missing_safety_doc)]
            pub unsafe fn $name($($arg: $ty),*, $var: $vty) -> $ret {
                let p = vslots::$name.load(Relaxed);
                if p != 0 {
                    // SAFETY: `p` is this symbol's address from dlsym; the C
                    // prototype is variadic after the fixed arguments.
                    let f: unsafe extern "C" fn($($ty),*, ...) -> $ret =
                        // SAFETY: as above.
                        unsafe { std::mem::transmute::<usize, _>(p) };
                    let _open = crate::reentry::Open::new();
                    // SAFETY: the caller upholds the libc function's contract.
                    return unsafe { f($($arg),*, $var) };
                }
                // SAFETY: the raw system call with the same arguments.
                #[allow(unused_unsafe)]
                unsafe { $fallback }
            }
        )*
        pub fn resolve_variadic() -> Vec<&'static str> {
            let mut missing = Vec::new();
            $(
                let name = concat!(stringify!($name), "\0");
                // SAFETY: as in resolve_all.
                let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) };
                if p.is_null() { missing.push(stringify!($name)); } else { vslots::$name.store(p as usize, Relaxed); }
            )*
            missing
        }
    };
}

real_variadic! {
    fn open64(path: *const c_char, flags: c_int; mode: mode_t) -> c_int
        => sc(SYS_openat, AT_FDCWD, path, flags, mode) as c_int;
    fn openat64(dirfd: c_int, path: *const c_char, flags: c_int; mode: mode_t) -> c_int
        => sc(SYS_openat, dirfd, path, flags, mode) as c_int;
    fn fcntl64(fd: c_int, cmd: c_int; arg: c_long) -> c_int => sc(SYS_fcntl, fd, cmd, arg) as c_int;
}

/// The next definition of a function with no system-call equivalent (the
/// stdio functions), resolved on first use: such a function may be called
/// before the constructor ran (by another library's constructor), and a
/// `dlsym` there is safe (these are not called from the allocator or the
/// mapping hooks, whose lookups must not allocate).
pub struct Next {
    slot: AtomicUsize,
    name: &'static std::ffi::CStr,
}

impl Next {
    pub const fn new(name: &'static std::ffi::CStr) -> Next {
        Next {
            slot: AtomicUsize::new(0),
            name,
        }
    }

    /// The function's address, or 0 if no later object defines it.
    pub fn addr(&self) -> usize {
        let p = self.slot.load(Relaxed);
        if p != 0 {
            return p;
        }
        // SAFETY: a NUL-terminated name; RTLD_NEXT is valid in a shared
        // object.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        self.slot.store(p, Relaxed);
        p
    }
}
