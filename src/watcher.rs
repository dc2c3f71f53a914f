//! Changes made outside the shim reach the shadow without waiting for a
//! shim call: an inotify watch on each backing file that has a shadow copy,
//! served by one thread per process, makes the file catch up
//! ([`FileState::catch_up`]) when the kernel reports a write to it. The
//! shim's own writes record the backing's size and mtime as they change it,
//! so their events cost one `fstat` and find nothing to take in.
//!
//! inotify sees writes through `write(2)` and its kin (other processes,
//! raw system calls, truncation), not stores through another process's
//! mapping: those reach the shadow at the next sync, mapping or read.

use crate::file::{CatchUp, FileState};
use crate::lock::Lock;
use crate::sys;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Weak};

struct Watches {
    /// Watch descriptor → the file it watches.
    files: BTreeMap<i32, Weak<FileState>>,
}

static WATCHES: Lock<Watches> = Lock::new(Watches {
    files: BTreeMap::new(),
});
/// The process's inotify descriptor (-1: none yet; owned while ≥ 0).
static FD: AtomicI32 = AtomicI32::new(-1);
/// inotify could not be had (limits): no watcher, said once.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// The inotify descriptor, made (with its thread) on first use.
fn fd() -> Option<i32> {
    let fd = FD.load(Ordering::Acquire);
    if fd >= 0 {
        return Some(fd);
    }
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: plain system call.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if raw < 0 {
        UNAVAILABLE.store(true, Ordering::Relaxed);
        info!(
            "no inotify ({}): changes made outside the shim show at the next sync, mapping or read",
            sys::Errno::last()
        );
        return None;
    }
    // SAFETY: a descriptor the kernel just opened for us.
    let owned = sys::hold(unsafe { OwnedFd::from_raw_fd(raw) });
    let raw = std::os::fd::AsRawFd::as_raw_fd(&owned);
    let spawned = sys::spawn(c"daxshim-watch", 128 << 10, Box::new(move || serve(raw)));
    if spawned.is_err() {
        UNAVAILABLE.store(true, Ordering::Relaxed);
        return None;
    }
    FD.store(owned.into_raw_fd(), Ordering::Release);
    Some(raw)
}

/// Watches `f`'s backing file (once it has a shadow copy).
pub fn watch(f: &Arc<FileState>) {
    let mut w = WATCHES.lock();
    if w.files
        .values()
        .any(|x| std::ptr::addr_eq(x.as_ptr(), Arc::as_ptr(f)))
    {
        return;
    }
    let Some(fd) = fd() else {
        return;
    };
    let Ok(backing) = f.backing() else {
        return;
    };
    let path = CString::new(format!("/proc/self/fd/{}", backing.raw())).unwrap_or_default();
    // SAFETY: a C string; the watch follows the link to the file itself.
    let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MODIFY) };
    if wd < 0 {
        debug!("{}: no inotify watch: {}", f.path, sys::Errno::last());
        return;
    }
    w.files.insert(wd, Arc::downgrade(f));
}

/// Stops watching `f` (detached).
pub fn unwatch(f: &FileState) {
    let mut w = WATCHES.lock();
    let fd = FD.load(Ordering::Acquire);
    let gone: Vec<i32> = w
        .files
        .iter()
        .filter(|(_, x)| std::ptr::addr_eq(x.as_ptr(), f as *const FileState))
        .map(|(&wd, _)| wd)
        .collect();
    for wd in gone {
        w.files.remove(&wd);
        if fd >= 0 {
            // SAFETY: plain system call on our descriptor.
            unsafe { libc::inotify_rm_watch(fd, wd) };
        }
    }
}

/// How long the watcher lets a burst of writes settle before it looks
/// (microseconds: Kyoto Cabinet's atomic run gains as much with 250 µs as
/// with 1 ms, and a write outside the shim shows 1.5 ms after it, not 2.2).
const SETTLE_US: u64 = 250;
/// How often it looks again at a file a shim call of this process is busy
/// with (milliseconds).
const BUSY_RETRY_MS: u64 = 1;
/// After a look that found nothing but this process's own writes (each
/// recorded as it is made), how long the watcher waits before it reads
/// events again (milliseconds): `QUIET_MIN_MS`, doubled after each such
/// look in a row up to `QUIET_MAX_MS`, and back to the minimum after a look
/// that took something in or once the watcher has been idle that long. A
/// program that writes or syncs every few hundred microseconds (Kyoto
/// Cabinet with `-oas`) would otherwise wake it on the other CPU at every
/// write, for nothing: 15-30 % of that program's CPU time at every write,
/// and at a 2 ms period still a shootdown of the watcher's CPU's TLB for
/// every other wake-up (a write-protect or a truncation of the program
/// while it runs, ~50 µs each on this VM). A write outside the shim shows
/// up to this much later meanwhile (or at the program's next shim call that
/// reads, maps or syncs the file, which catches up first).
const QUIET_MIN_MS: u64 = 2;
const QUIET_MAX_MS: u64 = 16;

