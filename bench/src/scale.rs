//! Scale: costs that should follow the work, not the size of the file.
//! Each case maps a whole file of SIZE GiB and touches a fixed number of
//! pages, or every page once, and reports a cost per page or per sync: a
//! shim whose costs follow the work draws flat lines as the file grows.
//!
//!   daxshim-bench one touch-random|touch-seq|sync-touched DIR [--quick] SIZE
//!   daxshim-bench one cache-max DIR [--quick]

use crate::mapped::{make_file, map, Mapped};
use crate::{die, secs, PAGE};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: usize = 1 << 30;
/// Pages read, then pages stored, by `touch-random`.
const TOUCHES: usize = 8192;
/// Files from this size on are sparse: writing one takes too long, and a
/// written one would not stay in the page cache beside a whole shadow.
const SPARSE_FROM: usize = 16 << 30;
/// `cache-max`: processes sharing the file, and one store per this many
/// accesses.
const CHILDREN: u64 = 4;
const STORE_EVERY: u64 = 50;

pub const CASES: &[&str] = &["touch-random", "touch-seq", "sync-touched", "cache-max"];

/// One scale measurement in this process; prints `key value` lines and
/// `# note` lines.
pub fn one(case: &str, dir: &Path, quick: bool, extra: &[String]) {
    if case == "cache-max" {
        return cache_max(dir, quick);
    }
    let gib: usize = num(extra.first(), "SIZE (GiB)");
    if gib == 0 {
        die("SIZE must be at least 1 (GiB)");
    }
    let len = gib * GIB;
    let keys: &[&str] = match case {
        "touch-random" => &["read-ns", "store-ns"],
        "touch-seq" => &["seq-ns"],
        _ => &["sync-us"],
    };
    if let Some(why) = no_room(len) {
        return nan_all(keys, &why);
    }
    let f = dir.join(case);
    make(&f, len);
    match case {
        "touch-random" => touch_random(&f, len),
        "touch-seq" => touch_seq(&f, len),
        _ => sync_touched(&f, len),
    }
    let _ = std::fs::remove_file(&f);
}

fn num<T: std::str::FromStr>(a: Option<&String>, what: &str) -> T {
    a.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| die(&format!("expected {what}, got {a:?}")))
}

fn nan_all(keys: &[&str], why: &str) {
    for k in keys {
        println!("{k} NaN");
    }
    println!("# note {why}");
}

/// Whether this process runs under the shim (the driver's shim columns
/// preload it; a run by hand may too).
fn under_shim() -> bool {
    std::env::var("LD_PRELOAD").is_ok_and(|v| v.contains("daxshim"))
}

fn shadow_dir() -> PathBuf {
    std::env::var_os("DAXSHIM_SHADOW_DIR")
        .map(PathBuf::from)
        // SAFETY: getuid cannot fail.
        .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/daxshim-{}", unsafe { libc::getuid() })))
}

