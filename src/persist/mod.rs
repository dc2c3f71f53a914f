//! The flush engine: compare shadow and backing one 64-byte cacheline at a
//! time, copy the lines that differ, flush them, fence once per sync.

pub mod base;
pub mod diff;
pub mod flush;
pub mod redo;

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

/// Fault injection: one more line may be written, or the process dies now.
pub fn spend_line(budget: &mut Option<u64>) {
    if let Some(left) = budget {
        if *left == 0 {
            crash_now();
        }
        *left -= 1;
    }
}

fn crash_now() {
    // Fault injection: die in the middle of a writeback, as a power cut would.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(sys::getpid(), libc::SIGKILL) };
}

/// Emulated pmem: the changed lines go to the backing file with pwrite(2)
/// (the span from the first to the last changed line of each page, spans
/// of adjacent pages merged) instead of stores into its mapping, each of
/// which would take the file system's write fault (~4 µs a page on ext4).
/// Bytes between changed lines are equal on both sides, so the file's
/// contents are exactly what line-by-line copies would give.
struct SpanWriter<'u> {
    to: Sink<'u>,
    shadow: usize,
    span: Option<(u64, u64)>,
}

/// Where a [`SpanWriter`]'s spans go.
enum Sink<'u> {
    /// `pwrite` to the backing.
    Fd(i32),
    /// Into a redo record (failure-atomic sync: applied after its commit).
    Log(&'u mut redo::Unit),
}

impl<'u> SpanWriter<'u> {
    fn new(to: Sink<'u>, shadow: usize) -> SpanWriter<'u> {
        SpanWriter {
            to,
            shadow,
            span: None,
        }
    }

    /// Compares `[start, end)` (within one page) and queues its changed span.
    ///
    /// # Safety
    /// Both views cover `[start, end)`.
    unsafe fn page(
        &mut self,
        backing: usize,
        start: u64,
        end: u64,
        budget: &mut Option<u64>,
    ) -> SysResult<LineCounts> {
        let mut c = LineCounts::default();
        let mut first = None;
        let mut last = start;
        let mut off = start;
        while off < end {
            let n = (LINE as u64).min(end - off);
            c.compared += 1;
            // SAFETY: n bytes readable at both views (function contract).
            let same = unsafe {
                diff::line_equal(
                    (self.shadow + off as usize) as *const u8,
                    (backing + off as usize) as *const u8,
                    n as usize,
                )
            };
            if !same {
                c.written += 1;
                if budget.is_some() {
                    // Fault injection: line by line, to die after exactly N.
                    self.take(off, off + n, budget)?;
                } else {
                    first.get_or_insert(off);
                    last = off + n;
                }
            }
            off += n;
        }
        if let Some(f) = first {
            match &mut self.span {
                Some((_, e)) if *e == f => *e = last,
                _ => {
                    self.finish()?;
                    self.span = Some((f, last));
                }
            }
        }
        Ok(c)
    }

    fn take(&mut self, a: u64, b: u64, budget: &mut Option<u64>) -> SysResult<()> {
        spend_line(budget);
        self.span = Some((a, b));
        self.finish()
    }

    fn finish(&mut self) -> SysResult<()> {
        if let Some((a, b)) = self.span.take() {
            // SAFETY: the span lies within the shadow view (see `page`).
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (self.shadow + a as usize) as *const u8,
                    (b - a) as usize,
                )
            };
            match &mut self.to {
                Sink::Fd(fd) => sys::pwrite_all(*fd, bytes, a)?,
                Sink::Log(u) => u.add(a, bytes),
            }
        }
        Ok(())
    }
}

/// How a writeback reaches the media.
pub struct Writeback<'a> {
    pub flush: FlushKind,
    /// Make the touched pages durable with msync (emulated pmem).
    pub msync_touched: bool,
    /// Write the changed spans with pwrite to this descriptor instead of
    /// storing into the backing mapping.
    pub via_fd: Option<i32>,
    /// The shadow's line bases: lines only someone outside the shim changed
    /// are taken into the shadow (whose view must then be writable), never
    /// written back over; `None`: every differing line is written back.
    pub bases: Option<&'a base::Bases>,
}

/// Before a page is written back: lines that differ only because someone
/// outside the shim changed the backing are copied into the shadow (they
/// are equal afterwards, so the writeback leaves them); returns the mask of
/// the page's other differing lines (their bases are renewed once written).
///
/// # Safety
/// Both views cover `[start, end)`, within one page; the shadow view is
/// writable.
unsafe fn adopt_foreign_lines(
    shadow: usize,
    backing: usize,
    start: u64,
    end: u64,
    bases: &base::Bases,
    c: &mut LineCounts,
) -> u64 {
    let page = start - start % PAGE as u64;
    let mut mask = 0u64;
    let mut off = start;
    while off < end {
        let n = (LINE as u64).min(end - off) as usize;
        let (s, b) = (
            (shadow + off as usize) as *mut u8,
            (backing + off as usize) as *const u8,
        );
        // SAFETY: n bytes at both views (contract).
        if !unsafe { diff::line_equal(s, b, n) } {
            let mut seen = [0u8; LINE];
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(s, seen.as_mut_ptr(), n) };
            // SAFETY: as above.
            match unsafe { base::who_changed(bases.get(off), seen.as_ptr(), b, n) } {
                base::Change::Foreign => {
                    // SAFETY: as above; the shadow view is writable.
                    unsafe { base::adopt_line(s, b, &seen, n) };
                    // SAFETY: as above.
                    bases.set(off, unsafe { base::line_hash(b, n) });
                    c.foreign += 1;
                }
                change => {
                    if change == base::Change::Both {
                        c.conflicts += 1;
                        c.first_conflict.get_or_insert(off);
                    }
                    mask |= 1 << ((off - page) / LINE as u64);
                }
            }
        }
        off += n as u64;
    }
    mask
}

