//! File I/O kept coherent with the shadows: what the read/write family,
//! truncation, allocation and kernel copies do beyond the kernel's call.
//!
//! Reads: the kernel does the call (offsets, EOF, errors exactly its own),
//! then the bytes are replaced by the shadow's, which holds mapped stores.
//! Writes: under the shadow's io lock, the kernel writes the backing, then
//! the same bytes go into the shadow, so that nothing is left to write back
//! (docs/ARCHITECTURE.md, "File I/O").

use crate::file::FileState;

pub mod atomic;
use crate::sys::{self, Errno};
use crate::writeback::Durability;
use libc::{c_int, iovec, off64_t};
use std::ffi::CStr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// The result of a real call returning -1/errno (or a negative count), as
/// a Result.
pub fn check<T: Copy + Default + PartialOrd>(r: T) -> Result<T, Errno> {
    if r < T::default() {
        Err(Errno(sys::get_errno()))
    } else {
        Ok(r)
    }
}

/// Where the last `n` bytes transferred through `fd` at its file position
/// started.
fn pos_before(fd: c_int, n: usize) -> Option<u64> {
    sys::lseek(fd, 0, libc::SEEK_CUR)
        .ok()
        .map(|p| p as u64 - n as u64)
}

/// Where the `n` bytes the kernel just wrote through `fd` landed: at end of
/// file for `O_APPEND` (even pwrite's), else at the offset or the position
/// the call advanced.
fn written_at(fd: c_int, at: At, n: usize) -> Option<u64> {
    let append = sys::fcntl(fd, libc::F_GETFL, 0).is_ok_and(|fl| fl as i32 & libc::O_APPEND != 0);
    if append {
        sys::file_size(fd).ok().map(|size| size - n as u64)
    } else {
        match at {
            At::Offset(o) => Some(o),
            At::Position => pos_before(fd, n),
        }
    }
}

/// The first `n` bytes of the buffers of `iov`, as (position among those
/// bytes, address, length) per buffer.
fn iov_parts(iov: &[iovec], n: usize) -> impl Iterator<Item = (usize, *mut u8, usize)> + '_ {
    iov.iter()
        .scan(0usize, move |pos, v| {
            let at = *pos;
            let len = v.iov_len.min(n.saturating_sub(at));
            *pos += len;
            Some((at, v.iov_base as *mut u8, len))
        })
        .filter(|&(_, _, len)| len > 0)
}

/// Overwrites `n` bytes spread over `iov` (the kernel's, i.e. the
/// backing's) with the shadow's bytes at `off`, where the shadow's are the
/// ones to show: lines the shim's processes changed. A line whose shadow
/// bytes still match its base (what the backing held when the shim last
/// knew it) keeps the kernel's bytes, which are newer if someone outside
/// the shim changed it (whatever the timestamps say). A lazy shadow holds
/// only some pages; elsewhere the kernel's bytes are right. The shadow is
/// read under the fill lock into our own buffer: the caller's buffer may
/// itself be a lazy mapping whose faults need that lock.
fn patch_from_shadow(f: &FileState, data_fd: i32, iov: &[iovec], n: usize, off: u64) {
    let line = crate::persist::LINE as u64;
    let end = off + n as u64;
    let mut parts: Vec<(u64, Vec<u8>)> = Vec::new();
    let lazy = f.shadow.is_lazy();
    // (A size read before the fill lock: a stale one only clips or meets a
    // short read below.)
    let Ok(st) = sys::statx_fd(data_fd, libc::STATX_SIZE | libc::STATX_BLOCKS) else {
        return;
    };
    if lazy && st.stx_blocks == 0 {
        // Holes only (a failure-atomic file's synced pages are punched):
        // the kernel's bytes are the shadow's.
        return;
    }
    let size = st.stx_size;
    {
        let _fill = lazy.then(|| f.shadow.fill_lock());
        let held = if lazy {
            f.shadow.present(off, end)
        } else {
            let mut all = crate::ranges::RangeSet::new();
            all.insert(off, end);
            all
        };
        let bases = f.shadow.bases(size);
        for (a, b) in held.iter() {
            let (a, b) = (a.max(off), b.min(end).min(size));
            if a >= b {
                continue;
            }
            // Whole lines, to compare them with their bases.
            let la = a - a % line;
            let lb = b.div_ceil(line).saturating_mul(line).min(size);
            let mut buf = vec![0u8; (lb - la) as usize];
            match sys::pread_full(data_fd, &mut buf, la) {
                Ok(k) => buf.truncate(k),
                Err(_) => return,
            }
            for (k, bytes) in buf.chunks(line as usize).enumerate() {
                let lo = la + k as u64 * line;
                let untouched = bases.as_ref().is_some_and(|g| {
                    let base = g.bases.get(lo);
                    // SAFETY: `bytes` is at most one line.
                    base != 0
                        && unsafe { crate::persist::base::line_hash(bytes.as_ptr(), bytes.len()) }
                            == base
                });
                if untouched {
                    continue;
                }
                let (s, e) = (lo.max(a), (lo + bytes.len() as u64).min(b));
                if s >= e {
                    continue;
                }
                let piece = &bytes[(s - lo) as usize..(e - lo) as usize];
                match parts.last_mut() {
                    Some((at, v)) if *at + v.len() as u64 == s => v.extend_from_slice(piece),
                    _ => parts.push((s, piece.to_vec())),
                }
            }
        }
    }
    for (a, bytes) in parts {
        iov_put(iov, (a - off) as usize, &bytes);
    }
}

