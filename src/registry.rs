//! The registry: files this process has attached (with their descriptor and
//! mapping reference counts) and its shadow mappings; harvesting a range's
//! dirty pages before it goes away.
//!
//! Lock order (docs/ARCHITECTURE.md, "Locks and their order"): `ATTACHING`
//! → `FileState::sync_lock` → `REG` → `FileState::inner` → the shadow's io
//! lock → the shadow's fill lock → leaf locks (chunk bits, residency probe,
//! filled chunks).

use crate::classify::Classified;
use crate::file::{Backing, FileInner, FileState};
use crate::lazy::{Hit, Host, LazyFile};
use crate::lock::Lock;
use crate::ranges::RangeSet;
use crate::runtime::rt;
use crate::shadow::{self, AttachOptions};
use crate::sys::{self, Failure, OwnedMap, SysResult};
use crate::track;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A shadow mapping in this process.
pub struct Mapping {
    pub start: usize,
    pub len: usize,
    pub file: Arc<FileState>,
    pub off: u64,
    pub shared: bool,
    pub tracked: bool,
    /// Missing pages are filled on first access ([`crate::lazy`]).
    pub lazy: bool,
    /// Served in the faulting thread ([`crate::lazy::sigbus`]): what the
    /// SIGBUS handler reads (None: the fault thread serves it).
    pub fill: Option<crate::lazy::sigbus::FillRef>,
    /// Protection asked for at mmap (to map the backing in its place at exit).
    pub prot: i32,
}

pub struct Registry {
    pub files: Vec<Arc<FileState>>,
    pub fds: BTreeMap<i32, Arc<FileState>>,
    pub maps: BTreeMap<usize, Mapping>,
}

pub static REG: Lock<Registry> = Lock::new(Registry {
    files: Vec::new(),
    fds: BTreeMap::new(),
    maps: BTreeMap::new(),
});
pub static ATTACHING: Lock<()> = Lock::new(());

/// Every file this process attached, weakly: one that left the registry
/// but is still referenced (a lazy mapping's view in the SIGBUS handler's
/// graveyard, the fault thread) is finished at exit all the same
/// (`lifecycle::shutdown`). A leaf lock.
pub static ATTACHED: Lock<Vec<std::sync::Weak<FileState>>> = Lock::new(Vec::new());
/// Number of shadow mappings: 0 lets mapping hooks skip the registry.
pub static SHADOW_MAPS: AtomicUsize = AtomicUsize::new(0);

/// The shadow mappings' address ranges, readable without `REG` (by the
/// Syscall User Dispatch handler, which may interrupt an allocator holding
/// its own lock: a thread holding `REG` may be waiting for that lock).
/// A sequence lock over the first [`SPAN_SLOTS`] ranges; with more, every
/// range counts as possibly shadowed.
const SPAN_SLOTS: usize = 64;
static SPAN_SEQ: AtomicUsize = AtomicUsize::new(0);
static SPAN_LEN: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const SPAN0: AtomicUsize = AtomicUsize::new(0);
static SPANS: [AtomicUsize; 2 * SPAN_SLOTS] = [SPAN0; 2 * SPAN_SLOTS];

/// Publishes the registry's mapping ranges (called with `REG` held after
/// every change to `maps`), and the lazy mappings the SIGBUS handler serves.
pub fn publish_spans(reg: &Registry) {
    crate::lazy::sigbus::publish(reg.maps.values().filter_map(|m| {
        m.fill.as_ref().map(|view| crate::lazy::sigbus::Published {
            start: m.start,
            len: m.len,
            off: m.off,
            tracked: m.tracked,
            view,
        })
    }));
    SPAN_SEQ.fetch_add(1, Ordering::AcqRel);
    let n = reg.maps.len();
    for (i, m) in reg.maps.values().take(SPAN_SLOTS).enumerate() {
        SPANS[2 * i].store(m.start, Ordering::Relaxed);
        SPANS[2 * i + 1].store(m.start + m.len, Ordering::Relaxed);
    }
    SPAN_LEN.store(n, Ordering::Relaxed);
    SPAN_SEQ.fetch_add(1, Ordering::Release);
}

