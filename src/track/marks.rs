//! Region marks: the shared table (`<key>.regions`, mapped by every process
//! attached to a shadow) that lets one process evict clean pages of a shadow
//! other processes map. Per 2 MiB region of the file:
//!
//! - `open`: one bit per process slot, set while that process's region
//!   trap there is open (it may store into the region without a fault);
//! - `evicting`: the pid of a process comparing and punching pages there;
//! - `fills`: fills in progress there in some process's fault handler
//!   (which takes no lock): an evictor leaves a region alone while one
//!   runs, and a fill waits while another process evicts, so that a page
//!   filled and its line bases never meet a punch half way.
//!
//! Dekker between the two: a trap handler sets its bit, then reads
//! `evicting` (and waits while another process evicts before it opens the
//! region); an evictor sets `evicting`, then reads the bits (and leaves the
//! region alone if another live process has it open). Both are sequentially
//! consistent read-modify-writes followed by loads, so at least one of the
//! two sees the other. A region every other process keeps closed can only
//! be stored to after a fault that waits for the evictor; what was stored
//! before, and not yet written back, differs from the backing and is not
//! punched (the evictor compares every page).
//!
//! Clearing a bit is the harvest's job ([`super::traps`]), after it has
//! write-protected the region again.
//!
//! # Safety
//! A table address is the start of a mapping of [`TABLE_BYTES`] that stays
//! mapped while any trap slot refers to it (the file state that owns the
//! mapping outlives its mappings' traps). Everything here is
//! async-signal-safe: atomics and raw system calls.

use crate::sys;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// log2 of a region's size (the region traps' granule).
pub const REGION_SHIFT: u32 = 21;
/// Regions the table covers: files up to 64 TiB.
pub const MAX_REGIONS: u64 = 1 << 25;
/// Bytes of one table (sparse: a page of it is allocated when a region of
/// the 256 MiB of file it covers is first marked).
pub const TABLE_BYTES: u64 = MAX_REGIONS * std::mem::size_of::<Mark>() as u64;
/// Process slots a mark has a bit for (the shadow header's slots).
pub const SLOT_BITS: usize = 128;

#[repr(C)]
pub struct Mark {
    evicting: AtomicU32,
    fills: AtomicU32,
    open: [AtomicU64; SLOT_BITS / 64],
    _spare: u64,
}

const _: () = assert!(std::mem::size_of::<Mark>() == 32);

/// The regions of `[a, b)` (file offsets), clamped to the table.
pub fn regions_of(a: u64, b: u64) -> std::ops::Range<u64> {
    if a >= b {
        return 0..0;
    }
    (a >> REGION_SHIFT).min(MAX_REGIONS)
        ..((b - 1) >> REGION_SHIFT).saturating_add(1).min(MAX_REGIONS)
}

fn mark(table: usize, r: u64) -> &'static Mark {
    // SAFETY: the module's contract: `table` maps MAX_REGIONS marks, `r`
    // is below MAX_REGIONS (regions_of clamps), and the mapping outlives
    // every caller's use.
    unsafe { &*(table as *const Mark).add(r as usize) }
}

fn bit(slot: usize) -> (usize, u64) {
    (slot / 64 % (SLOT_BITS / 64), 1u64 << (slot % 64))
}

/// Sets `slot`'s open bit on the regions; false if another process is
/// evicting one of them (the bits stay set: wait with [`wait_evictors`],
/// then try again before storing).
pub fn set_open(table: usize, regions: std::ops::Range<u64>, slot: usize) -> bool {
    let (w, b) = bit(slot);
    let me = sys::getpid() as u32;
    let mut free = true;
    for r in regions.clone() {
        mark(table, r).open[w].fetch_or(b, Ordering::SeqCst);
    }
    fence(Ordering::SeqCst);
    for r in regions {
        let e = mark(table, r).evicting.load(Ordering::SeqCst);
        if e != 0 && e != me {
            free = false;
        }
    }
    free
}

/// Clears `slot`'s open bit on region `r`.
pub fn clear_open(table: usize, r: u64, slot: usize) {
    let (w, b) = bit(slot);
    mark(table, r).open[w].fetch_and(!b, Ordering::SeqCst);
}

/// A fill of the regions may start: counted in their `fills` unless another
/// process evicts one of them (then nothing is counted: wait with
/// [`wait_evictors`] and try again).
pub fn enter_fill(table: usize, regions: std::ops::Range<u64>) -> bool {
    let me = sys::getpid() as u32;
    for r in regions.clone() {
        mark(table, r).fills.fetch_add(1, Ordering::SeqCst);
    }
    fence(Ordering::SeqCst);
    let free = regions.clone().all(|r| {
        let e = mark(table, r).evicting.load(Ordering::SeqCst);
        e == 0 || e == me
    });
    if !free {
        leave_fill(table, regions);
    }
    free
}

