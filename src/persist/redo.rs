//! The log of a failure-atomic sync (`DAXSHIM_ATOMIC`, docs/ARCHITECTURE.md
//! "Failure-atomic sync"): everything one sync writes — the changed spans
//! and the file's new size — is made durable in a redo record beside the
//! file *before* any byte is applied in place; then it is applied. A crash
//! at any instant leaves either a record that does not check out (dropped:
//! the file is as of the previous sync) or a committed one (replayed: the
//! file becomes as of this sync). Replaying is idempotent, so a crash during
//! the apply, or a second recovery, changes nothing.
//!
//! [`LANES`] *lanes* (hidden files beside the data file,
//! `.<name>.daxshim-log0` to `…7`): the record of sync `gen` goes to lane
//! `gen % LANES`, so that committing a sync never overwrites the records of
//! the ones before it. Those are replayed too: a sync's apply is made
//! durable (one flush of the file) only before its lane is written again,
//! so the file is flushed once every `LANES` syncs, not at each. Between
//! two syncs the size of the backing does change (writes that extend the
//! file, truncation: the size lives in the backing, where every program
//! looks for it); what a shrink takes away of the synced bytes is first
//! saved in an *undo* record appended to the current lane, so recovery can
//! give it back.
//!
//! Record layout (little-endian), each record 4 KiB-aligned in its lane:
//!
//! ```text
//! header (80 bytes): magic (kind), generation, size, entries, body length,
//!                    body checksum, header checksum, owner, low, 0
//! body:              per entry: offset (u64), length (u64), the bytes,
//!                    zero-padded to 8
//! ```
//!
//! A redo record's size is the file's size after the sync, its low the
//! lowest size the file had since the sync before (the bytes from there on
//! are zeros but for the record's spans); an undo record's size is the
//! size to give back (the synced one), its low where the shrink cut (the
//! zero pages it took are not saved: cutting and growing makes them). The owner names the file (its
//! device, inode and birth time): records left by a file that was deleted
//! and replaced under the same name are not the new file's. The header's
//! checksum covers its other words and the body's checksum the body, so a
//! record torn anywhere fails one of them. A *closed* record (after the undo records) says the
//! last process detached with everything synced: nothing to replay.

use crate::fdcache::{self, FdCache, SharedFd};
use crate::sys::{self, Errno, SysResult};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

const REDO: u64 = u64::from_le_bytes(*b"DXREDO03");
const UNDO: u64 = u64::from_le_bytes(*b"DXUNDO03");
const CLOSED: u64 = u64::from_le_bytes(*b"DXCLOS03");
const HEADER: usize = 80;

/// Where the lanes of a data file live: `<dir>/.<name>.daxshim-logK`.
pub const LANE_SUFFIX: &str = ".daxshim-log";

/// How many lanes a log has: the records of the last `LANES` syncs are
/// kept, and the file's flush is needed once every `LANES` syncs.
pub const LANES: usize = 8;

/// The lanes' paths of one data file.
pub type Lanes = [String; LANES];

/// The lane of sync `gen`'s record.
pub fn lane_of(gen: u64) -> usize {
    (gen % LANES as u64) as usize
}

/// The lanes' paths for the data file at `path` (None: no file name).
pub fn lane_paths(path: &str) -> Option<Lanes> {
    let (dir, name) = match path.rfind('/') {
        Some(i) => (&path[..i + 1], &path[i + 1..]),
        None => ("", path),
    };
    if name.is_empty() {
        return None;
    }
    // Built by hand, not with `format!`: every atomic sync and shrink asks
    // (formatting eight paths was 1 % of Kyoto Cabinet's atomic run).
    const _: () = assert!(LANES <= 10, "lane numbers are one digit");
    let mut prefix = String::with_capacity(path.len() + LANE_SUFFIX.len() + 2);
    prefix.push_str(dir);
    prefix.push('.');
    prefix.push_str(name);
    prefix.push_str(LANE_SUFFIX);
    Some(std::array::from_fn(|k| {
        let mut p = String::with_capacity(prefix.len() + 1);
        p.push_str(&prefix);
        p.push(char::from(b'0' + k as u8));
        p
    }))
}

/// The data file a lane belongs to (the inverse of [`lane_paths`]), for a
/// lane's file name: `.<name>.daxshim-log0` → `<name>`.
pub fn data_name_of_lane(lane_name: &str) -> Option<&str> {
    let rest = lane_name.strip_prefix('.')?;
    let k = rest.chars().last()?.to_digit(10)?;
    let rest = rest[..rest.len() - 1].strip_suffix(LANE_SUFFIX)?;
    (!rest.is_empty() && (k as usize) < LANES).then_some(rest)
}

