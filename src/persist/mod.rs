//! The flush engine: compare shadow and backing one 64-byte cacheline at a
//! time, copy the lines that differ, flush them, fence once per sync.

pub mod diff;
pub mod flush;

pub use diff::{sync_lines, LineCounts, LINE};
pub use flush::{FlushKind, Flusher};

use crate::ranges::RangeSet;
use crate::stats::{add, STATS};
use crate::sys::{self, SysResult, PAGE};
use std::sync::atomic::{AtomicU64, Ordering};

/// Lines still allowed to be written before the injected crash
/// (`DAXSHIM_DEBUG_CRASH_AFTER_LINES`); `u64::MAX` = no injection.
pub static CRASH_BUDGET: AtomicU64 = AtomicU64::new(u64::MAX);

/// Writebacks still to fail with EIO (`DAXSHIM_DEBUG_FAIL_SYNCS`).
pub static FAIL_BUDGET: AtomicU64 = AtomicU64::new(0);

/// Fault injection: should this writeback fail before copying anything?
pub fn inject_failure() -> bool {
    FAIL_BUDGET
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

fn crash_now() {
    // Fault injection: die in the middle of a writeback, as a power cut would.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(sys::getpid(), libc::SIGKILL) };
}

/// Writes back the differing lines of `ranges` (file offsets) from the
/// shadow view at `shadow` to the backing mapping at `backing`, both mapping
/// the file from offset 0 for at least `size` bytes. Flushes what it wrote,
/// fences once, and with `msync_touched` makes the touched backing pages
/// durable through the kernel (emulated pmem).
pub fn write_back(
    shadow: usize,
    backing: usize,
    size: u64,
    ranges: &RangeSet,
    flush: FlushKind,
    msync_touched: bool,
) -> SysResult<LineCounts> {
    let mut flusher = Flusher::new(flush);
    let budget_in = CRASH_BUDGET.load(Ordering::Relaxed);
    let mut budget = (budget_in != u64::MAX).then_some(budget_in);
    let mut total = LineCounts::default();
    let mut touched = RangeSet::new();
    for (a, b) in ranges.iter() {
        let b = b.min(size);
        let mut page = a - a % PAGE as u64;
        while page < b {
            let start = page.max(a);
            let end = (page + PAGE as u64).min(b);
            // SAFETY: start < end <= size; both views cover [0, size).
            let c = unsafe {
                sync_lines(
                    (shadow + start as usize) as *const u8,
                    (backing + start as usize) as *mut u8,
                    (end - start) as usize,
                    &mut flusher,
                    &mut budget,
                    crash_now,
                )
            };
            if c.written > 0 {
                touched.insert(page, page + PAGE as u64);
            }
            total += c;
            page += PAGE as u64;
        }
    }
    if let Some(b) = budget {
        CRASH_BUDGET.store(b, Ordering::Relaxed);
    }
    flusher.fence();
    total.pages_written = touched.len() / PAGE as u64;
    add(&STATS.lines_compared, total.compared);
    add(&STATS.lines_written, total.written);
    add(&STATS.bytes_flushed, flusher.lines * LINE as u64);
    if msync_touched {
        // One msync over the span of touched pages: each call is a file
        // system sync (~100 µs on ext4), and clean pages inside the span
        // cost the kernel nothing.
        let mut it = touched.iter();
        if let Some((first, _)) = it.next() {
            let last = touched.iter().last().map(|(_, b)| b).unwrap_or(first);
            sys::msync(
                backing + first as usize,
                (last - first) as usize,
                libc::MS_SYNC,
            )?;
        }
    }
    Ok(total)
}
