//! The sync engine: harvest what this process dirtied (or compare the whole
//! file when other processes may hold unsynced stores), write the changed
//! cachelines back to the backing and make them durable.

use crate::file::{CatchUp, FileInner, FileState};
use crate::lock::Lock;
use crate::persist::redo;
use crate::persist::{self};
use crate::ranges::RangeSet;
use crate::registry::{harvest_file, REG};
use crate::runtime::rt;
use crate::shadow::BackingState;
use crate::shadow::{self};
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, OwnedMap, SysResult, PAGE};
use crate::track;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// How a sync makes what it wrote durable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Completely: `msync(MS_SYNC)` of the touched backing pages (emulated
    /// pmem) and an `fdatasync` for a size change.
    Complete,
    /// The caller follows with the kernel's own `fsync`/`fdatasync` (or
    /// asked for `MS_ASYNC`).
    ByCaller,
}

/// Which pages a writeback compares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The pages this process's tracker harvested and its pending set.
    Dirty,
    /// Every page the shadow holds (no exact tracker, or other processes
    /// may hold unsynced stores).
    WholeFile,
}

/// Drops the writeback's views (at detach).
pub fn unmap_views(inner: &mut FileInner) {
    inner.shadow_view = OwnedMap::default();
    inner.backing_view = OwnedMap::default();
}

/// How a view of the backing is mapped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ViewKind {
    Plain,
    /// Real DAX: `MAP_SYNC`, so that the block allocations its write faults
    /// make are durable at once and cache flushes suffice for data.
    Sync,
}

/// Maps `len` bytes of `fd` into `v` (again, if the view is too small),
/// giving a view mapped anew `advice` (`madvise`); returns its address.
fn ensure_view(
    v: &mut OwnedMap,
    fd: i32,
    len: usize,
    prot: i32,
    kind: ViewKind,
    advice: Option<i32>,
) -> SysResult<usize> {
    let len = sys::page_up(len.max(1));
    if v.len() < len {
        *v = OwnedMap::default();
        // Room to grow (address space only; nothing beyond the file's end
        // is touched): a file that grows in small steps, as SQLite's does,
        // is not remapped (and its pages refaulted) at every step.
        let len = len.next_power_of_two();
        *v = match kind {
            ViewKind::Sync => {
                OwnedMap::new(fd, len, prot, libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC)
                    .or_else(|_| OwnedMap::shared(fd, len, prot))?
            }
            ViewKind::Plain => OwnedMap::shared(fd, len, prot)?,
        };
        if let Some(a) = advice {
            let _ = sys::madvise(v.addr(), v.len(), a);
        }
    }
    Ok(v.addr())
}

/// Files whose writeback views and line bases stay mapped after a sync,
/// most recently synced last: at most [`VIEWS_MAX`], so that the shim's own
/// mappings are one per attached file (its header) plus a constant.
const VIEWS_MAX: usize = 16;
static VIEWED: Lock<Vec<Weak<FileState>>> = Lock::new(Vec::new());

fn is(w: &Weak<FileState>, f: &Arc<FileState>) -> bool {
    std::ptr::eq(w.as_ptr(), Arc::as_ptr(f))
}

/// After a sync of `f` (or a mapping of it, or a write): its views and
/// bases stay; those of the least recently used files beyond [`VIEWS_MAX`]
/// go (if busy, they stay in the list). Call with no shim lock held but
/// `f`'s sync lock: a victim whose last reference this drops detaches here.
pub fn keep_views_bounded(f: &Arc<FileState>) {
    let victims: Vec<Arc<FileState>> = {
        let mut v = VIEWED.lock();
        if v.last().is_some_and(|w| is(w, f)) {
            return; // the most recent already (every write of one file)
        }
        v.retain(|w| w.strong_count() > 0 && !is(w, f));
        v.push(Arc::downgrade(f));
        let excess = v.len().saturating_sub(VIEWS_MAX);
        v.drain(..excess).filter_map(|w| w.upgrade()).collect()
    };
    let_go_of_views(victims);
}

/// Unmaps the views and bases of every other file this process keeps
/// them for. Call with no shim lock held but `f`'s sync lock.
fn release_other_views(f: &Arc<FileState>) {
    let others: Vec<Arc<FileState>> = std::mem::take(&mut *VIEWED.lock())
        .into_iter()
        .filter(|w| !is(w, f))
        .filter_map(|w| w.upgrade())
        .collect();
    let_go_of_views(others);
}

