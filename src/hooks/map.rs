//! mmap/munmap/mremap/madvise/mprotect: shadow mappings for unaware callers,
//! direct mappings for DAX-aware ones.

use crate::real;
use crate::reentry::enter;
use crate::sys::{self, Errno};
use crate::track;
use libc::{c_int, c_void, off64_t, size_t};

pub use crate::mapping::MAP_DAX;
use crate::mapping::{
    drops_ptes, harvest_before_replace, mmap_impl, mremap_impl, munmap_impl, no_shadow_maps,
    remove_impl, MADV_POPULATE_READ, MADV_POPULATE_WRITE,
};

fn map_ret(g: &crate::reentry::Entered, r: Result<*mut c_void, Errno>) -> *mut c_void {
    match r {
        Ok(p) => {
            g.restore_errno();
            p
        }
        Err(e) => {
            sys::set_errno(e.0);
            libc::MAP_FAILED
        }
    }
}

/// # Safety
/// C ABI, contract of mmap(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off64_t,
) -> *mut c_void {
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::mmap64(addr, len, prot, flags & !MAP_DAX, fd, off) },
        Some(g) => {
            // A lazy range registered (or replaced) here may fault in
            // another thread before the table shows it.
            let _changing = crate::lazy::sigbus::Changing::begin();
            map_ret(&g, mmap_impl(addr, len, prot, flags, fd, off))
        }
    }
}

/// # Safety
/// C ABI, contract of mmap(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off64_t,
) -> *mut c_void {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    unsafe { mmap64(addr, len, prot, flags, fd, off) }
}

/// # Safety
/// C ABI, contract of munmap(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    if no_shadow_maps() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        return unsafe { real::munmap(addr, len) };
    }
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::munmap(addr, len) },
        Some(g) => g.ret(munmap_impl(addr, len)),
    }
}

/// # Safety
/// C ABI, contract of mremap(2); `new_addr` is read only with MREMAP_FIXED.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    match enter() {
        // SAFETY: forwarded with the caller's own arguments (C ABI contract).
        None => unsafe { real::mremap(old, old_len, new_len, flags, new_addr) },
        Some(g) => {
            let _changing = crate::lazy::sigbus::Changing::begin();
            map_ret(&g, mremap_impl(old, old_len, new_len, flags, new_addr))
        }
    }
}

/// # Safety
/// C ABI, contract of madvise(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments (C ABI contract).
    let real = || unsafe { real::madvise(addr, len, advice) };
    if (advice == MADV_POPULATE_WRITE || advice == MADV_POPULATE_READ)
        && crate::lazy::sigbus::active()
    {
        // The kernel cannot wait for a fill served in the faulting thread.
        crate::lazy::sigbus::touch(addr as usize, len);
    }
    if advice == MADV_POPULATE_WRITE && track::traps_stores() {
        // Write-protected clean pages would make the kernel refuse (EINVAL)
        // what it grants on the program's own protection: open them, as a
        // store would.
        track::tracker().before_kernel_stores(addr as usize, len);
    }
    if !drops_ptes(advice) || no_shadow_maps() {
        return real();
    }
    match enter() {
        None => real(),
        Some(g) => {
            harvest_before_replace(addr as usize, len);
            if advice == libc::MADV_REMOVE {
                g.ret(remove_impl(addr as usize, len, real))
            } else {
                real()
            }
        }
    }
}

/// # Safety
/// C ABI, contract of mprotect(2).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: libc::size_t, prot: c_int) -> c_int {
    // SAFETY: forwarded with the caller's own arguments.
    let mut apply = || unsafe { real::mprotect(addr, len, prot) };
    if !track::traps_stores() {
        return apply();
    }
    match enter() {
        Some(_g) => track::tracker().on_program_mprotect(addr as usize, len, prot, &mut apply),
        None => apply(),
    }
}
