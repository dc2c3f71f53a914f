//! Process-wide state: the runtime configuration, the descriptor table of
//! pmem files, the attached files and the registry of shadow mappings, and
//! the sync engine that ties them together.
//!
//! Lock order: `ATTACHING` → `FileState::sync_lock` → `REG` →
//! `FileState::inner` → the shadow's io lock. No I/O on the backing while
//! `REG` is held, except the harvest (a pagemap ioctl).

use crate::config::{Config, DaxOptIn};
use crate::lock::Lock;
use crate::persist::{self, FlushKind};
use crate::ranges::RangeSet;
use crate::shadow::{self, AttachOptions, FileId, Shadow};
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, SysResult, PAGE};
use crate::track;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

pub struct Runtime {
    pub cfg: Config,
    pub flush: FlushKind,
    /// `st_dev` of each `DAXSHIM_PMEM` directory: a file on another device
    /// cannot be under one, so most files are ruled out without a readlink.
    pub pmem_devs: Vec<u64>,
    /// Devices mounted with `-o dax` / `dax=always` (every file there is DAX,
    /// even where statx does not say so).
    pub dax_devs: Vec<u64>,
    pub shadow_dir: String,
    /// Set once the shadow directory was found unusable (warned once).
    pub shadow_dir_bad: AtomicBool,
}

pub static RT: OnceLock<Runtime> = OnceLock::new();

pub fn rt() -> &'static Runtime {
    RT.get()
        .expect("daxshim runtime used before initialisation")
}

const STATX_ATTR_DAX: u64 = 0x0020_0000;

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
    finished: AtomicBool,
    /// A `PROT_NONE` mapping of the data file, for `mincore` (which pages
    /// a lazy data file holds). Used under the fill lock only.
    pub probe_view: Lock<(usize, usize)>,
}

pub struct FileInner {
    shadow_view: (usize, usize),
    backing_view: (usize, usize),
    /// File ranges (page-aligned) known dirty outside the tracker: harvested
    /// from ranges that went away (munmap, mremap…) or left by a failed sync.
    pub pending: RangeSet,
    pub fd_refs: usize,
    pub map_refs: usize,
}

/// A shadow mapping in this process.
pub struct Mapping {
    pub start: usize,
    pub len: usize,
    pub file: Arc<FileState>,
    pub off: u64,
    pub shared: bool,
    pub tracked: bool,
    /// Missing pages are filled by the fault thread ([`crate::lazy`]).
    pub lazy: bool,
    /// Protection asked for at mmap (to map the backing in its place at exit).
    pub prot: i32,
}

pub struct Registry {
    pub files: Vec<Arc<FileState>>,
    pub fds: BTreeMap<i32, Arc<FileState>>,
    pub maps: BTreeMap<usize, Mapping>,
}

pub static REG: Lock<Registry> = Lock::new(Registry {
    files: Vec::new(),
    fds: BTreeMap::new(),
    maps: BTreeMap::new(),
});
static ATTACHING: Lock<()> = Lock::new(());

const FD_WORDS: usize = 1 << 14; // 1M descriptors
static FD_BITS: [AtomicU64; FD_WORDS] = [const { AtomicU64::new(0) }; FD_WORDS];
/// Number of shadow mappings: 0 lets mapping hooks skip the registry.
pub static SHADOW_MAPS: AtomicUsize = AtomicUsize::new(0);

fn set_fd_bit(fd: i32, on: bool) {
    let fd = fd as usize;
    if fd / 64 < FD_WORDS {
        let bit = 1u64 << (fd % 64);
        if on {
            FD_BITS[fd / 64].fetch_or(bit, Ordering::Relaxed);
        } else {
            FD_BITS[fd / 64].fetch_and(!bit, Ordering::Relaxed);
        }
    }
}

