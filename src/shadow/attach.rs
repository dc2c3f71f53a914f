//! Attaching to a shadow and detaching from it (docs/ARCHITECTURE.md,
//! "Shadow protocol"): under the meta file's attach
//! lock, a shadow nobody is attached to is reconciled (writers died),
//! dropped (the backing changed behind the shim's back, nothing unsynced)
//! or kept aside as an orphan (changed, and unsynced stores exist).

use super::header::*;
use super::owned::{cstr, err, open_or_create_owned, open_owned, Create};
use super::slots::{self, AttachLock, DeadReaders};
use super::{AttachOptions, BackingState, Shadow};
use crate::persist;
use crate::sys::{self, Failure, OwnedMap, SysResult};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

/// Writes back every line of the shadow that differs from the backing
/// (reconciliation after writers died). Durable when it returns Ok.
fn reconcile(base: &str, data_fd: i32, backing_fd: i32, opt: &AttachOptions) -> SysResult<()> {
    let shadow_size = sys::file_size(data_fd)?;
    let backing_size = sys::file_size(backing_fd)?;
    let size = shadow_size.min(backing_size) as usize;
    if size == 0 {
        return Ok(());
    }
    // Lines someone outside the shim changed are not written back.
    let mut lines = super::lines::LinesMap::default();
    let bases = super::lines::map_bases(&format!("{base}.lines"), size as u64, &mut lines);
    let s = OwnedMap::shared(data_fd, size, libc::PROT_READ | libc::PROT_WRITE)?;
    let b = OwnedMap::shared(backing_fd, size, libc::PROT_READ | libc::PROT_WRITE)?;
    // Only pages the data file holds: a hole is either not filled yet (lazy:
    // the backing's bytes) or zeros in the backing too.
    let all = super::data::data_segments(data_fd, 0, size as u64);
    let how = persist::Writeback {
        flush: opt.flush,
        msync_touched: opt.emulated,
        via_fd: (opt.emulated && !opt.writeback_stores).then_some(backing_fd),
        bases: bases.as_ref(),
    };
    let r = persist::write_back(s.addr(), b.addr(), size as u64, &all, &how);
    crate::stats::add(&crate::stats::STATS.reconciles, 1);
    r.map(|_| ())
}

/// Attaches this process to the shadow of `id`, creating, reconciling or
/// rebuilding it as the protocol requires. `backing_fd` must be readable;
/// reconciliation needs it writable.
pub fn attach(
    dir: &str,
    id: FileId,
    backing_fd: i32,
    opt: &AttachOptions,
) -> Result<Shadow, Failure> {
    let base = format!("{dir}/{}", id.key());
    let meta_path = format!("{base}.meta");
    // Open the meta file and hold its attach lock, retrying if a detaching
    // process unlinked it meanwhile.
    // The descriptor is closed again with the lock: the header is used
    // through its mapping, liveness through the process's presence file.
    loop {
        let (meta, created) = open_or_create_owned(&meta_path, Create::Yes)?;
        let lock = AttachLock::take(meta).map_err(|e| err("cannot lock", &meta_path, e))?;
        let linked = match (sys::fstat(lock.fd()), sys::lstat(&cstr(&meta_path))) {
            (Ok(a), Ok(b)) => a.st_ino == b.st_ino && a.st_dev == b.st_dev,
            _ => false,
        };
        if linked {
            let r = attach_locked(&base, lock.fd(), id, backing_fd, opt, created);
            drop(lock);
            return r.map(|(header, slot)| Shadow {
                base,
                header,
                slot: slot.into(),
                key: crate::fdcache::new_key(),
                lane_keys: crate::persist::redo::LaneKeys::new(),
                probe: crate::lock::Lock::new(OwnedMap::default()),
                lines: crate::lock::Lock::new(super::lines::LinesMap::default()),
                marks: crate::lock::Lock::new(OwnedMap::default()),
                marks_addr: Default::default(),
            });
        }
    }
}

