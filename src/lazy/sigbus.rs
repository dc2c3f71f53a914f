//! Faults of shared lazy mappings served in the faulting thread.
//!
//! The main userfaultfd runs in SIGBUS mode (`UFFD_FEATURE_SIGBUS`): a
//! missing or minor fault raises SIGBUS in the thread that took it, and the
//! shim's handler fills the window there — no round trip to the fault
//! thread, whose wake-ups cost ~20 µs each on an idle vCPU. For each window:
//! the backing's bytes are read through a read-only view of the backing
//! (`process_vm_readv`, so a backing that shrank gives a short read, not a
//! fault) into a buffer, inserted into the data file and mapped with one
//! `UFFDIO_COPY` (atomic: a page some other process or thread filled first
//! is kept, `EEXIST`, and mapped with `UFFDIO_CONTINUE`), their line bases
//! recorded from the same buffer, and the chunk bits set.
//!
//! Kernel-side accesses to a page not filled yet fail with `EFAULT` in this
//! mode (no thread takes them): the hooks that hand the program's memory to
//! the kernel touch it first ([`touch`]).
//!
//! # Safety
//! The handler uses only atomics, raw system calls and memory it finds
//! through the table, which is published under a sequence lock; what an
//! entry points at is freed only after a new table is published and no
//! handler is running ([`IN_FLIGHT`], [`publish`]).

use super::{LazyFile, CHUNK};
use crate::lock::Lock;
use crate::persist::base::line_hash;
use crate::persist::LINE;
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, OwnedMap, PAGE};
use crate::track::{marks, uffd};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Installs the SIGBUS handler (at start-up, where `DAXSHIM_LAZY=auto`);
/// false if that fails (the fault thread then serves every lazy mapping).
pub fn install_handler() -> bool {
    match crate::sigchain::install_fault_handler(libc::SIGBUS, on_sigbus) {
        Ok(()) => true,
        Err(e) => {
            warn!("{e}; lazy faults go to the fault thread");
            false
        }
    }
}

/// Are faults served in the faulting thread (hooks must [`touch`])?
#[inline]
pub fn active() -> bool {
    USED.load(Ordering::Relaxed) != 0
}

/// Is `addr` in a mapping whose faults are served here?
pub fn serves(addr: usize) -> bool {
    active() && lookup(addr).is_some()
}

/// What the handler needs of one lazy mapping; kept alive by the mapping
/// (and, once it is gone, until no handler can still be using it).
pub struct FillView {
    file: Arc<dyn LazyFile>,
    /// The backing, read-only, from offset 0.
    backing: OwnedMap,
    /// The line bases, from offset 0 (None: unknown, written back as before
    /// bases existed).
    bases: Option<(OwnedMap, usize)>,
    /// The shadow's region marks (`track::marks`; 0: none), where fills are
    /// announced to other processes' evictors.
    marks: usize,
}

impl FillView {
    /// Views of `file` covering file offsets up to `end`.
    pub fn new(file: Arc<dyn LazyFile>, backing_fd: i32, end: u64) -> sys::SysResult<FillView> {
        if VIEWS.fetch_add(1, Ordering::AcqRel) >= SLOTS / 2 {
            VIEWS.fetch_sub(1, Ordering::AcqRel);
            return Err(Errno(libc::ENOSPC));
        }
        let len = sys::page_up(end as usize).max(PAGE);
        let backing = OwnedMap::shared(backing_fd, len, libc::PROT_READ).inspect_err(|_| {
            VIEWS.fetch_sub(1, Ordering::AcqRel);
        })?;
        let bases = file.shadow().own_bases_map(end);
        file.chunks().grow(end.div_ceil(CHUNK));
        // Without marks, other processes must not evict beside this one.
        let marks = file.shadow().marks_table().unwrap_or_else(|| {
            file.shadow().mark_untrapped();
            0
        });
        Ok(FillView {
            file,
            backing,
            bases,
            marks,
        })
    }
}

