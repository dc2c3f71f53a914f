//! The shim's own memory allocator (its Rust `#[global_allocator]`): the
//! program's `malloc` is the program's. With glibc's, the shim's threads
//! would get arenas of their own (mapped where the program's next `mmap`
//! would land), and a hook allocating inside a signal handler that
//! interrupted the program's `malloc` could wait on the program's arena
//! lock. Here: size classes of powers of two from 16 bytes to 64 KiB,
//! carved from 256 KiB chunks in the shim's own area
//! ([`crate::sys::place_alloc`], contiguous: one mapping), free lists under
//! one lock; larger blocks are mappings of their own. Small memory is never
//! returned to the system (the shim's working set is small and steady).
//!
//! # Safety
//! Implements `GlobalAlloc`: blocks of a class are at least as large and as
//! aligned as the layouts mapped to it (a power of two ≥ size and ≥ align,
//! carved at multiples of itself from page-aligned chunks); a freed block
//! goes back to the list of the class its layout maps to.

use crate::lock::Lock;
use crate::sys;
use std::alloc::{GlobalAlloc, Layout};

const MIN_CLASS: usize = 16;
const MAX_CLASS: usize = 64 << 10;
const CLASSES: usize = 13; // 16 B … 64 KiB
const CHUNK: usize = 256 << 10;

/// Free blocks of each class, as intrusive singly linked lists.
struct FreeLists([usize; CLASSES]);

static FREE: Lock<FreeLists> = Lock::new(FreeLists([0; CLASSES]));

pub struct ShimAlloc;

fn class_size(l: &Layout) -> usize {
    l.size().max(l.align()).max(MIN_CLASS).next_power_of_two()
}

fn class_index(size: usize) -> usize {
    (size.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize
}

/// A fresh mapping of `len` bytes, or 0.
fn map(len: usize, hint: usize) -> usize {
    // SAFETY: a new private anonymous mapping (the address is a hint).
    unsafe {
        sys::mmap(
            hint as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }
    .map_or(0, |p| p as usize)
}

// SAFETY: see the module's safety section.
unsafe impl GlobalAlloc for ShimAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let size = class_size(&l);
        if l.align() > sys::PAGE {
            return std::ptr::null_mut();
        }
        if size > MAX_CLASS {
            return map(size, sys::place_map(size)) as *mut u8;
        }
        let i = class_index(size);
        let mut f = FREE.lock();
        if f.0[i] == 0 {
            let chunk = map(CHUNK, sys::place_alloc(CHUNK));
            if chunk == 0 {
                return std::ptr::null_mut();
            }
            // Carve the chunk: each block links to the next.
            let n = CHUNK / size;
            for k in 0..n {
                let b = chunk + k * size;
                let next = if k + 1 < n { b + size } else { 0 };
                // SAFETY: `b` is a block of our fresh, writable chunk.
                unsafe { *(b as *mut usize) = next };
            }
            f.0[i] = chunk;
        }
        let b = f.0[i];
        // SAFETY: a free block of this class holds the next free one.
        f.0[i] = unsafe { *(b as *const usize) };
        b as *mut u8
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let size = class_size(&l);
        if size > MAX_CLASS {
            // SAFETY: a block `alloc` mapped with this very size.
            let _ = unsafe { sys::munmap(p as *mut libc::c_void, size) };
            return;
        }
        let i = class_index(size);
        let mut f = FREE.lock();
        // SAFETY: the caller returns a block of this class it no longer uses.
        unsafe { *(p as *mut usize) = f.0[i] };
        f.0[i] = p as usize;
    }
}

/// Fork: the allocator's lock is the innermost of all (every other lock's
/// holder may allocate); held across fork by the atfork handlers, taken
/// last.
pub fn hold_for_fork() {
    std::mem::forget(FREE.lock());
}

/// # Safety
/// After [`hold_for_fork`], in the parent or the child.
pub unsafe fn release_after_fork() {
    // SAFETY: per contract.
    unsafe { FREE.force_unlock() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_size_and_alignment() {
        let l = Layout::from_size_align(24, 8).unwrap();
        assert_eq!(class_size(&l), 32);
        assert_eq!(class_index(32), 1);
        let l = Layout::from_size_align(1, 64).unwrap();
        assert_eq!(class_size(&l), 64);
        assert_eq!(class_index(MAX_CLASS), CLASSES - 1);
    }

    #[test]
    fn blocks_are_reused_and_aligned() {
        let a = ShimAlloc;
        let l = Layout::from_size_align(100, 16).unwrap();
        // SAFETY: plain use of the allocator with one layout.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null() && (p as usize).is_multiple_of(128));
            p.write_bytes(7, 100);
            a.dealloc(p, l);
            let q = a.alloc(l);
            assert_eq!(p, q);
            a.dealloc(q, l);
            let big = Layout::from_size_align(1 << 20, 8).unwrap();
            let b = a.alloc(big);
            assert!(!b.is_null());
            b.write_bytes(1, 1 << 20);
            a.dealloc(b, big);
        }
    }
}
