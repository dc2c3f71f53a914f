//! The line bases of a shadow ([`crate::persist::base`]): `<key>.lines`
//! beside the data file, one `u32` per 64-byte line (6.25 % of the data:
//! 64 MiB per GiB), shared by every attached process, created with the
//! data file, removed with it. 0 is "unknown".

use super::owned::{cstr, open_owned, Create};
use super::Shadow;
use crate::lock::LockGuard;
use crate::persist::base::Bases;
use crate::persist::LINE;
use crate::sys::{self, Failure, OwnedMap, SysResult};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU32;

/// This process's mapping of a shadow's bases (and its descriptor while
/// the file is grown or mapped).
#[derive(Default)]
pub struct LinesMap {
    fd: Option<OwnedFd>,
    map: OwnedMap,
    /// The file is at least this long (it never shrinks): no `fstat` on
    /// the hot paths while it covers what is asked.
    known_len: u64,
}

/// The bases of a shadow, mapped while this is held.
pub struct BasesGuard<'a> {
    _map: LockGuard<'a, LinesMap>,
    pub bases: Bases,
}

fn bytes_for(size: u64) -> u64 {
    size.div_ceil(LINE as u64) * 4
}

/// Makes the file at least `need` bytes long.
fn grow_to(fd: i32, need: u64, known_len: &mut u64) -> SysResult<()> {
    if *known_len >= need {
        return Ok(());
    }
    let have = sys::file_size(fd)?;
    if have < need {
        sys::ftruncate(fd, need)?;
    }
    *known_len = have.max(need);
    Ok(())
}

fn lines_fd(path: &str, m: &mut LinesMap) -> Result<i32, Failure> {
    if m.fd.is_none() {
        m.fd = Some(open_owned(path, Create::Yes)?);
    }
    Ok(m.fd.as_ref().expect("opened").as_raw_fd())
}

/// Maps the bases file at `path` into `m` for `size` bytes of data (growing
/// the file if it is shorter). The result is valid while `m` is neither
/// dropped nor mapped again. The descriptor is opened only to grow or map
/// the file and closed again: the mapping is what is used.
pub(super) fn map_bases(path: &str, size: u64, m: &mut LinesMap) -> Option<Bases> {
    let need = bytes_for(size);
    let len = sys::page_up(need.max(1) as usize);
    if m.known_len < need || m.map.len() < len {
        let fd = lines_fd(path, m).ok()?;
        grow_to(fd, need, &mut m.known_len).ok()?;
        if m.map.len() < len {
            m.map = OwnedMap::default();
            m.map = OwnedMap::shared(
                fd,
                len.next_power_of_two(),
                libc::PROT_READ | libc::PROT_WRITE,
            )
            .ok()?;
        }
        m.fd = None;
    }
    let ptr = m.map.addr() as *const AtomicU32;
    // SAFETY: the mapping holds at least `need / 4` atomics and stays mapped
    // while `m` is neither dropped nor remapped (the callers' contract).
    Some(unsafe { Bases::new(ptr, (need / 4) as usize) })
}

impl Shadow {
    pub(super) fn lines_path(&self) -> String {
        format!("{}.lines", self.base)
    }

    /// Unmaps the bases unless they are in use (they are mapped again on the
    /// next use): the process keeps a bounded number of mappings.
    pub fn unmap_bases(&self) {
        if let Some(mut m) = self.lines.try_lock() {
            m.map = OwnedMap::default();
        }
    }

    /// Makes the bases file cover `size` bytes of data (new lines are
    /// unknown). It never shrinks: another process may be reading bases
    /// beyond a new, smaller size through its mapping (stale bases there
    /// are renewed when the data grows again).
    pub(super) fn size_lines(&self, size: u64) -> SysResult<()> {
        let mut m = self.lines.lock();
        if m.known_len >= bytes_for(size) {
            return Ok(());
        }
        let fd = self.lines_fd(&mut m).map_err(|f| f.errno)?;
        let r = grow_to(fd, bytes_for(size), &mut m.known_len);
        m.fd = None;
        r
    }

    fn lines_fd(&self, m: &mut LinesMap) -> Result<i32, Failure> {
        self.note_files_made();
        lines_fd(&self.lines_path(), m)
    }

