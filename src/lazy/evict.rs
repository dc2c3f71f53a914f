//! `DAXSHIM_CACHE_MAX`: chunks this process filled, oldest first; beyond
//! the limit clean ones are punched out of the data file again.

use super::{host, LazyFile, CHUNK};
use crate::lock::Lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// `DAXSHIM_CACHE_MAX` (0: no limit).
static LIMIT: AtomicU64 = AtomicU64::new(0);

pub(super) fn set_limit(max: Option<u64>) {
    LIMIT.store(max.unwrap_or(0), Ordering::Relaxed);
}

struct Filled {
    file: Weak<dyn LazyFile>,
    chunk: u64,
    bytes: u64,
}

/// Chunks this process filled, oldest first, and their bytes.
static FILLED: Lock<VecDeque<Filled>> = Lock::new(VecDeque::new());

static FILLED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Chunks looked at per fault when over the limit (bounds the work when
/// nothing can be evicted).
const EVICT_TRIES: usize = 64;

pub(super) fn account(file: &Arc<dyn LazyFile>, chunk: u64, bytes: u64) {
    let max = LIMIT.load(Ordering::Relaxed);
    if max == 0 {
        return;
    }
    FILLED.lock().push_back(Filled {
        file: Arc::downgrade(file),
        chunk,
        bytes,
    });
    if FILLED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes > max {
        evict_to(max - max / 8);
    }
}

/// Evicts the oldest clean chunks until at most `target` bytes are filled.
fn evict_to(target: u64) {
    for _ in 0..EVICT_TRIES {
        if FILLED_BYTES.load(Ordering::Relaxed) <= target {
            return;
        }
        let Some(c) = FILLED.lock().pop_front() else {
            return;
        };
        let Some(file) = c.file.upgrade() else {
            FILLED_BYTES.fetch_sub(c.bytes, Ordering::Relaxed);
            continue;
        };
        let c0 = c.chunk * CHUNK;
        let r = match host() {
            Some(h) => h.evict(&file, c0, c0 + CHUNK),
            None => Ok(false),
        };
        match r {
            Ok(true) => {
                file.chunks().lock().clear(c.chunk);
                FILLED_BYTES.fetch_sub(c.bytes, Ordering::Relaxed);
            }
            // Dirty, shared with another process, or failed: keep it.
            _ => FILLED.lock().push_back(c),
        }
    }
}

pub(super) fn hold_for_fork() {
    std::mem::forget(FILLED.lock());
}

/// # Safety
/// After [`hold_for_fork`].
pub(super) unsafe fn release_after_fork() {
    // SAFETY: hold_for_fork took it and forgot the guard.
    unsafe { FILLED.force_unlock() };
}
