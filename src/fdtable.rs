//! The descriptor table: which descriptors are pmem files (one bit each,
//! so that I/O on any other descriptor costs one array lookup), kept by the
//! open/close/dup family and filled at start-up from `/proc/self/fd`.

use crate::classify::{classify, Classified};
use crate::file::FileState;
use crate::registry::{get_or_attach, release_ref, RefKind, REG};
use crate::sys::{self, Errno, Failure};
use crate::track;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const FD_WORDS: usize = 1 << 14; // 1M descriptors
pub static FD_BITS: [AtomicU64; FD_WORDS] = [const { AtomicU64::new(0) }; FD_WORDS];

/// The word of `fd`'s bit and the bit, if it has one.
fn fd_bit(fd: i32) -> Option<(&'static AtomicU64, u64)> {
    let fd = fd as usize;
    (fd / 64 < FD_WORDS).then(|| (&FD_BITS[fd / 64], 1u64 << (fd % 64)))
}

fn mark_fd(fd: i32) {
    if let Some((w, bit)) = fd_bit(fd) {
        w.fetch_or(bit, Ordering::Relaxed);
    }
}

fn unmark_fd(fd: i32) {
    if let Some((w, bit)) = fd_bit(fd) {
        w.fetch_and(!bit, Ordering::Relaxed);
    }
}

/// One array lookup: might `fd` be a pmem file? (Exact for fd < 1M.)
#[inline]
pub fn fd_maybe_pmem(fd: i32) -> bool {
    if fd < 0 {
        return false;
    }
    let fd = fd as usize;
    if fd / 64 < FD_WORDS {
        FD_BITS[fd / 64].load(Ordering::Relaxed) & (1u64 << (fd % 64)) != 0
    } else {
        true
    }
}

pub fn lookup_fd(fd: i32) -> Option<Arc<FileState>> {
    if !fd_maybe_pmem(fd) {
        return None;
    }
    REG.lock().fds.get(&fd).cloned()
}

/// The attached file behind `fd`, classifying and attaching a descriptor the
/// table has not seen (opened before the shim, or by a path it cannot see).
/// `Ok(None)`: not pmem. `Err`: pmem, but no shadow could be had.
pub fn file_for_fd(fd: i32) -> Result<Option<Arc<FileState>>, Failure> {
    if let Some(f) = lookup_fd(fd) {
        return Ok(Some(f));
    }
    let Some(class) = classify(fd) else {
        return Ok(None);
    };
    let f = get_or_attach(fd, &class)?;
    let dropped = register_fd(fd, f.clone());
    drop(dropped);
    Ok(Some(f))
}

/// Enters `fd → file` in the table; returns a file whose last reference
/// this removed (to be dropped by the caller outside any lock).
pub fn register_fd(fd: i32, f: Arc<FileState>) -> Option<Arc<FileState>> {
    f.inner.lock().fd_refs += 1;
    f.backing.note_program_fd(fd);
    let mut reg = REG.lock();
    let old = reg.fds.insert(fd, f);
    mark_fd(fd);
    old.and_then(|o| {
        o.backing.forget_program_fd(fd);
        release_ref(&mut reg, o, RefKind::Descriptor)
    })
}

/// After a successful open: enter pmem files in the table. `Err`: no
/// shadow can be had and the file may not be used without one
/// ([`crate::classify::without_shadow`]): the caller fails its open.
pub fn on_open(fd: i32, flags: i32) -> Result<(), Errno> {
    if fd < 0 {
        return Ok(());
    }
    match classify(fd) {
        Some(class) => on_open_classified(fd, flags, class),
        None => Ok(()),
    }
}

