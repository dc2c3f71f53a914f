//! The shared header of a shadow (`<key>.meta`), mapped by every attached
//! process.
//!
//! # Safety
//! The header lives in a `MAP_SHARED` file mapping that other processes
//! change at any time, so the shim only ever holds `&Header` (never `&mut`):
//! every field is atomic or an `UnsafeCell` (the robust process-shared
//! mutexes, initialised under the attach lock; the path, written under it).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

pub const MAGIC: u64 = 0x4441_5853_4849_4d31; // "DAXSHIM1"
pub const VERSION: u32 = 7;
pub const SLOTS: usize = 128;
pub const META_SIZE: usize = 8192;

/// Byte (beyond the header) locked exclusively while attaching/detaching.
pub const ATTACH_LOCK_BYTE: i64 = 1 << 20;

/// The slot's process may have stored to the shadow without writing back.
pub const SLOT_WRITER: u32 = 1;
/// The slot's process detached leaving unsynced stores: the slot counts as
/// a dead writer's, although the process may live on.
pub const SLOT_LEFT: u32 = 2;
/// The slot's process maps the file writable and shared without region
/// traps that mark its stores (`track::marks`): other processes do not
/// evict while it is attached.
pub const SLOT_UNTRAPPED: u32 = 4;
/// The slot's process is evicting pages of the data file: a process about
/// to store without region traps waits until none does (one that died
/// evicting does not count).
pub const SLOT_EVICTING: u32 = 8;

/// A process that attached to a shadow. Its liveness is its presence file
/// in the shadow directory ([`presence_path`]), which it holds an OFD lock
/// on for its whole life: the kernel drops the lock when the process dies,
/// however it dies (or execs), and a process keeps one descriptor for it
/// whatever the number of files it attaches.
#[repr(C)]
pub struct Slot {
    pub pid: AtomicI32,
    pub flags: AtomicU32,
    /// Names the owner's presence file.
    pub tag: AtomicU64,
}

/// The presence file of the process whose slots carry `tag`.
pub fn presence_path(dir: &str, tag: u64) -> String {
    format!("{dir}/live-{tag:016x}")
}

/// Is the process whose slots carry `tag` alive? Its presence file exists
/// and is locked. (Unknown — the file cannot be opened for another reason —
/// counts as alive: nothing is reconciled under a live writer.)
pub fn presence_alive(dir: &str, tag: u64) -> bool {
    let Ok(c) = std::ffi::CString::new(presence_path(dir, tag)) else {
        return true;
    };
    // SAFETY: a C string; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT);
    }
    // SAFETY: an all-zero flock is valid; filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: our descriptor and a valid flock.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    r != 0 || fl.l_type != libc::F_UNLCK as i16
}

impl Slot {
    /// Does a live process hold this slot? (`own`: this process's tag, known
    /// alive without a look.)
    pub fn alive(&self, dir: &str, own: u64) -> bool {
        if self.pid.load(Ordering::Relaxed) == 0
            || self.flags.load(Ordering::Relaxed) & SLOT_LEFT != 0
        {
            return false;
        }
        let tag = self.tag.load(Ordering::Relaxed);
        tag == own && own != 0 || presence_alive(dir, tag)
    }
}

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub slot_count: AtomicU32,
    pub dev: AtomicU64,
    pub ino: AtomicU64,
    pub gen_sec: AtomicI64,
    pub gen_nsec: AtomicU64,
    /// Backing file size and mtime as the shim last left them.
    pub rec_size: AtomicU64,
    pub rec_mtime_sec: AtomicI64,
    pub rec_mtime_nsec: AtomicU64,
    /// 1 once the data file holds a copy of the file (created by the first
    /// process that maps it); 0 while reads and writes go to the backing.
    pub data_valid: AtomicU32,
    /// Serialises changes to the backing (write hooks, truncation,
    /// writeback) with the record above, across processes. Robust: a holder
    /// that dies leaves it `EOWNERDEAD`, which tells the next attacher that a
    /// mismatch between record and backing came from the shim itself.
    pub io_lock: UnsafeCell<libc::pthread_mutex_t>,
    pub slots: [Slot; SLOTS],
    /// 1: emulated pmem (a DAXSHIM_PMEM directory); 0: real DAX.
    pub emulated: AtomicU32,
    /// The backing file's path as the last attaching process saw it (for
    /// `daxshim status`/`sync`/`gc`; may be stale after a rename).
    pub path_len: AtomicU32,
    pub path: UnsafeCell<[u8; PATH_MAX_STORED]>,
    /// 1: the data file is filled lazily, on first access (userfaultfd): a
    /// hole in it means "the backing's bytes", not zeros.
    pub lazy: AtomicU32,
    /// 1: some process maps the data without handling missing pages, so no
    /// page may be punched out of it again (eviction is off).
    pub no_evict: AtomicU32,
    /// Serialises filling holes of a lazy data file, evicting pages from it
    /// and every reading of it through a mapping no userfaultfd watches (the
    /// writeback's view): such a read of a hole would create a page of
    /// zeros. Never held while touching memory of a watched mapping.
    pub fill_lock: UnsafeCell<libc::pthread_mutex_t>,
    /// 1: the record above was taken after a change from outside the shim
    /// within the current tick of the file system's clock, so another such
    /// change may hide behind the same mtime: the next check looks at the
    /// lines whatever the record says.
    pub rec_unsure: AtomicU32,
    /// The memory the data file and its bases hold, as some process last
    /// measured it, plus what every process filled since (lazy filling's
    /// estimate for `DAXSHIM_CACHE_MAX`, seen by all at once). Zero in a
    /// header made before it existed: measured at the first eviction.
    pub filled: AtomicU64,
    /// 1: failure-atomic sync (`DAXSHIM_ATOMIC`, `persist::redo`): every
    /// process's writes go to the shadow only and every sync commits
    /// through the log. Set by an attacher whose configuration asks for it;
    /// followed by every other process while the shadow lives.
    pub atomic: AtomicU32,
    /// The atomic log's period (under the io lock): the generation of the
    /// last committed sync, the last one fully applied, the file's size as
    /// of that sync, the lowest size the file had since (bytes below the
    /// synced size a shrink took were saved in undo records), and where the
    /// next undo record goes in the lane.
    pub log_gen: AtomicU64,
    pub log_applied: AtomicU64,
    pub log_size: AtomicU64,
    pub log_low: AtomicU64,
    pub log_undo_at: AtomicU64,
    /// 1 once any process mapped the data file (set before the mapping
    /// exists): a failure-atomic sync then no longer punches the pages it
    /// wrote back out of a lazy data file.
    pub ever_mapped: AtomicU32,
    /// The last sync whose apply is known durable (a sync's apply is made
    /// durable before the lane of its record is written again).
    pub log_durable: AtomicU64,
    /// Where the file was when its log's lanes were made there (they sit
    /// beside it; a rename under the shim moves both). Under the io lock.
    pub log_path_len: AtomicU32,
    pub log_path: UnsafeCell<[u8; PATH_MAX_STORED]>,
    /// 1 once a process was about to make the data file, its bases or its
    /// region marks (set before it does): until then the last detach has
    /// nothing but the header to remove.
    pub files_made: AtomicU32,
}

