//! Failure-atomic files (`DAXSHIM_ATOMIC`, docs/ARCHITECTURE.md
//! "Failure-atomic sync"): a write goes to the shadow only, so that it
//! belongs to the next sync's unit; the size lives in the backing, where
//! every program looks for it, and what a shrink takes of the synced file
//! is saved in the log first.

use super::{iov_parts, At};
use crate::file::{FileInner, FileState};
use crate::persist::redo;
use crate::shadow::atomic::Period;
use crate::shadow::Fill;
use crate::sys::{self, Errno, PAGE};
use crate::writeback::Durability;
use libc::{c_int, iovec};
use std::ffi::CStr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The kernel's cap on one transfer (`MAX_RW_COUNT`).
const MAX_RW_COUNT: usize = 0x7fff_f000;

/// The most bytes one undo record holds (a bigger shrink writes several).
const UNDO_RECORD_MAX: u64 = 64 << 20;

/// Might an `O_TRUNC` open meet a failure-atomic file? Then it truncates
/// after the open, through the `ftruncate` hook.
pub fn in_play() -> bool {
    crate::shadow::atomic::SEEN.load(Ordering::Relaxed)
        || crate::reentry::READY.load(Ordering::Acquire)
            && crate::runtime::rt().cfg.atomic != crate::config::OptIn::Off
}

/// The caller's bytes, copied by the kernel: a bad buffer is `EFAULT` (or
/// a short count), not a fault in the shim.
fn gather(iov: &[iovec]) -> Result<Vec<u8>, Errno> {
    let n = iov
        .iter()
        .fold(0usize, |a, v| a.saturating_add(v.iov_len))
        .min(MAX_RW_COUNT);
    let mut out = vec![0u8; n];
    for (pos, p, len) in iov_parts(iov, n) {
        let local = iovec {
            iov_base: out[pos..].as_mut_ptr() as *mut libc::c_void,
            iov_len: len,
        };
        let remote = iovec {
            iov_base: p as *mut libc::c_void,
            iov_len: len,
        };
        let got = match sys::process_vm_self(false, &local, &remote) {
            Ok(k) => k,
            Err(_) if pos > 0 => 0,
            Err(e) => return Err(e),
        };
        if got < len {
            out.truncate(pos + got);
            if out.is_empty() {
                return Err(Errno(libc::EFAULT));
            }
            break;
        }
    }
    Ok(out)
}

/// `write`/`pwrite` family on a failure-atomic file: the bytes go to the
/// shadow only (the backing grows first if they reach past its end, so
/// that every reader sees the size); the range is this process's to sync.
pub fn write(f: &Arc<FileState>, fd: c_int, iov: &[iovec], at: At) -> Result<isize, Errno> {
    let fl = sys::fcntl(fd, libc::F_GETFL, 0)? as c_int;
    if fl & libc::O_ACCMODE == libc::O_RDONLY || fl & libc::O_PATH != 0 {
        return Err(Errno(libc::EBADF));
    }
    if matches!(at, At::Offset(o) if o > i64::MAX as u64) {
        return Err(Errno(libc::EINVAL));
    }
    let bytes = gather(iov)?;
    let n = bytes.len() as u64;
    {
        let mut inner = f.inner.lock();
        let _io = f.shadow.io_lock();
        let backing = f.backing()?;
        let bfd = backing.raw();
        let size = sys::file_size(bfd)?;
        let off = match at {
            _ if fl & libc::O_APPEND != 0 => size,
            At::Offset(o) => o,
            At::Position => sys::lseek(fd, 0, libc::SEEK_CUR)? as u64,
        };
        if n == 0 {
            return Ok(0);
        }
        let end = put(f, &mut inner, bfd, &bytes, off, size)?;
        if matches!(at, At::Position) {
            sys::lseek(fd, end as i64, libc::SEEK_SET)?;
        }
    }
    if fl & libc::O_DSYNC != 0 {
        // O_SYNC/O_DSYNC: durable on return, i.e. a sync (one unit with
        // everything before it).
        f.sync(None, Durability::Complete)?;
    }
    crate::writeback::keep_views_bounded(f);
    Ok(n as isize)
}

/// Puts `bytes` at `off` into the unit (`size`: the file's size now): the
/// backing grows first if they reach past its end (every reader sees the
/// size at once; recovery gives the synced size back), the bytes go to the
/// shadow, their pages to this process's pending set. Returns where they
/// end. Call with `inner` and the io lock held.
fn put(
    f: &FileState,
    inner: &mut FileInner,
    bfd: i32,
    bytes: &[u8],
    off: u64,
    size: u64,
) -> Result<u64, Errno> {
    let end = off
        .checked_add(bytes.len() as u64)
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or(Errno(libc::EFBIG))?;
    if end > size {
        sys::ftruncate(bfd, end)?;
    }
    store(f, bfd, bytes, off, end.max(size))?;
    // Whole pages, as a harvest gives them (a sync compares whole lines).
    inner
        .pending
        .insert(off - off % PAGE as u64, sys::page_up(end as usize) as u64);
    f.shadow.mark_writer();
    f.shadow.record_backing(bfd);
    Ok(end)
}

