//! msync/fsync/fdatasync/sync_file_range/syncfs/sync: write back the
//! changed cachelines of shadowed files, then let the kernel do its part.

use crate::fileio::check;
use crate::real;
use crate::reentry::{enter, Entered};
use crate::registry::{REG, SHADOW_MAPS};
use crate::sys::{self, Errno, PAGE};
use crate::writeback::Durability;
use libc::{c_int, c_uint, c_void, off64_t, size_t};
use std::sync::atomic::Ordering;

fn msync_impl(addr: *mut c_void, len: size_t, flags: c_int) -> Result<i32, Errno> {
    // The kernel validates the arguments and syncs non-shadow mappings;
    // ENOMEM (a hole in the range) still lets mapped parts be synced.
    // SAFETY: forwarded unchanged.
    let r = check(unsafe { real::msync(addr, len, flags) });
    match r {
        Err(Errno(libc::ENOMEM)) | Ok(_) => {}
        Err(e) => return Err(e),
    }
    if SHADOW_MAPS.load(Ordering::Relaxed) == 0
        || flags & (libc::MS_SYNC | libc::MS_ASYNC) == 0 && flags != 0
    {
        return r;
    }
    let a = addr as usize;
    let end = a.saturating_add(sys::page_up(len));
    let targets: Vec<_> = {
        let reg = REG.lock();
        reg.maps
            .range(..end)
            .rev()
            .take_while(|(_, m)| m.start + m.len > a)
            .filter(|(_, m)| m.shared)
            .map(|(_, m)| {
                let s = a.max(m.start);
                let e = end.min(m.start + m.len);
                let lo = m.off + (s - m.start) as u64;
                (m.file.clone(), lo..lo + (e - s) as u64)
            })
            .collect()
    };
    let how = if flags & libc::MS_SYNC != 0 {
        Durability::Complete
    } else {
        Durability::ByCaller
    };
    let mut failed = None;
    for (f, range) in targets {
        if let Err(e) = f.sync(Some(range), how) {
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => r,
    }
}

/// # Safety
/// C ABI, contract of msync(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn msync(addr: *mut c_void, len: size_t, flags: c_int) -> c_int {
    if SHADOW_MAPS.load(Ordering::Relaxed) == 0 {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        return unsafe { real::msync(addr, len, flags) };
    }
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::msync(addr, len, flags) },
        Some(g) => g.ret(msync_impl(addr, len, flags)),
    }
}

/// Writes back a file's shadow, then runs the kernel's call; a failed
/// writeback turns into EIO whatever the kernel said.
fn file_sync(
    g: &Entered,
    fd: c_int,
    range: Option<std::ops::Range<u64>>,
    how: Durability,
    kernel: impl FnOnce() -> c_int,
) -> c_int {
    let (ours, atomic) = match crate::fdtable::lookup_fd(fd) {
        Some(f) => (f.sync(range, how), f.shadow.is_atomic()),
        None => (Ok(()), false),
    };
    if atomic && ours.is_ok() {
        // A failure-atomic sync is durable in its log already (and the
        // file is made durable before the log needs it): the kernel's call
        // would flush what the log already holds (the rest of the inode's
        // metadata, such as its times, is not kept durable by fsync then).
        return g.ret(Ok(0));
    }
    let r = check(kernel());
    g.ret(match (ours, r) {
        (_, Err(e)) => Err(e),
        // EIO, or a failure-atomic sync's log that found no room (ENOSPC,
        // EDQUOT): the shim's sync says which.
        (Err(e), Ok(_)) => Err(e),
        (Ok(()), Ok(v)) => Ok(v),
    })
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    if !crate::fdtable::fd_maybe_pmem(fd) {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        return unsafe { real::fsync(fd) };
    }
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::fsync(fd) },
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        Some(g) => file_sync(&g, fd, None, Durability::ByCaller, || unsafe {
            real::fsync(fd)
        }),
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    if !crate::fdtable::fd_maybe_pmem(fd) {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        return unsafe { real::fdatasync(fd) };
    }
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::fdatasync(fd) },
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        Some(g) => file_sync(&g, fd, None, Durability::ByCaller, || unsafe {
            real::fdatasync(fd)
        }),
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sync_file_range(
    fd: c_int,
    off: off64_t,
    n: off64_t,
    flags: c_uint,
) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    let kernel = || unsafe { real::sync_file_range(fd, off, n, flags) };
    if !crate::fdtable::fd_maybe_pmem(fd)
        || flags & libc::SYNC_FILE_RANGE_WRITE == 0
        || off < 0
        || n < 0
    {
        return kernel();
    }
    match enter() {
        None => kernel(),
        Some(g) => {
            let lo = off as u64 - off as u64 % PAGE as u64;
            let hi = if n == 0 {
                u64::MAX
            } else {
                (off as u64).saturating_add(n as u64)
            };
            let how = if flags & libc::SYNC_FILE_RANGE_WAIT_AFTER != 0 {
                Durability::Complete
            } else {
                Durability::ByCaller
            };
            file_sync(&g, fd, Some(lo..hi), how, kernel)
        }
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn syncfs(fd: c_int) -> c_int {
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::syncfs(fd) },
        Some(g) => {
            let ours = match sys::fstat(fd) {
                Ok(st) => crate::writeback::sync_all(Some(st.st_dev)),
                Err(_) => Ok(()),
            };
            // SAFETY: forwarded with the caller's own arguments (C ABI contract).
            let r = check(unsafe { real::syncfs(fd) });
            g.ret(match (ours, r) {
                (_, Err(e)) => Err(e),
                (Err(_), Ok(_)) => Err(Errno(libc::EIO)),
                (Ok(()), Ok(v)) => Ok(v),
            })
        }
    }
}

/// # Safety
/// C ABI.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sync() {
    if let Some(_g) = enter() {
        let _ = crate::writeback::sync_all(None);
    }
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { real::sync() }
}