/// Copies `bytes` into the buffers of `iov` at logical position `pos`.
fn iov_put(iov: &[iovec], pos: usize, bytes: &[u8]) {
    let end = pos + bytes.len();
    for (at, p, len) in iov_parts(iov, end) {
        let (a, b) = (pos.max(at), end.min(at + len));
        if a < b {
            // SAFETY: within the caller's buffer, which the kernel just filled.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes[a - pos..].as_ptr(), p.add(a - at), b - a)
            };
        }
    }
}

/// The first `n` bytes of the buffers of `iov`, gathered.
fn iov_gather(iov: &[iovec], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for (_, p, len) in iov_parts(iov, n) {
        // SAFETY: the caller's buffer, which the kernel just read.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len) });
    }
    out
}

/// Copies the `n` bytes the kernel just wrote at `off` into the shadow.
/// Runs under the io lock, like every writeback's copy: shadow and backing
/// agree on these bytes afterwards, so nothing is left to write back.
fn copy_to_shadow(
    f: &FileState,
    data_fd: i32,
    iov: &[iovec],
    n: usize,
    off: u64,
) -> Result<(), Errno> {
    if f.shadow.is_lazy() {
        // Gathered before the fill lock: the buffer may be a lazy mapping.
        store_in_lazy_shadow(f, data_fd, &iov_gather(iov, n), off)?;
        f.shadow.record_backing(f.backing()?.raw());
        return Ok(());
    }
    for (pos, p, len) in iov_parts(iov, n) {
        // SAFETY: the caller's buffer, which the kernel just read.
        let buf = unsafe { std::slice::from_raw_parts(p, len) };
        sys::pwrite_all(data_fd, buf, off + pos as u64)?;
    }
    // The backing holds these lines now as the shim knows them.
    let backing = f.backing()?;
    f.shadow.rebase(backing.raw(), off, off + n as u64)?;
    f.shadow.record_backing(backing.raw());
    Ok(())
}

