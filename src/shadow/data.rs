//! The data file of a shadow: created by the first process that maps the
//! file (whole, or as holes that mean "the backing's bytes" when filled
//! lazily), filled from the backing, and asked which pages it holds.

use super::owned::{cstr, err, open_owned, open_owned_read_only, Create};
use super::{BackingState, Shadow};
use crate::fdcache::{FdCache, SharedFd};
use crate::persist::LINE;
use crate::ranges::RangeSet;
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, Failure, OwnedMap, SysResult, PAGE};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

/// This process's read-write descriptors of data files: at most 16 open
/// (a [`SharedFd`] keeps one open while used; the program's descriptor
/// limit is the program's).
static DATA_FDS: FdCache = FdCache::new(16);

/// Forgets a detached shadow's descriptor (closed with its last holder).
pub(super) fn forget_data_fd(key: u64) {
    DATA_FDS.forget(key);
}

/// Fork: the cache's lock is a leaf lock (see `lifecycle`).
pub fn hold_data_fds_for_fork() {
    DATA_FDS.hold_for_fork();
}

/// # Safety
/// After [`hold_data_fds_for_fork`], in the parent or the child.
pub unsafe fn release_data_fds_after_fork() {
    // SAFETY: per contract.
    unsafe { DATA_FDS.release_after_fork() };
}

/// Whether a new data file may start as holes (the caller's mappings handle
/// missing pages).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Copy everything before returning (holes of a lazy file included).
    Eager,
    /// Holes are filled on first access.
    Lazy,
}

/// Files smaller than this are copied whole at their first mapping even
/// where lazy filling is possible (measured on SQLite, which maps an empty
/// database and grows it: 122 fills of ~60 µs each per 20,000-row run,
/// against nothing for the zeros an eager shadow grows by).
const LAZY_MIN_SIZE: u64 = 1 << 20;

/// Copies `[start, end)` of the backing file into the data file (up to
/// the backing's end); returns the bytes copied. Uses the data descriptor's
/// file position: callers hold the fill or io lock.
pub fn copy_from_backing(data_fd: i32, backing_fd: i32, start: u64, end: u64) -> SysResult<u64> {
    let mut pos = start as i64;
    while (pos as u64) < end {
        // sendfile writes at the output's file position.
        sys::lseek(data_fd, pos, libc::SEEK_SET)?;
        let mut o = pos;
        let n = sys::sendfile(data_fd, backing_fd, &mut o, (end - pos as u64) as usize)?;
        if n == 0 {
            break;
        }
        pos += n as i64;
    }
    Ok(pos as u64 - start)
}

/// Copies the backing file into a fresh data file, skipping holes.
fn fill_from_backing(data_fd: i32, backing_fd: i32, size: u64) -> SysResult<()> {
    sys::ftruncate(data_fd, size)?;
    let mut off: i64 = 0;
    while (off as u64) < size {
        let start = match sys::lseek(backing_fd, off, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(Errno(libc::ENXIO)) => break,
            Err(_) => off, // no SEEK_DATA support: copy everything
        };
        let end = sys::lseek(backing_fd, start, libc::SEEK_HOLE)
            .unwrap_or(size as i64)
            .min(size as i64);
        copy_from_backing(data_fd, backing_fd, start as u64, end as u64)?;
        off = end;
    }
    Ok(())
}

/// The page-aligned data segments of `fd` within `[lo, hi)` (SEEK_DATA /
/// SEEK_HOLE; the whole range where the file system cannot tell).
pub fn data_segments(fd: i32, lo: u64, hi: u64) -> RangeSet {
    let mut out = RangeSet::new();
    let size = sys::file_size(fd).unwrap_or(hi);
    let hi = hi.min(size);
    let mut off = lo;
    while off < hi {
        let start = match sys::lseek(fd, off as i64, libc::SEEK_DATA) {
            Ok(s) => s as u64,
            Err(Errno(libc::ENXIO)) => break,
            Err(_) => {
                out.insert(off, hi);
                break;
            }
        };
        if start >= hi {
            break;
        }
        let end = sys::lseek(fd, start as i64, libc::SEEK_HOLE)
            .map(|e| e as u64)
            .unwrap_or(hi)
            .min(hi);
        out.insert(
            start - start % PAGE as u64,
            end.div_ceil(PAGE as u64) * PAGE as u64,
        );
        off = end.max(start + 1);
    }
    out
}

