//! daxshim-bench: what the shim costs, measured side by side with the
//! kernel page cache and with plain memory copies, in one run.
//!
//!   daxshim-bench [--dir DIR] [--quick]
//!
//! The driver re-runs itself (`daxshim-bench one CASE ...`) without the shim
//! and under libdaxshim.so (userfaultfd tracker, then full compare) and
//! prints tables. Files live in DIR (default /tmp: ext4 here), which is the
//! emulated pmem for the shim runs.
//!
//! # Safety
//! Raw mappings are created and used within each measurement only.

mod cases;
mod copy;
mod mapped;
mod table;

use std::path::{Path, PathBuf};
use std::time::Instant;
use table::{table, CFGS};

const PAGE: usize = 4096;

fn die(msg: &str) -> ! {
    eprintln!("daxshim-bench: {msg}");
    std::process::exit(1)
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

const USAGE: &str = "usage: daxshim-bench [--dir DIR] [--quick]\n\
  Measures the shim against the kernel page cache and memory copies and\n\
  prints tables (see BENCHMARKS.md). DIR (default /tmp) holds the files;\n\
  --quick uses smaller files and fewer repeats.";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if args.get(1).map(|s| s.as_str()) == Some("one") {
        let quick = args.iter().any(|a| a == "--quick");
        cases::one(&args[2], Path::new(&args[3]), quick);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    // Anything else is a mistake, not a request for the full run.
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--quick" => {}
            "--dir" => {
                rest.next();
            }
            _ => die(&format!("unknown argument {a}\n{USAGE}")),
        }
    }
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(format!("daxshim-microbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lib = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("libdaxshim.so");
    if !lib.is_file() {
        die("libdaxshim.so not next to daxshim-bench (cargo build --release --workspace)");
    }
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
    table(
        "first store to a page",
        "ns/page",
        "first-store",
        (&dir, &lib, quick),
        CFGS,
    );
    let bw = table(
        "steady-state store bandwidth",
        "GB/s",
        "bandwidth",
        (&dir, &lib, quick),
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
        (&dir, &lib, quick),
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
        (&dir, &lib, quick),
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
        (&dir, &lib, quick),
        &[
            "page-cache",
            "shim-uffd",
            "shim-64M",
            "shim-eager",
            "shim-compare",
        ],
    );
    table(
        "a write the hooks do not see (raw pwrite64), until the mapping shows it",
        "µs",
        "outside-write",
        (&dir, &lib, quick),
        &["page-cache", "shim-uffd", "shim-trap"],
    );
    table(
        "system calls, with and without Syscall User Dispatch (DAXSHIM_SYSCALLS=trap)",
        "ns/call, median of 7",
        "syscalls",
        (&dir, &lib, quick),
        &["page-cache", "shim-uffd", "shim-trap"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