/// One array lookup: might `fd` be a pmem file? (Exact for fd < 1M.)
#[inline]
pub fn fd_maybe_pmem(fd: i32) -> bool {
    if fd < 0 {
        return false;
    }
    let fd = fd as usize;
    if fd / 64 < FD_WORDS {
        FD_BITS[fd / 64].load(Ordering::Relaxed) & (1u64 << (fd % 64)) != 0
    } else {
        true
    }
}

pub fn lookup_fd(fd: i32) -> Option<Arc<FileState>> {
    if !fd_maybe_pmem(fd) {
        return None;
    }
    REG.lock().fds.get(&fd).cloned()
}

/// Is `path` (a canonical absolute path) under a `DAXSHIM_DAX` directory,
/// or is the whole process DAX-aware?
pub fn process_opted_in(path: &str) -> bool {
    match &rt().cfg.dax {
        DaxOptIn::Off => false,
        DaxOptIn::All => true,
        DaxOptIn::Dirs(dirs) => dirs.iter().any(|d| Path::new(path).starts_with(d)),
    }
}

pub fn fd_path(fd: i32) -> Option<String> {
    let link = CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = sys::readlink(&link, &mut buf).ok()?;
    buf.truncate(n);
    let mut s = String::from_utf8_lossy(&buf).into_owned();
    if let Some(stripped) = s.strip_suffix(" (deleted)") {
        s = stripped.to_string();
    }
    Some(s)
}

/// Is `fd` a regular file on pmem? Returns its identity, whether the pmem is
/// emulated, and its path.
pub fn classify(fd: i32) -> Option<(FileId, bool, String)> {
    let stx = sys::statx_fd(fd, libc::STATX_BASIC_STATS | libc::STATX_BTIME).ok()?;
    if stx.stx_mode as u32 & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    let r = rt();
    let dax = stx.stx_attributes & STATX_ATTR_DAX != 0 || r.dax_devs.contains(&dev);
    if !dax && !r.pmem_devs.contains(&dev) {
        return None;
    }
    let path = fd_path(fd)?;
    if !dax
        && !r
            .cfg
            .pmem_dirs
            .iter()
            .any(|d| Path::new(&path).starts_with(d))
    {
        return None;
    }
    let (gen_sec, gen_nsec) = if stx.stx_mask & libc::STATX_BTIME != 0 {
        (stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)
    } else {
        (0, 0)
    };
    let id = FileId {
        dev,
        ino: stx.stx_ino,
        gen_sec,
        gen_nsec,
    };
    Some((id, !dax, path))
}

fn attach_options(emulated: bool, path: &str) -> AttachOptions {
    AttachOptions {
        emulated,
        flush: rt().flush,
        path: path.to_string(),
    }
}

/// Our own descriptor of the backing file, writable if we may write it.
fn reopen_backing(fd: i32) -> SysResult<(i32, bool)> {
    let p = CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default();
    match sys::open(&p, libc::O_RDWR | libc::O_CLOEXEC, 0) {
        Ok(b) => Ok((b, true)),
        Err(_) => sys::open(&p, libc::O_RDONLY | libc::O_CLOEXEC, 0).map(|b| (b, false)),
    }
}

/// The attached state of a pmem file, attaching it if needed.
fn get_or_attach(
    fd: i32,
    id: FileId,
    emulated: bool,
    path: &str,
) -> Result<Arc<FileState>, String> {
    let _a = ATTACHING.lock();
    if let Some(f) = REG.lock().files.iter().find(|f| f.id == id).cloned() {
        return Ok(f);
    }
    let r = rt();
    if r.shadow_dir_bad.load(Ordering::Relaxed) {
        return Err(format!("shadow directory {} is unusable", r.shadow_dir));
    }
    if let Err(e) = shadow::ensure_dir(&r.shadow_dir) {
        r.shadow_dir_bad.store(true, Ordering::Relaxed);
        return Err(e);
    }
    let (backing_fd, backing_writable) =
        reopen_backing(fd).map_err(|e| format!("cannot reopen {path}: {e}"))?;
    let shadow = match shadow::attach(
        &r.shadow_dir,
        id,
        backing_fd,
        &attach_options(emulated, path),
    ) {
        Ok(s) => s,
        Err(e) => {
            sys::close(backing_fd);
            return Err(e);
        }
    };
    debug!("attached {path} (slot {})", shadow.slot());
    let f = Arc::new(FileState {
        id,
        emulated,
        path: path.to_string(),
        shadow,
        backing_fd,
        backing_writable,
        untracked: AtomicBool::new(false),
        poisoned: AtomicBool::new(false),
        size_dirty: AtomicBool::new(false),
        sync_lock: Lock::new(()),
        inner: Lock::new(FileInner {
            shadow_view: (0, 0),
            backing_view: (0, 0),
            pending: RangeSet::new(),
            fd_refs: 0,
            map_refs: 0,
        }),
        lazy_chunks: Lock::new(Default::default()),
        finished: AtomicBool::new(false),
        probe_view: Lock::new((0, 0)),
    });
    REG.lock().files.push(f.clone());
    Ok(f)
}

