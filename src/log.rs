//! Diagnostics on stderr, written with `write(2)` so that logging never
//! re-enters a hooked stdio path. Prefix: `daxshim[pid]: `.

use crate::config::LogLevel;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Warn as u8);

pub fn set_level(level: LogLevel) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: LogLevel) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

pub fn emit(level: LogLevel, msg: std::fmt::Arguments<'_>) {
    let tag = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warning",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
    };
    let line = format!("daxshim[{}]: {tag}: {msg}\n", crate::sys::getpid());
    crate::sys::write_all_fd(2, line.as_bytes());
}

/// An error line written from a signal handler: no allocation, no
/// formatting machinery, one `write` (`msg` is cut to fit).
pub fn error_in_handler(msg: &str, errno: i32) {
    if !enabled(LogLevel::Error) {
        return;
    }
    let mut buf = [0u8; 256];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    let mut digits = [0u8; 12];
    let num = |mut v: u64, d: &mut [u8; 12]| -> usize {
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                return i;
            }
        }
    };
    put(b"daxshim[");
    let i = num(crate::sys::getpid().max(0) as u64, &mut digits);
    put(&digits[i..]);
    put(b"]: error: ");
    put(msg.as_bytes());
    put(b": ");
    match errno {
        libc::ENOSPC => put(b"No space left on device"),
        libc::ENOMEM => put(b"Cannot allocate memory"),
        libc::EIO => put(b"Input/output error"),
        libc::EFAULT => put(b"Bad address"),
        _ => {
            put(b"errno ");
            let i = num(errno.max(0) as u64, &mut digits);
            put(&digits[i..]);
        }
    }
    put(b"\n");
    crate::sys::write_all_fd(2, &buf[..n]);
}

macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) {
            $crate::log::emit($lvl, format_args!($($arg)*));
        }
    };
}
macro_rules! error { ($($arg:tt)*) => { log_at!($crate::config::LogLevel::Error, $($arg)*) }; }
macro_rules! warn { ($($arg:tt)*) => { log_at!($crate::config::LogLevel::Warn, $($arg)*) }; }
macro_rules! info { ($($arg:tt)*) => { log_at!($crate::config::LogLevel::Info, $($arg)*) }; }
macro_rules! debug { ($($arg:tt)*) => { log_at!($crate::config::LogLevel::Debug, $($arg)*) }; }