/// Unmaps the views and bases of `files`; one whose locks are busy keeps
/// them and goes back to the list as the least recently used.
fn let_go_of_views(files: Vec<Arc<FileState>>) {
    for f in files {
        match f.inner.try_lock() {
            Some(mut inner) => {
                unmap_views(&mut inner);
                drop(inner);
                f.shadow.unmap_bases();
            }
            None => VIEWED.lock().insert(0, Arc::downgrade(&f)),
        }
    }
}

/// Fork: the list's lock is a leaf lock (see `lifecycle`).
pub fn hold_views_for_fork() {
    std::mem::forget(VIEWED.lock());
}

/// # Safety
/// After [`hold_views_for_fork`], in the parent or the child.
pub unsafe fn release_views_after_fork() {
    // SAFETY: per contract.
    unsafe { VIEWED.force_unlock() };
}

impl FileState {
    /// Writes back the dirty lines of `range` (file offsets; `None` = whole
    /// file), made durable as `how` says.
    pub fn sync(self: &Arc<Self>, range: Option<Range<u64>>, how: Durability) -> SysResult<()> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Errno(libc::EIO));
        }
        let t0 = std::time::Instant::now();
        let _s = self.sync_lock.lock();
        // Failure-atomic: whatever range was named, the unit is everything
        // since the last sync, and it is durable when the sync returns.
        let atomic = self.shadow.is_atomic();
        let (range, how) = if atomic {
            (None, Durability::Complete)
        } else {
            (range, how)
        };
        let whole = range.is_none();
        let range = range.unwrap_or(0..u64::MAX);
        let scope = if !track::tracker().is_exact()
            || self.untracked.load(Ordering::Relaxed)
            || self.shadow.other_writers()
        {
            Scope::WholeFile
        } else {
            Scope::Dirty
        };
        // What was changed outside the shim reaches the shadow first (and is
        // then never written back over).
        self.catch_up();
        let mut dirty = RangeSet::new();
        if scope == Scope::Dirty {
            harvest_file(self, range.start, range.end, &mut dirty);
        }
        let mut r = self.write_back_dirty(dirty, range.clone(), scope, how);
        if r == Err(Errno(libc::ENOMEM)) {
            // No mapping left for the views (the program is at
            // vm.max_map_count): other files' views and bases go, and the
            // writeback (its dirty set kept as pending) is tried again.
            release_other_views(self);
            r = self.write_back_dirty(RangeSet::new(), range, scope, how);
        }
        let mut r = r.map_err(|e| {
            error!("{}: writeback failed: {e}", self.path);
            // A log that found no room says so, as the kernel would.
            match e.0 {
                libc::ENOSPC | libc::EDQUOT if atomic => e,
                _ => Errno(libc::EIO),
            }
        });
        // Data pages are durable now (flushed, or msynced on emulated pmem);
        // a size change is metadata, which only the kernel can persist.
        if r.is_ok()
            && how == Durability::Complete
            && self.size_dirty.swap(false, Ordering::Relaxed)
        {
            if let Err(e) = self.backing().and_then(|b| sys::fdatasync(b.raw())) {
                self.size_dirty.store(true, Ordering::Relaxed);
                r = Err(e);
            }
        }
        crate::stats::record_sync(t0.elapsed().as_nanos() as u64);
        if r.is_ok() && scope == Scope::WholeFile && whole {
            self.shadow.clear_dead_writers();
        }
        keep_views_bounded(self);
        r
    }

    /// Writes back `dirty` (file offsets) and this process's pending ranges
    /// within `range`, or every page the shadow holds there.
    pub fn write_back_dirty(
        &self,
        mut dirty: RangeSet,
        range: Range<u64>,
        scope: Scope,
        how: Durability,
    ) -> SysResult<()> {
        let (lo, hi) = (range.start, range.end);
        let full = scope == Scope::WholeFile;
        if self.shadow.is_atomic() {
            return self.write_back_atomic(dirty, full);
        }
        let Some(data) = self.shadow.data() else {
            return Ok(()); // no copy, nothing to write back
        };
        let data_fd = data.fd().as_raw_fd();
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
        if !self.backing.writable {
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
            dirty = self.shadow.present_in(&dirty);
        }
        let r = (|| -> SysResult<()> {
            if persist::inject_failure() {
                return Err(Errno(libc::EIO));
            }
            let backing = self.backing()?;
            let bfd = backing.raw();
            let shadow_size = sys::file_size(data_fd)?;
            let backing_size = sys::file_size(bfd)?;
            let size = shadow_size.min(backing_size);
            if size == 0 {
                return Ok(());
            }
            let (sv, bv) = self.views(&mut inner, data_fd, bfd, size)?;
            let bases = self.shadow.bases(size);
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
                    msync_touched: how == Durability::Complete && self.emulated,
                    via_fd: self.writes_back_with_pwrite().then_some(bfd),
                    bases: bases.as_ref().map(|g| &g.bases),
                },
            )?;
            drop(bases);
            self.report_outside_changes(&counts);
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
            // ENOMEM (no mapping for a view) is for `sync` to retry.
            return Err(if e.0 == libc::ENOMEM {
                e
            } else {
                Errno(libc::EIO)
            });
        }
        Ok(())
    }
}

