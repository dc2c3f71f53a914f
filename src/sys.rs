//! Raw system calls used inside the shim.
//!
//! # Safety
//! These go through `libc::syscall`, which the shim never interposes, so they
//! can be used before initialisation and from inside hooks without re-entry.
//! Functions taking raw pointers are `unsafe` and document what they need.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// An `errno` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn last() -> Errno {
        Errno(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.0)
    }
}

pub type SysResult<T> = Result<T, Errno>;

/// A failure told in words for the log, with the system error behind it:
/// a hook that fails its call because of it reports that errno (or the
/// one the kernel uses for the exhausted resource).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub errno: Errno,
    pub msg: String,
}

impl Failure {
    pub fn new(errno: Errno, msg: impl Into<String>) -> Failure {
        Failure {
            errno,
            msg: msg.into(),
        }
    }

    /// A refusal on the shim's own grounds (an unsafe shadow directory, a
    /// full slot table): no system call failed.
    pub fn refused(msg: impl Into<String>) -> Failure {
        Failure::new(Errno(libc::EACCES), msg)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl From<Failure> for String {
    fn from(f: Failure) -> String {
        f.msg
    }
}

fn check(ret: libc::c_long) -> SysResult<i64> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

pub fn get_errno() -> i32 {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}

/// Runs `f` and restores `errno` afterwards, so shim work inside a hook never
/// leaks an errno to a caller whose call succeeded.
pub fn preserving_errno<T>(f: impl FnOnce() -> T) -> T {
    let saved = get_errno();
    let r = f();
    set_errno(saved);
    r
}

macro_rules! sc {
    ($nr:expr $(, $a:expr)*) => {
        // SAFETY: plain system call; every pointer argument is checked by the
        // callers' own contracts below.
        check(unsafe { libc::syscall($nr $(, $a)*) })
    };
}

pub fn write_all_fd(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        match sc!(libc::SYS_write, fd, buf.as_ptr(), buf.len()) {
            Ok(n) if n > 0 => buf = &buf[n as usize..],
            Err(Errno(libc::EINTR)) => continue,
            _ => return,
        }
    }
}

pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> SysResult<usize> {
    loop {
        match sc!(libc::SYS_pread64, fd, buf.as_mut_ptr(), buf.len(), off) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

pub fn pwrite(fd: i32, buf: &[u8], off: u64) -> SysResult<usize> {
    loop {
        match sc!(libc::SYS_pwrite64, fd, buf.as_ptr(), buf.len(), off) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

/// Writes all of `buf` at `off`, retrying short writes.
pub fn pwrite_all(fd: i32, mut buf: &[u8], mut off: u64) -> SysResult<()> {
    while !buf.is_empty() {
        let n = pwrite(fd, buf, off)?;
        if n == 0 {
            return Err(Errno(libc::EIO));
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `off`, retrying short reads until EOF.
pub fn pread_full(fd: i32, buf: &mut [u8], off: u64) -> SysResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = pread(fd, &mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn openat(dirfd: i32, path: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    loop {
        match sc!(libc::SYS_openat, dirfd, path.as_ptr(), flags, mode) {
            Err(Errno(libc::EINTR)) => continue,
            // SAFETY: a descriptor the kernel just opened for us alone.
            r => return r.map(|n| unsafe { OwnedFd::from_raw_fd(n as i32) }),
        }
    }
}

pub fn open(path: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    openat(libc::AT_FDCWD, path, flags, mode)
}

pub fn fstat(fd: i32) -> SysResult<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    sc!(libc::SYS_fstat, fd, &mut st as *mut libc::stat)?;
    Ok(st)
}

pub fn lstat(path: &CStr) -> SysResult<libc::stat> {
    // SAFETY: as above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    sc!(
        libc::SYS_newfstatat,
        libc::AT_FDCWD,
        path.as_ptr(),
        &mut st as *mut libc::stat,
        libc::AT_SYMLINK_NOFOLLOW
    )?;
    Ok(st)
}

/// The size of the file behind `fd`. Asks for the size alone: a query of
/// a file's times (as `fstat` makes) makes the kernel (6.13 and later,
/// multigrain timestamps) stamp the file's next change with a fine-grained
/// time, which moves the floor of every later coarse timestamp: every other
/// file written after it then has its times changed at each write too, and
/// ext4 without a journal writes a changed inode at each `fdatasync`.
pub fn file_size(fd: i32) -> SysResult<u64> {
    statx_fd(fd, libc::STATX_SIZE).map(|x| x.stx_size)
}

/// `statx` of an open descriptor (`AT_EMPTY_PATH`).
pub fn statx_fd(fd: i32, mask: u32) -> SysResult<libc::statx> {
    // SAFETY: as above.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    sc!(
        libc::SYS_statx,
        fd,
        c"".as_ptr(),
        libc::AT_EMPTY_PATH,
        mask,
        &mut stx as *mut libc::statx
    )?;
    Ok(stx)
}

/// The coarse real-time clock (the one file timestamps are taken from), as
/// seconds and nanoseconds.
pub fn coarse_realtime() -> (i64, u64) {
    // SAFETY: an all-zero timespec is a valid value to be overwritten.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock and output pointer (vDSO, no system call).
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    (ts.tv_sec, ts.tv_nsec as u64)
}

/// `statx` of a path (symbolic links followed).
pub fn statx_path(path: &CStr, mask: u32) -> SysResult<libc::statx> {
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    sc!(
        libc::SYS_statx,
        libc::AT_FDCWD,
        path.as_ptr(),
        0,
        mask,
        &mut stx as *mut libc::statx
    )?;
    Ok(stx)
}

pub fn ftruncate(fd: i32, len: u64) -> SysResult<()> {
    loop {
        match sc!(libc::SYS_ftruncate, fd, len) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r.map(|_| ()),
        }
    }
}

pub fn fdatasync(fd: i32) -> SysResult<()> {
    sc!(libc::SYS_fdatasync, fd).map(|_| ())
}

pub fn fcntl(fd: i32, cmd: i32, arg: libc::c_long) -> SysResult<i64> {
    sc!(libc::SYS_fcntl, fd, cmd, arg)
}

/// OFD lock operation on one byte range of `fd`.
pub fn ofd_lock(fd: i32, cmd: i32, kind: i32, start: i64, len: i64) -> SysResult<libc::flock> {
    // SAFETY: a zeroed flock is valid; the kernel reads and may write it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    loop {
        match sc!(libc::SYS_fcntl, fd, cmd, &mut fl as *mut libc::flock) {
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(fl),
        }
    }
}

pub fn lseek(fd: i32, off: i64, whence: i32) -> SysResult<i64> {
    sc!(libc::SYS_lseek, fd, off, whence)
}

pub fn readlink(path: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    sc!(
        libc::SYS_readlinkat,
        libc::AT_FDCWD,
        path.as_ptr(),
        buf.as_mut_ptr(),
        buf.len()
    )
    .map(|n| n as usize)
}

pub fn getpid() -> i32 {
    // SAFETY: getpid never fails.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// Fills `buf` with random bytes (never blocks: `GRND_NONBLOCK`).
pub fn getrandom(buf: &mut [u8]) -> SysResult<()> {
    let n = sc!(
        libc::SYS_getrandom,
        buf.as_mut_ptr(),
        buf.len(),
        libc::GRND_NONBLOCK
    )?;
    if n as usize == buf.len() {
        Ok(())
    } else {
        Err(Errno(libc::EAGAIN))
    }
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid never fails.
    unsafe { libc::syscall(libc::SYS_geteuid) as u32 }
}

/// Queues `sig` with `info` to the calling thread (the kernel delivers it
/// when the thread does not block it). Falls back to a plain `tgkill`.
pub fn requeue_signal(sig: i32, info: &libc::siginfo_t) {
    let tid = sc!(libc::SYS_gettid).unwrap_or(0) as i32;
    let queued = sc!(
        libc::SYS_rt_tgsigqueueinfo,
        getpid(),
        tid,
        sig,
        info as *const libc::siginfo_t
    );
    if queued.is_err() {
        tgkill(tid, sig);
    }
}

/// Sends `sig` to thread `tid` of this process.
pub fn tgkill(tid: i32, sig: i32) {
    let _ = sc!(libc::SYS_tgkill, getpid(), tid, sig);
}

pub fn exit_group(code: i32) -> ! {
    // SAFETY: exit_group does not return.
    unsafe {
        libc::syscall(libc::SYS_exit_group, code);
    }
    unreachable!()
}

/// # Safety
/// Same contract as `mmap(2)`; with `MAP_FIXED` the caller owns the range.
pub unsafe fn mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> SysResult<*mut libc::c_void> {
    sc!(libc::SYS_mmap, addr, len, prot, flags, fd, off).map(|p| p as usize as *mut libc::c_void)
}

/// One of the shim's own mappings (views of shadows and backings, headers,
/// probes), placed by the kernel and unmapped when dropped. The shim never
/// hands out references into it that outlive it.
#[derive(Debug, Default)]
pub struct OwnedMap {
    addr: usize,
    len: usize,
}

// ---- where the shim's own memory goes --------------------------------------

/// The shim's own mappings (its headers, views, thread stacks, allocator)
/// are asked for far below the area where the kernel places a program's
/// hint-free mappings (top-down from below the stack), so that the program's
/// `mmap` calls land where they would without the shim. Each request gets
/// the next range of its area; a range that is taken makes the kernel choose
/// (then the program's area is used: no harm but the placement).
const MAPS_AREA: usize = 0x1000_0000_0000; // 16 TiB
const ALLOC_AREA: usize = 0x1800_0000_0000; // 24 TiB
const AREA_END: usize = 0x2000_0000_0000; // 32 TiB
static NEXT_MAP: AtomicUsize = AtomicUsize::new(MAPS_AREA);
static NEXT_ALLOC: AtomicUsize = AtomicUsize::new(ALLOC_AREA);

fn next_in(next: &AtomicUsize, len: usize, gap: usize, start: usize, end: usize) -> usize {
    // Mappings of 2 MiB or more start at a 2 MiB boundary, as the kernel
    // places them: a DAX file (the writeback's view of real pmem) is then
    // mapped with 2 MiB pages, not one page-table entry per 4 KiB.
    const HUGE: usize = 2 << 20;
    let step = if len >= HUGE {
        len.div_ceil(HUGE) * HUGE + gap.div_ceil(HUGE) * HUGE
    } else {
        page_up(len) + gap
    };
    let a = next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
        let a = if len >= HUGE {
            a.div_ceil(HUGE) * HUGE
        } else {
            a
        };
        Some(a + step)
    });
    let a = a.map_or(start, |a| {
        if len >= HUGE {
            a.div_ceil(HUGE) * HUGE
        } else {
            a
        }
    });
    if a + step > end {
        // Out of the area (after terabytes of remaps): let the kernel choose.
        next.store(start, Ordering::Relaxed);
        return 0;
    }
    a
}

/// Where the next of the shim's mappings of `len` bytes should go (a gap of
/// 64 KiB between them keeps the kernel from merging unrelated ones; 2 MiB
/// for large ones, which start at a 2 MiB boundary).
pub fn place_map(len: usize) -> usize {
    next_in(&NEXT_MAP, len, 64 << 10, MAPS_AREA, ALLOC_AREA)
}

/// Where the allocator's next chunk goes: right after the previous one, so
/// that the chunks merge into one mapping.
pub fn place_alloc(len: usize) -> usize {
    next_in(&NEXT_ALLOC, len, 0, ALLOC_AREA, AREA_END)
}

impl OwnedMap {
    /// Maps `len` bytes of `fd` from offset 0 in the shim's own area
    /// ([`place_map`]); `len` 0 gives an empty map.
    pub fn new(fd: i32, len: usize, prot: i32, flags: i32) -> SysResult<OwnedMap> {
        if len == 0 {
            return Ok(OwnedMap::default());
        }
        let hint = place_map(len) as *mut libc::c_void;
        // SAFETY: no MAP_FIXED: a fresh range nobody else uses (the address
        // is a hint).
        let p = unsafe { mmap(hint, len, prot, flags, fd, 0) }?;
        Ok(OwnedMap {
            addr: p as usize,
            len,
        })
    }

    /// `new` with `MAP_SHARED`.
    pub fn shared(fd: i32, len: usize, prot: i32) -> SysResult<OwnedMap> {
        OwnedMap::new(fd, len, prot, libc::MAP_SHARED)
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for OwnedMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: our own mapping; borrows of it end with `self`.
            let _ = unsafe { munmap(self.addr as *mut _, self.len) };
        }
    }
}

/// # Safety
/// The range must not be in use by live Rust references.
pub unsafe fn munmap(addr: *mut libc::c_void, len: usize) -> SysResult<()> {
    sc!(libc::SYS_munmap, addr, len).map(|_| ())
}

pub fn msync(addr: usize, len: usize, flags: i32) -> SysResult<()> {
    sc!(libc::SYS_msync, addr, len, flags).map(|_| ())
}

pub fn mprotect(addr: usize, len: usize, prot: i32) -> SysResult<()> {
    sc!(libc::SYS_mprotect, addr, len, prot).map(|_| ())
}

pub fn madvise(addr: usize, len: usize, advice: i32) -> SysResult<()> {
    sc!(libc::SYS_madvise, addr, len, advice).map(|_| ())
}

/// # Safety
/// `arg` must be what the ioctl `req` expects on `fd`.
pub unsafe fn ioctl(fd: i32, req: u64, arg: *mut libc::c_void) -> SysResult<i64> {
    sc!(libc::SYS_ioctl, fd, req, arg)
}

pub fn userfaultfd(flags: i32) -> SysResult<OwnedFd> {
    // SAFETY: a descriptor the kernel just opened for us alone.
    sc!(libc::SYS_userfaultfd, flags).map(|n| unsafe { OwnedFd::from_raw_fd(n as i32) })
}

/// `process_vm_readv` (`write`: `process_vm_writev`) on this process, one
/// iovec each side: the kernel copies, so an inaccessible page (a file
/// mapping past its file's end, a page that cannot be allocated) gives a
/// short count or `EFAULT` instead of a fault. Async-signal-safe. The pid is
/// asked every time: a cached one would name the parent in a child made by
/// a raw `clone`.
pub fn process_vm_self(write: bool, local: &libc::iovec, remote: &libc::iovec) -> SysResult<usize> {
    let nr = if write {
        libc::SYS_process_vm_writev
    } else {
        libc::SYS_process_vm_readv
    };
    sc!(
        nr,
        getpid(),
        local as *const libc::iovec,
        1usize,
        remote as *const libc::iovec,
        1usize,
        0usize
    )
    .map(|n| n as usize)
}

/// Page-cache residency of `[addr, addr+len)` (one byte per page).
pub fn mincore(addr: usize, len: usize, vec: &mut [u8]) -> SysResult<()> {
    debug_assert!(vec.len() >= len.div_ceil(PAGE));
    sc!(libc::SYS_mincore, addr, len, vec.as_mut_ptr()).map(|_| ())
}

pub fn fallocate(fd: i32, mode: i32, off: u64, len: u64) -> SysResult<()> {
    sc!(libc::SYS_fallocate, fd, mode, off, len).map(|_| ())
}

/// The magic number of the file system holding `path` (`statfs`'s
/// `f_type`).
pub fn fs_type(path: &CStr) -> SysResult<i64> {
    // SAFETY: statfs fills the struct it is given (all-zero is a valid
    // bit pattern for it).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    sc!(
        libc::SYS_statfs,
        path.as_ptr(),
        &mut st as *mut libc::statfs
    )?;
    Ok(st.f_type as i64)
}

/// `ms` milliseconds as a timespec.
fn ms_timespec(ms: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ms / 1000) as i64,
        tv_nsec: ((ms % 1000) * 1_000_000) as i64,
    }
}

