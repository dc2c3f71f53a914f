//! Write traps: ranges whose clean granules are mapped read-only, so that
//! the first store to a granule raises SIGSEGV; the shim's handler records
//! the granule and makes it writable. A harvest takes the granules' bits and
//! write-protects them again. Two users, one table each:
//!
//! - the mprotect tracker ([`super::mprotect`]): granule = page, the bits
//!   are the dirty pages themselves;
//! - the userfaultfd tracker's region traps ([`super::uffd`]): granule =
//!   2 MiB, a set bit says "pages inside may have been written" and only
//!   those regions are scanned with `PAGEMAP_SCAN`, so a sync's cost
//!   follows what was written, not what was touched.
//!
//! - Survives `vm.max_map_count`: every granule made writable alone splits
//!   a VMA; when the kernel refuses (`ENOMEM`), the handler makes the whole
//!   range writable (which merges its VMAs back) and marks it all set: the
//!   next whole harvest reports it entirely and protects it again.
//! - Kernel-side stores (`read(2)` into a trapped page) would fail with
//!   EFAULT on a read-only page: the read hooks open the destination first
//!   ([`Traps::before_kernel_stores`]).
//!
//! Ordering that keeps stores from being lost: the handler makes the
//! granule writable *before* setting its bit; a harvest takes the bits
//! *before* it write-protects. A store between the two lands before the
//! caller copies (or scans) the granule; one after the protect faults and
//! sets its bit again.
//!
//! A slot of a lazily filled shared shadow also carries where its regions
//! are marked for other processes ([`super::marks`], [`MarkAt`]): whatever
//! opens a granule to stores marks its regions first (and waits while
//! another process evicts there); a harvest that protected a granule again
//! clears the marks of the regions no open granule of this process covers.
//! The two exclude each other through the table's `marking` word (the
//! harvest's side runs with signals blocked, so a handler never waits for
//! its own thread).
//!
//! # Safety
//! The handler touches only atomics and raw system calls (async-signal-safe).
//! Bitmaps are allocated and freed outside the handler, under the table's
//! lock.

use super::marks;
use crate::lock::Lock;
use crate::sys::{self, Errno, SysResult};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

const SLOTS: usize = 1024;
/// `si_code` of a fault on a mapped page the protection forbids.
pub(super) const SEGV_ACCERR: i32 = 2;

/// One trapped range: `[lo, hi)`, bit `i` of `bits` is the granule at
/// `base + (i << shift)`.
struct Slot {
    lo: AtomicUsize,
    hi: AtomicUsize,
    base: AtomicUsize,
    bits: AtomicPtr<AtomicU64>,
    words: AtomicUsize,
    /// The whole range may be written (the kernel refused a split, the
    /// program changed its protection, or it was never protected).
    all: AtomicBool,
    /// The protection the program asked for (stores are trapped only where
    /// it allows them).
    prot: AtomicI32,
    /// [`MarkAt`]: the marks table (0: none), the file offset of `base`,
    /// this process's slot in the shadow.
    marks: AtomicUsize,
    mark_off: AtomicU64,
    mark_slot: AtomicUsize,
}

/// Where a trapped range's stores are marked for other processes: the
/// shadow's marks table ([`super::marks`]), the file offset the range
/// starts at, and this process's slot in the shadow.
#[derive(Clone, Copy, Debug)]
pub struct MarkAt {
    pub table: usize,
    pub off: u64,
    pub slot: usize,
}

/// Applies the program's `mprotect` (its result).
pub type Apply<'a> = &'a mut dyn FnMut() -> i32;

/// How a newly trapped range starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protect {
    /// Write-protected now: nothing in it counts as written.
    Now,
    /// The caller maps it without `PROT_WRITE` itself (it is inaccessible
    /// until then): nothing counts as written.
    Later,
    /// Left as it is: everything counts as written until the first whole
    /// harvest protects it.
    No,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    lo: AtomicUsize::new(0),
    hi: AtomicUsize::new(0),
    base: AtomicUsize::new(0),
    bits: AtomicPtr::new(std::ptr::null_mut()),
    words: AtomicUsize::new(0),
    all: AtomicBool::new(false),
    prot: AtomicI32::new(0),
    marks: AtomicUsize::new(0),
    mark_off: AtomicU64::new(0),
    mark_slot: AtomicUsize::new(0),
};

