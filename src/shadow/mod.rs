//! The shared shadow store: one shared-memory copy of each pmem file,
//! attached by every process that opens or maps it.
//!
//! Layout (DESIGN.md §3.1): `$DAXSHIM_SHADOW_DIR/<dev>-<ino>-<gen>` holds the
//! data at the file's own offsets, `<…>.meta` a [`header::Header`]. Liveness
//! comes from OFD locks on per-slot bytes of the meta file, which the kernel
//! drops when a process dies however it dies.
//!
//! # Safety
//! The header pointer comes from a `MAP_SHARED` mapping of the meta file that
//! lives as long as the [`Shadow`]; see `header.rs` for its concurrency rules.

pub mod header;

use crate::persist::{self, FlushKind};
use crate::ranges::RangeSet;
use crate::sys::{self, Errno, SysResult, PAGE};
use header::*;
use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

pub use header::FileId;

pub struct Shadow {
    pub base: String,
    meta_fd: std::sync::atomic::AtomicI32,
    header: *mut Header,
    slot: std::sync::atomic::AtomicUsize,
    /// This process's descriptors of the data file (read-write, read-only),
    /// opened once the data exists. The data is created lazily, by the first
    /// process that maps the file: until then reads and writes go straight
    /// to the backing, which is coherent because there is no copy.
    data: OnceLock<(i32, i32)>,
}

// SAFETY: the header is shared memory designed for concurrent access.
unsafe impl Send for Shadow {}
// SAFETY: as above.
unsafe impl Sync for Shadow {}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn err(what: &str, path: &str, e: Errno) -> String {
    format!("{what} {path}: {e}")
}

/// Creates (0700) or checks the per-user shadow directory: a real directory,
/// owned by us, not accessible to others.
pub fn ensure_dir(dir: &str) -> Result<(), String> {
    let c = cstr(dir);
    match sys::mkdir(&c, 0o700) {
        Ok(()) | Err(Errno(libc::EEXIST)) => {}
        Err(e) => return Err(err("cannot create shadow directory", dir, e)),
    }
    let st = sys::lstat(&c).map_err(|e| err("cannot stat shadow directory", dir, e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(format!(
            "shadow directory {dir} is not a directory (a symlink?); refusing it"
        ));
    }
    if st.st_uid != sys::geteuid() {
        return Err(format!(
            "shadow directory {dir} belongs to uid {}, not to us; refusing it",
            st.st_uid
        ));
    }
    if st.st_mode & 0o077 != 0 {
        return Err(format!(
            "shadow directory {dir} has mode {:o}; it must not be accessible to others",
            st.st_mode & 0o777
        ));
    }
    Ok(())
}

/// Opens an existing shadow file or creates it exclusively; checks it is a
/// regular file of ours with mode 0600.
fn open_owned(path: &str, create: bool) -> Result<i32, String> {
    let c = cstr(path);
    let base = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let fd = loop {
        match sys::open(&c, base, 0) {
            Ok(fd) => break fd,
            Err(Errno(libc::ENOENT)) if create => {
                match sys::open(&c, base | libc::O_CREAT | libc::O_EXCL, 0o600) {
                    Ok(fd) => break fd,
                    Err(Errno(libc::EEXIST)) => continue,
                    Err(e) => return Err(err("cannot create", path, e)),
                }
            }
            Err(e) => return Err(err("cannot open", path, e)),
        }
    };
    let ok = match sys::fstat(fd) {
        Ok(st) => {
            st.st_mode & libc::S_IFMT == libc::S_IFREG
                && st.st_uid == sys::geteuid()
                && st.st_mode & 0o077 == 0
        }
        Err(_) => false,
    };
    if !ok {
        sys::close(fd);
        return Err(format!(
            "{path} is not a private regular file of ours; refusing it"
        ));
    }
    Ok(fd)
}

fn lock_attach(fd: i32) -> SysResult<()> {
    sys::ofd_lock(fd, libc::F_OFD_SETLKW, libc::F_WRLCK, ATTACH_LOCK_BYTE, 1).map(|_| ())
}

fn unlock_attach(fd: i32) {
    let _ = sys::ofd_lock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, ATTACH_LOCK_BYTE, 1);
}