/// Why a shadow of `len` bytes would not fit, if it would not: the shadow
/// file system needs room for the whole file plus 1 GiB, and, since a
/// tmpfs without swap is memory, so does the memory still available. A
/// case that filled /dev/shm would take the machine down with it.
fn no_room(len: usize) -> Option<String> {
    if !under_shim() {
        return None;
    }
    let need = len as u64 + GIB as u64;
    let dir = shadow_dir();
    // The directory is made at the first mapping: ask where it will be.
    let mut at = dir.as_path();
    while !at.exists() {
        at = at.parent()?;
    }
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; c is a C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Some(format!(
            "statvfs {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        ));
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let g = |b: u64| b as f64 / GIB as f64;
    if free < need {
        return Some(format!(
            "no room for a {} GiB shadow in {}: {:.1} GiB free, {:.0} GiB needed",
            len / GIB,
            at.display(),
            g(free),
            g(need)
        ));
    }
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(u64::MAX, |kb| kb * 1024);
    (avail < need).then(|| {
        format!(
            "no memory for a {} GiB shadow: {:.1} GiB available, {:.0} GiB needed",
            len / GIB,
            g(avail),
            g(need)
        )
    })
}

/// The case's file: written with data (page cache warm), or from
/// SPARSE_FROM on sparse, its holes then read once so that the page cache
/// holds it as it holds a written one.
fn make(f: &Path, len: usize) {
    if len < SPARSE_FROM {
        return make_file(f, len);
    }
    // Read and write: the file is read back below.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(f)
        .and_then(|h| h.set_len(len as u64).map(|_| h))
        .unwrap_or_else(|e| die(&format!("{}: {e}", f.display())));
    println!(
        "# note {} GiB file sparse (ftruncate): holes read as zeros, page cache warmed by reading it; a first store allocates a block",
        len / GIB
    );
    let mut buf = vec![0u8; 1 << 20];
    use std::os::fd::AsRawFd;
    for off in (0..len).step_by(buf.len()) {
        // SAFETY: a raw system call (past the shim's hooks: the backing is
        // what is warmed) into our own buffer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_pread64,
                file.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
                off,
            )
        };
        if n <= 0 {
            die(&format!(
                "pread64 {}: {}",
                f.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
}

fn read(m: &Mapped, at: usize) -> u64 {
    // SAFETY: callers pass offsets within the mapping.
    unsafe { std::ptr::read_volatile(m.p.add(at)) as u64 }
}

fn store(m: &Mapped, at: usize, v: u8) {
    // SAFETY: callers pass offsets within the mapping.
    unsafe { std::ptr::write_volatile(m.p.add(at), v) }
}

/// The k-th of n distinct pseudo-random pages: k·M + C mod n with M
/// prime to n is a permutation of 0..n, so no page is touched twice.
fn permute(k: usize, n: usize) -> usize {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let n = n as u64;
    let mut m = 0x9e37_79b9_7f4a_7c15u64 % n;
    while gcd(m, n) != 1 {
        m += 1;
    }
    ((k as u128 * m as u128 + 0x1234_5678) % n as u128) as usize
}

/// 8,192 distinct random pages of the first half read, then 8,192 of the
/// second half (not yet touched) stored: the cost of a first touch, which
/// should not depend on how much of the file is never touched.
fn touch_random(f: &Path, len: usize) {
    let half = len / PAGE / 2;
    if half < TOUCHES {
        die("touch-random needs a file of at least 64 MiB");
    }
    let m = map(f, len);
    let t = Instant::now();
    let mut sum = 0;
    for k in 0..TOUCHES {
        sum += read(&m, permute(k, half) * PAGE);
    }
    let read_ns = secs(t) * 1e9 / TOUCHES as f64;
    std::hint::black_box(sum);
    let t = Instant::now();
    for k in 0..TOUCHES {
        store(&m, (half + permute(k, half)) * PAGE, k as u8 | 1);
    }
    let store_ns = secs(t) * 1e9 / TOUCHES as f64;
    println!("read-ns {read_ns:.1}");
    println!("store-ns {store_ns:.1}");
}

/// Every page read in order through the mapping; without the shim also
/// the whole file read with pread first, the copy a program that does not
/// map would make (the goal: the shim's mapping at most twice that).
fn touch_seq(f: &Path, len: usize) {
    if !under_shim() {
        let file = std::fs::File::open(f).unwrap_or_else(|e| die(&format!("{}: {e}", f.display())));
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            match file.read_at(&mut buf, off as u64) {
                Ok(0) => die("pread: short file"),
                Ok(n) => off += n,
                Err(e) => die(&format!("pread: {e}")),
            }
        }
        std::hint::black_box(&buf);
        println!("pread-ns {:.1}", secs(t) * 1e9 / (len / PAGE) as f64);
    }
    let m = map(f, len);
    let t = Instant::now();
    let mut sum = 0;
    for pg in 0..len / PAGE {
        sum += read(&m, pg * PAGE);
    }
    std::hint::black_box(sum);
    println!("seq-ns {:.1}", secs(t) * 1e9 / (len / PAGE) as f64);
}

/// Every page read (the whole mapping touched), then one page stored and
/// the whole mapping synced, 7 times: the median µs. One dirty page should
/// cost the same whatever the size of what is mapped and clean.
fn sync_touched(f: &Path, len: usize) {
    let pages = len / PAGE;
    let m = map(f, len);
    let mut sum = 0;
    for pg in 0..pages {
        sum += read(&m, pg * PAGE);
    }
    std::hint::black_box(sum);
    let mut v = Vec::new();
    for r in 0..7 {
        store(&m, permute(r, pages) * PAGE + 64 * r, r as u8 + 1);
        let t = Instant::now();
        m.msync();
        v.push(secs(t) * 1e6);
    }
    v.sort_by(f64::total_cmp);
    println!("sync-us {:.1}", v[v.len() / 2]);
}

/// Bytes the shadow directory holds in memory: st_blocks of every
/// regular file under it. Files come and go during the walk: what cannot
/// be read counts 0.
fn resident(d: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(d) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => resident(&e.path()),
            Ok(m) if m.is_file() => m.blocks() * 512,
            _ => 0,
        })
        .sum()
}

/// Four processes reading random pages of one file (a store every 50th
/// access, an msync a second) under DAXSHIM_CACHE_MAX: how much shadow
/// the lazy fills leave resident (sampled every 20 ms), the reads they
/// manage, and whether every store reached the file.
fn cache_max(dir: &Path, quick: bool) {
    let len = if quick { GIB } else { 4 * GIB };
    let seconds = if quick { 2 } else { 5 };
    let keys = [
        "max-resident-MiB",
        "final-resident-MiB",
        "reads-per-s",
        "lost-stores",
    ];
    if let Some(why) = no_room(len) {
        return nan_all(&keys, &why);
    }
    let f = dir.join("cache-max");
    make_file(&f, len);
    // Beside DIR, not in it: the records are no pmem file of the case.
    let rec = PathBuf::from(format!("{}.stores", dir.display()));
    std::fs::create_dir_all(&rec).unwrap_or_else(|e| die(&format!("{}: {e}", rec.display())));
    let exe = std::env::current_exe().unwrap_or_else(|e| die(&e.to_string()));
    let mut kids: Vec<_> = (0..CHILDREN)
        .map(|seed| {
            let c = Command::new(&exe)
                .arg("child-random")
                .arg(&f)
                .arg(seconds.to_string())
                .arg(seed.to_string())
                .arg(rec.join(seed.to_string()))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| die(&format!("child-random: {e}")));
            (seed, c)
        })
        .collect();
    let shadow = under_shim().then(shadow_dir);
    let mut max = 0;
    loop {
        if let Some(d) = &shadow {
            max = max.max(resident(d));
        }
        if !kids
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rate = 0.0;
    let mut done = Vec::new();
    for (seed, mut c) in kids {
        let mut out = String::new();
        if let Some(mut s) = c.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let st = c
            .wait()
            .unwrap_or_else(|e| die(&format!("child-random: {e}")));
        let val = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        if st.success() {
            rate += val("reads") / val("secs");
            done.push(seed);
        } else {
            println!("# note child {seed} failed ({st}): its stores are not checked");
        }
    }
    let fin = shadow.as_ref().map(|d| resident(d));
    let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    println!("max-resident-MiB {:.1}", mib(shadow.as_ref().map(|_| max)));
    println!("final-resident-MiB {:.1}", mib(fin));
    println!("reads-per-s {rate:.0}");
    let (lost, lost_seen) = check_stores(&f, &rec, &done);
    println!("lost-stores {lost}");
    if lost > 0 {
        println!(
            "# note {lost} stores missing from the file, {lost_seen} of them also from what read() shows"
        );
    }
    let _ = std::fs::remove_file(&f);
    let _ = std::fs::remove_dir_all(&rec);
}

/// The last value each child stored at each page it stored to, checked
/// in the file itself — by a raw system call, past the shim's hooks, as
/// the children have synced and exited — and, for those missing there,
/// through read() (what the shim shows): (missing, missing from both).
fn check_stores(f: &Path, rec: &Path, done: &[u64]) -> (u64, u64) {
    let file = std::fs::File::open(f).unwrap_or_else(|e| die(&format!("{}: {e}", f.display())));
    use std::os::fd::AsRawFd;
    let (mut lost, mut lost_seen) = (0, 0);
    for &seed in done {
        let path = rec.join(seed.to_string());
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
        for l in text.lines() {
            let mut w = l.split_whitespace();
            let (Some(Ok(page)), Some(Ok(v))) = (
                w.next().map(str::parse::<usize>),
                w.next().map(str::parse::<u8>),
            ) else {
                die(&format!("{}: bad record {l:?}", path.display()));
            };
            let at = page * PAGE + at_in_page(seed);
            let mut b = [0u8];
            // SAFETY: a raw system call into our one-byte buffer.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_pread64,
                    file.as_raw_fd(),
                    b.as_mut_ptr(),
                    1usize,
                    at,
                )
            };
            if n != 1 || b[0] != v {
                lost += 1;
                if file.read_at(&mut b, at as u64).ok() != Some(1) || b[0] != v {
                    lost_seen += 1;
                }
            }
        }
    }
    (lost, lost_seen)
}

