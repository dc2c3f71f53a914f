//! Reading the shadow directory: every shadow's header, its processes
//! (alive or dead, from the OFD slot locks), whether it may hold data not
//! yet written back. Used by `status`, `drop`, `gc` and `sync`.
//!
//! # Safety
//! Headers are read through a read-write `MAP_SHARED` mapping of the meta
//! file, whose layout is the library's own (`header.rs` is shared source).

#[path = "../../src/shadow/header.rs"]
#[allow(dead_code)]
mod header;

pub use header::FileId;
use header::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// The user's shadow directory (as the library computes it).
pub fn shadow_dir() -> PathBuf {
    match std::env::var_os("DAXSHIM_SHADOW_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        // SAFETY: geteuid has no preconditions.
        _ => PathBuf::from(format!("/dev/shm/daxshim-{}", unsafe { libc::geteuid() })),
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Proc {
    pub pid: i32,
    pub alive: bool,
    pub writer: bool,
    /// Maps the file writable without region traps that mark its stores:
    /// other processes do not evict the shadow while it is attached.
    pub untrapped: bool,
}

#[derive(Clone, Debug)]
pub struct ShadowInfo {
    pub key: String,
    pub meta: PathBuf,
    pub data: PathBuf,
    pub backing: String,
    pub emulated: bool,
    pub has_data: bool,
    pub size: u64,
    pub resident: u64,
    pub procs: Vec<Proc>,
    /// The backing path still names the file this shadow belongs to.
    pub backing_present: bool,
    /// Filled lazily, and a process mapped it without handling missing
    /// pages: nothing may be evicted from it.
    pub no_evict: bool,
    /// Failure-atomic (`DAXSHIM_ATOMIC`): the last committed sync.
    pub atomic_gen: Option<u64>,
}

impl ShadowInfo {
    pub fn live(&self) -> Vec<i32> {
        self.procs
            .iter()
            .filter(|p| p.alive)
            .map(|p| p.pid)
            .collect()
    }

    /// Might the shadow hold stores the backing does not have?
    pub fn may_hold_unsynced(&self) -> bool {
        self.has_data && self.procs.iter().any(|p| p.writer)
    }

    /// Unsynced stores of processes that are gone: `daxshim sync` writes them.
    pub fn dead_writers(&self) -> Vec<i32> {
        self.procs
            .iter()
            .filter(|p| !p.alive && p.writer)
            .map(|p| p.pid)
            .collect()
    }
}

/// A meta file, opened and mapped.
pub struct Meta {
    fd: i32,
    hdr: *mut Header,
    /// The shadow directory (where the processes' presence files are).
    dir: String,
}

impl Drop for Meta {
    fn drop(&mut self) {
        // SAFETY: our mapping and descriptor.
        unsafe {
            libc::munmap(self.hdr as *mut _, META_SIZE);
            libc::close(self.fd);
        }
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn ofd(fd: i32, cmd: i32, kind: i32, start: i64) -> std::io::Result<libc::flock> {
    // SAFETY: a zeroed flock is valid input for fcntl.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    // SAFETY: fcntl with a valid flock pointer.
    if unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) } < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

impl Meta {
    pub fn open(path: &Path) -> std::io::Result<Meta> {
        let c = cpath(path);
        // SAFETY: valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // A shorter file (an older shim's header) would fault past its end.
        // SAFETY: an all-zero stat is valid output space; our descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } < 0 || (st.st_size as usize) < META_SIZE {
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidData));
        }
        // SAFETY: a fresh shared mapping of the meta file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                META_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        Ok(Meta {
            fd,
            hdr: p as *mut Header,
            dir: path
                .parent()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_else(|| ".".into()),
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: META_SIZE bytes mapped for our lifetime.
        unsafe { &*self.hdr }
    }

    pub fn valid(&self) -> bool {
        let h = self.header();
        h.magic.load(Ordering::Acquire) == MAGIC && h.version.load(Ordering::Relaxed) == VERSION
    }

    /// Holds the attach lock: no process attaches or detaches meanwhile.
    pub fn lock(&self) -> std::io::Result<()> {
        ofd(self.fd, libc::F_OFD_SETLKW, libc::F_WRLCK, ATTACH_LOCK_BYTE).map(|_| ())
    }

    pub fn procs(&self) -> Vec<Proc> {
        let h = self.header();
        (0..SLOTS)
            .filter_map(|i| {
                let pid = h.slots[i].pid.load(Ordering::Relaxed);
                if pid == 0 {
                    return None;
                }
                let alive = h.slots[i].alive(&self.dir, 0);
                let flags = h.slots[i].flags.load(Ordering::Relaxed);
                Some(Proc {
                    pid,
                    alive,
                    writer: flags & SLOT_WRITER != 0,
                    untrapped: flags & SLOT_UNTRAPPED != 0,
                })
            })
            .collect()
    }

    pub fn identity(&self) -> FileId {
        let h = self.header();
        FileId {
            dev: h.dev.load(Ordering::Relaxed),
            ino: h.ino.load(Ordering::Relaxed),
            gen_sec: h.gen_sec.load(Ordering::Relaxed),
            gen_nsec: h.gen_nsec.load(Ordering::Relaxed) as u32,
        }
    }
}