/// After a page was written back: the lines of `mask` hold the shadow's
/// bytes in the backing now, their new base.
///
/// # Safety
/// The backing view covers the page's lines of `mask` below `end`.
unsafe fn renew_bases(backing: usize, page: u64, end: u64, mask: u64, bases: &base::Bases) {
    let mut m = mask;
    while m != 0 {
        let k = m.trailing_zeros() as u64;
        m &= m - 1;
        let off = page + k * LINE as u64;
        let n = (LINE as u64).min(end.saturating_sub(off)) as usize;
        if n > 0 {
            // SAFETY: n bytes of the backing view (contract).
            bases.set(off, unsafe {
                base::line_hash((backing + off as usize) as *const u8, n)
            });
        }
    }
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
    how: &Writeback,
) -> SysResult<LineCounts> {
    write_back_into(shadow, backing, size, ranges, how, None)
}

/// Failure-atomic sync: like [`write_back`], but the changed spans go into
/// `log` instead of the backing (which the caller writes after the commit;
/// only lines changed outside the shim are taken into the shadow here).
pub fn collect_changes(
    shadow: usize,
    backing: usize,
    size: u64,
    ranges: &RangeSet,
    how: &Writeback,
    log: &mut redo::Unit,
) -> SysResult<LineCounts> {
    write_back_into(shadow, backing, size, ranges, how, Some(log))
}

/// A run this long (bytes) is read ahead in the backing's view.
const READ_AHEAD_MIN: u64 = 64 << 10;

/// Asks the kernel to read `[a, b)` of the backing view at `backing` ahead
/// when the run is long: the views of emulated pmem read single pages
/// (`MADV_RANDOM`, see `FileState::views`), which would make a long run
/// of pages not in the page cache one synchronous read per page.
pub fn read_ahead(backing: usize, a: u64, b: u64) {
    if b > a && b - a >= READ_AHEAD_MIN {
        let from = a - a % PAGE as u64;
        let _ = sys::madvise(
            backing + from as usize,
            (b - from) as usize,
            libc::MADV_WILLNEED,
        );
    }
}

fn write_back_into(
    shadow: usize,
    backing: usize,
    size: u64,
    ranges: &RangeSet,
    how: &Writeback,
    log: Option<&mut redo::Unit>,
) -> SysResult<LineCounts> {
    let collecting = log.is_some();
    let (msync_touched, via_fd) = (how.msync_touched && !collecting, how.via_fd);
    let mut flusher = Flusher::new(how.flush);
    let budget_in = CRASH_BUDGET.load(Ordering::Relaxed);
    let mut budget = (budget_in != u64::MAX && !collecting).then_some(budget_in);
    let mut total = LineCounts::default();
    let mut touched = RangeSet::new();
    let mut writer = match log {
        Some(u) => Some(SpanWriter::new(Sink::Log(u), shadow)),
        None => via_fd.map(|fd| SpanWriter::new(Sink::Fd(fd), shadow)),
    };
    let mut pending_bases = Vec::new();
    for (a, b) in ranges.iter() {
        let b = b.min(size);
        read_ahead(backing, a, b);
        let mut page = a - a % PAGE as u64;
        while page < b {
            let start = page.max(a);
            let end = (page + PAGE as u64).min(b);
            let mut foreign = LineCounts::default();
            let mask = match how.bases {
                // SAFETY: start < end <= size, within one page; both views
                // cover [0, size); the caller mapped the shadow writable.
                Some(bases) => unsafe {
                    adopt_foreign_lines(shadow, backing, start, end, bases, &mut foreign)
                },
                None => 0,
            };
            if how.bases.is_some() && mask == 0 {
                // Nothing left to write in this page: the compare is done.
                foreign.compared += (end - start).div_ceil(LINE as u64);
                total += foreign;
                page += PAGE as u64;
                continue;
            }
            let c = match &mut writer {
                // SAFETY: start < end <= size; both views cover [0, size).
                None => unsafe {
                    sync_lines(
                        (shadow + start as usize) as *const u8,
                        (backing + start as usize) as *mut u8,
                        (end - start) as usize,
                        &mut flusher,
                        &mut budget,
                        crash_now,
                    )
                },
                // SAFETY: as above.
                Some(w) => unsafe { w.page(backing, start, end, &mut budget)? },
            };
            if c.written > 0 {
                touched.insert(page, page + PAGE as u64);
            }
            total += c;
            total += foreign;
            page += PAGE as u64;
            pending_bases.push((page - PAGE as u64, end, mask));
        }
    }
    if let Some(w) = &mut writer {
        w.finish()?;
    }
    // (Collected lines are not in the backing yet: their bases are renewed
    // after the apply.)
    if let Some(bases) = how.bases.filter(|_| !collecting) {
        for (page, end, mask) in pending_bases {
            // SAFETY: within [0, size), which the backing view covers.
            unsafe { renew_bases(backing, page, end, mask, bases) };
        }
    }
    if let Some(b) = budget {
        CRASH_BUDGET.store(b, Ordering::Relaxed);
    }
    flusher.fence();
    total.pages_written = touched.len() / PAGE as u64;
    add(&STATS.lines_compared, total.compared);
    if !collecting {
        add(&STATS.lines_written, total.written);
    }
    add(&STATS.bytes_flushed, flusher.lines * LINE as u64);
    add(&STATS.bytes_streamed, flusher.streamed * LINE as u64);
    add(&STATS.foreign_writes, total.foreign);
    add(&STATS.conflicts, total.conflicts);
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