/// The attached file behind `fd`, classifying and attaching a descriptor the
/// table has not seen (opened before the shim, or by a path it cannot see).
/// `Ok(None)`: not pmem. `Err`: pmem, but no shadow could be had.
pub fn file_for_fd(fd: i32) -> Result<Option<Arc<FileState>>, String> {
    if let Some(f) = lookup_fd(fd) {
        return Ok(Some(f));
    }
    let Some((id, emulated, path)) = classify(fd) else {
        return Ok(None);
    };
    let f = get_or_attach(fd, id, emulated, &path)?;
    let dropped = register_fd(fd, f.clone());
    drop(dropped);
    Ok(Some(f))
}

/// Enters `fd → file` in the table; returns a file whose last reference
/// this removed (to be dropped by the caller outside any lock).
fn register_fd(fd: i32, f: Arc<FileState>) -> Option<Arc<FileState>> {
    f.inner.lock().fd_refs += 1;
    let mut reg = REG.lock();
    let old = reg.fds.insert(fd, f);
    set_fd_bit(fd, true);
    old.and_then(|o| release_ref(&mut reg, o, true))
}

/// Drops one reference (fd or mapping) to `f`; if none remain, removes the
/// file from the registry and returns it.
fn release_ref(reg: &mut Registry, f: Arc<FileState>, is_fd: bool) -> Option<Arc<FileState>> {
    let mut inner = f.inner.lock();
    if is_fd {
        inner.fd_refs -= 1;
    } else {
        inner.map_refs -= 1;
    }
    let last = inner.fd_refs == 0 && inner.map_refs == 0;
    drop(inner);
    if last {
        reg.files.retain(|x| !Arc::ptr_eq(x, &f));
        Some(f)
    } else {
        None
    }
}

/// After a successful open: enter pmem files in the table.
pub fn on_open(fd: i32, flags: i32) {
    if fd < 0 {
        return;
    }
    if let Some(class) = classify(fd) {
        on_open_classified(fd, flags, class);
    }
}

/// `on_open` for a descriptor already classified as pmem.
pub fn on_open_classified(fd: i32, flags: i32, (id, emulated, path): (FileId, bool, String)) {
    match get_or_attach(fd, id, emulated, &path) {
        Ok(f) => {
            if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
                // The kernel truncated the backing; the shadow follows.
                let _ = f.set_shadow_size(0, true);
            }
            let dropped = register_fd(fd, f);
            drop(dropped);
        }
        Err(e) => warn!("{path}: {e}; this descriptor bypasses the shadow"),
    }
}

/// Before close (or implicit close by dup2/dup3): forget `fd`.
pub fn on_close(fd: i32) {
    if !fd_maybe_pmem(fd) {
        return;
    }
    let dropped = {
        let mut reg = REG.lock();
        set_fd_bit(fd, false);
        match reg.fds.remove(&fd) {
            Some(f) => release_ref(&mut reg, f, true),
            None => None,
        }
    };
    drop(dropped);
}

