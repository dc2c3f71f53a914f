//! read/write family, truncation, allocation and kernel copies: the
//! exported hooks; what keeps them coherent with the shadows is in
//! [`crate::fileio`].

use crate::fileio::{
    check, fallocate_impl, ftruncate_impl, kernel_copy, posix_fallocate_impl, read_impl,
    truncate_impl, write_impl, At,
};
use crate::real;
use crate::reentry::enter;
use libc::{c_char, c_int, c_void, iovec, off64_t, size_t, ssize_t};
use std::ffi::CStr;

fn one(buf: *const c_void, n: size_t) -> [iovec; 1] {
    [iovec {
        iov_base: buf as *mut c_void,
        iov_len: n,
    }]
}

/// # Safety
/// `iov` must point at `cnt` iovecs (the kernel has validated them when it
/// returned success).
unsafe fn iovs<'a>(iov: *const iovec, cnt: c_int) -> &'a [iovec] {
    if iov.is_null() || cnt <= 0 {
        &[]
    } else {
        // SAFETY: per contract.
        unsafe { std::slice::from_raw_parts(iov, cnt as usize) }
    }
}

macro_rules! io_hook {
    ($name:ident ( $fd:ident : c_int $(, $a:ident : $t:ty)* ) $kernel:expr ; $imp:ident, $iov:expr, $at:expr) => {
        /// # Safety
        /// C ABI, contract of the libc function of the same name.
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name($fd: c_int $(, $a: $t)*) -> ssize_t {
            // SAFETY: forwarded with the caller's own arguments (C ABI contract).
            let kernel = || unsafe { $kernel };
            if crate::lazy::sigbus::active() {
                // Pages of lazy mappings the kernel would read or store
                // into must be filled first (it cannot wait for a fill).
                // SAFETY: as below.
                #[allow(unused_unsafe)]
                for v in unsafe { $iov } {
                    crate::lazy::sigbus::touch(v.iov_base as usize, v.iov_len);
                }
            }
            if stringify!($imp) == "read_impl" && crate::track::traps_stores() {
                // SAFETY: as below.
                #[allow(unused_unsafe)]
                for v in unsafe { $iov } {
                    crate::track::tracker().before_kernel_stores(v.iov_base as usize, v.iov_len);
                }
            }
            if !crate::fdtable::fd_maybe_pmem($fd) {
                return kernel();
            }
            match enter() {
                None => kernel(),
                Some(g) => {
                    // SAFETY: the hook's own buffer/iovec arguments, valid per
                    // its C contract.
                    #[allow(unused_unsafe)]
                    let iov = unsafe { $iov };
                    g.ret($imp($fd, iov, $at, kernel))
                }
            }
        }
    };
}

fn at_off(off: off64_t) -> At {
    if off < 0 {
        At::Position
    } else {
        At::Offset(off as u64)
    }
}