/// Puts bytes the backing already holds at `off` into a lazy shadow: pages
/// it does not hold are the backing's anyway, so only held pages take them.
/// Where some process maps the data without handling missing pages
/// (`no_evict`), every page must be held: holes are filled first.
fn store_in_lazy_shadow(f: &FileState, data_fd: i32, bytes: &[u8], off: u64) -> Result<(), Errno> {
    let end = off + bytes.len() as u64;
    let backing = f.backing()?;
    let bfd = backing.raw();
    let backing_size = sys::file_size(bfd)?;
    let fill_holes = f.shadow.no_evict();
    if fill_holes {
        let mut buf = vec![0u8; crate::lazy::CHUNK as usize];
        let mut a = sys::page_down(off as usize) as u64;
        while a < end {
            let b = (a + crate::lazy::CHUNK).min(sys::page_up(end as usize) as u64);
            f.shadow.fill_range(bfd, a, b, &mut buf)?;
            a = b;
        }
    }
    let _fill = f.shadow.fill_lock();
    f.shadow.set_data_size(backing_size)?; // grown: holes are the backing's
    let held = if fill_holes {
        let mut all = crate::ranges::RangeSet::new();
        all.insert(off, end);
        all
    } else {
        f.shadow.present(off, end)
    };
    for (a, b) in held.iter() {
        let (a, b) = (a.max(off), b.min(end));
        if a < b {
            sys::pwrite_all(data_fd, &bytes[(a - off) as usize..(b - off) as usize], a)?;
            f.shadow.rebase(bfd, a, b)?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
pub enum At {
    /// The descriptor's file position (read/write/readv/writev, or -1 for
    /// the `v2` calls).
    Position,
    Offset(u64),
}

pub fn read_impl(
    fd: c_int,
    iov: &[iovec],
    at: At,
    kernel: impl FnOnce() -> isize,
) -> Result<isize, Errno> {
    let Some(f) = crate::fdtable::lookup_fd(fd) else {
        return check(kernel());
    };
    let n = check(kernel())?;
    // No data file: no process mapped the file, the backing is the truth.
    if n > 0 {
        // The shadow's bytes replace the kernel's only where the shim
        // changed them: take in what was changed outside it first.
        f.catch_up();
    }
    let data = if n > 0 { f.shadow.data() } else { None };
    if let Some(data) = &data {
        let data_fd = data.fd().as_raw_fd();
        let off = match at {
            At::Offset(o) => Some(o),
            At::Position => pos_before(fd, n as usize),
        };
        if let Some(off) = off {
            patch_from_shadow(&f, data_fd, iov, n as usize, off);
        }
    }
    Ok(n)
}

pub fn write_impl(
    fd: c_int,
    iov: &[iovec],
    at: At,
    kernel: impl FnOnce() -> isize,
) -> Result<isize, Errno> {
    let Some(f) = crate::fdtable::lookup_fd(fd) else {
        return check(kernel());
    };
    if f.shadow.is_atomic() {
        return crate::fileio::atomic::write(&f, fd, iov, at);
    }
    let _io = f.shadow.io_lock();
    let n = check(kernel())?;
    // Under the io lock the data cannot appear between the write and this
    // test; without data the write went where everyone reads.
    let Some(data) = f.shadow.data() else {
        return Ok(n);
    };
    let data_fd = data.fd().as_raw_fd();
    if n <= 0 {
        return Ok(n);
    }
    let copied = written_at(fd, at, n as usize)
        .ok_or(Errno(libc::EIO))
        .and_then(|off| copy_to_shadow(&f, data_fd, iov, n as usize, off));
    if let Err(e) = copied {
        // The backing has the data and the shadow does not: a stale shadow
        // must never be written back over it. Stop serving this shadow.
        error!(
            "{}: cannot update the shadow after a write ({e}); the file is no longer shadowed",
            f.path
        );
        f.poison();
    }
    drop(_io);
    crate::writeback::keep_views_bounded(&f);
    Ok(n)
}

pub fn ftruncate_impl(
    f: Arc<FileState>,
    len: i64,
    kernel: impl FnOnce() -> c_int,
) -> Result<i32, Errno> {
    let _io = f.shadow.io_lock();
    if f.shadow.is_atomic() && len >= 0 {
        // What the shrink takes of the synced bytes is saved first.
        atomic::before_shrink(&f, len as u64)?;
        f.shadow.mark_writer();
    }
    let r = check(kernel())?;
    if let Err(e) = f.follow_backing_size() {
        error!("{}: cannot resize the shadow: {e}", f.path);
        return Err(e);
    }
    Ok(r)
}

/// truncate(2) by path: if the file has a shadow, it follows the new size
/// (an atomic file's is truncated through a descriptor, as `ftruncate`).
pub fn truncate_impl(path: &CStr, len: i64, kernel: impl FnOnce() -> c_int) -> Result<i32, Errno> {
    if let Some(r) = atomic::truncate_path(path, len) {
        return r;
    }
    let r = check(kernel())?;
    if let Ok(owned) = sys::open(path, libc::O_RDONLY | libc::O_CLOEXEC, 0) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&owned);
        if crate::classify::classify(fd).is_some() {
            let _ = crate::fdtable::on_open(fd, 0);
            if let Some(f) = crate::fdtable::lookup_fd(fd) {
                let _io = f.shadow.io_lock();
                let _ = f.follow_backing_size();
            }
            crate::fdtable::on_close(fd);
        }
    }
    Ok(r)
}

/// After the kernel changed the backing's content in `[from, to)`: the
/// shadow takes the backing's bytes there.
fn refresh_from_backing(f: &FileState, data_fd: i32, from: u64, to: u64) -> Result<(), Errno> {
    let mut buf = vec![0u8; 1 << 16];
    let lazy = f.shadow.is_lazy();
    let mut off = from;
    while off < to {
        let want = ((to - off) as usize).min(buf.len());
        let n = sys::pread_full(f.backing()?.raw(), &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        if lazy {
            store_in_lazy_shadow(f, data_fd, &buf[..n], off)?;
        } else {
            sys::pwrite_all(data_fd, &buf[..n], off)?;
            f.shadow.rebase(f.backing()?.raw(), off, off + n as u64)?;
        }
        off += n as u64;
    }
    Ok(())
}

pub fn fallocate_impl(
    f: Arc<FileState>,
    fd: c_int,
    mode: c_int,
    off: off64_t,
    len: off64_t,
    kernel: impl FnOnce() -> c_int,
) -> Result<i32, Errno> {
    if f.shadow.is_atomic() {
        if let Some(r) = atomic::fallocate(&f, fd, mode, off, len) {
            return r;
        }
    }
    let shifts = mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0;
    if shifts {
        // Data moves: write back this process's stores first so they move too.
        f.sync(None, Durability::ByCaller)?;
    }
    let _io = f.shadow.io_lock();
    let r = check(kernel())?;
    let done = (|| {
        f.follow_backing_size()?;
        let Some(data) = f.shadow.data() else {
            return Ok(());
        };
        let data_fd = data.fd().as_raw_fd();
        let size = sys::file_size(data_fd)?;
        let (off, len) = (off.max(0) as u64, len.max(0) as u64);
        if shifts {
            refresh_from_backing(&f, data_fd, off, size)?;
        } else if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            refresh_from_backing(&f, data_fd, off, (off + len).min(size))?;
        }
        Ok::<(), Errno>(())
    })();
    if let Err(e) = done {
        error!("{}: cannot update the shadow after fallocate: {e}", f.path);
        return Err(e);
    }
    Ok(r)
}

/// Before the kernel reads `fd`: its shadow's dirty lines go to the backing.
fn before_kernel_reads(fd: c_int) -> Result<(), Errno> {
    match crate::fdtable::lookup_fd(fd) {
        Some(f) if f.shadow.data().is_some() => f.sync(None, Durability::ByCaller),
        _ => Ok(()),
    }
}

/// After the kernel wrote `n` bytes into `fd` at `off` (None: at the
/// descriptor's position, which the call advanced).
fn after_kernel_wrote(fd: c_int, off: Option<u64>, n: isize) {
    if n <= 0 {
        return;
    }
    let Some(f) = crate::fdtable::lookup_fd(fd) else {
        return;
    };
    let _io = f.shadow.io_lock();
    let Some(data) = f.shadow.data() else {
        return;
    };
    let data_fd = data.fd().as_raw_fd();
    let at = off.map_or(At::Position, At::Offset);
    let r = f
        .follow_backing_size()
        .and_then(|()| match written_at(fd, at, n as usize) {
            Some(s) => refresh_from_backing(&f, data_fd, s, s + n as u64),
            None => Err(Errno(libc::EIO)),
        });
    if let Err(e) = r {
        error!("{}: cannot update the shadow after a kernel copy ({e}); the file is no longer shadowed", f.path);
        f.poison();
    }
}

/// The attached failure-atomic file behind `out`, if it is one (a kernel
/// copy into it is done by [`atomic::copy_into`]).
pub fn atomic_destination(out: c_int) -> Option<Arc<FileState>> {
    crate::fdtable::lookup_fd(out).filter(|f| f.shadow.is_atomic())
}

/// Runs a kernel copy from `inp` to `out` with the shadows kept coherent.
/// `out_start`: where the output starts (None: the file position).
pub fn kernel_copy(
    inp: c_int,
    out: c_int,
    out_start: Option<u64>,
    call: impl FnOnce() -> isize,
) -> Result<isize, Errno> {
    if crate::fdtable::fd_maybe_pmem(inp) {
        before_kernel_reads(inp)?;
    }
    let n = check(call())?;
    if crate::fdtable::fd_maybe_pmem(out) {
        after_kernel_wrote(out, out_start, n);
    }
    Ok(n)
}

/// posix_fallocate(3) on an attached file: returns an error number.
pub fn posix_fallocate_impl(f: &FileState, kernel: impl FnOnce() -> c_int) -> c_int {
    let _io = f.shadow.io_lock();
    let r = kernel();
    if r == 0 {
        f.follow_backing_size().map(|()| 0).unwrap_or_else(|e| e.0)
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::c_void;

    #[test]
    fn iovec_parts_cover_the_first_n_bytes() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 0];
        let mut c = [0u8; 8];
        let iov = [
            iovec {
                iov_base: a.as_mut_ptr() as *mut c_void,
                iov_len: 4,
            },
            iovec {
                iov_base: b.as_mut_ptr() as *mut c_void,
                iov_len: 0,
            },
            iovec {
                iov_base: c.as_mut_ptr() as *mut c_void,
                iov_len: 8,
            },
        ];
        let parts: Vec<(usize, usize)> = iov_parts(&iov, 10).map(|(p, _, l)| (p, l)).collect();
        assert_eq!(parts, vec![(0, 4), (4, 6)]);
        iov_put(&iov, 2, b"xyzw");
        assert_eq!(&a, b"\0\0xy");
        assert_eq!(&c[..3], b"zw\0");
        assert_eq!(iov_gather(&iov, 6), b"\0\0xyzw");
    }
}
