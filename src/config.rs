//! `DAXSHIM_*` environment variables, parsed once at load time into an
//! immutable [`Config`]. Parsing is pure (it takes a lookup function and a
//! directory resolver) so it is unit-tested without touching the environment.

use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

/// A process-wide opt-in by directory (`DAXSHIM_DAX`, `DAXSHIM_ATOMIC`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptIn {
    /// Off (for `DAXSHIM_DAX`: only per-mapping flags give direct mappings).
    Off,
    /// `=1`: every pmem file of this process.
    All,
    /// `=DIR[:DIR…]`: pmem files under these directories.
    Dirs(Vec<PathBuf>),
}

impl OptIn {
    /// Does the opt-in cover the file at `path` (canonical)?
    pub fn covers(&self, path: &str) -> bool {
        match self {
            OptIn::Off => false,
            OptIn::All => true,
            OptIn::Dirs(dirs) => dirs.iter().any(|d| Path::new(path).starts_with(d)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// userfaultfd write-protect where the kernel has it, else full compare.
    Auto,
    Uffd,
    /// Write-protect clean pages, record the first store from SIGSEGV.
    Mprotect,
    /// Compare every line of the file at each sync: the correctness oracle.
    Compare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushChoice {
    Auto,
    Clwb,
    Clflushopt,
    Clflush,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub pmem_dirs: Vec<PathBuf>,
    pub dax: OptIn,
    /// `DAXSHIM_ATOMIC`: failure-atomic sync for these files.
    pub atomic: OptIn,
    pub shadow_dir: PathBuf,
    pub log: LogLevel,
    pub stats: Option<String>,
    pub tracker: TrackerKind,
    pub flush: FlushChoice,
    /// `DAXSHIM_WRITEBACK=stores`: emulated pmem too is written back with
    /// stores and cache flushes through a mapping, as real pmem is.
    pub writeback_stores: bool,
    /// Populate shadows on first access (userfaultfd) instead of copying
    /// the file when it is first mapped.
    pub lazy: bool,
    /// `DAXSHIM_LAZY=auto`: shared lazy mappings' faults are served in the
    /// faulting thread where the kernel allows it; `thread`: by the fault
    /// thread.
    pub lazy_in_thread: bool,
    /// Clean shadow pages this process filled lazily are evicted beyond
    /// this many bytes (`DAXSHIM_CACHE_MAX`); `None`: no limit.
    pub cache_max: Option<u64>,
    /// Shadow mappings of at least this many bytes have their 2 MiB regions
    /// trapped so that a sync scans only regions stored to
    /// (`DAXSHIM_TRAP_MIN`); `None`: never.
    pub trap_min: Option<u64>,
    /// `DAXSHIM_SYSCALLS=trap`: Syscall User Dispatch routes the system
    /// calls `LD_PRELOAD` cannot see ([`crate::sud`]).
    pub trap_syscalls: bool,
    /// `DAXSHIM_FALLBACK=direct`: a real DAX file whose shadow cannot be
    /// made is mapped directly (DAX semantics) instead of failing the call.
    pub fallback_direct: bool,
    /// Testing only: die after writing this many cachelines.
    pub crash_after_lines: Option<u64>,
    /// Testing only: this many writebacks fail with EIO before copying.
    pub fail_syncs: u64,
}

/// A configuration error: the variable and what it expected.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid {}={:?}: expected {}",
            self.var, self.value, self.expected
        )
    }
}

/// Every variable the shim reads. Other `DAXSHIM_*` names draw a warning.
pub const KNOWN_VARS: &[&str] = &[
    "DAXSHIM_PMEM",
    "DAXSHIM_DAX",
    "DAXSHIM_ATOMIC",
    "DAXSHIM_SHADOW_DIR",
    "DAXSHIM_LOG",
    "DAXSHIM_STATS",
    "DAXSHIM_TRACKER",
    "DAXSHIM_FLUSH",
    "DAXSHIM_WRITEBACK",
    "DAXSHIM_LAZY",
    "DAXSHIM_CACHE_MAX",
    "DAXSHIM_TRAP_MIN",
    "DAXSHIM_SYSCALLS",
    "DAXSHIM_FALLBACK",
    "DAXSHIM_DEBUG_CRASH_AFTER_LINES",
    "DAXSHIM_DEBUG_FAIL_SYNCS",
];

const DIRS_EXPECTED: &str = "absolute paths of existing directories separated by ':'";

/// Parses the configuration. `get` looks a variable up; `resolve_dir`
/// canonicalises an existing directory (None if it is not one).
pub fn parse(
    get: impl Fn(&str) -> Option<String>,
    resolve_dir: impl Fn(&Path) -> Option<PathBuf>,
    uid: u32,
) -> Result<Config, ConfigError> {
    let err = |var: &'static str, value: &str, expected: &'static str| ConfigError {
        var,
        value: value.to_string(),
        expected,
    };
    let dir_list = |var: &'static str, value: &str| -> Result<Vec<PathBuf>, ConfigError> {
        let mut out = Vec::new();
        for part in value.split(':') {
            let p = Path::new(part);
            if part.is_empty() || !p.is_absolute() {
                return Err(err(var, value, DIRS_EXPECTED));
            }
            match resolve_dir(p) {
                Some(c) => out.push(c),
                None => return Err(err(var, value, DIRS_EXPECTED)),
            }
        }
        Ok(out)
    };