fn attach_locked(
    base: &str,
    meta_fd: i32,
    id: FileId,
    backing_fd: i32,
    opt: &AttachOptions,
    created: bool,
) -> Result<(OwnedMap, usize), Failure> {
    let meta_path = format!("{base}.meta");
    let st = sys::fstat(meta_fd).map_err(|e| err("cannot stat", &meta_path, e))?;
    if (st.st_size as usize) < META_SIZE {
        sys::ftruncate(meta_fd, META_SIZE as u64).map_err(|e| err("cannot size", &meta_path, e))?;
    }
    // Its page allocated now: a full shadow file system is an error here,
    // not SIGBUS at the first store into the header.
    sys::fallocate(meta_fd, 0, 0, META_SIZE as u64)
        .map_err(|e| err("cannot allocate", &meta_path, e))?;
    let map = OwnedMap::shared(meta_fd, META_SIZE, libc::PROT_READ | libc::PROT_WRITE)
        .map_err(|e| err("cannot map", &meta_path, e))?;
    // SAFETY: META_SIZE bytes mapped shared for as long as `map`; Header
    // fits (static assert) and is only ever used through shared references.
    let hdr = unsafe { &*(map.addr() as *const Header) };
    prepare(base, hdr, id, backing_fd, opt, created)?;
    if hdr.atomic.load(Ordering::Acquire) != 0 {
        super::atomic::SEEN.store(true, Ordering::Relaxed);
    }
    let slot = slots::take_slot(hdr, 0, &meta_path)?;
    hdr.emulated.store(opt.emulated as u32, Ordering::Relaxed);
    hdr.set_path(&opt.path);
    Ok((map, slot))
}

/// `created`: the meta file is new (this attach made it). Its companions
/// are removed before it at every detach, so only an older header can have
/// left any: a new one spares the three probes (a file opened and closed
/// again and again, such as a journal, attaches each time).
fn init_header(base: &str, hdr: &Header, id: FileId, backing_fd: i32, created: bool) {
    hdr.magic.store(0, Ordering::Release);
    if !created {
        let _ = sys::unlink(&cstr(base)); // data left by an older header
        Shadow::unlink_lines(base);
        Shadow::unlink_regions(base);
    }
    hdr.version.store(VERSION, Ordering::Relaxed);
    hdr.slot_count.store(SLOTS as u32, Ordering::Relaxed);
    hdr.dev.store(id.dev, Ordering::Relaxed);
    hdr.ino.store(id.ino, Ordering::Relaxed);
    hdr.gen_sec.store(id.gen_sec, Ordering::Relaxed);
    hdr.gen_nsec.store(id.gen_nsec as u64, Ordering::Relaxed);
    hdr.data_valid.store(0, Ordering::Relaxed);
    slots::clear_slots(hdr);
    // SAFETY: the header is invalid (magic 0) and we hold the attach lock:
    // nobody uses its locks.
    unsafe { hdr.init_locks() };
    hdr.lazy.store(0, Ordering::Relaxed);
    hdr.no_evict.store(0, Ordering::Relaxed);
    hdr.rec_unsure.store(0, Ordering::Relaxed);
    hdr.atomic.store(0, Ordering::Relaxed);
    hdr.ever_mapped.store(0, Ordering::Relaxed);
    hdr.files_made.store(0, Ordering::Relaxed);
    for w in [
        &hdr.log_gen,
        &hdr.log_applied,
        &hdr.log_size,
        &hdr.log_low,
        &hdr.log_undo_at,
        &hdr.log_durable,
    ] {
        w.store(0, Ordering::Relaxed);
    }
    record(hdr, backing_fd);
    hdr.magic.store(MAGIC, Ordering::Release);
}

fn record(hdr: &Header, backing_fd: i32) {
    if let Ok(b) = BackingState::of(backing_fd) {
        hdr.record(b.size, b.mtime_sec, b.mtime_nsec);
    }
}

/// Renames the data file at `base` to `….orphan-<time>` (shown by `daxshim
/// status`), with a warning saying `why`; the backing file is served.
fn keep_aside(base: &str, why: &str) {
    let orphan = format!(
        "{base}.orphan-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    if sys::rename(&cstr(base), &cstr(&orphan)).is_ok() {
        Shadow::unlink_lines(base);
        warn!("{base}: {why}; the shadow was kept as {orphan} and the backing file is served");
    }
}