/// A 64-bit checksum (multiply-xorshift over words, the length mixed in):
/// enough to tell a torn or stale record from a committed one.
fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ x).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x94d0_49bb_1331_11eb);
    }
    h ^ (h >> 29)
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Where the record after one of `len` bytes at `at` starts.
fn next_record(at: u64, len: usize) -> u64 {
    at + sys::page_up(len) as u64
}

/// One record being built: a sync's changes (redo) or bytes a shrink takes
/// away (undo).
pub struct Unit {
    gen: u64,
    size: u64,
    low: u64,
    owner: u64,
    entries: u64,
    body: Vec<u8>,
}

/// The owner word of a file's records: its identity (device, inode, birth
/// time).
pub fn owner_of(dev: u64, ino: u64, birth_sec: i64, birth_nsec: u64) -> u64 {
    let mut b = Vec::with_capacity(32);
    for w in [dev, ino, birth_sec as u64, birth_nsec] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    checksum(&b)
}

/// The header's checksum: its words but the checksum's own.
fn header_sum(h: &[u8]) -> u64 {
    let mut b = h[..48].to_vec();
    b.extend_from_slice(&h[56..HEADER]);
    checksum(&b)
}

impl Unit {
    /// A record of generation `gen` of the file `owner` ([`owner_of`]);
    /// `size`: the file's size after the sync (redo) or to give back (undo).
    pub fn new(gen: u64, size: u64, owner: u64) -> Unit {
        Unit {
            gen,
            size,
            low: size,
            owner,
            entries: 0,
            body: Vec::new(),
        }
    }

    /// `bytes` go to the file at `off`.
    pub fn add(&mut self, off: u64, bytes: &[u8]) {
        self.body.extend_from_slice(&off.to_le_bytes());
        self.body
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.body.extend_from_slice(bytes);
        self.body.resize(pad8(self.body.len()), 0);
        self.entries += 1;
    }

    pub fn gen(&self) -> u64 {
        self.gen
    }

    /// The lowest size the file had since the previous sync (redo), or
    /// where a shrink cut (undo).
    pub fn set_low(&mut self, low: u64) {
        self.low = low.min(self.size);
    }