/// Waits until `a` or `b` (ignored if negative) is readable, at most `ms`
/// milliseconds (None: no limit; EINTR retried); returns which: `[a ready,
/// b ready]` (both false: the time ran out).
pub fn poll_in2(a: i32, b: i32, ms: Option<u64>) -> SysResult<[bool; 2]> {
    let mut p = [a, b].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = ms.map(ms_timespec);
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        match sc!(libc::SYS_ppoll, p.as_mut_ptr(), 2, tsp, 0usize, 8usize) {
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
            Ok(_) => {
                let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
                if p[0].revents & bad != 0 {
                    return Err(Errno(libc::EBADF));
                }
                return Ok([p[0].revents != 0, p[1].revents & libc::POLLIN != 0]);
            }
        }
    }
}

/// Waits while `word` holds `val`, at most `ms` milliseconds (`op`:
/// `FUTEX_WAIT`, private or not; async-signal-safe).
fn futex_wait_op(word: &std::sync::atomic::AtomicU32, val: u32, ms: u64, op: i32) {
    let ts = ms_timespec(ms);
    let _ = sc!(
        libc::SYS_futex,
        word.as_ptr(),
        op,
        val,
        &ts as *const libc::timespec
    );
}

/// Waits while `word` holds `val`, at most `ms` milliseconds (a private
/// futex; async-signal-safe).
pub fn futex_wait_ms(word: &std::sync::atomic::AtomicU32, val: u32, ms: u64) {
    futex_wait_op(word, val, ms, libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG)
}