/// Is the process owning slot `i` alive? (Never ask about our own slot with
/// our own descriptor: our own locks do not conflict with us.)
fn slot_alive(meta_fd: i32, i: usize) -> bool {
    match sys::ofd_lock(
        meta_fd,
        libc::F_OFD_GETLK,
        libc::F_WRLCK,
        SLOT_LOCK_BASE + i as i64,
        1,
    ) {
        Ok(fl) => fl.l_type != libc::F_UNLCK as i16,
        Err(_) => true,
    }
}

fn backing_state(fd: i32) -> SysResult<(u64, i64, u64)> {
    let st = sys::fstat(fd)?;
    Ok((st.st_size as u64, st.st_mtime, st.st_mtime_nsec as u64))
}

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
    let size = sys::fstat(fd).map(|st| st.st_size as u64).unwrap_or(hi);
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
/// that maps it without handling missing pages). Holds the fill lock.
fn fill_holes(data_fd: i32, backing_fd: i32) -> SysResult<()> {
    let size = sys::fstat(data_fd)?.st_size as u64;
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
        off = data;
    }
    Ok(())
}

/// Files smaller than this are copied whole at their first mapping even
/// where lazy filling is possible (measured on SQLite, which maps an empty
/// database and grows it: 122 fills of ~60 µs each per 20,000-row run,
/// against nothing for the zeros an eager shadow grows by).
const LAZY_MIN_SIZE: u64 = 1 << 20;

/// Maps `len` bytes of `fd` shared; `len` 0 gives a null pointer.
fn map_shared(fd: i32, len: usize, prot: i32) -> SysResult<usize> {
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh mapping chosen by the kernel.
    unsafe { sys::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) }
        .map(|p| p as usize)
}

/// Writes back every line of the shadow that differs from the backing
/// (reconciliation after writers died). Durable when it returns Ok.
pub fn reconcile(data_fd: i32, backing_fd: i32, emulated: bool, flush: FlushKind) -> SysResult<()> {
    let shadow_size = sys::fstat(data_fd)?.st_size as u64;
    let backing_size = sys::fstat(backing_fd)?.st_size as u64;
    let size = shadow_size.min(backing_size) as usize;
    if size == 0 {
        return Ok(());
    }
    let s = map_shared(data_fd, size, libc::PROT_READ)?;
    let b = match map_shared(backing_fd, size, libc::PROT_READ | libc::PROT_WRITE) {
        Ok(b) => b,
        Err(e) => {
            // SAFETY: our mapping.
            let _ = unsafe { sys::munmap(s as *mut _, size) };
            return Err(e);
        }
    };
    // Only pages the data file holds: a hole is either not filled yet (lazy:
    // the backing's bytes) or zeros in the backing too.
    let all = data_segments(data_fd, 0, size as u64);
    let how = persist::Writeback {
        flush,
        msync_touched: emulated,
        via_fd: (emulated && !crate::runtime::rt().cfg.writeback_stores).then_some(backing_fd),
    };
    let r = persist::write_back(s, b, size as u64, &all, &how);
    // SAFETY: our mappings.
    unsafe {
        let _ = sys::munmap(s as *mut _, size);
        let _ = sys::munmap(b as *mut _, size);
    }
    crate::stats::add(&crate::stats::STATS.reconciles, 1);
    r.map(|_| ())
}

pub struct AttachOptions {
    pub emulated: bool,
    pub flush: FlushKind,
    /// The backing file's path, recorded in the header for the CLI.
    pub path: String,
}

/// Attaches this process to the shadow of `id`, creating, reconciling or
/// rebuilding it as the protocol requires. `backing_fd` must be readable;
/// reconciliation needs it writable.
pub fn attach(
    dir: &str,
    id: FileId,
    backing_fd: i32,
    opt: &AttachOptions,
) -> Result<Shadow, String> {
    let base = format!("{dir}/{}", id.key());
    let meta_path = format!("{base}.meta");
    // Open the meta file and hold its attach lock, retrying if a detaching
    // process unlinked it meanwhile.
    let meta_fd = loop {
        let fd = open_owned(&meta_path, true)?;
        lock_attach(fd).map_err(|e| err("cannot lock", &meta_path, e))?;
        let linked = match (sys::fstat(fd), sys::lstat(&cstr(&meta_path))) {
            (Ok(a), Ok(b)) => a.st_ino == b.st_ino && a.st_dev == b.st_dev,
            _ => false,
        };
        if linked {
            break fd;
        }
        sys::close(fd);
    };
    let r = attach_locked(&base, meta_fd, id, backing_fd, opt);
    unlock_attach(meta_fd);
    if r.is_err() {
        sys::close(meta_fd);
    }
    r
}

