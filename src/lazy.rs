//! Lazy shadows: the data file of a lazily filled shadow starts as holes
//! and is filled from the backing on first access, one 64 KiB chunk at a
//! time, by a fault thread serving the process's userfaultfd (missing and
//! minor faults on the shmem data). Clean chunks this process filled are
//! punched out again beyond `DAXSHIM_CACHE_MAX`.
//!
//! Rules that keep it correct (DESIGN.md §3.1, KERNEL-NOTES):
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

use crate::file::FileState;
use crate::lock::Lock;
use crate::ranges::RangeSet;
use crate::registry::REG;
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, SysResult, PAGE};
use crate::track::{self, uffd};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Fill granularity (KERNEL-NOTES: ~2.4 µs per 4 KiB page at 64 KiB versus
/// ~10–13 µs filling page by page).
pub const CHUNK: u64 = 64 << 10;

/// Can this process fill shadows lazily? (Configuration allows it, the
/// tracker is userfaultfd and the kernel serves kernel-side faults.)
pub fn capable() -> bool {
    crate::runtime::rt().cfg.lazy && track::tracker().fills_lazily()
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

/// The descriptor the running fault thread serves (-1: none).
static SERVED_FD: AtomicI32 = AtomicI32::new(-1);
static START: Lock<()> = Lock::new(());

/// Starts the fault thread for the current userfaultfd unless it runs.
pub fn start() -> Result<(), String> {
    let fd = uffd::fd();
    if SERVED_FD.load(Ordering::Acquire) == fd {
        return Ok(());
    }
    let _g = START.lock();
    if SERVED_FD.load(Ordering::Acquire) == fd {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("daxshim-fault".into())
        .stack_size(256 << 10)
        .spawn(move || fault_thread(fd))
        .map_err(|e| format!("cannot start the fault thread: {e}"))?;
    SERVED_FD.store(fd, Ordering::Release);
    Ok(())
}

/// In a forked child: the parent's thread does not exist here.
pub fn forget_thread_after_fork() {
    SERVED_FD.store(-1, Ordering::Release);
    // SAFETY: the only other holder would be a thread of the parent.
    unsafe { START.force_unlock() };
}

/// The first fill of a random access (KERNEL-NOTES: ~10 µs per 4 KiB fault
/// through a fault thread, ~2.4 µs per page at 64 KiB; but a random reader
/// pays for every page copied and not used).
const MIN_WINDOW: u64 = 16 << 10;
/// The largest fill: sequential access doubles the window up to this (like
/// the kernel's readahead).
const MAX_WINDOW: u64 = 32 * CHUNK;

fn fault_thread(fd: i32) {
    // Signals are for the program's threads; hooks pass straight through.
    let _signals = sys::SignalBlock::all();
    let _inside = crate::reentry::enter_always();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut seq = Sequence::default();
    let r = uffd::serve_faults(fd, &mut |f| on_fault(f, &mut seq, &mut buf));
    if let Err(e) = r {
        if SERVED_FD.load(Ordering::Acquire) == fd {
            error!("the fault thread stopped: {e}");
        }
    }
}

/// Where the last fill ended and how large it was (sequential detection).
#[derive(Default)]
struct Sequence {
    next_va: usize,
    window: u64,
}

/// Serves one fault at `addr` in a lazy mapping: fills the holes of a
/// window of chunks from the backing, maps its pages, wakes the faulting
/// thread.
fn on_fault(fault: uffd::Fault, seq: &mut Sequence, buf: &mut [u8]) {
    let (addr, write) = (fault.addr, fault.write);
    let page = sys::page_down(addr);
    add(&STATS.lazy_faults, 1);
    let hit = {
        let reg = REG.lock();
        reg.maps
            .range(..=page)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.lazy && page < m.start + m.len)
            .map(|m| (m.file.clone(), m.start, m.len, m.off, m.tracked))
    };
    let Some((file, start, len, off, tracked)) = hit else {
        // Unmapped meanwhile: the retry faults the ordinary way (SIGSEGV).
        uffd::wake(page, PAGE);
        return;
    };
    let fo = off + (page - start) as u64;
    // Random access fills MIN_WINDOW; a fault right where the last fill
    // ended doubles the window (aligned to its size) up to MAX_WINDOW.
    let sequential = seq.window > 0 && page == seq.next_va;
    let window = if sequential {
        (seq.window * 2).min(MAX_WINDOW)
    } else {
        MIN_WINDOW
    };
    let w0 = fo - fo % window;
    let c0 = w0.max(off);
    let c1 = (w0 + window).min(off + len as u64);
    let chunk0 = c0 - c0 % CHUNK;
    let filled = match fill(&file, c0, c1, buf) {
        Ok(n) => n,
        Err(e) => {
            // The page cannot be had (a read error of the backing, a full
            // /dev/shm): as the kernel does when it cannot read a page in,
            // the faulting thread gets SIGBUS instead of faulting forever.
            error!(
                "{}: cannot fill the shadow from the backing: {e}",
                file.path
            );
            if fault.tid > 0 {
                sys::tgkill(fault.tid, libc::SIGBUS);
            }
            uffd::wake(page, PAGE);
            return;
        }
    };
    {
        let mut bits = file.lazy_chunks.lock();
        for c in chunk0 / CHUNK..c1.div_ceil(CHUNK) {
            bits.set(c);
        }
    }
    let va = start + (c0 - off) as usize;
    let n = (c1 - c0) as usize;
    // A store faulted: its page counts as written at once instead of
    // taking a second, write-protect fault. The rest of the window is
    // write-protected so that tracking stays exact, unless the stores run
    // sequentially (a grown window): then they will most likely all be
    // written, and one write-protect fault per page would double the cost.
    // (Only mappings registered for write-protection can be protected.)
    if write {
        let _ = uffd::map_filled(page, PAGE, false);
    }
    // Pages that cannot be mapped (an I/O error left a hole) fault again.
    // A sequential window's part before the fault was mapped by the fill
    // before: start at the fault (each mapped page costs an ioctl).
    let from = if sequential { page } else { va };
    let _ = uffd::map_filled(from, va + n - from, tracked && !(write && sequential));
    uffd::wake(va, n);
    seq.next_va = va + n;
    seq.window = window;
    if filled > 0 {
        let mut c = chunk0;
        while c < c1 {
            account(&file, c / CHUNK, (c + CHUNK).min(c1) - c.max(c0));
            c += CHUNK;
        }
    }
}

/// Fills the holes of the data file within `[c0, c1)` from the backing.
/// Returns the bytes filled.
pub fn fill(file: &FileState, c0: u64, c1: u64, zeros: &mut [u8]) -> SysResult<u64> {
    let Some((data_fd, _)) = file.shadow.data() else {
        return Err(Errno(libc::EIO));
    };
    let _fill = file.shadow.fill_lock();
    let size = sys::fstat(data_fd)?.st_size as u64;
    let end = c1.min(size);
    if c0 >= end {
        return Ok(0);
    }
    let held = present(file, data_fd, c0, end);
    let mut holes = RangeSet::new();
    holes.insert(c0, end);
    for (a, b) in held.iter() {
        holes.remove(a, b);
    }
    let mut filled = 0;
    for (hole, data) in holes.iter() {
        // In the kernel, one copy: backing page cache to shmem.
        let got = crate::shadow::copy_from_backing(data_fd, file.backing_fd, hole, data)?;
        // Past the backing's end (it shrank behind the shim's back): zeros,
        // so that the hole does not fault forever.
        let mut z = hole + got;
        zeros.fill(0);
        while z < data {
            let k = ((data - z) as usize).min(zeros.len());
            sys::pwrite_all(data_fd, &zeros[..k], z)?;
            z += k as u64;
        }
        filled += data - hole;
    }
    add(&STATS.lazy_filled_bytes, filled);
    Ok(filled)
}

/// Is swap configured? (A swapped-out shmem page is held by the file but
/// not resident, so `mincore` alone would call it a hole.) Read once.
fn swap_possible() -> bool {
    static SWAP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SWAP.get_or_init(|| {
        std::fs::read_to_string("/proc/swaps")
            .map(|s| s.lines().count() > 1)
            .unwrap_or(true)
    })
}

/// The pages of `[a, b)` that the data file holds, as page-aligned ranges.
/// Call under the fill lock. `mincore` on a `PROT_NONE` view answers for
/// pages in memory in one call; a page it calls absent may be swapped out,
/// which `SEEK_DATA` tells (one call per absent run). SEEK_HOLE alone would
/// walk every page up to the next hole: the whole file when it is full.
pub fn present(file: &FileState, data_fd: i32, a: u64, b: u64) -> RangeSet {
    let mut set = RangeSet::new();
    set.insert(a, b);
    present_in(file, data_fd, &set)
}

/// [`present`] for every range of `ranges` (one `fstat`).
pub fn present_in(file: &FileState, data_fd: i32, ranges: &RangeSet) -> RangeSet {
    let Ok(st) = sys::fstat(data_fd) else {
        let mut out = RangeSet::new();
        for (a, b) in ranges.iter() {
            out.extend(&crate::shadow::data_segments(data_fd, a, b));
        }
        return out;
    };
    let mut out = RangeSet::new();
    for (a, b) in ranges.iter() {
        present_range(file, data_fd, st.st_size as u64, a, b, &mut out);
    }
    out
}

fn present_range(file: &FileState, data_fd: i32, size: u64, a: u64, b: u64, out: &mut RangeSet) {
    let a = a - a % PAGE as u64;
    let b = (sys::page_up(b.min(size) as usize)) as u64;
    if a >= b {
        return;
    }
    let mut view = file.probe_view.lock();
    let need = sys::page_up(size as usize);
    if view.1 < need {
        let need = need.next_power_of_two(); // room to grow
        crate::writeback::unmap_view(&mut view);
        // SAFETY: a fresh PROT_NONE mapping the kernel places; never read.
        match unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                need,
                libc::PROT_NONE,
                libc::MAP_SHARED,
                data_fd,
                0,
            )
        } {
            Ok(p) => *view = (p as usize, need),
            Err(_) => {
                out.extend(&crate::shadow::data_segments(data_fd, a, b));
                return;
            }
        }
    }
    let mut vec = [0u8; 1024];
    let mut p = a;
    while p < b {
        let pages = (((b - p) / PAGE as u64) as usize).min(vec.len());
        if sys::mincore(view.0 + p as usize, pages * PAGE, &mut vec).is_err() {
            out.extend(&crate::shadow::data_segments(data_fd, p, b));
            return;
        }
        let mut i = 0;
        while i < pages {
            let at = p + (i * PAGE) as u64;
            if vec[i] & 1 != 0 {
                out.insert(at, at + PAGE as u64);
                i += 1;
                continue;
            }
            let mut j = i;
            while j < pages && vec[j] & 1 == 0 {
                j += 1;
            }
            let run_end = p + (j * PAGE) as u64;
            let mut q = at;
            // Without swap, mincore is exact; SEEK_DATA from a hole walks
            // to the next page the file holds, which in a large sparse
            // file is far (tens of microseconds).
            while swap_possible() && q < run_end {
                match sys::lseek(data_fd, q as i64, libc::SEEK_DATA) {
                    Ok(d) if (d as u64) < run_end => {
                        let d = d as u64 - d as u64 % PAGE as u64;
                        out.insert(d, d + PAGE as u64);
                        q = d + PAGE as u64;
                    }
                    _ => break,
                }
            }
            i = j;
        }
        p += (pages * PAGE) as u64;
    }
}

