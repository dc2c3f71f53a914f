//! The fallback tracker for kernels without userfaultfd write-protect in
//! async mode: clean shadow pages are mapped read-only, the first store to
//! one raises SIGSEGV, and the shim's handler records the page and makes it
//! writable. A harvest write-protects again what it reports.
//!
//! - Survives `vm.max_map_count`: every page made writable alone splits a
//!   VMA; when the kernel refuses (`ENOMEM`), the handler makes the whole
//!   range writable (which merges its VMAs back) and marks it all dirty: the
//!   next sync compares it entirely. A store never stays unable to complete.
//! - The program's own SIGSEGV handler keeps working: `sigaction`/`signal`
//!   for SIGSEGV are interposed while this tracker runs (see
//!   `sigchain`), faults that are not ours go to the program's action.
//! - Kernel-side stores (`read(2)` into a shadow page) would fail with EFAULT
//!   on a read-only page: the read hooks open the destination pages first
//!   ([`before_kernel_stores`]).
//!
//! Ordering that keeps stores from being lost: the handler makes the page
//! writable *before* setting its bit; a harvest takes the bits *before* it
//! write-protects. A store between the two lands before the caller copies
//! the page; one after the protect faults and sets its bit again.
//!
//! # Safety
//! The handler touches only atomics and raw system calls (async-signal-safe).
//! Bitmaps are allocated and freed outside the handler, under `TABLE_LOCK`.

use crate::lock::Lock;
use crate::sys::{self, Errno, SysResult, PAGE};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};

const SLOTS: usize = 1024;
/// `si_code` of a fault on a mapped page the protection forbids.
const SEGV_ACCERR: i32 = 2;

/// One tracked range: `[lo, hi)`, bit `i` of `bits` is page `base + i*PAGE`.
struct Slot {
    lo: AtomicUsize,
    hi: AtomicUsize,
    base: AtomicUsize,
    bits: AtomicPtr<std::sync::atomic::AtomicU64>,
    words: AtomicUsize,
    /// The whole range may be dirty (the kernel refused a split).
    all: AtomicBool,
    /// The protection the program asked for (stores are tracked only where
    /// it allows them).
    prot: AtomicI32,
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
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Serialises changes to `TABLE` and harvests (never taken by the handler).
static TABLE_LOCK: Lock<()> = Lock::new(());
/// Slots in use (0: the read hooks skip the lookup).
static USED: AtomicUsize = AtomicUsize::new(0);

pub fn init() -> Result<(), String> {
    crate::sigchain::install_segv_handler(on_segv)?;
    Ok(())
}

fn find(addr: usize) -> Option<&'static Slot> {
    TABLE.iter().find(|s| {
        let lo = s.lo.load(Ordering::Acquire);
        lo != 0 && lo <= addr && addr < s.hi.load(Ordering::Acquire)
    })
}

fn set_bit(s: &Slot, page: usize) {
    let i = (page - s.base.load(Ordering::Relaxed)) / PAGE;
    let bits = s.bits.load(Ordering::Acquire);
    if !bits.is_null() && i / 64 < s.words.load(Ordering::Relaxed) {
        // SAFETY: `bits` holds `words` atomics while the slot is live.
        unsafe { (*bits.add(i / 64)).fetch_or(1 << (i % 64), Ordering::AcqRel) };
    } else {
        s.all.store(true, Ordering::Release);
    }
}

/// Records a store to `page` of slot `s` and lets it complete.
fn open_page(s: &Slot, page: usize) -> bool {
    let prot = s.prot.load(Ordering::Relaxed);
    if prot & libc::PROT_WRITE == 0 {
        return false; // the program's own protection: a real fault
    }
    if sys::mprotect(page, PAGE, prot).is_ok() {
        set_bit(s, page);
        return true;
    }
    // Too many VMAs (vm.max_map_count): open the whole range, which merges
    // its pieces, and compare it all at the next sync.
    let lo = s.lo.load(Ordering::Relaxed);
    let hi = s.hi.load(Ordering::Relaxed);
    s.all.store(true, Ordering::Release);
    sys::mprotect(lo, hi - lo, prot).is_ok()
}

/// The SIGSEGV handler: true if the fault was a tracked first store.
fn on_segv(info: &libc::siginfo_t) -> bool {
    if info.si_code != SEGV_ACCERR {
        return false;
    }
    // SAFETY: SIGSEGV's siginfo carries the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    match find(addr) {
        Some(s) => open_page(s, sys::page_down(addr)),
        None => false,
    }
}