fn attach_locked(
    base: &str,
    meta_fd: i32,
    id: FileId,
    backing_fd: i32,
    opt: &AttachOptions,
) -> Result<Shadow, String> {
    let meta_path = format!("{base}.meta");
    let st = sys::fstat(meta_fd).map_err(|e| err("cannot stat", &meta_path, e))?;
    if (st.st_size as usize) < META_SIZE {
        sys::ftruncate(meta_fd, META_SIZE as u64).map_err(|e| err("cannot size", &meta_path, e))?;
    }
    let hp = map_shared(meta_fd, META_SIZE, libc::PROT_READ | libc::PROT_WRITE)
        .map_err(|e| err("cannot map", &meta_path, e))? as *mut Header;
    // SAFETY: META_SIZE bytes mapped shared; Header fits (static assert).
    let hdr = unsafe { &mut *hp };
    let unmap = || {
        // SAFETY: our mapping.
        let _ = unsafe { sys::munmap(hp as *mut _, META_SIZE) };
    };
    if let Err(e) = prepare(base, meta_fd, hdr, id, backing_fd, opt) {
        unmap();
        return Err(e);
    }
    // Take a free slot and hold its liveness lock.
    let slot = (0..SLOTS).find(|&i| hdr.slots[i].pid.load(Ordering::Relaxed) == 0);
    let Some(slot) = slot else {
        unmap();
        return Err(format!("{meta_path}: all {SLOTS} process slots are in use"));
    };
    if let Err(e) = sys::ofd_lock(
        meta_fd,
        libc::F_OFD_SETLK,
        libc::F_WRLCK,
        SLOT_LOCK_BASE + slot as i64,
        1,
    ) {
        unmap();
        return Err(err("cannot lock a slot of", &meta_path, e));
    }
    hdr.slots[slot].flags.store(0, Ordering::Relaxed);
    hdr.slots[slot].pid.store(sys::getpid(), Ordering::Relaxed);
    hdr.emulated.store(opt.emulated as u32, Ordering::Relaxed);
    hdr.set_path(&opt.path);
    Ok(Shadow {
        base: base.to_string(),
        meta_fd: meta_fd.into(),
        header: hp,
        slot: slot.into(),
        data: OnceLock::new(),
    })
}

fn init_header(base: &str, hdr: &mut Header, id: FileId, backing_fd: i32) {
    hdr.magic.store(0, Ordering::Release);
    let _ = sys::unlink(&cstr(base)); // data left by an older header
    hdr.version = VERSION;
    hdr.slot_count = SLOTS as u32;
    hdr.dev = id.dev;
    hdr.ino = id.ino;
    hdr.gen_sec = id.gen_sec;
    hdr.gen_nsec = id.gen_nsec as u64;
    hdr.data_valid.store(0, Ordering::Relaxed);
    clear_slots(hdr);
    // SAFETY: the header is invalid (magic 0) and we hold the attach lock.
    unsafe { hdr.init_locks() };
    hdr.lazy.store(0, Ordering::Relaxed);
    hdr.no_evict.store(0, Ordering::Relaxed);
    if let Ok(st) = backing_state(backing_fd) {
        hdr.record(st.0, st.1, st.2);
    }
    hdr.magic.store(MAGIC, Ordering::Release);
}

fn clear_slots(hdr: &Header) {
    for s in hdr.slots.iter() {
        s.pid.store(0, Ordering::Relaxed);
        s.flags.store(0, Ordering::Relaxed);
    }
}

