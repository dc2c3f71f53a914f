//! Cookie streams (`fopencookie`) whose I/O functions are the shim's own
//! `read`/`write`/`close` hooks: how a stdio stream on a pmem file goes
//! through the shim ([`super::stdio`]).

use crate::stdio::{self, OpenMode};
use crate::sys;
use libc::{c_char, c_int, c_void, off64_t, size_t, ssize_t, FILE};

extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut FILE;
}

type CookieRead = unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t;

type CookieWrite = unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t;

type CookieSeek = unsafe extern "C" fn(*mut c_void, *mut off64_t, c_int) -> c_int;

type CookieClose = unsafe extern "C" fn(*mut c_void) -> c_int;

/// glibc's `cookie_io_functions_t`.
#[repr(C)]
struct CookieIo {
    read: Option<CookieRead>,
    write: Option<CookieWrite>,
    seek: Option<CookieSeek>,
    close: Option<CookieClose>,
}

/// What a cookie stream's callbacks know: its descriptor and its stream,
/// and the buffer the shim gave it.
struct Cookie {
    fd: c_int,
    stream: usize,
    buf: Option<Box<[u8]>>,
    /// Closing the stream leaves the descriptor open (freopen moves it on).
    keep_fd: bool,
}

/// glibc's `BUFSIZ`.
const BUFSIZ: usize = 8192;

/// # Safety
/// Called by glibc with the cookie given to `fopencookie` and a buffer of
/// `n` bytes.
unsafe extern "C" fn cookie_read(c: *mut c_void, buf: *mut c_char, n: size_t) -> ssize_t {
    // SAFETY: our cookie; the caller's buffer (glibc's contract).
    unsafe { super::io::read((*(c as *const Cookie)).fd, buf as *mut c_void, n) }
}

/// Writes everything unless an error stops it, as glibc does for a file
/// stream (a short count makes the stream report an error).
///
/// # Safety
/// As [`cookie_read`].
unsafe extern "C" fn cookie_write(c: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    // SAFETY: our cookie.
    let fd = unsafe { (*(c as *const Cookie)).fd };
    let mut done = 0usize;
    while done < n {
        // SAFETY: within the caller's buffer of `n` bytes.
        let r = unsafe { super::io::write(fd, buf.add(done) as *const c_void, n - done) };
        if r < 0 {
            if sys::get_errno() == libc::EINTR {
                continue;
            }
            return if done > 0 { done as ssize_t } else { -1 };
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    done as ssize_t
}

/// # Safety
/// As [`cookie_read`]; `off` points at the offset to seek to.
unsafe extern "C" fn cookie_seek(c: *mut c_void, off: *mut off64_t, whence: c_int) -> c_int {
    // SAFETY: our cookie, glibc's offset.
    let r = unsafe { libc::lseek64((*(c as *const Cookie)).fd, *off, whence) };
    if r < 0 {
        return -1;
    }
    // SAFETY: glibc's offset.
    unsafe { *off = r };
    0
}

/// # Safety
/// As [`cookie_read`]; the cookie is not used again.
unsafe extern "C" fn cookie_close(c: *mut c_void) -> c_int {
    // SAFETY: made by Box::into_raw in `cookie_stream`; glibc calls close once.
    let cookie = unsafe { Box::from_raw(c as *mut Cookie) };
    stdio::forget(cookie.stream);
    if cookie.keep_fd {
        return 0;
    }
    // SAFETY: the stream's own descriptor.
    unsafe { super::fd::close(cookie.fd) }
}

/// A cookie stream over `fd` (which it owns from now on) with `mode`.
/// Null with errno on failure (`fd` stays open then).
///
/// # Safety
/// `mode` is a C string.
pub(super) unsafe fn cookie_stream(fd: c_int, mode: *const c_char) -> *mut FILE {
    let cookie = Box::into_raw(Box::new(Cookie {
        fd,
        stream: 0,
        buf: None,
        keep_fd: false,
    }));
    let io = CookieIo {
        read: Some(cookie_read),
        write: Some(cookie_write),
        seek: Some(cookie_seek),
        close: Some(cookie_close),
    };
    // SAFETY: a valid cookie and function table; `mode` per contract.
    let fp = unsafe { fopencookie(cookie as *mut c_void, mode, io) };
    if fp.is_null() {
        // SAFETY: not handed to glibc.
        drop(unsafe { Box::from_raw(cookie) });
        return fp;
    }
    // SAFETY: ours until the stream is closed.
    unsafe { (*cookie).stream = fp as usize };
    // glibc buffers a file stream by the file's block size (at most
    // BUFSIZ), a cookie stream by BUFSIZ: give it the file's, so that reads
    // ahead leave the descriptor where they would have left it.
    let blksize = sys::fstat(fd).map(|st| st.st_blksize as usize).unwrap_or(0);
    if blksize > 0 && blksize < BUFSIZ {
        let mut buf = vec![0u8; blksize].into_boxed_slice();
        // SAFETY: a fresh stream; the buffer lives in the cookie until the
        // stream's close, after which glibc no longer touches it.
        unsafe { libc::setvbuf(fp, buf.as_mut_ptr() as *mut c_char, libc::_IOFBF, blksize) };
        // SAFETY: ours until the stream is closed.
        unsafe { (*cookie).buf = Some(buf) };
    }
    stdio::remember(
        fp as usize,
        stdio::Stream {
            fd,
            cookie: cookie as usize,
        },
    );
    fp
}

/// A stream on the pmem file open at `fd` (a descriptor the shim's `open`
/// just returned): a cookie stream positioned as glibc positions a file
/// stream. Closes `fd` on failure.
///
/// # Safety
/// `mode` is a C string.
pub(super) unsafe fn stream_on(fd: c_int, m: OpenMode, mode: *const c_char) -> *mut FILE {
    if m.append_only {
        // glibc's fopen and fdopen seek to the end of an "a" stream.
        // SAFETY: our descriptor.
        unsafe { libc::lseek64(fd, 0, libc::SEEK_END) };
    }
    // SAFETY: per contract.
    let fp = unsafe { cookie_stream(fd, mode) };
    if fp.is_null() {
        let e = sys::get_errno();
        // SAFETY: our descriptor, not handed to anyone.
        unsafe { super::fd::close(fd) };
        sys::set_errno(e);
    }
    fp
}

/// Closing the stream of `cookie` will leave its descriptor open (freopen
/// moves the descriptor on to the new file).
///
/// # Safety
/// `cookie` is a live stream's (from [`stdio::Stream::cookie`]).
pub(super) unsafe fn keep_descriptor(cookie: usize) {
    // SAFETY: per contract, alive until the stream is closed.
    unsafe { (*(cookie as *mut Cookie)).keep_fd = true };
}
