//! stdio streams on pmem files (docs/ARCHITECTURE.md, "stdio"): glibc's
//! buffered I/O calls its internal `write`/`read`/`lseek`, which no preload
//! library can interpose, so a stream on a pmem file is made a cookie stream
//! (`fopencookie`) whose I/O functions are the shim's own read/write hooks.
//! This module parses `fopen` modes and remembers which streams are ours and
//! on which descriptor (`fileno` answers it); the exported functions and the
//! cookie callbacks are in `hooks/stdio.rs`.

use crate::lock::Lock;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What an `fopen` mode string asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenMode {
    /// `open(2)` flags, as glibc's `fopen` would pass them.
    pub flags: i32,
    /// "a" without "+": glibc positions such a stream at the end of the file
    /// when it opens it (`ftell` answers the size at once).
    pub append_only: bool,
}

/// Parses an `fopen` mode as glibc does (`_IO_new_file_fopen`): the first
/// character is `r`, `w` or `a`; then, up to the seventh character, `+`
/// (read and write), `x` (`O_EXCL`), `e` (`O_CLOEXEC`); every other
/// character is ignored, and a `,` ends the flags. `None` for an invalid
/// mode (the real `fopen` then answers `EINVAL`) and for `,ccs=` (a wide
/// stream: left to the real `fopen`).
pub fn parse_mode(mode: &[u8]) -> Option<OpenMode> {
    let (mut access, mut extra, append) = match mode.first()? {
        b'r' => (libc::O_RDONLY, 0, false),
        b'w' => (libc::O_WRONLY, libc::O_CREAT | libc::O_TRUNC, false),
        b'a' => (libc::O_WRONLY, libc::O_CREAT | libc::O_APPEND, true),
        _ => return None,
    };
    let mut plus = false;
    for &c in mode.iter().skip(1).take(6) {
        match c {
            b'+' => {
                plus = true;
                access = libc::O_RDWR;
            }
            b'x' => extra |= libc::O_EXCL,
            b'e' => extra |= libc::O_CLOEXEC,
            b',' | 0 => break,
            _ => {}
        }
    }
    if mode.windows(5).any(|w| w == b",ccs=") {
        return None;
    }
    Some(OpenMode {
        flags: access | extra,
        append_only: append && !plus,
    })
}

/// One of the shim's cookie streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    pub fd: i32,
    /// The cookie its callbacks get (`hooks/stdio.rs`).
    pub cookie: usize,
}

/// The shim's cookie streams, by `FILE *`.
static STREAMS: Lock<BTreeMap<usize, Stream>> = Lock::new(BTreeMap::new());
/// How many there are (0: `fileno` costs one load).
static COUNT: AtomicUsize = AtomicUsize::new(0);

pub fn remember(stream: usize, s: Stream) {
    if STREAMS.lock().insert(stream, s).is_none() {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn forget(stream: usize) {
    if STREAMS.lock().remove(&stream).is_some() {
        COUNT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of the shim's cookie streams, if `stream` is.
#[inline]
pub fn lookup(stream: usize) -> Option<Stream> {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return None;
    }
    STREAMS.lock().get(&stream).copied()
}

/// Fork: the table must not be copied held by a thread the child does not
/// have.
pub fn hold_for_fork() {
    std::mem::forget(STREAMS.lock());
}

/// # Safety
/// After [`hold_for_fork`], in the parent or the child.
pub unsafe fn release_after_fork() {
    // SAFETY: hold_for_fork took it and forgot the guard.
    unsafe { STREAMS.force_unlock() };
}

/// Every cookie stream (to flush them before the shim detaches at exit).
pub fn all() -> Vec<usize> {
    STREAMS.lock().keys().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(m: &str) -> Option<i32> {
        parse_mode(m.as_bytes()).map(|o| o.flags)
    }

    #[test]
    fn modes_parse_as_glibc_does() {
        use libc::*;
        assert_eq!(flags("r"), Some(O_RDONLY));
        assert_eq!(flags("rb"), Some(O_RDONLY));
        assert_eq!(flags("r+"), Some(O_RDWR));
        assert_eq!(flags("rb+"), Some(O_RDWR));
        assert_eq!(flags("w"), Some(O_WRONLY | O_CREAT | O_TRUNC));
        assert_eq!(flags("w+x"), Some(O_RDWR | O_CREAT | O_TRUNC | O_EXCL));
        assert_eq!(flags("ae"), Some(O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC));
        assert_eq!(flags("a+"), Some(O_RDWR | O_CREAT | O_APPEND));
        assert!(parse_mode(b"a").unwrap().append_only);
        assert!(!parse_mode(b"a+").unwrap().append_only);
        // Unknown characters are skipped; from the eighth on all are
        // ignored; a comma ends the flags.
        assert_eq!(flags("rz+"), Some(O_RDWR));
        assert_eq!(flags("rbbbbbb+"), Some(O_RDONLY));
        assert_eq!(flags("r,+"), Some(O_RDONLY));
        assert_eq!(flags(""), None);
        assert_eq!(flags("x"), None);
        assert_eq!(flags("r,ccs=UTF-8"), None);
    }

    #[test]
    fn streams_are_remembered_and_forgotten() {
        assert_eq!(lookup(0x1000), None);
        let s = Stream { fd: 7, cookie: 9 };
        remember(0x1000, s);
        assert_eq!(lookup(0x1000), Some(s));
        assert_eq!(all(), vec![0x1000]);
        forget(0x1000);
        assert_eq!(lookup(0x1000), None);
    }
}
