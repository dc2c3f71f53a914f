//! stdio on pmem files: `fopen`, `fopen64`, `fdopen`, `freopen`,
//! `freopen64` return, for a pmem file, a cookie stream whose I/O functions
//! are the shim's read/write hooks (glibc's own stdio calls its internal
//! `write`, which no preload library sees); `fileno`/`fileno_unlocked` answer
//! such a stream's descriptor. Streams the program inherits on a pmem file
//! (a shell's `>`, `>>`, `1<>`) are replaced at start-up. Every other stream
//! is glibc's own. See docs/ARCHITECTURE.md, "stdio".
//!
//! These hooks do not enter the shim themselves: they call the shim's other
//! hooks (`open`, `read`, `write`, `close`), which do.

use super::cookie::{cookie_stream, keep_descriptor, stream_on};
use crate::real::Next;
use crate::reentry::READY;
use crate::stdio::{self, OpenMode};
use crate::sys;
use libc::{c_char, c_int, FILE};
use std::ffi::CStr;
use std::sync::atomic::Ordering;

extern "C" {
    static mut stdin: *mut FILE;
    static mut stdout: *mut FILE;
    static mut stderr: *mut FILE;
}

static NEXT_FOPEN: Next = Next::new(c"fopen");
static NEXT_FOPEN64: Next = Next::new(c"fopen64");
static NEXT_FDOPEN: Next = Next::new(c"fdopen");
static NEXT_FREOPEN: Next = Next::new(c"freopen");
static NEXT_FREOPEN64: Next = Next::new(c"freopen64");
static NEXT_FILENO: Next = Next::new(c"fileno");
static NEXT_FILENO_UNLOCKED: Next = Next::new(c"fileno_unlocked");

type OpenFn = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE;
type FdopenFn = unsafe extern "C" fn(c_int, *const c_char) -> *mut FILE;
type ReopenFn = unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE;
type FilenoFn = unsafe extern "C" fn(*mut FILE) -> c_int;

/// A resolved next function of type `T`, or `None` (errno `ENOSYS`).
fn next<T: Copy>(n: &Next) -> Option<T> {
    const { assert!(std::mem::size_of::<T>() == std::mem::size_of::<usize>()) };
    match n.addr() {
        0 => {
            sys::set_errno(libc::ENOSYS);
            None
        }
        // SAFETY: T is the function pointer type of the symbol's C
        // prototype (the callers name it), of pointer size (asserted).
        p => Some(unsafe { std::mem::transmute_copy::<usize, T>(&p) }),
    }
}

/// `fopen`: the real one unless the file may be pmem; then the shim opens
/// it itself (its `open` hook registers a pmem file) and makes the stream.
///
/// # Safety
/// C strings, as fopen(3).
unsafe fn fopen_impl(path: *const c_char, mode: *const c_char, real: &Next) -> *mut FILE {
    let real = || match next::<OpenFn>(real) {
        // SAFETY: forwarded with the caller's own arguments.
        Some(f) => unsafe { f(path, mode) },
        None => std::ptr::null_mut(),
    };
    if !READY.load(Ordering::Acquire)
        || crate::reentry::in_shim()
        || path.is_null()
        || mode.is_null()
    {
        return real();
    }
    // SAFETY: C strings per contract.
    let (p, m) = unsafe { (CStr::from_ptr(path), CStr::from_ptr(mode)) };
    let Some(om) = stdio::parse_mode(m.to_bytes()) else {
        return real();
    };
    if !crate::classify::path_may_be_pmem(p) {
        return real();
    }
    // SAFETY: the shim's own open hook, with the flags glibc would pass.
    let fd = unsafe { super::fd::open(path, om.flags, 0o666) };
    if fd < 0 {
        return std::ptr::null_mut();
    }
    if crate::fdtable::lookup_fd(fd).is_none() {
        // Not pmem after all: glibc's own stream on this descriptor.
        let fp = match next::<FdopenFn>(&NEXT_FDOPEN) {
            // SAFETY: our descriptor and the caller's mode.
            Some(f) => unsafe { f(fd, mode) },
            None => std::ptr::null_mut(),
        };
        if fp.is_null() {
            let e = sys::get_errno();
            // SAFETY: our descriptor.
            unsafe { super::fd::close(fd) };
            sys::set_errno(e);
        }
        return fp;
    }
    // SAFETY: per contract.
    unsafe { stream_on(fd, om, mode) }
}

/// # Safety
/// C ABI, contract of fopen(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
    // SAFETY: per contract.
    unsafe { fopen_impl(path, mode, &NEXT_FOPEN) }
}

/// # Safety
/// C ABI, contract of fopen64(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
    // SAFETY: per contract.
    unsafe { fopen_impl(path, mode, &NEXT_FOPEN64) }
}

