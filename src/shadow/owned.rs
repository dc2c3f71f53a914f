//! Files of the shadow directory that are ours alone, and the robust
//! process-shared locks of the header.
//!
//! # Safety
//! [`HeaderLock`] points at a mutex inside a mapped header; the [`Shadow`]
//! that maps it outlives every guard (guards borrow it).
//!
//! [`Shadow`]: super::Shadow

use crate::sys::{self, Errno, Failure};
use std::ffi::CString;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};

pub(super) fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

pub(super) fn err(what: &str, path: &str, e: Errno) -> Failure {
    Failure::new(e, format!("{what} {path}: {e}"))
}

/// Creates (0700) or checks the per-user shadow directory: a real directory,
/// owned by us, not accessible to others.
pub fn ensure_dir(dir: &str) -> Result<(), Failure> {
    let c = cstr(dir);
    match sys::mkdir(&c, 0o700) {
        Ok(()) | Err(Errno(libc::EEXIST)) => {}
        Err(e) => return Err(err("cannot create shadow directory", dir, e)),
    }
    let st = sys::lstat(&c).map_err(|e| err("cannot stat shadow directory", dir, e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Failure::refused(format!(
            "shadow directory {dir} is not a directory (a symlink?); refusing it"
        )));
    }
    if st.st_uid != sys::geteuid() {
        return Err(Failure::refused(format!(
            "shadow directory {dir} belongs to uid {}, not to us; refusing it",
            st.st_uid
        )));
    }
    if st.st_mode & 0o077 != 0 {
        return Err(Failure::refused(format!(
            "shadow directory {dir} has mode {:o}; it must not be accessible to others",
            st.st_mode & 0o777
        )));
    }
    Ok(())
}

/// Whether [`open_owned`] may create the file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Create {
    Yes,
    No,
}

/// Opens an existing shadow file or creates it exclusively; checks it is a
/// regular file of ours with mode 0600.
pub(super) fn open_owned(path: &str, create: Create) -> Result<OwnedFd, Failure> {
    open_or_create_owned(path, create).map(|(fd, _)| fd)
}

/// [`open_owned`], and whether this call created the file.
pub(super) fn open_or_create_owned(path: &str, create: Create) -> Result<(OwnedFd, bool), Failure> {
    let c = cstr(path);
    let base = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let (fd, created) = loop {
        match sys::open(&c, base, 0) {
            Ok(fd) => break (fd, false),
            Err(Errno(libc::ENOENT)) if create == Create::Yes => {
                match sys::open(&c, base | libc::O_CREAT | libc::O_EXCL, 0o600) {
                    Ok(fd) => break (fd, true),
                    Err(Errno(libc::EEXIST)) => continue,
                    Err(e) => return Err(err("cannot create", path, e)),
                }
            }
            Err(e) => return Err(err("cannot open", path, e)),
        }
    };
    check_owned(path, &fd)?;
    Ok((fd, created))
}

fn check_owned(path: &str, fd: &OwnedFd) -> Result<(), Failure> {
    let ok = sys::fstat(fd.as_raw_fd()).is_ok_and(|st| {
        st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_uid == sys::geteuid()
            && st.st_mode & 0o077 == 0
    });
    if !ok {
        return Err(Failure::refused(format!(
            "{path} is not a private regular file of ours; refusing it"
        )));
    }
    Ok(())
}

/// A read-only descriptor of the shadow file at `path`, checked as
/// [`open_owned`] checks.
pub(super) fn open_owned_read_only(path: &str) -> Result<OwnedFd, Failure> {
    let fd = sys::open(
        &cstr(path),
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .map_err(|e| err("cannot open read-only", path, e))?;
    check_owned(path, &fd)?;
    Ok(fd)
}

/// Holds one of the header's robust locks (io or fill).
pub struct HeaderLock<'a> {
    m: *mut libc::pthread_mutex_t,
    owner_died: bool,
    _shadow: PhantomData<&'a ()>,
}

impl HeaderLock<'_> {
    /// The previous holder died holding the lock (`EOWNERDEAD`): what it
    /// protected may be half done.
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }
}

impl Drop for HeaderLock<'_> {
    fn drop(&mut self) {
        // SAFETY: we hold the mutex (see `lock_robust`), whose header stays
        // mapped while the borrowed Shadow lives.
        unsafe { libc::pthread_mutex_unlock(self.m) };
    }
}

/// Locks a robust process-shared mutex of the header; a holder that died
/// leaves it consistent-able (its work is re-checked by the callers).
///
/// # Safety
/// `m` points into the mapped header of a Shadow that lives for `'a`.
pub(super) unsafe fn lock_robust<'a>(m: *mut libc::pthread_mutex_t) -> HeaderLock<'a> {
    // SAFETY: per the function contract.
    let owner_died = unsafe { libc::pthread_mutex_lock(m) } == libc::EOWNERDEAD;
    if owner_died {
        // SAFETY: we own the mutex after EOWNERDEAD.
        unsafe { libc::pthread_mutex_consistent(m) };
    }
    HeaderLock {
        m,
        owner_died,
        _shadow: PhantomData,
    }
}
