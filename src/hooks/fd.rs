//! open/close/dup family: keeps the descriptor table of pmem files.

use crate::fileio::check;
use crate::real;
use crate::reentry::enter;
use libc::{c_char, c_int, c_long, c_uint, mode_t};

fn opened(fd: c_int, flags: c_int) -> c_int {
    if fd < 0 || !crate::reentry::READY.load(std::sync::atomic::Ordering::Acquire) {
        return fd;
    }
    // Classifying uses raw system calls only: most files are not pmem and
    // never enter the shim (nor pay for blocking signals).
    let Some(class) = crate::sys::preserving_errno(|| crate::classify::classify(fd)) else {
        return fd;
    };
    if let Some(g) = enter() {
        if let Err(e) = crate::fdtable::on_open_classified(fd, flags, class) {
            // SAFETY: the descriptor this open just returned, not yet the
            // program's.
            unsafe { real::close(fd) };
            return g.ret(Err(e));
        }
        g.restore_errno();
    }
    fd
}

/// Opens with `open(flags)` and registers the descriptor. `O_TRUNC` where
/// a failure-atomic file may be met: the kernel would truncate before the
/// shim could save what the truncation takes of the synced file, so the
/// file is opened without it and truncated through the `ftruncate` hook
/// (a file that is not pmem is truncated by the kernel all the same).
fn open_hooked(flags: c_int, open: impl Fn(c_int) -> c_int) -> c_int {
    let truncating = flags & libc::O_TRUNC != 0
        && flags & libc::O_ACCMODE != libc::O_RDONLY
        && crate::reentry::READY.load(std::sync::atomic::Ordering::Acquire)
        && crate::fileio::atomic::in_play();
    if !truncating {
        return opened(open(flags), flags);
    }
    let flags = flags & !libc::O_TRUNC;
    let fd = opened(open(flags), flags);
    let regular = fd >= 0
        && crate::sys::statx_fd(fd, libc::STATX_TYPE)
            .is_ok_and(|x| x.stx_mode as u32 & libc::S_IFMT == libc::S_IFREG);
    // SAFETY: our own hook, on the descriptor this open just returned.
    if regular && unsafe { super::io::ftruncate64(fd, 0) } != 0 {
        let e = crate::sys::get_errno();
        // SAFETY: the descriptor this open just returned, not yet the
        // program's.
        unsafe { real::close(fd) };
        crate::sys::set_errno(e);
        return -1;
    }
    fd
}

/// # Safety
/// C ABI: `path` is a valid C string; `mode` is read only with O_CREAT/O_TMPFILE.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::open64(path, fl, mode) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::open64(path, fl, mode) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::openat64(dirfd, path, fl, mode) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::openat64(dirfd, path, fl, mode) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::open64(path, fl, mode) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::open64(path, fl, mode) })
}

/// Fortified `open` (`_FORTIFY_SOURCE`).
///
/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::__open64_2(path, fl) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::__open64_2(path, fl) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::__openat64_2(dirfd, path, fl) })
}

/// # Safety
/// As `open`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    open_hooked(flags, |fl| unsafe { real::__openat64_2(dirfd, path, fl) })
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if crate::sys::is_held(fd) && !crate::reentry::in_shim() {
        // One of the shim's own (a "close every descriptor" loop): the
        // program never opened it; for it, it is closed.
        return 0;
    }
    if crate::fdtable::fd_maybe_pmem(fd) {
        if let Some(_g) = enter() {
            crate::sys::preserving_errno(|| crate::fdtable::on_close(fd));
        }
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { real::close(fd) }
}