/// Fills every hole of a lazy data file from the backing (for a process
/// that maps it without handling missing pages), with the lines' bases.
/// Holds the fill lock.
fn fill_holes(shadow: &Shadow, data_fd: i32, backing_fd: i32) -> SysResult<()> {
    let size = sys::file_size(data_fd)?;
    let mut off = 0u64;
    while off < size {
        let hole = sys::lseek(data_fd, off as i64, libc::SEEK_HOLE)? as u64;
        if hole >= size {
            break;
        }
        let data = match sys::lseek(data_fd, hole as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(Errno(libc::ENXIO)) => size,
            Err(e) => return Err(e),
        };
        copy_from_backing(data_fd, backing_fd, hole, data)?;
        shadow.rebase(backing_fd, hole, data)?;
        off = data;
    }
    Ok(())
}

/// Is swap configured? (A swapped-out shmem page is held by the file but
/// not resident, so `mincore` alone would call it a hole.) Read once.
fn swap_possible() -> bool {
    static SWAP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SWAP.get_or_init(|| {
        std::fs::read_to_string("/proc/swaps")
            .map(|s| s.lines().count() > 1)
            .unwrap_or(true)
    })
}

impl Shadow {
    /// This process's descriptor of the data file, if the data exists.
    pub fn data(&self) -> Option<SharedFd> {
        if let Some(d) = DATA_FDS.get(self.key) {
            return Some(d);
        }
        if self.header().data_valid.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.open_data().ok()
    }

    /// Bytes of memory the data file and its bases hold (every process's
    /// fills).
    pub fn resident_bytes(&self) -> u64 {
        let data = self
            .data()
            .and_then(|d| sys::statx_fd(d.fd().as_raw_fd(), libc::STATX_BLOCKS).ok())
            .map_or(0, |x| x.stx_blocks * 512);
        data + self.lines_resident_bytes()
    }

    fn open_data(&self) -> Result<SharedFd, Failure> {
        DATA_FDS.get_or_open(self.key, || open_owned(&self.base, Create::No))
    }

    /// A read-only descriptor of the data file, for a mapping of a read-only
    /// descriptor (whose protection must not exceed it); close it once
    /// mapped.
    pub fn data_read_only(&self) -> Result<OwnedFd, Failure> {
        open_owned_read_only(&self.base)
    }

    /// The data file, created from the backing if no process mapped the file
    /// yet. Creation holds the io lock, so no write(2) of any process runs
    /// between the copy and the moment the data becomes valid.
    ///
    /// [`Fill::Lazy`]: the caller handles missing pages of its mappings
    /// (userfaultfd), so a new data file starts as holes — unless the file
    /// is small, where copying it costs less than a few round trips to the
    /// fault thread. [`Fill::Eager`]: the copy is complete before it
    /// returns, holes of a lazy data file included.
    pub fn ensure_data(&self, backing_fd: i32, fill: Fill) -> Result<SharedFd, Failure> {
        if let Some(d) = self.data() {
            if fill == Fill::Lazy || self.no_evict() || !self.is_lazy() {
                return Ok(d);
            }
        }
        let _io = self.io_lock();
        self.ensure_data_locked(backing_fd, fill)
    }

    /// [`Shadow::ensure_data`] for a caller that holds the io lock.
    pub fn ensure_data_locked(&self, backing_fd: i32, fill: Fill) -> Result<SharedFd, Failure> {
        let h = self.header();
        if h.data_valid.load(Ordering::Acquire) != 0 {
            let d = self.open_data()?;
            if fill == Fill::Eager && self.is_lazy() && !self.no_evict() {
                let _fill = self.fill_lock();
                fill_holes(self, d.fd().as_raw_fd(), backing_fd)
                    .map_err(|e| err("cannot fill shadow", &self.base, e))?;
                h.no_evict.store(1, Ordering::Release);
            }
            return Ok(d);
        }
        self.note_files_made();
        let _ = sys::unlink(&cstr(&self.base));
        let fd = open_owned(&self.base, Create::Yes)?;
        let size = BackingState::of(backing_fd).map(|b| b.size);
        let create_lazy = fill == Fill::Lazy && size.is_ok_and(|s| s >= LAZY_MIN_SIZE);
        // The lines' bases: unknown for holes (filled later), the copied
        // bytes' otherwise.
        *self.lines.lock() = super::lines::LinesMap::default();
        Shadow::unlink_lines(&self.base);
        let filled = size.and_then(|size| {
            self.size_lines(size)?;
            if create_lazy {
                sys::ftruncate(fd.as_raw_fd(), size)
            } else {
                fill_from_backing(fd.as_raw_fd(), backing_fd, size)?;
                self.rebase(backing_fd, 0, size)
            }
        });
        if let Err(e) = filled {
            let _ = sys::unlink(&cstr(&self.base));
            return Err(err("cannot fill shadow", &self.base, e));
        }
        self.record_backing(backing_fd);
        drop(fd);
        h.lazy.store(create_lazy as u32, Ordering::Release);
        h.no_evict.store(!create_lazy as u32, Ordering::Release);
        h.data_valid.store(1, Ordering::Release);
        add(&STATS.shadows_created, 1);
        self.open_data()
    }