/// Each child stores into a cacheline of its own in every page, so a
/// page's last value per child is well defined.
fn at_in_page(seed: u64) -> usize {
    (seed as usize % (PAGE / 64)) * 64
}

/// `child-random FILE SECONDS SEED RECORDS`: reads one byte of random
/// pages of FILE for SECONDS, every 50th access a store instead, an msync
/// of the whole mapping once a second and before exit; writes the last
/// value stored at each page to RECORDS (`page value` lines) and prints
/// `reads`, `stores`, `secs`.
pub fn child_random(args: &[String]) {
    let f = PathBuf::from(
        args.first()
            .unwrap_or_else(|| die("child-random FILE SECONDS SEED RECORDS")),
    );
    let seconds: f64 = num(args.get(1), "SECONDS");
    let seed: u64 = num(args.get(2), "SEED");
    let rec = PathBuf::from(
        args.get(3)
            .unwrap_or_else(|| die("child-random: no RECORDS")),
    );
    let len = std::fs::metadata(&f)
        .unwrap_or_else(|e| die(&format!("{}: {e}", f.display())))
        .len() as usize;
    let pages = (len / PAGE) as u64;
    if pages == 0 {
        die("child-random: empty file");
    }
    let m = map(&f, len);
    let off = at_in_page(seed);
    // xorshift64: any non-zero state.
    let mut x = (seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut last: HashMap<u64, u8> = HashMap::new();
    let (mut reads, mut stores, mut sum) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    let mut next_sync = 1.0;
    loop {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = x % pages;
            let at = page as usize * PAGE + off;
            if (reads + stores + 1) % STORE_EVERY == 0 {
                // 1..=250, never the file's own 0x5a.
                let v = match (1 + stores % 250) as u8 {
                    0x5a => 0xfe,
                    v => v,
                };
                store(&m, at, v);
                last.insert(page, v);
                stores += 1;
            } else {
                sum += read(&m, at);
                reads += 1;
            }
        }
        let el = secs(t);
        if el >= seconds {
            break;
        }
        if el >= next_sync {
            m.msync();
            next_sync += 1.0;
        }
    }
    let el = secs(t);
    std::hint::black_box(sum);
    m.msync();
    drop(m);
    let text: String = last.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
    std::fs::write(&rec, text).unwrap_or_else(|e| die(&format!("{}: {e}", rec.display())));
    println!("reads {reads}");
    println!("stores {stores}");
    println!("secs {el:.3}");
}