impl Drop for FillView {
    fn drop(&mut self) {
        VIEWS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A mapping's share of a [`FillView`]; dropping it sends the view to the
/// graveyard (freed by the next [`publish`]).
pub struct FillRef(Option<Arc<FillView>>);

impl FillRef {
    pub fn new(v: Arc<FillView>) -> FillRef {
        FillRef(Some(v))
    }
}

impl Clone for FillRef {
    fn clone(&self) -> FillRef {
        FillRef(self.0.clone())
    }
}

impl Drop for FillRef {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            GRAVEYARD.lock().push(v);
        }
    }
}

static GRAVEYARD: Lock<Vec<Arc<FillView>>> = Lock::new(Vec::new());

const SLOTS: usize = 1024;
/// Views in use: at most half the table, so that mappings split by a
/// partial `munmap` (one view, two entries) still fit.
static VIEWS: AtomicUsize = AtomicUsize::new(0);

/// One published lazy mapping.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// File offset of `start`.
    off: AtomicUsize,
    view: AtomicUsize,
    tracked: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    off: AtomicUsize::new(0),
    view: AtomicUsize::new(0),
    tracked: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static SEQ: AtomicUsize = AtomicUsize::new(0);
static USED: AtomicUsize = AtomicUsize::new(0);
/// Handlers running now: what a replaced table pointed at is freed only
/// when this is 0.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// A mapping to publish.
pub struct Published<'a> {
    pub start: usize,
    pub len: usize,
    pub off: u64,
    pub tracked: bool,
    pub view: &'a FillRef,
}

/// Publishes the shared lazy mappings (called with the registry's lock
/// held, after every change), then frees the views no mapping holds once
/// no handler can be using them.
pub fn publish<'a>(maps: impl Iterator<Item = Published<'a>>) {
    SEQ.fetch_add(1, Ordering::AcqRel);
    let mut n = 0;
    for m in maps.take(SLOTS) {
        let Some(v) = m.view.0.as_ref() else {
            continue;
        };
        let s = &TABLE[n];
        s.start.store(m.start, Ordering::Relaxed);
        s.end.store(m.start + m.len, Ordering::Relaxed);
        s.off.store(m.off as usize, Ordering::Relaxed);
        s.view.store(Arc::as_ptr(v) as usize, Ordering::Relaxed);
        s.tracked.store(m.tracked, Ordering::Relaxed);
        n += 1;
    }
    for s in &TABLE[n..USED.load(Ordering::Relaxed).max(n)] {
        s.start.store(0, Ordering::Relaxed);
        s.end.store(0, Ordering::Relaxed);
    }
    USED.store(n, Ordering::Relaxed);
    SEQ.fetch_add(1, Ordering::Release);
    let dead = std::mem::take(&mut *GRAVEYARD.lock());
    if dead.is_empty() {
        return;
    }
    while IN_FLIGHT.load(Ordering::Acquire) != 0 {
        std::thread::yield_now();
    }
    drop(dead);
}

/// Fork: the graveyard's lock; in the child no handler is running.
pub fn hold_for_fork() {
    std::mem::forget(GRAVEYARD.lock());
}

/// # Safety
/// After [`hold_for_fork`], in the parent or the child.
pub unsafe fn release_after_fork(child: bool) {
    if child {
        IN_FLIGHT.store(0, Ordering::Relaxed);
    }
    // SAFETY: hold_for_fork took it and forgot the guard.
    unsafe { GRAVEYARD.force_unlock() };
}

#[derive(Clone, Copy)]
struct Entry {
    start: usize,
    end: usize,
    off: usize,
    view: *const FillView,
    tracked: bool,
}

/// Runs `read` over the published slots until it saw a table no publish
/// changed meanwhile (a sequence lock: the handler takes no lock).
fn read_table<T>(mut read: impl FnMut(&[Slot]) -> T) -> T {
    loop {
        let s1 = SEQ.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let used = USED.load(Ordering::Relaxed).min(SLOTS);
        let r = read(&TABLE[..used]);
        std::sync::atomic::fence(Ordering::Acquire);
        if SEQ.load(Ordering::Relaxed) == s1 {
            return r;
        }
    }
}