/// Before the kernel stores into `[addr, addr+len)` on the program's
/// behalf: tracked pages there are recorded and opened (the kernel would
/// get EFAULT from a read-only page instead of a signal).
fn before_kernel_stores(addr: usize, len: usize) {
    if USED.load(Ordering::Relaxed) == 0 || len == 0 {
        return;
    }
    let end = addr.saturating_add(len);
    let mut p = sys::page_down(addr);
    while p < end {
        if let Some(s) = find(p) {
            let _ = open_page(s, p);
        }
        p += PAGE;
    }
}

/// Starts tracking `[addr, addr+len)`: write-protects it.
fn track(addr: usize, len: usize, prot: i32) -> SysResult<()> {
    let _g = TABLE_LOCK.lock();
    remove_locked(addr, len);
    let Some(slot) = TABLE.iter().find(|s| s.lo.load(Ordering::Relaxed) == 0) else {
        return Err(Errno(libc::ENOSPC));
    };
    let words = (len / PAGE).div_ceil(64);
    let bits: Box<[std::sync::atomic::AtomicU64]> = (0..words)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    slot.words.store(words, Ordering::Relaxed);
    slot.bits
        .store(Box::into_raw(bits) as *mut _, Ordering::Release);
    slot.base.store(addr, Ordering::Relaxed);
    slot.all.store(false, Ordering::Relaxed);
    slot.prot.store(prot, Ordering::Relaxed);
    slot.hi.store(addr + len, Ordering::Release);
    slot.lo.store(addr, Ordering::Release);
    USED.fetch_add(1, Ordering::Relaxed);
    sys::mprotect(addr, len, prot & !libc::PROT_WRITE)
}

/// Stops tracking `[addr, addr+len)` (unmapped or moved).
fn untrack(addr: usize, len: usize) {
    let _g = TABLE_LOCK.lock();
    remove_locked(addr, len);
}

fn free_bits(s: &Slot) {
    let bits = s.bits.swap(std::ptr::null_mut(), Ordering::AcqRel);
    let shared = TABLE
        .iter()
        .any(|o| o.lo.load(Ordering::Relaxed) != 0 && o.bits.load(Ordering::Relaxed) == bits);
    if !bits.is_null() && !shared {
        let words = s.words.load(Ordering::Relaxed);
        // SAFETY: allocated in `track` as a boxed slice of `words` atomics;
        // no live slot refers to it any more.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(bits, words)) });
    }
}

/// Cuts `[addr, end)` out of every slot (splitting one that straddles it).
fn remove_locked(addr: usize, len: usize) {
    let end = addr.saturating_add(len);
    for s in TABLE.iter() {
        let lo = s.lo.load(Ordering::Relaxed);
        let hi = s.hi.load(Ordering::Relaxed);
        if lo == 0 || hi <= addr || lo >= end {
            continue;
        }
        if addr <= lo && hi <= end {
            s.lo.store(0, Ordering::Release);
            s.hi.store(0, Ordering::Release);
            USED.fetch_sub(1, Ordering::Relaxed);
            free_bits(s);
        } else if addr <= lo {
            s.lo.store(end, Ordering::Release);
        } else if hi <= end {
            s.hi.store(addr, Ordering::Release);
        } else if let Some(t) = TABLE.iter().find(|t| t.lo.load(Ordering::Relaxed) == 0) {
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
            USED.fetch_add(1, Ordering::Relaxed);
            s.hi.store(addr, Ordering::Release);
        } else {
            // No slot for the tail: stop tracking it (the caller compares).
            s.hi.store(addr, Ordering::Release);
        }
    }
}

/// The program changed the protection of `[addr, addr+len)`: stores it now
/// allows are not tracked page by page, so tracked slots there count as
/// all dirty until the next harvest protects them again.
fn on_mprotect(addr: usize, len: usize, prot: i32) {
    let _g = TABLE_LOCK.lock();
    let end = addr.saturating_add(len);
    for s in TABLE.iter() {
        let lo = s.lo.load(Ordering::Relaxed);
        let hi = s.hi.load(Ordering::Relaxed);
        if lo != 0 && lo < end && addr < hi {
            s.prot.store(prot, Ordering::Relaxed);
            s.all.store(true, Ordering::Release);
        }
    }
}

