//! daxshim-bench: what the shim costs, measured side by side with the
//! kernel page cache and with plain memory copies, in one run.
//!
//!   daxshim-bench [--dir DIR] [--quick] [--scale] [--lib PATH]
//!                 [--before PATH] [--svg PATH]
//!
//! The driver re-runs itself (`daxshim-bench one CASE DIR [--quick]
//! [SIZE]`) without the shim and under libdaxshim.so (userfaultfd tracker,
//! then full compare, ...) and prints tables. Files live in DIR (default
//! /tmp: ext4 here), which is the emulated pmem for the shim runs. The
//! scale tables (files of 1, 4 and 16 GiB) end the full run, or are all
//! that `--scale` runs; `--before` adds a column for an older library, so
//! that one run shows before and after; `--svg` draws them.
//!
//! # Safety
//! Raw mappings are created and used within each measurement only.

mod cases;
mod copy;
mod mapped;
mod scale;
mod svg;
mod table;

use std::path::{Path, PathBuf};
use std::time::Instant;
use table::{need_file, scale_table, table, value, Ctx, Point, CFGS};

const PAGE: usize = 4096;

fn die(msg: &str) -> ! {
    eprintln!("daxshim-bench: {msg}");
    std::process::exit(1)
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

const USAGE: &str = "usage: daxshim-bench [--dir DIR] [--quick] [--scale] [--lib PATH]\n\
  \x20                    [--before PATH] [--svg PATH]\n\
  Measures the shim against the kernel page cache and memory copies and\n\
  prints tables (see BENCHMARKS.md). DIR (default /tmp) holds the files;\n\
  --quick uses smaller files and fewer repeats (scale: 1 GiB only);\n\
  --scale runs only the scale tables (files of 1, 4 and 16 GiB, each run 3\n\
  times), which otherwise end the full run; --lib PATH is the library of the\n\
  shim columns (default: libdaxshim.so beside this program); --before PATH\n\
  adds columns for an older library (before = its shim-uffd); --svg PATH\n\
  draws the scale tables as an SVG picture.";

/// Runs of each scale case per configuration and size.
const SCALE_REPS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    match args.get(1).map(|s| s.as_str()) {
        Some("one") => {
            let (Some(case), Some(dir)) = (args.get(2), args.get(3)) else {
                die("usage: daxshim-bench one CASE DIR [--quick] [ARGS...]")
            };
            let quick = args[4..].iter().any(|a| a == "--quick");
            if scale::CASES.contains(&case.as_str()) {
                let extra: Vec<String> = args[4..]
                    .iter()
                    .filter(|a| *a != "--quick")
                    .cloned()
                    .collect();
                scale::one(case, Path::new(dir), quick, &extra);
            } else {
                cases::one(case, Path::new(dir), quick);
            }
            return;
        }
        // A process of the cache-max case (not for use by hand).
        Some("child-random") => return scale::child_random(&args[2..]),
        _ => {}
    }
    let (mut quick, mut scale_only) = (false, false);
    let (mut dir, mut lib, mut before, mut svg) = (None, None, None, None);
    // Anything else is a mistake, not a request for the full run.
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        let mut path = || {
            rest.next()
                .map(PathBuf::from)
                .unwrap_or_else(|| die(&format!("{a} needs a value\n{USAGE}")))
        };
        match a.as_str() {
            "--quick" => quick = true,
            "--scale" => scale_only = true,
            "--dir" => dir = Some(path()),
            "--lib" => lib = Some(path()),
            "--before" => before = Some(path()),
            "--svg" => svg = Some(path()),
            _ => die(&format!("unknown argument {a}\n{USAGE}")),
        }
    }
    let dir = dir
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(format!("daxshim-microbench-{}", std::process::id()));
    let lib = match lib {
        Some(l) => need_file(&l, "--lib"),
        None => {
            let l = std::env::current_exe()
                .unwrap_or_else(|e| die(&e.to_string()))
                .with_file_name("libdaxshim.so");
            if !l.is_file() {
                die("libdaxshim.so not next to daxshim-bench (cargo build --release --workspace, or --lib PATH)");
            }
            l
        }
    };
    let before = before.map(|b| need_file(&b, "--before"));
    // Made now, not at the end of a long run, so a bad path fails early.
    if let Some(p) = &svg {
        std::fs::File::create(p).unwrap_or_else(|e| die(&format!("{}: {e}", p.display())));
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    // DAXSHIM_PMEM takes absolute directories only.
    let dir =
        std::fs::canonicalize(&dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "# daxshim-bench: CPU {cpu}, {} CPUs, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim()
    );
    println!(
        "# files in {} (the shim runs treat it as emulated pmem); page-cache = no shim",
        dir.display()
    );
    println!("# shim library {}", lib.display());
    if let Some(b) = &before {
        println!("# before = shim-uffd on {}", b.display());
    }
    let ctx = Ctx {
        dir,
        lib,
        before,
        quick,
    };
    if !scale_only {
        all_tables(&ctx);
    }
    let pts = scale_tables(&ctx);
    if let Some(path) = svg {
        let mut cfgs = vec!["page-cache"];
        if ctx.before.is_some() {
            cfgs.push("before");
        }
        cfgs.push("shim-uffd");
        svg::write(&path, &pts, &cfgs);
        println!("# picture: {}", path.display());
    }
    let _ = std::fs::remove_dir_all(&ctx.dir);
}