    let pmem_dirs = match get("DAXSHIM_PMEM") {
        None => Vec::new(),
        Some(v) if v.is_empty() => Vec::new(),
        Some(v) => dir_list("DAXSHIM_PMEM", &v)?,
    };

    let dax = match get("DAXSHIM_DAX").as_deref() {
        None | Some("") | Some("0") => OptIn::Off,
        Some("1") => OptIn::All,
        Some(v) if v.starts_with('/') => OptIn::Dirs(dir_list("DAXSHIM_DAX", v)?),
        Some(v) => {
            return Err(err(
                "DAXSHIM_DAX",
                v,
                "1, 0 or absolute paths of existing directories separated by ':'",
            ))
        }
    };

    let atomic = match get("DAXSHIM_ATOMIC").as_deref() {
        None | Some("") | Some("0") => OptIn::Off,
        Some("1") => OptIn::All,
        Some(v) if v.starts_with('/') => OptIn::Dirs(dir_list("DAXSHIM_ATOMIC", v)?),
        Some(v) => {
            return Err(err(
                "DAXSHIM_ATOMIC",
                v,
                "1, 0 or absolute paths of existing directories separated by ':'",
            ))
        }
    };

    let shadow_dir = match get("DAXSHIM_SHADOW_DIR") {
        None => PathBuf::from(format!("/dev/shm/daxshim-{uid}")),
        Some(v) if v.starts_with('/') && v.len() > 1 => PathBuf::from(v),
        Some(v) => return Err(err("DAXSHIM_SHADOW_DIR", &v, "an absolute path")),
    };

    let log = match get("DAXSHIM_LOG").as_deref() {
        None | Some("") => LogLevel::Warn,
        Some("error") => LogLevel::Error,
        Some("warn") => LogLevel::Warn,
        Some("info") => LogLevel::Info,
        Some("debug") => LogLevel::Debug,
        Some(v) => return Err(err("DAXSHIM_LOG", v, "one of error, warn, info, debug")),
    };

    let stats = match get("DAXSHIM_STATS") {
        None => None,
        Some(v) if v.is_empty() => return Err(err("DAXSHIM_STATS", &v, "a file path")),
        Some(v) => Some(v),
    };

    let tracker = match get("DAXSHIM_TRACKER").as_deref() {
        None | Some("") | Some("auto") => TrackerKind::Auto,
        Some("uffd") => TrackerKind::Uffd,
        Some("mprotect") => TrackerKind::Mprotect,
        Some("compare") => TrackerKind::Compare,
        Some(v) => {
            return Err(err(
                "DAXSHIM_TRACKER",
                v,
                "one of auto, uffd, mprotect, compare",
            ))
        }
    };