/// May `[addr, addr+len)` overlap a shadow mapping? Lock-free; never a
/// false "no".
pub fn maybe_shadowed(addr: usize, len: usize) -> bool {
    let end = addr.saturating_add(len.max(1));
    loop {
        let s1 = SPAN_SEQ.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let n = SPAN_LEN.load(Ordering::Relaxed);
        let hit = n > SPAN_SLOTS
            || (0..n).any(|i| {
                SPANS[2 * i].load(Ordering::Relaxed) < end
                    && SPANS[2 * i + 1].load(Ordering::Relaxed) > addr
            });
        std::sync::atomic::fence(Ordering::Acquire);
        if SPAN_SEQ.load(Ordering::Relaxed) == s1 {
            return hit;
        }
    }
}

/// What attaching to (or detaching from) the shadow of a file needs.
pub fn attach_options(emulated: bool, path: &str) -> AttachOptions {
    AttachOptions {
        emulated,
        flush: rt().flush,
        writeback_stores: rt().cfg.writeback_stores,
        path: path.to_string(),
        atomic: crate::classify::atomic_wanted(path),
    }
}

/// The attached state of the pmem file behind `fd`, attaching it if needed.
pub fn get_or_attach(fd: i32, class: &Classified) -> Result<Arc<FileState>, Failure> {
    let Classified { id, emulated, path } = class;
    let (id, emulated, path) = (*id, *emulated, path.as_str());
    let _a = ATTACHING.lock();
    if let Some(f) = REG.lock().files.iter().find(|f| f.id == id).cloned() {
        return Ok(f);
    }
    let r = rt();
    if r.shadow_dir_bad.load(Ordering::Relaxed) {
        return Err(Failure::refused(format!(
            "shadow directory {} is unusable",
            r.shadow_dir
        )));
    }
    let check_dir = || match shadow::ensure_dir(&r.shadow_dir) {
        Ok(()) => {
            r.shadow_dir_ok.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            r.shadow_dir_bad.store(true, Ordering::Relaxed);
            Err(e)
        }
    };
    // Checked once, not at every attach (a file opened and closed again
    // and again attaches each time); once more if it went away.
    if !r.shadow_dir_ok.load(Ordering::Relaxed) {
        check_dir()?;
    }
    let (backing, held) = Backing::reopen(fd, path)
        .map_err(|e| Failure::new(e, format!("cannot reopen {path}: {e}")))?;
    let opt = attach_options(emulated, path);
    let shadow = match shadow::attach(&r.shadow_dir, id, held.raw(), &opt) {
        Err(e) if e.errno.0 == libc::ENOENT => {
            r.shadow_dir_ok.store(false, Ordering::Relaxed);
            check_dir()?;
            shadow::attach(&r.shadow_dir, id, held.raw(), &opt)?
        }
        r => r?,
    };
    debug!("attached {path} (slot {})", shadow.slot());
    let f = Arc::new(FileState {
        id,
        emulated,
        path: path.to_string(),
        shadow,
        backing,
        untracked: AtomicBool::new(false),
        poisoned: AtomicBool::new(false),
        size_dirty: AtomicBool::new(false),
        sync_lock: Lock::new(()),
        inner: Lock::new(FileInner {
            shadow_view: OwnedMap::default(),
            backing_view: OwnedMap::default(),
            pending: RangeSet::new(),
            fd_refs: 0,
            map_refs: 0,
        }),
        lazy_chunks: Default::default(),
        lazy_gate: Default::default(),
        finishing: Default::default(),
        foreign_seen: AtomicBool::new(false),
    });
    REG.lock().files.push(f.clone());
    {
        let mut all = ATTACHED.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&f));
    }
    // Changes made outside the shim since the shadow last saw the file.
    f.catch_up();
    if f.shadow.data().is_some() {
        crate::watcher::watch(&f);
    }
    Ok(f)
}

/// What holds a reference to an attached file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Descriptor,
    Mapping,
}

