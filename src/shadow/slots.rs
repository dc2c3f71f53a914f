//! The slot protocol: each attached process owns a slot of the header,
//! marked with its tag; the process holds an exclusive OFD lock on its
//! presence file (`live-<tag>` in the shadow directory) for its whole life,
//! which the kernel drops when it dies, however it dies, so a slot's owner
//! lives while that lock is held ([`Slot::alive`]). One descriptor per
//! process, whatever the number of files. Slots are taken, scanned and
//! freed under the attach lock (a byte of the meta file, locked through a
//! descriptor opened for that moment).

use super::header::{presence_path, Header, ATTACH_LOCK_BYTE, SLOTS, SLOT_LEFT, SLOT_WRITER};
use super::owned::{cstr, err, open_owned, Create};
use crate::lock::Lock;
use crate::sys::{self, Errno, Failure};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

/// Holds the attach lock of a meta file (released when dropped, with the
/// descriptor it was taken through).
pub(super) struct AttachLock {
    fd: OwnedFd,
}

impl AttachLock {
    /// Waits for the attach lock of the meta file `fd`.
    pub(super) fn take(fd: OwnedFd) -> Result<AttachLock, Errno> {
        sys::ofd_lock(
            fd.as_raw_fd(),
            libc::F_OFD_SETLKW,
            libc::F_WRLCK,
            ATTACH_LOCK_BYTE,
            1,
        )?;
        Ok(AttachLock { fd })
    }

    /// Opens the meta file at `path` and waits for its attach lock.
    pub(super) fn take_path(path: &str) -> Result<AttachLock, Failure> {
        let fd = open_owned(path, Create::No)?;
        AttachLock::take(fd).map_err(|e| err("cannot lock", path, e))
    }

