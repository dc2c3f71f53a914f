//! Line bases: for each 64-byte line of a shadow, a 32-bit hash of what the
//! backing held when the shim last knew it (it filled the line, wrote it
//! through `write(2)`, wrote it back, or adopted a change made outside the
//! shim). With it a sync tells who changed a line that differs between the
//! shadow and the backing: only the shim (write the shadow's bytes back),
//! only someone outside the shim (take the backing's bytes into the shadow:
//! never undo them), or both (a conflict: the shim's bytes win).
//!
//! 0 means "unknown" (a line never hashed): such a line is written back, as
//! before bases existed. Hashes are never 0 otherwise.
//!
//! # Safety
//! A [`Bases`] points at a shared mapping of `count` `AtomicU32`s that its
//! creator keeps mapped while it is used.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::LINE;

/// The hash of `n` bytes at `p` (a line, or the partial last line of a
/// file, which hashes as if zero-padded). Never 0.
///
/// # Safety
/// `n <= 64` bytes readable at `p`.
pub unsafe fn line_hash(p: *const u8, n: usize) -> u32 {
    if n >= LINE {
        // A whole line: its words are read where they are. (Copied into a
        // buffer first, each word's load waited for the copy's wide stores:
        // a third of a lazy fill's time went to hashing.)
        // SAFETY: 64 readable bytes (contract).
        let w: [u64; 8] =
            std::array::from_fn(|i| unsafe { (p.add(i * 8) as *const u64).read_unaligned() });
        return hash_words(w);
    }
    let mut words = [0u64; 8];
    // SAFETY: n < 64 readable bytes (contract) into a 64-byte buffer.
    unsafe { std::ptr::copy_nonoverlapping(p, words.as_mut_ptr() as *mut u8, n) };
    hash_words(words)
}