/// Wakes every waiter on `word`.
pub fn futex_wake_all(word: &std::sync::atomic::AtomicU32) {
    let _ = sc!(
        libc::SYS_futex,
        word.as_ptr(),
        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
        i32::MAX
    );
}

/// As [`futex_wait_ms`] on a word in memory shared with other processes.
pub fn futex_wait_shared_ms(word: &std::sync::atomic::AtomicU32, val: u32, ms: u64) {
    futex_wait_op(word, val, ms, libc::FUTEX_WAIT)
}

/// Wakes every waiter, in any process, on a shared `word`.
pub fn futex_wake_shared(word: &std::sync::atomic::AtomicU32) {
    let _ = sc!(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
}

/// The calling thread's id (async-signal-safe).
pub fn gettid() -> i32 {
    sc!(libc::SYS_gettid).unwrap_or(0) as i32
}

/// Is there no process `pid` any more (async-signal-safe)?
pub fn process_gone(pid: i32) -> bool {
    pid > 0 && sc!(libc::SYS_kill, pid, 0) == Err(Errno(libc::ESRCH))
}

/// Gives the CPU away (async-signal-safe).
pub fn sched_yield() {
    let _ = sc!(libc::SYS_sched_yield);
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> SysResult<OwnedFd> {
    // SAFETY: a descriptor the kernel just opened for us alone.
    sc!(
        libc::SYS_eventfd2,
        0,
        libc::EFD_NONBLOCK | libc::EFD_CLOEXEC
    )
    .map(|n| unsafe { OwnedFd::from_raw_fd(n as i32) })
}

/// Adds 1 to an eventfd (async-signal-safe).
pub fn eventfd_signal(fd: i32) {
    let one = 1u64;
    let _ = sc!(libc::SYS_write, fd, &one as *const u64, 8usize);
}

pub fn read(fd: i32, buf: &mut [u8]) -> SysResult<usize> {
    sc!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()).map(|n| n as usize)
}

pub fn mkdir(path: &CStr, mode: u32) -> SysResult<()> {
    sc!(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), mode).map(|_| ())
}