/// # Safety
/// C ABI, contract of fdopen(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut FILE {
    let real = || match next::<FdopenFn>(&NEXT_FDOPEN) {
        // SAFETY: forwarded with the caller's own arguments.
        Some(f) => unsafe { f(fd, mode) },
        None => std::ptr::null_mut(),
    };
    if !READY.load(Ordering::Acquire)
        || crate::reentry::in_shim()
        || mode.is_null()
        || !crate::fdtable::fd_maybe_pmem(fd)
        || crate::fdtable::lookup_fd(fd).is_none()
    {
        return real();
    }
    // SAFETY: a C string per contract.
    let m = unsafe { CStr::from_ptr(mode) }.to_bytes();
    let Some(om) = stdio::parse_mode(m) else {
        return real();
    };
    // As glibc's fdopen: the descriptor's access mode must allow the
    // stream's; "a" turns O_APPEND on.
    let Ok(fl) = sys::fcntl(fd, libc::F_GETFL, 0).map(|f| f as c_int) else {
        sys::set_errno(libc::EBADF);
        return std::ptr::null_mut();
    };
    let acc = fl & libc::O_ACCMODE;
    let want = om.flags & libc::O_ACCMODE;
    if (acc == libc::O_RDONLY && want != libc::O_RDONLY)
        || (acc == libc::O_WRONLY && want != libc::O_WRONLY)
    {
        sys::set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    if om.flags & libc::O_APPEND != 0 && fl & libc::O_APPEND == 0 {
        let _ = sys::fcntl(fd, libc::F_SETFL, (fl | libc::O_APPEND) as libc::c_long);
    }
    if om.append_only {
        // SAFETY: the caller's descriptor.
        unsafe { libc::lseek64(fd, 0, libc::SEEK_END) };
    }
    // SAFETY: per contract; on failure the caller keeps its descriptor.
    unsafe { cookie_stream(fd, mode) }
}

/// `freopen` onto (or away from) a pmem file. A cookie stream is another
/// kind of object than glibc's file stream, so the stream returned is a new
/// one when the file is pmem; `stdin`, `stdout` and `stderr` are pointed at
/// it when it replaces one of them. As glibc does, the stream keeps its
/// descriptor number (the new file is moved onto it).
///
/// # Safety
/// C ABI, contract of freopen(3).
unsafe fn freopen_impl(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut FILE,
    real: &Next,
) -> *mut FILE {
    let real = || match next::<ReopenFn>(real) {
        // SAFETY: forwarded with the caller's own arguments.
        Some(f) => unsafe { f(path, mode, stream) },
        None => std::ptr::null_mut(),
    };
    if !READY.load(Ordering::Acquire) || crate::reentry::in_shim() || mode.is_null() {
        return real();
    }
    // SAFETY: a C string per contract.
    let Some(om) = stdio::parse_mode(unsafe { CStr::from_ptr(mode) }.to_bytes()) else {
        return real();
    };
    let fp = match stdio::lookup(stream as usize) {
        // SAFETY: per contract.
        None => unsafe { reopen_glibc_stream(real, om, mode) },
        // SAFETY: per contract.
        Some(ours) => unsafe { reopen_cookie_stream(stream, ours, path, om, mode) },
    };
    if !fp.is_null() && fp != stream {
        // SAFETY: glibc's standard stream variables, replaced as a program
        // replacing them would.
        unsafe {
            if stream == stdin {
                stdin = fp;
            } else if stream == stdout {
                stdout = fp;
            } else if stream == stderr {
                stderr = fp;
            }
        }
    }
    fp
}

/// glibc's own stream: glibc reopens it (its flags, errors and descriptor
/// number exactly); if the file is pmem, a cookie stream on the same
/// descriptor takes over and glibc's object is left, empty, unused.
///
/// # Safety
/// `mode` is a C string.
unsafe fn reopen_glibc_stream(
    real: impl FnOnce() -> *mut FILE,
    om: OpenMode,
    mode: *const c_char,
) -> *mut FILE {
    let r = real();
    if r.is_null() {
        return r;
    }
    let fd = match next::<FilenoFn>(&NEXT_FILENO) {
        // SAFETY: the stream glibc just reopened.
        Some(f) => unsafe { f(r) },
        None => -1,
    };
    if fd < 0 {
        return r;
    }
    // glibc opened it with its internal open: the table learns of it now.
    if let Err(e) = crate::fdtable::on_open(fd, om.flags & !libc::O_TRUNC) {
        // SAFETY: the stream glibc just reopened; freopen failing closes it.
        unsafe { libc::fclose(r) };
        sys::set_errno(e.0);
        return std::ptr::null_mut();
    }
    if crate::fdtable::lookup_fd(fd).is_none() {
        return r;
    }
    // SAFETY: per contract; glibc positioned the descriptor already.
    let fp = unsafe { cookie_stream(fd, mode) };
    if fp.is_null() {
        warn!("cannot make a reopened stream go through the shim");
        return r;
    }
    fp
}