#[inline(always)]
fn hash_words(w: [u64; 8]) -> u32 {
    // Multiply-xorshift over the eight words (a 2^-32 chance that a change
    // goes unseen, which would make a sync write the shim's line back over
    // it, as it always did before bases existed).
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for x in w {
        h = (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    h = (h ^ (h >> 32)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let v = (h >> 32) as u32;
    if v == 0 {
        1
    } else {
        v
    }
}

/// The hash of a line of zeros (a hole, or a file grown by truncation).
pub fn zero_hash() -> u32 {
    hash_words([0; 8])
}

/// Who changed a line that differs between the shadow and the backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The shim (or nobody knows: no base): write the shadow's bytes back.
    Shim,
    /// Only someone outside the shim: the shadow takes the backing's bytes.
    Foreign,
    /// Both: the shim's bytes win.
    Both,
}

/// Decides from the line's base hash and the two sides.
///
/// # Safety
/// `n <= 64` readable bytes at `shadow` and `backing`.
pub unsafe fn who_changed(base: u32, shadow: *const u8, backing: *const u8, n: usize) -> Change {
    if base == 0 {
        return Change::Shim;
    }
    // SAFETY: per contract.
    if unsafe { line_hash(backing, n) } == base {
        return Change::Shim;
    }
    // SAFETY: per contract.
    if unsafe { line_hash(shadow, n) } == base {
        Change::Foreign
    } else {
        Change::Both
    }
}

/// Copies a line the backing changed into the shadow, word by word with a
/// compare-and-swap against what the shadow held, so that a store racing
/// with it into the same line wins (it happened after the outside write).
///
/// # Safety
/// `n <= 64` bytes; `shadow` writable and 8-byte aligned, `backing`
/// readable, both with `n` bytes; `seen` is what the shadow held.
pub unsafe fn adopt_line(shadow: *mut u8, backing: *const u8, seen: &[u8], n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: within the line (contract); 8-byte aligned shared memory.
        let (w, new) = unsafe {
            (
                AtomicU64::from_ptr(shadow.add(i) as *mut u64),
                (backing.add(i) as *const u64).read_unaligned(),
            )
        };
        let old = u64::from_ne_bytes(seen[i..i + 8].try_into().expect("8 bytes"));
        let _ = w.compare_exchange(old, new, Ordering::AcqRel, Ordering::Relaxed);
        i += 8;
    }
    while i < n {
        // A partial last line (end of file): bytewise.
        // SAFETY: within the line.
        unsafe { shadow.add(i).write(backing.add(i).read()) };
        i += 1;
    }
}

/// The bases of a shadow, as a slice of atomics in shared memory.
#[derive(Clone, Copy)]
pub struct Bases {
    ptr: *const AtomicU32,
    count: usize,
}

impl Bases {
    /// # Safety
    /// `ptr` points at `count` `AtomicU32`s that stay mapped while this
    /// value (and its copies) is used.
    pub unsafe fn new(ptr: *const AtomicU32, count: usize) -> Bases {
        Bases { ptr, count }
    }

    /// The base of the line at file offset `off` (0: unknown).
    pub fn get(&self, off: u64) -> u32 {
        self.slot(off).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    pub fn set(&self, off: u64, h: u32) {
        if let Some(a) = self.slot(off) {
            a.store(h, Ordering::Relaxed);
        }
    }

    fn slot(&self, off: u64) -> Option<&AtomicU32> {
        let i = (off / LINE as u64) as usize;
        // SAFETY: i < count, within the mapping (constructor contract).
        (i < self.count).then(|| unsafe { &*self.ptr.add(i) })
    }

    /// Hashes `bytes`, which the backing holds at `off` (line-aligned), into
    /// the bases of their lines; a partial last line is hashed as it is.
    pub fn record(&self, off: u64, bytes: &[u8]) {
        debug_assert_eq!(off % LINE as u64, 0);
        for (k, line) in bytes.chunks(LINE).enumerate() {
            // SAFETY: `line` is at most 64 readable bytes.
            self.set(off + (k * LINE) as u64, unsafe {
                line_hash(line.as_ptr(), line.len())
            });
        }
    }

    /// Sets the bases of `[a, b)` (line-aligned) to the hash of zeros. Reads
    /// first and writes only what differs: a file that shrinks and grows
    /// back over the same range at every record (Kyoto Cabinet) finds the
    /// bases there already zero, and reads cost less than dirtying them.
    pub fn record_zeros(&self, a: u64, b: u64) {
        let z = zero_hash();
        let i0 = ((a / LINE as u64) as usize).min(self.count);
        let i1 = (b.div_ceil(LINE as u64) as usize).min(self.count);
        // SAFETY: i0 <= i1 <= count, within the mapping (constructor
        // contract).
        let slots = unsafe { std::slice::from_raw_parts(self.ptr.add(i0), i1 - i0) };
        let set = |group: &[AtomicU32]| {
            for s in group {
                if s.load(Ordering::Relaxed) != z {
                    s.store(z, Ordering::Relaxed);
                }
            }
        };
        // Sixty-four at a time, read as plain words and XOR-ORed against the
        // zero hash (branch-free, vectorised by the compiler; a group-wise
        // `any` ran at a third of the speed): a racing store by another
        // process only sends the group to the slot-by-slot path.
        let zz = (z as u64) << 32 | z as u64;
        let mut groups = slots.chunks_exact(64);
        for group in &mut groups {
            let words = group.as_ptr() as *const u64;
            let mut diff = 0u64;
            for i in 0..32 {
                // SAFETY: 64 slots (256 bytes) of the mapping, read as 32
                // words (unaligned: a group starts at any slot); the value
                // read is only compared.
                diff |= unsafe { words.add(i).read_unaligned() } ^ zz;
            }
            if diff != 0 {
                set(group);
            }
        }
        set(groups.remainder());
    }
}

// SAFETY: the atomics are shared by design.
unsafe impl Send for Bases {}
// SAFETY: as above.
unsafe impl Sync for Bases {}

/// Takes into the shadow every line of `[start, end)` that the backing
/// changed outside the shim while the shim left it alone; lines both sides
/// changed stay as the shadow has them (the next sync writes them back, a
/// conflict). Returns the lines taken.
///
/// # Safety
/// Both views cover `[start, end)`; the shadow view is writable.
pub unsafe fn adopt_changes(
    shadow: usize,
    backing: usize,
    start: u64,
    end: u64,
    bases: &Bases,
) -> u64 {
    let mut taken = 0;
    let mut off = start - start % LINE as u64;
    while off < end {
        let n = (LINE as u64).min(end - off) as usize;
        let (s, b) = (
            (shadow + off as usize) as *mut u8,
            (backing + off as usize) as *const u8,
        );
        let base = bases.get(off);
        // SAFETY: n bytes at both views (contract).
        let hb = unsafe { line_hash(b, n) };
        if hb != base && base != 0 {
            let mut seen = [0u8; LINE];
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(s, seen.as_mut_ptr(), n) };
            // SAFETY: as above.
            let now = unsafe { std::slice::from_raw_parts(b, n) };
            // SAFETY: `seen` holds n bytes.
            let shadow_is_base = unsafe { line_hash(seen.as_ptr(), n) } == base;
            if seen[..n] == *now {
                // Both sides agree again.
                bases.set(off, hb);
            } else if shadow_is_base {
                // SAFETY: as above; writable shadow view.
                unsafe { adopt_line(s, b, &seen, n) };
                bases.set(off, hb);
                taken += 1;
            }
        }
        off += n as u64;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_tell_lines_apart_and_are_never_zero() {
        let a = [0u8; 64];
        let mut b = [0u8; 64];
        b[63] = 1;
        // SAFETY: 64-byte arrays.
        let (ha, hb) = unsafe { (line_hash(a.as_ptr(), 64), line_hash(b.as_ptr(), 64)) };
        assert_ne!(ha, hb);
        assert_ne!(ha, 0);
        assert_eq!(ha, zero_hash());
        // A partial line hashes as if zero-padded.
        // SAFETY: 10 bytes.
        assert_eq!(unsafe { line_hash(a.as_ptr(), 10) }, zero_hash());
    }

    #[test]
    fn a_whole_line_hashes_as_its_zero_padded_prefix_would() {
        // The two paths of line_hash (words read in place; copied into a
        // zeroed buffer) agree: a line whose tail is zeros hashes the same
        // whole and cut short, and bases made by either are one format.
        let mut line = [0u8; 64];
        for (i, b) in line.iter_mut().enumerate().take(40) {
            *b = (i * 7 + 3) as u8;
        }
        // SAFETY: 64 bytes at an unaligned offset of a larger buffer too.
        unsafe {
            let whole = line_hash(line.as_ptr(), 64);
            assert_eq!(whole, line_hash(line.as_ptr(), 40));
            let mut shifted = [0u8; 65];
            shifted[1..].copy_from_slice(&line);
            assert_eq!(whole, line_hash(shifted.as_ptr().add(1), 64));
            assert_ne!(whole, line_hash(line.as_ptr(), 39));
        }
    }

    #[test]
    fn zeros_are_recorded_over_the_range_only() {
        let z = zero_hash();
        let slots: Vec<AtomicU32> = (0..100)
            .map(|i| AtomicU32::new(if i % 3 == 0 { z } else { 7 + i }))
            .collect();
        // SAFETY: 100 atomics that outlive `b`.
        let b = unsafe { Bases::new(slots.as_ptr(), slots.len()) };
        // Lines 5 to 82 (the last one partial): several groups of 16 and a
        // remainder, groups that hold zeros already and groups that do not.
        b.record_zeros(5 * LINE as u64, 82 * LINE as u64 + 10);
        for (i, s) in slots.iter().enumerate() {
            let v = s.load(Ordering::Relaxed);
            if (5..=82).contains(&i) {
                assert_eq!(v, z, "slot {i}");
            } else if i % 3 != 0 {
                assert_eq!(v, 7 + i as u32, "slot {i}");
            }
        }
        // Past the end: nothing (and no panic).
        b.record_zeros(90 * LINE as u64, 200 * LINE as u64);
        assert!(slots[90..].iter().all(|s| s.load(Ordering::Relaxed) == z));
    }

    #[test]
    fn zeros_skip_groups_that_hold_them_and_find_one_slot_that_does_not() {
        let z = zero_hash();
        let slots: Vec<AtomicU32> = (0..300).map(|_| AtomicU32::new(z)).collect();
        // One stale slot in the second group of 64, one in the remainder.
        slots[100].store(5, Ordering::Relaxed);
        slots[290].store(6, Ordering::Relaxed);
        // SAFETY: 300 atomics that outlive `b`.
        let b = unsafe { Bases::new(slots.as_ptr(), slots.len()) };
        b.record_zeros(0, 300 * LINE as u64);
        assert!(slots.iter().all(|s| s.load(Ordering::Relaxed) == z));
    }

    #[test]
    fn who_changed_a_line() {
        let base_bytes = [1u8; 64];
        // SAFETY: 64-byte arrays.
        let base = unsafe { line_hash(base_bytes.as_ptr(), 64) };
        let shim = [2u8; 64];
        let foreign = [3u8; 64];
        // SAFETY: 64-byte arrays throughout.
        unsafe {
            assert_eq!(
                who_changed(base, shim.as_ptr(), base_bytes.as_ptr(), 64),
                Change::Shim
            );
            assert_eq!(
                who_changed(base, base_bytes.as_ptr(), foreign.as_ptr(), 64),
                Change::Foreign
            );
            assert_eq!(
                who_changed(base, shim.as_ptr(), foreign.as_ptr(), 64),
                Change::Both
            );
            assert_eq!(
                who_changed(0, base_bytes.as_ptr(), foreign.as_ptr(), 64),
                Change::Shim
            );
        }
    }

    #[test]
    fn adopting_keeps_a_racing_store() {
        #[repr(align(64))]
        struct L([u8; 64]);
        let mut shadow = L([1; 64]);
        let seen = [1u8; 64];
        let backing = [3u8; 64];
        shadow.0[8] = 9; // a store after `seen` was taken, in word 1
                         // SAFETY: 64 aligned writable bytes, 64 readable.
        unsafe { adopt_line(shadow.0.as_mut_ptr(), backing.as_ptr(), &seen, 64) };
        assert_eq!(&shadow.0[..8], &[3; 8]);
        assert_eq!(shadow.0[8], 9);
        assert_eq!(&shadow.0[16..], &[3; 48]);
    }
}