    /// The bases of the first `size` bytes of data, or `None` where they
    /// cannot be had (every differing line is then written back, as before
    /// bases existed).
    pub fn bases(&self, size: u64) -> Option<BasesGuard<'_>> {
        self.note_files_made();
        let mut m = self.lines.lock();
        let bases = map_bases(&self.lines_path(), size, &mut m)?;
        Some(BasesGuard { _map: m, bases })
    }

    /// The data of the ranges (ascending) was evicted whole: their bases
    /// are punched out of the file (back to "unknown", as for holes never
    /// filled), where they fill whole pages of it. Fills in a fault handler
    /// are kept out of the region meanwhile (`track::marks`); others take
    /// the fill lock the caller holds.
    pub fn forget_bases(&self, ranges: &[(u64, u64)]) {
        let pages: Vec<(usize, usize)> = ranges
            .iter()
            .map(|&(c0, c1)| {
                let a = sys::page_up(bytes_for(c0) as usize);
                let b = sys::page_down(bytes_for(c1) as usize);
                (a, b)
            })
            .filter(|(a, b)| a < b)
            .collect();
        if pages.is_empty() {
            return;
        }
        let mut m = self.lines.lock();
        if let Ok(fd) = self.lines_fd(&mut m) {
            for (a, b) in pages {
                let _ = sys::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    a as u64,
                    (b - a) as u64,
                );
            }
        }
        m.fd = None;
    }

    /// Bytes of memory the bases file holds.
    pub(super) fn lines_resident_bytes(&self) -> u64 {
        sys::lstat(&cstr(&self.lines_path())).map_or(0, |st| st.st_blocks as u64 * 512)
    }

    /// A mapping of the bases of the first `size` bytes of data of its own
    /// (not the one [`Shadow::bases`] shares and unmaps when the process
    /// holds too many), and the number of bases it holds: for the lazy
    /// fault handler, which cannot take the lock.
    pub fn own_bases_map(&self, size: u64) -> Option<(OwnedMap, usize)> {
        let need = bytes_for(size);
        {
            let mut m = self.lines.lock();
            let fd = self.lines_fd(&mut m).ok()?;
            let r = grow_to(fd, need, &mut m.known_len);
            if r.is_err() {
                m.fd = None;
                return None;
            }
            let map = OwnedMap::shared(
                fd,
                sys::page_up(need.max(1) as usize),
                libc::PROT_READ | libc::PROT_WRITE,
            );
            m.fd = None;
            map.ok().map(|map| (map, (need / 4) as usize))
        }
    }

    /// Records the bases of `[a, b)` from what the backing holds there.
    pub fn rebase(&self, backing_fd: i32, a: u64, b: u64) -> SysResult<()> {
        // Whole lines; reading stops at the backing's end by itself (no
        // fstat on the write hooks' path), and a partial last line is
        // hashed as it is.
        let a = a - a % LINE as u64;
        let b = b.div_ceil(LINE as u64).saturating_mul(LINE as u64);
        if a >= b {
            return Ok(());
        }
        let Some(g) = self.bases(b) else {
            return Ok(());
        };
        let mut buf = vec![0u8; (b - a).min(1 << 16) as usize];
        let mut off = a;
        while off < b {
            let want = ((b - off) as usize).min(buf.len());
            let n = sys::pread_full(backing_fd, &mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            g.bases.record(off, &buf[..n]);
            off += n as u64;
        }
        Ok(())
    }

    /// [`Shadow::rebase`] of `bytes` just written to the backing at `off`:
    /// hashed from memory when they are whole lines (a span of the
    /// writeback), read back otherwise.
    pub fn rebase_written(&self, backing_fd: i32, off: u64, bytes: &[u8]) -> SysResult<()> {
        let end = off + bytes.len() as u64;
        if !off.is_multiple_of(LINE as u64) || !bytes.len().is_multiple_of(LINE) {
            return self.rebase(backing_fd, off, end);
        }
        if let Some(g) = self.bases(end) {
            g.bases.record(off, bytes);
        }
        Ok(())
    }

    /// Removes the bases file (with the data file).
    pub(super) fn unlink_lines(base: &str) {
        let _ = sys::unlink(&cstr(&format!("{base}.lines")));
    }
}
