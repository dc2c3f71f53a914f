//! The shim's own memory allocator (its Rust `#[global_allocator]`): the
//! program's `malloc` is the program's. With glibc's, the shim's threads
//! would get arenas of their own (mapped where the program's next `mmap`
//! would land), and a hook allocating inside a signal handler that
//! interrupted the program's `malloc` could wait on the program's arena
//! lock. Here: size classes of powers of two from 16 bytes to 64 MiB, free
//! lists under one lock. Up to 64 KiB, blocks are carved from 256 KiB
//! chunks in the shim's own area ([`crate::sys::place_alloc`], contiguous:
//! one mapping); larger ones are mappings of their own, kept for reuse when
//! freed (a buffer that grows and shrinks must not cost a map, an unmap and
//! its page faults every time); beyond 64 MiB they are unmapped. Memory is
//! kept at its peak (the shim's working set is small and steady).
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
/// The largest class carved from chunks.
const MAX_CARVED: usize = 64 << 10;
/// The largest class kept for reuse.
const MAX_CLASS: usize = 64 << 20;
const CLASSES: usize = 23; // 16 B … 64 MiB
const CHUNK: usize = 256 << 10;

/// Free blocks of each class, as intrusive singly linked lists, and the
/// unused rest of each class's current chunk (taken block by block, so
/// that only pages in use are ever touched).
struct FreeLists([usize; CLASSES], [(usize, usize); CLASSES]);

static FREE: Lock<FreeLists> = Lock::new(FreeLists([0; CLASSES], [(0, 0); CLASSES]));

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
        if f.0[i] == 0 && size > MAX_CARVED {
            // A block of its own, kept for reuse once freed.
            drop(f);
            return map(size, sys::place_map(size)) as *mut u8;
        }
        if f.0[i] == 0 {
            let (cur, end) = f.1[i];
            if cur + size <= end && cur != 0 {
                f.1[i].0 = cur + size;
                return cur as *mut u8;
            }
            let chunk = map(CHUNK, sys::place_alloc(CHUNK));
            if chunk == 0 {
                return std::ptr::null_mut();
            }
            f.1[i] = (chunk + size, chunk + CHUNK);
            return chunk as *mut u8;
        }
        let b = f.0[i];
        // SAFETY: a free block of this class holds the next free one.
        f.0[i] = unsafe { *(b as *const usize) };
        b as *mut u8
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let size = class_size(&l);
        if size > MAX_CARVED && l.align() <= sys::PAGE {
            let i = class_index(size);
            let reused = size <= MAX_CLASS && {
                let mut f = FREE.lock();
                let b = f.0[i];
                if b != 0 {
                    // SAFETY: a free block of this class holds the next one.
                    f.0[i] = unsafe { *(b as *const usize) };
                }
                drop(f);
                if b != 0 {
                    // SAFETY: a whole block of ours, `size` bytes.
                    unsafe { (b as *mut u8).write_bytes(0, l.size()) };
                    return b as *mut u8;
                }
                false
            };
            debug_assert!(!reused);
            // A fresh mapping is zeros already: no page is touched.
            return map(size, sys::place_map(size)) as *mut u8;
        }
        // SAFETY: forwarded; `alloc` returns `l.size()` writable bytes.
        let p = unsafe { self.alloc(l) };
        if !p.is_null() {
            // SAFETY: as above.
            unsafe { p.write_bytes(0, l.size()) };
        }
        p
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the layout of the block the caller holds, with its new
        // size (a valid layout per the `GlobalAlloc` contract).
        let new = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
        if class_size(&new) == class_size(&l) {
            return p; // the block is large enough already
        }
        // SAFETY: per the contract of `realloc`.
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least the smaller size.
            unsafe {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                self.dealloc(p, l);
            }
        }
        q
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
        assert_eq!(class_index(MAX_CARVED), 12);
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
            assert_eq!(a.alloc(big), b, "a large block is reused");
            a.dealloc(b, big);
            let huge = Layout::from_size_align(65 << 20, 8).unwrap();
            let h = a.alloc(huge);
            assert!(!h.is_null());
            a.dealloc(h, huge);
        }
    }
}
