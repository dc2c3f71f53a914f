//! Trapped system calls ([`crate::sud`]) that concern the shim's files go
//! through the same hooks as the libc calls of the same name.
//!
//! Only calls on descriptors, and mapping calls on ranges that may hold a
//! shadow mapping ([`crate::registry::maybe_shadowed`], lock-free): the
//! allocator calls `mmap`/`munmap`/`madvise`/`mprotect` on its own memory
//! while holding its lock, and must not wait here for a shim lock whose
//! holder may be waiting for the allocator.

use super::{fd, io, map, sync};
use crate::registry::maybe_shadowed;
use crate::sys;
use libc::{c_char, c_int, c_long, c_uint, c_void, iovec, off64_t};

/// [`crate::sud::Router`]: `Some(kernel-convention result)` for a call the
/// shim takes, `None` for one the kernel should just perform.
pub fn route(nr: c_long, a: &[u64; 6]) -> Option<c_long> {
    let i = |k: usize| a[k] as c_int;
    let p = |k: usize| a[k] as *mut c_void;
    let s = |k: usize| a[k] as usize;
    let o = |k: usize| a[k] as off64_t;
    let path = |k: usize| a[k] as *const c_char;
    let iov = |k: usize| a[k] as *const iovec;
    let off_ptr = |k: usize| a[k] as *mut off64_t;
    // The arguments are the program's own, for the system call whose libc
    // wrapper each hook is; the hooks pass them on to the kernel, which
    // reports EFAULT/EINVAL as it would have.
    // SAFETY: as said; every hook has the C contract of that call.
    let r: i64 = unsafe {
        match nr {
            libc::SYS_read => io::read(i(0), p(1), s(2)) as i64,
            libc::SYS_write => io::write(i(0), p(1), s(2)) as i64,
            libc::SYS_pread64 => io::pread64(i(0), p(1), s(2), o(3)) as i64,
            libc::SYS_pwrite64 => io::pwrite64(i(0), p(1), s(2), o(3)) as i64,
            libc::SYS_readv => io::readv(i(0), iov(1), i(2)) as i64,
            libc::SYS_writev => io::writev(i(0), iov(1), i(2)) as i64,
            // 64-bit: the whole offset is in the "low" argument.
            libc::SYS_preadv => io::preadv64(i(0), iov(1), i(2), o(3)) as i64,
            libc::SYS_pwritev => io::pwritev64(i(0), iov(1), i(2), o(3)) as i64,
            libc::SYS_preadv2 => io::preadv64v2(i(0), iov(1), i(2), o(3), i(5)) as i64,
            libc::SYS_pwritev2 => io::pwritev64v2(i(0), iov(1), i(2), o(3), i(5)) as i64,
            libc::SYS_ftruncate => io::ftruncate64(i(0), o(1)) as i64,
            libc::SYS_truncate => io::truncate64(path(0), o(1)) as i64,
            libc::SYS_fallocate => io::fallocate64(i(0), i(1), o(2), o(3)) as i64,
            libc::SYS_sendfile => io::sendfile64(i(0), i(1), off_ptr(2), s(3)) as i64,
            libc::SYS_copy_file_range => {
                io::copy_file_range(i(0), off_ptr(1), i(2), off_ptr(3), s(4), a[5] as c_uint) as i64
            }
            libc::SYS_splice => {
                io::splice(i(0), off_ptr(1), i(2), off_ptr(3), s(4), a[5] as c_uint) as i64
            }
            libc::SYS_fsync => sync::fsync(i(0)) as i64,
            libc::SYS_fdatasync => sync::fdatasync(i(0)) as i64,
            libc::SYS_sync_file_range => {
                sync::sync_file_range(i(0), o(1), o(2), a[3] as c_uint) as i64
            }
            libc::SYS_syncfs => sync::syncfs(i(0)) as i64,
            libc::SYS_sync => {
                sync::sync();
                0
            }
            libc::SYS_open => fd::open64(path(0), i(1), a[2] as libc::mode_t) as i64,
            libc::SYS_openat => fd::openat64(i(0), path(1), i(2), a[3] as libc::mode_t) as i64,
            libc::SYS_creat => fd::creat64(path(0), a[1] as libc::mode_t) as i64,
            libc::SYS_close => fd::close(i(0)) as i64,
            libc::SYS_close_range => fd::close_range(a[0] as c_uint, a[1] as c_uint, i(2)) as i64,
            libc::SYS_dup => fd::dup(i(0)) as i64,
            libc::SYS_dup2 => fd::dup2(i(0), i(1)) as i64,
            libc::SYS_dup3 => fd::dup3(i(0), i(1), i(2)) as i64,
            libc::SYS_fcntl => fd::fcntl64(i(0), i(1), a[2] as c_long) as i64,
            libc::SYS_rename => fd::rename(path(0), path(1)) as i64,
            libc::SYS_renameat => fd::renameat(i(0), path(1), i(2), path(3)) as i64,
            libc::SYS_renameat2 => {
                fd::renameat2(i(0), path(1), i(2), path(3), a[4] as c_uint) as i64
            }
            libc::SYS_mmap if i(3) & libc::MAP_ANONYMOUS == 0 => {
                map::mmap64(p(0), s(1), i(2), i(3), i(4), o(5)) as i64
            }
            libc::SYS_munmap if maybe_shadowed(s(0), s(1)) => map::munmap(p(0), s(1)) as i64,
            libc::SYS_mremap if maybe_shadowed(s(0), s(1)) => {
                map::mremap(p(0), s(1), s(2), i(3), p(4)) as i64
            }
            libc::SYS_madvise if maybe_shadowed(s(0), s(1)) => {
                map::madvise(p(0), s(1), i(2)) as i64
            }
            libc::SYS_mprotect if maybe_shadowed(s(0), s(1)) => {
                map::mprotect(p(0), s(1), i(2)) as i64
            }
            libc::SYS_msync if maybe_shadowed(s(0), s(1)) => sync::msync(p(0), s(1), i(2)) as i64,
            _ => return None,
        }
    };
    // Every hook returns -1 (MAP_FAILED for the mapping calls) with errno.
    Some(if r == -1 {
        -(sys::get_errno() as c_long)
    } else {
        r as c_long
    })
}
