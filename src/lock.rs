//! A small futex mutex whose state can be reset in a forked child.
//!
//! std's `Mutex` cannot be reset; after `fork` a lock held by a thread that
//! does not exist in the child would block forever. The atfork child handler
//! calls [`Lock::reset_after_fork`] on locks that protect no half-updated data.
//!
//! # Safety
//! The `UnsafeCell` is only reached through a [`LockGuard`], which exists only
//! while the lock word is held.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Lock<T> {
    state: AtomicU32, // 0 free, 1 held, 2 held with waiters
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` is serialised by `state`.
unsafe impl<T: Send> Sync for Lock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Lock<T> {}

pub struct LockGuard<'a, T> {
    lock: &'a Lock<T>,
}

fn futex(word: &AtomicU32, op: i32, val: u32) {
    // SAFETY: `word` is a valid aligned u32 for the duration of the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            val,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

impl<T> Lock<T> {
    pub const fn new(v: T) -> Lock<T> {
        Lock {
            state: AtomicU32::new(0),
            data: UnsafeCell::new(v),
        }
    }

    pub fn lock(&self) -> LockGuard<'_, T> {
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.state.swap(2, Ordering::Acquire) != 0 {
                futex(&self.state, libc::FUTEX_WAIT, 2);
            }
        }
        LockGuard { lock: self }
    }

    /// The lock if it is free now, without waiting.
    pub fn try_lock(&self) -> Option<LockGuard<'_, T>> {
        self.state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(LockGuard { lock: self })
    }

    /// Forces the lock free. Only for the single-threaded child after fork,
    /// on locks whose holder (a thread that is gone) left the data consistent.
    pub fn reset_after_fork(&self) {
        self.state.store(0, Ordering::Relaxed);
    }

    /// The protected data without locking.
    ///
    /// # Safety
    /// The caller must hold the lock through a forgotten guard.
    pub unsafe fn data_unchecked(&self) -> &T {
        // SAFETY: per the contract, this thread holds the lock.
        unsafe { &*self.data.get() }
    }

    /// Releases a lock taken with `lock()` whose guard was forgotten (the
    /// atfork prepare/parent/child handlers).
    ///
    /// # Safety
    /// The caller must hold the lock through a forgotten guard.
    pub unsafe fn force_unlock(&self) {
        if self.state.swap(0, Ordering::Release) == 2 {
            futex(&self.state, libc::FUTEX_WAKE, 1);
        }
    }
}

impl<T> Drop for LockGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { self.lock.force_unlock() }
    }
}

impl<T> Deref for LockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for LockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.lock.data.get() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_under_contention() {
        let l = Arc::new(Lock::new(0u64));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..20000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*l.lock(), 80000);
    }
}
