//! The exported `extern "C"` functions, by family. Each hook is a few lines:
//! enter the shim ([`crate::reentry`]; pass straight through when re-entered
//! or before initialisation), call a safe `*_impl`, set `errno` in one place.
//! Nothing below this module imports it.

mod cookie;
pub mod fd;
pub mod io;
pub mod map;
pub mod signal;
pub mod stdio;
pub mod sync;
pub mod syscall;
pub mod thread;
