//! Cacheline diff: only lines that differ are copied and flushed.
//!
//! # Safety
//! `sync_lines` works on raw pointers into shared mappings that other threads
//! and processes may store to concurrently; a line torn by such a store is
//! harmless because the page is then dirty again and the next sync copies it.

use super::flush::Flusher;

pub const LINE: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineCounts {
    pub compared: u64,
    pub written: u64,
    /// Pages with at least one line written (set by `write_back`).
    pub pages_written: u64,
    /// Lines only changed outside the shim: taken into the shadow.
    pub foreign: u64,
    /// Lines changed on both sides: the shim's bytes were written.
    pub conflicts: u64,
    /// The file offset of the first conflict.
    pub first_conflict: Option<u64>,
}

impl std::ops::AddAssign for LineCounts {
    fn add_assign(&mut self, o: LineCounts) {
        self.compared += o.compared;
        self.written += o.written;
        self.pages_written += o.pages_written;
        self.foreign += o.foreign;
        self.conflicts += o.conflicts;
        self.first_conflict = self.first_conflict.or(o.first_conflict);
    }
}

#[inline]
pub unsafe fn line_equal(a: *const u8, b: *const u8, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if n == LINE && std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; 64 readable bytes at both (caller).
        return unsafe { line_equal_avx2(a, b) };
    }
    if n == LINE {
        // XOR-OR over eight words: branch-free, vectorised by the compiler.
        let mut diff = 0u64;
        for i in 0..8 {
            // SAFETY: caller guarantees n readable bytes at both; lines are
            // 64-byte aligned within page-aligned mappings.
            unsafe {
                diff |= (a as *const u64).add(i).read() ^ (b as *const u64).add(i).read();
            }
        }
        diff == 0
    } else {
        // SAFETY: as above, n bytes.
        unsafe { std::slice::from_raw_parts(a, n) == std::slice::from_raw_parts(b, n) }
    }
}

/// Two 32-byte loads per side, XOR, OR, one test: the compare runs at
/// memory bandwidth (measured here: ~13 GB/s, against ~6 for `memcmp`).
///
/// # Safety
/// AVX2 present; 64 readable bytes at `a` and `b`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn line_equal_avx2(a: *const u8, b: *const u8) -> bool {
    use std::arch::x86_64::*;
    // SAFETY: 64 readable bytes at both (function contract); unaligned loads.
    unsafe {
        let x0 = _mm256_loadu_si256(a as *const __m256i);
        let x1 = _mm256_loadu_si256(a.add(32) as *const __m256i);
        let y0 = _mm256_loadu_si256(b as *const __m256i);
        let y1 = _mm256_loadu_si256(b.add(32) as *const __m256i);
        let d = _mm256_or_si256(_mm256_xor_si256(x0, y0), _mm256_xor_si256(x1, y1));
        _mm256_testz_si256(d, d) != 0
    }
}

/// Runs of at least this many changed lines (a whole page) are copied with
/// non-temporal stores, which bypass the cache and need no flush; shorter
/// ones are copied and flushed line by line. Decided by measurement here
/// (daxshim-bench, DRAM): copy + `clwb` is faster for scattered runs of up
/// to 32 lines whose destination the compare just read (17–45 ns/line
/// against 22–42), while whole changed pages stream faster (writeback of a
/// fully dirty mapping 12.6 GB/s against 9.6). PMDK's 256 bytes was
/// measured on Optane, whose economics differ.
pub const STREAM_MIN_LINES: usize = 64;