/// Puts `bytes` at `off` into the shadow (made if none exists yet; `size`:
/// the file's size now). Pages of a lazy data file the bytes cover only in
/// part take the backing's bytes first, under the same fill lock (an
/// evictor could punch a page filled earlier).
fn store(f: &FileState, bfd: i32, bytes: &[u8], off: u64, size: u64) -> Result<(), Errno> {
    let data = f
        .shadow
        .ensure_data_locked(bfd, Fill::Lazy)
        .map_err(|e| e.errno)?;
    let dfd = data.fd().as_raw_fd();
    let end = off + bytes.len() as u64;
    let lazy = f.shadow.is_lazy();
    let _fill = lazy.then(|| f.shadow.fill_lock());
    f.shadow.set_data_size(size)?;
    if lazy {
        let first = off - off % PAGE as u64;
        let last = (end - 1) - (end - 1) % PAGE as u64;
        let edges = if last == first {
            vec![first]
        } else {
            vec![first, last]
        };
        for page in edges {
            let whole = page >= off && page + PAGE as u64 <= end;
            if whole || !f.shadow.present(page, page + PAGE as u64).is_empty() {
                continue;
            }
            let mut buf = vec![0u8; PAGE];
            sys::pread_full(bfd, &mut buf, page)?;
            sys::pwrite_all(dfd, &buf, page)?;
            f.shadow.rebase(bfd, page, (page + PAGE as u64).min(size))?;
        }
    }
    sys::pwrite_all(dfd, bytes, off)?;
    Ok(())
}

/// Before the backing shrinks to `len`: the synced bytes the shrink takes
/// (those below the lowest size the file had since the last sync; the
/// backing still holds them, since writes go to the shadow) are saved in
/// undo records, durably. Call with the io lock held.
pub fn before_shrink(f: &FileState, len: u64) -> Result<(), Errno> {
    let backing = f.backing()?;
    let bfd = backing.raw();
    let lowered = |mut p: Period| {
        if len < p.low {
            p.low = len;
            f.shadow.set_log_period(&p);
        }
    };
    let p = f.shadow.log_period();
    if p.applied >= p.gen && p.low.min(sys::file_size(bfd)?) <= len {
        // Nothing synced is cut and no committed sync waits for its apply
        // (a growth, mostly): the log is not needed.
        lowered(p);
        return Ok(());
    }
    let lanes = f.log_lanes()?;
    let mut p = f.shadow.settle_log(&lanes, bfd)?;
    let to = p.low.min(sys::file_size(bfd)?);
    // From the top down, so that recovery, which gives them back in the
    // reverse order, cuts at the lowest first. Zero pages are not saved:
    // the cut and the growth back to the synced size make them.
    // Holes of the backing (a sparse tail grown by ftruncate) are zeros
    // too, found without reading them. (A growth cuts nothing.)
    let data = if to > len {
        crate::shadow::data_segments(bfd, len, to)
    } else {
        crate::ranges::RangeSet::new()
    };
    let mut top = to;
    while top > len {
        let from = top.saturating_sub(UNDO_RECORD_MAX).max(len);
        let mut u = redo::Unit::new(p.gen, p.size, f.shadow.log_owner());
        u.set_low(from);
        for (a, b) in data.clip(from, top).iter() {
            let mut buf = vec![0u8; (b - a) as usize];
            let got = sys::pread_full(bfd, &mut buf, a)?;
            buf.truncate(got);
            for (x, y) in nonzero_pages(&buf, a) {
                u.add(x, &buf[(x - a) as usize..(y - a) as usize]);
            }
        }
        if !u.is_empty() {
            p.undo_at = redo::save_undo(&u, &lanes, p.undo_at)?;
        }
        top = from;
    }
    lowered(p);
    Ok(())
}

/// The runs of pages of `buf` (at file offset `at`) that hold a nonzero
/// byte, as file offset ranges.
fn nonzero_pages(buf: &[u8], at: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        // Pages of the file (the first may start inside one).
        let end = ((at as usize + off) / PAGE + 1) * PAGE - at as usize;
        let end = end.min(buf.len());
        if buf[off..end].iter().any(|&b| b != 0) {
            let (a, b) = (at + off as u64, at + end as u64);
            match runs.last_mut() {
                Some((_, e)) if *e == a => *e = b,
                _ => runs.push((a, b)),
            }
        }
        off = end;
    }
    runs
}