pub fn on_close_range(first: u32, last: u32) {
    let fds: Vec<i32> = {
        let reg = REG.lock();
        reg.fds
            .range(first as i32..=last.min(i32::MAX as u32) as i32)
            .map(|(&fd, _)| fd)
            .collect()
    };
    for fd in fds {
        on_close(fd);
    }
}

/// After `newfd` became a duplicate of `oldfd`.
pub fn on_dup(oldfd: i32, newfd: i32) {
    if newfd < 0 || oldfd == newfd {
        return;
    }
    match lookup_fd(oldfd) {
        Some(f) => {
            let dropped = register_fd(newfd, f);
            drop(dropped);
        }
        None => on_close(newfd),
    }
}

/// Rescans descriptors inherited from the parent (start-up).
pub fn scan_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if track::tracker().owns_fd(fd) {
            continue;
        }
        // Only descriptors that are still open (the read_dir one is gone).
        if sys::fcntl(fd, libc::F_GETFD, 0).is_ok() {
            on_open(fd, 0);
        }
    }
}

pub fn unmap_view(v: &mut (usize, usize)) {
    if v.1 > 0 {
        // SAFETY: a view mapping owned by this FileInner.
        let _ = unsafe { sys::munmap(v.0 as *mut _, v.1) };
    }
    *v = (0, 0);
}

fn unmap_views(inner: &mut FileInner) {
    unmap_view(&mut inner.shadow_view);
    unmap_view(&mut inner.backing_view);
}