/// Under the attach lock: make the shadow valid for the backing file. A
/// shadow nobody is attached to is reconciled (writers died), dropped
/// (backing changed behind the shim's back, nothing unsynced) or kept aside
/// as an orphan (backing changed and unsynced stores exist).
fn prepare(
    base: &str,
    meta_fd: i32,
    hdr: &mut Header,
    id: FileId,
    backing_fd: i32,
    opt: &AttachOptions,
) -> Result<(), String> {
    let valid = hdr.magic.load(Ordering::Acquire) == MAGIC
        && hdr.version == VERSION
        && hdr.dev == id.dev
        && hdr.ino == id.ino
        && hdr.gen_sec == id.gen_sec
        && hdr.gen_nsec == id.gen_nsec as u64;
    if !valid {
        init_header(base, hdr, id, backing_fd);
        return Ok(());
    }
    let mut live = 0;
    let mut dead_writer = false;
    for i in 0..SLOTS {
        let s = &hdr.slots[i];
        if s.pid.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if slot_alive(meta_fd, i) {
            live += 1;
        } else if s.flags.load(Ordering::Relaxed) & SLOT_WRITER != 0 {
            dead_writer = true;
        } else {
            s.pid.store(0, Ordering::Relaxed);
        }
    }
    if live > 0 {
        return Ok(());
    }
    if hdr.data_valid.load(Ordering::Acquire) == 0 {
        // No copy exists: nothing can be stale or unsynced.
        clear_slots(hdr);
        if let Ok(st) = backing_state(backing_fd) {
            hdr.record(st.0, st.1, st.2);
        }
        return Ok(());
    }
    // SAFETY: robust process-shared mutex in the shared header.
    let rc = unsafe { libc::pthread_mutex_lock(&mut hdr.io_lock) };
    let holder_died = rc == libc::EOWNERDEAD;
    if holder_died {
        // SAFETY: we own the mutex after EOWNERDEAD.
        unsafe { libc::pthread_mutex_consistent(&mut hdr.io_lock) };
    }
    let now = backing_state(backing_fd).unwrap_or((u64::MAX, 0, 0));
    let changed = now != hdr.recorded();
    let result = if changed && !holder_died {
        if dead_writer {
            let orphan = format!(
                "{base}.orphan-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            );
            let _ = sys::rename(&cstr(base), &cstr(&orphan));
            warn!(
                "{base}: the backing file was changed without the shim while the shadow \
                 held unsynced stores of a process that died; the shadow was kept as \
                 {orphan} and the backing file is served"
            );
        } else {
            let _ = sys::unlink(&cstr(base));
        }
        hdr.data_valid.store(0, Ordering::Release);
        hdr.lazy.store(0, Ordering::Relaxed);
        hdr.no_evict.store(0, Ordering::Relaxed);
        Ok(())
    } else if dead_writer || holder_died {
        open_owned(base, false).and_then(|data_fd| {
            let r = reconcile(data_fd, backing_fd, opt.emulated, opt.flush)
                .and_then(|()| {
                    // The backing's size is the truth for the shadow.
                    let old = sys::fstat(data_fd)?.st_size as u64;
                    sys::ftruncate(data_fd, now.0)?;
                    if now.0 > old {
                        copy_from_backing(data_fd, backing_fd, old, now.0)?;
                    }
                    Ok(())
                })
                .map_err(|e| err("cannot write back shadow", base, e));
            sys::close(data_fd);
            r
        })
    } else {
        Ok(())
    };
    if result.is_ok() {
        clear_slots(hdr);
        if let Ok(st) = backing_state(backing_fd) {
            hdr.record(st.0, st.1, st.2);
        }
    }
    // SAFETY: we hold the mutex.
    unsafe { libc::pthread_mutex_unlock(&mut hdr.io_lock) };
    result
}

fn open_ro(base: &str, data_fd: i32) -> Result<i32, String> {
    // Through /proc so that it is the very file we checked.
    let p = cstr(&format!("/proc/self/fd/{data_fd}"));
    sys::open(&p, libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| err("cannot reopen read-only", base, e))
}

/// Holds one of the shadow's robust locks (io or fill).
pub struct HeaderLockGuard {
    m: *mut libc::pthread_mutex_t,
}

impl Drop for HeaderLockGuard {
    fn drop(&mut self) {
        // SAFETY: we hold the mutex (see `lock_robust`), whose header stays
        // mapped while the Shadow lives, which outlives the guard's users.
        unsafe { libc::pthread_mutex_unlock(self.m) };
    }
}

pub type IoGuard = HeaderLockGuard;

/// Locks a robust process-shared mutex of the header; a holder that died
/// leaves it consistent-able (its work is re-checked by the callers).
///
/// # Safety
/// `m` points into the mapped header of a live Shadow.
unsafe fn lock_robust(m: *mut libc::pthread_mutex_t) -> HeaderLockGuard {
    // SAFETY: per the function contract.
    unsafe {
        if libc::pthread_mutex_lock(m) == libc::EOWNERDEAD {
            libc::pthread_mutex_consistent(m);
        }
    }
    HeaderLockGuard { m }
}

impl Shadow {
    pub fn meta_fd(&self) -> i32 {
        self.meta_fd.load(Ordering::Relaxed)
    }

    pub fn slot(&self) -> usize {
        self.slot.load(Ordering::Relaxed)
    }

    pub fn header(&self) -> &Header {
        // SAFETY: mapped for the life of self.
        unsafe { &*self.header }
    }

    pub fn io_lock(&self) -> IoGuard {
        // SAFETY: robust process-shared mutex in the mapped header.
        unsafe { lock_robust(&raw mut (*self.header).io_lock) }
    }

    /// See [`Header::fill_lock`]. Taken after the io lock, never before.
    pub fn fill_lock(&self) -> HeaderLockGuard {
        // SAFETY: robust process-shared mutex in the mapped header.
        unsafe { lock_robust(&raw mut (*self.header).fill_lock) }
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

    /// Records the backing's size and mtime after the shim changed it. Call
    /// with the io lock held.
    pub fn record_backing(&self, backing_fd: i32) {
        if let Ok((s, m, n)) = backing_state(backing_fd) {
            self.header().record(s, m, n);
        }
    }

    pub fn mark_writer(&self) {
        self.header().slots[self.slot()]
            .flags
            .fetch_or(SLOT_WRITER, Ordering::Relaxed);
    }

    pub fn is_writer(&self) -> bool {
        self.header().slots[self.slot()]
            .flags
            .load(Ordering::Relaxed)
            & SLOT_WRITER
            != 0
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
        if lock_attach(self.meta_fd()).is_err() {
            return;
        }
        let h = self.header();
        for i in 0..SLOTS {
            if i != self.slot()
                && h.slots[i].pid.load(Ordering::Relaxed) != 0
                && !slot_alive(self.meta_fd(), i)
            {
                h.slots[i].flags.store(0, Ordering::Relaxed);
                h.slots[i].pid.store(0, Ordering::Relaxed);
            }
        }
        unlock_attach(self.meta_fd());
    }

    /// This process's descriptors of the data file, if the data exists.
    pub fn data(&self) -> Option<(i32, i32)> {
        if let Some(d) = self.data.get() {
            return Some(*d);
        }
        if self.header().data_valid.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.open_data().ok()
    }

    fn open_data(&self) -> Result<(i32, i32), String> {
        let fd = open_owned(&self.base, false)?;
        let ro = match open_ro(&self.base, fd) {
            Ok(ro) => ro,
            Err(e) => {
                sys::close(fd);
                return Err(e);
            }
        };
        if self.data.set((fd, ro)).is_err() {
            // Another thread was first.
            sys::close(fd);
            sys::close(ro);
        }
        Ok(*self.data.get().expect("set above"))
    }

    /// The data file, created from the backing if no process mapped the file
    /// yet. Creation holds the io lock, so no write(2) of any process runs
    /// between the copy and the moment the data becomes valid.
    ///
    /// `lazy`: the caller handles missing pages of its mappings (userfaultfd),
    /// so a new data file starts as holes — unless the file is small, where
    /// copying it costs less than a few round trips to the fault thread.
    /// Otherwise the copy is complete before it returns, holes of a lazy
    /// data file included.
    pub fn ensure_data(&self, backing_fd: i32, lazy: bool) -> Result<(i32, i32), String> {
        let h = self.header();
        if let Some(d) = self.data() {
            if lazy || h.no_evict.load(Ordering::Acquire) != 0 || !self.is_lazy() {
                return Ok(d);
            }
        }
        let _io = self.io_lock();
        if h.data_valid.load(Ordering::Acquire) != 0 {
            let d = self.open_data()?;
            if !lazy && self.is_lazy() && h.no_evict.load(Ordering::Acquire) == 0 {
                let _fill = self.fill_lock();
                fill_holes(d.0, backing_fd)
                    .map_err(|e| err("cannot fill shadow", &self.base, e))?;
                h.no_evict.store(1, Ordering::Release);
            }
            return Ok(d);
        }
        let _ = sys::unlink(&cstr(&self.base));
        let fd = open_owned(&self.base, true)?;
        let create_lazy =
            lazy && backing_state(backing_fd).is_ok_and(|(size, _, _)| size >= LAZY_MIN_SIZE);
        let filled = backing_state(backing_fd).and_then(|(size, _, _)| {
            if create_lazy {
                sys::ftruncate(fd, size)
            } else {
                fill_from_backing(fd, backing_fd, size)
            }
        });
        if let Err(e) = filled {
            sys::close(fd);
            let _ = sys::unlink(&cstr(&self.base));
            return Err(err("cannot fill shadow", &self.base, e));
        }
        self.record_backing(backing_fd);
        sys::close(fd);
        h.lazy.store(create_lazy as u32, Ordering::Release);
        h.no_evict.store(!create_lazy as u32, Ordering::Release);
        h.data_valid.store(1, Ordering::Release);
        crate::stats::add(&crate::stats::STATS.shadows_created, 1);
        self.open_data()
    }

    /// Detaches. With `synced`, this process left nothing unsynced; if it is
    /// the last one attached and no dead writer remains, the shadow files
    /// are removed (the backing holds everything).
    pub fn detach(&self, synced: bool, backing_fd: i32, opt: &AttachOptions) {
        let h = self.header();
        let locked = lock_attach(self.meta_fd()).is_ok();
        if synced {
            h.slots[self.slot()].flags.store(0, Ordering::Relaxed);
            h.slots[self.slot()].pid.store(0, Ordering::Relaxed);
        }
        let _ = sys::ofd_lock(
            self.meta_fd(),
            libc::F_OFD_SETLK,
            libc::F_UNLCK,
            SLOT_LOCK_BASE + self.slot() as i64,
            1,
        );
        if locked {
            let mut live = false;
            let mut dead_writer = false;
            for i in 0..SLOTS {
                if h.slots[i].pid.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                if slot_alive(self.meta_fd(), i) {
                    live = true;
                } else if h.slots[i].flags.load(Ordering::Relaxed) & SLOT_WRITER != 0 {
                    dead_writer = true;
                }
            }
            if !live && dead_writer && backing_fd >= 0 {
                let _g = self.io_lock();
                let reconciled = match self.data() {
                    Some((fd, _)) => reconcile(fd, backing_fd, opt.emulated, opt.flush).is_ok(),
                    None => true,
                };
                if reconciled {
                    dead_writer = false;
                    self.record_backing(backing_fd);
                }
            }
            if !live && !dead_writer {
                let _ = sys::unlink(&cstr(&self.base));
                let _ = sys::unlink(&cstr(&format!("{}.meta", self.base)));
            }
            unlock_attach(self.meta_fd());
        }
    }

    /// Unmaps the header and closes the descriptors (after `detach`).
    pub fn release(&self) {
        // SAFETY: our mapping of the header.
        let _ = unsafe { sys::munmap(self.header as *mut _, META_SIZE) };
        if let Some((fd, ro)) = self.data.get() {
            sys::close(*fd);
            sys::close(*ro);
        }
        sys::close(self.meta_fd());
    }

    /// In a forked child: the inherited meta descriptor shares the parent's
    /// open file description (and slot lock). Take a slot of our own.
    pub fn reslot_after_fork(&self) -> Result<(), String> {
        let meta_path = format!("{}.meta", self.base);
        let fd = open_owned(&meta_path, false)?;
        lock_attach(fd).map_err(|e| err("cannot lock", &meta_path, e))?;
        let h = self.header();
        let parent_flags = h.slots[self.slot()].flags.load(Ordering::Relaxed);
        let slot = (0..SLOTS).find(|&i| h.slots[i].pid.load(Ordering::Relaxed) == 0);
        let r = match slot {
            None => Err(format!("{meta_path}: no free process slot")),
            Some(i) => sys::ofd_lock(
                fd,
                libc::F_OFD_SETLK,
                libc::F_WRLCK,
                SLOT_LOCK_BASE + i as i64,
                1,
            )
            .map_err(|e| err("cannot lock a slot of", &meta_path, e))
            .map(|_| {
                h.slots[i].flags.store(parent_flags, Ordering::Relaxed);
                h.slots[i].pid.store(sys::getpid(), Ordering::Relaxed);
                i
            }),
        };
        unlock_attach(fd);
        match r {
            Ok(i) => {
                sys::close(self.meta_fd());
                self.meta_fd.store(fd, Ordering::Relaxed);
                self.slot.store(i, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                sys::close(fd);
                Err(e)
            }
        }
    }
}
