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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PAGE: usize = 4096;

fn die(msg: &str) -> ! {
    eprintln!("daxshim-bench: {msg}");
    std::process::exit(1)
}

/// A file of `len` bytes filled with data (no holes), mapped shared.
struct Mapped {
    p: *mut u8,
    len: usize,
    fd: i32,
}

fn make_file(path: &Path, len: usize) {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

fn map(path: &Path, len: usize) -> Mapped {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: plain open/mmap of our own file.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            die("open");
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            die("mmap");
        }
        Mapped {
            p: p as *mut u8,
            len,
            fd,
        }
    }
}

impl Mapped {
    fn touch_pages(&self, val: u8) {
        for i in (0..self.len).step_by(PAGE) {
            // SAFETY: within the mapping.
            unsafe { std::ptr::write_volatile(self.p.add(i), val) };
        }
    }
    fn msync(&self) {
        // SAFETY: our mapping.
        if unsafe { libc::msync(self.p as *mut _, self.len, libc::MS_SYNC) } != 0 {
            die("msync");
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: ours.
        unsafe {
            libc::munmap(self.p as *mut _, self.len);
            libc::close(self.fd);
        }
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// One measurement in this process; prints `key value` lines.
fn one(case: &str, dir: &Path, quick: bool) {
    match case {
        "first-store" => {
            // ns per first store to a clean page, then per store to a page
            // made clean again by a sync (the tracker's re-arm).
            let len = if quick { 16 << 20 } else { 64 << 20 };
            let f = dir.join("first-store");
            make_file(&f, len);
            let m = map(&f, len);
            let t = Instant::now();
            m.touch_pages(1);
            println!("first {:.1}", secs(t) * 1e9 / (len / PAGE) as f64);
            m.msync();
            let t = Instant::now();
            m.touch_pages(2);
            println!("after-sync {:.1}", secs(t) * 1e9 / (len / PAGE) as f64);
            m.msync();
        }
        "bandwidth" => {
            // Steady-state store bandwidth into the mapping (pages already
            // written once) against plain anonymous memory.
            let len = if quick { 64 << 20 } else { 256 << 20 };
            let f = dir.join("bandwidth");
            make_file(&f, len);
            let m = map(&f, len);
            m.touch_pages(1);
            // SAFETY: within the mapping.
            let s = unsafe { std::slice::from_raw_parts_mut(m.p, len) };
            let mut best = f64::MAX;
            for i in 0..5 {
                let t = Instant::now();
                s.fill(i as u8);
                best = best.min(secs(t));
            }
            println!("mapping {:.2}", len as f64 / best / 1e9);
            let mut v = vec![0u8; len];
            let mut best = f64::MAX;
            for i in 0..5 {
                let t = Instant::now();
                v.fill(i as u8);
                best = best.min(secs(t));
            }
            println!("memory {:.2}", len as f64 / best / 1e9);
            std::hint::black_box(&v);
        }
        "sync" => {
            // msync(MS_SYNC) latency with 1, 16, 1024 dirty pages in
            // mappings of 16 MiB, 256 MiB, 1 GiB (median of repeats).
            let sizes: &[usize] = if quick {
                &[16 << 20, 256 << 20]
            } else {
                &[16 << 20, 256 << 20, 1 << 30]
            };
            for &len in sizes {
                let f = dir.join(format!("sync-{len}"));
                make_file(&f, len);
                let m = map(&f, len);
                m.touch_pages(1);
                m.msync();
                for dirty in [1usize, 16, 1024] {
                    let mut v = Vec::new();
                    for r in 0..7 {
                        for k in 0..dirty {
                            let page = (k * 7919 + r * 31) % (len / PAGE);
                            // SAFETY: within the mapping.
                            unsafe {
                                std::ptr::write_volatile(
                                    m.p.add(page * PAGE + 64 * (r % 64)),
                                    r as u8 + 2,
                                )
                            };
                        }
                        let t = Instant::now();
                        m.msync();
                        v.push(secs(t) * 1e6);
                    }
                    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    println!("sync-{}MiB-{dirty} {:.1}", len >> 20, v[v.len() / 2]);
                }
                drop(m);
                let _ = std::fs::remove_file(&f);
            }
        }
        "writeback" => {
            // A large dirty set: every line of 256 MiB changed, then msync.
            let len = if quick { 64 << 20 } else { 256 << 20 };
            let f = dir.join("writeback");
            make_file(&f, len);
            let m = map(&f, len);
            m.touch_pages(1);
            m.msync();
            // SAFETY: within the mapping.
            let s = unsafe { std::slice::from_raw_parts_mut(m.p, len) };
            s.fill(0x33);
            let t = Instant::now();
            m.msync();
            println!("msync {:.2}", len as f64 / secs(t) / 1e9);
        }
        "map4g" => {
            // Map a large pmem file, read 1% of its pages at random.
            let len: usize = if quick { 1 << 30 } else { 4 << 30 };
            let f = dir.join("big");
            make_file(&f, len);
            let t = Instant::now();
            let m = map(&f, len);
            let map_ms = secs(t) * 1e3;
            let t = Instant::now();
            let pages = len / PAGE;
            let mut sum = 0u64;
            for k in 0..pages / 100 {
                let page = (k * 7919 * 13) % pages;
                // SAFETY: within the mapping.
                sum += unsafe { std::ptr::read_volatile(m.p.add(page * PAGE)) } as u64;
            }
            std::hint::black_box(sum);
            println!("map-ms {map_ms:.1}");
            println!("read1pct-ms {:.1}", secs(t) * 1e3);
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            for k in ["VmRSS", "RssShmem"] {
                if let Some(l) = status.lines().find(|l| l.starts_with(k)) {
                    let kb: u64 = l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    println!("{k}-MiB {}", kb / 1024);
                }
            }
            drop(m);
            let _ = std::fs::remove_file(&f);
        }
        _ => die(&format!("unknown case {case}")),
    }
}

/// Copy limits of this machine: memcpy and non-temporal stores.
fn copy_limits(len: usize) -> (f64, f64) {
    let src = vec![7u8; len];
    let mut dst = vec![1u8; len];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(secs(t));
    }
    let memcpy = len as f64 / best / 1e9;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        nt_copy(&mut dst, &src);
        best = best.min(secs(t));
    }
    std::hint::black_box(&dst);
    (memcpy, len as f64 / best / 1e9)
}

#[cfg(target_arch = "x86_64")]
fn nt_copy(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(src.len()) / 16;
    // SAFETY: SSE2 is part of x86-64; both buffers hold n*16 bytes, and
    // `_mm_stream_si128` needs 16-byte aligned destinations (Vec's large
    // allocations are page aligned).
    unsafe {
        let d = dst.as_mut_ptr() as *mut __m128i;
        let s = src.as_ptr() as *const __m128i;
        debug_assert_eq!(d as usize % 16, 0);
        for i in 0..n {
            _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
        }
        _mm_sfence();
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn nt_copy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

/// The run length from which the writeback should switch from copy +
/// `clwb` per line to non-temporal stores: ns per line both ways for runs
/// of 1…32 lines at random places of a 256 MiB buffer (out of cache, as a
/// writeback's lines are), then one `sfence` per 64 runs (a sync's worth).
#[cfg(target_arch = "x86_64")]
fn stream_threshold(quick: bool) {
    use std::arch::x86_64::*;
    let len: usize = if quick { 64 << 20 } else { 256 << 20 };
    let src = vec![7u8; len];
    let mut dst = vec![1u8; len];
    // CPUID leaf 7, EBX bit 24: CLWB.
    let clwb = __cpuid_count(7, 0).ebx & (1 << 24) != 0;
    println!(
        "\n## copy + flush vs non-temporal stores, by run length (ns per 64-byte line{})",
        if clwb {
            ", clwb"
        } else {
            ", clflush: no clwb here"
        }
    );
    println!("{:<10} {:>12} {:>12}", "lines", "copy+flush", "streamed");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // As in a writeback, each run's destination lines were just read (the
    // compare) before they are written; every pass uses fresh places.
    let compare = |d: *const u8, lines: usize| {
        let mut x = 0u64;
        for l in 0..lines * 8 {
            // SAFETY: within the run (callers' bounds).
            x ^= unsafe { std::ptr::read_volatile((d as *const u64).add(l)) };
        }
        std::hint::black_box(x);
    };
    for lines in [1usize, 2, 4, 8, 16, 32] {
        let runs = 20_000;
        let mut t_flush = f64::MAX;
        let mut t_stream = f64::MAX;
        for _ in 0..3 {
            let mut offs = || -> Vec<usize> {
                (0..runs)
                    .map(|_| (next() as usize % (len / 4096 - 1)) * 4096)
                    .collect()
            };
            let (offs, offs2) = (offs(), offs());
            let t = Instant::now();
            for (k, &o) in offs.iter().enumerate() {
                // SAFETY: o + lines*64 <= len; clwb/clflush on our buffer.
                unsafe {
                    let d = dst.as_mut_ptr().add(o);
                    compare(d, lines);
                    std::ptr::copy_nonoverlapping(src.as_ptr().add(o), d, lines * 64);
                    for l in 0..lines {
                        if clwb {
                            std::arch::asm!("clwb [{0}]", in(reg) d.add(l * 64), options(nostack));
                        } else {
                            _mm_clflush(d.add(l * 64));
                        }
                    }
                    if k % 64 == 63 {
                        _mm_sfence();
                    }
                }
            }
            t_flush = t_flush.min(secs(t));
            let t = Instant::now();
            for (k, &o) in offs2.iter().enumerate() {
                // SAFETY: as above; 16-byte aligned destinations.
                unsafe {
                    compare(dst.as_ptr().add(o), lines);
                    let d = dst.as_mut_ptr().add(o) as *mut __m128i;
                    let s = src.as_ptr().add(o) as *const __m128i;
                    for i in 0..lines * 4 {
                        _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
                    }
                    if k % 64 == 63 {
                        _mm_sfence();
                    }
                }
            }
            t_stream = t_stream.min(secs(t));
        }
        let per = |t: f64| t * 1e9 / (runs * lines) as f64;
        println!("{lines:<10} {:>12.1} {:>12.1}", per(t_flush), per(t_stream));
    }
    std::hint::black_box(&dst);
}

#[cfg(not(target_arch = "x86_64"))]
fn stream_threshold(_quick: bool) {}

fn run_case(case: &str, dir: &Path, lib: &Path, cfg: &str, quick: bool) -> Vec<(String, f64)> {
    let exe = std::env::current_exe().unwrap();
    let sub = dir.join(format!("{case}-{cfg}"));
    let _ = std::fs::remove_dir_all(&sub);
    std::fs::create_dir_all(&sub).unwrap();
    let shadow = format!("/dev/shm/daxshim-bench-{}", std::process::id());
    let mut c = Command::new(exe);
    c.args(["one", case]).arg(&sub);
    if quick {
        c.arg("--quick");
    }
    if cfg != "page-cache" {
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
            // Emulated pmem written back as real pmem is: stores (non-
            // temporal for long runs) and cache flushes through a mapping.
            "shim-stores" => {
                c.env("DAXSHIM_WRITEBACK", "stores");
            }
            "shim-mprotect" => {
                c.env("DAXSHIM_TRACKER", "mprotect");
            }
            _ => {}
        }
    }
    let out = c.output().unwrap_or_else(|e| die(&e.to_string()));
    let _ = std::fs::remove_dir_all(&sub);
    let _ = std::fs::remove_dir_all(&shadow);
    if !out.status.success() {
        die(&format!(
            "{case} {cfg}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN)))
        .collect()
}

const CFGS: &[&str] = &[
    "page-cache",
    "shim-uffd",
    "shim-eager",
    "shim-mprotect",
    "shim-compare",
];

fn table(
    title: &str,
    unit: &str,
    case: &str,
    (dir, lib, quick): (&Path, &Path, bool),
    cfgs: &[&str],
) -> Vec<Vec<(String, f64)>> {
    let res: Vec<_> = cfgs
        .iter()
        .map(|c| run_case(case, dir, lib, c, quick))
        .collect();
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(|s| s.as_str()) == Some("one") {
        let quick = args.iter().any(|a| a == "--quick");
        one(&args[2], Path::new(&args[3]), quick);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
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
    let (memcpy, nt) = copy_limits(if quick { 64 << 20 } else { 256 << 20 });
    println!(
        "copy limits: memcpy {memcpy:.2} GB/s, non-temporal {nt:.2} GB/s; shim writeback / non-temporal = {:.3} (pwrite), {:.3} (stores)",
        get(&wb[1], "msync") / nt,
        get(&wb[2], "msync") / nt
    );
    stream_threshold(quick);
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
    let _ = std::fs::remove_dir_all(&dir);
}
