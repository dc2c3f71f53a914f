//! Cache flush instruction selection (once, from CPUID and `DAXSHIM_FLUSH`)
//! and the flush/fence primitives.
//!
//! # Safety
//! The inline assembly only names instructions that CPUID reported; flush
//! instructions read no memory and accept any mapped address.

use crate::config::FlushChoice;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushKind {
    Clwb,
    Clflushopt,
    Clflush,
    /// No cache flush instruction (not x86-64): durability comes only from
    /// the kernel (`msync`).
    None,
}

impl FlushKind {
    pub fn name(self) -> &'static str {
        match self {
            FlushKind::Clwb => "clwb",
            FlushKind::Clflushopt => "clflushopt",
            FlushKind::Clflush => "clflush",
            FlushKind::None => "none",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFlushFeatures {
    pub clwb: bool,
    pub clflushopt: bool,
    pub clflush: bool,
}

/// The best instruction the CPU has, no better than the user's choice
/// (`DAXSHIM_FLUSH=clflushopt` means "do not use clwb", like `PMEM_NO_CLWB`).
pub fn select(choice: FlushChoice, cpu: CpuFlushFeatures) -> FlushKind {
    let rank = |k: FlushChoice| match k {
        FlushChoice::Auto | FlushChoice::Clwb => 3,
        FlushChoice::Clflushopt => 2,
        FlushChoice::Clflush => 1,
    };
    let max = rank(choice);
    if max >= 3 && cpu.clwb {
        FlushKind::Clwb
    } else if max >= 2 && cpu.clflushopt {
        FlushKind::Clflushopt
    } else if cpu.clflush {
        FlushKind::Clflush
    } else {
        FlushKind::None
    }
}

#[cfg(target_arch = "x86_64")]
pub fn detect() -> CpuFlushFeatures {
    use std::arch::x86_64::__cpuid_count;
    // CPUID exists on every x86-64 CPU (the intrinsic is safe there).
    let (max_leaf, leaf1) = (__cpuid_count(0, 0).eax, __cpuid_count(1, 0));
    let leaf7 = if max_leaf >= 7 {
        __cpuid_count(7, 0).ebx
    } else {
        0
    };
    CpuFlushFeatures {
        clwb: leaf7 & (1 << 24) != 0,
        clflushopt: leaf7 & (1 << 23) != 0,
        clflush: leaf1.edx & (1 << 19) != 0,
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn detect() -> CpuFlushFeatures {
    CpuFlushFeatures::default()
}

/// Flushes lines and fences; counts what it flushed.
pub struct Flusher {
    pub kind: FlushKind,
    /// Lines flushed with the flush instruction.
    pub lines: u64,
    /// Lines written with non-temporal stores (need no flush).
    pub streamed: u64,
}

impl Flusher {
    pub fn new(kind: FlushKind) -> Flusher {
        Flusher {
            kind,
            lines: 0,
            streamed: 0,
        }
    }

    /// Non-temporal stores are used only where lines must reach the media
    /// (a flush instruction was chosen) and the CPU has them (x86_64: SSE2).
    pub fn can_stream(&self) -> bool {
        cfg!(target_arch = "x86_64") && self.kind != FlushKind::None
    }

    /// Copies one 64-byte line with non-temporal stores.
    ///
    /// # Safety
    /// `s` readable and `d` writable for 64 bytes, `d` 16-byte aligned.
    #[inline]
    pub unsafe fn stream_line(&mut self, s: *const u8, d: *mut u8) {
        self.streamed += 1;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE2 is part of x86_64; alignment per the contract.
        unsafe {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
            for i in 0..4 {
                let v = _mm_loadu_si128(s.add(16 * i) as *const __m128i);
                _mm_stream_si128(d.add(16 * i) as *mut __m128i, v);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: per the contract.
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, 64);
            self.flush_line(d);
        }
    }

    #[inline]
    pub fn flush_line(&mut self, p: *const u8) {
        self.lines += 1;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the instruction was reported by CPUID (see `select`); `p`
        // lies in a mapping the caller just wrote.
        unsafe {
            match self.kind {
                FlushKind::Clwb => {
                    std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
                FlushKind::Clflushopt => {
                    std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
                FlushKind::Clflush => std::arch::x86_64::_mm_clflush(p),
                FlushKind::None => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }

    /// One store fence: orders all flushes before the sync returns.
    pub fn fence(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: sfence has no preconditions.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
        #[cfg(not(target_arch = "x86_64"))]
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CpuFlushFeatures = CpuFlushFeatures {
        clwb: true,
        clflushopt: true,
        clflush: true,
    };

    #[test]
    fn prefers_clwb_then_clflushopt_then_clflush() {
        assert_eq!(select(FlushChoice::Auto, ALL), FlushKind::Clwb);
        let no_clwb = CpuFlushFeatures { clwb: false, ..ALL };
        assert_eq!(select(FlushChoice::Auto, no_clwb), FlushKind::Clflushopt);
        let only_clflush = CpuFlushFeatures {
            clflush: true,
            ..Default::default()
        };
        assert_eq!(select(FlushChoice::Auto, only_clflush), FlushKind::Clflush);
        assert_eq!(
            select(FlushChoice::Auto, CpuFlushFeatures::default()),
            FlushKind::None
        );
    }

    #[test]
    fn user_choice_caps_the_instruction() {
        assert_eq!(select(FlushChoice::Clflushopt, ALL), FlushKind::Clflushopt);
        assert_eq!(select(FlushChoice::Clflush, ALL), FlushKind::Clflush);
        let only_clflush = CpuFlushFeatures {
            clflush: true,
            ..Default::default()
        };
        // Asking for clwb on a CPU without it degrades, never faults.
        assert_eq!(select(FlushChoice::Clwb, only_clflush), FlushKind::Clflush);
    }

    #[test]
    fn this_cpu_flushes_without_faulting() {
        let kind = select(FlushChoice::Auto, detect());
        let buf = vec![1u8; 256];
        let mut f = Flusher::new(kind);
        for i in (0..256).step_by(64) {
            f.flush_line(buf[i..].as_ptr());
        }
        f.fence();
        assert_eq!(f.lines, 4);
    }
}