    #[cfg(test)]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of the record (header and body).
    pub fn len(&self) -> usize {
        HEADER + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn encode(&self, magic: u64) -> Vec<u8> {
        let words = [
            magic,
            self.gen,
            self.size,
            self.entries,
            self.body.len() as u64,
            checksum(&self.body),
        ];
        let mut out = Vec::with_capacity(self.len());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.low.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        let sum = header_sum(&out);
        out[48..56].copy_from_slice(&sum.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// The entries, straight from the body.
    pub fn parts(&self) -> impl Iterator<Item = (u64, &[u8])> {
        parse_body(&self.body, self.entries)
            .unwrap_or_default()
            .into_iter()
    }
}

/// A record read back from a lane.
#[derive(Debug, PartialEq, Eq)]
pub struct Record {
    pub magic: u64,
    pub gen: u64,
    pub size: u64,
    pub owner: u64,
    pub low: u64,
    /// (offset, bytes) in the order they were added.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// Bytes the record takes in its lane.
    pub len: usize,
}

fn word(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The header's body length, if the header checks out.
fn header_body_len(h: &[u8]) -> Option<usize> {
    if h.len() < HEADER || ![REDO, UNDO, CLOSED].contains(&word(h, 0)) {
        return None;
    }
    if word(h, 6) != header_sum(h) {
        return None;
    }
    usize::try_from(word(h, 4)).ok()
}

/// A record's bytes, or None (torn, damaged or not a record).
fn decode(bytes: &[u8]) -> Option<Record> {
    let body_len = header_body_len(bytes)?;
    let body = bytes.get(HEADER..HEADER.checked_add(body_len)?)?;
    if checksum(body) != word(bytes, 5) {
        return None;
    }
    let entries = parse_body(body, word(bytes, 3))?
        .into_iter()
        .map(|(off, b)| (off, b.to_vec()))
        .collect();
    Some(Record {
        magic: word(bytes, 0),
        gen: word(bytes, 1),
        size: word(bytes, 2),
        owner: word(bytes, 7),
        low: word(bytes, 8),
        entries,
        len: HEADER + body_len,
    })
}

/// The entries of a body (None: it does not parse).
fn parse_body(body: &[u8], count: u64) -> Option<Vec<(u64, &[u8])>> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let off = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
        let n = u64::from_le_bytes(body.get(at + 8..at + 16)?.try_into().ok()?);
        let n = usize::try_from(n).ok()?;
        entries.push((off, body.get(at + 16..(at + 16).checked_add(n)?)?));
        at += 16 + pad8(n);
    }
    (at == body.len()).then_some(entries)
}

/// The record at `at` of the lane behind `fd`, if one checks out there.
fn read_record(fd: i32, at: u64) -> SysResult<Option<Record>> {
    let mut h = [0u8; HEADER];
    if sys::pread_full(fd, &mut h, at)? < HEADER {
        return Ok(None);
    }
    let Some(body_len) = header_body_len(&h) else {
        return Ok(None);
    };
    let mut all = vec![0u8; HEADER + body_len];
    let n = sys::pread_full(fd, &mut all, at)?;
    all.truncate(n);
    Ok(decode(&all))
}

/// Opens a lane (`create`: made if missing, with `mode`).
pub fn open_lane(path: &str, create: Option<u32>) -> SysResult<OwnedFd> {
    let c = CString::new(path).map_err(|_| Errno(libc::EINVAL))?;
    let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    match create {
        Some(mode) => sys::open(&c, flags | libc::O_CREAT, mode),
        None => sys::open(&c, flags, 0),
    }
}

/// This process's open lanes: a sync writes its record without opening and
/// closing its lane each time (at most 16 descriptors held, as for the
/// backing and data files).
static LANE_FDS: FdCache = FdCache::new(16);

/// The cache keys of one file's lanes in this process (one shadow's).
#[derive(Clone, Copy, Debug)]
pub struct LaneKeys(u64);

impl LaneKeys {
    pub fn new() -> LaneKeys {
        LaneKeys(fdcache::new_keys(LANES as u64))
    }

    /// Closes the lanes this process holds open (detached).
    pub fn forget(&self) {
        for k in 0..LANES as u64 {
            LANE_FDS.forget(self.0 + k);
        }
    }
}

impl Default for LaneKeys {
    fn default() -> LaneKeys {
        LaneKeys::new()
    }
}

/// Fork: the cache's lock is a leaf lock (see `lifecycle`).
pub fn hold_lane_fds_for_fork() {
    LANE_FDS.hold_for_fork();
}

/// # Safety
/// After [`hold_lane_fds_for_fork`], in the parent or the child.
pub unsafe fn release_lane_fds_after_fork() {
    // SAFETY: per contract.
    unsafe { LANE_FDS.release_after_fork() };
}

/// Lane `k`, from the cache while it still has a name (a lane removed
/// behind this process's back is made anew, as an uncached open would).
fn cached_lane(
    keys: LaneKeys,
    k: usize,
    path: &str,
    mode: impl FnOnce() -> u32,
) -> SysResult<SharedFd> {
    let key = keys.0 + k as u64;
    if let Some(fd) = LANE_FDS.get(key) {
        if sys::statx_fd(fd.raw(), libc::STATX_NLINK).is_ok_and(|x| x.stx_nlink > 0) {
            return Ok(fd);
        }
        LANE_FDS.forget(key);
    }
    Ok(LANE_FDS.insert(key, open_lane(path, Some(mode()))?))
}

/// Writes `bytes` at `at`, then makes them durable. With a crash budget
/// (`DAXSHIM_DEBUG_CRASH_AFTER_LINES`) the record goes out line by line,
/// each line spending one, so that a crash can tear it anywhere.
fn write_durably(fd: i32, bytes: &[u8], at: u64, budget: &mut Option<u64>) -> SysResult<()> {
    match budget {
        None => sys::pwrite_all(fd, bytes, at)?,
        Some(_) => {
            for (k, line) in bytes.chunks(super::LINE).enumerate() {
                super::spend_line(budget);
                sys::pwrite_all(fd, line, at + (k * super::LINE) as u64)?;
            }
        }
    }
    sys::fdatasync(fd)
}

/// Step 1 of a sync: its redo record is written to its lane and durable
/// (nothing of the file has changed yet). A full file system fails here,
/// with the kernel's errno, and the file is untouched.
/// `keys`: keep the lane open in this process for the next sync. `mode`:
/// of a lane that has to be made.
pub fn commit(
    u: &Unit,
    lanes: &Lanes,
    mode: impl FnOnce() -> u32,
    keys: Option<LaneKeys>,
    budget: &mut Option<u64>,
) -> SysResult<()> {
    let k = lane_of(u.gen);
    let bytes = u.encode(REDO);
    match keys {
        Some(keys) => {
            let lane = cached_lane(keys, k, &lanes[k], mode)?;
            write_durably(lane.raw(), &bytes, 0, budget)
        }
        None => {
            let lane = open_lane(&lanes[k], Some(mode()))?;
            write_durably(lane.as_raw_fd(), &bytes, 0, budget)
        }
    }
}

/// Between syncs, before a shrink: bytes of the synced file the shrink
/// takes away (`u`, whose size is the synced size), appended to the lane of
/// generation `u.gen()` at `at`, durably. Returns where the next one goes.
pub fn save_undo(u: &Unit, lanes: &Lanes, at: u64) -> SysResult<u64> {
    let lane = open_lane(&lanes[lane_of(u.gen)], None)?;
    write_durably(lane.as_raw_fd(), &u.encode(UNDO), at, &mut None)?;
    Ok(next_record(at, u.len()))
}

/// Where the first undo record after a redo record of `len` bytes goes.
pub fn undo_start(redo_len: usize) -> u64 {
    next_record(0, redo_len)
}

/// At the last detach, everything synced: generation `gen` needs no replay
/// (a crash before this is durable only replays it once more).
pub fn close(gen: u64, owner: u64, lanes: &Lanes, at: u64) -> SysResult<()> {
    let lane = open_lane(&lanes[lane_of(gen)], None)?;
    sys::pwrite_all(
        lane.as_raw_fd(),
        &Unit::new(gen, 0, owner).encode(CLOSED),
        at,
    )
}

impl Record {
    fn parts(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.entries.iter().map(|(o, b)| (*o, b.as_slice()))
    }
}

/// Writes a record's effect into the file behind `data_fd`: cut to its low
/// (the bytes beyond are zeros but for its spans), the spans, then the
/// size (a redo record's; an undo record leaves it to the redo record).
fn apply<'a>(
    entries: impl Iterator<Item = (u64, &'a [u8])>,
    low: u64,
    size: Option<u64>,
    data_fd: i32,
) -> SysResult<()> {
    if sys::file_size(data_fd)? > low {
        sys::ftruncate(data_fd, low)?;
    }
    for (off, bytes) in entries {
        sys::pwrite_all(data_fd, bytes, off)?;
    }
    if let Some(size) = size {
        if sys::file_size(data_fd)? != size {
            sys::ftruncate(data_fd, size)?;
        }
    }
    Ok(())
}

/// Every redo record of `owner` the lanes hold, oldest first. Lane 0
/// exists whenever another does (made first, removed last): a file without
/// a log costs one probe, which every attach of every file makes.
fn redo_records(lanes: &Lanes, owner: u64) -> SysResult<Vec<(Record, OwnedFd)>> {
    let mut found = Vec::new();
    for (k, path) in lanes.iter().enumerate() {
        let fd = match open_lane(path, None) {
            Ok(fd) => fd,
            Err(Errno(libc::ENOENT)) if k == 0 => return Ok(found),
            Err(Errno(libc::ENOENT)) => continue,
            Err(e) => return Err(e),
        };
        if let Some(r) = read_record(fd.as_raw_fd(), 0)? {
            if r.magic == REDO && r.owner == owner {
                found.push((r, fd));
            }
        }
    }
    found.sort_by_key(|(r, _)| r.gen);
    Ok(found)
}

/// The newest redo record of `owner` in the lanes (None: no lane holds
/// one), with the lane it is in.
pub fn newest(lanes: &Lanes, owner: u64) -> SysResult<Option<(Record, OwnedFd)>> {
    Ok(redo_records(lanes, owner)?.pop())
}

/// What recovery found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No lane holds a record: the file was never synced atomically.
    NoLog,
    /// The last process detached with everything synced (`gen`): the file
    /// is as that sync left it, or as changed outside the shim since.
    Closed { gen: u64 },
    /// The file was brought back to sync `gen` (its record, and the one
    /// before it if the lanes hold it, replayed; bytes a shrink took away
    /// given back; the size set): `undone` undo records.
    Recovered { gen: u64, size: u64, undone: usize },
}

/// After a crash (or when no process is attached): brings the file behind
/// `data_fd` (whose records carry `owner`) to the state of its last
/// committed sync, durably. A sync's apply is made durable only before the
/// lane of its record is written again, `LANES` syncs later, so the
/// records before the newest with consecutive generations are replayed
/// first, oldest first (each one cuts to its low and rewrites what it
/// changed, so replaying over later changes ends in the newest state).
pub fn recover(lanes: &Lanes, data_fd: i32, owner: u64) -> SysResult<Recovery> {
    let mut records = redo_records(lanes, owner)?;
    let Some((redo, lane)) = records.pop() else {
        return Ok(Recovery::NoLog);
    };
    // The records that follow the newest redo record in its lane.
    let mut undos = Vec::new();
    let mut at = undo_start(redo.len);
    while let Some(r) = read_record(lane.as_raw_fd(), at)? {
        if r.gen != redo.gen || r.owner != owner || r.magic == REDO {
            break;
        }
        at = next_record(at, r.len);
        if r.magic == CLOSED {
            return Ok(Recovery::Closed { gen: redo.gen });
        }
        undos.push(r);
    }
    let mut chain = Vec::new();
    let mut next = redo.gen;
    while let Some((r, _)) = records.pop().filter(|(r, _)| r.gen + 1 == next) {
        next = r.gen;
        chain.push(r);
    }
    for r in chain.iter().rev() {
        apply(r.parts(), r.low, Some(r.size), data_fd)?;
    }
    apply(redo.parts(), redo.low, Some(redo.size), data_fd)?;
    // The lowest cut first: each record holds the nonzero pages of the
    // synced bytes between its cut and the one before it.
    for u in undos.iter().rev() {
        apply(u.parts(), u.low, None, data_fd)?;
    }
    if sys::file_size(data_fd)? != redo.size {
        sys::ftruncate(data_fd, redo.size)?;
    }
    sys::fdatasync(data_fd)?;
    Ok(Recovery::Recovered {
        gen: redo.gen,
        size: redo.size,
        undone: undos.len(),
    })
}

/// Replays the redo record of `gen` if the lanes hold it (a committer that
/// died or failed after its commit), durably. Ok(false): no such record.
pub fn replay(gen: u64, owner: u64, lanes: &Lanes, data_fd: i32) -> SysResult<bool> {
    let lane = match open_lane(&lanes[lane_of(gen)], None) {
        Ok(fd) => fd,
        Err(Errno(libc::ENOENT)) => return Ok(false),
        Err(e) => return Err(e),
    };
    match read_record(lane.as_raw_fd(), 0)? {
        Some(r) if r.magic == REDO && r.gen == gen && r.owner == owner => {
            apply(r.parts(), r.low, Some(r.size), data_fd)?;
            sys::fdatasync(data_fd)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Removes every lane (the file leaves atomic mode), lane 0 last.
pub fn remove(lanes: &Lanes) {
    for p in lanes.iter().rev() {
        if let Ok(c) = CString::new(p.as_str()) {
            let _ = sys::unlink(&c);
        }
    }
}

/// The mode lanes are created with: the data file's permission bits.
pub fn lane_mode(data_fd: i32) -> u32 {
    sys::statx_fd(data_fd, libc::STATX_MODE).map_or(0o600, |x| x.stx_mode as u32 & 0o666)
}

/// Before a log's first record: lane 0 is made (durably: its name reaches
/// the disk before any other lane's), so that [`recover`] needs to look
/// for it alone to know whether the file has a log.
pub fn make_first_lane(lanes: &Lanes, mode: u32) -> SysResult<()> {
    let c = CString::new(lanes[0].as_str()).map_err(|_| Errno(libc::EINVAL))?;
    let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL;
    match sys::open(&c, flags, mode) {
        Ok(fd) => sys::fdatasync(fd.as_raw_fd()),
        Err(Errno(libc::EEXIST)) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: u64 = 0x0123_4567_89ab_cdef;

    fn unit(gen: u64) -> Unit {
        let mut u = Unit::new(gen, 2 << 20, OWNER);
        u.add(4096, b"hello");
        u.add(0, &[0xabu8; 64]);
        u.add(1 << 20, b"");
        u.add(65, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        u
    }

    #[test]
    fn lanes_sit_beside_the_file_and_name_it() {
        let l = lane_paths("/a/b/data.db").unwrap();
        assert_eq!(l[0], "/a/b/.data.db.daxshim-log0");
        assert_eq!(
            l[LANES - 1],
            format!("/a/b/.data.db.daxshim-log{}", LANES - 1)
        );
        for (k, lane) in l.iter().enumerate() {
            let name = lane.rsplit('/').next().unwrap();
            assert_eq!(data_name_of_lane(name), Some("data.db"), "lane {k}");
        }
        assert_eq!(data_name_of_lane(".daxshim-log1"), None);
        assert_eq!(data_name_of_lane("data.db.daxshim-log1"), None);
        assert_eq!(data_name_of_lane(&format!(".x.daxshim-log{LANES}")), None);
        assert_eq!(data_name_of_lane(".x.daxshim-log"), None);
        assert!(lane_paths("/a/b/").is_none());
    }

    #[test]
    fn a_unit_reads_back_as_written() {
        let r = decode(&unit(7).encode(REDO)).expect("committed");
        assert_eq!((r.magic, r.gen, r.size), (REDO, 7, 2 << 20));
        assert_eq!(r.entries.len(), 4);
        assert_eq!(r.entries[0], (4096, b"hello".to_vec()));
        assert_eq!(r.entries[2], (1 << 20, Vec::new()));
        assert_eq!(r.entries[3].1, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(r.len, unit(7).len());
        let parts: Vec<_> = unit(7).parts().map(|(o, b)| (o, b.len())).collect();
        assert_eq!(parts, vec![(4096, 5), (0, 64), (1 << 20, 0), (65, 9)]);
    }

    #[test]
    fn a_record_torn_anywhere_or_damaged_anywhere_does_not_count() {
        let bytes = unit(7).encode(REDO);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_none(), "torn at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode(&b).is_none(), "byte {i} flipped");
        }
        // A new header over an older, longer body: the body's checksum.
        let mut older = Unit::new(6, 10, OWNER);
        older.add(0, &[9u8; 300]);
        let mut mixed = older.encode(REDO);
        mixed[..HEADER].copy_from_slice(&unit(7).encode(REDO)[..HEADER]);
        assert!(decode(&mixed).is_none());
        assert!(decode(&[0u8; 200]).is_none());
    }

    struct Files {
        dir: std::path::PathBuf,
        data: std::fs::File,
        lanes: Lanes,
    }

    fn files(name: &str, content: &[u8]) -> Files {
        let dir = std::env::temp_dir().join(format!("daxshim-redo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        std::fs::write(&path, content).unwrap();
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let lanes = lane_paths(path.to_str().unwrap()).unwrap();
        // As a period's start makes it.
        make_first_lane(&lanes, 0o600).unwrap();
        Files { lanes, data, dir }
    }

    impl Files {
        fn content(&self) -> Vec<u8> {
            std::fs::read(self.dir.join("data")).unwrap()
        }
        fn fd(&self) -> i32 {
            self.data.as_raw_fd()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn expected(before: &[u8], u: &Unit) -> Vec<u8> {
        let mut v = before.to_vec();
        for (off, b) in u.parts() {
            let end = off as usize + b.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[off as usize..end].copy_from_slice(b);
        }
        v.resize(u.size() as usize, 0);
        v
    }

    #[test]
    fn lane_0_alone_says_whether_a_file_has_a_log() {
        let f = files("lane0", &[7u8; 100]);
        commit(
            &Unit::new(3, 100, OWNER),
            &f.lanes,
            || 0o600,
            None,
            &mut None,
        )
        .unwrap();
        assert_eq!(newest(&f.lanes, OWNER).unwrap().unwrap().0.gen, 3);
        // Without lane 0 the other lanes are not looked at (one probe per
        // attach of a file without a log).
        std::fs::remove_file(&f.lanes[0]).unwrap();
        assert!(newest(&f.lanes, OWNER).unwrap().is_none());
        make_first_lane(&f.lanes, 0o600).unwrap();
        assert_eq!(newest(&f.lanes, OWNER).unwrap().unwrap().0.gen, 3);
        // Removed: lane 0 last, none left.
        remove(&f.lanes);
        assert!(f.lanes.iter().all(|p| !std::path::Path::new(p).exists()));
    }

    #[test]
    fn a_kept_lane_is_written_again_and_one_removed_meanwhile_is_made_anew() {
        let f = files("kept", &[7u8; 100]);
        let keys = LaneKeys::new();
        let base = Unit::new(LANES as u64, 100, OWNER);
        commit(&base, &f.lanes, || 0o600, Some(keys), &mut None).unwrap();
        let (r, _) = newest(&f.lanes, OWNER).unwrap().unwrap();
        assert_eq!(r.gen, LANES as u64);
        // Lane 0 again (a wrap): through the descriptor kept open.
        let again = Unit::new(2 * LANES as u64, 100, OWNER);
        commit(&again, &f.lanes, || 0o600, Some(keys), &mut None).unwrap();
        assert_eq!(newest(&f.lanes, OWNER).unwrap().unwrap().0.gen, again.gen());
        // Removed behind the process's back: the next record is not lost in
        // the unlinked file, the lane is made anew.
        remove(&f.lanes);
        let third = Unit::new(3 * LANES as u64, 100, OWNER);
        commit(&third, &f.lanes, || 0o600, Some(keys), &mut None).unwrap();
        assert_eq!(newest(&f.lanes, OWNER).unwrap().unwrap().0.gen, third.gen());
        keys.forget();
    }

    #[test]
    fn a_committed_record_is_replayed_and_a_torn_one_dropped() {
        let before = vec![0x5au8; 8192];
        // The base: sync 1 left the file as it is.
        let base = Unit::new(1, before.len() as u64, OWNER);
        let u = unit(2);
        let want = expected(&before, &u);
        // Crash right after the commit: recovery finishes the sync.
        let f = files("replay", &before);
        commit(&base, &f.lanes, || 0o600, None, &mut None).unwrap();
        commit(&u, &f.lanes, || 0o600, None, &mut None).unwrap();
        assert_eq!(f.content(), before);
        let r = recover(&f.lanes, f.fd(), OWNER).unwrap();
        assert_eq!(
            r,
            Recovery::Recovered {
                gen: 2,
                size: 2 << 20,
                undone: 0
            }
        );
        assert_eq!(f.content(), want);
        // Again: the same state (idempotent).
        recover(&f.lanes, f.fd(), OWNER).unwrap();
        assert_eq!(f.content(), want);
        // Crash in the middle of the apply: replaying is harmless.
        let f = files("halfway", &before);
        commit(&base, &f.lanes, || 0o600, None, &mut None).unwrap();
        commit(&u, &f.lanes, || 0o600, None, &mut None).unwrap();
        sys::pwrite_all(f.fd(), b"hel", 4096).unwrap();
        recover(&f.lanes, f.fd(), OWNER).unwrap();
        assert_eq!(f.content(), want);
        // A record torn while it was written: the previous sync's stands,
        // and the size the file had then is given back.
        let bytes = u.encode(REDO);
        for cut in [1, HEADER - 1, HEADER + 10, bytes.len() - 1] {
            let f = files("torn", &before);
            commit(&base, &f.lanes, || 0o600, None, &mut None).unwrap();
            sys::ftruncate(f.fd(), 3 << 20).unwrap(); // grown since
            let lane = open_lane(&f.lanes[0], Some(0o600)).unwrap();
            sys::pwrite_all(lane.as_raw_fd(), &bytes[..cut], 0).unwrap();
            let r = recover(&f.lanes, f.fd(), OWNER).unwrap();
            assert_eq!(
                r,
                Recovery::Recovered {
                    gen: 1,
                    size: 8192,
                    undone: 0
                },
                "cut {cut}"
            );
            assert_eq!(f.content(), before, "cut {cut}");
        }
        // No lanes at all.
        let f = files("none", &before);
        assert_eq!(recover(&f.lanes, f.fd(), OWNER).unwrap(), Recovery::NoLog);
    }

    #[test]
    fn bytes_a_shrink_took_away_come_back_and_a_closed_log_is_left_alone() {
        let before: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let f = files("undo", &before);
        let base = Unit::new(4, before.len() as u64, OWNER);
        commit(&base, &f.lanes, || 0o600, None, &mut None).unwrap();
        // Shrink to 15000, then to 5000: each saves what it takes of the
        // synced bytes.
        let mut at = undo_start(base.len());
        for (from, to) in [(15_000u64, 20_000u64), (5_000, 15_000)] {
            let mut u = Unit::new(4, before.len() as u64, OWNER);
            u.add(from, &before[from as usize..to as usize]);
            at = save_undo(&u, &f.lanes, at).unwrap();
            sys::ftruncate(f.fd(), from).unwrap();
        }
        sys::ftruncate(f.fd(), 30_000).unwrap();
        sys::pwrite_all(f.fd(), b"junk", 6_000).unwrap();
        let r = recover(&f.lanes, f.fd(), OWNER).unwrap();
        assert_eq!(
            r,
            Recovery::Recovered {
                gen: 4,
                size: 20_000,
                undone: 2
            }
        );
        assert_eq!(f.content(), before);
        // Closed: nothing replayed, nothing undone.
        close(4, OWNER, &f.lanes, at).unwrap();
        sys::pwrite_all(f.fd(), b"outside", 0).unwrap();
        assert_eq!(
            recover(&f.lanes, f.fd(), OWNER).unwrap(),
            Recovery::Closed { gen: 4 }
        );
        assert_eq!(&f.content()[..7], b"outside");
        // replay() finds only the generation asked for.
        assert!(!replay(5, OWNER, &f.lanes, f.fd()).unwrap());
        assert!(!replay(4, OWNER + 1, &f.lanes, f.fd()).unwrap());
        assert!(replay(4, OWNER, &f.lanes, f.fd()).unwrap());
        // Another file's records (deleted and replaced): not this one's.
        assert_eq!(
            recover(&f.lanes, f.fd(), OWNER + 1).unwrap(),
            Recovery::NoLog
        );
        remove(&f.lanes);
        assert_eq!(recover(&f.lanes, f.fd(), OWNER).unwrap(), Recovery::NoLog);
    }

    #[test]
    fn applies_lost_with_the_page_cache_are_replayed_from_the_records_before() {
        // Syncs 2 to LANES committed and applied, but only sync 1's state
        // is durable in the file (the applies are made durable once every
        // LANES syncs): the chain of records rebuilds the newest sync.
        let s1 = vec![b'1'; 9000];
        let f = files("chain", &s1);
        commit(
            &Unit::new(1, 9000, OWNER),
            &f.lanes,
            || 0o600,
            None,
            &mut None,
        )
        .unwrap();
        let mut want = s1.clone();
        want.resize(12_000, 0);
        let newest = LANES as u64;
        for g in 2..=newest {
            let mut u = Unit::new(g, 12_000, OWNER);
            let (at, text) = (100 * g as usize, format!("sync{g}"));
            u.add(at as u64, text.as_bytes());
            want[at..at + 5].copy_from_slice(text.as_bytes());
            if g == 2 {
                u.add(9500, b"grown");
                want[9500..9505].copy_from_slice(b"grown");
            }
            commit(&u, &f.lanes, || 0o600, None, &mut None).unwrap();
        }
        // The file lost every apply but for a torn piece of the last.
        sys::pwrite_all(f.fd(), b"syn", 100 * newest).unwrap();
        let r = recover(&f.lanes, f.fd(), OWNER).unwrap();
        assert_eq!(
            r,
            Recovery::Recovered {
                gen: newest,
                size: 12_000,
                undone: 0
            }
        );
        assert_eq!(f.content(), want);
        // A period starts with a gap in the generations: records of an
        // earlier one are not replayed over what changed in between.
        let e = files("gap", &s1);
        let mut old = Unit::new(1, 9000, OWNER);
        old.add(0, b"old");
        commit(&old, &e.lanes, || 0o600, None, &mut None).unwrap();
        sys::pwrite_all(e.fd(), b"new", 0).unwrap();
        commit(
            &Unit::new(3, 9000, OWNER),
            &e.lanes,
            || 0o600,
            None,
            &mut None,
        )
        .unwrap();
        recover(&e.lanes, e.fd(), OWNER).unwrap();
        assert_eq!(&e.content()[..3], b"new");
        // A record's low: the bytes beyond it are zeros but its spans.
        let g = files("low", &s1);
        commit(
            &Unit::new(1, 9000, OWNER),
            &g.lanes,
            || 0o600,
            None,
            &mut None,
        )
        .unwrap();
        let mut u = Unit::new(2, 9000, OWNER);
        u.set_low(4000);
        u.add(5000, b"kept");
        commit(&u, &g.lanes, || 0o600, None, &mut None).unwrap();
        recover(&g.lanes, g.fd(), OWNER).unwrap();
        let c = g.content();
        assert_eq!(c.len(), 9000);
        assert_eq!(&c[..4000], &s1[..4000]);
        assert!(c[4000..5000].iter().all(|&b| b == 0));
        assert_eq!(&c[5000..5004], b"kept");
    }

    #[test]
    fn the_crash_budget_tears_a_record_line_by_line() {
        let f = files("budget", &[0u8; 100]);
        let u = unit(3);
        let lane = open_lane(&f.lanes[1], Some(0o600)).unwrap();
        let bytes = u.encode(REDO);
        let mut budget = Some(bytes.len().div_ceil(crate::persist::LINE) as u64);
        write_durably(lane.as_raw_fd(), &bytes, 0, &mut budget).unwrap();
        assert_eq!(budget, Some(0));
        assert_eq!(read_record(lane.as_raw_fd(), 0).unwrap().unwrap().gen, 3);
    }
}
