//! The shadow's side of failure-atomic sync (`DAXSHIM_ATOMIC`,
//! docs/ARCHITECTURE.md "Failure-atomic sync"): where the log's period
//! stands (in the header, shared by every attached process, changed under
//! the io lock), starting a period, recovery when nobody is attached, the
//! closing record at the last detach. The log's format is
//! [`crate::persist::redo`].

use super::header::Header;
use super::Shadow;
use crate::persist::redo::{self, Recovery, Unit};
use crate::sys::{self, SysResult};
use std::sync::atomic::{AtomicBool, Ordering};

/// This process attached a failure-atomic file (`open` with `O_TRUNC`
/// must then truncate through the shim).
pub static SEEN: AtomicBool = AtomicBool::new(false);

/// Where the log stands (a copy of the header's fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    /// The last committed sync.
    pub gen: u64,
    /// The last sync fully applied to the backing.
    pub applied: u64,
    /// The file's size as of `gen`.
    pub size: u64,
    /// The lowest size the file had since (bytes below `size` a shrink took
    /// are in undo records).
    pub low: u64,
    /// Where the next undo record goes in `gen`'s lane.
    pub undo_at: u64,
    /// The last sync whose apply is known durable.
    pub durable: u64,
}

impl Period {
    /// Has anything changed since the last sync besides the lines a sync
    /// compares (a size change)?
    pub fn size_changed(&self, now: u64) -> bool {
        now != self.size || self.low < self.size
    }
}

pub(super) fn period_of(h: &Header) -> Period {
    Period {
        gen: h.log_gen.load(Ordering::Acquire),
        applied: h.log_applied.load(Ordering::Acquire),
        size: h.log_size.load(Ordering::Acquire),
        low: h.log_low.load(Ordering::Acquire),
        undo_at: h.log_undo_at.load(Ordering::Acquire),
        durable: h.log_durable.load(Ordering::Acquire),
    }
}

fn set_period(h: &Header, p: &Period) {
    h.log_size.store(p.size, Ordering::Release);
    h.log_low.store(p.low, Ordering::Release);
    h.log_undo_at.store(p.undo_at, Ordering::Release);
    h.log_durable.store(p.durable, Ordering::Release);
    h.log_applied.store(p.applied, Ordering::Release);
    h.log_gen.store(p.gen, Ordering::Release);
}

/// The owner word of this file's records (its identity, from the header).
fn owner(h: &Header) -> u64 {
    redo::owner_of(
        h.dev.load(Ordering::Relaxed),
        h.ino.load(Ordering::Relaxed),
        h.gen_sec.load(Ordering::Relaxed),
        h.gen_nsec.load(Ordering::Relaxed),
    )
}

fn cstring(p: &str) -> SysResult<std::ffi::CString> {
    std::ffi::CString::new(p).map_err(|_| sys::Errno(libc::EINVAL))
}

/// A new period after generation `last` (the newest the lanes hold): an
/// empty redo record that says the file's size now (what a crash before the
/// next sync goes back to), durable before the header says the file is
/// atomic. Its generation leaves a gap, so that recovery never replays a
/// record of an earlier period over what changed outside the shim since.
fn start_period(
    h: &Header,
    path: &str,
    lanes: &redo::Lanes,
    last: u64,
    backing_fd: i32,
) -> SysResult<()> {
    let gen = last + 2;
    // The state the period starts from is durable before records build on
    // it (writes of processes not in atomic mode may still be in the page
    // cache).
    sys::fdatasync(backing_fd)?;
    let size = sys::file_size(backing_fd)?;
    let base = Unit::new(gen, size, owner(h));
    let mode = redo::lane_mode(backing_fd);
    redo::make_first_lane(lanes, mode)?;
    redo::commit(&base, lanes, || mode, None, &mut None)?;
    set_period(
        h,
        &Period {
            gen,
            applied: gen,
            size,
            low: size,
            undo_at: redo::undo_start(base.len()),
            durable: gen,
        },
    );
    h.set_log_path(path);
    h.atomic.store(1, Ordering::Release);
    SEEN.store(true, Ordering::Relaxed);
    Ok(())
}

/// Under the attach lock, nobody attached (`path`: the backing's): the file
/// is brought back to its last committed sync if a log says so; then, if
/// `atomic`, a new period starts, else the log goes (the file leaves atomic
/// mode). Returns what recovery did.
pub(super) fn recover_unattached(
    h: &Header,
    path: &str,
    backing_fd: i32,
    atomic: bool,
) -> SysResult<Recovery> {
    h.atomic.store(0, Ordering::Release);
    let Some(lanes) = redo::lane_paths(path) else {
        return Ok(Recovery::NoLog);
    };
    let r = redo::recover(&lanes, backing_fd, owner(h))?;
    if let Recovery::Recovered { gen, undone, .. } = r {
        crate::stats::add(&crate::stats::STATS.atomic_recoveries, 1);
        info!("{path}: recovered to its last atomic sync (#{gen}; {undone} undo record(s))");
    }
    let last = match r {
        Recovery::NoLog => 0,
        Recovery::Closed { gen } | Recovery::Recovered { gen, .. } => gen,
    };
    if atomic {
        start_period(h, path, &lanes, last, backing_fd)?;
    } else if last != 0 {
        redo::remove(&lanes);
    }
    Ok(r)
}