/// Maps `len` bytes of `fd` (again, if the view is too small). `sync`:
/// the real-DAX backing, mapped `MAP_SYNC` so that the block allocations its
/// write faults make are durable at once and cache flushes suffice for data.
fn ensure_view(
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

    fn write_back_dirty(
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

impl FileState {
    /// Writes back what is pending and detaches from the shadow, once. The
    /// header and descriptors stay until the FileState is dropped: at exit
    /// the fault thread may still hold a reference and touch them.
    fn finish(&self) {
        if self.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        let synced = {
            let full = (!track::tracker().is_exact() || self.untracked.load(Ordering::Relaxed))
                && self.shadow.is_writer();
            self.write_back_dirty(RangeSet::new(), 0, u64::MAX, full, true)
                .is_ok()
        };
        unmap_views(&mut self.inner.lock());
        self.shadow.detach(
            synced,
            self.backing_fd,
            &attach_options(self.emulated, &self.path),
        );
        debug!("detached {}", self.path);
    }
}

impl Drop for FileState {
    /// The last reference is gone: write back what is pending, detach.
    fn drop(&mut self) {
        self.finish();
        unmap_view(&mut self.probe_view.lock());
        self.shadow.release();
        sys::close(self.backing_fd);
    }
}

/// Harvests the tracker's dirty pages of `f`'s mappings within file range
/// `[lo, hi)` into `out` (file offsets).
fn harvest_file(f: &Arc<FileState>, lo: u64, hi: u64, out: &mut RangeSet) {
    let reg = REG.lock();
    for m in reg.maps.values() {
        if !m.tracked || !Arc::ptr_eq(&m.file, f) {
            continue;
        }
        let a = lo.max(m.off);
        let b = hi.min(m.off + m.len as u64);
        if a < b {
            let addr = m.start + (a - m.off) as usize;
            harvest_mapping(m, addr, m.start + (b - m.off) as usize, out);
        }
    }
}

/// Harvests `[addr, end)` of tracked mapping `m` into `out` (file offsets).
/// A lazy mapping is scanned only over the chunks this process filled or
/// mapped: elsewhere it has no pages, and scanning would arm (and allocate
/// page tables for) the whole range.
pub fn harvest_mapping(m: &Mapping, addr: usize, end: usize, out: &mut RangeSet) {
    let addr = sys::page_down(addr).max(m.start);
    let end = sys::page_up(end).min(m.start + m.len);
    let mut scan = |a: usize, b: usize| {
        let _ = track::tracker().harvest(a, b - a, &mut |s, n| {
            let fo = m.off + (s - m.start) as u64;
            out.insert(fo, fo + n as u64);
        });
    };
    if !m.lazy {
        scan(addr, end);
        return;
    }
    let chunk = crate::lazy::CHUNK;
    let fo = |va: usize| m.off + (va - m.start) as u64;
    let va = |fo: u64| m.start + (fo - m.off) as usize;
    let (lo, hi) = (fo(addr), fo(end));
    let bits = m.file.lazy_chunks.lock();
    bits.runs(lo / chunk, hi.div_ceil(chunk), &mut |c0, c1| {
        let a = (c0 * chunk).max(lo);
        let b = (c1 * chunk).min(hi);
        scan(va(a), va(b));
    });
}

/// Harvests the dirty pages of tracked mappings overlapping `[addr,
/// addr+len)` into their files' pending sets (before the range goes away or
/// loses its page tables).
pub fn harvest_range_to_pending(reg: &Registry, addr: usize, len: usize) {
    let end = addr.saturating_add(len);
    for m in overlapping(reg, addr, end) {
        if !m.tracked {
            continue;
        }
        let mut got = RangeSet::new();
        harvest_mapping(m, addr.max(m.start), end.min(m.start + m.len), &mut got);
        if !got.is_empty() {
            m.file.inner.lock().pending.extend(&got);
        }
    }
}

fn overlapping(reg: &Registry, addr: usize, end: usize) -> impl Iterator<Item = &Mapping> {
    reg.maps
        .range(..end)
        .rev()
        .take_while(move |(_, m)| m.start + m.len > addr)
        .map(|(_, m)| m)
        .filter(move |m| m.start < end && m.start + m.len > addr)
}

/// Removes `[addr, addr+len)` from the registry (after the kernel unmapped
/// it), splitting mappings that straddle it. Returns files whose last
/// reference went away.
pub fn forget_range(reg: &mut Registry, addr: usize, len: usize) -> Vec<Arc<FileState>> {
    let end = addr.saturating_add(len);
    track::tracker().untrack(addr, len);
    let keys: Vec<usize> = overlapping(reg, addr, end).map(|m| m.start).collect();
    let mut released = Vec::new();
    for k in keys {
        let m = reg.maps.remove(&k).expect("mapping key");
        let mend = m.start + m.len;
        let mut pieces = 0;
        if m.start < addr {
            reg.maps.insert(
                m.start,
                Mapping {
                    start: m.start,
                    len: addr - m.start,
                    file: m.file.clone(),
                    off: m.off,
                    shared: m.shared,
                    tracked: m.tracked,
                    lazy: m.lazy,
                    prot: m.prot,
                },
            );
            pieces += 1;
        }
        if mend > end {
            reg.maps.insert(
                end,
                Mapping {
                    start: end,
                    len: mend - end,
                    file: m.file.clone(),
                    off: m.off + (end - m.start) as u64,
                    shared: m.shared,
                    tracked: m.tracked,
                    lazy: m.lazy,
                    prot: m.prot,
                },
            );
            pieces += 1;
        }
        let f = m.file.clone();
        drop(m);
        match pieces {
            0 => {
                SHADOW_MAPS.fetch_sub(1, Ordering::Relaxed);
                if let Some(r) = release_ref(reg, f, false) {
                    released.push(r);
                }
            }
            1 => {}
            _ => {
                SHADOW_MAPS.fetch_add(1, Ordering::Relaxed);
                f.inner.lock().map_refs += 1;
            }
        }
    }
    released
}

pub fn add_mapping(reg: &mut Registry, m: Mapping) {
    m.file.inner.lock().map_refs += 1;
    SHADOW_MAPS.fetch_add(1, Ordering::Relaxed);
    reg.maps.insert(m.start, m);
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

/// At exit: write back everything and detach from every shadow.
pub fn shutdown() {
    let (maps, fds, files) = {
        let mut reg = REG.lock();
        // Harvest every tracked mapping before forgetting it.
        let ranges: Vec<(usize, usize)> = reg.maps.values().map(|m| (m.start, m.len)).collect();
        for (a, l) in ranges {
            harvest_range_to_pending(&reg, a, l);
        }
        retire_lazy_mappings(&reg);
        for w in FD_BITS.iter() {
            w.store(0, Ordering::Relaxed);
        }
        SHADOW_MAPS.store(0, Ordering::Relaxed);
        (
            std::mem::take(&mut reg.maps),
            std::mem::take(&mut reg.fds),
            std::mem::take(&mut reg.files),
        )
    };
    drop(maps);
    drop(fds);
    // Usually the last references; the fault thread may hold one for a
    // moment, so write back and detach explicitly.
    for f in &files {
        f.finish();
    }
    drop(files);
}

/// At exit, before the registry is emptied: lazy mappings still in place
/// would have no one to fill them once their files are detached, so each
/// becomes a mapping of the backing (which holds this process's stores:
/// they were just harvested and are written back next).
fn retire_lazy_mappings(reg: &Registry) {
    for m in reg.maps.values().filter(|m| m.lazy) {
        let flags = if m.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } | libc::MAP_FIXED;
        // SAFETY: replaces our own shadow mapping at the same place; the
        // registry forgets it right after.
        let r = unsafe {
            sys::mmap(
                m.start as *mut _,
                m.len,
                m.prot,
                flags,
                m.file.backing_fd,
                m.off as i64,
            )
        };
        if let Err(e) = r {
            debug!("{}: cannot retire a lazy mapping at exit: {e}", m.file.path);
        }
    }
}

/// pthread_atfork handlers: no lock of ours may be held across fork.
pub fn atfork_prepare() {
    let a = ATTACHING.lock();
    std::mem::forget(a);
    let reg = REG.lock();
    for f in reg.files.iter() {
        std::mem::forget(f.inner.lock());
    }
    std::mem::forget(reg);
}

fn atfork_release() {
    // SAFETY: atfork_prepare took exactly these locks and forgot the guards.
    unsafe {
        for f in REG.data_unchecked().files.iter() {
            f.inner.force_unlock();
        }
        REG.force_unlock();
        ATTACHING.force_unlock();
    }
}

pub fn atfork_parent() {
    atfork_release();
}

pub fn atfork_child() {
    atfork_release();
    let files: Vec<Arc<FileState>> = REG.lock().files.clone();
    for f in &files {
        f.sync_lock.reset_after_fork();
        if let Err(e) = f.shadow.reslot_after_fork() {
            warn!("{}: {e}", f.path);
        }
    }
    let tracking = match track::tracker().after_fork_child() {
        Ok(()) => true,
        Err(e) => {
            warn!("cannot track writes in the forked child ({e}); comparing whole files at sync");
            track::force_compare();
            false
        }
    };
    crate::lazy::forget_thread_after_fork();
    let mut reg = REG.lock();
    let mut lazy_failed = Vec::new();
    for m in reg.maps.values_mut() {
        if m.lazy {
            let r = if tracking && track::tracker().fills_lazily() {
                crate::lazy::start().map_err(|e| {
                    warn!("{e}");
                    Errno(libc::EAGAIN)
                })
            } else {
                Err(Errno(libc::ENOTSUP))
            };
            if r.and_then(|()| track::tracker().register_lazy(m.start, m.len, m.tracked))
                .is_ok()
            {
                continue;
            }
            // Nobody would fill its holes: fill them all now and track it
            // the ordinary way.
            m.lazy = false;
            lazy_failed.push(m.file.clone());
        }
        if m.tracked && tracking {
            if let Err(e) = track::tracker().track(m.start, m.len) {
                warn!(
                    "cannot track a mapping of {} in the child: {e}",
                    m.file.path
                );
                track::force_compare();
            }
        }
    }
    drop(reg);
    for f in lazy_failed {
        if let Err(e) = f.shadow.ensure_data(f.backing_fd, false) {
            error!(
                "{}: cannot fill the shadow in the forked child: {e}",
                f.path
            );
        }
    }
}