/// Drops one reference to `f`; if none remain, removes the file from the
/// registry and returns it.
pub fn release_ref(reg: &mut Registry, f: Arc<FileState>, kind: RefKind) -> Option<Arc<FileState>> {
    let mut inner = f.inner.lock();
    match kind {
        RefKind::Descriptor => inner.fd_refs -= 1,
        RefKind::Mapping => inner.map_refs -= 1,
    }
    let last = inner.fd_refs == 0 && inner.map_refs == 0;
    drop(inner);
    if last {
        reg.files.retain(|x| !Arc::ptr_eq(x, &f));
        Some(f)
    } else {
        None
    }
}

/// Harvests the tracker's dirty pages of `f`'s mappings within file range
/// `[lo, hi)` into `out` (file offsets).
///
/// Nothing beyond the end of the file can have been stored since it was
/// cut (a truncation discards it), and a scan there would arm pages that
/// every later truncation walks: the harvest stops at the end.
pub fn harvest_file(f: &Arc<FileState>, lo: u64, hi: u64, out: &mut RangeSet) {
    let hi = f
        .shadow
        .data_size()
        .map_or(hi, |size| hi.min(sys::page_up(size as usize) as u64));
    let reg = REG.lock();
    for m in reg.maps.values() {
        if !m.tracked || !Arc::ptr_eq(&m.file, f) {
            continue;
        }
        let a = lo.max(m.off);
        let b = hi.min(m.off + m.len as u64);
        if a < b {
            let addr = m.start + (a - m.off) as usize;
            harvest_mapping(m, addr, m.start + (b - m.off) as usize, out);
        }
    }
}

/// Harvests `[addr, end)` of tracked mapping `m` into `out` (file offsets).
/// A lazy mapping is scanned only over the chunks this process filled or
/// mapped: elsewhere it has no pages, and scanning would arm (and allocate
/// page tables for) the whole range.
///
/// Only the parts the tracker calls hot are scanned: a large mapping's
/// regions not stored to since the last harvest are trapped (read-only) and
/// skipped, so the cost follows what was written, not what was touched.
pub fn harvest_mapping(m: &Mapping, addr: usize, end: usize, out: &mut RangeSet) {
    let addr = sys::page_down(addr).max(m.start);
    let end = sys::page_up(end).min(m.start + m.len);
    if addr >= end {
        return;
    }
    let mut hot = Vec::new();
    track::tracker().take_hot(addr, end - addr, &mut |a, n| hot.push((a, a + n)));
    let mut scan = |a: usize, b: usize| {
        let _ = track::tracker().harvest(a, b - a, &mut |s, n| {
            let fo = m.off + (s - m.start) as u64;
            out.insert(fo, fo + n as u64);
        });
    };
    if !m.lazy {
        for (a, b) in hot {
            scan(a, b);
        }
        return;
    }
    let chunk = crate::lazy::CHUNK;
    let fo = |va: usize| m.off + (va - m.start) as u64;
    let va = |fo: u64| m.start + (fo - m.off) as usize;
    let bits = &m.file.lazy_chunks;
    for (a, b) in hot {
        let (lo, hi) = (fo(a), fo(b));
        bits.runs(lo / chunk, hi.div_ceil(chunk), &mut |c0, c1| {
            let a = (c0 * chunk).max(lo);
            let b = (c1 * chunk).min(hi);
            scan(va(a), va(b));
        });
    }
}

/// Harvests the dirty pages of tracked mappings overlapping `[addr,
/// addr+len)` into their files' pending sets (before the range goes away or
/// loses its page tables).
pub fn harvest_range_to_pending(reg: &Registry, addr: usize, len: usize) {
    let end = addr.saturating_add(len);
    for m in overlapping(reg, addr, end) {
        if !m.tracked {
            continue;
        }
        let mut got = RangeSet::new();
        harvest_mapping(m, addr.max(m.start), end.min(m.start + m.len), &mut got);
        if !got.is_empty() {
            m.file.inner.lock().pending.extend(&got);
        }
    }
}

fn overlapping(reg: &Registry, addr: usize, end: usize) -> impl Iterator<Item = &Mapping> {
    reg.maps
        .range(..end)
        .rev()
        .take_while(move |(_, m)| m.start + m.len > addr)
        .map(|(_, m)| m)
        .filter(move |m| m.start < end && m.start + m.len > addr)
}

