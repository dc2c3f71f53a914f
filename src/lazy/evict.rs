//! `DAXSHIM_CACHE_MAX`: the memory the shadows of this process's lazily
//! mapped files hold (data files and line bases, every attached process's
//! fills). From 7/8 of the limit on, the fault thread evicts clean pages
//! down to 3/4, sweeping with a clock hand the 2 MiB regions that hold
//! chunks this process filled (`Host::evict`: every process's pages there,
//! where no other process may store without a fault). Fills are counted
//! from a signal handler, which can only add to estimates — this process's
//! and the header's shared one — and wake the thread; the thread measures
//! (`fstat`) when it wakes, every 16 regions of a sweep, and at least every
//! 1/32 of the limit this process fills.

use super::{host, LazyFile, CHUNK};
use crate::lock::Lock;
use crate::shadow::Shadow;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// `DAXSHIM_CACHE_MAX` (0: no limit).
static LIMIT: AtomicU64 = AtomicU64::new(0);

pub(super) fn set_limit(max: Option<u64>) {
    LIMIT.store(max.unwrap_or(0), Ordering::Relaxed);
}

/// The shadows' memory as last measured, plus what this process filled
/// since.
static FILLED_BYTES: AtomicU64 = AtomicU64::new(0);
/// What this process filled since the last measurement.
static SINCE_MEASURED: AtomicU64 = AtomicU64::new(0);

/// The fault thread's wake-up descriptor (-1: none yet).
pub(super) static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Chunks evicted in one call: a 2 MiB region's.
const BATCH: u64 = (1 << crate::track::marks::REGION_SHIFT) / CHUNK;

/// Where the clock hand stands: (file identity, next chunk).
static HAND: Lock<(usize, u64)> = Lock::new((0, 0));

/// Passes of the evictor (a faulting thread over the limit waits for one).
static EVICT_GEN: AtomicU32 = AtomicU32::new(0);

/// The largest shared estimate ([`Shadow::filled_estimate`]) a fill of this
/// process added to since the last measurement: other processes' fills
/// count at once.
static SHARED_SEEN: AtomicU64 = AtomicU64::new(0);

/// Adds `bytes` filled to the file's shared estimate (async-signal-safe).
pub(super) fn note_shared(shadow: &Shadow, bytes: u64) {
    if bytes == 0 || LIMIT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let now = shadow.filled_estimate().fetch_add(bytes, Ordering::Relaxed) + bytes;
    SHARED_SEEN.fetch_max(now, Ordering::Relaxed);
}

/// Where eviction starts: 7/8 of the limit, leaving room for what other
/// processes fill before this one measures again.
fn high(max: u64) -> u64 {
    max - max / 8
}

/// Where an eviction pass stops: 3/4 of the limit.
fn target(max: u64) -> u64 {
    max - max / 4
}

/// Counts `bytes` filled; over [`high`], wakes the fault thread to evict
/// and (`wait`: a faulting program thread) waits for its pass, so that a
/// fast reader cannot outrun eviction — at most 200 ms, then it goes on.
/// Async-signal-safe.
pub(super) fn note_filled(bytes: u64, wait: bool) {
    let max = high(LIMIT.load(Ordering::Relaxed));
    if max == 0 {
        return;
    }
    let now = FILLED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    let now = now.max(SHARED_SEEN.load(Ordering::Relaxed));
    let since = SINCE_MEASURED.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if now <= max {
        // Under the limit as far as this process knows: others' fills
        // are seen at the next measurement.
        if since >= max / 32 && since - bytes < max / 32 {
            let fd = WAKE_FD.load(Ordering::Relaxed);
            if fd >= 0 {
                crate::sys::eventfd_signal(fd);
            }
        }
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
        if EVICT_GEN.load(Ordering::Acquire) != gen || estimate() <= max {
            return;
        }
        crate::sys::futex_wait_ms(&EVICT_GEN, gen, 10);
    }
}

/// What this process knows of the shadows' memory.
fn estimate() -> u64 {
    FILLED_BYTES
        .load(Ordering::Relaxed)
        .max(SHARED_SEEN.load(Ordering::Relaxed))
}

/// Did the last pass evict anything, and how much was filled after it?
static LAST_PASS_EVICTED: AtomicBool = AtomicBool::new(true);
static AFTER_PASS: AtomicU64 = AtomicU64::new(0);

/// The end of an eviction pass: wakes the threads waiting for it.
fn pass_done() {
    EVICT_GEN.fetch_add(1, Ordering::AcqRel);
    crate::sys::futex_wake_all(&EVICT_GEN);
}

/// Measures the shadows of the lazily mapped files (None: nothing to
/// measure).
fn measure() -> Option<u64> {
    let files = host()?.lazy_files();
    SINCE_MEASURED.store(0, Ordering::Relaxed);
    SHARED_SEEN.store(0, Ordering::Relaxed);
    let total = files
        .iter()
        .map(|f| {
            let held = f.shadow().resident_bytes();
            f.shadow().filled_estimate().store(held, Ordering::Relaxed);
            held
        })
        .sum();
    FILLED_BYTES.store(total, Ordering::Relaxed);
    Some(total)
}

/// In the fault thread, when woken: measures, and evicts clean chunks until
/// at most 3/4 of the limit is held, or every chunk was looked at once.
pub(super) fn evict_over_limit() {
    let max = high(LIMIT.load(Ordering::Relaxed));
    if max == 0 || (estimate() <= max && SINCE_MEASURED.load(Ordering::Relaxed) < max / 32) {
        return;
    }
    let Some(before) = measure() else {
        return;
    };
    if before <= max {
        pass_done();
        return;
    }
    sweep();
    let after = estimate();
    LAST_PASS_EVICTED.store(after < before, Ordering::Relaxed);
    AFTER_PASS.store(after, Ordering::Relaxed);
    pass_done();
}

fn sweep() {
    let max = LIMIT.load(Ordering::Relaxed);
    let Some(h) = host() else {
        return;
    };
    if max == 0 || estimate() <= high(max) {
        return;
    }
    let target = target(max);
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
        // Whole 2 MiB regions (the unit of other processes' store marks)
        // that hold a chunk this process filled: every process's pages in
        // them are compared, the locks taken once per region.
        let mut regions: Vec<u64> = Vec::new();
        let cap = file.chunks().capacity();
        file.chunks().runs(from, cap, &mut |a, b| {
            for r in a / BATCH..b.div_ceil(BATCH) {
                if regions.last() != Some(&r) {
                    regions.push(r);
                }
            }
        });
        for (n, r) in regions.into_iter().enumerate() {
            let c = (r * BATCH).max(from);
            if n % 16 == 15 {
                // Other processes fill too: look again now and then.
                measure();
            }
            if estimate() <= target {
                *hand = (key(file), c);
                return;
            }
            let end = (r + 1) * BATCH;
            let held = file.shadow().resident_bytes();
            let res = h.evict(file, c * CHUNK, end * CHUNK);
            if let Ok(Some(left)) = res {
                for i in c..end {
                    if left & (1 << (i - c)) == 0 {
                        file.chunks().clear(i);
                    }
                }
                let freed = held.saturating_sub(file.shadow().resident_bytes());
                for est in [&FILLED_BYTES, file.shadow().filled_estimate(), &SHARED_SEEN] {
                    let _ = est.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(freed))
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
