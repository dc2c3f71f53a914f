//! One pmem file attached by this process: its shadow, its backing
//! descriptor, and the state of its syncs.

use crate::fdcache::{self, FdCache, SharedFd};
use crate::lazy::{ChunkBits, FillGate, LazyFile};
use crate::lock::Lock;
use crate::ranges::RangeSet;
use crate::runtime::rt;
use crate::shadow::{FileId, Shadow};
use crate::sys::{self, OwnedMap, SysResult};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// One pmem file attached by this process.
pub struct FileState {
    pub id: FileId,
    /// Emulated pmem (`DAXSHIM_PMEM`): durability needs the kernel too.
    pub emulated: bool,
    pub path: String,
    pub shadow: Shadow,
    /// How this process reaches the backing file ([`FileState::backing`]).
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
    pub lazy_chunks: ChunkBits,
    /// Eviction against in-thread fills ([`crate::lazy::FillGate`]).
    pub lazy_gate: FillGate,
    /// Being written back and detached by this thread, or done (-1), or
    /// not yet (0) (`FileState::finish`): another thread's exit waits for
    /// it.
    pub finishing: std::sync::atomic::AtomicI32,
    /// A change made outside the shim was seen (logged once).
    pub foreign_seen: AtomicBool,
}

/// How this process reaches a backing file. Its descriptor is not held per
/// file (the program's descriptor limit is the program's): it comes from a
/// per-process cache of a few ([`BACKING_FDS`]) and is reopened when it fell
/// out — through a descriptor the program holds for the file (the very
/// file, renamed or not), else by path — and checked to be the same file.
pub struct Backing {
    key: u64,
    /// Where the file is now, as far as this process knows (its own
    /// renames update it): the last way to reopen it.
    path: Lock<String>,
    /// Opened read-write (a process that could never write the file has
    /// nothing of its own to write back).
    pub writable: bool,
    /// Some of the program's descriptors of the file (-1: none), kept by
    /// the descriptor table.
    program_fds: [AtomicI32; 4],
}

/// This process's open backing descriptors: at most 16.
static BACKING_FDS: FdCache = FdCache::new(16);

#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);

impl Backing {
    /// Opens the file behind the program's descriptor `fd` (through /proc:
    /// the very file), read-write if we may; the descriptor goes into the
    /// cache (and is returned, held).
    pub fn reopen(fd: i32, path: &str) -> SysResult<(Backing, SharedFd)> {
        let (owned, writable) = open_proc_fd(fd, None)?;
        let b = Backing {
            key: fdcache::new_key(),
            path: Lock::new(path.to_string()),
            writable,
            program_fds: [NO_FD; 4],
        };
        let held = BACKING_FDS.insert(b.key, owned);
        Ok((b, held))
    }