    /// The data file's size (None: no data file yet, or it cannot be read).
    pub fn data_size(&self) -> Option<u64> {
        let d = self.data()?;
        sys::file_size(d.fd().as_raw_fd()).ok()
    }

    /// Makes the data file `size` bytes long (if it exists). Call with the
    /// fill lock held: growing a lazy data file adds holes, which mean the
    /// backing's bytes.
    pub fn set_data_size(&self, size: u64) -> SysResult<()> {
        if let Some(d) = self.data() {
            let fd = d.fd().as_raw_fd();
            let old = sys::file_size(fd)?;
            if old != size {
                sys::ftruncate(fd, size)?;
                self.size_lines(size)?;
                if size > old {
                    // Grown with zeros (a partial last line hashes as if
                    // zero-padded, so its base stays right).
                    if let Some(g) = self.bases(size) {
                        let from = old.div_ceil(LINE as u64) * LINE as u64;
                        g.bases.record_zeros(from, size);
                    }
                }
            }
        }
        Ok(())
    }

    /// Fills the holes of the data file within `[c0, c1)` from the backing.
    /// Returns the bytes filled. `zeros` is scratch space.
    pub fn fill_range(
        &self,
        backing_fd: i32,
        c0: u64,
        c1: u64,
        zeros: &mut [u8],
    ) -> SysResult<u64> {
        let Some(data) = self.data() else {
            return Err(Errno(libc::EIO));
        };
        let data_fd = data.fd().as_raw_fd();
        let _fill = self.fill_lock();
        let size = sys::file_size(data_fd)?;
        let end = c1.min(size);
        if c0 >= end {
            return Ok(0);
        }
        let mut holes = RangeSet::new();
        holes.insert(c0, end);
        for (a, b) in self.present(c0, end).iter() {
            holes.remove(a, b);
        }
        let mut filled = 0;
        for (hole, data) in holes.iter() {
            // In the kernel, one copy: backing page cache to shmem.
            let got = copy_from_backing(data_fd, backing_fd, hole, data)?;
            self.rebase(backing_fd, hole, hole + got)?;
            // Past the backing's end (it shrank behind the shim's back):
            // zeros, so that the hole does not fault forever.
            let mut z = hole + got;
            zeros.fill(0);
            while z < data {
                let k = ((data - z) as usize).min(zeros.len());
                sys::pwrite_all(data_fd, &zeros[..k], z)?;
                z += k as u64;
            }
            filled += data - hole;
        }
        add(&STATS.lazy_filled_bytes, filled);
        Ok(filled)
    }

    /// Punches the pages of `[c0, c1)` whose bytes equal the backing's out
    /// of the data file. Returns which `chunk`-sized pieces of the range
    /// (bit `i`: the one at `c0 + i * chunk`; at most 64) still hold pages.
    /// Call with the fill lock held and no mapping of this process holding
    /// the range's pages.
    pub fn punch_clean(&self, backing_fd: i32, c0: u64, c1: u64, chunk: u64) -> SysResult<u64> {
        let Some(data) = self.data() else {
            return Ok(0);
        };
        let data_fd = data.fd().as_raw_fd();
        let size = sys::file_size(data_fd)?;
        let end = c1.min(size);
        let present = self.present(c0, end);
        // Runs read at once, and clean pages punched in runs that reach
        // over holes (punched again, harmlessly) up to the next page that
        // stays: a punch unmaps its range from every process's page
        // tables, a cost per call (TLB shootdowns).
        const BLOCK: usize = 256 << 10;
        let mut shadow = vec![0u8; BLOCK];
        let mut backing = vec![0u8; BLOCK];
        let mut left = 0u64;
        let mut evicted = 0u64;
        let mut run: Option<(u64, u64)> = None;
        let punch = |(a, b): (u64, u64)| {
            sys::fallocate(
                data_fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                a,
                b - a,
            )
        };
        for (a, b) in present.iter() {
            let mut p = a;
            while p < b.min(end) {
                let n = BLOCK.min((b.min(end) - p) as usize);
                let s = sys::pread_full(data_fd, &mut shadow[..n], p)?;
                let k = sys::pread_full(backing_fd, &mut backing[..n], p)?;
                backing[k..n].fill(0);
                for q in (0..n).step_by(PAGE) {
                    let m = PAGE.min(n - q);
                    let at = p + q as u64;
                    if q + m <= s && shadow[q..q + m] == backing[q..q + m] {
                        let x = run.map_or(at, |(x, _)| x);
                        run = Some((x, at + PAGE as u64));
                        evicted += PAGE as u64;
                    } else {
                        left |= 1u64 << ((at - c0) / chunk).min(63);
                        if let Some(r) = run.take() {
                            punch(r)?;
                        }
                    }
                }
                p += n as u64;
            }
        }
        if let Some(r) = run {
            punch(r)?;
        }
        add(&STATS.evicted_bytes, evicted);
        Ok(left)
    }

