//! This machine's copy limits: memcpy, non-temporal stores, and the run
//! length from which streaming beats copy + flush.

use crate::secs;
use std::time::Instant;

/// Copy limits of this machine: memcpy and non-temporal stores.
pub fn copy_limits(len: usize) -> (f64, f64) {
    let src = vec![7u8; len];
    let mut dst = vec![1u8; len];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(secs(t));
    }
    let memcpy = len as f64 / best / 1e9;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        nt_copy(&mut dst, &src);
        best = best.min(secs(t));
    }
    std::hint::black_box(&dst);
    (memcpy, len as f64 / best / 1e9)
}

#[cfg(target_arch = "x86_64")]
fn nt_copy(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(src.len()) / 16;
    // SAFETY: SSE2 is part of x86-64; both buffers hold n*16 bytes, and
    // `_mm_stream_si128` needs 16-byte aligned destinations (Vec's large
    // allocations are page aligned).
    unsafe {
        let d = dst.as_mut_ptr() as *mut __m128i;
        let s = src.as_ptr() as *const __m128i;
        debug_assert_eq!(d as usize % 16, 0);
        for i in 0..n {
            _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
        }
        _mm_sfence();
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn nt_copy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

/// The run length from which the writeback should switch from copy +
/// `clwb` per line to non-temporal stores: ns per line both ways for runs
/// of 1…32 lines at random places of a 256 MiB buffer (out of cache, as a
/// writeback's lines are), then one `sfence` per 64 runs (a sync's worth).
#[cfg(target_arch = "x86_64")]
pub fn stream_threshold(quick: bool) {
    use std::arch::x86_64::*;
    let len: usize = if quick { 64 << 20 } else { 256 << 20 };
    let src = vec![7u8; len];
    let mut dst = vec![1u8; len];
    // CPUID leaf 7, EBX bit 24: CLWB.
    let clwb = __cpuid_count(7, 0).ebx & (1 << 24) != 0;
    println!(
        "\n## copy + flush vs non-temporal stores, by run length (ns per 64-byte line{})",
        if clwb {
            ", clwb"
        } else {
            ", clflush: no clwb here"
        }
    );
    println!("{:<10} {:>12} {:>12}", "lines", "copy+flush", "streamed");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // As in a writeback, each run's destination lines were just read (the
    // compare) before they are written; every pass uses fresh places.
    let compare = |d: *const u8, lines: usize| {
        let mut x = 0u64;
        for l in 0..lines * 8 {
            // SAFETY: within the run (callers' bounds).
            x ^= unsafe { std::ptr::read_volatile((d as *const u64).add(l)) };
        }
        std::hint::black_box(x);
    };
    for lines in [1usize, 2, 4, 8, 16, 32] {
        let runs = 20_000;
        let mut t_flush = f64::MAX;
        let mut t_stream = f64::MAX;
        for _ in 0..3 {
            let mut offs = || -> Vec<usize> {
                (0..runs)
                    .map(|_| (next() as usize % (len / 4096 - 1)) * 4096)
                    .collect()
            };
            let (offs, offs2) = (offs(), offs());
            let t = Instant::now();
            for (k, &o) in offs.iter().enumerate() {
                // SAFETY: o + lines*64 <= len; clwb/clflush on our buffer.
                unsafe {
                    let d = dst.as_mut_ptr().add(o);
                    compare(d, lines);
                    std::ptr::copy_nonoverlapping(src.as_ptr().add(o), d, lines * 64);
                    for l in 0..lines {
                        if clwb {
                            std::arch::asm!("clwb [{0}]", in(reg) d.add(l * 64), options(nostack));
                        } else {
                            _mm_clflush(d.add(l * 64));
                        }
                    }
                    if k % 64 == 63 {
                        _mm_sfence();
                    }
                }
            }
            t_flush = t_flush.min(secs(t));
            let t = Instant::now();
            for (k, &o) in offs2.iter().enumerate() {
                // SAFETY: as above; 16-byte aligned destinations.
                unsafe {
                    compare(dst.as_ptr().add(o), lines);
                    let d = dst.as_mut_ptr().add(o) as *mut __m128i;
                    let s = src.as_ptr().add(o) as *const __m128i;
                    for i in 0..lines * 4 {
                        _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
                    }
                    if k % 64 == 63 {
                        _mm_sfence();
                    }
                }
            }
            t_stream = t_stream.min(secs(t));
        }
        let per = |t: f64| t * 1e9 / (runs * lines) as f64;
        println!("{lines:<10} {:>12.1} {:>12.1}", per(t_flush), per(t_stream));
    }
    std::hint::black_box(&dst);
}

#[cfg(not(target_arch = "x86_64"))]
pub fn stream_threshold(_quick: bool) {}
