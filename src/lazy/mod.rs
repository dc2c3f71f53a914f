//! Lazy shadows: the data file of a lazily filled shadow starts as holes
//! and is filled from the backing on first access. A shared mapping's
//! faults are served in the faulting thread ([`sigbus`]: userfaultfd in
//! SIGBUS mode, 4 KiB for a random fault, doubling up to 256 KiB for
//! sequential ones); a private mapping's by the fault thread ([`fault`]:
//! a message-mode userfaultfd, 16 KiB doubling up to 2 MiB). Bookkeeping is
//! per 64 KiB chunk: beyond `DAXSHIM_CACHE_MAX` the clean pages of the
//! 2 MiB regions holding chunks this process filled are punched out again
//! ([`evict`]). Filling and residency themselves
//! are [`Shadow`] methods.
//!
//! This layer sits below the registry: what it needs of it (which lazy
//! mapping holds a faulting address, how to take a chunk's pages out of
//! this process's mappings) comes through the [`Host`] trait, which the
//! registry implements and hands over at start-up ([`init`]).
//!
//! Rules that keep it correct (docs/ARCHITECTURE.md, "Lazy filling"):
//! - a hole in a lazy data file means "the backing's bytes"; a page present
//!   in it holds the shadow's bytes (inserted whole: `UFFDIO_COPY`, or a
//!   copy under the fill lock);
//! - every process that maps a lazy data file handles missing pages, or
//!   fills every hole before mapping and turns eviction off (`no_evict`);
//! - the fault thread takes only the registry and the fill lock, the SIGBUS
//!   handler no lock at all, and no code holding either lock touches memory
//!   of a watched mapping, so a fault can always be served;
//! - pages are evicted only where no other process may store without a
//!   fault that waits for the evictor and no fill runs (`track::marks`), or
//!   no other process with untrapped stores is attached; after this
//!   process's own mappings lost their page table entries there and with
//!   its in-thread fills held off ([`FillGate`]); and only the pages whose
//!   bytes equal the backing's (so no store, synced or not, is lost).

pub mod evict;
pub mod fault;
pub mod sigbus;

use crate::lock::Lock;
use crate::shadow::Shadow;
use crate::sys::SysResult;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
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
    fn chunks(&self) -> &ChunkBits;
    /// Keeps this process's in-thread fills out of a chunk being evicted.
    fn gate(&self) -> &FillGate;
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
    /// Takes `[c0, c1)` (at most 64 chunks) of `file` out of this process's
    /// lazy mappings (harvesting their written pages first) and, with the
    /// fill lock held, punches the clean pages out of the data file: where
    /// no other process may store without a fault that waits for this one
    /// (`track::marks`), or while this process is alone on the shadow.
    /// `None`: left alone; else which chunks still hold pages (bit `i`:
    /// the chunk at `c0 + i * CHUNK`).
    fn evict(&self, file: &Arc<dyn LazyFile>, c0: u64, c1: u64) -> SysResult<Option<u64>>;
    /// The files this process has lazy mappings of.
    fn lazy_files(&self) -> Vec<Arc<dyn LazyFile>>;
}

static HOST: OnceLock<&'static dyn Host> = OnceLock::new();

/// At start-up: the registry, and `DAXSHIM_CACHE_MAX`.
pub fn init(host: &'static dyn Host, cache_max: Option<u64>) {
    let _ = HOST.set(host);
    evict::set_limit(cache_max);
}

/// Fork: the eviction hand and the retired fill views must not be copied
/// held by a thread the child does not have.
pub fn hold_for_fork() {
    evict::hold_for_fork();
    sigbus::hold_for_fork();
}

/// # Safety
/// After [`hold_for_fork`], in the parent or (`child`) the child.
pub unsafe fn release_after_fork(child: bool) {
    // SAFETY: per the contract.
    unsafe {
        sigbus::release_after_fork(child);
        evict::release_after_fork();
    }
}

fn host() -> Option<&'static dyn Host> {
    HOST.get().copied()
}

/// Eviction and this process's fills in the faulting thread exclude each
/// other (those fills take no fill lock): while a chunk of the file is
/// evicted — its page table entries zapped, its pages compared with the
/// backing and punched — no thread may fill and map a page and store to
/// it. The evictor closes the gate and waits for fills in progress; a fill
/// that finds it closed waits (in its signal handler) until it opens.
#[derive(Default)]
pub struct FillGate {
    closed: AtomicU32,
    fills: AtomicU32,
}

impl FillGate {
    /// Closes the gate once no fill is in progress (not from a handler).
    pub fn close(&self) -> GateClosed<'_> {
        self.closed.store(1, Ordering::SeqCst);
        while self.fills.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        GateClosed(self)
    }

    /// A fill may proceed while the returned pass lives (async-signal-safe;
    /// waits while the gate is closed).
    pub fn enter(&self) -> FillPass<'_> {
        loop {
            self.fills.fetch_add(1, Ordering::SeqCst);
            if self.closed.load(Ordering::SeqCst) == 0 {
                return FillPass(self);
            }
            self.fills.fetch_sub(1, Ordering::SeqCst);
            crate::sys::futex_wait_ms(&self.closed, 1, 10);
        }
    }
}

/// The gate stays closed while this lives.
pub struct GateClosed<'a>(&'a FillGate);

