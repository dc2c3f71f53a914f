//! A file of data mapped shared, as each measurement uses it.

use crate::{die, PAGE};
use std::path::Path;

/// A file of `len` bytes filled with data (no holes), mapped shared.
pub struct Mapped {
    pub p: *mut u8,
    len: usize,
    pub fd: i32,
}

pub fn make_file(path: &Path, len: usize) {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

pub fn map(path: &Path, len: usize) -> Mapped {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: plain open/mmap of our own file.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            die("open");
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            die("mmap");
        }
        Mapped {
            p: p as *mut u8,
            len,
            fd,
        }
    }
}

impl Mapped {
    pub fn touch_pages(&self, val: u8) {
        for i in (0..self.len).step_by(PAGE) {
            // SAFETY: within the mapping.
            unsafe { std::ptr::write_volatile(self.p.add(i), val) };
        }
    }
    pub fn msync(&self) {
        // SAFETY: our mapping.
        if unsafe { libc::msync(self.p as *mut _, self.len, libc::MS_SYNC) } != 0 {
            die("msync");
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: ours.
        unsafe {
            libc::munmap(self.p as *mut _, self.len);
            libc::close(self.fd);
        }
    }
}