pub fn unlink(path: &CStr) -> SysResult<()> {
    sc!(libc::SYS_unlinkat, libc::AT_FDCWD, path.as_ptr(), 0).map(|_| ())
}

pub fn rename(from: &CStr, to: &CStr) -> SysResult<()> {
    sc!(
        libc::SYS_renameat,
        libc::AT_FDCWD,
        from.as_ptr(),
        libc::AT_FDCWD,
        to.as_ptr()
    )
    .map(|_| ())
}

pub fn sendfile(out_fd: i32, in_fd: i32, off: &mut i64, count: usize) -> SysResult<usize> {
    sc!(libc::SYS_sendfile, out_fd, in_fd, off as *mut i64, count).map(|n| n as usize)
}

pub const PAGE: usize = 4096;

pub fn page_down(x: usize) -> usize {
    x & !(PAGE - 1)
}

pub fn page_up(x: usize) -> usize {
    (x + PAGE - 1) & !(PAGE - 1)
}

/// Blocks signals for a scope (a shim-owned thread; a short write that a
/// signal handler on the same thread must not see half done).
pub struct SignalBlock {
    old: [u64; 1],
}

impl SignalBlock {
    /// Blocks every signal but `SIGSYS` (under Syscall User Dispatch a
    /// system call trapped while it is blocked would kill the process; the
    /// shim never causes one it does not handle).
    pub fn all() -> SignalBlock {
        SignalBlock::mask(!(1u64 << (libc::SIGSYS - 1)))
    }

