//! The shared shadow store: one shared-memory copy of each pmem file,
//! attached by every process that opens or maps it.
//!
//! Layout (docs/ARCHITECTURE.md, "Shadow protocol"): `$DAXSHIM_SHADOW_DIR/
//! <dev>-<ino>-<gen>` holds the data at the file's own offsets, `<…>.meta`
//! a [`header::Header`]. Liveness comes from OFD locks on per-slot bytes of
//! the meta file ([`slots`]), which the kernel drops when a process dies
//! however it dies.
//!
//! - [`owned`]: files of ours alone, the header's robust locks;
//! - [`slots`]: the slot protocol (one scan, one way to take a slot);
//! - [`attach`]: attach, reconcile, detach, fork;
//! - [`data`]: the data file: creation, filling, residency, eviction.
//!
//! This layer knows nothing of the registry or the configuration: what it
//! needs comes in [`AttachOptions`].

pub mod atomic;
pub mod attach;
pub mod data;
pub mod header;
pub mod lines;
pub mod owned;
mod regions;
mod slots;

use crate::lock::Lock;
use crate::persist::FlushKind;
use crate::sys::{self, OwnedMap, SysResult};
use header::*;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use attach::{attach, Detach};
pub use data::{data_segments, Fill};
pub use header::FileId;
pub use owned::{ensure_dir, HeaderLock};
pub use slots::{
    forget_presence_after_fork, hold_presence_for_fork, release_presence_after_fork,
    remove_presence,
};

/// An eviction in progress ([`Shadow::evicting`]).
pub struct Evicting<'a>(&'a Shadow);

impl Drop for Evicting<'_> {
    fn drop(&mut self) {
        let s = self.0;
        s.header().slots[s.slot()]
            .flags
            .fetch_and(!SLOT_EVICTING, Ordering::SeqCst);
    }
}

/// This process's attachment to one shadow.
pub struct Shadow {
    pub base: String,
    /// The header's mapping; [`Shadow::header`] hands out `&Header` only.
    header: OwnedMap,
    slot: AtomicUsize,
    /// Key of this shadow's data descriptor in the process's cache
    /// (`data.rs`). The data is created lazily, by the first process that
    /// maps the file: until then reads and writes go straight to the
    /// backing, which is coherent because there is no copy.
    key: u64,
    /// Keys of this shadow's lanes in the process's cache of open lanes
    /// (failure-atomic mode).
    lane_keys: crate::persist::redo::LaneKeys,
    /// A `PROT_NONE` mapping of the data file, for `mincore` (which pages a
    /// lazy data file holds). Used under the fill lock only.
    probe: Lock<OwnedMap>,
    /// The line bases (`lines.rs`).
    lines: Lock<lines::LinesMap>,
    /// The region marks (`regions.rs`): the mapping, and its address once
    /// made (read without the lock).
    marks: Lock<OwnedMap>,
    marks_addr: AtomicUsize,
}

impl Shadow {
    /// Before the data file, its bases or its region marks are made: the
    /// last detach removes them (see `Header::files_made`).
    fn note_files_made(&self) {
        let h = self.header();
        if h.files_made.load(Ordering::Relaxed) == 0 {
            h.files_made.store(1, Ordering::Release);
        }
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        data::forget_data_fd(self.key);
        self.lane_keys.forget();
    }
}

/// What attaching needs to know of the file and the process.
pub struct AttachOptions {
    pub emulated: bool,
    pub flush: FlushKind,
    /// `DAXSHIM_WRITEBACK=stores`: emulated pmem written back by stores and
    /// flushes through a mapping (as real pmem), not by `pwrite`.
    pub writeback_stores: bool,
    /// The backing file's path, recorded in the header for the CLI (and
    /// where the atomic log's lanes are).
    pub path: String,
    /// `DAXSHIM_ATOMIC` covers this file: failure-atomic sync.
    pub atomic: bool,
}

/// The backing file's size and modification time: what the header records
/// to notice changes made behind the shim's back.
pub struct BackingState {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u64,
}

impl BackingState {
    pub fn of(fd: i32) -> SysResult<BackingState> {
        let st = sys::fstat(fd)?;
        Ok(BackingState {
            size: st.st_size as u64,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u64,
        })
    }

    /// Is this what the header recorded?
    fn is_recorded_in(&self, h: &Header) -> bool {
        h.is_recorded(self.size, self.mtime_sec, self.mtime_nsec)
    }
}

impl Shadow {
    /// The header's file.
    pub fn meta_path(&self) -> String {
        format!("{}.meta", self.base)
    }

    pub fn slot(&self) -> usize {
        self.slot.load(Ordering::Relaxed)
    }

    pub fn header(&self) -> &Header {
        // SAFETY: mapped (META_SIZE bytes) for the life of self; shared
        // references only (header.rs).
        unsafe { &*(self.header.addr() as *const Header) }
    }