/// Under the attach lock: make the shadow valid for the backing file.
fn prepare(
    base: &str,
    hdr: &Header,
    id: FileId,
    backing_fd: i32,
    opt: &AttachOptions,
    created: bool,
) -> Result<(), Failure> {
    if !hdr.describes(id) {
        if hdr.magic.load(Ordering::Acquire) == MAGIC
            && hdr.version.load(Ordering::Relaxed) != VERSION
            && hdr.data_valid.load(Ordering::Acquire) != 0
        {
            // A copy made by another version of the shim (whose slots this
            // one cannot read): it may hold a dead writer's unsynced
            // stores, so it is kept aside, never dropped.
            keep_aside(
                base,
                "the shadow was made by another version of daxshim and may hold unsynced stores",
            );
        }
        init_header(base, hdr, id, backing_fd, created);
        return recover_log(base, hdr, backing_fd, opt);
    }
    let census = slots::census(hdr, slots::dir_of(base), DeadReaders::Free);
    if census.live > 0 {
        if opt.atomic && hdr.atomic.load(Ordering::Acquire) == 0 {
            // SAFETY: the header is mapped for the rest of this function.
            let _io = unsafe { super::owned::lock_robust(hdr.io_lock.get()) };
            super::atomic::start_attached(hdr, &opt.path, backing_fd)
                .map_err(|e| err("cannot start the atomic log of", &opt.path, e))?;
        }
        return Ok(());
    }
    if hdr.data_valid.load(Ordering::Acquire) == 0 {
        // No copy exists: nothing can be stale or unsynced.
        slots::clear_slots(hdr);
        recover_log(base, hdr, backing_fd, opt)?;
        record(hdr, backing_fd);
        return Ok(());
    }
    let atomic = opt.atomic || hdr.atomic.load(Ordering::Acquire) != 0;
    // SAFETY: the header is mapped for the rest of this function (the
    // caller's `map`), which outlives the guard.
    let io = unsafe { super::owned::lock_robust(hdr.io_lock.get()) };
    let now = BackingState::of(backing_fd);
    let changed = !now.as_ref().is_ok_and(|b| b.is_recorded_in(hdr));
    let now_size = now.map(|b| b.size).unwrap_or(u64::MAX);
    let result = if atomic && (census.dead_writer || io.owner_died()) {
        // Failure-atomic: what a process that died stored since its last
        // sync is dropped (the log takes the file back to that sync).
        drop_copy(base, hdr);
        Ok(())
    } else if changed && !io.owner_died() {
        if census.dead_writer {
            keep_aside(
                base,
                "the backing file was changed without the shim while the shadow held \
                 unsynced stores of a process that died",
            );
        } else {
            let _ = sys::unlink(&cstr(base));
            Shadow::unlink_lines(base);
        }
        hdr.data_valid.store(0, Ordering::Release);
        hdr.lazy.store(0, Ordering::Relaxed);
        hdr.no_evict.store(0, Ordering::Relaxed);
        Ok(())
    } else if census.dead_writer || io.owner_died() {
        open_owned(base, Create::No).and_then(|data| {
            let data_fd = data.as_raw_fd();
            reconcile(base, data_fd, backing_fd, opt)
                .and_then(|()| {
                    // The backing's size is the truth for the shadow.
                    let old = sys::file_size(data_fd)?;
                    sys::ftruncate(data_fd, now_size)?;
                    if now_size > old {
                        super::data::copy_from_backing(data_fd, backing_fd, old, now_size)?;
                    }
                    Ok(())
                })
                .map_err(|e| err("cannot write back shadow", base, e))
        })
    } else {
        Ok(())
    };
    let result = result.and_then(|()| {
        slots::clear_slots(hdr);
        recover_log(base, hdr, backing_fd, opt)?;
        record(hdr, backing_fd);
        Ok(())
    });
    drop(io);
    result
}

