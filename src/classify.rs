//! Is this descriptor a pmem file, and is this caller DAX-aware?

use crate::runtime::rt;
use crate::shadow::FileId;
use crate::stats::{add, STATS};
use crate::sys::{self, Errno, Failure};
use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

const STATX_ATTR_DAX: u64 = 0x0020_0000;

/// Is `path` (a canonical absolute path) under a `DAXSHIM_DAX` directory,
/// or is the whole process DAX-aware?
pub fn process_opted_in(path: &str) -> bool {
    rt().cfg.dax.covers(path)
}

/// Does `DAXSHIM_ATOMIC` cover the pmem file at `path` (canonical)? The
/// atomic log's own lanes never are.
pub fn atomic_wanted(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    rt().cfg.atomic.covers(path) && crate::persist::redo::data_name_of_lane(name).is_none()
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
    Some(Classified {
        id: file_id(&stx),
        emulated: !dax,
        path,
    })
}

/// A file's identity from its statx (`STATX_BASIC_STATS | STATX_BTIME`):
/// device, inode and birth time (a reused inode number is another file).
pub fn file_id(stx: &libc::statx) -> FileId {
    let (gen_sec, gen_nsec) = if stx.stx_mask & libc::STATX_BTIME != 0 {
        (stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)
    } else {
        (0, 0)
    };
    FileId {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        gen_sec,
        gen_nsec,
    }
}

/// No shadow can be had for a pmem file (`why`): may the call go on
/// without one — mapping the file directly, or a descriptor that bypasses
/// the shadow? On emulated pmem, as on any file that is not DAX, the page
/// cache is under the direct mapping, so the semantics stay (logged once
/// per process). A real DAX file's direct mapping is exactly what an
/// unaware program must not get: the call fails with the errno the kernel
/// uses for the exhausted resource — `EMFILE`/`ENFILE` where a descriptor
/// was missing, `ENOMEM` otherwise — unless `DAXSHIM_FALLBACK=direct`.
/// `instead` says what happens without a shadow, for the log.
pub fn without_shadow(
    emulated: bool,
    path: &str,
    why: &Failure,
    instead: &str,
) -> Result<(), Errno> {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if atomic_wanted(path) {
        // Without its shadow the file would get neither failure-atomic
        // syncs nor writes kept out of it until the sync.
        error!("{path}: {why}; the call fails rather than give up failure-atomic sync (DAXSHIM_ATOMIC)");
        return Err(why.errno);
    }
    if emulated {
        if !LOGGED.swap(true, Ordering::Relaxed) {
            warn!("{path}: {why}; {instead} (emulated pmem: the page cache under it keeps the semantics; further cases are logged at debug)");
        } else {
            debug!("{path}: {why}; {instead}");
        }
        add(&STATS.fallbacks_direct, 1);
        return Ok(());
    }
    if rt().cfg.fallback_direct {
        warn!("{path}: {why}; {instead}: a real DAX file, DAX semantics (DAXSHIM_FALLBACK=direct)");
        add(&STATS.fallbacks_direct, 1);
        return Ok(());
    }
    let e = match why.errno.0 {
        libc::EMFILE | libc::ENFILE => why.errno,
        _ => Errno(libc::ENOMEM),
    };
    error!("{path}: {why}; the call fails with {e} rather than give a real DAX file's direct semantics to a program that did not ask for them (DAXSHIM_FALLBACK=direct allows it)");
    Err(e)
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
