//! The fault thread: serves missing and minor faults of lazy mappings by
//! filling a window of the data file and mapping it.

use super::{host, Hit, CHUNK};
use crate::lock::Lock;
use crate::stats::{add, STATS};
use crate::sys::{self, PAGE};
use crate::track::uffd::{self, MapAs};
use std::sync::atomic::{AtomicI32, Ordering};

/// The descriptor the running fault thread serves (-1: none).
static SERVED_FD: AtomicI32 = AtomicI32::new(-1);

static START: Lock<()> = Lock::new(());

/// Starts the fault thread for the current userfaultfd unless it runs. It
/// serves the message-mode userfaultfd and evicts when woken
/// ([`super::evict`]).
pub fn start() -> Result<(), String> {
    let fd = uffd::fd();
    if SERVED_FD.load(Ordering::Acquire) == fd {
        return Ok(());
    }
    let _g = START.lock();
    if SERVED_FD.load(Ordering::Acquire) == fd {
        return Ok(());
    }
    let wake = sys::eventfd()
        .map(sys::hold)
        .map_err(|e| format!("cannot start the fault thread: {e}"))?;
    let wake_fd = std::os::fd::IntoRawFd::into_raw_fd(wake);
    sys::spawn(
        c"daxshim-fault",
        256 << 10,
        Box::new(move || fault_thread(fd, wake_fd)),
    )
    .map_err(|e| format!("cannot start the fault thread: {e}"))?;
    let old = super::evict::WAKE_FD.swap(wake_fd, Ordering::AcqRel);
    close_held(old);
    SERVED_FD.store(fd, Ordering::Release);
    Ok(())
}

/// In a forked child: the parent's thread does not exist here (its wake-up
/// descriptor is the parent's too).
pub fn forget_thread_after_fork() {
    SERVED_FD.store(-1, Ordering::Release);
    let old = super::evict::WAKE_FD.swap(-1, Ordering::AcqRel);
    close_held(old);
    // SAFETY: the only other holder would be a thread of the parent.
    unsafe { START.force_unlock() };
}

fn close_held(fd: i32) {
    if fd >= 0 {
        sys::unhold(fd);
        // SAFETY: a descriptor this module opened and owns alone.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
}

/// The first fill of a random access (measured, docs/ARCHITECTURE.md: ~10 µs per 4 KiB fault
/// through a fault thread, ~2.4 µs per page at 64 KiB; but a random reader
/// pays for every page copied and not used).
const MIN_WINDOW: u64 = 16 << 10;

/// The largest fill: sequential access doubles the window up to this (like
/// the kernel's readahead).
const MAX_WINDOW: u64 = 32 * CHUNK;

fn fault_thread(fd: i32, wake_fd: i32) {
    // Signals are for the program's threads; hooks pass straight through.
    let _signals = sys::SignalBlock::all();
    let _inside = crate::reentry::enter_always();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut seq = Sequence::default();
    let on_wake = &mut || {
        let mut b = [0u8; 8];
        let _ = sys::read(wake_fd, &mut b);
        super::evict::evict_over_limit();
    };
    let r = uffd::serve_faults(
        fd,
        wake_fd,
        &mut |f| on_fault(f, &mut seq, &mut buf),
        on_wake,
    );
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
    let Some(Hit {
        file,
        start,
        len,
        off,
        tracked,
    }) = host().and_then(|h| h.lookup(page))
    else {
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
    let filled = match file
        .backing()
        .and_then(|b| file.shadow().fill_range(b.raw(), c0, c1, buf))
    {
        Ok(n) => n,
        Err(e) => {
            // The page cannot be had (a read error of the backing, a full
            // /dev/shm): as the kernel does when it cannot read a page in,
            // the faulting thread gets SIGBUS instead of faulting forever.
            error!(
                "{}: cannot fill the shadow from the backing: {e}",
                file.path()
            );
            if fault.tid > 0 {
                sys::tgkill(fault.tid, libc::SIGBUS);
            }
            uffd::wake(page, PAGE);
            return;
        }
    };
    let bits = file.chunks();
    bits.grow(c1.div_ceil(CHUNK));
    for c in chunk0 / CHUNK..c1.div_ceil(CHUNK) {
        bits.set(c);
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
        let _ = uffd::map_filled(page, PAGE, MapAs::Written);
    }
    // Pages that cannot be mapped (an I/O error left a hole) fault again.
    // A sequential window's part before the fault was mapped by the fill
    // before: start at the fault (each mapped page costs an ioctl).
    let from = if sequential { page } else { va };
    let how = if tracked && !(write && sequential) {
        MapAs::Clean
    } else {
        MapAs::Written
    };
    let _ = uffd::map_filled(from, va + n - from, how);
    uffd::wake(va, n);
    seq.next_va = va + n;
    seq.window = window;
    if filled > 0 {
        // This thread is the evictor: evict now rather than wait for itself.
        super::evict::note_shared(file.shadow(), filled);
        super::evict::note_filled(filled, false);
        super::evict::evict_over_limit();
    }
}
