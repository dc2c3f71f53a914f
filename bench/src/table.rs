//! Running a case under each configuration, and its table.

use crate::die;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What every run needs: where the files go, which libraries, how long.
pub struct Ctx {
    pub dir: PathBuf,
    /// The library of the shim configurations.
    pub lib: PathBuf,
    /// An older library, for the `before` configurations.
    pub before: Option<PathBuf>,
    pub quick: bool,
}

/// One measured value of a scale table, for the picture.
pub struct Point {
    pub key: String,
    pub gib: usize,
    pub cfg: String,
    pub v: f64,
}

/// A finished child: its stdout, and if it failed its exit status and
/// stderr.
struct Run {
    out: String,
    failed: Option<(String, String)>,
}

/// Runs `daxshim-bench one CASE SUB [--quick] ARGS...` under `cfg`. A
/// `before…` configuration is its `shim…` namesake on the older library.
fn spawn(case: &str, args: &[String], ctx: &Ctx, cfg: &str) -> Run {
    let exe = std::env::current_exe().unwrap_or_else(|e| die(&e.to_string()));
    let sub = ctx.dir.join(format!("{case}-{cfg}"));
    let _ = std::fs::remove_dir_all(&sub);
    std::fs::create_dir_all(&sub).unwrap_or_else(|e| die(&format!("{}: {e}", sub.display())));
    let shadow = format!("/dev/shm/daxshim-bench-{}", std::process::id());
    let mut c = Command::new(exe);
    c.args(["one", case]).arg(&sub);
    if ctx.quick {
        c.arg("--quick");
    }
    c.args(args);
    let (lib, cfg) = match cfg {
        "before" => (ctx.before.as_deref(), "shim-uffd"),
        "before-256M" => (ctx.before.as_deref(), "shim-256M"),
        _ => (Some(ctx.lib.as_path()), cfg),
    };
    if cfg != "page-cache" {
        let lib = lib.unwrap_or_else(|| die("a before column without --before"));
        c.env("LD_PRELOAD", lib)
            .env("DAXSHIM_PMEM", &sub)
            .env("DAXSHIM_SHADOW_DIR", &shadow)
            .env(
                "DAXSHIM_TRACKER",
                if cfg == "shim-compare" {
                    "compare"
                } else {
                    "auto"
                },
            );
        match cfg {
            // The userfaultfd tracker with the whole file copied at the
            // first mapping, as before lazy shadows.
            "shim-eager" => {
                c.env("DAXSHIM_LAZY", "off");
            }
            "shim-64M" => {
                c.env("DAXSHIM_CACHE_MAX", "64M");
            }
            "shim-256M" => {
                c.env("DAXSHIM_CACHE_MAX", "256M");
            }
            // Emulated pmem written back as real pmem is: stores (non-
            // temporal for long runs) and cache flushes through a mapping.
            "shim-stores" => {
                c.env("DAXSHIM_WRITEBACK", "stores");
            }
            "shim-mprotect" => {
                c.env("DAXSHIM_TRACKER", "mprotect");
            }
            // Syscall User Dispatch on: every system call not made through
            // a hook traps.
            "shim-trap" => {
                c.env("DAXSHIM_SYSCALLS", "trap");
            }
            // Failure-atomic sync: each sync through the redo log.
            "shim-atomic" => {
                c.env("DAXSHIM_ATOMIC", "1");
            }
            _ => {}
        }
    }
    let out = c.output().unwrap_or_else(|e| die(&e.to_string()));
    let _ = std::fs::remove_dir_all(&sub);
    let _ = std::fs::remove_dir_all(&shadow);
    Run {
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        failed: (!out.status.success()).then(|| {
            (
                out.status.to_string(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }),
    }
}

fn run_case(case: &str, ctx: &Ctx, cfg: &str) -> Vec<(String, f64)> {
    let run = spawn(case, &[], ctx, cfg);
    if let Some((_, stderr)) = run.failed {
        die(&format!("{case} {cfg}: {stderr}"));
    }
    parse(&run.out).0
}

/// `key value` lines, and the `# note` lines apart.
fn parse(out: &str) -> (Vec<(String, f64)>, Vec<String>) {
    let mut vals = Vec::new();
    let mut notes = Vec::new();
    for l in out.lines() {
        if let Some(n) = l.strip_prefix("# note ") {
            notes.push(n.to_string());
        } else if let Some((k, v)) = l.split_once(' ') {
            vals.push((k.to_string(), v.parse().unwrap_or(f64::NAN)));
        }
    }
    (vals, notes)
}

pub const CFGS: &[&str] = &[
    "page-cache",
    "shim-uffd",
    "shim-eager",
    "shim-mprotect",
    "shim-compare",
];

pub fn table(
    title: &str,
    unit: &str,
    case: &str,
    ctx: &Ctx,
    cfgs: &[&str],
) -> Vec<Vec<(String, f64)>> {
    let res: Vec<_> = cfgs.iter().map(|c| run_case(case, ctx, c)).collect();
    println!("\n## {title} ({unit})");
    print!("{:<22}", "");
    for c in cfgs {
        print!(" {c:>13}");
    }
    println!();
    for (i, (k, _)) in res[0].iter().enumerate() {
        print!("{k:<22}");
        for r in &res {
            print!(" {:>13.2}", r.get(i).map_or(f64::NAN, |x| x.1));
        }
        println!();
    }
    res
}

/// The median of the values that are numbers (NaN if none is).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A table of a scale case: per size (GiB, passed as the case's argument;
/// `None`: the case has one size of its own), each configuration run
/// `reps` times, the configurations interleaved within each repeat so the
/// machine's drift hits them alike; the median per key. Rows are
/// `key-NGiB`. A run that fails counts as NaN with a note: one crash must
/// not cost the rest of a long run.
pub fn scale_table(
    (title, unit, case): (&str, &str, &str),
    ctx: &Ctx,
    cfgs: &[&str],
    sizes: Option<&[usize]>,
    reps: usize,
) -> Vec<Point> {
    let mut pts = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    // Each note once, with the configurations that printed it.
    let mut notes: Vec<(String, Vec<String>)> = Vec::new();
    for &gib in sizes.unwrap_or(&[0]) {
        let args: Vec<String> = sizes.map(|_| vec![gib.to_string()]).unwrap_or_default();
        let mut runs: Vec<Vec<Vec<(String, f64)>>> = vec![Vec::new(); cfgs.len()];
        for _ in 0..reps {
            for (ci, cfg) in cfgs.iter().enumerate() {
                let run = spawn(case, &args, ctx, cfg);
                let (vals, mut ns) = parse(&run.out);
                if let Some((status, stderr)) = run.failed {
                    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
                    ns.push(format!(
                        "a run failed ({status}): {}",
                        last.unwrap_or("").trim()
                    ));
                }
                for n in ns {
                    let n = if sizes.is_some() && !n.contains("GiB") {
                        format!("{gib} GiB: {n}")
                    } else {
                        n
                    };
                    match notes.iter_mut().find(|(t, _)| *t == n) {
                        Some((_, cs)) if !cs.iter().any(|c| c == cfg) => cs.push(cfg.to_string()),
                        Some(_) => {}
                        None => notes.push((n, vec![cfg.to_string()])),
                    }
                }
                runs[ci].push(vals);
            }
        }
        let mut keys: Vec<String> = Vec::new();
        for (k, _) in runs.iter().flatten().flatten() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        for k in keys {
            for (ci, cfg) in cfgs.iter().enumerate() {
                let v = runs[ci]
                    .iter()
                    .map(|r| r.iter().find(|(kk, _)| *kk == k).map_or(f64::NAN, |x| x.1))
                    .collect();
                pts.push(Point {
                    key: k.clone(),
                    gib,
                    cfg: cfg.to_string(),
                    v: median(v),
                });
            }
            let row = if sizes.is_some() {
                format!("{k}-{gib}GiB")
            } else {
                k
            };
            rows.push(row);
        }
    }
    println!("\n## {title} ({unit}, median of {reps} runs)");
    print!("{:<22}", "");
    for c in cfgs {
        print!(" {c:>13}");
    }
    println!();
    for (i, row) in rows.iter().enumerate() {
        print!("{row:<22}");
        for p in &pts[i * cfgs.len()..(i + 1) * cfgs.len()] {
            print!(" {:>13.2}", p.v);
        }
        println!();
    }
    for (n, cs) in notes {
        println!("# note {n} [{}]", cs.join(", "));
    }
    pts
}

/// The value of `key` at `gib` in configuration `cfg`, NaN if none.
pub fn value(pts: &[Point], key: &str, gib: usize, cfg: &str) -> f64 {
    pts.iter()
        .find(|p| p.key == key && p.gib == gib && p.cfg == cfg)
        .map_or(f64::NAN, |p| p.v)
}

/// `p` made absolute (the children may run elsewhere); dies unless it is
/// a regular file.
pub fn need_file(p: &Path, what: &str) -> PathBuf {
    if !p.is_file() {
        die(&format!("{what}: {} is not a file", p.display()));
    }
    std::fs::canonicalize(p).unwrap_or_else(|e| die(&format!("{}: {e}", p.display())))
}