    /// See [`Header::io_lock`].
    pub fn io_lock(&self) -> HeaderLock<'_> {
        // SAFETY: a robust process-shared mutex in the header, mapped as
        // long as `self`, which the guard borrows.
        unsafe { owned::lock_robust(self.header().io_lock.get()) }
    }

    /// See [`Header::fill_lock`]. Taken after the io lock, never before.
    pub fn fill_lock(&self) -> HeaderLock<'_> {
        // SAFETY: as for `io_lock`.
        unsafe { owned::lock_robust(self.header().fill_lock.get()) }
    }

    /// The shared estimate of the memory the shadow holds ([`Header::filled`]).
    pub fn filled_estimate(&self) -> &std::sync::atomic::AtomicU64 {
        &self.header().filled
    }

    /// Holes in the data file mean "the backing's bytes" (lazy filling).
    pub fn is_lazy(&self) -> bool {
        self.header().lazy.load(Ordering::Acquire) != 0
    }

    /// Some process maps the data without handling missing pages: holes
    /// must be filled when created and nothing may be evicted.
    pub fn no_evict(&self) -> bool {
        self.header().no_evict.load(Ordering::Acquire) != 0
    }

    /// Only this process is attached (no other process can be storing to
    /// the data behind our back). Dead slots count as attached.
    pub fn alone(&self) -> bool {
        let h = self.header();
        (0..SLOTS).all(|i| i == self.slot() || h.slots[i].pid.load(Ordering::Relaxed) == 0)
    }

    /// Is the backing as the shim last left it (size and mtime)? If not,
    /// someone outside the shim changed it (or the shim itself within the
    /// file system's timestamp granularity: the caller then finds nothing).
    pub fn backing_unchanged(&self, b: &BackingState) -> bool {
        b.is_recorded_in(self.header()) && self.header().rec_unsure.load(Ordering::Acquire) == 0
    }

    /// After taking in changes made outside the shim: records the backing
    /// and whether a later change could hide behind the same mtime (it lies
    /// in the clock tick that is still current). Call with the io lock held.
    pub fn record_outside_change(&self, backing_fd: i32) {
        let Ok(b) = BackingState::of(backing_fd) else {
            return;
        };
        self.header().record(b.size, b.mtime_sec, b.mtime_nsec);
        let now = sys::coarse_realtime();
        let unsure = (b.mtime_sec, b.mtime_nsec) >= now;
        self.header()
            .rec_unsure
            .store(unsure as u32, Ordering::Release);
    }

    /// Records the backing's size and mtime after the shim changed it. Call
    /// with the io lock held.
    pub fn record_backing(&self, backing_fd: i32) {
        if let Ok(b) = BackingState::of(backing_fd) {
            self.record(&b);
        }
    }

    /// Records `b`, the backing as the shim just left it (see
    /// [`Shadow::record_backing`]).
    pub fn record(&self, b: &BackingState) {
        self.header().record(b.size, b.mtime_sec, b.mtime_nsec);
    }

    pub fn mark_writer(&self) {
        self.header().slots[self.slot()]
            .flags
            .fetch_or(SLOT_WRITER, Ordering::Relaxed);
    }

    /// This process holds no unsynced stores of its own (a forked child
    /// of a failure-atomic file's writer).
    pub fn clear_writer(&self) {
        self.header().slots[self.slot()]
            .flags
            .fetch_and(!SLOT_WRITER, Ordering::Relaxed);
    }

    pub fn is_writer(&self) -> bool {
        self.header().slots[self.slot()]
            .flags
            .load(Ordering::Relaxed)
            & SLOT_WRITER
            != 0
    }

    /// This process maps the file writable and shared without region traps
    /// marking its stores ([`crate::track::marks`]): other processes evict
    /// only while alone.
    ///
    /// Dekker with [`Shadow::evicting`]: the flag is set, then evictions in
    /// progress are waited for; an evictor counts itself, then looks at
    /// the flags. Call before the mapping can be stored to.
    pub fn mark_untrapped(&self) {
        let h = self.header();
        h.slots[self.slot()]
            .flags
            .fetch_or(SLOT_UNTRAPPED, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let evicting = |i: usize| {
            i != self.slot()
                && h.slots[i].flags.load(Ordering::SeqCst) & SLOT_EVICTING != 0
                && !self.slot_gone(i)
        };
        // An eviction holds its region for a few milliseconds at most.
        while (0..SLOTS).any(evicting) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Marks an eviction of this process as in progress while the guard
    /// lives (see [`Shadow::mark_untrapped`]); look at the flags after.
    pub fn evicting(&self) -> Evicting<'_> {
        self.header().slots[self.slot()]
            .flags
            .fetch_or(SLOT_EVICTING, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        Evicting(self)
    }

    /// Does another live process map the file with untrapped stores?
    pub fn others_untrapped(&self) -> bool {
        let h = self.header();
        (0..SLOTS).any(|i| {
            i != self.slot()
                && h.slots[i].flags.load(Ordering::Relaxed) & SLOT_UNTRAPPED != 0
                && !self.slot_gone(i)
        })
    }

    /// Is slot `i` free, left, or held by a process that no longer exists
    /// (it stores nowhere)? A cheap answer: a reused pid counts as alive.
    pub fn slot_gone(&self, i: usize) -> bool {
        let s = &self.header().slots[i % SLOTS];
        let pid = s.pid.load(Ordering::Relaxed);
        pid == 0 || s.flags.load(Ordering::Relaxed) & SLOT_LEFT != 0 || sys::process_gone(pid)
    }

    /// Might another process (alive or dead) hold unsynced stores?
    pub fn other_writers(&self) -> bool {
        let h = self.header();
        (0..SLOTS).any(|i| {
            i != self.slot()
                && h.slots[i].pid.load(Ordering::Relaxed) != 0
                && h.slots[i].flags.load(Ordering::Relaxed) & SLOT_WRITER != 0
        })
    }

    /// After a full-file writeback: slots of dead writers are covered now.
    pub fn clear_dead_writers(&self) {
        slots::clear_dead_writers(self.header(), &self.meta_path(), self.slot());
    }
}