/// `truncate(path, len)` of a failure-atomic file: through a descriptor
/// and the `ftruncate` path (None: not such a file, the kernel's call does
/// it).
pub fn truncate_path(path: &CStr, len: i64) -> Option<Result<i32, Errno>> {
    if len < 0 || !in_play() || !crate::classify::path_may_be_pmem(path) {
        return None;
    }
    let owned = sys::open(path, libc::O_WRONLY | libc::O_CLOEXEC, 0).ok()?;
    let fd = owned.as_raw_fd();
    crate::classify::classify(fd)?;
    let _ = crate::fdtable::on_open(fd, 0);
    let r = crate::fdtable::lookup_fd(fd)
        .filter(|f| f.shadow.is_atomic())
        // SAFETY: our own descriptor, a non-negative length.
        .map(|f| super::ftruncate_impl(f, len, || unsafe { crate::real::ftruncate64(fd, len) }));
    crate::fdtable::on_close(fd);
    r
}

/// `fallocate` on a failure-atomic file: zeroing and punching write zeros
/// into the unit (the blocks are not given back); shifting data is not
/// supported (`EOPNOTSUPP`, as on a file system without it). None: plain
/// allocation, which the kernel does (a size it grows is the backing's).
pub fn fallocate(
    f: &FileState,
    fd: c_int,
    mode: c_int,
    off: i64,
    len: i64,
) -> Option<Result<i32, Errno>> {
    if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
        return Some(Err(Errno(libc::EOPNOTSUPP)));
    }
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
        return None;
    }
    Some((|| {
        if off < 0 || len <= 0 {
            return Err(Errno(libc::EINVAL));
        }
        let fl = sys::fcntl(fd, libc::F_GETFL, 0)? as c_int;
        if fl & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno(libc::EBADF));
        }
        let keep_size = mode & (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0;
        let (off, len) = (off as u64, len as u64);
        let mut inner = f.inner.lock();
        let _io = f.shadow.io_lock();
        let backing = f.backing()?;
        let bfd = backing.raw();
        let size = sys::file_size(bfd)?;
        let mut end = off.checked_add(len).ok_or(Errno(libc::EFBIG))?;
        if keep_size {
            end = end.min(size);
        }
        let zeros = vec![0u8; 1 << 20];
        let mut at = off;
        while at < end {
            let k = (end - at).min(zeros.len() as u64) as usize;
            let now = sys::file_size(bfd)?;
            put(f, &mut inner, bfd, &zeros[..k], at, now)?;
            at += k as u64;
        }
        Ok(0)
    })())
}

/// A kernel copy (`copy_file_range`, `sendfile`, `splice`) into a
/// failure-atomic file: done here, as a read of the source (through the
/// shim, coherent) and a write into the unit, so the copied bytes wait for
/// the sync like any write. `off_in`/`off_out`: the call's offsets (None:
/// the descriptor's position), advanced as the kernel would. At most
/// 8 MiB a call (a short count, as the kernel may give).
pub fn copy_into(
    f: &Arc<FileState>,
    inp: c_int,
    out: c_int,
    off_in: Option<&mut i64>,
    off_out: Option<&mut i64>,
    n: usize,
) -> Result<isize, Errno> {
    let mut buf = vec![0u8; n.min(8 << 20)];
    let iov = [iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    let got = match &off_in {
        Some(o) if **o < 0 => return Err(Errno(libc::EINVAL)),
        Some(o) => {
            let at = **o;
            // SAFETY: our own buffer.
            super::read_impl(inp, &iov, At::Offset(at as u64), || unsafe {
                crate::real::pread64(inp, iov[0].iov_base, iov[0].iov_len, at)
            })?
        }
        // SAFETY: our own buffer.
        None => super::read_impl(inp, &iov, At::Position, || unsafe {
            crate::real::read(inp, iov[0].iov_base, iov[0].iov_len)
        })?,
    };
    if let Some(o) = off_in {
        *o += got as i64;
    }
    if got <= 0 {
        return Ok(got);
    }
    let part = [iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: got as usize,
    }];
    let at = match &off_out {
        Some(o) if **o < 0 => return Err(Errno(libc::EINVAL)),
        Some(o) => At::Offset(**o as u64),
        None => At::Position,
    };
    let put = write(f, out, &part, at)?;
    if let Some(o) = off_out {
        *o += put as i64;
    }
    Ok(put)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nonzero_pages_are_found_in_runs() {
        let mut b = vec![0u8; 5 * 4096];
        b[10] = 1;
        b[4096 + 5] = 1;
        b[3 * 4096] = 7;
        assert_eq!(super::nonzero_pages(&b, 0), vec![(0, 8192), (12288, 16384)]);
        // At an offset inside a page: the first piece ends at the page's end.
        assert_eq!(
            super::nonzero_pages(&b[100..], 100),
            vec![(4096, 8192), (12288, 16384)]
        );
        assert!(super::nonzero_pages(&[0u8; 9000], 4000).is_empty());
    }
}
