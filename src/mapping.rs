//! Mappings of pmem files: a shadow mapping for an unaware caller (placed
//! where the kernel put the file's own mapping, so every error and address
//! choice is the kernel's), a direct one for a DAX-aware caller, and the
//! registry kept right through munmap, mremap, MAP_FIXED and madvise.

use crate::fileio::check;
use crate::real;
use std::os::fd::AsRawFd;

use crate::registry::{Mapping, REG, SHADOW_MAPS};
use crate::shadow::Fill;
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, Failure, PAGE};
use crate::track::{self, MarkAt, Protect, Stores};
use libc::{c_int, c_void, off64_t, size_t};
use std::sync::atomic::Ordering;

/// Our own per-mapping DAX opt-in (`include/daxshim.h`).
pub const MAP_DAX: c_int = 0x0100_0000;
const MAP_TYPE: c_int = 0x0f;

pub const MADV_POPULATE_READ: c_int = 22;

pub const MADV_POPULATE_WRITE: c_int = 23;

pub fn no_shadow_maps() -> bool {
    SHADOW_MAPS.load(Ordering::Relaxed) == 0
}

/// After the kernel replaced `[addr, addr+len)` (MAP_FIXED): forget what
/// the registry had there.
pub fn forget_replaced(addr: usize, len: usize) {
    if no_shadow_maps() {
        return;
    }
    let released = crate::registry::forget_range(&mut REG.lock(), addr, sys::page_up(len));
    drop(released);
}

pub fn harvest_before_replace(addr: usize, len: usize) {
    if !no_shadow_maps() {
        crate::registry::harvest_range_to_pending(&REG.lock(), addr, sys::page_up(len));
    }
}

pub fn real_mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off64_t,
) -> Result<*mut c_void, Errno> {
    // SAFETY: forwarded with the caller's own arguments.
    mapped(unsafe { real::mmap64(addr, len, prot, flags, fd, off) })
}

/// A real mapping call's result: the address, or the errno it left.
pub fn mapped(p: *mut c_void) -> Result<*mut c_void, Errno> {
    if p == libc::MAP_FAILED {
        Err(Errno(sys::get_errno()))
    } else {
        Ok(p)
    }
}

fn fd_writable(fd: c_int) -> bool {
    sys::fcntl(fd, libc::F_GETFL, 0).is_ok_and(|fl| fl as i32 & libc::O_ACCMODE == libc::O_RDWR)
}

/// What a mapping without a shadow is, for the log.
const DIRECT: &str = "mapping the file directly";