fn lookup(addr: usize) -> Option<Entry> {
    read_table(|slots| {
        slots.iter().find_map(|s| {
            let start = s.start.load(Ordering::Relaxed);
            let end = s.end.load(Ordering::Relaxed);
            (start <= addr && addr < end).then(|| Entry {
                start,
                end,
                off: s.off.load(Ordering::Relaxed),
                view: s.view.load(Ordering::Relaxed) as *const FillView,
                tracked: s.tracked.load(Ordering::Relaxed),
            })
        })
    })
}

/// Counts this thread as a handler while it lives.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

pub use crate::track::uffd::Changing;

/// `si_code` of a fault the kernel could not resolve (here: userfaultfd in
/// SIGBUS mode).
const BUS_ADRERR: i32 = 2;

/// The SIGBUS handler's test: true if the fault was a lazy page now filled
/// (or a mapping that changed meanwhile: the access is retried).
fn on_sigbus(info: &libc::siginfo_t) -> bool {
    if info.si_code != BUS_ADRERR || !active() {
        return false;
    }
    // SAFETY: SIGBUS's siginfo carries the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    let page = sys::page_down(addr);
    // A range registered but not yet in the table (an `mmap` or `mremap`
    // hook in progress): wait for the change — not counted as in flight,
    // since publishing it may wait for handlers to finish — and look again.
    let mut tries = 0;
    let (filled, r) = loop {
        let inflight = InFlight::enter();
        if let Some(e) = lookup(addr) {
            let r = fill(&e, page);
            drop(inflight);
            break r;
        }
        drop(inflight);
        if (!uffd::changing() && tries > 0) || tries >= 100_000 {
            return false;
        }
        if uffd::changing() {
            sys::sched_yield();
        }
        tries += 1;
    };
    if filled > 0 {
        // Outside the in-flight count: this may wait for an eviction sweep.
        super::evict::note_filled(filled, true);
    }
    match r {
        Ok(()) => true,
        Err(Errno(err)) => {
            // As the kernel does when it cannot read a page in: SIGBUS.
            crate::log::error_in_handler("cannot fill a lazy shadow page from the backing", err);
            false
        }
    }
}

/// The hooks hand `[addr, addr+len)` of the program's memory to the kernel
/// (a buffer of `read`, `write`…): pages of shared lazy mappings there are
/// filled first by touching them (the kernel's own access would fail with
/// `EFAULT` in SIGBUS mode). Only pages inside a published mapping are
/// touched.
pub fn touch(addr: usize, len: usize) {
    if !active() || len == 0 {
        return;
    }
    let end = addr.saturating_add(len);
    // The published ranges overlapping the buffer, in one pass over the
    // table (a buffer rarely spans more than a few mappings).
    let mut hits = [(0usize, 0usize); 8];
    let n = overlapping(sys::page_down(addr), end, &mut hits);
    if n > hits.len() {
        // More than fit: page by page.
        let mut p = sys::page_down(addr);
        while p < end {
            if lookup(p).is_some() {
                touch_pages(p, p + PAGE);
            }
            p += PAGE;
        }
        return;
    }
    for &(a, b) in &hits[..n] {
        touch_pages(a.max(sys::page_down(addr)), b.min(end));
    }
}

/// Reads one byte of each page of `[a, b)`, which lies in a published
/// mapping: a missing page is filled by the handler.
fn touch_pages(a: usize, b: usize) {
    let mut p = sys::page_down(a);
    while p < b {
        // SAFETY: inside a live shadow mapping of this process (published).
        unsafe { std::ptr::read_volatile(p as *const u8) };
        p += PAGE;
    }
}

