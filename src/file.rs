//! One pmem file attached by this process: its shadow, its backing
//! descriptor, and the state of its syncs.

use crate::lazy::{ChunkBits, LazyFile};
use crate::lock::Lock;
use crate::ranges::RangeSet;
use crate::runtime::rt;
use crate::shadow::{FileId, Shadow};
use crate::sys::{self, OwnedMap, SysResult};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// One pmem file attached by this process.
pub struct FileState {
    pub id: FileId,
    /// Emulated pmem (`DAXSHIM_PMEM`): durability needs the kernel too.
    pub emulated: bool,
    pub path: String,
    pub shadow: Shadow,
    /// Our own descriptor of the backing file (fixed for the file's life).
    pub backing: Backing,
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
    pub lazy_chunks: Lock<ChunkBits>,
    /// Written back and detached ([`FileState::finish`]).
    pub finished: AtomicBool,
    /// A change made outside the shim was seen (logged once).
    pub foreign_seen: AtomicBool,
}

/// This process's own descriptor of a backing file.
pub struct Backing {
    pub fd: OwnedFd,
    /// Opened read-write (a process that could never write the file has
    /// nothing of its own to write back).
    pub writable: bool,
}

impl Backing {
    /// Reopens the file behind the program's descriptor `fd` (through
    /// /proc: the very file), read-write if we may.
    pub fn reopen(fd: i32) -> SysResult<Backing> {
        let p = CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default();
        match sys::open(&p, libc::O_RDWR | libc::O_CLOEXEC, 0) {
            Ok(fd) => Ok(Backing { fd, writable: true }),
            Err(_) => sys::open(&p, libc::O_RDONLY | libc::O_CLOEXEC, 0).map(|fd| Backing {
                fd,
                writable: false,
            }),
        }
    }
}

pub struct FileInner {
    /// The writeback's views of the shadow and of the backing (grown on
    /// demand, see [`crate::writeback`]).
    pub shadow_view: OwnedMap,
    pub backing_view: OwnedMap,
    /// File ranges (page-aligned) known dirty outside the tracker: harvested
    /// from ranges that went away (munmap, mremap…) or left by a failed sync.
    pub pending: RangeSet,
    pub fd_refs: usize,
    pub map_refs: usize,
}

impl FileState {
    /// Our descriptor of the backing file.
    pub fn backing_fd(&self) -> i32 {
        self.backing.fd.as_raw_fd()
    }

    /// The shadow follows a size change the kernel made to the backing
    /// (which a later `msync(MS_SYNC)` must make durable). Call with the io
    /// lock held.
    pub fn follow_backing_size(&self) -> SysResult<()> {
        self.size_dirty.store(true, Ordering::Relaxed);
        if self.shadow.data().is_none() {
            return Ok(());
        }
        let size = sys::fstat(self.backing_fd())?.st_size as u64;
        let _fill = self.shadow.fill_lock();
        self.shadow.set_data_size(size)?;
        self.shadow.record_backing(self.backing_fd());
        Ok(())
    }

    /// Emulated pmem is written back with pwrite(2) into the backing (its
    /// "media" is the kernel's page cache, which flush instructions do not
    /// make durable, and stores into its mapping take a file system write
    /// fault per page); real DAX with stores and flushes through the
    /// mapping. `DAXSHIM_WRITEBACK=stores` uses the latter everywhere.
    pub fn writeback_fd(&self) -> Option<i32> {
        (self.emulated && !rt().cfg.writeback_stores).then_some(self.backing_fd())
    }

    /// The shadow no longer agrees with the backing where it should (an
    /// update of the shadow failed). Writing it back could put stale bytes
    /// over newer ones, so every later sync of this file fails with EIO.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }
}

impl LazyFile for FileState {
    fn shadow(&self) -> &Shadow {
        &self.shadow
    }
    fn backing_fd(&self) -> i32 {
        FileState::backing_fd(self)
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn chunks(&self) -> &Lock<ChunkBits> {
        &self.lazy_chunks
    }
}