    /// Fork: holds the residency probe's, the bases' and the region marks'
    /// locks (see `lifecycle`).
    pub fn hold_for_fork(&self) {
        std::mem::forget(self.probe.lock());
        std::mem::forget(self.lines.lock());
        std::mem::forget(self.marks.lock());
    }

    /// # Safety
    /// After [`Shadow::hold_for_fork`], in the parent or the child.
    pub unsafe fn release_after_fork(&self) {
        // SAFETY: hold_for_fork took them and forgot the guards.
        unsafe {
            self.marks.force_unlock();
            self.lines.force_unlock();
            self.probe.force_unlock();
        }
    }

    /// The pages of `[a, b)` that the data file holds, as page-aligned
    /// ranges. Call under the fill lock. `mincore` on a `PROT_NONE` view
    /// answers for pages in memory in one call; a page it calls absent may
    /// be swapped out, which `SEEK_DATA` tells (one call per absent run).
    /// SEEK_HOLE alone would walk every page up to the next hole: the whole
    /// file when it is full.
    pub fn present(&self, a: u64, b: u64) -> RangeSet {
        let mut set = RangeSet::new();
        set.insert(a, b);
        self.present_in(&set)
    }

    /// [`Shadow::present`] for every range of `ranges` (one `fstat`).
    pub fn present_in(&self, ranges: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        let Some(data) = self.data() else {
            return out;
        };
        let data_fd = data.fd().as_raw_fd();
        let Ok(size) = sys::file_size(data_fd) else {
            for (a, b) in ranges.iter() {
                out.extend(&data_segments(data_fd, a, b));
            }
            return out;
        };
        for (a, b) in ranges.iter() {
            self.present_range(data_fd, size, a, b, &mut out);
        }
        out
    }

    fn present_range(&self, data_fd: i32, size: u64, a: u64, b: u64, out: &mut RangeSet) {
        let a = a - a % PAGE as u64;
        let b = (sys::page_up(b.min(size) as usize)) as u64;
        if a >= b {
            return;
        }
        let mut view = self.probe.lock();
        let need = sys::page_up(size as usize);
        if view.len() < need {
            // Room to grow; never read (PROT_NONE).
            *view = OwnedMap::default();
            match OwnedMap::shared(data_fd, need.next_power_of_two(), libc::PROT_NONE) {
                Ok(v) => *view = v,
                Err(_) => {
                    out.extend(&data_segments(data_fd, a, b));
                    return;
                }
            }
        }
        let mut vec = [0u8; 1024];
        let mut p = a;
        while p < b {
            let pages = (((b - p) / PAGE as u64) as usize).min(vec.len());
            if sys::mincore(view.addr() + p as usize, pages * PAGE, &mut vec).is_err() {
                out.extend(&data_segments(data_fd, p, b));
                return;
            }
            let mut i = 0;
            while i < pages {
                let at = p + (i * PAGE) as u64;
                if vec[i] & 1 != 0 {
                    out.insert(at, at + PAGE as u64);
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < pages && vec[j] & 1 == 0 {
                    j += 1;
                }
                let run_end = p + (j * PAGE) as u64;
                let mut q = at;
                // Without swap, mincore is exact; SEEK_DATA from a hole
                // walks to the next page the file holds, which in a large
                // sparse file is far (tens of microseconds).
                while swap_possible() && q < run_end {
                    match sys::lseek(data_fd, q as i64, libc::SEEK_DATA) {
                        Ok(d) if (d as u64) < run_end => {
                            let d = d as u64 - d as u64 % PAGE as u64;
                            out.insert(d, d + PAGE as u64);
                            q = d + PAGE as u64;
                        }
                        _ => break,
                    }
                }
                i = j;
            }
            p += (pages * PAGE) as u64;
        }
    }
}