    let flush = match get("DAXSHIM_FLUSH").as_deref() {
        None | Some("") | Some("auto") => FlushChoice::Auto,
        Some("clwb") => FlushChoice::Clwb,
        Some("clflushopt") => FlushChoice::Clflushopt,
        Some("clflush") => FlushChoice::Clflush,
        Some(v) => {
            return Err(err(
                "DAXSHIM_FLUSH",
                v,
                "one of auto, clwb, clflushopt, clflush",
            ))
        }
    };

    let writeback_stores = match get("DAXSHIM_WRITEBACK").as_deref() {
        None | Some("") | Some("auto") => false,
        Some("stores") => true,
        Some(v) => return Err(err("DAXSHIM_WRITEBACK", v, "auto or stores")),
    };

    let (lazy, lazy_in_thread) = match get("DAXSHIM_LAZY").as_deref() {
        None | Some("") | Some("auto") => (true, true),
        Some("thread") => (true, false),
        Some("off") => (false, false),
        Some(v) => return Err(err("DAXSHIM_LAZY", v, "auto, thread or off")),
    };

    let cache_max =
        match get("DAXSHIM_CACHE_MAX") {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => match parse_size(&v) {
                Some(n) if n >= MIN_CACHE => Some(n),
                _ => return Err(err(
                    "DAXSHIM_CACHE_MAX",
                    &v,
                    "a size of at least 1M: bytes, or a number with K, M, G or T (powers of 1024)",
                )),
            },
        };

    let trap_min = match get("DAXSHIM_TRAP_MIN").as_deref() {
        None | Some("") => Some(DEFAULT_TRAP_MIN),
        Some("off") => None,
        Some(v) => match parse_size(v) {
            Some(n) => Some(n),
            None => {
                return Err(err(
                    "DAXSHIM_TRAP_MIN",
                    v,
                    "off, or a size: bytes, or a number with K, M, G or T (powers of 1024)",
                ))
            }
        },
    };

    let trap_syscalls = match get("DAXSHIM_SYSCALLS").as_deref() {
        None | Some("") | Some("off") => false,
        Some("trap") => true,
        Some(v) => return Err(err("DAXSHIM_SYSCALLS", v, "trap or off")),
    };

    let fallback_direct = match get("DAXSHIM_FALLBACK").as_deref() {
        None | Some("") | Some("fail") => false,
        Some("direct") => true,
        Some(v) => return Err(err("DAXSHIM_FALLBACK", v, "fail or direct")),
    };

    let crash_after_lines = match get("DAXSHIM_DEBUG_CRASH_AFTER_LINES") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return Err(err(
                    "DAXSHIM_DEBUG_CRASH_AFTER_LINES",
                    &v,
                    "a non-negative integer",
                ))
            }
        },
    };

    let fail_syncs = match get("DAXSHIM_DEBUG_FAIL_SYNCS") {
        None => 0,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| err("DAXSHIM_DEBUG_FAIL_SYNCS", &v, "a non-negative integer"))?,
    };

    Ok(Config {
        pmem_dirs,
        dax,
        atomic,
        shadow_dir,
        log,
        stats,
        tracker,
        flush,
        writeback_stores,
        lazy,
        lazy_in_thread,
        cache_max,
        trap_min,
        trap_syscalls,
        fallback_direct,
        crash_after_lines,
        fail_syncs,
    })
}

/// Mappings below this are scanned whole at a sync: a scan of the touched
/// pages (~0.26 ms per GiB) costs less there than trapping (a SIGSEGV and
/// two `mprotect` per region stored to between syncs).
pub const DEFAULT_TRAP_MIN: u64 = 256 << 20;

/// The smallest cache limit: a few fill chunks.
const MIN_CACHE: u64 = 1 << 20;

