//! Exit and fork: write back and detach every file at exit, keep locks and
//! tracking right across fork.

use crate::fdtable::FD_BITS;
use crate::file::FileState;
use crate::ranges::RangeSet;
use crate::registry::*;
use crate::shadow::Detach;
use crate::sys::{self, Errno};
use crate::track::{self, Stores};
use crate::writeback::{unmap_views, Durability, Scope};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `FileState::finishing` once the file is written back and detached.
const FINISHED: i32 = -1;

/// Files being finished right now, by any thread. A thread dropping the
/// last reference finishes the file in `Drop`, where no weak reference can
/// reach it any more: exit waits for those ([`shutdown`]).
static FINISHING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl FileState {
    /// Writes back what is pending and detaches from the shadow, once. The
    /// header and descriptors stay until the FileState is dropped: at exit
    /// the fault thread may still hold a reference and touch them.
    fn finish(&self) {
        let me = sys::gettid();
        if let Err(t) = self
            .finishing
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
        {
            // Done (-1), or this thread's own; or another thread (dropping
            // the last reference: the fault thread, a view leaving the
            // graveyard) is writing it back, and the process must not exit
            // under it (exit_group would cut a failure-atomic commit short,
            // and its stores would be lost).
            let mut t = t;
            while t != FINISHED && t != me {
                std::thread::sleep(std::time::Duration::from_millis(1));
                t = self.finishing.load(Ordering::Acquire);
            }
            return;
        }
        FINISHING.fetch_add(1, Ordering::AcqRel);
        let synced = {
            let full = (!track::tracker().is_exact() || self.untracked.load(Ordering::Relaxed))
                && self.shadow.is_writer();
            self.write_back_dirty(
                RangeSet::new(),
                0..u64::MAX,
                if full { Scope::WholeFile } else { Scope::Dirty },
                Durability::Complete,
            )
            .is_ok()
        };
        crate::watcher::unwatch(self);
        unmap_views(&mut self.inner.lock());
        // Without a descriptor (renamed away with none open) the detach
        // cannot write back: the data stays in the shadow for the next
        // process that opens the file.
        let backing = self.backing().ok();
        self.shadow.detach(
            if synced {
                Detach::Synced
            } else {
                Detach::Unsynced
            },
            backing.as_ref().map_or(-1, |b| b.raw()),
            &attach_options(self.emulated, &self.path),
        );
        debug!("detached {}", self.path);
        self.finishing.store(FINISHED, Ordering::Release);
        FINISHING.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for FileState {
    /// The last reference is gone: write back what is pending, detach.
    fn drop(&mut self) {
        self.finish();
        // The shadow's header, descriptors and views go with the fields.
    }
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
    // Files no longer registered but still alive (a view in the SIGBUS
    // handler's graveyard holds the last reference until the next table is
    // published): their stores were never written back. A failure-atomic
    // file's were lost so (the next attacher dropped them as a dead
    // writer's).
    let alive: Vec<Arc<FileState>> = ATTACHED.lock().iter().filter_map(|w| w.upgrade()).collect();
    for f in &alive {
        f.finish();
    }
    drop(alive);
    // And those another thread is finishing in `Drop` (bounded: a thread
    // stuck there must not keep the process from exiting).
    let t0 = std::time::Instant::now();
    while FINISHING.load(Ordering::Acquire) > 0 && t0.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Nothing is attached any more: this process's presence file goes (a
    // file the fault thread still holds for a moment is detached already).
    crate::shadow::remove_presence();
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
        let Ok(backing) = m.file.backing() else {
            continue;
        };
        // SAFETY: replaces our own shadow mapping at the same place; the
        // registry forgets it right after.
        let r = unsafe {
            sys::mmap(
                m.start as *mut _,
                m.len,
                m.prot,
                flags,
                backing.raw(),
                m.off as i64,
            )
        };
        if let Err(e) = r {
            debug!("{}: cannot retire a lazy mapping at exit: {e}", m.file.path);
        }
    }
}

/// pthread_atfork handlers: no lock of ours may be held across fork.
///
/// Locks that threads take without `REG` (the fault thread: a file's chunk
/// bits, its shadow's residency probe, the list of filled chunks; the read
/// hooks: the probe) are held across fork too: a copy held by a thread the
/// child does not have would never be released there (found in the DAX
/// guest: a child's first store waited forever on its own fault thread).
/// No holder of them waits for `REG` or `inner`, so taking them here after
/// those cannot deadlock.
pub fn atfork_prepare() {
    let a = ATTACHING.lock();
    std::mem::forget(a);
    let reg = REG.lock();
    for f in reg.files.iter() {
        std::mem::forget(f.inner.lock());
        f.lazy_chunks.hold_for_fork();
        f.shadow.hold_for_fork();
    }
    crate::lazy::hold_for_fork();
    track::hold_for_fork();
    crate::shadow::data::hold_data_fds_for_fork();
    crate::persist::redo::hold_lane_fds_for_fork();
    crate::file::Backing::hold_for_fork();
    crate::shadow::hold_presence_for_fork();
    crate::writeback::hold_views_for_fork();
    std::mem::forget(ATTACHED.lock());
    crate::stdio::hold_for_fork();
    crate::watcher::hold_for_fork();
    // Last of all: the holder of any other lock may be allocating (the
    // watcher allocates holding its table: taking the allocator before it
    // deadlocked a fork against the watcher thread).
    crate::alloc::hold_for_fork();
    std::mem::forget(reg);
}

fn atfork_release(child: bool) {
    // SAFETY: atfork_prepare took exactly these locks and forgot the guards.
    unsafe {
        crate::alloc::release_after_fork();
        crate::watcher::release_after_fork();
        crate::stdio::release_after_fork();
        ATTACHED.force_unlock();
        crate::writeback::release_views_after_fork();
        crate::shadow::release_presence_after_fork();
        crate::file::Backing::release_after_fork();
        crate::shadow::data::release_data_fds_after_fork();
        crate::persist::redo::release_lane_fds_after_fork();
        track::release_after_fork(child);
        crate::lazy::release_after_fork(child);
        for f in REG.data_unchecked().files.iter() {
            f.shadow.release_after_fork();
            f.lazy_chunks.release_after_fork();
            f.inner.force_unlock();
        }
        REG.force_unlock();
        ATTACHING.force_unlock();
    }
}

pub fn atfork_parent() {
    atfork_release(false);
}

pub fn atfork_child() {
    atfork_release(true);
    // The inherited presence is the parent's; the child's slots get its own.
    crate::shadow::forget_presence_after_fork();
    let files: Vec<Arc<FileState>> = REG.lock().files.clone();
    for f in &files {
        f.sync_lock.reset_after_fork();
        if let Err(e) = f.shadow.reslot_after_fork() {
            warn!("{}: {e}", f.path);
        }
        if f.shadow.is_atomic() {
            // The parent's writes are the parent's to sync: a child that
            // closes the file (before an exec) must not commit them, nor
            // count as a writer unless it can store through a mapping.
            f.inner.lock().pending = RangeSet::new();
            let stores = REG
                .lock()
                .maps
                .values()
                .any(|m| Arc::ptr_eq(&m.file, f) && m.shared && m.prot & libc::PROT_WRITE != 0);
            if !stores {
                f.shadow.clear_writer();
            }
        }
        // The region traps inherited mark stores as the parent's: as ours
        // now, and what the parent had open is open here too.
        if let Some(table) = f.shadow.marks_table_if_mapped() {
            track::uffd::remark_after_fork(table, f.shadow.slot());
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
    // The parent's watcher is not the child's: watch again, afresh.
    crate::watcher::forget_after_fork();
    for f in files.iter().filter(|f| f.shadow.data().is_some()) {
        crate::watcher::watch(f);
    }
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
            if m.fill.is_some() && !track::uffd::sigbus_mode() {
                m.fill = None; // the fault thread serves it now
            }
            let in_thread = m.fill.is_some();
            if r.and_then(|()| {
                track::tracker().register_lazy(
                    m.start,
                    m.len,
                    Stores::tracked_if(m.tracked),
                    in_thread,
                )
            })
            .is_ok()
            {
                continue;
            }
            // Nobody would fill its holes: fill them all now and track it
            // the ordinary way.
            m.lazy = false;
            m.fill = None;
            lazy_failed.push(m.file.clone());
        }
        if m.tracked && tracking {
            let within = m.file.mapped_inside(m.off, m.len);
            if let Err(e) = track::tracker().track(m.start, m.len, within) {
                warn!(
                    "cannot track a mapping of {} in the child: {e}",
                    m.file.path
                );
                track::force_compare();
            }
        }
    }
    crate::registry::publish_spans(&reg);
    drop(reg);
    for f in lazy_failed {
        let filled = f.backing().map_err(|e| e.to_string()).and_then(|b| {
            f.shadow
                .ensure_data(b.raw(), crate::shadow::Fill::Eager)
                .map_err(String::from)
        });
        if let Err(e) = filled {
            error!(
                "{}: cannot fill the shadow in the forked child: {e}",
                f.path
            );
        }
    }
}
