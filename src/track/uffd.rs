//! userfaultfd write-protect in async mode + `PAGEMAP_SCAN` (Linux ≥ 6.7).
//!
//! A store to an armed page is resolved in the kernel (no message, no
//! signal) and marks the page written; `PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING` reports the written pages and re-arms them in one
//! call. Constants are the kernel's (`linux/userfaultfd.h`, `linux/fs.h`;
//! absent from older libc headers).
//!
//! # Safety
//! ioctl arguments are `#[repr(C)]` structs laid out as the kernel's.

use super::traps::{Apply, MarkAt, Protect, Traps, SEGV_ACCERR};
use super::Stores;
use crate::sys::{self, Errno, SysResult};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

const UFFD_USER_MODE_ONLY: i32 = 1;
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: u64 = 0xc018aa3f;
const UFFDIO_REGISTER: u64 = 0xc020aa00;
const UFFDIO_WAKE: u64 = 0x8010aa02;
const UFFDIO_CONTINUE: u64 = 0xc020aa07;
const UFFDIO_COPY: u64 = 0xc028aa03;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 4;
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
const PAGEMAP_SCAN: u64 = 0xc0606610;
const PM_SCAN_WP_MATCHING: u64 = 1;
const PM_SCAN_CHECK_WPASYNC: u64 = 2;
const PAGE_IS_WRITTEN: u64 = 2;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg` (32 bytes) as a page-fault event lays it out.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

/// The main userfaultfd: write-protect tracking of every shadow mapping
/// and, in SIGBUS mode, the missing and minor faults of shared lazy ones.
static UFFD: AtomicI32 = AtomicI32::new(-1);
/// The message-mode userfaultfd the fault thread serves: private lazy
/// mappings (and every lazy one where SIGBUS mode is not available, in which
/// case it is `UFFD` itself).
static UFFD_MSG: AtomicI32 = AtomicI32::new(-1);
/// Missing and minor faults on `UFFD` raise SIGBUS in the faulting thread,
/// which fills the page itself (`crate::lazy::sigbus`).
static SIGBUS_MODE: AtomicBool = AtomicBool::new(false);
/// A SIGBUS handler is installed to serve them (`crate::lazy::sigbus`).
static SIGBUS_WANTED: AtomicBool = AtomicBool::new(false);

/// At start-up, before [`init`]: whether to open the main userfaultfd in
/// SIGBUS mode.
pub fn set_sigbus_wanted(yes: bool) {
    SIGBUS_WANTED.store(yes, Ordering::Relaxed);
}
static PAGEMAP: AtomicI32 = AtomicI32::new(-1);
/// The uffd handles faults of the kernel's own accesses (not
/// `UFFD_USER_MODE_ONLY`) and missing/minor faults on shmem: lazy filling
/// is possible. A user-mode-only uffd would make a `read()` into a page not
/// filled yet fail with EFAULT, which no program expects.
static LAZY_OK: AtomicBool = AtomicBool::new(false);

fn open_uffd(flags: i32, features: u64) -> SysResult<OwnedFd> {
    let fd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK | flags)?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a struct uffdio_api.
    unsafe { sys::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut _ as *mut _) }?;
    Ok(fd)
}

/// The process's userfaultfds and `/proc/self/pagemap` descriptor.
struct Handles {
    uffd: OwnedFd,
    /// None: `uffd` is in message mode and serves the fault thread too.
    msg: Option<OwnedFd>,
    pagemap: OwnedFd,
}

impl Handles {
    /// Makes them the process's own (they live until replaced after fork).
    fn install(self) {
        let main = self.uffd.into_raw_fd();
        UFFD.store(main, Ordering::Relaxed);
        SIGBUS_MODE.store(self.msg.is_some(), Ordering::Relaxed);
        UFFD_MSG.store(
            self.msg.map_or(main, |m| m.into_raw_fd()),
            Ordering::Relaxed,
        );
        PAGEMAP.store(self.pagemap.into_raw_fd(), Ordering::Relaxed);
    }

    /// Takes the installed ones back (to close them).
    fn uninstall() -> Vec<OwnedFd> {
        let main = UFFD.swap(-1, Ordering::Relaxed);
        let mut msg = UFFD_MSG.swap(-1, Ordering::Relaxed);
        if msg == main {
            msg = -1;
        }
        SIGBUS_MODE.store(false, Ordering::Relaxed);
        [main, msg, PAGEMAP.swap(-1, Ordering::Relaxed)]
            .into_iter()
            .filter(|&fd| fd >= 0)
            .map(|fd| {
                sys::unhold(fd);
                // SAFETY: installed by `install`, now owned by nobody else.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect()
    }
}

fn open_handles() -> SysResult<Handles> {
    let lazy_features = UFFD_FEATURE_WP_ASYNC
        | UFFD_FEATURE_MISSING_SHMEM
        | UFFD_FEATURE_MINOR_SHMEM
        | UFFD_FEATURE_THREAD_ID;
    // SIGBUS mode for the main descriptor where the kernel has it (and the
    // handler can be installed), with a message-mode one beside it.
    let sigbus = SIGBUS_WANTED
        .load(Ordering::Relaxed)
        .then(|| open_uffd(0, lazy_features | UFFD_FEATURE_SIGBUS).ok())
        .flatten()
        .and_then(|fd| {
            let msg = open_uffd(0, lazy_features).ok()?;
            Some((fd, msg))
        });
    let (fd, msg) = match sigbus {
        Some((fd, msg)) => {
            LAZY_OK.store(true, Ordering::Relaxed);
            (fd, Some(msg))
        }
        None => match open_uffd(0, lazy_features) {
            Ok(fd) => {
                LAZY_OK.store(true, Ordering::Relaxed);
                (fd, None)
            }
            Err(_) => {
                LAZY_OK.store(false, Ordering::Relaxed);
                (open_uffd(UFFD_USER_MODE_ONLY, UFFD_FEATURE_WP_ASYNC)?, None)
            }
        },
    };
    let pagemap = sys::open(c"/proc/self/pagemap", libc::O_RDONLY | libc::O_CLOEXEC, 0)?;
    // Long-lived: high-numbered and out of the program's reach (`sys::hold`).
    Ok(Handles {
        uffd: sys::hold(fd),
        msg: msg.map(sys::hold),
        pagemap: sys::hold(pagemap),
    })
}

/// Opens the process's userfaultfd and pagemap handles and checks that a
/// write-protect scan works on a scratch shared mapping.
pub fn init() -> SysResult<()> {
    open_handles()?.install();
    // Probe: register a one-page shared anonymous mapping, arm, write, scan.
    let probe = sys::OwnedMap::new(
        -1,
        4096,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
    )?;
    let p = probe.addr();
    let r = (|| {
        register_and_arm(p, 4096)?;
        // SAFETY: p is our own writable mapping (`probe`).
        unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
        let mut seen = 0;
        harvest(p, 4096, &mut |_, n| seen += n)?;
        if seen == 4096 {
            Ok(())
        } else {
            Err(Errno(libc::ENOTSUP))
        }
    })();
    drop(probe);
    if r.is_err() {
        drop(Handles::uninstall());
    }
    r
}

/// Do missing and minor faults of shared lazy mappings raise SIGBUS in the
/// faulting thread (served there by `crate::lazy::sigbus`)?
pub fn sigbus_mode() -> bool {
    SIGBUS_MODE.load(Ordering::Relaxed)
}

fn register(addr: usize, len: usize, mode: u64) -> SysResult<()> {
    register_with(UFFD.load(Ordering::Relaxed), addr, len, mode)
}

fn register_with(fd: i32, addr: usize, len: usize, mode: u64) -> SysResult<()> {
    let mut reg = UffdioRegister {
        start: addr as u64,
        len: len as u64,
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register.
    unsafe { sys::ioctl(fd, UFFDIO_REGISTER, &mut reg as *mut _ as *mut _)? };
    Ok(())
}

pub fn register_and_arm(addr: usize, len: usize) -> SysResult<()> {
    register(addr, len, UFFDIO_REGISTER_MODE_WP)?;
    // Arming reports unarmed pages as written: discard that first answer.
    harvest(addr, len, &mut |_, _| {})
}

/// Can this process fill shadows lazily?
pub fn lazy_ok() -> bool {
    LAZY_OK.load(Ordering::Relaxed) && UFFD.load(Ordering::Relaxed) >= 0
}

/// Registers a lazily filled shadow mapping: missing and minor faults go
/// to the fault thread ([`crate::lazy`]), writes are tracked. Nothing is
/// armed: pages are mapped write-protected as they are filled
/// (`UFFDIO_CONTINUE_MODE_WP`), and only filled chunks are ever scanned.
///
/// [`Stores::Tracked`]: also write-protect (a shared mapping of a writable
/// descriptor; the kernel refuses write-protection where the mapping can
/// never be written, e.g. a read-only descriptor's).
///
/// A shared mapping goes to the main descriptor (in SIGBUS mode its faults
/// are served in the faulting thread), a private one to the fault thread's:
/// its pages must come from the data file (`UFFDIO_CONTINUE`), which is
/// filled under the fill lock.
pub fn register_lazy(addr: usize, len: usize, stores: Stores, shared: bool) -> SysResult<()> {
    let wp = if stores == Stores::Tracked {
        UFFDIO_REGISTER_MODE_WP
    } else {
        0
    };
    let fd = if shared {
        UFFD.load(Ordering::Relaxed)
    } else {
        UFFD_MSG.load(Ordering::Relaxed)
    };
    register_with(
        fd,
        addr,
        len,
        UFFDIO_REGISTER_MODE_MISSING | wp | UFFDIO_REGISTER_MODE_MINOR,
    )
}

/// Is a shared lazy mapping's fault served in the faulting thread?
pub fn serves_in_thread(shared: bool) -> bool {
    shared && sigbus_mode()
}

/// `UFFDIO_COPY` on the main descriptor: a new page of the data file at
/// `dst` holding `len` bytes from `src`, mapped (write-protected with
/// `wp`). Returns the bytes done, or the error with the bytes done before
/// it. Async-signal-safe.
pub fn copy_in(dst: usize, src: usize, len: usize, wp: bool) -> Result<usize, (Errno, usize)> {
    let mut c = UffdioCopy {
        dst: dst as u64,
        src: src as u64,
        len: len as u64,
        mode: if wp { UFFDIO_COPY_MODE_WP } else { 0 },
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY takes a struct uffdio_copy; `src` is readable
    // memory of ours (the kernel checks it).
    let r = unsafe {
        sys::ioctl(
            UFFD.load(Ordering::Relaxed),
            UFFDIO_COPY,
            &mut c as *mut _ as *mut _,
        )
    };
    let done = c.copy.max(0) as usize;
    match r {
        Ok(_) => Ok(len),
        Err(e) => Err((e, done)),
    }
}

/// `UFFDIO_CONTINUE` on the main descriptor for one page already in the
/// data file (a minor fault). Async-signal-safe.
pub fn continue_in(page: usize, wp: bool) -> SysResult<()> {
    let mode = if wp { UFFDIO_CONTINUE_MODE_WP } else { 0 };
    uffd_continue(UFFD.load(Ordering::Relaxed), page, sys::PAGE, mode).0
}

/// `UFFDIO_CONTINUE` of `[start, start+len)` on `fd`: the result and the
/// bytes mapped before an error.
fn uffd_continue(fd: i32, start: usize, len: usize, mode: u64) -> (SysResult<()>, usize) {
    let mut c = UffdioContinue {
        range: UffdioRange {
            start: start as u64,
            len: len as u64,
        },
        mode,
        mapped: 0,
    };
    // SAFETY: UFFDIO_CONTINUE takes a struct uffdio_continue.
    let r = unsafe { sys::ioctl(fd, UFFDIO_CONTINUE, &mut c as *mut _ as *mut _) };
    (r.map(|_| ()), c.mapped.max(0) as usize)
}

/// How [`map_filled`] maps a page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MapAs {
    /// Write-protected: its first store is tracked.
    Clean,
    /// Already written (a store faulted it in).
    Written,
}

/// Maps the pages of `[addr, addr+len)` that the data file holds, skipping
/// pages already mapped. `how`: [`MapAs::Clean`] (write-protected, so that the first store is
/// tracked) or [`MapAs::Written`] (for a store that faulted them in: the
/// next harvest reports and re-arms them).
/// Returns false if a page is missing from the file. Wakes nobody: see
/// [`wake`].
pub fn map_filled(addr: usize, len: usize, how: MapAs) -> bool {
    let end = addr + len;
    let mut cur = addr;
    // Woken by the caller once the whole window is mapped: a thread that
    // ran on early could harvest the window's unmapped pages, which count
    // as written.
    let mode = UFFDIO_CONTINUE_MODE_DONTWAKE
        | if how == MapAs::Clean {
            UFFDIO_CONTINUE_MODE_WP
        } else {
            0
        };
    let fd = UFFD_MSG.load(Ordering::Relaxed);
    while cur < end {
        let (r, done) = uffd_continue(fd, cur, end - cur, mode);
        match r {
            Ok(()) => return true,
            // Already mapped (another fault got there first): skip the page.
            Err(Errno(libc::EEXIST)) => cur += done + sys::PAGE,
            Err(Errno(libc::EAGAIN)) => cur += done,
            Err(_) => return false,
        }
    }
    true
}

/// Wakes threads waiting on faults in `[addr, addr+len)`.
pub fn wake(addr: usize, len: usize) {
    let mut r = UffdioRange {
        start: addr as u64,
        len: len as u64,
    };
    // SAFETY: UFFDIO_WAKE takes a struct uffdio_range.
    let _ = unsafe {
        sys::ioctl(
            UFFD_MSG.load(Ordering::Relaxed),
            UFFDIO_WAKE,
            &mut r as *mut _ as *mut _,
        )
    };
}

/// A page fault reported by the userfaultfd.
pub struct Fault {
    pub addr: usize,
    /// The access was a store.
    pub write: bool,
    /// The faulting thread.
    pub tid: i32,
}

/// Waits for page-fault events and passes each to `f`. Returns on an error
/// of the descriptor (closed after fork…).
/// `on_wake` runs when `wake_fd` becomes readable.
pub fn serve_faults(
    fd: i32,
    wake_fd: i32,
    f: &mut dyn FnMut(Fault),
    on_wake: &mut dyn FnMut(),
) -> SysResult<()> {
    let mut msgs = [UffdMsg::default(); 16];
    loop {
        let [_, woken] = sys::poll_in2(fd, wake_fd, None)?;
        if woken {
            on_wake();
        }
        // SAFETY: the buffer is plain bytes of the right size.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                msgs.as_mut_ptr() as *mut u8,
                std::mem::size_of_val(&msgs),
            )
        };
        let n = match sys::read(fd, bytes) {
            Ok(n) => n / std::mem::size_of::<UffdMsg>(),
            Err(Errno(libc::EAGAIN)) | Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
        };
        for m in &msgs[..n] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                f(Fault {
                    addr: m.address as usize,
                    write: m.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    tid: m.ptid as i32,
                });
            }
        }
    }
}

/// The userfaultfd the fault thread serves.
pub fn fd() -> i32 {
    UFFD_MSG.load(Ordering::Relaxed)
}

/// Reports written page ranges in `[addr, addr+len)` and write-protects them.
pub fn harvest(addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
    let mut regions = [PageRegion::default(); 64];
    let end = (addr + len) as u64;
    let mut cur = addr as u64;
    while cur < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: cur,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg whose vec points
        // at vec_len page_regions.
        let n = unsafe {
            sys::ioctl(
                PAGEMAP.load(Ordering::Relaxed),
                PAGEMAP_SCAN,
                &mut arg as *mut _ as *mut _,
            )?
        } as usize;
        for r in &regions[..n] {
            out(r.start as usize, (r.end - r.start) as usize);
        }
        if arg.walk_end <= cur {
            break;
        }
        cur = arg.walk_end;
    }
    Ok(())
}

/// In a forked child the inherited handles act on the parent's memory: close
/// them and open the child's own. The caller registers its ranges again.
pub fn reinit_in_child() -> SysResult<()> {
    drop(Handles::uninstall());
    open_handles()?.install();
    Ok(())
}

/// The descriptors the tracker owns (so the fd hooks can protect them).
pub fn owned_fds() -> [i32; 3] {
    [
        UFFD.load(Ordering::Relaxed),
        UFFD_MSG.load(Ordering::Relaxed),
        PAGEMAP.load(Ordering::Relaxed),
    ]
}

/// Region traps of large mappings ([`super::traps`], 2 MiB granules): a
/// harvest scans only the regions stored to since the last one.
pub(super) static REGIONS: Traps = Traps::new(21);

/// `DAXSHIM_TRAP_MIN`: the smallest mapping whose regions are trapped
/// (`u64::MAX`: none).
static TRAP_MIN: AtomicU64 = AtomicU64::new(u64::MAX);

static SEGV_INSTALLED: std::sync::Once = std::sync::Once::new();
/// The handler is installed (a failed install leaves it false).
static SEGV_OK: AtomicBool = AtomicBool::new(false);

/// At start-up: from which mapping size on regions are trapped.
pub fn set_trap_min(min: Option<u64>) {
    TRAP_MIN.store(min.unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Are any regions trapped (read-only until stored to)?
pub fn traps_in_use() -> bool {
    REGIONS.in_use()
}

/// Mapping changes in progress (`mmap`, `mremap` hooks): a lazy range is
/// mapped inaccessible until it is registered and published, and a fault
/// in it (SIGSEGV there, SIGBUS in a range registered but not yet in the
/// SIGBUS handler's table) waits for the change instead of failing.
static CHANGING: AtomicUsize = AtomicUsize::new(0);

/// Held across a change of this process's mappings.
pub struct Changing;

impl Changing {
    pub fn begin() -> Changing {
        CHANGING.fetch_add(1, Ordering::SeqCst);
        Changing
    }
}

impl Drop for Changing {
    fn drop(&mut self) {
        CHANGE_GEN.fetch_add(1, Ordering::SeqCst);
        CHANGING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Completed mapping changes (a fault seen after one may be stale).
static CHANGE_GEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The last fault this thread let retry: (address, CHANGE_GEN then,
    /// faults in a row there).
    static RETRIED: std::cell::Cell<(usize, usize, usize)> =
        const { std::cell::Cell::new((0, usize::MAX, 0)) };
}

/// Is a mapping change in progress?
pub fn changing() -> bool {
    CHANGING.load(Ordering::SeqCst) != 0
}

fn on_segv(info: &libc::siginfo_t) -> bool {
    if info.si_code != SEGV_ACCERR {
        return false;
    }
    // SAFETY: SIGSEGV's siginfo carries the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    // Faults in a row at this address that were let retry: a real fault
    // goes to the program at the latest after this many, whatever mapping
    // changes go on meanwhile.
    let (last, gen0, tries) = RETRIED.with(|r| r.get());
    let tries = if last == addr { tries + 1 } else { 0 };
    let let_retry = |gen: usize| {
        RETRIED.with(|r| r.set((addr, gen, tries)));
        true
    };
    if tries > 10_000 {
        RETRIED.with(|r| r.set((0, 0, 0)));
        return false;
    }
    // A mapping change in progress first: the range may be being mapped
    // (inaccessible until registered), and a region trap of the range it
    // replaces must not open the new, unregistered mapping. Wait for the
    // change and let the access retry.
    if changing() {
        for _ in 0..100_000 {
            if !changing() {
                break;
            }
            sys::sched_yield();
        }
        return let_retry(CHANGE_GEN.load(Ordering::SeqCst));
    }
    if REGIONS.on_segv(info) {
        RETRIED.with(|r| r.set((0, 0, 0)));
        return true;
    }
    // No change now, but one may have completed between the fault and this
    // check: retry once per completed change; a real fault comes back with
    // nothing changed and goes to the program.
    let gen = CHANGE_GEN.load(Ordering::SeqCst);
    if last == addr && gen0 == gen {
        RETRIED.with(|r| r.set((0, 0, 0)));
        return false;
    }
    let_retry(gen)
}

/// Installs the SIGSEGV handler (region traps, ranges being mapped) once.
pub fn ensure_segv_handler() -> bool {
    SEGV_INSTALLED.call_once(|| {
        let r = crate::sigchain::install_fault_handler(libc::SIGSEGV, on_segv);
        if let Err(e) = &r {
            warn!("{e}");
        }
        SEGV_OK.store(r.is_ok(), Ordering::Relaxed);
    });
    SEGV_OK.load(Ordering::Relaxed)
}

/// In a forked child, now in `slot` of the shadow with marks table `table`.
pub fn remark_after_fork(table: usize, slot: usize) {
    REGIONS.remark_after_fork(table, slot)
}

pub struct UffdTracker;

impl super::DirtyTracker for UffdTracker {
    fn name(&self) -> &'static str {
        "uffd"
    }
    fn is_exact(&self) -> bool {
        true
    }
    fn track(&self, addr: usize, len: usize, within: usize) -> SysResult<()> {
        register(addr, len, UFFDIO_REGISTER_MODE_WP)?;
        self.arm(addr, len, within)
    }
    fn arm(&self, addr: usize, len: usize, within: usize) -> SysResult<()> {
        // Arming reports unarmed pages as written: discard that first
        // answer. A page beyond the end of the file is left unarmed (no
        // page table entry that truncations walk): once the file grows, a
        // page of it that was touched counts as written at the next sync.
        harvest(addr, within.min(len), &mut |_, _| {})
    }
    fn harvest(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) -> SysResult<()> {
        harvest(addr, len, out)
    }
    fn after_fork_child(&self) -> SysResult<()> {
        // Region traps, their protections and the handler are inherited.
        reinit_in_child()
    }
    fn untrack(&self, addr: usize, len: usize) {
        REGIONS.untrack(addr, len)
    }
    fn before_kernel_stores(&self, addr: usize, len: usize) {
        REGIONS.before_kernel_stores(addr, len)
    }
    fn on_program_mprotect(&self, addr: usize, len: usize, prot: i32, apply: Apply) -> i32 {
        REGIONS.on_mprotect(addr, len, prot, apply)
    }
    fn trap_stores(
        &self,
        addr: usize,
        len: usize,
        prot: i32,
        force: bool,
        protect: Protect,
        marks: &dyn Fn() -> Option<MarkAt>,
    ) -> bool {
        let small = (len as u64) < TRAP_MIN.load(Ordering::Relaxed);
        if !force && (small || prot & libc::PROT_WRITE == 0) {
            return false;
        }
        if !ensure_segv_handler() {
            TRAP_MIN.store(u64::MAX, Ordering::Relaxed);
            return false;
        }
        match REGIONS.track(addr, len, prot, protect, marks()) {
            Ok(()) => true,
            Err(e) => {
                debug!("cannot trap the regions of {addr:#x}+{len}: {e}");
                false
            }
        }
    }
    fn trapped_prot(&self, addr: usize) -> Option<i32> {
        REGIONS.prot_at(addr)
    }
    fn take_hot(&self, addr: usize, len: usize, out: &mut dyn FnMut(usize, usize)) {
        if !REGIONS.in_use() {
            return out(addr, len);
        }
        REGIONS.uncovered(addr, len, out);
        REGIONS.harvest(addr, len, out);
    }
    fn fills_lazily(&self) -> bool {
        lazy_ok()
    }
    fn register_lazy(
        &self,
        addr: usize,
        len: usize,
        stores: Stores,
        shared: bool,
    ) -> SysResult<()> {
        register_lazy(addr, len, stores, shared)
    }
    fn owns_fd(&self, fd: i32) -> bool {
        owned_fds().contains(&fd)
    }
}
