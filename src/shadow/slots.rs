//! The slot protocol: each attached process owns a slot of the header and
//! holds an exclusive OFD lock on that slot's byte of the meta file; the
//! kernel drops it when the process dies, however it dies, so `F_OFD_GETLK`
//! tells whether a slot's owner lives. Slots are taken, scanned and freed
//! under the attach lock (another byte of the meta file).

use super::header::{Header, ATTACH_LOCK_BYTE, SLOTS, SLOT_LOCK_BASE, SLOT_WRITER};
use crate::sys::{self, Errno, Failure, SysResult};
use std::sync::atomic::Ordering;

/// Holds the attach lock of a meta file (released when dropped).
pub(super) struct AttachLock {
    fd: i32,
}

impl AttachLock {
    /// Waits for the attach lock of the meta file `fd`.
    pub(super) fn take(fd: i32) -> SysResult<AttachLock> {
        sys::ofd_lock(fd, libc::F_OFD_SETLKW, libc::F_WRLCK, ATTACH_LOCK_BYTE, 1)?;
        Ok(AttachLock { fd })
    }
}

impl Drop for AttachLock {
    fn drop(&mut self) {
        let _ = sys::ofd_lock(
            self.fd,
            libc::F_OFD_SETLK,
            libc::F_UNLCK,
            ATTACH_LOCK_BYTE,
            1,
        );
    }
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

/// Who holds the slots other than `own` (one scan, under the attach lock).
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

/// Scans every used slot.
pub(super) fn census(h: &Header, meta_fd: i32, dead_readers: DeadReaders) -> Census {
    let mut c = Census::default();
    for (i, s) in h.slots.iter().enumerate() {
        if s.pid.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if slot_alive(meta_fd, i) {
            c.live += 1;
        } else if s.flags.load(Ordering::Relaxed) & SLOT_WRITER != 0 {
            c.dead_writer = true;
        } else if dead_readers == DeadReaders::Free {
            s.pid.store(0, Ordering::Relaxed);
        }
    }
    c
}

/// Takes a free slot for this process and holds its liveness lock through
/// `meta_fd`; `flags` are the slot's initial flags. Call under the attach
/// lock.
pub(super) fn take_slot(
    h: &Header,
    meta_fd: i32,
    flags: u32,
    meta_path: &str,
) -> Result<usize, Failure> {
    let Some(i) = (0..SLOTS).find(|&i| h.slots[i].pid.load(Ordering::Relaxed) == 0) else {
        return Err(Failure::new(
            Errno(libc::EUSERS),
            format!("{meta_path}: all {SLOTS} process slots are in use"),
        ));
    };
    sys::ofd_lock(
        meta_fd,
        libc::F_OFD_SETLK,
        libc::F_WRLCK,
        SLOT_LOCK_BASE + i as i64,
        1,
    )
    .map_err(|e| Failure::new(e, format!("cannot lock a slot of {meta_path}: {e}")))?;
    h.slots[i].flags.store(flags, Ordering::Relaxed);
    h.slots[i].pid.store(sys::getpid(), Ordering::Relaxed);
    Ok(i)
}

/// Drops the liveness lock of slot `i` (the slot itself stays marked).
pub(super) fn unlock_slot(meta_fd: i32, i: usize) {
    let _ = sys::ofd_lock(
        meta_fd,
        libc::F_OFD_SETLK,
        libc::F_UNLCK,
        SLOT_LOCK_BASE + i as i64,
        1,
    );
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
pub(super) fn clear_dead_writers(h: &Header, meta_fd: i32, own: usize) {
    let Ok(_attach) = AttachLock::take(meta_fd) else {
        return;
    };
    for i in 0..SLOTS {
        if i != own && h.slots[i].pid.load(Ordering::Relaxed) != 0 && !slot_alive(meta_fd, i) {
            free_slot(h, i);
        }
    }
}