/// Removes `[addr, addr+len)` from the registry (after the kernel unmapped
/// it), splitting mappings that straddle it. Returns files whose last
/// reference went away.
pub fn forget_range(reg: &mut Registry, addr: usize, len: usize) -> Vec<Arc<FileState>> {
    let end = addr.saturating_add(len);
    track::tracker().untrack(addr, len);
    let keys: Vec<usize> = overlapping(reg, addr, end).map(|m| m.start).collect();
    let mut released = Vec::new();
    for k in keys {
        let m = reg.maps.remove(&k).expect("mapping key");
        let mend = m.start + m.len;
        let mut pieces = 0;
        if m.start < addr {
            reg.maps.insert(
                m.start,
                Mapping {
                    start: m.start,
                    len: addr - m.start,
                    file: m.file.clone(),
                    off: m.off,
                    shared: m.shared,
                    tracked: m.tracked,
                    lazy: m.lazy,
                    fill: m.fill.clone(),
                    prot: m.prot,
                },
            );
            pieces += 1;
        }
        if mend > end {
            reg.maps.insert(
                end,
                Mapping {
                    start: end,
                    len: mend - end,
                    file: m.file.clone(),
                    off: m.off + (end - m.start) as u64,
                    shared: m.shared,
                    tracked: m.tracked,
                    lazy: m.lazy,
                    fill: m.fill.clone(),
                    prot: m.prot,
                },
            );
            pieces += 1;
        }
        let f = m.file.clone();
        drop(m);
        match pieces {
            0 => {
                SHADOW_MAPS.fetch_sub(1, Ordering::Relaxed);
                if let Some(r) = release_ref(reg, f, RefKind::Mapping) {
                    released.push(r);
                }
            }
            1 => {}
            _ => {
                SHADOW_MAPS.fetch_add(1, Ordering::Relaxed);
                f.inner.lock().map_refs += 1;
            }
        }
    }
    publish_spans(reg);
    released
}

pub fn add_mapping(reg: &mut Registry, m: Mapping) {
    m.file.inner.lock().map_refs += 1;
    SHADOW_MAPS.fetch_add(1, Ordering::Relaxed);
    reg.maps.insert(m.start, m);
    publish_spans(reg);
}

/// Can this process fill shadows lazily? (Configuration allows it, the
/// tracker serves missing pages, kernel-side faults included, and the
/// shadow directory is shared memory.)
pub fn lazy_capable() -> bool {
    rt().cfg.lazy && track::tracker().fills_lazily() && shadow_dir_is_shared_memory()
}

/// 0: not looked at yet; 1: yes; 2: no.
static SHADOW_DIR_SHM: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Is the shadow directory on tmpfs or hugetlbfs? userfaultfd serves
/// missing pages of shared memory only: elsewhere every shadow is filled
/// whole when it is mapped (said once).
fn shadow_dir_is_shared_memory() -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    match SHADOW_DIR_SHM.load(Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let dir = &rt().shadow_dir;
    let yes = match std::ffi::CString::new(dir.as_str()).map(|c| sys::fs_type(&c)) {
        Ok(Ok(t)) => t == TMPFS_MAGIC || t == HUGETLBFS_MAGIC,
        _ => true, // not known: try, and fall back per mapping as before
    };
    if SHADOW_DIR_SHM.swap(if yes { 1 } else { 2 }, Ordering::Relaxed) == 0 && !yes {
        warn!(
            "shadow directory {dir} is not on tmpfs: shadows are filled whole when they are mapped (lazy filling needs shared memory)"
        );
    }
    yes
}

/// The registry as the lazy layer sees it ([`crate::lazy::Host`]).
pub struct LazyHost;

fn same_file(m: &Mapping, file: &Arc<dyn LazyFile>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(&m.file), Arc::as_ptr(file))
}