impl FileState {
    /// The writeback's views of the shadow and the backing, `len` bytes of
    /// each from offset 0 (kept in `inner`, mapped again when too small).
    /// Both writable: lines changed outside the shim are taken into the
    /// shadow, and real DAX is written back through the backing's.
    fn views(
        &self,
        inner: &mut FileInner,
        data_fd: i32,
        backing_fd: i32,
        len: u64,
    ) -> SysResult<(usize, usize)> {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let sv = ensure_view(
            &mut inner.shadow_view,
            data_fd,
            len as usize,
            rw,
            ViewKind::Plain,
            None,
        )?;
        // Emulated pmem: a page of the backing that is not in the page cache
        // (cut by a truncation, or cold) is read alone, not with a window
        // of its neighbours around it: a sync compares a few scattered
        // pages, and a program that shrinks and regrows its file at every
        // record (Kyoto Cabinet) would have the window of zeros beyond the
        // cut read in again at each. Long runs ask for theirs
        // ([`persist::read_ahead`]).
        let (kind, advice) = if self.emulated {
            (ViewKind::Plain, Some(libc::MADV_RANDOM))
        } else {
            (ViewKind::Sync, None)
        };
        let bv = ensure_view(
            &mut inner.backing_view,
            backing_fd,
            len as usize,
            rw,
            kind,
            advice,
        )?;
        Ok((sv, bv))
    }
}

/// Failure-atomic sync (docs/ARCHITECTURE.md, "Failure-atomic sync").
impl FileState {
    /// The atomic log's lanes, beside the file. Call with the io lock held.
    pub fn log_lanes(&self) -> SysResult<redo::Lanes> {
        self.shadow.log_lanes().ok_or(Errno(libc::EINVAL))
    }

    /// Writes back `dirty` and this process's pending ranges (or every page
    /// the shadow holds) as one unit: the changed spans and the size are
    /// committed to the log, durably, before a byte of the file changes;
    /// then applied; the file is durable when this returns. A failure before
    /// the commit leaves the file as of the last sync and the changes in
    /// the shadow (pending again) for the next try; after it, the log holds
    /// the unit and the next sync (or recovery) applies it.
    fn write_back_atomic(&self, mut dirty: RangeSet, full: bool) -> SysResult<()> {
        let mut inner = self.inner.lock();
        dirty.extend(&inner.pending);
        inner.pending = RangeSet::new();
        let io = self.shadow.io_lock();
        let data = self.shadow.data();
        let fill = data
            .as_ref()
            .filter(|_| self.shadow.is_lazy())
            .map(|_| self.shadow.fill_lock());
        if let Some(d) = &data {
            if full {
                let mut all = shadow::data_segments(d.fd().as_raw_fd(), 0, u64::MAX);
                all.extend(&dirty);
                dirty = all;
            }
            if fill.is_some() {
                dirty = self.shadow.present_in(&dirty);
            }
        }
        debug!(
            "{}: atomic sync of {} dirty byte(s) in {} range(s){}",
            self.path,
            dirty.len(),
            dirty.iter().count(),
            if data.is_none() { ", no data file" } else { "" }
        );
        let r = self.commit_and_apply(
            &mut inner,
            data.as_ref().map(|d| d.fd().as_raw_fd()),
            &dirty,
        );
        drop(fill);
        drop(io);
        if r.is_err() && !full {
            inner.pending.extend(&dirty);
        }
        r
    }