/// Under the attach lock, other processes attached without atomic mode:
/// it starts now, after any generation the lanes hold (nothing is replayed
/// under live processes).
pub(super) fn start_attached(h: &Header, path: &str, backing_fd: i32) -> SysResult<()> {
    let lanes = redo::lane_paths(path).ok_or(sys::Errno(libc::EINVAL))?;
    let last = redo::newest(&lanes, owner(h))?.map_or(0, |(r, _)| r.gen);
    start_period(h, path, &lanes, last, backing_fd)
}

/// At the last detach with everything synced: the log needs no replay once
/// the file is durable.
pub(super) fn close(h: &Header, backing_fd: i32) {
    let p = period_of(h);
    let path = h.log_path();
    if p.applied != p.gen || p.gen == 0 {
        return; // a committed sync not applied: the next attacher replays it
    }
    if p.durable < p.applied && sys::fdatasync(backing_fd).is_err() {
        return; // the next attacher replays what may not be durable
    }
    if let Some(lanes) = redo::lane_paths(&path) {
        if let Err(e) = redo::close(p.gen, owner(h), &lanes, p.undo_at) {
            debug!("{path}: cannot close the atomic log: {e}");
        }
    }
}

impl Shadow {
    /// Is the file in failure-atomic mode? One load.
    pub fn is_atomic(&self) -> bool {
        self.header().atomic.load(Ordering::Acquire) != 0
    }

    /// Where the log stands. Call with the io lock held.
    pub fn log_period(&self) -> Period {
        period_of(self.header())
    }

    /// Records a change of the period. Call with the io lock held.
    pub fn set_log_period(&self, p: &Period) {
        set_period(self.header(), p)
    }

    /// A process is about to map the data file.
    pub fn note_mapped(&self) {
        self.header().ever_mapped.store(1, Ordering::Release);
    }

    /// After a failure-atomic sync: the pages of `ranges` equal the backing
    /// now; with no mapping of the data ever made and holes meaning the
    /// backing's bytes, they go (reads then have nothing to patch, and the
    /// shadow holds only unsynced writes). Call with the io and fill locks
    /// held.
    pub fn punch_synced(&self, data_fd: i32, ranges: &crate::ranges::RangeSet) {
        let h = self.header();
        if !self.is_lazy() || self.no_evict() || h.ever_mapped.load(Ordering::Acquire) != 0 {
            return;
        }
        for (a, b) in ranges.iter() {
            let (a, b) = (sys::page_up(a as usize) as u64, b - b % sys::PAGE as u64);
            if a < b {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let _ = sys::fallocate(data_fd, mode, a, b - a);
            }
        }
    }

    /// The owner word of this file's records.
    pub fn log_owner(&self) -> u64 {
        owner(self.header())
    }

    /// Where the log stands, after applying a committed sync that was not
    /// (its process died in the middle, or its apply failed). Call with the
    /// io lock held.
    pub fn settle_log(&self, lanes: &redo::Lanes, backing_fd: i32) -> SysResult<Period> {
        let mut p = self.log_period();
        if p.applied < p.gen {
            redo::replay(p.gen, self.log_owner(), lanes, backing_fd)?;
            p.applied = p.gen;
            p.durable = p.gen;
            self.set_log_period(&p);
        }
        Ok(p)
    }

    /// Keys of the lanes this process keeps open.
    pub fn lane_keys(&self) -> redo::LaneKeys {
        self.lane_keys
    }

    /// The log's lanes. Call with the io lock held.
    pub fn log_lanes(&self) -> Option<redo::Lanes> {
        redo::lane_paths(&self.header().log_path())
    }

    /// Flushes the file behind `backing_fd` unless every sync's apply is
    /// durable already; then no record needs replaying. Call with the io
    /// lock held.
    pub fn make_applies_durable(&self, backing_fd: i32) -> SysResult<()> {
        let h = self.header();
        let mut p = period_of(h);
        if p.durable < p.applied {
            sys::fdatasync(backing_fd)?;
            p.durable = p.applied;
            set_period(h, &p);
        }
        Ok(())
    }

    /// The file was renamed to `new` (by this process): its lanes follow,
    /// the newest first. The file behind `backing_fd` is flushed first
    /// unless every apply is durable, so that a crash in between needs only
    /// the newest record, which is then beside the file (without a
    /// descriptor, the lanes move all the same). Call with the io lock
    /// held.
    pub fn move_log(&self, new: &str, backing_fd: Option<i32>) -> SysResult<()> {
        let h = self.header();
        let old = h.log_path();
        if old == new {
            return Ok(());
        }
        let (Some(from), Some(to)) = (redo::lane_paths(&old), redo::lane_paths(new)) else {
            return Ok(());
        };
        if let Some(fd) = backing_fd {
            self.make_applies_durable(fd)?;
        }
        let p = period_of(h);
        // Lane 0 first, as an empty placeholder if need be (replaced by its
        // rename below): the new name's log is found by lane 0 alone.
        let _ = redo::make_first_lane(&to, backing_fd.map_or(0o600, redo::lane_mode));
        for back in 0..redo::LANES as u64 {
            let k = redo::lane_of(p.gen + redo::LANES as u64 - back);
            match sys::rename(&cstring(&from[k])?, &cstring(&to[k])?) {
                Ok(()) | Err(sys::Errno(libc::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
        h.set_log_path(new);
        Ok(())
    }
}
