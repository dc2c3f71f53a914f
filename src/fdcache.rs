//! A few descriptors kept open per process, for files the shim would
//! otherwise hold one for each: the program's descriptor limit is the
//! program's (issue: "The shim spends none of the program's resources").
//! A [`SharedFd`] keeps its descriptor open while a caller uses it; one
//! that falls out of its cache (least recently used) is closed with its
//! last holder, and reopened by its owner on the next use.

use crate::lock::Lock;
use crate::sys::HeldFd;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An open descriptor, held while used (a [`HeldFd`]: high-numbered, and
/// out of reach of the program's close calls).
#[derive(Clone)]
pub struct SharedFd(Arc<HeldFd>);

impl SharedFd {
    pub fn new(fd: OwnedFd) -> SharedFd {
        SharedFd(Arc::new(HeldFd::new(fd)))
    }

    /// The descriptor, valid while this handle lives.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// The descriptor number, valid while this handle lives.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Cache keys, unique in the process.
pub fn new_key() -> u64 {
    new_keys(1)
}

/// `n` consecutive cache keys, unique in the process: the first.
pub fn new_keys(n: u64) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(n, Ordering::Relaxed)
}

/// At most `max` open descriptors, least recently used first. Its lock is a
/// leaf lock (held across fork by the atfork handlers): no other lock is
/// taken inside, and descriptors are opened and closed outside it.
pub struct FdCache {
    slots: Lock<Vec<(u64, SharedFd)>>,
    max: usize,
}

impl FdCache {
    pub const fn new(max: usize) -> FdCache {
        FdCache {
            slots: Lock::new(Vec::new()),
            max,
        }
    }

    /// The cached descriptor of `key`, now the most recently used.
    pub fn get(&self, key: u64) -> Option<SharedFd> {
        let mut c = self.slots.lock();
        let i = c.iter().position(|e| e.0 == key)?;
        let e = c.remove(i);
        let d = e.1.clone();
        c.push(e);
        Some(d)
    }

    /// The descriptor of `key`, opened with `open` if it is not cached.
    pub fn get_or_open<E>(
        &self,
        key: u64,
        open: impl FnOnce() -> Result<OwnedFd, E>,
    ) -> Result<SharedFd, E> {
        if let Some(d) = self.get(key) {
            return Ok(d);
        }
        Ok(self.insert(key, open()?))
    }

    /// Caches `fd` for `key` (unless another thread was first: its
    /// descriptor is kept and `fd` closed).
    pub fn insert(&self, key: u64, fd: OwnedFd) -> SharedFd {
        let d = SharedFd::new(fd);
        let evicted = {
            let mut c = self.slots.lock();
            if let Some(e) = c.iter().find(|e| e.0 == key) {
                return e.1.clone();
            }
            c.push((key, d.clone()));
            (c.len() > self.max).then(|| c.remove(0))
        };
        drop(evicted);
        d
    }

    /// Forgets `key` (its descriptor closes with its last holder).
    pub fn forget(&self, key: u64) {
        let gone = {
            let mut c = self.slots.lock();
            c.iter().position(|e| e.0 == key).map(|i| c.remove(i))
        };
        drop(gone);
    }

    /// How many descriptors are cached.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.lock().len()
    }

    pub fn hold_for_fork(&self) {
        std::mem::forget(self.slots.lock());
    }

    /// # Safety
    /// After [`FdCache::hold_for_fork`], in the parent or the child.
    pub unsafe fn release_after_fork(&self) {
        // SAFETY: per contract.
        unsafe { self.slots.force_unlock() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> Result<OwnedFd, ()> {
        std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|_| ())
    }

    #[test]
    fn keeps_at_most_max_and_closes_evicted_with_their_last_holder() {
        let c = FdCache::new(2);
        let a = c.get_or_open(1, devnull).unwrap();
        let _b = c.get_or_open(2, devnull).unwrap();
        let raw_a = a.raw();
        let _c = c.get_or_open(3, devnull).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.get(1).is_none(), "the least recently used is evicted");
        // Still held here: still open.
        assert!(crate::sys::fstat(raw_a).is_ok());
        drop(a);
        assert!(c.get(2).is_some() && c.get(3).is_some());
    }

    #[test]
    fn a_use_makes_an_entry_recent() {
        let c = FdCache::new(2);
        c.get_or_open(1, devnull).unwrap();
        c.get_or_open(2, devnull).unwrap();
        c.get(1);
        c.get_or_open(3, devnull).unwrap();
        assert!(c.get(1).is_some() && c.get(2).is_none());
        c.forget(1);
        assert!(c.get(1).is_none());
    }
}
