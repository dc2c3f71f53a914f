//! Per-process counters, written as one JSON object at exit when
//! `DAXSHIM_STATS` is set.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Sync latency histogram: bucket k counts syncs that took [2^k, 2^(k+1)) ns.
pub const HIST_BUCKETS: usize = 40;

pub struct Stats {
    pub mappings_shadowed: AtomicU64,
    pub mappings_direct: AtomicU64,
    pub pages_dirtied: AtomicU64,
    pub lines_compared: AtomicU64,
    pub lines_written: AtomicU64,
    pub bytes_flushed: AtomicU64,
    pub bytes_streamed: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_ns: AtomicU64,
    pub shadows_created: AtomicU64,
    pub reconciles: AtomicU64,
    pub fallbacks_direct: AtomicU64,
    pub lazy_faults: AtomicU64,
    pub lazy_filled_bytes: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Lines changed outside the shim, taken into a shadow.
    pub foreign_writes: AtomicU64,
    /// Lines changed both outside and inside the shim between two syncs.
    pub conflicts: AtomicU64,
    /// First stores to a write-trapped page (mprotect tracker) or region
    /// (region traps) since its last harvest.
    pub store_traps: AtomicU64,
    /// Failure-atomic syncs committed, and the bytes their redo records took.
    pub atomic_syncs: AtomicU64,
    pub bytes_logged: AtomicU64,
    /// Interrupted failure-atomic syncs finished or undone at an attach.
    pub atomic_recoveries: AtomicU64,
    pub sync_hist: [AtomicU64; HIST_BUCKETS],
}

impl Stats {
    pub const fn new() -> Stats {
        Stats {
            mappings_shadowed: AtomicU64::new(0),
            mappings_direct: AtomicU64::new(0),
            pages_dirtied: AtomicU64::new(0),
            lines_compared: AtomicU64::new(0),
            lines_written: AtomicU64::new(0),
            bytes_flushed: AtomicU64::new(0),
            bytes_streamed: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_ns: AtomicU64::new(0),
            shadows_created: AtomicU64::new(0),
            reconciles: AtomicU64::new(0),
            fallbacks_direct: AtomicU64::new(0),
            lazy_faults: AtomicU64::new(0),
            lazy_filled_bytes: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            foreign_writes: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            store_traps: AtomicU64::new(0),
            atomic_syncs: AtomicU64::new(0),
            bytes_logged: AtomicU64::new(0),
            atomic_recoveries: AtomicU64::new(0),
            sync_hist: [const { AtomicU64::new(0) }; HIST_BUCKETS],
        }
    }
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::new()
    }
}

pub static STATS: Stats = Stats::new();

/// Counts one sync of `ns` nanoseconds.
pub fn record_sync(ns: u64) {
    add(&STATS.syncs, 1);
    add(&STATS.sync_ns, ns);
    let k = (63 - ns.max(1).leading_zeros() as usize).min(HIST_BUCKETS - 1);
    add(&STATS.sync_hist[k], 1);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl Stats {
    pub fn to_json(&self, tracker: &str, flush: &str) -> String {
        let fields: [(&str, &AtomicU64); 21] = [
            ("mappings_shadowed", &self.mappings_shadowed),
            ("mappings_direct", &self.mappings_direct),
            ("pages_dirtied", &self.pages_dirtied),
            ("lines_compared", &self.lines_compared),
            ("lines_written", &self.lines_written),
            ("bytes_flushed", &self.bytes_flushed),
            ("bytes_streamed", &self.bytes_streamed),
            ("syncs", &self.syncs),
            ("sync_ns", &self.sync_ns),
            ("shadows_created", &self.shadows_created),
            ("reconciles", &self.reconciles),
            ("fallbacks_direct", &self.fallbacks_direct),
            ("lazy_faults", &self.lazy_faults),
            ("lazy_filled_bytes", &self.lazy_filled_bytes),
            ("evicted_bytes", &self.evicted_bytes),
            ("foreign_writes", &self.foreign_writes),
            ("conflicts", &self.conflicts),
            ("store_traps", &self.store_traps),
            ("atomic_syncs", &self.atomic_syncs),
            ("bytes_logged", &self.bytes_logged),
            ("atomic_recoveries", &self.atomic_recoveries),
        ];
        let mut s = String::from("{");
        s.push_str(&format!("\"pid\":{},", crate::sys::getpid()));
        s.push_str(&format!("\"tracker\":\"{tracker}\",\"flush\":\"{flush}\""));
        for (k, v) in fields {
            s.push_str(&format!(",\"{k}\":{}", v.load(Relaxed)));
        }
        let hist: Vec<String> = self
            .sync_hist
            .iter()
            .map(|b| b.load(Relaxed).to_string())
            .collect();
        s.push_str(&format!(",\"sync_hist_log2_ns\":[{}]", hist.join(",")));
        s.push_str("}\n");
        s
    }
}

/// Expands `%p` in a stats path to the pid.
pub fn expand_path(pattern: &str, pid: i32) -> String {
    pattern.replace("%p", &pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_required_keys() {
        let s = Stats::default();
        s.lines_written.store(7, Relaxed);
        let j = s.to_json("uffd", "clwb");
        for k in [
            "mappings_shadowed",
            "mappings_direct",
            "pages_dirtied",
            "lines_compared",
            "lines_written\":7",
            "bytes_flushed",
            "syncs",
            "sync_ns",
        ] {
            assert!(j.contains(k), "{k} missing in {j}");
        }
        assert!(j.starts_with('{') && j.trim_end().ends_with('}'));
    }

    #[test]
    fn histogram_buckets_are_log2_ns() {
        let s = Stats::default();
        for (ns, k) in [(1u64, 0usize), (1000, 9), (1024, 10), (1_000_000, 19)] {
            let b = (63 - ns.max(1).leading_zeros() as usize).min(HIST_BUCKETS - 1);
            assert_eq!(b, k, "{ns}");
            s.sync_hist[b].fetch_add(1, Relaxed);
        }
        assert!(s
            .to_json("uffd", "clwb")
            .contains("\"sync_hist_log2_ns\":[1,0,0,0,0,0,0,0,0,1,1,"));
    }

    #[test]
    fn pid_expansion() {
        assert_eq!(expand_path("/tmp/s-%p.json", 42), "/tmp/s-42.json");
        assert_eq!(expand_path("/tmp/s.json", 42), "/tmp/s.json");
    }
}