    /// The program opened `fd` on this file.
    pub fn note_program_fd(&self, fd: i32) {
        for s in &self.program_fds {
            if s.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// This process renamed the file to `path`.
    pub fn set_path(&self, path: String) {
        *self.path.lock() = path;
    }

    /// The program is closing `fd`.
    pub fn forget_program_fd(&self, fd: i32) {
        for s in &self.program_fds {
            let _ = s.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Fork: the cache's lock is a leaf lock (see `lifecycle`).
    pub fn hold_for_fork() {
        BACKING_FDS.hold_for_fork();
    }

    /// # Safety
    /// After [`Backing::hold_for_fork`], in the parent or the child.
    pub unsafe fn release_after_fork() {
        // SAFETY: per contract.
        unsafe { BACKING_FDS.release_after_fork() };
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        BACKING_FDS.forget(self.key);
    }
}

/// Opens `/proc/self/fd/FD` (the very file), read-write, else read-only
/// (or as `writable` says).
fn open_proc_fd(fd: i32, writable: Option<bool>) -> SysResult<(OwnedFd, bool)> {
    open_path(&format!("/proc/self/fd/{fd}"), writable)
}

fn open_path(path: &str, writable: Option<bool>) -> SysResult<(OwnedFd, bool)> {
    let p = CString::new(path).map_err(|_| sys::Errno(libc::EINVAL))?;
    if writable != Some(false) {
        match sys::open(&p, libc::O_RDWR | libc::O_CLOEXEC, 0) {
            Ok(fd) => return Ok((fd, true)),
            Err(e) if writable == Some(true) => return Err(e),
            Err(_) => {}
        }
    }
    sys::open(&p, libc::O_RDONLY | libc::O_CLOEXEC, 0).map(|fd| (fd, false))
}

/// Is `fd` the file `id`?
fn is_file(fd: &OwnedFd, id: &FileId) -> bool {
    sys::statx_fd(fd.as_raw_fd(), libc::STATX_BASIC_STATS | libc::STATX_BTIME)
        .is_ok_and(|x| crate::classify::file_id(&x) == *id)
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
    /// A descriptor of the backing file, open while the handle lives.
    /// `EIO` if it cannot be reopened (renamed or removed by someone else
    /// while the program holds no descriptor of it).
    pub fn backing(&self) -> SysResult<SharedFd> {
        BACKING_FDS.get_or_open(self.backing.key, || self.reopen_backing())
    }

    fn reopen_backing(&self) -> SysResult<OwnedFd> {
        let writable = Some(self.backing.writable);
        for s in &self.backing.program_fds {
            let fd = s.load(Ordering::Acquire);
            if fd < 0 {
                continue;
            }
            if let Ok((owned, _)) = open_proc_fd(fd, writable) {
                if is_file(&owned, &self.id) {
                    return Ok(owned);
                }
            }
        }
        let path = self.backing.path.lock().clone();
        if let Ok((owned, _)) = open_path(&path, writable) {
            if is_file(&owned, &self.id) {
                return Ok(owned);
            }
        }
        warn!(
            "{}: cannot reopen the file (renamed or removed, and no descriptor of it is open)",
            self.path
        );
        Err(sys::Errno(libc::EIO))
    }

    /// The shadow follows a size change the kernel made to the backing
    /// (which a later `msync(MS_SYNC)` must make durable). Call with the io
    /// lock held.
    pub fn follow_backing_size(&self) -> SysResult<()> {
        self.size_dirty.store(true, Ordering::Relaxed);
        if self.shadow.data().is_none() {
            return Ok(());
        }
        let backing = self.backing()?;
        // One query gives the size to follow and what to record.
        let b = crate::shadow::BackingState::of(backing.raw())?;
        let _fill = self.shadow.fill_lock();
        self.shadow.set_data_size(b.size)?;
        self.shadow.record(&b);
        Ok(())
    }

    /// How many of `len` bytes mapped from file offset `off` lie inside the
    /// file (in whole pages), by the shadow's size; all of them while the
    /// shadow has no data file.
    pub fn mapped_inside(&self, off: u64, len: usize) -> usize {
        match self.shadow.data_size() {
            Some(size) => (sys::page_up(size as usize) as u64)
                .saturating_sub(off)
                .min(len as u64) as usize,
            None => len,
        }
    }

    /// Emulated pmem is written back with pwrite(2) into the backing (its
    /// "media" is the kernel's page cache, which flush instructions do not
    /// make durable, and stores into its mapping take a file system write
    /// fault per page); real DAX with stores and flushes through the
    /// mapping. `DAXSHIM_WRITEBACK=stores` uses the latter everywhere.
    pub fn writes_back_with_pwrite(&self) -> bool {
        self.emulated && !rt().cfg.writeback_stores
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
    fn backing(&self) -> SysResult<SharedFd> {
        FileState::backing(self)
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn chunks(&self) -> &ChunkBits {
        &self.lazy_chunks
    }
    fn gate(&self) -> &FillGate {
        &self.lazy_gate
    }
}

/// What a look at a file's backing found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CatchUp {
    /// The backing is as the shim last left it (or there is no shadow).
    Unchanged,
    /// Changed in a way the shim had not recorded: the shadow caught up.
    Looked,
    /// A shim call of this process holds the file: look again later.
    Busy,
}