fn duped(oldfd: c_int, newfd: c_int) -> c_int {
    if newfd >= 0 {
        if let Some(_g) = enter() {
            crate::sys::preserving_errno(|| crate::fdtable::on_dup(oldfd, newfd));
        }
    }
    newfd
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    duped(fd, unsafe { real::dup(fd) })
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn dup2(fd: c_int, new: c_int) -> c_int {
    if onto_held(new) {
        return -1;
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    duped(fd, unsafe { real::dup2(fd, new) })
}

/// `dup2`/`dup3` onto a descriptor the shim holds would close it under the
/// shim: refused with `EBUSY`, the kernel's answer when the target is
/// being opened meanwhile (it never comes up unless a program picks high
/// numbers itself).
fn onto_held(new: c_int) -> bool {
    if crate::sys::is_held(new) && !crate::reentry::in_shim() {
        warn!("dup2/dup3 onto descriptor {new}, which the shim holds: EBUSY");
        crate::sys::set_errno(libc::EBUSY);
        return true;
    }
    false
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int {
    if onto_held(new) {
        return -1;
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    duped(fd, unsafe { real::dup3(fd, new, flags) })
}

fn fcntl_impl(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    // SAFETY: forwarded unchanged; the kernel validates `arg`.
    let r = unsafe { real::fcntl64(fd, cmd, arg) };
    if (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) && check(r).is_ok() {
        return duped(fd, r);
    }
    r
}

/// # Safety
/// C ABI; the third argument is read as a long as the x86-64 ABI passes it.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    fcntl_impl(fd, cmd, arg)
}

/// # Safety
/// As `fcntl`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    fcntl_impl(fd, cmd, arg)
}

/// `close_range` over `[first, last]` minus the descriptors the shim holds
/// (a "close everything" must not close the shim's own).
fn close_range_around_held(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let held = if crate::reentry::in_shim() || first > last {
        Vec::new()
    } else {
        crate::sys::held_in(first, last)
    };
    let mut from = first;
    for h in held {
        if h > from {
            // SAFETY: a subrange of the caller's own range.
            let r = unsafe { real::close_range(from, h - 1, flags) };
            if r != 0 {
                return r;
            }
        }
        from = h.saturating_add(1);
        if h == c_uint::MAX {
            return 0;
        }
    }
    if from > last {
        return 0;
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { real::close_range(from, last, flags) }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let r = close_range_around_held(first, last, flags);
    if r == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        if let Some(_g) = enter() {
            crate::sys::preserving_errno(|| crate::fdtable::on_close_range(first, last));
        }
    }
    r
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn closefrom(first: c_int) {
    if crate::sys::held_in(first.max(0) as u32, u32::MAX).is_empty() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        unsafe { real::closefrom(first) };
    } else {
        close_range_around_held(first.max(0) as u32, u32::MAX, 0);
    }
    if let Some(_g) = enter() {
        crate::sys::preserving_errno(|| {
            crate::fdtable::on_close_range(first.max(0) as u32, u32::MAX)
        });
    }
}

/// Before a rename by this process (see `fdtable::before_rename`).
fn renaming(olddir: c_int, old: *const c_char) {
    if old.is_null() {
        return;
    }
    if let Some(g) = enter() {
        // Only a failure-atomic file has anything to do first: no system
        // call otherwise.
        let atomic = crate::registry::REG
            .lock()
            .files
            .iter()
            .any(|f| f.shadow.is_atomic());
        if atomic {
            // SAFETY: the caller's C string, about to be passed to the kernel.
            crate::fdtable::before_rename(olddir, unsafe { std::ffi::CStr::from_ptr(old) });
        }
        g.restore_errno();
    }
}

/// A rename by this process: an attached file's new place is remembered
/// (its backing descriptor may have to be reopened by path later).
fn renamed(
    r: c_int,
    olddir: c_int,
    old: *const c_char,
    newdir: c_int,
    new: *const c_char,
) -> c_int {
    if r != 0 {
        return r;
    }
    if let Some(g) = enter() {
        if !crate::registry::REG.lock().files.is_empty() {
            for (dir, p) in [(newdir, new), (olddir, old)] {
                if !p.is_null() {
                    // SAFETY: a C string the kernel just accepted.
                    let p = unsafe { std::ffi::CStr::from_ptr(p) };
                    crate::fdtable::on_rename(dir, p);
                }
            }
        }
        g.restore_errno();
    }
    r
}

/// # Safety
/// C ABI, contract of rename(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    renaming(libc::AT_FDCWD, old);
    // SAFETY: rename is renameat2 relative to the working directory, no flags.
    let r = unsafe { real::renameat2(libc::AT_FDCWD, old, libc::AT_FDCWD, new, 0) };
    renamed(r, libc::AT_FDCWD, old, libc::AT_FDCWD, new)
}

/// # Safety
/// C ABI, contract of renameat(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn renameat(
    olddir: c_int,
    old: *const c_char,
    newdir: c_int,
    new: *const c_char,
) -> c_int {
    renaming(olddir, old);
    // SAFETY: renameat is renameat2 without flags.
    let r = unsafe { real::renameat2(olddir, old, newdir, new, 0) };
    renamed(r, olddir, old, newdir, new)
}

/// # Safety
/// C ABI, contract of renameat2(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn renameat2(
    olddir: c_int,
    old: *const c_char,
    newdir: c_int,
    new: *const c_char,
    flags: c_uint,
) -> c_int {
    renaming(olddir, old);
    // SAFETY: forwarded with the caller's own arguments.
    let r = unsafe { real::renameat2(olddir, old, newdir, new, flags) };
    renamed(r, olddir, old, newdir, new)
}