/// One of the shim's cookie streams: closed without its descriptor, the new
/// file opened and moved onto that descriptor number.
///
/// # Safety
/// C strings per contract; `stream` is the cookie stream `ours`.
unsafe fn reopen_cookie_stream(
    stream: *mut FILE,
    ours: stdio::Stream,
    path: *const c_char,
    om: OpenMode,
    mode: *const c_char,
) -> *mut FILE {
    // A null path reopens the same file with another mode.
    let same = std::ffi::CString::new(format!("/proc/self/fd/{}", ours.fd)).unwrap_or_default();
    let path = if path.is_null() { same.as_ptr() } else { path };
    // SAFETY: our stream's cookie.
    unsafe { keep_descriptor(ours.cookie) };
    // SAFETY: the caller's stream; a failed flush is ignored, as freopen does.
    unsafe { libc::fclose(stream) };
    // SAFETY: the shim's own open hook, with the flags glibc would pass.
    let fd = unsafe { super::fd::open(path, om.flags, 0o666) };
    if fd < 0 {
        let e = sys::get_errno();
        // SAFETY: the old stream's descriptor, ours to close now.
        unsafe { super::fd::close(ours.fd) };
        sys::set_errno(e);
        return std::ptr::null_mut();
    }
    let cloexec = if om.flags & libc::O_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // SAFETY: the shim's own dup3 and close hooks on our descriptors.
    let moved = unsafe { super::fd::dup3(fd, ours.fd, cloexec) };
    // SAFETY: as above.
    unsafe { super::fd::close(fd) };
    if moved < 0 {
        return std::ptr::null_mut();
    }
    if crate::fdtable::lookup_fd(ours.fd).is_none() {
        // Not pmem: glibc's own stream.
        return match next::<FdopenFn>(&NEXT_FDOPEN) {
            // SAFETY: our descriptor and the caller's mode.
            Some(f) => unsafe { f(ours.fd, mode) },
            None => std::ptr::null_mut(),
        };
    }
    // SAFETY: per contract.
    unsafe { stream_on(ours.fd, om, mode) }
}

/// # Safety
/// C ABI, contract of freopen(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn freopen(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut FILE,
) -> *mut FILE {
    // SAFETY: per contract.
    unsafe { freopen_impl(path, mode, stream, &NEXT_FREOPEN) }
}

/// # Safety
/// C ABI, contract of freopen64(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn freopen64(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut FILE,
) -> *mut FILE {
    // SAFETY: per contract.
    unsafe { freopen_impl(path, mode, stream, &NEXT_FREOPEN64) }
}

/// # Safety
/// C ABI, contract of fileno(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fileno(stream: *mut FILE) -> c_int {
    if let Some(s) = stdio::lookup(stream as usize) {
        return s.fd;
    }
    match next::<FilenoFn>(&NEXT_FILENO) {
        // SAFETY: forwarded with the caller's own argument.
        Some(f) => unsafe { f(stream) },
        None => -1,
    }
}

/// # Safety
/// C ABI, contract of fileno_unlocked(3).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fileno_unlocked(stream: *mut FILE) -> c_int {
    if let Some(s) = stdio::lookup(stream as usize) {
        return s.fd;
    }
    match next::<FilenoFn>(&NEXT_FILENO_UNLOCKED) {
        // SAFETY: forwarded with the caller's own argument.
        Some(f) => unsafe { f(stream) },
        None => -1,
    }
}

/// At start-up, after inherited descriptors were adopted: a standard stream
/// whose descriptor is a pmem file (a shell's `>`, `>>`, `1<>`) is replaced
/// by a cookie stream on the same descriptor, buffered as glibc buffers
/// such a stream (stderr unbuffered).
pub fn adopt_standard_streams() {
    for fd in 0..3 {
        if crate::fdtable::lookup_fd(fd).is_none() {
            continue;
        }
        let Ok(fl) = sys::fcntl(fd, libc::F_GETFL, 0).map(|f| f as c_int) else {
            continue;
        };
        let append = fl & libc::O_APPEND != 0;
        let mode = match (fd, fl & libc::O_ACCMODE) {
            (0, libc::O_WRONLY) => continue,
            (0, _) => c"r",
            (_, libc::O_RDONLY) => continue,
            (_, libc::O_RDWR) if append => c"a+",
            (_, libc::O_RDWR) => c"r+",
            (_, _) if append => c"a",
            _ => c"w",
        };
        // SAFETY: the process's own descriptor and a valid mode.
        let fp = unsafe { cookie_stream(fd, mode.as_ptr()) };
        if fp.is_null() {
            warn!("cannot make a stream of descriptor {fd} go through the shim");
            continue;
        }
        // SAFETY: glibc's standard stream variables; nothing else runs yet
        // (the constructor).
        unsafe {
            match fd {
                0 => stdin = fp,
                1 => stdout = fp,
                _ => {
                    libc::setvbuf(fp, std::ptr::null_mut(), libc::_IONBF, 0);
                    stderr = fp;
                }
            }
        }
    }
}

/// At exit, before the shim writes back and detaches: what the program's
/// cookie streams still buffer goes through the shim (glibc would flush
/// them only after the shim's destructor). Call outside the shim.
pub fn flush_streams() {
    for fp in stdio::all() {
        // SAFETY: a live stream of ours (closed ones are forgotten).
        unsafe { libc::fflush(fp as *mut FILE) };
    }
}