io_hook!(read(fd: c_int, buf: *mut c_void, n: size_t) real::read(fd, buf, n); read_impl, &one(buf, n), At::Position);
io_hook!(pread(fd: c_int, buf: *mut c_void, n: size_t, off: off64_t) real::pread64(fd, buf, n, off); read_impl, &one(buf, n), At::Offset(off as u64));
io_hook!(pread64(fd: c_int, buf: *mut c_void, n: size_t, off: off64_t) real::pread64(fd, buf, n, off); read_impl, &one(buf, n), At::Offset(off as u64));
io_hook!(readv(fd: c_int, iov: *const iovec, cnt: c_int) real::readv(fd, iov, cnt); read_impl, iovs(iov, cnt), At::Position);
io_hook!(preadv(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t) real::preadv64(fd, iov, cnt, off); read_impl, iovs(iov, cnt), At::Offset(off as u64));
io_hook!(preadv64(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t) real::preadv64(fd, iov, cnt, off); read_impl, iovs(iov, cnt), At::Offset(off as u64));
io_hook!(preadv2(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t, flags: c_int) real::preadv64v2(fd, iov, cnt, off, flags); read_impl, iovs(iov, cnt), at_off(off));
io_hook!(preadv64v2(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t, flags: c_int) real::preadv64v2(fd, iov, cnt, off, flags); read_impl, iovs(iov, cnt), at_off(off));
io_hook!(write(fd: c_int, buf: *const c_void, n: size_t) real::write(fd, buf, n); write_impl, &one(buf, n), At::Position);
io_hook!(pwrite(fd: c_int, buf: *const c_void, n: size_t, off: off64_t) real::pwrite64(fd, buf, n, off); write_impl, &one(buf, n), At::Offset(off as u64));
io_hook!(pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: off64_t) real::pwrite64(fd, buf, n, off); write_impl, &one(buf, n), At::Offset(off as u64));
io_hook!(writev(fd: c_int, iov: *const iovec, cnt: c_int) real::writev(fd, iov, cnt); write_impl, iovs(iov, cnt), At::Position);
io_hook!(pwritev(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t) real::pwritev64(fd, iov, cnt, off); write_impl, iovs(iov, cnt), At::Offset(off as u64));
io_hook!(pwritev64(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t) real::pwritev64(fd, iov, cnt, off); write_impl, iovs(iov, cnt), At::Offset(off as u64));
io_hook!(pwritev2(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t, flags: c_int) real::pwritev64v2(fd, iov, cnt, off, flags); write_impl, iovs(iov, cnt), at_off(off));
io_hook!(pwritev64v2(fd: c_int, iov: *const iovec, cnt: c_int, off: off64_t, flags: c_int) real::pwritev64v2(fd, iov, cnt, off, flags); write_impl, iovs(iov, cnt), at_off(off));