impl Host for LazyHost {
    fn lookup(&self, page: usize) -> Option<Hit> {
        let reg = REG.lock();
        reg.maps
            .range(..=page)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.lazy && page < m.start + m.len)
            .map(|m| Hit {
                file: m.file.clone(),
                start: m.start,
                len: m.len,
                off: m.off,
                tracked: m.tracked,
            })
    }

    fn lazy_files(&self) -> Vec<Arc<dyn LazyFile>> {
        let reg = REG.lock();
        let mut out: Vec<Arc<dyn LazyFile>> = Vec::new();
        for m in reg.maps.values().filter(|m| m.lazy) {
            let f: Arc<dyn LazyFile> = m.file.clone();
            if !out.iter().any(|o| Arc::ptr_eq(o, &f)) {
                out.push(f);
            }
        }
        out
    }

    fn evict(&self, file: &Arc<dyn LazyFile>, c0: u64, c1: u64) -> SysResult<Option<u64>> {
        // The registry keeps our mappings from changing while we zap them.
        let shadow = file.shadow();
        if shadow.no_evict() || (!shadow.alone() && shadow.others_untrapped()) {
            return Ok(None);
        }
        // Every process's possible stores are excluded through the region
        // marks (track::marks), this process's own through the zap below.
        let Some(table) = shadow.marks_table() else {
            return Ok(None);
        };
        let dead = |i| shadow.slot_gone(i);
        let regions = crate::track::marks::regions_of(c0, c1);
        // A look before the locks: others' stores skip most regions.
        if crate::track::marks::others_open(table, regions.clone(), shadow.slot(), &dead) {
            return Ok(None);
        }
        let reg = REG.lock();
        let fill = shadow.fill_lock();
        // Counted before the flags are looked at again: a process that
        // starts storing without traps meanwhile waits for us.
        let _counted = shadow.evicting();
        if shadow.no_evict() || shadow.others_untrapped() {
            return Ok(None);
        }
        let Some(_evicting) =
            crate::track::marks::Evicting::begin(table, regions, shadow.slot(), &dead)
        else {
            return Ok(None);
        };
        // No thread of ours fills (in its fault handler) until this is done.
        let _gate = file.gate().close();
        // Zapping a written page table entry would lose the tracker's
        // record of the store: harvest first (into `written`, given to the
        // file's pending set once the fill lock is released: lock order).
        // From the zap on, no thread of ours can touch the chunk without a
        // fault that waits for this thread; a store between the harvest and
        // the zap is caught by the comparison below.
        let mut written = RangeSet::new();
        let mut owner = None;
        let mut zapped = Ok(());
        for m in reg.maps.values().filter(|m| m.lazy && same_file(m, file)) {
            owner = Some(m.file.clone());
            let a = c0.max(m.off);
            let b = c1.min(m.off + m.len as u64);
            if a < b {
                let va = m.start + (a - m.off) as usize;
                let n = (b - a) as usize;
                if m.tracked {
                    harvest_mapping(m, va, va + n, &mut written);
                }
                // Not zapped: not punched (what was harvested still goes
                // to the pending set below).
                zapped = sys::madvise(va, n, libc::MADV_DONTNEED);
                if zapped.is_err() {
                    break;
                }
            }
        }
        let chunk = crate::lazy::CHUNK;
        let r = zapped.and_then(|()| {
            file.backing()
                .and_then(|b| shadow.punch_clean(b.raw(), c0, c1, chunk))
        });
        if let Ok(left) = r {
            // Bases of the chunks now empty, in runs.
            let mut empty: Vec<(u64, u64)> = Vec::new();
            for i in 0..(c1 - c0).div_ceil(chunk) {
                let (a, b) = (c0 + i * chunk, (c0 + (i + 1) * chunk).min(c1));
                if left & (1 << i) != 0 {
                    // Pages that differ from the backing may hold a store
                    // of ours made between the harvest and the zap, whose
                    // record the zap dropped: the next sync compares them.
                    if owner.is_some() {
                        written.insert(a, b);
                    }
                    continue;
                }
                match empty.last_mut() {
                    Some((_, e)) if *e == a => *e = b,
                    _ => empty.push((a, b)),
                }
            }
            shadow.forget_bases(&empty);
        }
        drop(fill);
        if let Some(f) = owner.filter(|_| !written.is_empty()) {
            f.inner.lock().pending.extend(&written);
        }
        drop(reg);
        r.map(Some)
    }
}
