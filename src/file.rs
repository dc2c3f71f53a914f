//! One pmem file attached by this process: its shadow, its backing
//! descriptor, and the state of its syncs.

use crate::lock::Lock;
use crate::ranges::RangeSet;
use crate::runtime::rt;
use crate::shadow::{FileId, Shadow};
use crate::sys::{self, SysResult};
use std::sync::atomic::{AtomicBool, Ordering};

/// One pmem file attached by this process.
pub struct FileState {
    pub id: FileId,
    /// Emulated pmem (`DAXSHIM_PMEM`): durability needs the kernel too.
    pub emulated: bool,
    pub path: String,
    pub shadow: Shadow,
    /// Our own descriptor of the backing file (fixed for the file's life).
    pub backing_fd: i32,
    pub backing_writable: bool,
    /// Tracking could not be set up for a mapping: syncs compare everything.
    pub untracked: AtomicBool,
    /// See [`FileState::poison`].
    pub poisoned: AtomicBool,
    /// The backing's size changed since the last durable sync: an
    /// msync(MS_SYNC) must make that metadata durable too (fdatasync).
    pub size_dirty: AtomicBool,
    /// Serialises syncs of this file, so that a sync never returns while
    /// another thread is still copying pages it harvested.
    pub sync_lock: Lock<()>,
    pub inner: Lock<FileInner>,
    /// Chunks of lazy mappings this process may have pages of (see
    /// [`crate::lazy::ChunkBits`]).
    pub lazy_chunks: Lock<crate::lazy::ChunkBits>,
    /// Written back and detached ([`FileState::finish`]).
    pub finished: AtomicBool,
    /// A `PROT_NONE` mapping of the data file, for `mincore` (which pages
    /// a lazy data file holds). Used under the fill lock only.
    pub probe_view: Lock<(usize, usize)>,
}

pub struct FileInner {
    pub shadow_view: (usize, usize),
    pub backing_view: (usize, usize),
    /// File ranges (page-aligned) known dirty outside the tracker: harvested
    /// from ranges that went away (munmap, mremap…) or left by a failed sync.
    pub pending: RangeSet,
    pub fd_refs: usize,
    pub map_refs: usize,
}

impl FileState {
    /// Makes the shadow `size` bytes long (the backing already is). With
    /// `locked_io == false` the caller already holds the io lock.
    pub fn set_shadow_size(&self, size: u64, take_io_lock: bool) -> SysResult<()> {
        let _g = take_io_lock.then(|| self.shadow.io_lock());
        if let Some((data_fd, _)) = self.shadow.data() {
            let _fill = self.shadow.fill_lock();
            sys::ftruncate(data_fd, size)?;
            self.shadow.record_backing(self.backing_fd);
        }
        Ok(())
    }

    /// Emulated pmem is written back with pwrite(2) into the backing (its
    /// "media" is the kernel's page cache, which flush instructions do not
    /// make durable, and stores into its mapping take a file system write
    /// fault per page); real DAX with stores and flushes through the
    /// mapping. `DAXSHIM_WRITEBACK=stores` uses the latter everywhere.
    pub fn writeback_fd(&self) -> Option<i32> {
        (self.emulated && !rt().cfg.writeback_stores).then_some(self.backing_fd)
    }

    /// The shadow no longer agrees with the backing where it should (an
    /// update of the shadow failed). Writing it back could put stale bytes
    /// over newer ones, so every later sync of this file fails with EIO.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }
}