    fn mask(set: u64) -> SignalBlock {
        let mut old = [0u64; 1];
        // SAFETY: rt_sigprocmask with 8-byte sets (the kernel's sigset size).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                &set as *const u64,
                old.as_mut_ptr(),
                8usize,
            );
        }
        SignalBlock { old }
    }
}

impl Drop for SignalBlock {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                self.old.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
}

// ---- descriptors the shim holds -------------------------------------------

/// Descriptors the shim keeps open for long (the tracker's handles, the
/// watcher's, the process's presence, the descriptor caches): moved to high
/// numbers, away from those a program expects `open` to return (0–2 after
/// a `close`, the lowest free one), and skipped by the program's `close`,
/// `close_range` and `closefrom` (a daemon's "close everything").
const HELD_MAX: usize = 64;
#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);
static HELD: [AtomicI32; HELD_MAX] = [NO_FD; HELD_MAX];

/// The lowest number a held descriptor is moved to: 64 below the soft
/// descriptor limit, at most 960 (a huge limit would make the kernel's
/// descriptor table huge), at least 3.
fn held_floor() -> i64 {
    static FLOOR: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *FLOOR.get_or_init(|| {
        // SAFETY: an all-zero rlimit is valid output space.
        let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: valid output pointer.
        let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
            rl.rlim_cur.min(i64::MAX as u64) as i64
        } else {
            1024
        };
        (cur - 64).clamp(3, 960)
    })
}