pub const PATH_MAX_STORED: usize = 2048;

const _: () = assert!(std::mem::size_of::<Header>() <= META_SIZE);

/// Identity of a backing file: a recreated file with a reused inode number
/// gets another birth time, hence another shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub gen_sec: i64,
    pub gen_nsec: u32,
}

impl FileId {
    /// The shadow's file name (data; the header adds `.meta`).
    pub fn key(&self) -> String {
        format!(
            "{:x}-{:x}-{:x}.{:08x}",
            self.dev, self.ino, self.gen_sec, self.gen_nsec
        )
    }
}

/// Stores `p` (truncated to what fits) in a path field of the header.
/// Writers of one field are serialised by a lock (see each field).
fn store_path(len: &AtomicU32, buf: &UnsafeCell<[u8; PATH_MAX_STORED]>, p: &str) {
    let b = p.as_bytes();
    let n = b.len().min(PATH_MAX_STORED);
    // SAFETY: writers are serialised by the field's lock; readers tolerate
    // a torn path (display) or hold the same lock (the log's).
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), buf.get() as *mut u8, n) };
    len.store(n as u32, Ordering::Release);
}

fn load_path(len: &AtomicU32, buf: &UnsafeCell<[u8; PATH_MAX_STORED]>) -> String {
    let n = (len.load(Ordering::Acquire) as usize).min(PATH_MAX_STORED);
    let mut out = vec![0u8; n];
    // SAFETY: in bounds; a concurrent writer can only tear the bytes.
    unsafe { std::ptr::copy_nonoverlapping(buf.get() as *const u8, out.as_mut_ptr(), n) };
    String::from_utf8_lossy(&out).into_owned()
}

impl Header {
    /// Stores the backing path (truncated to what fits). Call with the
    /// attach lock held (the only writers hold it).
    pub fn set_path(&self, p: &str) {
        store_path(&self.path_len, &self.path, p)
    }

    #[allow(dead_code)] // read by the CLI, which shares this module
    pub fn path(&self) -> String {
        load_path(&self.path_len, &self.path)
    }

    /// Where the atomic log's lanes are (beside this path). Call with the
    /// io lock held.
    #[allow(dead_code)] // not by the CLI
    pub fn set_log_path(&self, p: &str) {
        store_path(&self.log_path_len, &self.log_path, p)
    }

    #[allow(dead_code)] // not by the CLI
    pub fn log_path(&self) -> String {
        load_path(&self.log_path_len, &self.log_path)
    }

    /// Does the header describe the file `id` in this layout version?
    pub fn describes(&self, id: FileId) -> bool {
        self.magic.load(Ordering::Acquire) == MAGIC
            && self.version.load(Ordering::Relaxed) == VERSION
            && self.dev.load(Ordering::Relaxed) == id.dev
            && self.ino.load(Ordering::Relaxed) == id.ino
            && self.gen_sec.load(Ordering::Relaxed) == id.gen_sec
            && self.gen_nsec.load(Ordering::Relaxed) == id.gen_nsec as u64
    }

    pub fn record(&self, size: u64, mtime_sec: i64, mtime_nsec: u64) {
        self.rec_size.store(size, Ordering::Relaxed);
        self.rec_mtime_sec.store(mtime_sec, Ordering::Relaxed);
        self.rec_mtime_nsec.store(mtime_nsec, Ordering::Relaxed);
    }

    /// Is this the size and mtime recorded last?
    pub fn is_recorded(&self, size: u64, mtime_sec: i64, mtime_nsec: u64) -> bool {
        self.rec_size.load(Ordering::Relaxed) == size
            && self.rec_mtime_sec.load(Ordering::Relaxed) == mtime_sec
            && self.rec_mtime_nsec.load(Ordering::Relaxed) == mtime_nsec
    }

    /// Initialises the process-shared robust io and fill locks in place.
    ///
    /// # Safety
    /// Nobody else may use the locks during initialisation (attach lock held
    /// on a header whose magic is not yet valid).
    pub unsafe fn init_locks(&self) {
        // SAFETY: standard attr + init of memory nobody else uses now.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut attr);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            libc::pthread_mutex_init(self.io_lock.get(), &attr);
            libc::pthread_mutex_init(self.fill_lock.get(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
        }
    }
}