/// The watcher thread: reads events, makes each watched file catch up.
fn serve(fd: i32) {
    // Signals are for the program's threads; hooks pass straight through.
    let _signals = sys::SignalBlock::all();
    let _inside = crate::reentry::enter_always();
    let mut buf = [0u8; 4096];
    // Files whose look found one of this process's shim calls in progress
    // (not kept alive for it).
    let mut busy: Vec<Weak<FileState>> = Vec::new();
    // The last look found only the shim's own writes.
    let mut quiet = false;
    // How long to wait after such a look (`QUIET_MIN_MS`..=`QUIET_MAX_MS`).
    let mut quiet_ms = QUIET_MIN_MS;
    loop {
        if quiet {
            std::thread::sleep(std::time::Duration::from_millis(quiet_ms));
            quiet_ms = (quiet_ms * 2).min(QUIET_MAX_MS);
        }
        let timeout = (!busy.is_empty()).then_some(if quiet { 0 } else { BUSY_RETRY_MS });
        let waited = std::time::Instant::now();
        let polled = sys::poll_in2(fd, -1, timeout).map(|[ready, _]| ready);
        if waited.elapsed() >= std::time::Duration::from_millis(QUIET_MAX_MS) {
            quiet_ms = QUIET_MIN_MS; // idle since: the next burst starts short
        }
        match polled {
            Err(_) => return,
            Ok(false) => {}         // time to look at the busy files again
            Ok(true) if quiet => {} // a burst had that long to settle
            // The shim's own writes come in bursts (a sync's spans, a
            // truncation and its regrowth) and are recorded when the burst
            // ends: looking a moment later finds nothing to do, where looking
            // at once would wait for the call (and wake it) or redo its work.
            Ok(true) => std::thread::sleep(std::time::Duration::from_micros(SETTLE_US)),
        }
        let mut wds = Vec::new();
        loop {
            let n = match sys::read(fd, &mut buf) {
                Ok(n) => n,
                Err(sys::Errno(libc::EINTR)) => continue,
                Err(sys::Errno(libc::EAGAIN)) => break,
                Err(_) => return,
            };
            let mut off = 0;
            let head = std::mem::size_of::<libc::inotify_event>();
            while off + head <= n {
                // SAFETY: the kernel wrote whole events into the buffer.
                let ev = unsafe {
                    (buf.as_ptr().add(off) as *const libc::inotify_event).read_unaligned()
                };
                if !wds.contains(&ev.wd) {
                    wds.push(ev.wd);
                }
                off += head + ev.len as usize;
            }
        }
        if FD.load(Ordering::Acquire) != fd {
            return; // replaced after fork
        }
        let mut files: Vec<Arc<FileState>> = busy.drain(..).filter_map(|w| w.upgrade()).collect();
        {
            let w = WATCHES.lock();
            for f in wds
                .iter()
                .filter_map(|wd| w.files.get(wd).and_then(Weak::upgrade))
            {
                if !files.iter().any(|g| Arc::ptr_eq(g, &f)) {
                    files.push(f);
                }
            }
        }
        let mut looked = false;
        for f in files {
            match f.catch_up_unless_busy() {
                CatchUp::Busy => busy.push(Arc::downgrade(&f)),
                CatchUp::Looked => looked = true,
                CatchUp::Unchanged => {}
            }
        }
        quiet = !looked;
        if looked {
            quiet_ms = QUIET_MIN_MS;
        }
    }
}

/// Fork: held by the atfork handlers like the other leaf locks.
pub fn hold_for_fork() {
    std::mem::forget(WATCHES.lock());
}

/// # Safety
/// After [`hold_for_fork`], in the parent or the child.
pub unsafe fn release_after_fork() {
    // SAFETY: hold_for_fork took it and forgot the guard.
    unsafe { WATCHES.force_unlock() };
}

/// In a forked child: the inherited inotify descriptor is the parent's
/// instance (its events would be shared) and its thread does not exist
/// here. The caller watches its files again.
pub fn forget_after_fork() {
    let old = FD.swap(-1, Ordering::AcqRel);
    if old >= 0 {
        sys::unhold(old);
        // SAFETY: the inherited descriptor, ours to close in the child.
        drop(unsafe { OwnedFd::from_raw_fd(old) });
    }
    WATCHES.lock().files.clear();
}