/// A table of trapped ranges with one granule size.
pub struct Traps {
    table: [Slot; SLOTS],
    /// Serialises changes to `table` and harvests (never taken by the
    /// handler).
    lock: Lock<()>,
    /// Slots in use (0: the hooks skip the lookup).
    used: AtomicUsize,
    /// log2 of the granule size.
    shift: u32,
    /// The thread changing marks (0: none): handlers opening granules and
    /// harvests clearing marks exclude each other.
    marking: AtomicI32,
}

/// Holds the table's `marking` word (none if a handler runs on top of its
/// own thread's hold: it goes on, the outer frame is a handler too).
struct Marking<'a>(Option<&'a AtomicI32>);

impl Drop for Marking<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.0 {
            w.store(0, Ordering::Release);
        }
    }
}

impl Traps {
    pub const fn new(shift: u32) -> Traps {
        Traps {
            table: [EMPTY; SLOTS],
            lock: Lock::new(()),
            used: AtomicUsize::new(0),
            shift,
            marking: AtomicI32::new(0),
        }
    }

    /// Takes the `marking` word (spinning: holders do a few atomics and at
    /// most an `mprotect`).
    fn marking(&self) -> Marking<'_> {
        let me = sys::gettid();
        loop {
            match self
                .marking
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Marking(Some(&self.marking)),
                Err(t) if t == me => return Marking(None),
                Err(_) => std::hint::spin_loop(),
            }
        }
    }

    /// The marks table, regions and slot of `[a, b)` of slot `s`.
    fn regions_of(&self, s: &Slot, a: usize, b: usize) -> Option<(usize, Range<u64>, usize)> {
        let table = s.marks.load(Ordering::Acquire);
        if table == 0 || a >= b {
            return None;
        }
        let base = s.base.load(Ordering::Relaxed);
        let off = s.mark_off.load(Ordering::Relaxed);
        let fo = |x: usize| off + (x - base) as u64;
        let slot = s.mark_slot.load(Ordering::Relaxed);
        Some((table, marks::regions_of(fo(a), fo(b)), slot))
    }

    /// Marks `[a, b)` of slot `s` open for other processes. `Err`: another
    /// process evicts there; the caller lets go of `marking` and waits with
    /// [`marks::wait_evictors`] before it tries again.
    fn mark_open(&self, s: &Slot, a: usize, b: usize) -> Result<(), (usize, Range<u64>)> {
        match self.regions_of(s, a, b) {
            Some((t, rs, slot)) if !marks::set_open(t, rs.clone(), slot) => Err((t, rs)),
            _ => Ok(()),
        }
    }

    /// Marks `[a, b)` of slot `s` open, waiting for evictors of other
    /// processes (not from a handler holding `marking`).
    fn mark_open_waiting(&self, s: &Slot, a: usize, b: usize) {
        while let Err((t, rs)) = self.mark_open(s, a, b) {
            marks::wait_evictors(t, rs);
        }
    }

    /// Is region `r` of marks table `table` open to stores anywhere in
    /// this process (a set bit or an all-open slot over it)?
    fn region_open(&self, table: usize, r: u64) -> bool {
        let (r0, r1) = (r << marks::REGION_SHIFT, (r + 1) << marks::REGION_SHIFT);
        self.table.iter().any(|s| {
            let lo = s.lo.load(Ordering::Relaxed);
            if lo == 0 || s.marks.load(Ordering::Relaxed) != table {
                return false;
            }
            let hi = s.hi.load(Ordering::Relaxed);
            let base = s.base.load(Ordering::Relaxed);
            let off = s.mark_off.load(Ordering::Relaxed);
            let (fa, fb) = (off + (lo - base) as u64, off + (hi - base) as u64);
            if fb <= r0 || r1 <= fa {
                return false;
            }
            if s.all.load(Ordering::Acquire) {
                return true;
            }
            let va = |f: u64| base + (f - off) as usize;
            let (a, b) = (va(fa.max(r0)), va(fb.min(r1)));
            let bits = s.bits.load(Ordering::Acquire);
            let words = s.words.load(Ordering::Relaxed);
            let first = (a - base) >> self.shift;
            let last = (b - 1 - base) >> self.shift;
            (first..=last).any(|i| {
                // SAFETY: `bits` holds `words` atomics while the slot is
                // live (the caller holds the table's lock).
                i / 64 >= words
                    || bits.is_null()
                    || unsafe { (*bits.add(i / 64)).load(Ordering::Acquire) } & (1 << (i % 64)) != 0
            })
        })
    }

    /// Clears this process's marks on the regions of `closed` (pieces of
    /// slots just protected or untrapped) that no open granule of this
    /// process covers any more. Call with the table's lock held.
    fn unmark_closed(&self, closed: &[(usize, Range<u64>, usize)]) {
        if closed.is_empty() {
            return;
        }
        let _signals = sys::SignalBlock::all();
        let _m = self.marking();
        for (t, rs, slot) in closed {
            for r in rs.clone() {
                if !self.region_open(*t, r) {
                    marks::clear_open(*t, r, *slot);
                }
            }
        }
    }

    fn granule(&self) -> usize {
        1 << self.shift
    }

    /// Is any range trapped?
    pub fn in_use(&self) -> bool {
        self.used.load(Ordering::Relaxed) != 0
    }

    /// The live slots overlapping `[addr, end)`, with their bounds.
    fn overlapping(&self, addr: usize, end: usize) -> impl Iterator<Item = (&Slot, usize, usize)> {
        self.table.iter().filter_map(move |s| {
            let lo = s.lo.load(Ordering::Relaxed);
            let hi = s.hi.load(Ordering::Relaxed);
            (lo != 0 && lo < end && addr < hi).then_some((s, lo, hi))
        })
    }

    fn find(&self, addr: usize) -> Option<&Slot> {
        self.table.iter().find(|s| {
            let lo = s.lo.load(Ordering::Acquire);
            lo != 0 && lo <= addr && addr < s.hi.load(Ordering::Acquire)
        })
    }

    fn set_bit(&self, s: &Slot, addr: usize) {
        let i = (addr - s.base.load(Ordering::Relaxed)) >> self.shift;
        let bits = s.bits.load(Ordering::Acquire);
        if !bits.is_null() && i / 64 < s.words.load(Ordering::Relaxed) {
            // SAFETY: `bits` holds `words` atomics while the slot is live.
            unsafe { (*bits.add(i / 64)).fetch_or(1 << (i % 64), Ordering::AcqRel) };
        } else {
            s.all.store(true, Ordering::Release);
        }
    }

    /// The granule of slot `s` holding `addr`, clamped to the slot.
    fn granule_of(&self, s: &Slot, addr: usize) -> (usize, usize) {
        let base = s.base.load(Ordering::Relaxed);
        let g0 = base + ((addr - base) >> self.shift << self.shift);
        let lo = s.lo.load(Ordering::Relaxed);
        let hi = s.hi.load(Ordering::Relaxed);
        (g0.max(lo), (g0 + self.granule()).min(hi))
    }

    /// Records a store to `addr` in slot `s` and lets it complete.
    fn open(&self, s: &Slot, addr: usize) -> bool {
        let prot = s.prot.load(Ordering::Relaxed);
        if prot & libc::PROT_WRITE == 0 {
            return false; // the program's own protection: a real fault
        }
        let (a, b) = self.granule_of(s, addr);
        crate::stats::add(&crate::stats::STATS.store_traps, 1);
        loop {
            // Only slots whose stores are marked race a harvest's unmarking
            // (the mprotect tracker's page traps never take the word).
            let held = (s.marks.load(Ordering::Acquire) != 0).then(|| self.marking());
            if let Err((t, rs)) = self.mark_open(s, a, b) {
                drop(held);
                marks::wait_evictors(t, rs);
                continue;
            }
            if a < b && sys::mprotect(a, b - a, prot).is_ok() {
                self.set_bit(s, addr);
                return true;
            }
            // Too many VMAs (vm.max_map_count): open the whole range, which
            // merges its pieces, and report it all at the next harvest.
            let lo = s.lo.load(Ordering::Relaxed);
            let hi = s.hi.load(Ordering::Relaxed);
            if let Err((t, rs)) = self.mark_open(s, lo, hi) {
                drop(held);
                marks::wait_evictors(t, rs);
                continue;
            }
            s.all.store(true, Ordering::Release);
            return sys::mprotect(lo, hi - lo, prot).is_ok();
        }
    }

    /// The SIGSEGV handler's test: true if the fault was a trapped first
    /// store (now let through).
    pub fn on_segv(&self, info: &libc::siginfo_t) -> bool {
        if info.si_code != SEGV_ACCERR || !self.in_use() {
            return false;
        }
        // SAFETY: SIGSEGV's siginfo carries the faulting address.
        let addr = unsafe { info.si_addr() } as usize;
        match self.find(addr) {
            Some(s) => self.open(s, addr),
            None => false,
        }
    }

    /// Before the kernel stores into `[addr, addr+len)` on the program's
    /// behalf: trapped granules there are recorded and opened (the kernel
    /// would get EFAULT from a read-only page instead of a signal).
    pub fn before_kernel_stores(&self, addr: usize, len: usize) {
        if !self.in_use() || len == 0 {
            return;
        }
        let end = addr.saturating_add(len);
        let mut p = sys::page_down(addr);
        while p < end {
            match self.find(p) {
                Some(s) => {
                    let _ = self.open(s, p);
                    p = self.granule_of(s, p).1.max(p + sys::PAGE);
                }
                None => p += sys::PAGE,
            }
        }
    }

    /// Starts trapping `[addr, addr+len)`, marking its stores in `marks`
    /// (if any) for other processes.
    pub fn track(
        &self,
        addr: usize,
        len: usize,
        prot: i32,
        protect: Protect,
        marks: Option<MarkAt>,
    ) -> SysResult<()> {
        let _g = self.lock.lock();
        self.remove_locked(addr, len);
        let Some(slot) = self
            .table
            .iter()
            .find(|s| s.lo.load(Ordering::Relaxed) == 0)
        else {
            return Err(Errno(libc::ENOSPC));
        };
        let words = (len >> self.shift).div_ceil(64) + 1;
        let bits: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        slot.words.store(words, Ordering::Relaxed);
        slot.bits
            .store(Box::into_raw(bits) as *mut _, Ordering::Release);
        slot.base.store(addr, Ordering::Relaxed);
        slot.all.store(protect == Protect::No, Ordering::Relaxed);
        slot.prot.store(prot, Ordering::Relaxed);
        let m = marks.unwrap_or(MarkAt {
            table: 0,
            off: 0,
            slot: 0,
        });
        slot.mark_off.store(m.off, Ordering::Relaxed);
        slot.mark_slot.store(m.slot, Ordering::Relaxed);
        slot.marks.store(m.table, Ordering::Release);
        slot.hi.store(addr + len, Ordering::Release);
        slot.lo.store(addr, Ordering::Release);
        self.used.fetch_add(1, Ordering::Relaxed);
        match protect {
            Protect::Now => sys::mprotect(addr, len, prot & !libc::PROT_WRITE)?,
            Protect::Later => {}
            Protect::No if prot & libc::PROT_WRITE != 0 => {
                self.mark_open_waiting(slot, addr, addr + len)
            }
            Protect::No => {}
        }
        Ok(())
    }

    /// In a forked child, now in `slot` of the shadow whose marks table is
    /// `table`: its trapped ranges there are marked as its own, those open
    /// to stores (inherited from the parent) marked open for it.
    pub fn remark_after_fork(&self, table: usize, slot: usize) {
        let _g = self.lock.lock();
        for s in self.table.iter() {
            if s.lo.load(Ordering::Relaxed) == 0 || s.marks.load(Ordering::Relaxed) != table {
                continue;
            }
            s.mark_slot.store(slot, Ordering::Relaxed);
            let lo = s.lo.load(Ordering::Relaxed);
            let hi = s.hi.load(Ordering::Relaxed);
            if s.all.load(Ordering::Acquire) {
                if s.prot.load(Ordering::Relaxed) & libc::PROT_WRITE != 0 {
                    self.mark_open_waiting(s, lo, hi);
                }
                continue;
            }
            let mut open = Vec::new();
            self.each_set(s, &mut |x, y| open.push((x, y)));
            for (x, y) in open {
                self.mark_open_waiting(s, x, y);
            }
        }
    }

    /// Calls `f` with the extent of every granule of slot `s` whose bit is
    /// set.
    fn each_set(&self, s: &Slot, f: &mut dyn FnMut(usize, usize)) {
        let bits = s.bits.load(Ordering::Acquire);
        if bits.is_null() {
            return;
        }
        let base = s.base.load(Ordering::Relaxed);
        let lo = s.lo.load(Ordering::Relaxed);
        let hi = s.hi.load(Ordering::Relaxed);
        for w in 0..s.words.load(Ordering::Relaxed) {
            // SAFETY: w < words, within the slot's bitmap.
            let mut set = unsafe { (*bits.add(w)).load(Ordering::Acquire) };
            while set != 0 {
                let i = w * 64 + set.trailing_zeros() as usize;
                set &= set - 1;
                let g0 = base + (i << self.shift);
                let (x, y) = (g0.max(lo), (g0 + self.granule()).min(hi));
                if x < y {
                    f(x, y);
                }
            }
        }
    }

    /// The protection recorded for the trapped range holding `addr`.
    pub fn prot_at(&self, addr: usize) -> Option<i32> {
        self.find(addr).map(|s| s.prot.load(Ordering::Relaxed))
    }

    /// Stops trapping `[addr, addr+len)` (unmapped or moved).
    pub fn untrack(&self, addr: usize, len: usize) {
        let _g = self.lock.lock();
        let end = addr.saturating_add(len);
        let gone: Vec<_> = self
            .overlapping(addr, end)
            .filter_map(|(s, lo, hi)| self.regions_of(s, addr.max(lo), end.min(hi)))
            .collect();
        self.remove_locked(addr, len);
        // No store through this range any more: what it stored, if not
        // written back yet, differs from the backing and is never punched.
        self.unmark_closed(&gone);
    }

    /// Extends the slot ending at `addr` by a tail grown in place (which
    /// counts as written until a whole harvest protects it).
    pub fn grow(&self, addr: usize, len: usize) -> SysResult<()> {
        let _g = self.lock.lock();
        for s in self.table.iter() {
            if s.hi.load(Ordering::Relaxed) == addr && s.lo.load(Ordering::Relaxed) != 0 {
                s.all.store(true, Ordering::Release);
                s.hi.store(addr + len, Ordering::Release);
                if s.prot.load(Ordering::Relaxed) & libc::PROT_WRITE != 0 {
                    self.mark_open_waiting(s, addr, addr + len);
                }
                return Ok(());
            }
        }
        Err(Errno(libc::ENOENT))
    }

    fn free_bits(&self, s: &Slot) {
        let bits = s.bits.swap(std::ptr::null_mut(), Ordering::AcqRel);
        let shared = self
            .table
            .iter()
            .any(|o| o.lo.load(Ordering::Relaxed) != 0 && o.bits.load(Ordering::Relaxed) == bits);
        if !bits.is_null() && !shared {
            let words = s.words.load(Ordering::Relaxed);
            // SAFETY: allocated in `track` as a boxed slice of `words`
            // atomics; no live slot refers to it any more.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(bits, words)) });
        }
    }

    /// Cuts `[addr, end)` out of every slot (splitting one that straddles
    /// it).
    fn remove_locked(&self, addr: usize, len: usize) {
        let end = addr.saturating_add(len);
        for (s, lo, hi) in self.overlapping(addr, end) {
            if addr <= lo && hi <= end {
                s.lo.store(0, Ordering::Release);
                s.hi.store(0, Ordering::Release);
                self.used.fetch_sub(1, Ordering::Relaxed);
                self.free_bits(s);
            } else if addr <= lo {
                s.lo.store(end, Ordering::Release);
            } else if hi <= end {
                s.hi.store(addr, Ordering::Release);
            } else if let Some(t) = self
                .table
                .iter()
                .find(|t| t.lo.load(Ordering::Relaxed) == 0)
            {
                // The tail becomes a slot of its own over the same bitmap.
                t.bits
                    .store(s.bits.load(Ordering::Relaxed), Ordering::Release);
                t.words
                    .store(s.words.load(Ordering::Relaxed), Ordering::Relaxed);
                t.base
                    .store(s.base.load(Ordering::Relaxed), Ordering::Relaxed);
                t.all
                    .store(s.all.load(Ordering::Relaxed), Ordering::Relaxed);
                t.prot
                    .store(s.prot.load(Ordering::Relaxed), Ordering::Relaxed);
                t.hi.store(hi, Ordering::Release);
                t.lo.store(end, Ordering::Release);
                self.used.fetch_add(1, Ordering::Relaxed);
                s.hi.store(addr, Ordering::Release);
            } else {
                // No slot for the tail: it is not trapped any more. Open it
                // so that no store to it faults without an owner (its pages
                // stay tracked by whatever tracks them besides the trap);
                // its regions stay marked open for good.
                let prot = s.prot.load(Ordering::Relaxed);
                if prot & libc::PROT_WRITE != 0 {
                    self.mark_open_waiting(s, end, hi);
                }
                let _ = sys::mprotect(end, hi - end, prot);
                s.hi.store(addr, Ordering::Release);
            }
        }
    }

    /// The program changes the protection of `[addr, addr+len)` to `prot`
    /// (`apply` does it: the `mprotect` result). Stores it allows are not
    /// trapped, so slots there count as all written until the next whole
    /// harvest protects them again, and are marked open first. Under the
    /// table's lock throughout, so that no harvest protects and unmarks
    /// them in between.
    pub fn on_mprotect(&self, addr: usize, len: usize, prot: i32, apply: Apply) -> i32 {
        let _g = self.lock.lock();
        let end = addr.saturating_add(len);
        if prot & libc::PROT_WRITE != 0 {
            let parts: Vec<_> = self
                .overlapping(addr, end)
                .map(|(s, lo, hi)| (s, addr.max(lo), end.min(hi)))
                .collect();
            for (s, a, b) in parts {
                self.mark_open_waiting(s, a, b);
            }
        }
        let r = apply();
        if r == 0 {
            for (s, _, _) in self.overlapping(addr, end) {
                s.prot.store(prot, Ordering::Relaxed);
                s.all.store(true, Ordering::Release);
            }
        }
        r
    }

    /// Reports (address, length) the parts of `[addr, addr+len)` that may
    /// have been written since the last harvest, and protects again what
    /// it reports in whole granules. A granule only partly inside the range
    /// is reported (its part) but keeps its bit and stays open. Parts of
    /// the range no slot covers are not reported (see [`Traps::uncovered`]).
    pub fn harvest(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) {
        let _g = self.lock.lock();
        let end = addr.saturating_add(len);
        let mut closed = Vec::new();
        for (s, lo, hi) in self.overlapping(addr, end) {
            let (a, b) = (addr.max(lo), end.min(hi));
            let ro = s.prot.load(Ordering::Relaxed) & !libc::PROT_WRITE;
            let whole = a == lo && b == hi;
            let all = if whole {
                s.all.swap(false, Ordering::AcqRel)
            } else {
                s.all.load(Ordering::Acquire)
            };
            // A range that cannot be protected again (too many VMAs) stays
            // open and counts as all written.
            let mut protect = |x: usize, y: usize| {
                if sys::mprotect(x, y - x, ro).is_err() {
                    s.all.store(true, Ordering::Release);
                } else if let Some(c) = self.regions_of(s, x, y) {
                    closed.push(c);
                }
            };
            if all {
                if whole {
                    // Clear every bit before protecting: all is reported.
                    self.take_bits(s, a, b, &mut |_, _, _| {});
                    protect(a, b);
                }
                out(a, b - a);
                continue;
            }
            self.take_bits(s, a, b, &mut |x, y, taken| {
                if taken {
                    protect(x, y);
                }
                out(x, y - x);
            });
        }
        self.unmark_closed(&closed);
    }

    /// The parts of `[addr, addr+len)` no slot covers.
    pub fn uncovered(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) {
        let end = addr.saturating_add(len);
        let mut covered: Vec<(usize, usize)> = {
            let _g = self.lock.lock();
            self.overlapping(addr, end)
                .map(|(_, lo, hi)| (lo, hi))
                .collect()
        };
        covered.sort_unstable();
        let mut at = addr;
        for (lo, hi) in covered {
            if lo > at {
                out(at, lo - at);
            }
            at = at.max(hi);
        }
        if at < end {
            out(at, end - at);
        }
    }

    /// Clears the bits of the granules of slot `s` wholly inside `[a, b)`
    /// and calls `f(x, y, true)` for each run of them that was set; a set
    /// granule only partly inside gives `f(x, y, false)` for its part, its
    /// bit kept.
    fn take_bits(&self, s: &Slot, a: usize, b: usize, f: &mut dyn FnMut(usize, usize, bool)) {
        let base = s.base.load(Ordering::Relaxed);
        let lo = s.lo.load(Ordering::Relaxed);
        let hi = s.hi.load(Ordering::Relaxed);
        let bits = s.bits.load(Ordering::Acquire);
        let words = s.words.load(Ordering::Relaxed);
        if bits.is_null() {
            return;
        }
        let g = self.granule();
        // A granule's extent within the slot.
        let extent = |i: usize| ((base + i * g).max(lo), (base + (i + 1) * g).min(hi));
        let first = (a - base) >> self.shift;
        let last = ((b - 1 - base) >> self.shift).min(words * 64 - 1); // inclusive
        let mut run: Option<(usize, usize)> = None;
        for w in first / 64..=last / 64 {
            // SAFETY: w < words, within the slot's bitmap.
            let word = unsafe { &*bits.add(w) };
            let lo_bit = if w == first / 64 { first % 64 } else { 0 };
            let hi_bit = if w == last / 64 { last % 64 + 1 } else { 64 };
            let mut mask = if hi_bit == 64 {
                !0u64
            } else {
                (1u64 << hi_bit) - 1
            };
            mask &= !((1u64 << lo_bit) - 1);
            let mut set = word.load(Ordering::Acquire) & mask;
            while set != 0 {
                let k = set.trailing_zeros() as usize;
                set &= set - 1;
                let i = w * 64 + k;
                let (x, y) = extent(i);
                if x >= a && y <= b {
                    word.fetch_and(!(1u64 << k), Ordering::AcqRel);
                    match &mut run {
                        Some((_, e)) if *e == x => *e = y,
                        _ => {
                            if let Some((p, q)) = run.take() {
                                f(p, q, true);
                            }
                            run = Some((x, y));
                        }
                    }
                } else {
                    f(x.max(a), y.min(b), false);
                }
            }
        }
        if let Some((p, q)) = run {
            f(p, q, true);
        }
    }

    /// Fork: the table must not be copied half-changed or held by a thread
    /// the child does not have (the read and mprotect hooks take the lock
    /// without `REG`).
    pub fn hold_for_fork(&self) {
        std::mem::forget(self.lock.lock());
    }

    /// # Safety
    /// After [`Traps::hold_for_fork`], in the parent or (`child`) the child.
    pub unsafe fn release_after_fork(&self, child: bool) {
        if child {
            // A handler of another thread of the parent may have held the
            // `marking` word (it takes no lock fork waits for): that thread
            // does not exist here, and its work does not go on here.
            self.marking.store(0, Ordering::Release);
        }
        // SAFETY: hold_for_fork took it and forgot the guard.
        unsafe { self.lock.force_unlock() };
    }
}