    fn commit_and_apply(
        &self,
        inner: &mut FileInner,
        data_fd: Option<i32>,
        dirty: &RangeSet,
    ) -> SysResult<()> {
        if persist::inject_failure() {
            return Err(Errno(libc::EIO));
        }
        let lanes = self.log_lanes()?;
        let backing = self.backing()?;
        let bfd = backing.raw();
        // A sync committed and not applied goes first.
        let mut p = self.shadow.settle_log(&lanes, bfd)?;
        let backing_size = sys::file_size(bfd)?;
        let mut unit = redo::Unit::new(p.gen + 1, backing_size, self.shadow.log_owner());
        let mut counts = persist::LineCounts::default();
        if let Some(data_fd) = data_fd.filter(|_| !dirty.is_empty()) {
            let size = sys::file_size(data_fd)?.min(backing_size);
            if size > 0 {
                let (sv, bv) = self.views(inner, data_fd, bfd, size)?;
                let bases = self.shadow.bases(size);
                add(
                    &STATS.pages_dirtied,
                    dirty.clip(0, size).len().div_ceil(PAGE as u64),
                );
                counts = persist::collect_changes(
                    sv,
                    bv,
                    size,
                    dirty,
                    &persist::Writeback {
                        flush: rt().flush,
                        msync_touched: false,
                        via_fd: None,
                        bases: bases.as_ref().map(|g| &g.bases),
                    },
                    &mut unit,
                )?;
                drop(bases);
                self.report_outside_changes(&counts);
            }
        }
        if unit.is_empty() && !p.size_changed(backing_size) {
            return Ok(());
        }
        unit.set_low(p.low);
        // The lane about to be written holds the record of the sync LANES
        // before: its apply must be durable first (recovery replays the
        // records from there on). One fdatasync of the file every LANES
        // syncs.
        if p.durable + (redo::LANES as u64) < unit.gen() {
            sys::fdatasync(bfd)?;
            p.durable = p.applied;
            self.shadow.set_log_period(&p);
        }
        // 1. The unit is durable in the log (a crash from here on replays it).
        let budget_in = persist::CRASH_BUDGET.load(Ordering::Relaxed);
        let mut budget = (budget_in != u64::MAX).then_some(budget_in);
        redo::commit(
            &unit,
            &lanes,
            || redo::lane_mode(bfd),
            Some(self.shadow.lane_keys()),
            &mut budget,
        )?;
        p.gen = unit.gen();
        self.shadow.set_log_period(&p);
        add(&STATS.atomic_syncs, 1);
        add(&STATS.bytes_logged, unit.len() as u64);
        // 2. Applied in place (a crash in the middle replays it); made
        // durable before its lane is written again.
        for (off, bytes) in unit.parts() {
            if budget.is_some() {
                for (k, line) in bytes.chunks(persist::LINE).enumerate() {
                    persist::spend_line(&mut budget);
                    sys::pwrite_all(bfd, line, off + (k * persist::LINE) as u64)?;
                }
            } else {
                sys::pwrite_all(bfd, bytes, off)?;
            }
            self.shadow.rebase_written(bfd, off, bytes)?;
        }
        if let Some(b) = budget {
            persist::CRASH_BUDGET.store(b, Ordering::Relaxed);
        }
        if let Some(dfd) = data_fd {
            self.shadow.punch_synced(dfd, dirty);
        }
        add(&STATS.lines_written, counts.written);
        self.shadow.set_log_period(&shadow::atomic::Period {
            gen: unit.gen(),
            applied: unit.gen(),
            size: backing_size,
            low: backing_size,
            undo_at: redo::undo_start(unit.len()),
            durable: p.durable,
        });
        self.size_dirty.store(false, Ordering::Relaxed);
        self.shadow.record_backing(bfd);
        Ok(())
    }
}