    pub(super) fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl Drop for AttachLock {
    fn drop(&mut self) {
        let _ = sys::ofd_lock(
            self.fd.as_raw_fd(),
            libc::F_OFD_SETLK,
            libc::F_UNLCK,
            ATTACH_LOCK_BYTE,
            1,
        );
    }
}

/// This process's presence: its tag and the locked descriptor of its
/// presence file (created at the first attach; a forked child makes its
/// own).
struct Presence {
    tag: u64,
    dir: String,
    fd: Option<sys::HeldFd>,
}

static PRESENCE: Lock<Presence> = Lock::new(Presence {
    tag: 0,
    dir: String::new(),
    fd: None,
});

/// A tag no other process has: time, pid and address-space randomness.
fn new_tag() -> u64 {
    let mut b = [0u8; 8];
    if sys::getrandom(&mut b).is_ok() {
        let t = u64::from_ne_bytes(b);
        if t != 0 {
            return t;
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    now ^ (sys::getpid() as u64) << 40 | 1
}

/// This process's tag, its presence file in `dir` created and locked if it
/// is not yet. Call under the attach lock of some meta file in `dir`.
pub(super) fn presence_tag(dir: &str) -> Result<u64, Failure> {
    let mut p = PRESENCE.lock();
    if p.fd.is_some() && p.dir == dir {
        return Ok(p.tag);
    }
    let tag = new_tag();
    let path = presence_path(dir, tag);
    let fd = sys::open(
        &cstr(&path),
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0o600,
    )
    .map_err(|e| err("cannot create", &path, e))?;
    sys::ofd_lock(fd.as_raw_fd(), libc::F_OFD_SETLK, libc::F_WRLCK, 0, 0)
        .map_err(|e| err("cannot lock", &path, e))?;
    *p = Presence {
        tag,
        dir: dir.to_string(),
        fd: Some(sys::HeldFd::new(fd)),
    };
    Ok(tag)
}

/// This process's tag (0 before its first attach).
pub(super) fn own_tag() -> u64 {
    PRESENCE.lock().tag
}

/// In a forked child: the inherited presence descriptor shares the
/// parent's open file description (its lock is the parent's); the child
/// closes its copy and makes its own presence at its next slot.
pub fn forget_presence_after_fork() {
    let mut p = PRESENCE.lock();
    p.fd = None;
    p.tag = 0;
}

/// At exit, after every shadow was detached: the presence file goes.
pub fn remove_presence() {
    let mut p = PRESENCE.lock();
    if p.fd.take().is_some() {
        let _ = sys::unlink(&cstr(&presence_path(&p.dir, p.tag)));
    }
    p.tag = 0;
}

/// Fork: the presence lock is a leaf lock (see `lifecycle`).
pub fn hold_presence_for_fork() {
    std::mem::forget(PRESENCE.lock());
}

/// # Safety
/// After [`hold_presence_for_fork`], in the parent or the child.
pub unsafe fn release_presence_after_fork() {
    // SAFETY: per contract.
    unsafe { PRESENCE.force_unlock() };
}

/// The shadow directory of the meta file at `meta_path`.
pub(super) fn dir_of(meta_path: &str) -> &str {
    meta_path.rsplit_once('/').map_or(".", |(d, _)| d)
}

/// Who holds the slots other than this process's (one scan, under the
/// attach lock).
#[derive(Default)]
pub(super) struct Census {
    /// Slots whose owner lives.
    pub live: usize,
    /// A dead owner may have left unsynced stores.
    pub dead_writer: bool,
}

/// What a census does with slots of dead processes that never wrote.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DeadReaders {
    /// Free them (attaching).
    Free,
    /// Leave them (detaching: only the next attacher cleans up).
    Keep,
}

/// Scans every used slot; presence files of dead owners are removed.
pub(super) fn census(h: &Header, dir: &str, dead_readers: DeadReaders) -> Census {
    let own = own_tag();
    let mut c = Census::default();
    for s in h.slots.iter() {
        if s.pid.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if s.alive(dir, own) {
            c.live += 1;
            continue;
        }
        let tag = s.tag.load(Ordering::Relaxed);
        if tag != own && s.flags.load(Ordering::Relaxed) & SLOT_LEFT == 0 {
            // Dead: its presence file is litter now.
            let _ = sys::unlink(&cstr(&presence_path(dir, tag)));
        }
        if s.flags.load(Ordering::Relaxed) & SLOT_WRITER != 0 {
            c.dead_writer = true;
        } else if dead_readers == DeadReaders::Free {
            s.pid.store(0, Ordering::Relaxed);
        }
    }
    c
}

/// Takes a free slot for this process; `flags` are the slot's initial
/// flags. Call under the attach lock.
pub(super) fn take_slot(h: &Header, flags: u32, meta_path: &str) -> Result<usize, Failure> {
    let tag = presence_tag(dir_of(meta_path))?;
    let Some(i) = (0..SLOTS).find(|&i| h.slots[i].pid.load(Ordering::Relaxed) == 0) else {
        return Err(Failure::new(
            Errno(libc::EUSERS),
            format!("{meta_path}: all {SLOTS} process slots are in use"),
        ));
    };
    h.slots[i].tag.store(tag, Ordering::Relaxed);
    h.slots[i]
        .flags
        .store(flags & !SLOT_LEFT, Ordering::Relaxed);
    h.slots[i].pid.store(sys::getpid(), Ordering::Relaxed);
    Ok(i)
}

/// This process leaves slot `i` with unsynced stores: from now on it counts
/// as a dead writer's, for the next attacher to reconcile.
pub(super) fn leave_slot(h: &Header, i: usize) {
    h.slots[i].flags.fetch_or(SLOT_LEFT, Ordering::Relaxed);
}

pub(super) fn free_slot(h: &Header, i: usize) {
    h.slots[i].flags.store(0, Ordering::Relaxed);
    h.slots[i].pid.store(0, Ordering::Relaxed);
}

pub(super) fn clear_slots(h: &Header) {
    for i in 0..SLOTS {
        free_slot(h, i);
    }
}

/// After a full-file writeback: slots of dead writers are covered now.
pub(super) fn clear_dead_writers(h: &Header, meta_path: &str, own: usize) {
    let Ok(_attach) = AttachLock::take_path(meta_path) else {
        return;
    };
    let (dir, tag) = (dir_of(meta_path), own_tag());
    for i in 0..SLOTS {
        if i != own && h.slots[i].pid.load(Ordering::Relaxed) != 0 && !h.slots[i].alive(dir, tag) {
            free_slot(h, i);
        }
    }
}
