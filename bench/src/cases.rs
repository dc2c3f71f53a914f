//! The measurements, one per case, each run in a process of its own
//! (`daxshim-bench one CASE DIR`) with or without the shim.

use crate::mapped::{make_file, map, Mapped};
use crate::{die, secs, PAGE};
use std::path::Path;
use std::time::Instant;

/// One measurement in this process; prints `key value` lines.
pub fn one(case: &str, dir: &Path, quick: bool) {
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
        "atomic-sync" => {
            // The cost of a sync with N dirty pages, stored through a
            // mapping (one line each, msync) or written (4 KiB pwrite each,
            // fdatasync); under DAXSHIM_ATOMIC also the size of the last
            // sync's redo record (read from the log beside the file).
            let len = 64 << 20;
            let f = dir.join("atomic-sync");
            make_file(&f, len);
            let m = map(&f, len);
            m.touch_pages(1);
            m.msync();
            let buf = vec![0x33u8; PAGE];
            for dirty in [1usize, 16, 256] {
                println!("map-{dirty} {:.1}", median(timed_msyncs(&m, len, dirty)));
                println!("map-{dirty}-logged {}", last_record_bytes(&f));
                let mut v = Vec::new();
                for r in 0..7 {
                    for k in 0..dirty {
                        let page = (k * 104_729 + r * 17) % (len / PAGE);
                        // SAFETY: our descriptor and buffer.
                        let n = unsafe {
                            libc::pwrite(m.fd, buf.as_ptr() as *const _, PAGE, (page * PAGE) as i64)
                        };
                        if n != PAGE as isize {
                            die("pwrite");
                        }
                    }
                    let t = Instant::now();
                    // SAFETY: our descriptor.
                    if unsafe { libc::fdatasync(m.fd) } != 0 {
                        die("fdatasync");
                    }
                    v.push(secs(t) * 1e6);
                }
                println!("pwrite-{dirty} {:.1}", median(v));
                println!("pwrite-{dirty}-logged {}", last_record_bytes(&f));
            }
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
                    let v = timed_msyncs(&m, len, dirty);
                    println!("sync-{}MiB-{dirty} {:.1}", len >> 20, median(v));
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
        "outside-write" => {
            // A write the hooks do not see — a raw pwrite64 system call,
            // which goes to the backing as a process without the shim
            // would — into a page this process has mapped and read: µs
            // until the mapping shows it (median and worst of 25). Without
            // DAXSHIM_SYSCALLS=trap that is the watcher's latency.
            let len = 4 << 20;
            let f = dir.join("outside");
            make_file(&f, len);
            let m = map(&f, len);
            let mut sum = 0u64;
            for pg in 0..len / PAGE {
                // SAFETY: within the mapping.
                sum += unsafe { std::ptr::read_volatile(m.p.add(pg * PAGE)) } as u64;
            }
            std::hint::black_box(sum);
            let mut v = Vec::new();
            for r in 0..25usize {
                let token = format!("w{r:07}");
                let off = (r * 17 % (len / PAGE)) * PAGE + 128;
                // SAFETY: within the mapping.
                let seen =
                    || unsafe { std::slice::from_raw_parts(m.p.add(off), 8) } == token.as_bytes();
                let t = Instant::now();
                // SAFETY: a plain system call on this case's own descriptor.
                let n =
                    unsafe { libc::syscall(libc::SYS_pwrite64, m.fd, token.as_ptr(), 8usize, off) };
                if n != 8 {
                    die("pwrite64");
                }
                while !seen() && secs(t) < 2.0 {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                v.push(if seen() { secs(t) * 1e6 } else { f64::INFINITY });
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!("latency-median-us {:.0}", v[v.len() / 2]);
            println!("latency-worst-us {:.0}", v[v.len() - 1]);
        }
        "syscalls" => {
            // ns per call: an unhooked system call, a hooked one on an
            // ordinary descriptor, a write to a pmem file through libc and
            // as a raw system call (median of 7 batches).
            let n = if quick { 20_000 } else { 100_000 };
            let f = dir.join("syscalls");
            make_file(&f, 1 << 20);
            let pm = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&f)
                .unwrap();
            let null = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .unwrap();
            use std::os::fd::AsRawFd;
            let (pfd, nfd) = (pm.as_raw_fd(), null.as_raw_fd());
            let buf = [7u8; 64];
            let per_call = |f: &dyn Fn(usize)| {
                let mut v: Vec<f64> = (0..7)
                    .map(|_| {
                        let t = Instant::now();
                        for k in 0..n {
                            f(k);
                        }
                        secs(t) * 1e9 / n as f64
                    })
                    .collect();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                v[3]
            };
            // SAFETY (all four): plain system calls on this case's own
            // descriptors and buffer.
            let getppid = per_call(&|_| unsafe {
                libc::syscall(libc::SYS_getppid);
            });
            let null_write = per_call(&|_| unsafe {
                libc::write(nfd, buf.as_ptr().cast(), 64);
            });
            let pwrite = per_call(&|k| unsafe {
                libc::pwrite(pfd, buf.as_ptr().cast(), 64, ((k % 4096) * 64) as i64);
            });
            let raw_pwrite = per_call(&|k| unsafe {
                libc::syscall(libc::SYS_pwrite64, pfd, buf.as_ptr(), 64, (k % 4096) * 64);
            });
            println!("unhooked-getppid {getppid:.0}");
            println!("write-dev-null {null_write:.0}");
            println!("pwrite-pmem {pwrite:.0}");
            println!("raw-pwrite-pmem {raw_pwrite:.0}");
        }
        "reopen" => {
            // µs per cycle of what SQLite does with its rollback journal at
            // each transaction, without the flush: create a file, write two
            // pages, close it, unlink it (median of 7 batches). The shim
            // attaches to and detaches from each file it never maps.
            let n = if quick { 500 } else { 2_000 };
            let f =
                std::ffi::CString::new(dir.join("journal").to_string_lossy().as_bytes()).unwrap();
            let page = [9u8; PAGE];
            let mut v: Vec<f64> = (0..7)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..n {
                        // SAFETY: plain system calls on this case's own file
                        // name, descriptor and buffer.
                        unsafe {
                            let fd = libc::open(
                                f.as_ptr(),
                                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                                0o644,
                            );
                            if fd < 0 {
                                die("open");
                            }
                            libc::pwrite(fd, page.as_ptr().cast(), PAGE, 0);
                            libc::pwrite(fd, page.as_ptr().cast(), PAGE, PAGE as i64);
                            libc::close(fd);
                            libc::unlink(f.as_ptr());
                        }
                    }
                    secs(t) * 1e6 / n as f64
                })
                .collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!("cycle-us {:.1}", v[3]);
        }
        _ => die(&format!("unknown case {case}")),
    }
}