/// The tables of the full run before the scale ones.
fn all_tables(ctx: &Ctx) {
    let quick = ctx.quick;
    table("first store to a page", "ns/page", "first-store", ctx, CFGS);
    let bw = table(
        "steady-state store bandwidth",
        "GB/s",
        "bandwidth",
        ctx,
        CFGS,
    );
    let get = |r: &Vec<(String, f64)>, k: &str| {
        r.iter()
            .find(|(kk, _)| kk == k)
            .map(|x| x.1)
            .unwrap_or(f64::NAN)
    };
    println!(
        "ratio mapping/memory: page-cache {:.3}, shim-uffd {:.3}",
        get(&bw[0], "mapping") / get(&bw[0], "memory"),
        get(&bw[1], "mapping") / get(&bw[1], "memory")
    );
    table(
        "msync(MS_SYNC) latency, dirty pages in a mapping",
        "µs, median of 7",
        "sync",
        ctx,
        &[
            "page-cache",
            "shim-uffd",
            "shim-eager",
            "shim-mprotect",
            "shim-stores",
            "shim-compare",
        ],
    );
    let wb = table(
        "writeback of a fully dirty mapping",
        "GB/s",
        "writeback",
        ctx,
        &["page-cache", "shim-uffd", "shim-stores", "shim-compare"],
    );
    let (memcpy, nt) = copy::copy_limits(if quick { 64 << 20 } else { 256 << 20 });
    println!(
        "copy limits: memcpy {memcpy:.2} GB/s, non-temporal {nt:.2} GB/s; shim writeback / non-temporal = {:.3} (pwrite), {:.3} (stores)",
        get(&wb[1], "msync") / nt,
        get(&wb[2], "msync") / nt
    );
    copy::stream_threshold(quick);
    table(
        "map a large file, read 1% of its pages",
        "ms / MiB",
        "map4g",
        ctx,
        &[
            "page-cache",
            "shim-uffd",
            "shim-64M",
            "shim-eager",
            "shim-compare",
        ],
    );
    table(
        "a sync, normal and failure-atomic (DAXSHIM_ATOMIC): one 64-byte store (map) or 4 KiB pwrite per dirty page",
        "µs, median of 7; -logged: bytes of the redo record",
        "atomic-sync",
        ctx,
        &["page-cache", "shim-uffd", "shim-atomic"],
    );
    table(
        "a write the hooks do not see (raw pwrite64), until the mapping shows it",
        "µs",
        "outside-write",
        ctx,
        &["page-cache", "shim-uffd", "shim-trap"],
    );
    table(
        "a file created, written (two pages), closed and unlinked, as a rollback journal is",
        "µs per cycle, median of 7 batches",
        "reopen",
        ctx,
        &["page-cache", "shim-uffd"],
    );
    table(
        "system calls, with and without Syscall User Dispatch (DAXSHIM_SYSCALLS=trap)",
        "ns/call, median of 7",
        "syscalls",
        ctx,
        &["page-cache", "shim-uffd", "shim-trap"],
    );
}

/// The scale tables (issue "Scale: costs that follow the work, not the
/// size of the file"): each case at each size, SCALE_REPS runs per
/// configuration.
fn scale_tables(ctx: &Ctx) -> Vec<Point> {
    let sizes: &[usize] = if ctx.quick { &[1] } else { &[1, 4, 16] };
    let b = ctx.before.is_some();
    let cfgs: Vec<&str> = ["page-cache", "before", "shim-uffd"]
        .into_iter()
        .filter(|c| b || *c != "before")
        .collect();
    let mut pts = scale_table(
        (
            "scale: 8,192 random pages of the first half read, then 8,192 of the second half stored",
            "ns/page",
            "touch-random",
        ),
        ctx,
        &cfgs,
        Some(sizes),
        SCALE_REPS,
    );
    pts.extend(scale_table(
        (
            "scale: every page read in order (seq); the whole file read with pread, 1 MiB at a time (page cache only)",
            "ns per 4 KiB page",
            "touch-seq",
        ),
        ctx,
        &cfgs,
        Some(sizes),
        SCALE_REPS,
    ));
    for &g in sizes {
        let pread = value(&pts, "pread-ns", g, "page-cache");
        for c in cfgs.iter().filter(|c| **c != "page-cache") {
            println!(
                "ratio seq({c})/pread(page-cache) = {:.2} at {g} GiB (goal: at most 2)",
                value(&pts, "seq-ns", g, c) / pread
            );
        }
    }
    pts.extend(scale_table(
        (
            "scale: msync(MS_SYNC) of the whole mapping, every page touched, one page dirty",
            "µs, median of 7 syncs",
            "sync-touched",
        ),
        ctx,
        &cfgs,
        Some(sizes),
        SCALE_REPS,
    ));
    let cfgs: Vec<&str> = ["before-256M", "shim-256M"]
        .into_iter()
        .filter(|c| b || *c != "before-256M")
        .collect();
    scale_table(
        (
            &format!(
                "scale: DAXSHIM_CACHE_MAX=256M, 4 processes reading random pages of a {} GiB file for {} s, every 50th access a store",
                if ctx.quick { 1 } else { 4 },
                if ctx.quick { 2 } else { 5 }
            ),
            "MiB of shadow resident, reads/s, stores missing",
            "cache-max",
        ),
        ctx,
        &cfgs,
        None,
        SCALE_REPS,
    );
    pts
}