/// Fortified read (`_FORTIFY_SOURCE`): glibc aborts if n > buflen.
///
/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen || !crate::fdtable::fd_maybe_pmem(fd) {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        return unsafe { real::__read_chk(fd, buf, n, buflen) };
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { read(fd, buf, n) }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off64_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen || !crate::fdtable::fd_maybe_pmem(fd) {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        return unsafe { real::__pread64_chk(fd, buf, n, off, buflen) };
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { pread64(fd, buf, n, off) }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __pread_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off64_t,
    buflen: size_t,
) -> ssize_t {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { __pread64_chk(fd, buf, n, off, buflen) }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    let kernel = || unsafe { real::ftruncate64(fd, len) };
    if !crate::fdtable::fd_maybe_pmem(fd) {
        return kernel();
    }
    match enter() {
        None => kernel(),
        Some(g) => match crate::fdtable::lookup_fd(fd) {
            None => g.ret(check(kernel())),
            Some(f) => g.ret(ftruncate_impl(f, len, kernel)),
        },
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { ftruncate64(fd, len) }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn truncate64(path: *const c_char, len: off64_t) -> c_int {
    if path.is_null() {
        // SAFETY: forwarded with the caller's own arguments (the kernel
        // answers EFAULT).
        return unsafe { real::truncate64(path, len) };
    }
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::truncate64(path, len) },
        // SAFETY: forwarded with the caller's own arguments; `path` is a
        // C string (C ABI contract), not null.
        Some(g) => g.ret(truncate_impl(
            unsafe { CStr::from_ptr(path) },
            len,
            || unsafe { real::truncate64(path, len) },
        )),
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn truncate(path: *const c_char, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { truncate64(path, len) }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, off: off64_t, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    let kernel = || unsafe { real::fallocate64(fd, mode, off, len) };
    if !crate::fdtable::fd_maybe_pmem(fd) {
        return kernel();
    }
    match enter() {
        None => kernel(),
        Some(g) => match crate::fdtable::lookup_fd(fd) {
            None => g.ret(check(kernel())),
            Some(f) => g.ret(fallocate_impl(f, fd, mode, off, len, kernel)),
        },
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, off: off64_t, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { fallocate64(fd, mode, off, len) }
}

/// posix_fallocate returns an error number instead of setting errno.
///
/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_fallocate64(fd: c_int, off: off64_t, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    let kernel = || unsafe { real::posix_fallocate64(fd, off, len) };
    if !crate::fdtable::fd_maybe_pmem(fd) {
        return kernel();
    }
    match enter() {
        None => kernel(),
        Some(g) => match crate::fdtable::lookup_fd(fd) {
            None => kernel(),
            Some(f) => {
                let r = posix_fallocate_impl(&f, kernel);
                g.restore_errno();
                r
            }
        },
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_fallocate(fd: c_int, off: off64_t, len: off64_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { posix_fallocate64(fd, off, len) }
}

// sendfile, copy_file_range, splice: the kernel moves the bytes between
// backing files, so a shadowed source first writes back this process's
// stores (the kernel then reads what the program sees) and a shadowed
// destination takes the moved bytes from its backing afterwards.

/// # Safety
/// C ABI, contract of sendfile(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sendfile64(
    out: c_int,
    inp: c_int,
    off: *mut off64_t,
    n: size_t,
) -> ssize_t {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    let kernel = || unsafe { real::sendfile64(out, inp, off, n) };
    if !crate::fdtable::fd_maybe_pmem(out) && !crate::fdtable::fd_maybe_pmem(inp) {
        return kernel();
    }
    match enter() {
        None => kernel(),
        Some(g) => match crate::fileio::atomic_destination(out) {
            Some(f) => {
                // SAFETY: the caller's pointer, valid per the C contract
                // when non-null.
                let mut o = (!off.is_null()).then(|| unsafe { *off });
                let r = crate::fileio::atomic::copy_into(&f, inp, out, o.as_mut(), None, n);
                if let Some(v) = o.filter(|_| r.is_ok()) {
                    // SAFETY: as above.
                    unsafe { *off = v };
                }
                g.ret(r)
            }
            // sendfile writes `out` at its file position.
            None => g.ret(kernel_copy(inp, out, None, kernel)),
        },
    }
}

/// # Safety
/// C ABI, contract of sendfile(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut off64_t, n: size_t) -> ssize_t {
    // SAFETY: same function.
    unsafe { sendfile64(out, inp, off, n) }
}

macro_rules! copy_hook {
    ($name:ident, $what:literal) => {
        #[doc = concat!("# Safety\nC ABI, contract of ", $what, ".")]
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(
            inp: c_int,
            off_in: *mut off64_t,
            out: c_int,
            off_out: *mut off64_t,
            n: size_t,
            flags: libc::c_uint,
        ) -> ssize_t {
            // SAFETY: forwarded with the caller's own arguments (C ABI contract).
            let kernel = || unsafe { real::$name(inp, off_in, out, off_out, n, flags) };
            if !crate::fdtable::fd_maybe_pmem(out) && !crate::fdtable::fd_maybe_pmem(inp) {
                return kernel();
            }
            match enter() {
                None => kernel(),
                Some(g) => {
                    if let Some(f) = crate::fileio::atomic_destination(out) {
                        if stringify!($name) == "copy_file_range" && flags != 0 {
                            return g.ret(Err(crate::sys::Errno(libc::EINVAL)));
                        }
                        // SAFETY: the caller's pointers, valid per the C
                        // contract when non-null.
                        let (mut i, mut o) = unsafe {
                            (
                                (!off_in.is_null()).then(|| *off_in),
                                (!off_out.is_null()).then(|| *off_out),
                            )
                        };
                        let r = crate::fileio::atomic::copy_into(
                            &f,
                            inp,
                            out,
                            i.as_mut(),
                            o.as_mut(),
                            n,
                        );
                        if r.is_ok() {
                            // SAFETY: as above.
                            unsafe {
                                if let Some(v) = i {
                                    *off_in = v;
                                }
                                if let Some(v) = o {
                                    *off_out = v;
                                }
                            }
                        }
                        return g.ret(r);
                    }
                    // SAFETY: the caller's pointer, valid per the C
                    // contract when non-null.
                    let out_start = (!off_out.is_null()).then(|| unsafe { *off_out } as u64);
                    g.ret(kernel_copy(inp, out, out_start, kernel))
                }
            }
        }
    };
}

copy_hook!(copy_file_range, "copy_file_range(2)");
copy_hook!(splice, "splice(2)");
