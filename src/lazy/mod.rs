//! Lazy shadows: the data file of a lazily filled shadow starts as holes
//! and is filled from the backing on first access by a fault thread serving
//! the process's userfaultfd (missing and minor faults on the shmem data),
//! 16 KiB for a random fault, doubling up to 2 MiB for sequential ones
//! ([`fault`]). Bookkeeping is per 64 KiB chunk: clean chunks this process
//! filled are punched out again beyond `DAXSHIM_CACHE_MAX` ([`evict`]).
//! Filling and residency themselves are [`Shadow`] methods.
//!
//! This layer sits below the registry: what it needs of it (which lazy
//! mapping holds a faulting address, how to take a chunk's pages out of
//! this process's mappings) comes through the [`Host`] trait, which the
//! registry implements and hands over at start-up ([`init`]).
//!
//! Rules that keep it correct (docs/ARCHITECTURE.md, "Lazy filling"):
//! - a hole in a lazy data file means "the backing's bytes"; a page present
//!   in it holds the shadow's bytes (filled whole, under the fill lock);
//! - every process that maps a lazy data file handles missing pages, or
//!   fills every hole before mapping and turns eviction off (`no_evict`);
//! - the fault thread takes only the registry and the fill lock, and no
//!   code holding either touches memory of a watched mapping, so a fault
//!   can always be served;
//! - a chunk is evicted only by the only attached process, after its own
//!   mappings lost the chunk's page table entries, and only the pages whose
//!   bytes equal the backing's (so no store, synced or not, is lost).

pub mod evict;
pub mod fault;

use crate::lock::Lock;
use crate::shadow::Shadow;
use crate::sys::SysResult;
use std::sync::{Arc, OnceLock};

pub use fault::{forget_thread_after_fork, start};

/// Bookkeeping granularity (harvest bits, eviction).
pub const CHUNK: u64 = 64 << 10;

/// What the fault thread and eviction need of an attached file.
pub trait LazyFile: Send + Sync {
    fn shadow(&self) -> &Shadow;
    /// A descriptor of the backing file, open while the handle lives.
    fn backing(&self) -> crate::sys::SysResult<crate::fdcache::SharedFd>;
    fn path(&self) -> &str;
    /// The chunks of the file whose pages this process may have mapped.
    fn chunks(&self) -> &Lock<ChunkBits>;
}

/// A lazy mapping that holds a faulting address.
pub struct Hit {
    pub file: Arc<dyn LazyFile>,
    pub start: usize,
    pub len: usize,
    /// File offset of `start`.
    pub off: u64,
    /// Stores to it are tracked (filled pages are mapped write-protected).
    pub tracked: bool,
}

/// What the layer above provides (the registry of mappings).
pub trait Host: Sync {
    /// The lazy mapping of this process that holds `page`.
    fn lookup(&self, page: usize) -> Option<Hit>;
    /// Takes `[c0, c1)` of `file` out of this process's lazy mappings
    /// (harvesting their written pages first) and, with the fill lock held
    /// and only while this process is alone on the shadow, punches the
    /// clean pages out of the data file. True if nothing of it is left.
    fn evict(&self, file: &Arc<dyn LazyFile>, c0: u64, c1: u64) -> SysResult<bool>;
}

static HOST: OnceLock<&'static dyn Host> = OnceLock::new();

/// At start-up: the registry, and `DAXSHIM_CACHE_MAX`.
pub fn init(host: &'static dyn Host, cache_max: Option<u64>) {
    let _ = HOST.set(host);
    evict::set_limit(cache_max);
}

/// Fork: the list of filled chunks must not be copied held by a thread the
/// child does not have.
pub fn hold_for_fork() {
    evict::hold_for_fork();
}

/// # Safety
/// After [`hold_for_fork`], in the parent or the child.
pub unsafe fn release_after_fork() {
    // SAFETY: per the contract.
    unsafe { evict::release_after_fork() };
}

fn host() -> Option<&'static dyn Host> {
    HOST.get().copied()
}

/// One bit per chunk of a file: the chunks whose pages this process may
/// have mapped. A harvest scans only these, so its cost follows what was
/// touched, not the size of the mapping.
#[derive(Default)]
pub struct ChunkBits {
    words: Vec<u64>,
}

impl ChunkBits {
    pub fn set(&mut self, i: u64) {
        let w = (i / 64) as usize;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (i % 64);
    }

    pub fn clear(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }

    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Calls `f(first, end)` for each run of set bits within `[lo, hi)`.
    pub fn runs(&self, lo: u64, hi: u64, f: &mut dyn FnMut(u64, u64)) {
        let hi = hi.min(self.words.len() as u64 * 64);
        let mut i = lo;
        while i < hi {
            let w = self.words[(i / 64) as usize];
            if w >> (i % 64) == 0 {
                i = (i / 64 + 1) * 64; // rest of this word is clear
                continue;
            }
            if !self.get(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < hi && self.get(i) {
                i += 1;
            }
            f(start, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_runs() {
        let mut b = ChunkBits::default();
        for i in [1, 2, 3, 63, 64, 65, 200] {
            b.set(i);
        }
        b.clear(2);
        let mut got = Vec::new();
        b.runs(0, 1000, &mut |a, z| got.push((a, z)));
        assert_eq!(got, vec![(1, 2), (3, 4), (63, 66), (200, 201)]);
        got.clear();
        b.runs(64, 200, &mut |a, z| got.push((a, z)));
        assert_eq!(got, vec![(64, 66)]);
        assert!(b.get(200) && !b.get(199) && !b.get(100_000));
        b.clear(100_000); // beyond the end: nothing to do
    }
}