impl Drop for GateClosed<'_> {
    fn drop(&mut self) {
        self.0.closed.store(0, Ordering::SeqCst);
        crate::sys::futex_wake_all(&self.0.closed);
    }
}

/// A fill in progress.
pub struct FillPass<'a>(&'a FillGate);

impl Drop for FillPass<'_> {
    fn drop(&mut self) {
        self.0.fills.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One bit per chunk of a file: the chunks whose pages this process may
/// have mapped. A harvest scans only these, so its cost follows what was
/// touched, not the size of the mapping. Lock-free to set and clear (the
/// SIGBUS handler sets bits, [`sigbus`]); growing takes a lock and keeps the
/// old bitmap until the file is dropped, and a bit set in an old bitmap is
/// set again in the new one.
pub struct ChunkBits {
    cur: AtomicPtr<Words>,
    /// A bit beyond the bitmap was set: every chunk counts as set.
    overflow: AtomicBool,
    /// Bitmaps replaced by a larger one (boxed: a reader may still hold a
    /// pointer to one).
    #[allow(clippy::vec_box)]
    retired: Lock<Vec<Box<Words>>>,
}

struct Words(Box<[AtomicU64]>);

impl Default for ChunkBits {
    fn default() -> ChunkBits {
        ChunkBits {
            cur: AtomicPtr::new(std::ptr::null_mut()),
            overflow: AtomicBool::new(false),
            retired: Lock::new(Vec::new()),
        }
    }
}

impl ChunkBits {
    fn words(&self) -> Option<&Words> {
        let p = self.cur.load(Ordering::Acquire);
        // SAFETY: published by `grow`, never freed while `self` lives
        // (replaced ones are retired).
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Makes room for `chunks` bits (not from a signal handler).
    pub fn grow(&self, chunks: u64) {
        let need = (chunks as usize).div_ceil(64);
        let have = |b: &ChunkBits| b.words().map_or(0, |w| w.0.len());
        if need <= have(self) {
            return;
        }
        let mut retired = self.retired.lock();
        let old_n = have(self);
        if need <= old_n {
            return;
        }
        let n = need.max(old_n * 2);
        let new: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        if let Some(old) = self.words() {
            for (w, o) in new.iter().zip(old.0.iter()) {
                w.store(o.load(Ordering::Acquire), Ordering::Relaxed);
            }
        }
        let old = self
            .cur
            .swap(Box::into_raw(Box::new(Words(new))), Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: allocated by Box::into_raw above (an earlier call).
            retired.push(unsafe { Box::from_raw(old) });
        }
    }

    pub fn set(&self, i: u64) {
        let w = (i / 64) as usize;
        loop {
            let Some(words) = self.words() else {
                self.overflow.store(true, Ordering::Release);
                return;
            };
            let Some(word) = words.0.get(w) else {
                self.overflow.store(true, Ordering::Release);
                return;
            };
            word.fetch_or(1 << (i % 64), Ordering::AcqRel);
            // Grown meanwhile: the copy may have missed it; set it again.
            if std::ptr::eq(self.cur.load(Ordering::Acquire), words) {
                return;
            }
        }
    }

    fn word(&self, w: usize) -> u64 {
        self.words()
            .and_then(|x| x.0.get(w))
            .map_or(0, |x| x.load(Ordering::Acquire))
    }

    pub fn clear(&self, i: u64) {
        if let Some(word) = self.words().and_then(|x| x.0.get((i / 64) as usize)) {
            word.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    pub fn get(&self, i: u64) -> bool {
        self.overflow.load(Ordering::Acquire) || self.word((i / 64) as usize) & (1 << (i % 64)) != 0
    }

    /// How many bits the bitmap holds.
    pub fn capacity(&self) -> u64 {
        self.words().map_or(0, |w| w.0.len() as u64 * 64)
    }

    /// Calls `f(first, end)` for each run of set bits within `[lo, hi)`.
    pub fn runs(&self, lo: u64, hi: u64, f: &mut dyn FnMut(u64, u64)) {
        if self.overflow.load(Ordering::Acquire) {
            if lo < hi {
                f(lo, hi);
            }
            return;
        }
        let hi = hi.min(self.words().map_or(0, |w| w.0.len()) as u64 * 64);
        let mut i = lo;
        while i < hi {
            if self.word((i / 64) as usize) >> (i % 64) == 0 {
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

    /// Fork: growth must not be copied half done.
    pub fn hold_for_fork(&self) {
        std::mem::forget(self.retired.lock());
    }

    /// # Safety
    /// After [`ChunkBits::hold_for_fork`], in the parent or the child.
    pub unsafe fn release_after_fork(&self) {
        // SAFETY: hold_for_fork took it and forgot the guard.
        unsafe { self.retired.force_unlock() };
    }
}

impl Drop for ChunkBits {
    fn drop(&mut self) {
        let p = *self.cur.get_mut();
        if !p.is_null() {
            // SAFETY: allocated by Box::into_raw in `grow`; nobody reads it
            // any more (the file is being dropped).
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_runs() {
        let b = ChunkBits::default();
        b.grow(4);
        b.set(1);
        b.grow(300); // keeps what was set
        assert!(b.get(1));
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
        b.set(100_000); // beyond the bitmap: everything counts as set
        assert!(b.get(5));
        got.clear();
        b.runs(10, 20, &mut |a, z| got.push((a, z)));
        assert_eq!(got, vec![(10, 20)]);
    }
}