/// Seven rounds of: one 64-byte store into each of `dirty` pages spread
/// over the `len`-byte mapping, then a timed `msync(MS_SYNC)`; µs each.
fn timed_msyncs(m: &Mapped, len: usize, dirty: usize) -> Vec<f64> {
    let mut v = Vec::new();
    for r in 0..7 {
        for k in 0..dirty {
            let page = (k * 7919 + r * 31) % (len / PAGE);
            // SAFETY: within the mapping.
            unsafe { std::ptr::write_volatile(m.p.add(page * PAGE + 64 * (r % 64)), r as u8 + 2) };
        }
        let t = Instant::now();
        m.msync();
        v.push(secs(t) * 1e6);
    }
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bytes of the newest redo record beside `f` (failure-atomic sync:
/// header word 1 is the generation, word 4 the body length), or NaN.
fn last_record_bytes(f: &Path) -> f64 {
    let name = f.file_name().unwrap().to_string_lossy();
    let mut best: Option<(u64, u64)> = None;
    // Lanes are numbered with one digit (the shim has eight).
    for k in 0..10 {
        let lane = f.with_file_name(format!(".{name}.daxshim-log{k}"));
        let Ok(b) = std::fs::read(&lane) else {
            continue;
        };
        if b.len() < 80 || &b[..8] != b"DXREDO03" {
            continue;
        }
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        if best.is_none_or(|(g, _)| word(1) > g) {
            best = Some((word(1), 80 + word(4)));
        }
    }
    best.map_or(f64::NAN, |(_, n)| n as f64)
}