/// Moves `fd` to a high number (or leaves it where it is if none is free)
/// and records it as held; [`unhold`] before closing it.
pub fn hold(fd: OwnedFd) -> OwnedFd {
    let fd = match fcntl(
        fd.as_raw_fd(),
        libc::F_DUPFD_CLOEXEC,
        held_floor() as libc::c_long,
    ) {
        // SAFETY: the kernel just made this descriptor; `fd` is closed on drop.
        Ok(n) => unsafe { OwnedFd::from_raw_fd(n as i32) },
        Err(_) => fd,
    };
    let raw = fd.as_raw_fd();
    for s in &HELD {
        if s.compare_exchange(-1, raw, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            break;
        }
    }
    fd
}

/// `fd` is about to be closed by the shim: no longer held.
pub fn unhold(fd: i32) {
    for s in &HELD {
        let _ = s.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Is `fd` held by the shim?
pub fn is_held(fd: i32) -> bool {
    fd >= 0 && HELD.iter().any(|s| s.load(Ordering::Acquire) == fd)
}

/// The held descriptors in `[first, last]`, sorted.
pub fn held_in(first: u32, last: u32) -> Vec<u32> {
    let mut v: Vec<u32> = HELD
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .filter(|&fd| fd >= 0 && (first..=last).contains(&(fd as u32)))
        .map(|fd| fd as u32)
        .collect();
    v.sort_unstable();
    v
}

/// A held descriptor: unheld, then closed, when dropped.
pub struct HeldFd(Option<OwnedFd>);

impl HeldFd {
    pub fn new(fd: OwnedFd) -> HeldFd {
        HeldFd(Some(hold(fd)))
    }
}

impl std::os::fd::AsFd for HeldFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_ref().expect("open until dropped").as_fd()
    }
}

impl AsRawFd for HeldFd {
    fn as_raw_fd(&self) -> i32 {
        self.0.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

impl Drop for HeldFd {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            unhold(f.as_raw_fd());
            drop(f);
        }
    }
}

// ---- the shim's threads ---------------------------------------------------

/// Starts a detached thread running `f` on a stack of `stack` bytes mapped
/// in the shim's own area (a thread made by `std::thread` would get its
/// stack where the program's next `mmap` would land). The stack lives as
/// long as the process (the shim's threads do).
pub fn spawn(
    name: &'static std::ffi::CStr,
    stack: usize,
    f: Box<dyn FnOnce() + Send>,
) -> SysResult<()> {
    extern "C" fn start(p: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `spawn` passed a leaked Box<Box<dyn FnOnce()>>.
        let f = unsafe { Box::from_raw(p as *mut Box<dyn FnOnce() + Send>) };
        f();
        std::ptr::null_mut()
    }
    let map = OwnedMap::new(
        -1,
        stack,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
    )?;
    let arg = Box::into_raw(Box::new(f)) as *mut libc::c_void;
    // SAFETY: an attribute object initialised here and destroyed below; the
    // stack is ours (leaked below) and large enough; `start` takes `arg`.
    let r = unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstack(&mut attr, map.addr() as *mut libc::c_void, stack);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut t: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut t, &attr, start, arg);
        libc::pthread_attr_destroy(&mut attr);
        if r == 0 {
            libc::pthread_setname_np(t, name.as_ptr());
        }
        r
    };
    if r != 0 {
        // SAFETY: no thread took it.
        drop(unsafe { Box::from_raw(arg as *mut Box<dyn FnOnce() + Send>) });
        return Err(Errno(r));
    }
    std::mem::forget(map);
    Ok(())
}
