//! The exported `extern "C"` functions, by family. Each hook is a few lines:
//! enter the shim ([`crate::reentry`]; pass straight through when re-entered
//! or before initialisation), call a safe `*_impl`, set `errno` in one place.
//! Nothing below this module imports it.

pub mod fd;
pub mod io;
pub mod map;
pub mod signal;
pub mod sync;

use crate::sys::{self, Errno};

/// The result of a real libc call returning -1/errno, as a Result.
pub fn check_int(r: i32) -> Result<i32, Errno> {
    if r < 0 {
        Err(Errno(sys::get_errno()))
    } else {
        Ok(r)
    }
}

pub fn check_ssize(r: isize) -> Result<isize, Errno> {
    if r < 0 {
        Err(Errno(sys::get_errno()))
    } else {
        Ok(r)
    }
}