/// The identity of a file as the library computes it (statx: dev, inode,
/// birth time).
pub fn file_id(path: &Path) -> std::io::Result<FileId> {
    let c = cpath(path);
    // SAFETY: zeroed statx is valid output space.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and output pointer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            &mut stx,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (gen_sec, gen_nsec) = if stx.stx_mask & libc::STATX_BTIME != 0 {
        (stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)
    } else {
        (0, 0)
    };
    Ok(FileId {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        gen_sec,
        gen_nsec,
    })
}

pub fn info(dir: &Path, key: &str) -> std::io::Result<ShadowInfo> {
    let meta = dir.join(format!("{key}.meta"));
    let data = dir.join(key);
    let m = Meta::open(&meta)?;
    if !m.valid() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a valid shadow header",
        ));
    }
    let h = m.header();
    let backing = h.path();
    let backing_present = file_id(Path::new(&backing)).is_ok_and(|id| id == m.identity());
    let (size, resident) = match std::fs::metadata(&data) {
        Ok(md) => (md.len(), std::os::unix::fs::MetadataExt::blocks(&md) * 512),
        Err(_) => (0, 0),
    };
    Ok(ShadowInfo {
        key: key.to_string(),
        meta,
        data,
        backing,
        emulated: h.emulated.load(Ordering::Relaxed) != 0,
        has_data: h.data_valid.load(Ordering::Acquire) != 0,
        size,
        resident,
        procs: m.procs(),
        backing_present,
        no_evict: h.lazy.load(Ordering::Relaxed) != 0 && h.no_evict.load(Ordering::Relaxed) != 0,
        atomic_gen: (h.atomic.load(Ordering::Acquire) != 0)
            .then(|| h.log_gen.load(Ordering::Acquire)),
    })
}

/// Every shadow in `dir`, and the orphaned data files kept aside.
pub fn list(dir: &Path) -> (Vec<ShadowInfo>, Vec<PathBuf>) {
    let mut shadows = Vec::new();
    let mut orphans = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (shadows, orphans);
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        if let Some(key) = n.strip_suffix(".meta") {
            if let Ok(i) = info(dir, key) {
                shadows.push(i);
            }
        } else if n.contains(".orphan-") {
            orphans.push(dir.join(n));
        }
    }
    (shadows, orphans)
}

/// Removes the presence files (`live-<tag>`) of processes that are gone:
/// a live process holds a lock on its own. Returns how many went.
pub fn remove_stale_presences(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let d = dir.to_string_lossy();
    rd.flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            u64::from_str_radix(n.strip_prefix("live-")?, 16).ok()
        })
        .filter(|&tag| !presence_alive(&d, tag))
        .filter(|&tag| std::fs::remove_file(presence_path(&d, tag)).is_ok())
        .count()
}

/// Removes a shadow's files under its attach lock (an attaching process
/// that opened the meta file meanwhile sees it unlinked and starts over).
pub fn remove(s: &ShadowInfo) -> std::io::Result<()> {
    let m = Meta::open(&s.meta)?;
    m.lock()?;
    if m.procs().iter().any(|p| p.alive) {
        return Err(std::io::Error::other("a process attached meanwhile"));
    }
    let _ = std::fs::remove_file(&s.data);
    // The line bases beside the data (the library's `shadow/lines.rs`).
    let mut lines = s.data.clone().into_os_string();
    lines.push(".lines");
    let _ = std::fs::remove_file(lines);
    // The region marks (`shadow/regions.rs`).
    let mut regions = s.data.clone().into_os_string();
    regions.push(".regions");
    let _ = std::fs::remove_file(regions);
    std::fs::remove_file(&s.meta)
}
