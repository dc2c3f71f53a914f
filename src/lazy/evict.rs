//! `DAXSHIM_CACHE_MAX`: bytes this process filled lazily; beyond the limit
//! the fault thread evicts clean chunks, sweeping the lazily mapped files'
//! chunk bits with a clock hand (fills are counted from a signal handler,
//! which can only add to a counter and wake the thread).

use super::{host, LazyFile, CHUNK};
use crate::lock::Lock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// `DAXSHIM_CACHE_MAX` (0: no limit).
static LIMIT: AtomicU64 = AtomicU64::new(0);

pub(super) fn set_limit(max: Option<u64>) {
    LIMIT.store(max.unwrap_or(0), Ordering::Relaxed);
}

/// Bytes filled and not evicted since (an estimate: a chunk evicted counts
/// as a whole chunk).
static FILLED_BYTES: AtomicU64 = AtomicU64::new(0);

/// The fault thread's wake-up descriptor (-1: none yet).
pub(super) static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Where the clock hand stands: (file identity, next chunk).
static HAND: Lock<(usize, u64)> = Lock::new((0, 0));

/// Passes of the evictor (a faulting thread over the limit waits for one).
static EVICT_GEN: AtomicU32 = AtomicU32::new(0);

/// Counts `bytes` filled; over the limit, wakes the fault thread to evict
/// and (`wait`: a faulting program thread) waits for its pass, so that a
/// fast reader cannot outrun eviction — at most 200 ms, then it goes on.
/// Async-signal-safe.
pub(super) fn note_filled(bytes: u64, wait: bool) {
    let max = LIMIT.load(Ordering::Relaxed);
    if max == 0 {
        return;
    }
    let now = FILLED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if now <= max {
        return;
    }
    // A pass that evicted nothing (what is filled is dirty or shared) is not
    // repeated until an eighth of the limit more was filled.
    let stuck = !LAST_PASS_EVICTED.load(Ordering::Relaxed);
    if stuck && now < AFTER_PASS.load(Ordering::Relaxed) + max / 8 {
        return;
    }
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let gen = EVICT_GEN.load(Ordering::Acquire);
    crate::sys::eventfd_signal(fd);
    if !wait || stuck {
        return;
    }
    for _ in 0..20 {
        if EVICT_GEN.load(Ordering::Acquire) != gen || FILLED_BYTES.load(Ordering::Relaxed) <= max {
            return;
        }
        crate::sys::futex_wait_ms(&EVICT_GEN, gen, 10);
    }
}

/// Did the last pass evict anything, and how much was filled after it?
static LAST_PASS_EVICTED: AtomicBool = AtomicBool::new(true);
static AFTER_PASS: AtomicU64 = AtomicU64::new(0);

/// The end of an eviction pass: wakes the threads waiting for it.
fn pass_done() {
    EVICT_GEN.fetch_add(1, Ordering::AcqRel);
    crate::sys::futex_wake_all(&EVICT_GEN);
}

/// In the fault thread, when woken: evicts clean chunks until at most 7/8
/// of the limit is filled, or every chunk was looked at once.
pub(super) fn evict_over_limit() {
    let before = FILLED_BYTES.load(Ordering::Relaxed);
    if before <= LIMIT.load(Ordering::Relaxed) {
        return;
    }
    sweep();
    let after = FILLED_BYTES.load(Ordering::Relaxed);
    LAST_PASS_EVICTED.store(after < before, Ordering::Relaxed);
    AFTER_PASS.store(after, Ordering::Relaxed);
    pass_done();
}

fn sweep() {
    let max = LIMIT.load(Ordering::Relaxed);
    let Some(h) = host() else {
        return;
    };
    if max == 0 || FILLED_BYTES.load(Ordering::Relaxed) <= max {
        return;
    }
    let target = max - max / 8;
    let files = h.lazy_files();
    if files.is_empty() {
        return;
    }
    let key = |f: &Arc<dyn LazyFile>| Arc::as_ptr(f) as *const () as usize;
    let mut hand = HAND.lock();
    // Start at the file the hand stands in (or the first).
    let first = files.iter().position(|f| key(f) == hand.0).unwrap_or(0);
    if key(&files[first]) != hand.0 {
        *hand = (key(&files[first]), 0);
    }
    for k in 0..=files.len() {
        let file = &files[(first + k) % files.len()];
        let from = if k == 0 { hand.1 } else { 0 };
        let mut runs = Vec::new();
        let cap = file.chunks().capacity();
        file.chunks().runs(from, cap, &mut |a, b| runs.push((a, b)));
        for (a, b) in runs {
            for c in a..b {
                if FILLED_BYTES.load(Ordering::Relaxed) <= target {
                    *hand = (key(file), c);
                    return;
                }
                if let Ok(true) = h.evict(file, c * CHUNK, (c + 1) * CHUNK) {
                    file.chunks().clear(c);
                    let _ = FILLED_BYTES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(CHUNK))
                    });
                }
            }
        }
        *hand = (key(&files[(first + k + 1) % files.len()]), 0);
    }
}

pub(super) fn hold_for_fork() {
    std::mem::forget(HAND.lock());
}

/// # Safety
/// After [`hold_for_fork`].
pub(super) unsafe fn release_after_fork() {
    // SAFETY: hold_for_fork took it and forgot the guard.
    unsafe { HAND.force_unlock() };
}
