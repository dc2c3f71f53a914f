//! Is this descriptor a pmem file, and is this caller DAX-aware?

use crate::config::DaxOptIn;
use crate::runtime::rt;
use crate::shadow::FileId;
use crate::sys::{self};
use std::ffi::{CStr, CString};
use std::path::Path;

const STATX_ATTR_DAX: u64 = 0x0020_0000;

/// Is `path` (a canonical absolute path) under a `DAXSHIM_DAX` directory,
/// or is the whole process DAX-aware?
pub fn process_opted_in(path: &str) -> bool {
    match &rt().cfg.dax {
        DaxOptIn::Off => false,
        DaxOptIn::All => true,
        DaxOptIn::Dirs(dirs) => dirs.iter().any(|d| Path::new(path).starts_with(d)),
    }
}

pub fn fd_path(fd: i32) -> Option<String> {
    let link = CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = sys::readlink(&link, &mut buf).ok()?;
    buf.truncate(n);
    let mut s = String::from_utf8_lossy(&buf).into_owned();
    if let Some(stripped) = s.strip_suffix(" (deleted)") {
        s = stripped.to_string();
    }
    Some(s)
}

/// A regular file on pmem.
pub struct Classified {
    pub id: FileId,
    /// Emulated pmem (a `DAXSHIM_PMEM` directory), not real DAX.
    pub emulated: bool,
    pub path: String,
}

/// Is `fd` a regular file on pmem?
pub fn classify(fd: i32) -> Option<Classified> {
    let stx = sys::statx_fd(fd, libc::STATX_BASIC_STATS | libc::STATX_BTIME).ok()?;
    if stx.stx_mode as u32 & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    let r = rt();
    let dax = stx.stx_attributes & STATX_ATTR_DAX != 0 || r.dax_devs.contains(&dev);
    if !dax && !r.pmem_devs.contains(&dev) {
        return None;
    }
    let path = fd_path(fd)?;
    if !dax
        && !r
            .cfg
            .pmem_dirs
            .iter()
            .any(|d| Path::new(&path).starts_with(d))
    {
        return None;
    }
    let (gen_sec, gen_nsec) = if stx.stx_mask & libc::STATX_BTIME != 0 {
        (stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)
    } else {
        (0, 0)
    };
    let id = FileId {
        dev,
        ino: stx.stx_ino,
        gen_sec,
        gen_nsec,
    };
    Some(Classified {
        id,
        emulated: !dax,
        path,
    })
}

/// Might a file at `path` (existing, or to be created there) be pmem? A
/// cheap test before the shim opens a stream's file itself: the file's own
/// device, or its directory's if it does not exist yet, must be one that
/// holds pmem. A yes is checked again on the descriptor ([`classify`]).
pub fn path_may_be_pmem(path: &CStr) -> bool {
    let r = rt();
    if r.pmem_devs.is_empty() && r.dax_devs.is_empty() {
        // Real DAX files on a dax=inode mount say so only in their statx.
        return sys::statx_path(path, libc::STATX_BASIC_STATS)
            .is_ok_and(|stx| stx.stx_attributes & STATX_ATTR_DAX != 0);
    }
    let stx = sys::statx_path(path, libc::STATX_BASIC_STATS).or_else(|_| {
        let bytes = path.to_bytes();
        let dir = match bytes.iter().rposition(|&b| b == b'/') {
            Some(0) => b"/".to_vec(),
            Some(i) => bytes[..i].to_vec(),
            None => b".".to_vec(),
        };
        let dir = CString::new(dir).unwrap_or_default();
        sys::statx_path(&dir, libc::STATX_BASIC_STATS)
    });
    match stx {
        Ok(stx) => {
            let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
            stx.stx_attributes & STATX_ATTR_DAX != 0
                || r.pmem_devs.contains(&dev)
                || r.dax_devs.contains(&dev)
        }
        Err(_) => false,
    }
}