struct Filled {
    file: Weak<FileState>,
    chunk: u64,
    bytes: u64,
}

/// Chunks this process filled, oldest first, and their bytes.
static FILLED: Lock<VecDeque<Filled>> = Lock::new(VecDeque::new());
static FILLED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Chunks looked at per fault when over the limit (bounds the work when
/// nothing can be evicted).
const EVICT_TRIES: usize = 64;

fn account(file: &Arc<FileState>, chunk: u64, bytes: u64) {
    let Some(max) = crate::runtime::rt().cfg.cache_max else {
        return;
    };
    FILLED.lock().push_back(Filled {
        file: Arc::downgrade(file),
        chunk,
        bytes,
    });
    if FILLED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes > max {
        evict_to(max - max / 8);
    }
}

/// Evicts the oldest clean chunks until at most `target` bytes are filled.
fn evict_to(target: u64) {
    for _ in 0..EVICT_TRIES {
        if FILLED_BYTES.load(Ordering::Relaxed) <= target {
            return;
        }
        let Some(c) = FILLED.lock().pop_front() else {
            return;
        };
        let Some(file) = c.file.upgrade() else {
            FILLED_BYTES.fetch_sub(c.bytes, Ordering::Relaxed);
            continue;
        };
        match evict_chunk(&file, c.chunk) {
            Ok(true) => {
                FILLED_BYTES.fetch_sub(c.bytes, Ordering::Relaxed);
            }
            // Dirty, shared with another process, or failed: keep it.
            _ => FILLED.lock().push_back(c),
        }
    }
}

/// Punches the clean pages of one chunk out of the data file. True if
/// nothing of the chunk is left.
fn evict_chunk(file: &Arc<FileState>, chunk: u64) -> SysResult<bool> {
    let Some((data_fd, _)) = file.shadow.data() else {
        return Ok(true);
    };
    let c0 = chunk * CHUNK;
    let c1 = c0 + CHUNK;
    // The registry keeps our mappings from changing while we zap them.
    let reg = REG.lock();
    let _fill = file.shadow.fill_lock();
    if !file.shadow.alone() || file.shadow.no_evict() {
        return Ok(false);
    }
    // Zapping a written page table entry would lose the tracker's record of
    // the store: harvest first (into `written`, given to the file's pending
    // set once the fill lock is released: lock order). From the zap on, no
    // thread of ours can touch the chunk without a fault that waits for
    // this thread.
    let mut written = RangeSet::new();
    for m in reg.maps.values() {
        if !Arc::ptr_eq(&m.file, file) || !m.lazy {
            continue;
        }
        let a = c0.max(m.off);
        let b = c1.min(m.off + m.len as u64);
        if a < b {
            let va = m.start + (a - m.off) as usize;
            let n = (b - a) as usize;
            if m.tracked {
                crate::registry::harvest_mapping(m, va, va + n, &mut written);
            }
            sys::madvise(va, n, libc::MADV_DONTNEED)?;
        }
    }
    let r = compare_and_punch(file, data_fd, chunk);
    drop(_fill);
    if !written.is_empty() {
        file.inner.lock().pending.extend(&written);
    }
    drop(reg);
    r
}

/// Punches the pages of `chunk` whose bytes equal the backing's. True if
/// none is left. Holds the fill lock (the caller's).
fn compare_and_punch(file: &FileState, data_fd: i32, chunk: u64) -> SysResult<bool> {
    let c0 = chunk * CHUNK;
    let c1 = c0 + CHUNK;
    let size = sys::fstat(data_fd)?.st_size as u64;
    let end = c1.min(size);
    let present = present(file, data_fd, c0, end);
    let mut shadow = vec![0u8; PAGE];
    let mut backing = vec![0u8; PAGE];
    let mut left = false;
    let mut evicted = 0u64;
    for (a, b) in present.iter() {
        let mut p = a;
        while p < b.min(end) {
            let n = PAGE.min((end - p) as usize);
            let s = sys::pread_full(data_fd, &mut shadow[..n], p)?;
            let k = sys::pread_full(file.backing_fd, &mut backing[..n], p)?;
            backing[k..n].fill(0);
            if s == n && shadow[..n] == backing[..n] {
                sys::fallocate(
                    data_fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    p,
                    PAGE as u64,
                )?;
                evicted += PAGE as u64;
            } else {
                left = true;
            }
            p += PAGE as u64;
        }
    }
    add(&STATS.evicted_bytes, evicted);
    if !left {
        file.lazy_chunks.lock().clear(chunk);
    }
    Ok(!left)
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