/// Writes the published ranges overlapping `[a, b)` into `out`; returns how
/// many there are (possibly more than `out` holds).
fn overlapping(a: usize, b: usize, out: &mut [(usize, usize)]) -> usize {
    read_table(|slots| {
        let mut n = 0;
        for s in slots {
            let start = s.start.load(Ordering::Relaxed);
            let end = s.end.load(Ordering::Relaxed);
            if start < b && end > a {
                if let Some(o) = out.get_mut(n) {
                    *o = (start, end);
                }
                n += 1;
            }
        }
        n
    })
}

/// The smallest and largest fill (a run of faults at consecutive windows
/// doubles it, like the kernel's readahead).
const MIN_WINDOW: usize = 4 << 10;
const MAX_WINDOW: usize = 256 << 10;

thread_local! {
    /// Where this thread's last fill ended, and its size.
    static SEQUENCE: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Buffers the handler copies through (larger windows than a stack
/// buffer); a thread that finds none free uses one page on its stack.
const POOL: usize = 4;
static POOL_BUSY: [AtomicBool; POOL] = [const { AtomicBool::new(false) }; POOL];

#[repr(align(4096))]
struct Buf([u8; MAX_WINDOW]);
static mut POOL_BUFS: [Buf; POOL] = [const { Buf([0; MAX_WINDOW]) }; POOL];

/// Fills the window around `page` of the mapping `e`: the bytes filled,
/// and an error if `page` itself could not be.
fn fill(e: &Entry, page: usize) -> (u64, Result<(), Errno>) {
    let (next, last) = SEQUENCE.with(|s| s.get());
    // Random access fills MIN_WINDOW (aligned); a fault where the last fill
    // ended doubles the window and starts at the fault (what lies before it
    // is filled already).
    let (w0, window) = if last > 0 && page == next {
        (page, (last * 2).min(MAX_WINDOW))
    } else {
        (
            (page - e.start) / MIN_WINDOW * MIN_WINDOW + e.start,
            MIN_WINDOW,
        )
    };
    let w1 = (w0 + window).min(e.end);
    add(&STATS.lazy_faults, 1);
    let claimed = (0..POOL).find(|&i| {
        POOL_BUSY[i]
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    });
    let mut stack = [0u8; PAGE];
    let buf: &mut [u8] = match claimed {
        // SAFETY: claimed exclusively through POOL_BUSY[i].
        Some(i) => unsafe {
            let b = (std::ptr::addr_of_mut!(POOL_BUFS) as *mut Buf).add(i);
            std::slice::from_raw_parts_mut(std::ptr::addr_of_mut!((*b).0) as *mut u8, MAX_WINDOW)
        },
        None => &mut stack[..],
    };
    let r = fill_range(e, page, w0, w1, buf);
    if let Some(i) = claimed {
        POOL_BUSY[i].store(false, Ordering::Release);
    }
    SEQUENCE.with(|s| s.set((w1, window)));
    r
}

/// Ends a fill counted in the region marks.
struct LeaveFill(usize, std::ops::Range<u64>);

impl Drop for LeaveFill {
    fn drop(&mut self) {
        if self.0 != 0 {
            marks::leave_fill(self.0, self.1.clone());
        }
    }
}

/// Fills `[w0, w1)` of mapping `e` through `buf`: the bytes filled, and an
/// error if the page at `page` could not be filled.
fn fill_range(
    e: &Entry,
    page: usize,
    w0: usize,
    w1: usize,
    buf: &mut [u8],
) -> (u64, Result<(), Errno>) {
    // SAFETY: published views live until no handler runs (module doc).
    let v = unsafe { &*e.view };
    let fo = |va: usize| (e.off + (va - e.start)) as u64;
    let mut cur = w0;
    let mut filled = 0u64;
    let mut failed = None;
    // Not while this process evicts a chunk of the file, nor while another
    // process evicts in its regions.
    let regions = if v.marks != 0 {
        marks::regions_of(fo(w0), fo(w1))
    } else {
        0..0
    };
    while v.marks != 0 && !marks::enter_fill(v.marks, regions.clone()) {
        marks::wait_evictors(v.marks, regions.clone());
    }
    let _filling = LeaveFill(v.marks, regions);
    let pass = v.file.gate().enter();
    'window: while cur < w1 {
        let n = (w1 - cur).min(buf.len());
        let Some(got) = read_backing(v, fo(cur), &mut buf[..n]) else {
            failed = Some(Errno(libc::EFAULT));
            break;
        };
        buf[got..n].fill(0); // past the backing's end: zeros
        let mut i = 0;
        let mut tries = 0;
        while i < n {
            let r = uffd::copy_in(cur + i, buf[i..].as_ptr() as usize, n - i, e.tracked);
            let k = match r {
                Ok(k) => k,
                Err((_, k)) => k,
            };
            record(v, fo(cur + i), &buf[i..i + k]);
            filled += k as u64;
            i += k;
            match r {
                Ok(_) => {}
                // Someone filled this page first: map theirs.
                Err((Errno(libc::EEXIST), _)) => {
                    let _ = uffd::continue_in(cur + i, e.tracked);
                    i += PAGE;
                }
                Err((Errno(libc::EAGAIN), _)) if tries < 64 => tries += 1,
                // The mapping went away or changed: let the access retry.
                Err((Errno(libc::ENOENT), _)) => {
                    drop(pass);
                    add(&STATS.lazy_filled_bytes, filled);
                    super::evict::note_shared(v.file.shadow(), filled);
                    return (filled, Ok(()));
                }
                Err((err, _)) => {
                    cur += i;
                    failed = Some(err);
                    break 'window;
                }
            }
        }
        cur += n;
    }
    let chunks = v.file.chunks();
    for c in fo(w0) / CHUNK..fo(cur.max(w0 + PAGE).min(w1)).div_ceil(CHUNK) {
        chunks.set(c);
    }
    drop(pass);
    add(&STATS.lazy_filled_bytes, filled);
    super::evict::note_shared(v.file.shadow(), filled);
    match failed {
        // A full shadow file system, or worse: the faulting page gets
        // SIGBUS, as for a page the kernel cannot read in.
        Some(err) if page >= cur => (filled, Err(err)),
        _ => (filled, Ok(())),
    }
}

/// Reads the backing's bytes at `off` through the view: a short count past
/// the backing's end (the kernel reports the fault instead of raising
/// SIGBUS here); `None` past the view's end (it was made for a shorter
/// mapping).
fn read_backing(v: &FillView, off: u64, buf: &mut [u8]) -> Option<usize> {
    let avail = v.backing.len().saturating_sub(off as usize);
    if avail < buf.len() {
        return None;
    }
    let n = buf.len();
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: n,
    };
    let remote = libc::iovec {
        iov_base: (v.backing.addr() + off as usize) as *mut _,
        iov_len: n,
    };
    Some(sys::process_vm_self(false, &local, &remote).unwrap_or(0))
}

/// Records the line bases of bytes just put into the data file, through the
/// kernel (`process_vm_writev`): a page of the bases file that cannot be
/// allocated (a full shadow file system) leaves those bases as they were
/// instead of raising SIGBUS here.
fn record(v: &FillView, off: u64, bytes: &[u8]) {
    let Some((map, count)) = &v.bases else {
        return;
    };
    let mut hashes = [0u32; 256];
    let first = (off / LINE as u64) as usize;
    for (k, lines) in bytes.chunks(LINE * hashes.len()).enumerate() {
        let at = first + k * hashes.len();
        let n = lines.len().div_ceil(LINE).min(count.saturating_sub(at));
        if n == 0 {
            return;
        }
        for (h, line) in hashes.iter_mut().zip(lines.chunks(LINE)).take(n) {
            // SAFETY: `line` is at most 64 readable bytes.
            *h = unsafe { line_hash(line.as_ptr(), line.len()) };
        }
        let local = libc::iovec {
            iov_base: hashes.as_mut_ptr().cast(),
            iov_len: n * 4,
        };
        let remote = libc::iovec {
            iov_base: (map.addr() + at * 4) as *mut _,
            iov_len: n * 4,
        };
        let _ = sys::process_vm_self(true, &local, &remote);
    }
}