/// The end of a fill [`enter_fill`] counted.
pub fn leave_fill(table: usize, regions: std::ops::Range<u64>) {
    for r in regions {
        mark(table, r).fills.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Clears `slot`'s bit on every region of `regions` (reading first: a page
/// of the table nobody marked stays unallocated).
pub fn clear_slot(table: usize, regions: std::ops::Range<u64>, slot: usize) {
    let (w, b) = bit(slot);
    for r in regions {
        let word = &mark(table, r).open[w];
        if word.load(Ordering::Relaxed) & b != 0 {
            word.fetch_and(!b, Ordering::SeqCst);
        }
    }
}

/// Waits until no other process evicts in the regions. An evictor that died
/// holding a region is taken off it.
pub fn wait_evictors(table: usize, regions: std::ops::Range<u64>) {
    let me = sys::getpid() as u32;
    for r in regions {
        let word = &mark(table, r).evicting;
        loop {
            let e = word.load(Ordering::SeqCst);
            if e == 0 || e == me {
                break;
            }
            sys::futex_wait_shared_ms(word, e, 10);
            if word.load(Ordering::SeqCst) == e && sys::process_gone(e as i32) {
                let _ = word.compare_exchange(e, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
    }
}

/// Does a slot other than `own_slot` that `dead` does not call dead have
/// a region of `regions` open? (A cheap look before an evictor takes its
/// locks; [`Evicting::begin`] decides.)
pub fn others_open(
    table: usize,
    regions: std::ops::Range<u64>,
    own_slot: usize,
    dead: &dyn Fn(usize) -> bool,
) -> bool {
    let (ow, ob) = bit(own_slot);
    regions.into_iter().any(|r| {
        mark(table, r).open.iter().enumerate().any(|(w, word)| {
            let mut bits = word.load(Ordering::SeqCst);
            if w == ow {
                bits &= !ob;
            }
            while bits != 0 {
                let k = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if !dead(w * 64 + k) {
                    return true;
                }
            }
            false
        })
    })
}

/// An eviction's hold on some regions (released on drop).
pub struct Evicting {
    table: usize,
    regions: std::ops::Range<u64>,
}

impl Evicting {
    /// Takes the regions for this process if no other process may store
    /// into them without a fault: none evicts there and no other slot's
    /// bit is set, except slots `dead` calls dead.
    pub fn begin(
        table: usize,
        regions: std::ops::Range<u64>,
        own_slot: usize,
        dead: &dyn Fn(usize) -> bool,
    ) -> Option<Evicting> {
        let me = sys::getpid() as u32;
        let mut held = Evicting {
            table,
            regions: regions.start..regions.start,
        };
        for r in regions.clone() {
            let m = mark(table, r);
            if m.evicting
                .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return None; // dropping `held` lets go of what it took
            }
            held.regions.end = r + 1;
        }
        fence(Ordering::SeqCst);
        let filling = regions
            .clone()
            .any(|r| mark(table, r).fills.load(Ordering::SeqCst) != 0);
        if filling || others_open(table, regions, own_slot, dead) {
            return None;
        }
        Some(held)
    }
}

impl Drop for Evicting {
    fn drop(&mut self) {
        for r in self.regions.clone() {
            let word = &mark(self.table, r).evicting;
            word.store(0, Ordering::SeqCst);
            sys::futex_wake_shared(word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_cover_the_range() {
        assert_eq!(regions_of(0, 1), 0..1);
        assert_eq!(regions_of(0, 2 << 20), 0..1);
        assert_eq!(regions_of((2 << 20) - 1, (2 << 20) + 1), 0..2);
        assert_eq!(regions_of(5, 5), 0..0);
        assert_eq!(regions_of(u64::MAX - 1, u64::MAX), MAX_REGIONS..MAX_REGIONS);
    }

    fn open_slots(table: usize, regions: std::ops::Range<u64>) -> [u64; SLOT_BITS / 64] {
        let mut out = [0u64; SLOT_BITS / 64];
        for r in regions {
            for (o, w) in out.iter_mut().zip(mark(table, r).open.iter()) {
                *o |= w.load(Ordering::Relaxed);
            }
        }
        out
    }

    fn table(n: usize) -> Vec<Mark> {
        (0..n)
            .map(|_| Mark {
                evicting: AtomicU32::new(0),
                fills: AtomicU32::new(0),
                open: [AtomicU64::new(0), AtomicU64::new(0)],
                _spare: 0,
            })
            .collect()
    }

    #[test]
    fn an_open_region_of_another_slot_keeps_the_evictor_out() {
        let t = table(4);
        let a = t.as_ptr() as usize;
        assert!(set_open(a, 1..3, 70));
        assert!(Evicting::begin(a, 2..3, 5, &|_| false).is_none());
        // The failed attempt let go of the region.
        assert_eq!(t[2].evicting.load(Ordering::Relaxed), 0);
        // Its own bit, or a dead slot's, does not.
        assert!(Evicting::begin(a, 2..3, 70, &|_| false).is_some());
        assert!(Evicting::begin(a, 2..3, 5, &|s| s == 70).is_some());
        clear_open(a, 2, 70);
        let e = Evicting::begin(a, 0..3, 5, &|_| false);
        assert!(e.is_none(), "region 1 is still open");
        clear_open(a, 1, 70);
        let e = Evicting::begin(a, 0..3, 5, &|_| false).expect("all closed");
        assert_eq!(open_slots(a, 0..4), [0, 0]);
        // Another process's evictor holds them: a trap handler must wait;
        // this process's own does not count.
        t[1].evicting.store(1, Ordering::SeqCst);
        assert!(!set_open(a, 1..2, 3));
        assert_eq!(open_slots(a, 1..2), [1 << 3, 0]);
        t[1].evicting.store(sys::getpid() as u32, Ordering::SeqCst);
        assert!(set_open(a, 1..2, 3));
        drop(e);
        assert_eq!(t[0].evicting.load(Ordering::Relaxed), 0);
        // A fill in progress keeps the evictor out; an evictor of another
        // process keeps a fill from starting.
        assert!(enter_fill(a, 2..3));
        assert!(Evicting::begin(a, 2..3, 5, &|_| true).is_none());
        leave_fill(a, 2..3);
        assert!(Evicting::begin(a, 2..3, 5, &|_| true).is_some());
        t[2].evicting.store(1, Ordering::SeqCst);
        assert!(!enter_fill(a, 2..3));
        assert_eq!(t[2].fills.load(Ordering::Relaxed), 0);
    }
}