/// `123`, `64K`, `512M`, `2G`, `1T` (binary multiples; `KiB`/`MB`… spellings
/// too). None for anything else or on overflow.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    if digits == 0 {
        return None;
    }
    let n: u64 = v[..digits].parse().ok()?;
    let shift = match v[digits..].to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Names of set `DAXSHIM_*` variables the shim does not know (likely typos).
pub fn unknown_vars(names: impl Iterator<Item = String>) -> Vec<String> {
    names
        .filter(|n| n.starts_with("DAXSHIM_") && !KNOWN_VARS.contains(&n.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_map(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(
            |k| m.get(k).cloned(),
            |p| {
                if p.starts_with("/exists") {
                    Some(PathBuf::from("/real").join(p.strip_prefix("/").unwrap()))
                } else {
                    None
                }
            },
            1000,
        )
    }

    #[test]
    fn defaults() {
        let c = parse_map(&[]).unwrap();
        assert!(c.pmem_dirs.is_empty());
        assert_eq!(c.dax, OptIn::Off);
        assert_eq!(c.shadow_dir, PathBuf::from("/dev/shm/daxshim-1000"));
        assert_eq!(c.log, LogLevel::Warn);
        assert_eq!(c.tracker, TrackerKind::Auto);
        assert_eq!(c.flush, FlushChoice::Auto);
        assert!(c.stats.is_none());
        assert!(!c.trap_syscalls);
        assert!(
            parse_map(&[("DAXSHIM_SYSCALLS", "trap")])
                .unwrap()
                .trap_syscalls
        );
        assert!(
            !parse_map(&[("DAXSHIM_SYSCALLS", "off")])
                .unwrap()
                .trap_syscalls
        );
    }

    #[test]
    fn pmem_dirs_are_resolved() {
        let c = parse_map(&[("DAXSHIM_PMEM", "/exists/a:/exists/b")]).unwrap();
        assert_eq!(
            c.pmem_dirs,
            vec![
                PathBuf::from("/real/exists/a"),
                PathBuf::from("/real/exists/b")
            ]
        );
    }

    #[test]
    fn pmem_rejects_relative_missing_and_empty_parts() {
        for bad in ["rel", "/missing", "/exists/a::/exists/b", "/exists/a:"] {
            let e = parse_map(&[("DAXSHIM_PMEM", bad)]).unwrap_err();
            assert_eq!(e.var, "DAXSHIM_PMEM", "{bad}");
            assert!(e.to_string().contains("DAXSHIM_PMEM"));
        }
    }

    #[test]
    fn dax_values() {
        assert_eq!(parse_map(&[("DAXSHIM_DAX", "1")]).unwrap().dax, OptIn::All);
        assert_eq!(parse_map(&[("DAXSHIM_DAX", "0")]).unwrap().dax, OptIn::Off);
        assert_eq!(
            parse_map(&[("DAXSHIM_DAX", "/exists/x")]).unwrap().dax,
            OptIn::Dirs(vec![PathBuf::from("/real/exists/x")])
        );
        for bad in ["yes", "2", "/missing", "true"] {
            assert_eq!(
                parse_map(&[("DAXSHIM_DAX", bad)]).unwrap_err().var,
                "DAXSHIM_DAX"
            );
        }
    }

    #[test]
    fn atomic_values() {
        let atomic = |v: &str| parse_map(&[("DAXSHIM_ATOMIC", v)]).map(|c| c.atomic);
        assert_eq!(atomic("1").unwrap(), OptIn::All);
        assert_eq!(atomic("0").unwrap(), OptIn::Off);
        assert_eq!(atomic("").unwrap(), OptIn::Off);
        assert_eq!(parse_map(&[]).unwrap().atomic, OptIn::Off);
        let dirs = atomic("/exists/x").unwrap();
        assert_eq!(dirs, OptIn::Dirs(vec![PathBuf::from("/real/exists/x")]));
        assert!(dirs.covers("/real/exists/x/db"));
        assert!(!dirs.covers("/real/exists/xy/db"));
        assert!(OptIn::All.covers("/any"));
        assert!(!OptIn::Off.covers("/any"));
        for bad in ["yes", "2", "/missing", "on", "relative/dir"] {
            let e = atomic(bad).unwrap_err();
            assert_eq!(e.var, "DAXSHIM_ATOMIC");
            assert!(e.to_string().contains("DAXSHIM_ATOMIC"));
        }
    }

    #[test]
    fn enums_reject_unknown_words() {
        for (var, bad) in [
            ("DAXSHIM_LOG", "verbose"),
            ("DAXSHIM_TRACKER", "mprotectx"),
            ("DAXSHIM_FLUSH", "wbinvd"),
            ("DAXSHIM_SHADOW_DIR", "relative/dir"),
            ("DAXSHIM_STATS", ""),
            ("DAXSHIM_DEBUG_CRASH_AFTER_LINES", "-1"),
            ("DAXSHIM_DEBUG_FAIL_SYNCS", "x"),
            ("DAXSHIM_LAZY", "yes"),
            ("DAXSHIM_WRITEBACK", "pwrite"),
            ("DAXSHIM_CACHE_MAX", "lots"),
            ("DAXSHIM_CACHE_MAX", "512X"),
            ("DAXSHIM_CACHE_MAX", "4096"),
            ("DAXSHIM_CACHE_MAX", "99999999999999T"),
            ("DAXSHIM_SYSCALLS", "on"),
            ("DAXSHIM_FALLBACK", "yes"),
            ("DAXSHIM_TRAP_MIN", "never"),
            ("DAXSHIM_TRAP_MIN", "1.5G"),
        ] {
            let e = parse_map(&[(var, bad)]).unwrap_err();
            assert_eq!(e.var, var);
        }
        assert_eq!(
            parse_map(&[("DAXSHIM_LOG", "debug")]).unwrap().log,
            LogLevel::Debug
        );
        assert_eq!(
            parse_map(&[("DAXSHIM_TRACKER", "compare")])
                .unwrap()
                .tracker,
            TrackerKind::Compare
        );
        assert_eq!(
            parse_map(&[("DAXSHIM_TRACKER", "mprotect")])
                .unwrap()
                .tracker,
            TrackerKind::Mprotect
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        for bad in ["", "M", "-1", "1.5G", "12Q", "99999999999999999999"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        let c = parse_map(&[("DAXSHIM_CACHE_MAX", "512M"), ("DAXSHIM_LAZY", "off")]).unwrap();
        assert_eq!(c.cache_max, Some(512 << 20));
        assert!(!c.lazy);
        let t = parse_map(&[("DAXSHIM_LAZY", "thread")]).unwrap();
        assert!(t.lazy && !t.lazy_in_thread);
        let d = parse_map(&[]).unwrap();
        assert!(d.lazy && d.cache_max.is_none() && !d.writeback_stores);
        assert_eq!(d.trap_min, Some(DEFAULT_TRAP_MIN));
        assert_eq!(
            parse_map(&[("DAXSHIM_TRAP_MIN", "off")]).unwrap().trap_min,
            None
        );
        assert_eq!(
            parse_map(&[("DAXSHIM_TRAP_MIN", "0")]).unwrap().trap_min,
            Some(0)
        );
        assert_eq!(
            parse_map(&[("DAXSHIM_TRAP_MIN", "1G")]).unwrap().trap_min,
            Some(1 << 30)
        );
        assert!(
            parse_map(&[("DAXSHIM_WRITEBACK", "stores")])
                .unwrap()
                .writeback_stores
        );
    }

    #[test]
    fn unknown_variables_are_listed() {
        let names = ["DAXSHIM_PMME", "DAXSHIM_PMEM", "PATH"].map(String::from);
        assert_eq!(unknown_vars(names.into_iter()), vec!["DAXSHIM_PMME"]);
    }
}