impl FileState {
    /// Brings changes made to the backing outside the shim (another program,
    /// a raw system call, a direct mapping) into the shadow: every line the
    /// shim's processes left alone takes the backing's bytes; a size change
    /// is followed. Called before a sync, a mapping and a read, and after an
    /// attach; one `fstat` when the backing is as the shim last left it.
    pub fn catch_up(&self) {
        let _ = self.catch_up_locked(|f| Some(f.inner.lock()));
    }

    /// [`FileState::catch_up`] for the watcher, which must not wait for
    /// this process's shim calls.
    pub fn catch_up_unless_busy(&self) -> CatchUp {
        self.catch_up_locked(|f| f.inner.try_lock())
    }

    fn catch_up_locked<'a>(
        &'a self,
        lock: impl FnOnce(&'a FileState) -> Option<crate::lock::LockGuard<'a, FileInner>>,
    ) -> CatchUp {
        let Some(data) = self.shadow.data() else {
            return CatchUp::Unchanged;
        };
        let data_fd = data.fd().as_raw_fd();
        let Ok(backing) = self.backing() else {
            return CatchUp::Unchanged;
        };
        let bfd = backing.raw();
        match BackingState::of(bfd) {
            Ok(b) if !self.shadow.backing_unchanged(&b) => {}
            _ => return CatchUp::Unchanged,
        }
        let Some(mut inner) = lock(self) else {
            return CatchUp::Busy;
        };
        let _io = self.shadow.io_lock();
        let _fill = self.shadow.fill_lock();
        let Ok(b) = BackingState::of(bfd) else {
            return CatchUp::Unchanged;
        };
        if self.shadow.backing_unchanged(&b) {
            return CatchUp::Unchanged; // another thread caught up meanwhile
        }
        let taken = (|| -> SysResult<u64> {
            // A size change: the shadow follows (nothing beyond the new size
            // is ever written back).
            self.shadow.set_data_size(b.size)?;
            if b.size == 0 {
                return Ok(0);
            }
            let (sv, bv) = self.views(&mut inner, data_fd, bfd, b.size)?;
            // Only pages the data file holds (a hole is the backing's).
            let mut all = RangeSet::new();
            all.insert(0, b.size);
            let held = if self.shadow.is_lazy() {
                self.shadow.present_in(&all)
            } else {
                all
            };
            // (After the residency probe: the two leaf locks never nest.)
            let Some(g) = self.shadow.bases(b.size) else {
                return Ok(0);
            };
            let mut taken = 0;
            for (a, e) in held.iter() {
                persist::read_ahead(bv, a, e.min(b.size));
                // SAFETY: [a, e) lies within [0, size), which both views
                // cover; the shadow view is writable.
                taken +=
                    unsafe { persist::base::adopt_changes(sv, bv, a, e.min(b.size), &g.bases) };
            }
            Ok(taken)
        })();
        self.shadow.record_outside_change(bfd);
        // Views of a file this process does not sync are not kept.
        let kept = VIEWED.lock().iter().any(|w| std::ptr::eq(w.as_ptr(), self));
        if !kept {
            unmap_views(&mut inner);
        }
        drop(inner);
        match taken {
            Ok(n) => {
                add(&STATS.foreign_writes, n);
                self.report_outside_changes(&persist::LineCounts {
                    foreign: n,
                    ..Default::default()
                });
            }
            Err(e) => warn!(
                "{}: cannot take in changes made outside the shim: {e}",
                self.path
            ),
        }
        CatchUp::Looked
    }

    /// Logs (once per file) that lines were changed outside the shim, and
    /// each sync's conflicts with their first offset.
    fn report_outside_changes(&self, c: &persist::LineCounts) {
        if c.foreign > 0 && !self.foreign_seen.swap(true, Ordering::Relaxed) {
            warn!(
                "{}: changed outside the shim (another program, a raw system call or a \
                 direct mapping); those bytes are kept and shown, never written over",
                self.path
            );
        }
        if let Some(off) = c.first_conflict {
            warn!(
                "{}: {} line(s) changed both outside and inside the shim since the last \
                 sync, first at offset {off}: the shim's bytes were written",
                self.path, c.conflicts
            );
        }
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
        if let Err(e) = f.sync(None, Durability::Complete) {
            result = Err(e);
        }
    }
    result
}