pub fn mmap_impl(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off64_t,
) -> Result<*mut c_void, Errno> {
    let dax_flag = flags & MAP_DAX != 0;
    let flags = flags & !MAP_DAX;
    let fixed = flags & libc::MAP_FIXED != 0;
    if fixed {
        harvest_before_replace(addr as usize, len);
    }
    // The kernel maps the file itself; with MAP_FIXED it replaced whatever
    // the registry had there.
    let kernel_map = |kflags: c_int| -> Result<*mut c_void, Errno> {
        let p = real_mmap(addr, len, prot, kflags, fd, off)?;
        if fixed {
            forget_replaced(p as usize, len);
        }
        Ok(p)
    };
    let file = if flags & libc::MAP_ANONYMOUS != 0 || fd < 0 {
        None
    } else {
        match crate::fdtable::file_for_fd(fd) {
            Ok(f) => f,
            Err(e) => {
                let class = crate::classify::classify(fd);
                let emulated = class.as_ref().is_none_or(|c| c.emulated);
                let path = class.map_or_else(|| format!("fd {fd}"), |c| c.path);
                crate::classify::without_shadow(emulated, &path, &e, DIRECT)?;
                let p = kernel_map(flags)?;
                add(&STATS.mappings_direct, 1);
                return Ok(p);
            }
        }
    };
    let Some(file) = file else {
        return kernel_map(flags);
    };
    let typ = flags & MAP_TYPE;
    let shared = typ == libc::MAP_SHARED || typ == libc::MAP_SHARED_VALIDATE;
    let sync_flag = typ == libc::MAP_SHARED_VALIDATE && flags & libc::MAP_SYNC != 0;
    if dax_flag || sync_flag || crate::classify::process_opted_in(&file.path) {
        // DAX-aware caller: the real file mapping. Emulated pmem cannot
        // honour MAP_SYNC; the shim's contract is to strip it there.
        let kflags = if sync_flag && file.emulated {
            flags & !libc::MAP_SYNC
        } else {
            flags
        };
        let p = kernel_map(kflags)?;
        add(&STATS.mappings_direct, 1);
        debug!("direct mapping of {} at {p:?}", file.path);
        return Ok(p);
    }
    // Unaware caller: the shadow's data must exist (the first mapping of
    // the file creates it).
    let writable_fd = shared && fd_writable(fd);
    // userfaultfd refuses a shared mapping that can never be written (a
    // read-only descriptor's): such a mapping needs the holes filled.
    let lazy_capable = crate::registry::lazy_capable() && (!shared || writable_fd);
    let fill = if lazy_capable {
        Fill::Lazy
    } else {
        Fill::Eager
    };
    let data = match file
        .backing()
        .map_err(|e| Failure::new(e, format!("cannot reopen {}: {e}", file.path)))
        .and_then(|b| file.shadow.ensure_data(b.raw(), fill))
    {
        Ok(d) => {
            file.shadow.note_mapped();
            d
        }
        Err(e) => {
            crate::classify::without_shadow(file.emulated, &file.path, &e, DIRECT)?;
            add(&STATS.mappings_direct, 1);
            return kernel_map(flags);
        }
    };
    // The mapping shows what was changed outside the shim too, from now on
    // without waiting for a shim call.
    file.catch_up();
    crate::watcher::watch(&file);
    // Let the kernel validate everything and choose the address by mapping
    // the file itself, then put the shadow over it.
    let probe_flags = flags & !(libc::MAP_POPULATE | libc::MAP_LOCKED);
    let p = real_mmap(addr, len, prot, probe_flags, fd, off)?;
    // A read-only descriptor's mapping maps a read-only descriptor of the
    // data (its protection must never exceed the program's descriptor),
    // opened for this mapping only.
    let data_ro = if writable_fd {
        None
    } else {
        match file.shadow.data_read_only() {
            Ok(fd) => Some(fd),
            Err(e) => {
                // SAFETY: the range this call mapped above, not yet the
                // program's.
                let _ = unsafe { real::munmap(p, len) };
                crate::classify::without_shadow(file.emulated, &file.path, &e, DIRECT)?;
                add(&STATS.mappings_direct, 1);
                return kernel_map(flags);
            }
        }
    };
    let sfd = data_ro
        .as_ref()
        .map_or(data.fd().as_raw_fd(), |fd| fd.as_raw_fd());
    let stype = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    // A lazy data file has holes that only the fault thread may fill: the
    // mapping must not fault anything in before it is registered.
    let mut lazy = lazy_capable && file.shadow.is_lazy();
    if lazy {
        if let Err(e) = crate::lazy::start() {
            warn!("{}: {e}; filling its shadow now", file.path);
            lazy = false;
        }
    }
    let strip = if lazy {
        libc::MAP_POPULATE | libc::MAP_LOCKED
    } else {
        0
    };
    let sflags = (flags & !(MAP_TYPE | libc::MAP_SYNC | libc::MAP_FIXED_NOREPLACE | strip))
        | stype
        | libc::MAP_FIXED;
    let maplen = sys::page_up(len);
    // A lazy range stays inaccessible until it is registered and published:
    // another thread's access to a hole of an unregistered shadow mapping
    // would fill it with zeros (MAP_FIXED over a range in use). Such an
    // access waits in the SIGSEGV handler for this change instead.
    let hide = lazy && track::uffd::ensure_segv_handler();
    let map_prot = if hide { libc::PROT_NONE } else { prot };
    // SAFETY: `p` is the range the kernel just gave this call.
    let q = unsafe { sys::mmap(p, len, map_prot, sflags, sfd, off) };
    if let Err(e) = q {
        let why = Failure::new(e, format!("cannot map its shadow: {e}"));
        if let Err(e) = crate::classify::without_shadow(file.emulated, &file.path, &why, DIRECT) {
            // SAFETY: the range this call mapped above, the program's
            // address only once this call returns it.
            let _ = unsafe { real::munmap(p, len) };
            if fixed {
                forget_replaced(p as usize, len);
            }
            return Err(e);
        }
        add(&STATS.mappings_direct, 1);
        if fixed {
            forget_replaced(p as usize, len);
        }
        return Ok(p);
    }
    if fixed {
        // What MAP_FIXED replaced is gone: forget it (and its tracking)
        // before the new range is tracked.
        let released = crate::registry::forget_range(&mut REG.lock(), p as usize, maplen);
        drop(released);
    }
    let mut tracked = false;
    // A shared lazy mapping's faults are served in the faulting thread
    // where the userfaultfd runs in SIGBUS mode; it needs views of the
    // backing and bases for that (else the fault thread serves it).
    let mut fill = None;
    if lazy && track::uffd::serves_in_thread(shared) {
        fill = fill_views(&file, off as u64 + maplen as u64);
    }
    if lazy {
        match watch_lazy(
            &file,
            p as usize,
            maplen,
            Stores::tracked_if(shared && writable_fd),
            fill.is_some(),
        ) {
            Ok(true) => tracked = shared && writable_fd,
            Ok(false) => {
                lazy = false;
                fill = None;
            }
            Err(e) => {
                // Unregistered holes would read as zeros: the file's own
                // mapping is the only other answer now.
                if let Err(e) =
                    crate::classify::without_shadow(file.emulated, &file.path, &e, DIRECT)
                {
                    // SAFETY: as above: this call's own range.
                    let _ = unsafe { real::munmap(p, len) };
                    if fixed {
                        forget_replaced(p as usize, len);
                    }
                    return Err(e);
                }
                add(&STATS.mappings_direct, 1);
                let fixed_flags = (flags & !libc::MAP_FIXED_NOREPLACE) | libc::MAP_FIXED;
                return real_mmap(p, len, prot, fixed_flags, fd, off);
            }
        }
    }
    if shared {
        // Huge pages would make one written byte look like 512 dirty pages.
        let _ = sys::madvise(p as usize, maplen, libc::MADV_NOHUGEPAGE);
        if writable_fd {
            file.shadow.mark_writer();
            // A lazy mapping is tracked by its registration above.
            if !lazy && track::tracker().is_exact() {
                let within = file.mapped_inside(off as u64, maplen);
                match track::tracker().track_with_prot(p as usize, maplen, within, prot) {
                    Ok(()) => tracked = true,
                    Err(e) => {
                        warn!(
                            "{}: cannot track writes ({e}); its syncs compare the whole file",
                            file.path
                        );
                        file.untracked.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    // A fresh lazy range is inaccessible until published below, and then
    // mapped without PROT_WRITE where its regions are trapped: nothing in
    // it is written yet.
    let protect = if hide { Protect::Later } else { Protect::No };
    let trapped = tracked
        && track::tracker().trap_stores(p as usize, maplen, prot, false, protect, &|| {
            marks_at(&file, lazy, off as u64)
        });
    if lazy && shared && writable_fd && !trapped {
        file.shadow.mark_untrapped();
    }
    {
        let mut reg = REG.lock();
        crate::registry::add_mapping(
            &mut reg,
            Mapping {
                start: p as usize,
                len: maplen,
                file: file.clone(),
                off: off as u64,
                shared,
                tracked,
                lazy,
                fill,
                prot,
            },
        );
    }
    if hide {
        let shown = if trapped && protect == Protect::Later {
            prot & !libc::PROT_WRITE
        } else {
            prot
        };
        if let Err(e) = sys::mprotect(p as usize, maplen, shown) {
            // SAFETY: the range this call mapped, not yet returned.
            let _ = unsafe { real::munmap(p, len) };
            let released = crate::registry::forget_range(&mut REG.lock(), p as usize, maplen);
            drop(released);
            return Err(e);
        }
    }
    if flags & libc::MAP_POPULATE != 0 {
        // Lazy: populate through the fault thread, or by touching every
        // page where faults are served in this thread (the kernel's own
        // population would fail with EFAULT there).
        if crate::lazy::sigbus::serves(p as usize) {
            crate::lazy::sigbus::touch(p as usize, maplen);
        } else {
            let advice = if lazy {
                MADV_POPULATE_READ
            } else {
                libc::MADV_WILLNEED
            };
            let _ = sys::madvise(p as usize, maplen, advice);
        }
    }
    add(&STATS.mappings_shadowed, 1);
    debug!(
        "shadow mapping of {} at {p:?} (+{len}, off {off}, shared {shared}, tracked {tracked})",
        file.path
    );
    crate::writeback::keep_views_bounded(&file);
    Ok(p)
}

/// Where the trapped stores of a lazy mapping at file offset `off` are
/// marked for other processes (`track::marks`; mapped on first need).
fn marks_at(file: &crate::file::FileState, lazy: bool, off: u64) -> Option<MarkAt> {
    if !lazy {
        return None;
    }
    let table = file.shadow.marks_table()?;
    Some(MarkAt {
        table,
        off,
        slot: file.shadow.slot(),
    })
}

/// What the SIGBUS handler needs to fill a lazy mapping of `file` up to file
/// offset `end` (None: the fault thread serves it).
fn fill_views(
    file: &std::sync::Arc<crate::file::FileState>,
    end: u64,
) -> Option<crate::lazy::sigbus::FillRef> {
    let f: std::sync::Arc<dyn crate::lazy::LazyFile> = file.clone();
    file.backing()
        .and_then(|b| crate::lazy::sigbus::FillView::new(f, b.raw(), end))
        .map(|v| crate::lazy::sigbus::FillRef::new(std::sync::Arc::new(v)))
        .map_err(|e| debug!("{}: the fault thread serves this mapping ({e})", file.path))
        .ok()
}

/// Registers a lazy shadow mapping with the fault thread's userfaultfd. If
/// the kernel refuses, fills the shadow's holes instead: `Ok(false)`, an
/// ordinary shadow mapping now. `Err`: the shadow could not be filled.
fn watch_lazy(
    file: &crate::file::FileState,
    addr: usize,
    len: usize,
    stores: Stores,
    in_thread: bool,
) -> Result<bool, Failure> {
    match track::tracker().register_lazy(addr, len, stores, in_thread) {
        Ok(()) => Ok(true),
        Err(e) => {
            warn!(
                "{}: cannot watch a lazy mapping ({e}); filling its shadow now",
                file.path
            );
            let backing = file
                .backing()
                .map_err(|e| Failure::new(e, format!("cannot reopen {}: {e}", file.path)))?;
            file.shadow
                .ensure_data(backing.raw(), Fill::Eager)
                .map(|_| false)
        }
    }
}

pub fn munmap_impl(addr: *mut c_void, len: size_t) -> Result<i32, Errno> {
    let a = addr as usize;
    // SAFETY: forwarded; the kernel validates the range.
    let real = || check(unsafe { real::munmap(addr, len) });
    if no_shadow_maps() || !a.is_multiple_of(PAGE) || len == 0 {
        return real();
    }
    let mut reg = REG.lock();
    // The tracker's dirty bits vanish with the range: keep them as pending.
    crate::registry::harvest_range_to_pending(&reg, a, sys::page_up(len));
    let r = real()?;
    let released = crate::registry::forget_range(&mut reg, a, sys::page_up(len));
    drop(reg);
    drop(released);
    Ok(r)
}

pub fn mremap_impl(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> Result<*mut c_void, Errno> {
    // SAFETY: forwarded; the kernel validates.
    let real = || mapped(unsafe { real::mremap(old, old_len, new_len, flags, new_addr) });
    let o = old as usize;
    if no_shadow_maps() || !o.is_multiple_of(PAGE) {
        return real();
    }
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let dontunmap = flags & libc::MREMAP_DONTUNMAP != 0;
    let old_span = sys::page_up(old_len.max(1));
    let mut reg = REG.lock();
    crate::registry::harvest_range_to_pending(&reg, o, old_span);
    if fixed {
        crate::registry::harvest_range_to_pending(&reg, new_addr as usize, sys::page_up(new_len));
    }
    // The shadow mapping the old range lies in, if any.
    let src = reg
        .maps
        .range(..=o)
        .next_back()
        .map(|(_, m)| m)
        .filter(|m| o < m.start + m.len)
        .map(|m| {
            (
                m.file.clone(),
                m.off + (o - m.start) as u64,
                m.shared,
                m.tracked,
                m.lazy,
                m.prot,
                m.fill.clone(),
            )
        });
    let p = real()?;
    let n = p as usize;
    let new_span = sys::page_up(new_len);
    let mut released = Vec::new();
    // A trapped range moves with its read-only regions: the new range must
    // be trapped too, whatever its size.
    let trapped = track::tracker().trapped_prot(o);
    if let Some((file, off, shared, tracked, lazy, prot, src_fill)) = &src {
        // Hold a reference across the move so the file stays attached.
        file.inner.lock().map_refs += 1;
        SHADOW_MAPS.fetch_add(1, Ordering::Relaxed);
        if !dontunmap {
            released.extend(crate::registry::forget_range(&mut reg, o, old_span));
        }
        if fixed || n != o {
            released.extend(crate::registry::forget_range(&mut reg, n, new_span));
        } else if new_span > old_span {
            released.extend(crate::registry::forget_range(
                &mut reg,
                o + old_span,
                new_span - old_span,
            ));
        }
        let mut tracked = *tracked;
        let mut lazy = *lazy;
        // Served in this thread before: views covering the new range (one
        // grown in place stays registered where it was, so it keeps the old
        // views if new ones cannot be had: a fill past them fails).
        let mut fill = None;
        if lazy && src_fill.is_some() && track::uffd::sigbus_mode() {
            fill = fill_views(file, *off + new_span as u64);
            if fill.is_none() && n == o {
                fill = src_fill.clone();
            }
        }
        if lazy && n != o {
            // A moved range lost its registration (one grown in place keeps
            // it; lazy ranges are never armed ahead).
            lazy = watch_lazy(
                file,
                n,
                new_span,
                Stores::tracked_if(tracked),
                fill.is_some(),
            )
            .unwrap_or_else(|e| {
                error!("{}: {e}", file.path);
                false
            });
        }
        if !lazy {
            fill = None;
        }
        if !lazy && tracked {
            // The mprotect tracker's state for the old range went with it
            // (forget_range): it tracks the whole new range afresh.
            let within = file.mapped_inside(*off, new_span);
            let r = if n != o || track::write_protects_pages() {
                track::tracker().track_with_prot(n, new_span, within, *prot)
            } else if new_span > old_span {
                let tail = new_span - old_span;
                track::tracker().arm(o + old_span, tail, within.saturating_sub(old_span))
            } else {
                Ok(())
            };
            if let Err(e) = r {
                warn!(
                    "{}: cannot track a remapped range ({e}); its syncs compare the whole file",
                    file.path
                );
                file.untracked.store(true, Ordering::Relaxed);
                tracked = false;
            }
        }
        match (tracked, trapped) {
            (true, _) => {
                let p = trapped.unwrap_or(*prot);
                let now = track::tracker().trap_stores(
                    n,
                    new_span,
                    p,
                    trapped.is_some(),
                    Protect::No,
                    &|| marks_at(file, lazy, *off),
                );
                if lazy && *shared && p & libc::PROT_WRITE != 0 && !now {
                    file.shadow.mark_untrapped();
                }
            }
            // Untracked now: no read-only region may stay without a trap.
            (false, Some(p)) => {
                let _ = sys::mprotect(n, new_span, p);
            }
            (false, None) => {}
        }
        reg.maps.insert(
            n,
            Mapping {
                start: n,
                len: new_span,
                file: file.clone(),
                off: *off,
                shared: *shared,
                tracked,
                lazy,
                fill,
                prot: *prot,
            },
        );
        crate::registry::publish_spans(&reg);
    } else {
        if !dontunmap {
            released.extend(crate::registry::forget_range(&mut reg, o, old_span));
        }
        released.extend(crate::registry::forget_range(&mut reg, n, new_span));
    }
    drop(reg);
    drop(released);
    Ok(p)
}

/// Advice that drops page table entries loses the tracker's dirty bits.
pub fn drops_ptes(advice: c_int) -> bool {
    matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE | 21 /* PAGEOUT */ | 24 /* DONTNEED_LOCKED */
    )
}

/// MADV_REMOVE frees the range in the file itself, as the kernel does for
/// a shared file mapping: the shadow's pages and the backing's blocks.
pub fn remove_impl(addr: usize, len: usize, real: impl FnOnce() -> c_int) -> Result<i32, Errno> {
    let end = addr.saturating_add(sys::page_up(len));
    let targets: Vec<(std::sync::Arc<crate::file::FileState>, u64, u64)> = {
        let reg = REG.lock();
        reg.maps
            .range(..end)
            .rev()
            .map(|(_, m)| m)
            .take_while(|m| m.start + m.len > addr)
            .filter(|m| m.shared && m.start < end)
            .map(|m| {
                let a = addr.max(m.start);
                let b = end.min(m.start + m.len);
                (m.file.clone(), m.off + (a - m.start) as u64, (b - a) as u64)
            })
            .collect()
    };
    let guards: Vec<_> = targets
        .iter()
        .map(|(f, _, _)| (f.shadow.io_lock(), f.shadow.fill_lock()))
        .collect();
    let r = check(real())?;
    for (f, off, n) in &targets {
        let punched = f.backing().and_then(|b| {
            sys::fallocate(
                b.raw(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                *off,
                *n,
            )
        });
        if let Err(e) = punched {
            // The shadow reads zeros there now; the backing must too.
            warn!("{}: cannot punch the backing ({e}); writing zeros", f.path);
            f.inner.lock().pending.insert(*off, off + n);
        }
    }
    drop(guards);
    Ok(r)
}