/// `on_open` for a descriptor already classified as pmem.
pub fn on_open_classified(fd: i32, flags: i32, class: Classified) -> Result<(), Errno> {
    match get_or_attach(fd, &class) {
        Ok(f) => {
            if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
                // The kernel truncated the backing; the shadow follows.
                let _io = f.shadow.io_lock();
                let _ = f.follow_backing_size();
            }
            let dropped = register_fd(fd, f);
            drop(dropped);
            Ok(())
        }
        Err(e) => crate::classify::without_shadow(
            class.emulated,
            &class.path,
            &e,
            "this descriptor bypasses the shadow",
        ),
    }
}

/// Before close (or implicit close by dup2/dup3): forget `fd`.
pub fn on_close(fd: i32) {
    if !fd_maybe_pmem(fd) {
        return;
    }
    let dropped = {
        let mut reg = REG.lock();
        unmark_fd(fd);
        match reg.fds.remove(&fd) {
            Some(f) => {
                f.backing.forget_program_fd(fd);
                release_ref(&mut reg, f, RefKind::Descriptor)
            }
            None => None,
        }
    };
    drop(dropped);
}

pub fn on_close_range(first: u32, last: u32) {
    let fds: Vec<i32> = {
        let reg = REG.lock();
        reg.fds
            .range(first as i32..=last.min(i32::MAX as u32) as i32)
            .map(|(&fd, _)| fd)
            .collect()
    };
    for fd in fds {
        on_close(fd);
    }
}

/// After `newfd` became a duplicate of `oldfd`.
pub fn on_dup(oldfd: i32, newfd: i32) {
    if newfd < 0 || oldfd == newfd {
        return;
    }
    match lookup_fd(oldfd) {
        Some(f) => {
            let dropped = register_fd(newfd, f);
            drop(dropped);
        }
        None => on_close(newfd),
    }
}

/// Rescans descriptors inherited from the parent (start-up).
pub fn scan_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if track::tracker().owns_fd(fd) {
            continue;
        }
        // Only descriptors that are still open (the read_dir one is gone).
        if sys::fcntl(fd, libc::F_GETFD, 0).is_ok() {
            // An inherited descriptor cannot be refused: it bypasses the
            // shadow (logged).
            let _ = on_open(fd, 0);
        }
    }
}

/// The file at `path` (relative to `dirfd`, not following a last
/// symbolic link) if this process is attached to it.
fn attached_at(dirfd: i32, path: &std::ffi::CStr) -> Option<(Classified, Arc<FileState>)> {
    let fd = sys::openat(
        dirfd,
        path,
        libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        0,
    )
    .ok()?;
    let class = classify(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    let file = REG
        .lock()
        .files
        .iter()
        .find(|f| f.id == class.id)
        .cloned()?;
    Some((class, file))
}

/// Before a rename by this process: an attached file in failure-atomic
/// mode is made durable first (every sync's apply flushed), so that a crash
/// between the rename and the move of its lanes after it needs no record.
pub fn before_rename(dirfd: i32, path: &std::ffi::CStr) {
    let Some((class, f)) = attached_at(dirfd, path) else {
        return;
    };
    if f.shadow.is_atomic() {
        let _io = f.shadow.io_lock();
        let flushed = f
            .backing()
            .and_then(|b| f.shadow.make_applies_durable(b.raw()));
        if let Err(e) = flushed {
            warn!("{}: cannot flush it before its rename: {e}", class.path);
        }
    }
}

/// After a rename by this process: an attached file now at `path` (relative
/// to `dirfd`) is reopened there when its cached descriptor is gone.
pub fn on_rename(dirfd: i32, path: &std::ffi::CStr) {
    if let Some((class, f)) = attached_at(dirfd, path) {
        f.backing.set_path(class.path.clone());
        if f.shadow.is_atomic() {
            let _io = f.shadow.io_lock();
            let backing = f.backing().ok();
            if let Err(e) = f
                .shadow
                .move_log(&class.path, backing.as_ref().map(|b| b.raw()))
            {
                error!(
                    "{}: cannot move its atomic log beside it ({e}); run `daxshim recover` after a crash",
                    class.path
                );
            }
        }
    }
}