/// Compares `len` bytes of `src` (shadow) and `dst` (backing) line by line,
/// copies the differing lines into `dst` and makes each persistent: short
/// runs by copy + flush, long ones by non-temporal stores (the caller's one
/// fence orders both). `budget` counts down lines still allowed to be
/// written (fault injection); when it reaches zero, `on_budget_exhausted`
/// runs.
///
/// # Safety
/// `src` must be readable and `dst` readable and writable for `len` bytes,
/// both 64-byte aligned.
pub unsafe fn sync_lines(
    src: *const u8,
    dst: *mut u8,
    len: usize,
    flusher: &mut Flusher,
    budget: &mut Option<u64>,
    on_budget_exhausted: fn(),
) -> LineCounts {
    debug_assert_eq!(src as usize % LINE, 0);
    debug_assert_eq!(dst as usize % LINE, 0);
    let mut c = LineCounts::default();
    let mut off = 0;
    while off < len {
        // The run of differing lines starting at `off`, if any.
        let mut end = off;
        while end < len {
            let n = LINE.min(len - end);
            c.compared += 1;
            // SAFETY: end + n <= len, n bytes readable at both.
            if unsafe { line_equal(src.add(end), dst.add(end), n) } {
                break;
            }
            end += n;
        }
        let run = end - off;
        let stream = flusher.can_stream() && run >= STREAM_MIN_LINES * LINE;
        let mut at = off;
        while at < end {
            let n = LINE.min(end - at);
            if let Some(b) = budget {
                if *b == 0 {
                    on_budget_exhausted();
                } else {
                    *b -= 1;
                }
            }
            // SAFETY: n bytes within both ranges, distinct mappings.
            let (s, d) = unsafe { (src.add(at), dst.add(at)) };
            if stream && n == LINE {
                // SAFETY: a whole 64-byte aligned line at both.
                unsafe { flusher.stream_line(s, d) };
            } else {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(s, d, n) };
                flusher.flush_line(d);
            }
            c.written += 1;
            at += n;
        }
        // Past the run and the equal line that ended it.
        off = if end < len {
            end + LINE.min(len - end)
        } else {
            end
        };
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::FlushKind;

    #[repr(align(4096))]
    struct Page([u8; 4096]);

    fn run(src: &Page, dst: &mut Page, len: usize) -> (LineCounts, u64) {
        let mut f = Flusher::new(FlushKind::None);
        // SAFETY: two page-aligned 4 KiB buffers, len <= 4096.
        let c = unsafe {
            sync_lines(
                src.0.as_ptr(),
                dst.0.as_mut_ptr(),
                len,
                &mut f,
                &mut None,
                || {},
            )
        };
        (c, f.lines)
    }

    #[test]
    fn identical_pages_write_nothing() {
        let a = Page([7; 4096]);
        let mut b = Page([7; 4096]);
        let (c, flushed) = run(&a, &mut b, 4096);
        assert_eq!(
            c,
            LineCounts {
                compared: 64,
                written: 0,
                pages_written: 0,
                ..Default::default()
            }
        );
        assert_eq!(flushed, 0);
    }

    #[test]
    fn only_changed_lines_are_written_and_flushed() {
        let mut a = Page([0; 4096]);
        let mut b = Page([0; 4096]);
        a.0[0] = 1; // line 0
        a.0[63] = 1; // line 0 again
        a.0[64 * 10 + 5] = 9; // line 10
        a.0[4095] = 3; // line 63
        b.0[200] = 0; // same
        let (c, flushed) = run(&a, &mut b, 4096);
        assert_eq!(
            c,
            LineCounts {
                compared: 64,
                written: 3,
                pages_written: 0,
                ..Default::default()
            }
        );
        assert_eq!(flushed, 3);
        assert_eq!(a.0[..], b.0[..]);
    }

    #[test]
    fn partial_tail_line_is_compared_up_to_len() {
        let mut a = Page([0; 4096]);
        let mut b = Page([0; 4096]);
        a.0[100] = 1; // inside len
        a.0[120] = 1; // beyond len: must not be copied
        let (c, _) = run(&a, &mut b, 110);
        assert_eq!(
            c,
            LineCounts {
                compared: 2,
                written: 1,
                pages_written: 0,
                ..Default::default()
            }
        );
        assert_eq!(b.0[100], 1);
        assert_eq!(b.0[120], 0);
    }

    #[test]
    fn line_compare_sees_every_byte() {
        let a = Page([0x5a; 4096]);
        let mut b = Page([0x5a; 4096]);
        // SAFETY: 64 bytes within both pages.
        assert!(unsafe { line_equal(a.0.as_ptr(), b.0.as_ptr(), 64) });
        for i in 0..64 {
            b.0[i] ^= 0x10;
            // SAFETY: as above.
            let equal = unsafe { line_equal(a.0.as_ptr(), b.0.as_ptr(), 64) };
            assert!(!equal, "byte {i}");
            b.0[i] ^= 0x10;
        }
    }

    #[test]
    fn long_runs_are_streamed_short_ones_flushed() {
        use crate::persist::flush::{detect, select};
        let kind = select(crate::config::FlushChoice::Auto, detect());
        let mut a = Page([0; 4096]);
        let mut b = Page([0; 4096]);
        let mut a2 = Page([0; 4096]);
        let mut b2 = Page([0; 4096]);
        a2.0.fill(9); // a whole changed page: streamed
        a.0[64 * 2..64 * 10].fill(5); // a run of 8 lines: flushed
        a.0[64 * 20] = 1; // one line
        a.0[64 * 22..64 * 25].fill(7); // 3 lines
        let mut f = Flusher::new(kind);
        // SAFETY: two page-aligned 4 KiB buffers.
        let c = unsafe {
            sync_lines(
                a.0.as_ptr(),
                b.0.as_mut_ptr(),
                4096,
                &mut f,
                &mut None,
                || {},
            )
        };
        // SAFETY: as above.
        let c2 = unsafe {
            sync_lines(
                a2.0.as_ptr(),
                b2.0.as_mut_ptr(),
                4096,
                &mut f,
                &mut None,
                || {},
            )
        };
        f.fence();
        assert_eq!(c.written, 12);
        assert_eq!(c2.written, 64);
        assert_eq!(c.compared, 64);
        assert_eq!(a.0[..], b.0[..]);
        assert_eq!(a2.0[..], b2.0[..]);
        if f.can_stream() {
            assert_eq!((f.streamed, f.lines), (64, 12));
        } else {
            assert_eq!((f.streamed, f.lines), (0, 76));
        }
    }

    #[test]
    fn budget_stops_after_n_lines() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static HIT: AtomicBool = AtomicBool::new(false);
        let a = Page([1; 4096]);
        let mut b = Page([0; 4096]);
        let mut f = Flusher::new(FlushKind::None);
        let mut budget = Some(2);
        // The hook would kill the process; here it records and the loop goes on.
        // SAFETY: two page-aligned 4 KiB buffers, 128 bytes used.
        let _ = unsafe {
            sync_lines(
                a.0.as_ptr(),
                b.0.as_mut_ptr(),
                64 * 2,
                &mut f,
                &mut budget,
                || HIT.store(true, Ordering::SeqCst),
            )
        };
        assert!(!HIT.load(Ordering::SeqCst));
        assert_eq!(budget, Some(0));
    }
}
