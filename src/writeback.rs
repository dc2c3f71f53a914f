//! The sync engine: harvest what this process dirtied (or compare the whole
//! file when other processes may hold unsynced stores), write the changed
//! cachelines back to the backing and make them durable.

use crate::file::{FileInner, FileState};
use crate::persist::{self};
use crate::ranges::RangeSet;
use crate::registry::{harvest_file, REG};
use crate::runtime::rt;
use crate::shadow::{self};
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, SysResult, PAGE};
use crate::track;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn unmap_view(v: &mut (usize, usize)) {
    if v.1 > 0 {
        // SAFETY: a view mapping owned by this FileInner.
        let _ = unsafe { sys::munmap(v.0 as *mut _, v.1) };
    }
    *v = (0, 0);
}

pub fn unmap_views(inner: &mut FileInner) {
    unmap_view(&mut inner.shadow_view);
    unmap_view(&mut inner.backing_view);
}

/// Maps `len` bytes of `fd` (again, if the view is too small). `sync`:
/// the real-DAX backing, mapped `MAP_SYNC` so that the block allocations its
/// write faults make are durable at once and cache flushes suffice for data.
pub fn ensure_view(
    v: &mut (usize, usize),
    fd: i32,
    len: usize,
    prot: i32,
    sync: bool,
) -> SysResult<usize> {
    let len = sys::page_up(len.max(1));
    if v.1 < len {
        unmap_view(v);
        // Room to grow (address space only; nothing beyond the file's end
        // is touched): a file that grows in small steps, as SQLite's does,
        // is not remapped (and its pages refaulted) at every step.
        let len = len.next_power_of_two();
        let map = |flags| {
            // SAFETY: a fresh mapping the kernel places.
            unsafe { sys::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) }
        };
        let p = if sync {
            map(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC).or_else(|_| map(libc::MAP_SHARED))?
        } else {
            map(libc::MAP_SHARED)?
        };
        *v = (p as usize, len);
    }
    Ok(v.0)
}

impl FileState {
    /// Writes back the dirty lines of `range` (file offsets; `None` = whole
    /// file). With `msync_touched`, makes the touched backing pages durable
    /// with msync (emulated pmem); without it the caller follows with fsync.
    pub fn sync(self: &Arc<Self>, range: Option<(u64, u64)>, msync_touched: bool) -> SysResult<()> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Errno(libc::EIO));
        }
        let t0 = std::time::Instant::now();
        let _s = self.sync_lock.lock();
        let (lo, hi) = range.unwrap_or((0, u64::MAX));
        let full = !track::tracker().is_exact()
            || self.untracked.load(Ordering::Relaxed)
            || self.shadow.other_writers();
        let mut dirty = RangeSet::new();
        if !full {
            harvest_file(self, lo, hi, &mut dirty);
        }
        let mut r = self.write_back_dirty(dirty, lo, hi, full, msync_touched);
        // Data pages are durable now (flushed, or msynced on emulated pmem);
        // a size change is metadata, which only the kernel can persist.
        if r.is_ok() && msync_touched && self.size_dirty.swap(false, Ordering::Relaxed) {
            if let Err(e) = sys::fdatasync(self.backing_fd) {
                self.size_dirty.store(true, Ordering::Relaxed);
                r = Err(e);
            }
        }
        crate::stats::record_sync(t0.elapsed().as_nanos() as u64);
        if r.is_ok() && full && range.is_none() {
            self.shadow.clear_dead_writers();
        }
        r
    }

    pub fn write_back_dirty(
        &self,
        mut dirty: RangeSet,
        lo: u64,
        hi: u64,
        full: bool,
        msync_touched: bool,
    ) -> SysResult<()> {
        let Some((data_fd, _)) = self.shadow.data() else {
            return Ok(()); // no copy, nothing to write back
        };
        let mut inner = self.inner.lock();
        let in_range = inner.pending.clip(lo, hi);
        inner.pending.remove(lo, hi);
        dirty.extend(&in_range);
        if full {
            // Every page that holds data; a hole in the shadow is a hole
            // (zeros) in the backing too, since all changes to the backing
            // go through the shim. Ranges punched on purpose are pending.
            let mut all = shadow::data_segments(data_fd, lo - lo % PAGE as u64, hi);
            all.extend(&dirty);
            dirty = all;
        }
        if dirty.is_empty() {
            return Ok(());
        }
        if !self.backing_writable {
            // This process could never have stored to the file.
            debug!(
                "{}: read-only backing; nothing of ours to write back",
                self.path
            );
            return Ok(());
        }
        let io = self.shadow.io_lock();
        // A lazy data file: no page may be filled or evicted while the
        // writeback reads it through its own (unwatched) view, and only
        // pages it holds are read (a hole would read as a page of zeros).
        let fill = self.shadow.is_lazy().then(|| self.shadow.fill_lock());
        if fill.is_some() {
            dirty = crate::lazy::present_in(self, data_fd, &dirty);
        }
        let r = (|| -> SysResult<()> {
            if persist::inject_failure() {
                return Err(Errno(libc::EIO));
            }
            let shadow_size = sys::fstat(data_fd)?.st_size as u64;
            let backing_size = sys::fstat(self.backing_fd)?.st_size as u64;
            let size = shadow_size.min(backing_size);
            if size == 0 {
                return Ok(());
            }
            let bfd = self.backing_fd;
            let sv = ensure_view(
                &mut inner.shadow_view,
                data_fd,
                size as usize,
                libc::PROT_READ,
                false,
            )?;
            let bv = ensure_view(
                &mut inner.backing_view,
                bfd,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                !self.emulated,
            )?;
            if !full {
                add(
                    &STATS.pages_dirtied,
                    dirty.clip(0, size).len().div_ceil(PAGE as u64),
                );
            }
            let counts = persist::write_back(
                sv,
                bv,
                size,
                &dirty,
                &persist::Writeback {
                    flush: rt().flush,
                    msync_touched: msync_touched && self.emulated,
                    via_fd: self.writeback_fd(),
                },
            )?;
            if full {
                // Without a tracker, the pages found changed are the dirty ones.
                add(&STATS.pages_dirtied, counts.pages_written);
            }
            self.shadow.record_backing(bfd);
            Ok(())
        })();
        drop(fill);
        drop(io);
        if let Err(e) = r {
            // Keep the dirty state: a retry must still write the data.
            if !full {
                inner.pending.extend(&dirty);
            }
            error!("{}: writeback failed: {e}", self.path);
            return Err(Errno(libc::EIO));
        }
        Ok(())
    }
}

/// Syncs every attached file (sync(2), syncfs(2) and exit).
pub fn sync_all(dev: Option<u64>) -> SysResult<()> {
    let files: Vec<Arc<FileState>> = REG.lock().files.clone();
    let mut result = Ok(());
    for f in files {
        if dev.is_some_and(|d| d != f.id.dev) {
            continue;
        }
        if let Err(e) = f.sync(None, true) {
            result = Err(e);
        }
    }
    result
}