/// Reports the pages written in `[addr, addr+len)` and protects them again.
/// Bits are taken *before* the pages are protected: a store between the two
/// lands before the caller copies the page; one after faults and sets its
/// bit again (the handler opens the page before setting it).
fn harvest(addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
    let _g = TABLE_LOCK.lock();
    let end = addr.saturating_add(len);
    for s in TABLE.iter() {
        let lo = s.lo.load(Ordering::Relaxed);
        let hi = s.hi.load(Ordering::Relaxed);
        if lo == 0 || hi <= addr || lo >= end {
            continue;
        }
        let (a, b) = (addr.max(lo), end.min(hi));
        let ro = s.prot.load(Ordering::Relaxed) & !libc::PROT_WRITE;
        let whole = a == lo && b == hi;
        let all = if whole {
            s.all.swap(false, Ordering::AcqRel)
        } else {
            s.all.load(Ordering::Acquire)
        };
        let taken = take_bits(s, a, b);
        if all {
            sys::mprotect(a, b - a, ro)?;
            out(a, b - a);
            continue;
        }
        for (x, y) in taken {
            sys::mprotect(x, y - x, ro)?;
            out(x, y - x);
        }
    }
    Ok(())
}

/// Clears the bits of `[a, b)` and returns the runs of pages that were set.
fn take_bits(s: &Slot, a: usize, b: usize) -> Vec<(usize, usize)> {
    let base = s.base.load(Ordering::Relaxed);
    let bits = s.bits.load(Ordering::Acquire);
    let words = s.words.load(Ordering::Relaxed);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    if bits.is_null() {
        return runs;
    }
    let first = (a - base) / PAGE;
    let last = ((b - base) / PAGE).min(words * 64); // exclusive
    let mut i = first;
    while i < last {
        let w = i / 64;
        let lo_bit = i % 64;
        let hi_bit = (last - w * 64).min(64);
        let mask = if hi_bit == 64 {
            !0u64
        } else {
            (1u64 << hi_bit) - 1
        } & !((1u64 << lo_bit) - 1);
        // SAFETY: w < words, within the slot's bitmap.
        let got = unsafe { (*bits.add(w)).fetch_and(!mask, Ordering::AcqRel) } & mask;
        let mut m = got;
        while m != 0 {
            let k = m.trailing_zeros() as usize;
            m &= m - 1;
            let p = base + (w * 64 + k) * PAGE;
            match runs.last_mut() {
                Some((_, e)) if *e == p => *e = p + PAGE,
                _ => runs.push((p, p + PAGE)),
            }
        }
        i = (w + 1) * 64;
    }
    runs
}

pub struct MprotectTracker;

impl super::DirtyTracker for MprotectTracker {
    fn name(&self) -> &'static str {
        "mprotect"
    }
    fn is_exact(&self) -> bool {
        true
    }
    fn track(&self, addr: usize, len: usize) -> SysResult<()> {
        track(addr, len, libc::PROT_READ | libc::PROT_WRITE)
    }
    fn track_with_prot(&self, addr: usize, len: usize, prot: i32) -> SysResult<()> {
        track(addr, len, prot)
    }
    fn untrack(&self, addr: usize, len: usize) {
        untrack(addr, len)
    }
    fn arm(&self, addr: usize, len: usize) -> SysResult<()> {
        // A tail grown in place: protect it and cover it by the slot.
        let _g = TABLE_LOCK.lock();
        for s in TABLE.iter() {
            if s.hi.load(Ordering::Relaxed) == addr && s.lo.load(Ordering::Relaxed) != 0 {
                // Beyond the bitmap: counts as all dirty when written.
                s.hi.store(addr + len, Ordering::Release);
                let ro = s.prot.load(Ordering::Relaxed) & !libc::PROT_WRITE;
                return sys::mprotect(addr, len, ro);
            }
        }
        Err(Errno(libc::ENOENT))
    }
    fn harvest(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
        harvest(addr, len, out)
    }
    fn after_fork_child(&self) -> SysResult<()> {
        // Protections, the handler and the table are inherited as they are.
        // SAFETY: no other thread exists in the child.
        unsafe { TABLE_LOCK.force_unlock() };
        Ok(())
    }
    fn before_kernel_stores(&self, addr: usize, len: usize) {
        before_kernel_stores(addr, len)
    }
    fn on_program_mprotect(&self, addr: usize, len: usize, prot: i32) {
        on_mprotect(addr, len, prot)
    }
}