/// Removes the data file and its bases: the backing is served again.
fn drop_copy(base: &str, hdr: &Header) {
    hdr.ever_mapped.store(0, Ordering::Relaxed);
    let _ = sys::unlink(&cstr(base));
    Shadow::unlink_lines(base);
    Shadow::unlink_regions(base);
    hdr.data_valid.store(0, Ordering::Release);
    hdr.lazy.store(0, Ordering::Relaxed);
    hdr.no_evict.store(0, Ordering::Relaxed);
}

/// Nobody attached: the atomic log (if the file has one) takes the file
/// back to its last committed sync, and a new period starts if this
/// process asks for atomic mode. A process that asks for it and cannot have
/// it fails to attach (it must not get other semantics silently).
fn recover_log(
    base: &str,
    hdr: &Header,
    backing_fd: i32,
    opt: &AttachOptions,
) -> Result<(), Failure> {
    match super::atomic::recover_unattached(hdr, &opt.path, backing_fd, opt.atomic) {
        Ok(_) => Ok(()),
        Err(e) if opt.atomic => Err(err(
            "cannot recover or start the atomic log of",
            &opt.path,
            e,
        )),
        Err(e) => {
            warn!(
                "{}: cannot recover its atomic log ({e}); run `daxshim recover` with write access ({base})",
                opt.path
            );
            Ok(())
        }
    }
}

/// Whether this process left anything unsynced when it detaches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// Everything written back: the slot is freed.
    Synced,
    /// The slot stays marked, so the next attacher reconciles.
    Unsynced,
}

impl Shadow {
    /// Detaches. If this process is the last one attached and no dead writer
    /// remains, the shadow files are removed (the backing holds everything).
    pub fn detach(&self, how: Detach, backing_fd: i32, opt: &AttachOptions) {
        let h = self.header();
        if let Ok(st) = sys::fstat(backing_fd) {
            self.clear_own_marks(st.st_size as u64);
        }
        let lock = AttachLock::take_path(&self.meta_path());
        match how {
            Detach::Synced => slots::free_slot(h, self.slot()),
            Detach::Unsynced => slots::leave_slot(h, self.slot()),
        }
        let Ok(_attach) = lock else {
            return;
        };
        let census = slots::census(h, slots::dir_of(&self.base), DeadReaders::Keep);
        let mut dead_writer = census.dead_writer;
        let atomic = self.is_atomic();
        // Failure-atomic: unsynced stores are not written back here; the
        // next attacher drops them and recovers the log.
        if census.live == 0 && dead_writer && !atomic {
            let _io = self.io_lock();
            let reconciled = match self.data() {
                Some(d) => reconcile(&self.base, d.fd().as_raw_fd(), backing_fd, opt).is_ok(),
                None => true,
            };
            if reconciled {
                dead_writer = false;
                self.record_backing(backing_fd);
            }
        }
        if census.live == 0 && !dead_writer {
            if atomic {
                super::atomic::close(h, backing_fd);
            }
            if h.files_made.load(Ordering::Acquire) != 0 {
                let _ = sys::unlink(&cstr(&self.base));
                Shadow::unlink_lines(&self.base);
                Shadow::unlink_regions(&self.base);
            }
            let _ = sys::unlink(&cstr(&format!("{}.meta", self.base)));
        }
    }

    /// In a forked child (after `slots::forget_presence_after_fork`): the
    /// parent's slot is the parent's. Take a slot of our own, with the
    /// parent's flags (the child has the parent's unsynced stores too).
    pub fn reslot_after_fork(&self) -> Result<(), String> {
        let meta_path = self.meta_path();
        let attach = AttachLock::take_path(&meta_path)?;
        let h = self.header();
        let parent_flags = h.slots[self.slot()].flags.load(Ordering::Relaxed) & !SLOT_EVICTING;
        let slot = slots::take_slot(h, parent_flags, &meta_path)?;
        drop(attach);
        self.slot.store(slot, Ordering::Relaxed);
        Ok(())
    }
}
