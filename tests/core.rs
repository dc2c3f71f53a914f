//! The core shim, point by point (issue: "Core shim"). Every test runs a
//! real program under LD_PRELOAD on emulated pmem and observes the backing
//! file from this process, which has no shim.

mod common;
use common::*;

const PAGE: usize = 4096;

fn zeros(n: usize) -> Vec<u8> {
    vec![0u8; n]
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

// 1. Shadow for unaware callers: stores stay out of the backing until a sync.
#[test]
fn stores_are_isolated_until_msync() {
    let w = World::new("isolation");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let stored = w.root.join("stored");
    let go = w.root.join("go");
    let mut c = w.shim_cmd(probe());
    c.args([
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "8192",
        ",",
        "store",
        "100",
        "hello",
        ",",
    ])
    .args([
        "touch",
        s(&stored),
        ",",
        "waitfor",
        s(&go),
        ",",
        "msync",
        ",",
        "kill",
    ]);
    let h = std::thread::spawn(move || run(c));
    wait_for(&stored);
    assert!(
        !contains(&backing(&f), "hello"),
        "store reached the backing before any sync"
    );
    std::fs::write(&go, b"").unwrap();
    killed(h.join().unwrap());
    w.drop_shadows();
    assert!(
        contains(&backing(&f), "hello"),
        "msync did not persist the store"
    );
    assert_eq!(
        w.stat_sum("mappings_shadowed"),
        0,
        "killed process wrote no stats"
    );
}

// 3. Each sync call persists (durable: it survives kill + dropping shadows).
#[test]
fn every_sync_call_persists() {
    let syncs: &[&[&str]] = &[
        &["msync"],
        &["msync", "sync", "4096", "4096"],
        &["msync", "async"],
        &["fsync"],
        &["fdatasync"],
        &["sfr", "0", "0", "wait"],
        &["syncfs"],
        &["sync"],
    ];
    for sync in syncs {
        let w = World::new("sync");
        let f = w.pmem_file("f", &zeros(2 * PAGE));
        let mut script = vec![
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "8192",
            ",",
            "store",
            "5000",
            "durable",
            ",",
        ];
        script.extend_from_slice(sync);
        script.extend_from_slice(&[",", "kill"]);
        killed(w.probe(&script));
        w.drop_shadows();
        assert!(
            contains(&backing(&f), "durable"),
            "{sync:?} did not persist"
        );
    }
}

// The negative control: without a sync, a power failure loses the store.
#[test]
fn without_sync_power_failure_loses_the_store() {
    let w = World::new("nosync");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "10",
        "volatile",
        ",",
        "kill",
    ]));
    w.drop_shadows();
    assert!(!contains(&backing(&f), "volatile"));
}

// A range-scoped msync writes back only its range.
#[test]
fn msync_is_range_scoped() {
    let w = World::new("range");
    let f = w.pmem_file("f", &zeros(3 * PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "12288",
        ",",
        "store",
        "10",
        "first",
        ",",
        "store",
        "8200",
        "third",
        ",",
        "msync",
        "sync",
        "8192",
        "4096",
        ",",
        "kill",
    ]));
    w.drop_shadows();
    let b = backing(&f);
    assert!(contains(&b, "third"));
    assert!(!contains(&b, "first"), "msync of page 2 wrote page 0 too");
}

// 4. Coherence within a process, same observations as the kernel page cache.
#[test]
fn file_io_and_mappings_agree_like_the_page_cache() {
    let w = World::new("coherent");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    let out = w.probe_both(
        &pf,
        &of,
        "open {f} rw , map 8192 , store 100 mapped , pread 100 6 , pwrite 200 written , \
         load 200 7 , seek 100 , read 6 , seek 300 , writev ab cd , load 300 4 , \
         preadv 100 3 3 , ftruncate 16384 , mremap 16384 , store 12000 grown , pread 12000 5",
    );
    assert!(
        out.contains("pread: mapped")
            && out.contains("load: written")
            && out.contains("pread: grown")
    );
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
    // Exit wrote everything back: the backing equals the ordinary file.
    assert_eq!(backing(&pf), backing(&of));
}

// Two processes mapping one file see each other's stores at once; one's
// fsync persists the other's stores (as the kernel's would).
#[test]
fn two_processes_share_one_shadow() {
    let w = World::new("twoproc");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let (a_ready, b_ready, done) = (w.root.join("a"), w.root.join("b"), w.root.join("done"));
    let mut b = w.shim_cmd(probe());
    b.args([
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "8192",
        ",",
        "waitfor",
        s(&a_ready),
        ",",
        "load",
        "0",
        "3",
        ",",
    ])
    .args([
        "store",
        "4100",
        "BBB",
        ",",
        "touch",
        s(&b_ready),
        ",",
        "waitfor",
        s(&done),
        ",",
        "kill",
    ]);
    let hb = std::thread::spawn(move || run(b));
    let out_a = killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "8192",
        ",",
        "store",
        "0",
        "AAA",
        ",",
        "touch",
        s(&a_ready),
        ",",
        "waitfor",
        s(&b_ready),
        ",",
        "load",
        "4100",
        "3",
        ",",
        "fsync",
        ",",
        "touch",
        s(&done),
        ",",
        "kill",
    ]));
    let out_b = killed(hb.join().unwrap());
    assert!(
        out_b.contains("load: AAA"),
        "B did not see A's store: {out_b}"
    );
    assert!(
        out_a.contains("load: BBB"),
        "A did not see B's store: {out_a}"
    );
    w.drop_shadows();
    let bk = backing(&f);
    assert!(
        contains(&bk, "AAA") && contains(&bk, "BBB"),
        "A's fsync did not persist both stores"
    );
}

// 5. Lifecycle: munmap + _exit, exit without munmap, SIGKILL.
#[test]
fn stores_survive_munmap_and_underscore_exit() {
    let w = World::new("munmap");
    let f = w.pmem_file("f", &zeros(PAGE));
    ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "7",
        "unmapped",
        ",",
        "munmap",
        ",",
        "_exit",
    ]));
    let out = killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "7",
        "8",
        ",",
        "fsync",
        ",",
        "kill",
    ]));
    assert!(out.contains("load: unmapped"), "{out}");
    let o = w.probe(&["open", s(&f), "ro", ",", "pread", "7", "8"]);
    assert!(ok(o).contains("pread: unmapped"));
    w.drop_shadows();
    assert!(contains(&backing(&f), "unmapped"));
}

#[test]
fn exit_without_munmap_writes_back() {
    let w = World::new("exit");
    let f = w.pmem_file("f", &zeros(PAGE));
    ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "7",
        "atexit",
        ",",
        "exit",
    ]));
    w.drop_shadows();
    assert!(contains(&backing(&f), "atexit"));
    assert!(w.shadow_files().is_empty());
}

#[test]
fn sigkilled_writer_is_seen_by_the_next_process_and_made_durable() {
    let w = World::new("sigkill");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "7",
        "killed",
        ",",
        "kill",
    ]));
    assert!(!contains(&backing(&f), "killed"));
    assert!(
        !w.shadow_files().is_empty(),
        "the shadow must outlive its writer"
    );
    let out = killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "7",
        "6",
        ",",
        "fsync",
        ",",
        "kill",
    ]));
    assert!(out.contains("load: killed"));
    w.drop_shadows();
    assert!(contains(&backing(&f), "killed"));
}

// fork: the child's mappings stay coherent with the parent's; its syncs work.
#[test]
fn forked_child_stays_coherent_and_syncs() {
    let w = World::new("fork");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    // After `fork`, the rest runs in the child; the parent waits, then
    // continues with nothing left (prints child's status).
    let out = ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "8192",
        ",",
        "store",
        "0",
        "parent",
        ",",
        "fork",
        ",",
        "load",
        "0",
        "6",
        ",",
        "store",
        "5000",
        "child",
        ",",
        "msync",
        ",",
        "_exit",
    ]));
    assert!(out.contains("load: parent"), "{out}");
    assert!(out.contains("child: 0"), "{out}");
    assert!(
        contains(&backing(&f), "child"),
        "the child's msync did not write back"
    );
    assert!(
        contains(&backing(&f), "parent"),
        "the parent's exit did not write back"
    );
}

// 2. DAX-aware callers get the direct mapping.
#[test]
fn map_sync_map_dax_and_daxshim_dax_map_directly() {
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["validate-sync"], None),
        (&["dax"], None),
        (&[], Some("1")),
        (&[], Some("DIR")),
    ];
    for (flags, dax_env) in cases {
        let mut w = World::new("direct");
        if let Some(v) = dax_env {
            let v = if *v == "DIR" {
                w.pmem.to_str().unwrap().to_string()
            } else {
                v.to_string()
            };
            w = w.env("DAXSHIM_DAX", &v);
        }
        let f = w.pmem_file("f", &zeros(PAGE));
        let mut script = vec!["open", s(&f), "rw", ",", "map", "4096"];
        script.extend_from_slice(flags);
        script.extend_from_slice(&[",", "store", "9", "direct", ",", "exit"]);
        ok(w.probe(&script));
        assert!(contains(&backing(&f), "direct"));
        assert_eq!(w.stat_sum("mappings_direct"), 1, "{flags:?} {dax_env:?}");
        assert_eq!(w.stat_sum("mappings_shadowed"), 0);
    }
}

// A direct mapping bypasses the shadow: stores are in the backing before
// any sync (the isolation test's opposite).
#[test]
fn direct_mapping_stores_reach_the_backing_without_sync() {
    let w = World::new("directnow");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        "dax",
        ",",
        "store",
        "9",
        "nosync",
        ",",
        "kill",
    ]));
    w.drop_shadows();
    assert!(contains(&backing(&f), "nosync"));
}

// MAP_PRIVATE: a private copy of the shadow, never written back.
#[test]
fn private_mappings_are_never_written_back() {
    let w = World::new("private");
    let f = w.pmem_file("f", b"original-content");
    let out = ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "pwrite",
        "0",
        "ORIGINAL",
        ",",
        "map",
        "4096",
        "private",
        ",",
        "load",
        "0",
        "8",
        ",",
        "store",
        "0",
        "privstor",
        ",",
        "msync",
        ",",
        "pread",
        "0",
        "8",
        ",",
        "exit",
    ]));
    assert!(
        out.contains("load: ORIGINAL"),
        "private mapping must see the file's latest data: {out}"
    );
    assert!(out.contains("pread: ORIGINAL"), "{out}");
    assert!(!contains(&backing(&f), "privstor"));
}

// Files outside the pmem directories are untouched by the shim.
#[test]
fn files_outside_pmem_are_not_shadowed() {
    let w = World::new("outside");
    let f = w.plain_file("f", &zeros(PAGE));
    let stored = w.root.join("stored");
    let go = w.root.join("go");
    let mut c = w.shim_cmd(probe());
    c.args([
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "9",
        "plainfile",
        ",",
        "touch",
        s(&stored),
        ",",
    ])
    .args(["waitfor", s(&go), ",", "exit"]);
    let h = std::thread::spawn(move || run(c));
    wait_for(&stored);
    // The kernel page cache: the store is visible to read() at once.
    assert!(contains(&backing(&f), "plainfile"));
    std::fs::write(&go, b"").unwrap();
    ok(h.join().unwrap());
    assert_eq!(w.stat_sum("mappings_shadowed"), 0);
    assert!(w.shadow_files().is_empty());
}

// 7. errno exactly as the kernel's: the same probe on an ordinary file
// without the shim is the reference.
#[test]
fn errors_match_the_kernel() {
    let w = World::new("errno");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    for mode in ["ro", "rw"] {
        // msync: unaligned, over a hole in the mapping (the shim's own
        // mappings may sit anywhere around it, so not "beyond" it),
        // MS_ASYNC|MS_SYNC, unknown flag, MS_INVALIDATE, no flag; fsync of
        // a bad fd; mmap: length 0,
        // unaligned offset, PROT_WRITE|MAP_SHARED (EACCES on a read-only fd),
        // MAP_SHARED_VALIDATE; munmap unaligned; mremap growing in place.
        let out = w.probe_both(
            &pf,
            &of,
            &format!(
                "open {{f}} {mode} , map 8192 ro , try_msync 1 4096 4 try_munmap 4096 4096 \
                 try_msync 0 8192 4 \
                 try_msync 0 4096 7 try_msync 0 4096 64 try_msync 0 4096 2 try_msync 0 4096 0 \
                 try_fsync 987 try_mmap 0 3 1 0 try_mmap 4096 3 1 1 try_mmap 4096 3 1 0 \
                 try_mmap 4096 3 3 0 try_munmap 1 4096 try_mremap 16384 0"
            ),
        );
        assert!(
            out.contains("errno=22") && out.contains("errno=12") && out.contains("errno=9"),
            "{mode}: {out}"
        );
    }
    // MAP_SHARED_VALIDATE|MAP_SYNC: EOPNOTSUPP on an ordinary file, as the
    // kernel says; on (emulated) pmem the shim strips MAP_SYNC and maps.
    let sync_map = |f: &std::path::Path| {
        [
            "open",
            s(f),
            "rw",
            ",",
            "try_mmap",
            "4096",
            "3",
            "0x80003",
            "0",
        ]
        .map(String::from)
    };
    let run_it = |shim: bool, f: &std::path::Path| {
        let a = sync_map(f);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        ok(if shim { w.probe(&a) } else { w.probe_plain(&a) })
    };
    assert_eq!(run_it(true, &pf), "ret=ok errno=0\n");
    assert_eq!(run_it(false, &of), "ret=-1 errno=95\n");
}

// Beyond end of file: SIGBUS, as with the kernel.
#[test]
fn access_beyond_eof_raises_sigbus_like_the_kernel() {
    use std::os::unix::process::ExitStatusExt;
    let w = World::new("sigbus");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    for f in [&pf, &of] {
        let script = [
            "open",
            s(f),
            "rw",
            ",",
            "map",
            "8192",
            ",",
            "ftruncate",
            "4096",
            ",",
            "load",
            "5000",
            "1",
        ];
        let o = if f == &pf {
            w.probe(&script)
        } else {
            w.probe_plain(&script)
        };
        assert_eq!(o.status.signal(), Some(7), "{}", s(f));
    }
    // The shim was in the path: the killed process left its shadow.
    assert!(!w.shadow_files().is_empty());
}

// Bad configuration: one line naming the variable, status 125, before main.
#[test]
fn invalid_env_values_exit_125_before_main() {
    let cases = [
        ("DAXSHIM_LOG", "loud"),
        ("DAXSHIM_PMEM", "relative/dir"),
        ("DAXSHIM_PMEM", "/nonexistent-daxshim-dir"),
        ("DAXSHIM_DAX", "yes"),
        ("DAXSHIM_TRACKER", "magic"),
        ("DAXSHIM_FLUSH", "wbinvd"),
        ("DAXSHIM_SHADOW_DIR", "shm"),
        ("DAXSHIM_STATS", ""),
    ];
    for (var, val) in cases {
        let w = World::new("badenv");
        let mut c = w.shim_cmd(probe());
        c.env(var, val)
            .args(["touch", w.root.join("main-ran").to_str().unwrap()]);
        let o = run(c);
        assert_eq!(o.status.code(), Some(125), "{var}={val}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(var), "{err}");
        assert!(err.contains("expected"), "{err}");
        assert!(
            !w.root.join("main-ran").exists(),
            "main ran despite {var}={val}"
        );
    }
}

// 6. Shadows are private to their user and never stale.
#[test]
fn shadow_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new("perm");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "0",
        "x",
        ",",
        "kill",
    ]));
    let dmode = std::fs::metadata(&w.shadow).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    for n in w.shadow_files() {
        let m = std::fs::metadata(w.shadow.join(&n))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, 0o600, "{n}");
    }
}

#[test]
fn unsafe_shadow_dir_falls_back_to_direct_mapping_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new("baddir");
    std::fs::create_dir_all(&w.shadow).unwrap();
    std::fs::set_permissions(&w.shadow, std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = w.pmem_file("f", &zeros(PAGE));
    let o = w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "3",
        "fallback",
        ",",
        "kill",
    ]);
    let err = stderr(&o);
    killed(o);
    assert!(
        err.contains("daxshim") && err.contains("must not be accessible"),
        "{err}"
    );
    // Direct: the store is in the backing, nothing was lost.
    assert!(contains(&backing(&f), "fallback"));
}

#[test]
fn file_rewritten_behind_the_shims_back_is_not_served_stale() {
    let w = World::new("stale");
    let f = w.pmem_file("f", &zeros(PAGE));
    // A reader dies, leaving a clean shadow behind.
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "0",
        "1",
        ",",
        "kill",
    ]));
    assert!(!w.shadow_files().is_empty());
    // Rewritten without the shim.
    std::fs::write(&f, b"rewritten-by-another-program").unwrap();
    let out = ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "0",
        "9",
        ",",
        "pread",
        "0",
        "9",
    ]));
    assert!(
        out.contains("load: rewritten") && out.contains("pread: rewritten"),
        "{out}"
    );
}

#[test]
fn unsynced_shadow_of_a_rewritten_file_is_kept_aside_not_served() {
    let w = World::new("orphan");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "0",
        "unsynced",
        ",",
        "kill",
    ]));
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&f, b"external").unwrap();
    let o = w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "0",
        "8",
    ]);
    let err = stderr(&o);
    let out = ok(o);
    assert!(out.contains("load: external"), "{out}");
    assert!(err.contains("orphan"), "{err}");
    assert!(w.shadow_files().iter().any(|n| n.contains(".orphan-")));
}

#[test]
fn recreated_file_never_meets_the_old_shadow() {
    let w = World::new("recreate");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "0",
        "oldfile",
        ",",
        "kill",
    ]));
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, zeros(PAGE)).unwrap();
    let out = ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "0",
        "7",
    ]));
    assert!(!out.contains("oldfile"), "{out}");
}

// The flush engine writes only the lines that changed.
#[test]
fn sync_writes_only_changed_cachelines() {
    // Both writebacks of emulated pmem: pwrite of the changed spans (the
    // default), and stores + cache flushes through the mapping (real pmem's).
    for mode in ["auto", "stores"] {
        sync_writes_only_changed_cachelines_with(mode);
    }
}

fn sync_writes_only_changed_cachelines_with(mode: &str) {
    let w = World::new("lines").env("DAXSHIM_WRITEBACK", mode);
    let f = w.pmem_file("f", &zeros(256 * PAGE));
    ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "1048576",
        ",",
        "store",
        "70000",
        "x",
        ",",
        "store",
        "70070",
        "y",
        ",",
        "store",
        "900000",
        "z",
        ",",
        "msync",
        ",",
        "close",
        ",",
        "munmap",
    ]));
    assert_eq!(w.stat_sum("lines_written"), 3);
    // Real pmem is always written back by stores and flushes.
    let flushed = if mode == "stores" || real_dax_dir().is_some() {
        3 * 64
    } else {
        0
    };
    assert_eq!(w.stat_sum("bytes_flushed"), flushed, "{mode}");
    assert_eq!(backing(&f)[70000], b'x');
    assert_eq!(backing(&f)[900000], b'z');
    if w.tracker() == "uffd" || w.tracker() == "mprotect" {
        // Exact tracking: two dirty pages, 64 lines each, were compared.
        assert_eq!(w.stat_sum("pages_dirtied"), 2);
        let compared = w.stat_sum("lines_compared");
        assert!(compared <= 128, "compared {compared}");
    } else {
        // No tracker (kernel without userfaultfd WP async): every line of
        // the file is compared.
        assert!(w.stat_sum("lines_compared") >= 16384);
    }
}

#[test]
fn compare_tracker_is_a_correct_oracle() {
    let w = World::new("compare").env("DAXSHIM_TRACKER", "compare");
    let f = w.pmem_file("f", &zeros(256 * PAGE));
    killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "1048576",
        ",",
        "store",
        "70000",
        "cmp",
        ",",
        "msync",
        ",",
        "kill",
    ]));
    w.drop_shadows();
    assert!(contains(&backing(&f), "cmp"));
    // Killed: no stats. Run once more to count a full compare.
    w.clear_stats();
    ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "1048576",
        ",",
        "store",
        "1",
        "q",
        ",",
        "msync",
        ",",
        "munmap",
        ",",
        "close",
    ]));
    assert_eq!(w.stat_sum("lines_written"), 1);
    assert!(w.stat_sum("lines_compared") >= 16384);
}

// Python's mmap module (code we did not write), under the shim.
#[test]
fn python_mmap_module_flush_persists_and_isolates() {
    let w = World::new("python");
    let f = w.pmem_file("f", &zeros(PAGE));
    let script = format!(
        r#"
import mmap, os, signal
fd = os.open({f:?}, os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[10:16] = b"python"
print("before-flush", open({f:?}, "rb").read().find(b"python") >= 0)  # read() goes through the shim
m.flush()
os.kill(os.getpid(), signal.SIGKILL)
"#,
        f = s(&f)
    );
    let mut c = w.shim_cmd(python());
    c.args(["-c", &script]);
    let o = run(c);
    let out = stdout(&o);
    killed(o);
    assert!(
        out.contains("before-flush True"),
        "read() must see the mapped store: {out}"
    );
    w.drop_shadows();
    assert!(contains(&backing(&f), "python"));
}

// The CLI wraps a command the same way.
#[test]
fn daxshim_run_preloads_and_keeps_ld_preload() {
    let w = World::new("cli");
    let f = w.pmem_file("f", &zeros(PAGE));
    let cli = target_dir().join("daxshim");
    let mut c = w.cmd(&cli);
    c.env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env("LD_PRELOAD", "")
        .args([
            "run",
            "--pmem",
            s(&w.pmem),
            "--stats",
            &w.stats_pattern(),
            "--",
        ])
        .arg(probe())
        .args([
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "4096",
            ",",
            "store",
            "0",
            "viacli",
            ",",
            "exit",
        ]);
    ok(run(c));
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
    assert!(contains(&backing(&f), "viacli"));
    let o = run({
        let mut c = w.cmd(&cli);
        c.args(["run", "--", "/nonexistent/cmd"]);
        c
    });
    assert_eq!(o.status.code(), Some(127));
}

// 8. Threads: stores to shared and private pages, concurrent syncs, and
// other threads mapping and unmapping the same file; nothing is lost.
#[test]
fn threads_store_sync_map_and_unmap_concurrently() {
    // Seeded; DAXSHIM_STRESS_ROUNDS=N for a long run.
    let rounds: usize = std::env::var("DAXSHIM_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for seed in ["1", "7"] {
        let threads = 8usize;
        let w = World::new("threads");
        let f = w.pmem_file("f", &zeros(PAGE));
        let mut c = w.shim_cmd(c_example("threads"));
        c.arg(&f)
            .arg(threads.to_string())
            .arg(rounds.to_string())
            .arg(seed);
        assert!(ok(run(c)).contains("done"), "seed {seed}");
        assert!(!w.shadow_files().is_empty(), "the mapping was not shadowed");
        w.drop_shadows(); // only what the syncs persisted counts
        let b = backing(&f);
        for t in 0..threads {
            let slot = u64::from_ne_bytes(b[t * 8..t * 8 + 8].try_into().unwrap());
            assert_eq!(slot, rounds as u64, "thread {t}'s counter");
            let page = &b[PAGE * (t + 1)..PAGE * (t + 2)];
            let want = format!("{t}:{rounds}\0");
            for l in 0..64 {
                assert!(
                    page[l * 64..].starts_with(want.as_bytes()),
                    "thread {t} line {l}"
                );
            }
        }
    }
}

// Descriptors inherited from the parent are adopted at start-up.
#[test]
fn inherited_descriptors_are_shadowed() {
    let w = World::new("inherit");
    let f = w.pmem_file("f", &zeros(PAGE));
    let script = format!(
        r#"
import os, sys
fd = os.open({f:?}, os.O_RDWR)
os.set_inheritable(fd, True)
os.execv({probe:?}, ["probe", "usefd", str(fd), ",", "map", "4096", ",", "store", "0", "inherited", ",", "msync", ",", "kill"])
"#,
        f = s(&f),
        probe = s(&probe())
    );
    // Only the exec'd probe runs under the shim: python opens the file
    // without it, then puts the library in the environment of the exec.
    let script = script.replace(
        "os.execv(",
        "os.environ['LD_PRELOAD'] = os.environ['X_PRELOAD']; os.execve(",
    );
    let script = script.replace("\"kill\"])", "\"kill\"], os.environ)");
    let mut c = w.cmd(python());
    c.args(["-c", &script])
        .env("DAXSHIM_PMEM", &w.pmem)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env("X_PRELOAD", lib());
    killed(run(c));
    assert!(
        !w.shadow_files().is_empty(),
        "the inherited descriptor was not shadowed"
    );
    w.drop_shadows();
    assert!(contains(&backing(&f), "inherited"));
}

// ftruncate, fallocate and hole punching keep the shadow equal to the file.
#[test]
fn size_and_allocation_changes_match_the_page_cache() {
    let w = World::new("falloc");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    w.probe_both(
        &pf,
        &of,
        "open {f} rw , map 16384 , fill 0 8192 a , msync , fallocate 0 16384 , store 12000 tail , \
         pread 12000 4 , punch 4096 4096 , load 4090 12 , pread 4090 12 , ftruncate 6000 , \
         pread 5990 100 , ftruncate 8192 , load 5998 4",
    );
    assert_eq!(backing(&pf), backing(&of));
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
}

// truncate(2) by path: the shadow follows.
#[test]
fn truncate_by_path_resizes_the_shadow() {
    let w = World::new("truncpath");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let script = format!(
        r#"
import mmap, os
fd = os.open({f:?}, os.O_RDWR)
m = mmap.mmap(fd, 8192)
m[0:4] = b"keep"
os.truncate({f:?}, 4096)
print(os.pread(fd, 10, 0)[:4], os.fstat(fd).st_size)
try:
    m[5000]
except Exception as e:
    print("error", type(e).__name__)
"#,
        f = s(&f)
    );
    let mut c = w.shim_cmd(python());
    c.args(["-c", &script]);
    let o = run(c);
    use std::os::unix::process::ExitStatusExt;
    // Reading beyond the new end of file raises SIGBUS, as with the kernel.
    assert_eq!(o.status.signal(), Some(7), "{}", stderr(&o));
    assert!(stdout(&o).contains("b'keep' 4096"), "{}", stdout(&o));
}

// A shadow that cannot be created (here: the file size limit makes growing
// the shadow fail, as a full /dev/shm would) falls back to the direct
// mapping with a warning: nothing is lost.
#[test]
fn shadow_creation_failure_falls_back_to_direct_mapping() {
    let w = World::new("nospace");
    let f = w.pmem_file("f", &zeros(64 * PAGE));
    let mut c = w.shim_cmd("sh");
    c.arg("-c")
        .arg("trap '' XFSZ; ulimit -f 8; exec \"$0\" \"$@\"")
        .arg(probe())
        .args([
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "262144",
            ",",
            "store",
            "200000",
            "stillsafe",
            ",",
            "kill",
        ]);
    let o = run(c);
    let err = stderr(&o);
    killed(o);
    assert!(err.contains("mapping the file directly"), "{err}");
    w.drop_shadows();
    assert!(contains(&backing(&f), "stillsafe"));
}

// Lifecycle, compared with the kernel page cache: after the writer goes
// away (munmap + _exit, exit, SIGKILL), the next process sees its stores.
#[test]
fn lifecycle_observations_match_the_page_cache() {
    let endings: &[&[&str]] = &[
        &["munmap", ",", "_exit"],
        &["exit"],
        &["kill"],
        &["close", ",", "_exit"],
    ];
    for ending in endings {
        let w = World::new("lifecycle");
        let pf = w.pmem_file("f", &zeros(PAGE));
        let of = w.plain_file("f", &zeros(PAGE));
        let mut outs = Vec::new();
        for (f, shim) in [(&pf, true), (&of, false)] {
            let mut writer = vec![
                "open",
                s(f),
                "rw",
                ",",
                "map",
                "4096",
                ",",
                "store",
                "11",
                "lifecycle",
                ",",
            ];
            writer.extend_from_slice(ending);
            let reader = [
                "open",
                s(f),
                "ro",
                ",",
                "map",
                "4096",
                "ro",
                ",",
                "load",
                "11",
                "9",
                ",",
                "pread",
                "11",
                "9",
            ];
            let (wo, ro) = if shim {
                (w.probe(&writer), w.probe(&reader))
            } else {
                (w.probe_plain(&writer), w.probe_plain(&reader))
            };
            outs.push((wo.status.code(), ok(ro)));
        }
        assert_eq!(outs[0], outs[1], "{ending:?}");
        assert!(outs[0].1.contains("load: lifecycle") && outs[0].1.contains("pread: lifecycle"));
    }
}

// Under another allocator (jemalloc maps its own arenas), in both preload
// orders: no recursion, no deadlock, same results.
#[test]
fn works_under_jemalloc_in_either_preload_order() {
    let je = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    assert!(
        std::path::Path::new(je).exists(),
        "scripts/deps.sh installs libjemalloc2"
    );
    for order in [0, 1] {
        let w = World::new("jemalloc");
        let f = w.pmem_file("f", &zeros(4 * PAGE));
        let preload = if order == 0 {
            format!("{}:{je}", lib().display())
        } else {
            format!("{je}:{}", lib().display())
        };
        let mut c = w.shim_cmd(probe());
        c.env("LD_PRELOAD", preload).args([
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "16384",
            ",",
            "store",
            "9000",
            "jemalloc",
            ",",
            "fork",
            ",",
            "msync",
            ",",
            "pread",
            "9000",
            "8",
            ",",
            "_exit",
        ]);
        let out = ok(run(c));
        assert!(
            out.contains("pread: jemalloc") && out.contains("child: 0"),
            "{out}"
        );
        w.drop_shadows();
        assert!(contains(&backing(&f), "jemalloc"));
    }
}

// A failed writeback returns EIO and keeps the dirty state: the retry
// writes the data.
#[test]
fn failed_sync_returns_eio_and_retry_persists() {
    for sync in [
        ["try_msync", "0", "4096", "4"],
        ["try_fsync", "self", ",", ","],
    ] {
        let w = World::new("eio").env("DAXSHIM_DEBUG_FAIL_SYNCS", "1");
        let f = w.pmem_file("f", &zeros(PAGE));
        let mut script = vec![
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "4096",
            ",",
            "store",
            "5",
            "retried",
            ",",
        ];
        script.extend_from_slice(&sync);
        script.push(",");
        script.extend_from_slice(&sync);
        script.extend_from_slice(&[",", "kill"]);
        let out = killed(w.probe(&script));
        assert_eq!(out, "ret=-1 errno=5\nret=0 errno=0\n", "{sync:?}");
        w.drop_shadows();
        assert!(contains(&backing(&f), "retried"), "{sync:?}");
    }
}

// exec leaves the stores in the shared shadow; the next process sees them
// and its sync makes them durable.
#[test]
fn exec_leaves_stores_for_the_next_process() {
    let w = World::new("exec");
    let f = w.pmem_file("f", &zeros(PAGE));
    let script = format!(
        r#"
import mmap, os
fd = os.open({f:?}, os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[20:24] = b"exec"
os.execv("/bin/true", ["true"])
"#,
        f = s(&f)
    );
    let mut c = w.shim_cmd(python());
    c.args(["-c", &script]);
    ok(run(c));
    let out = killed(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "20",
        "4",
        ",",
        "fsync",
        ",",
        "kill",
    ]));
    assert!(out.contains("load: exec"), "{out}");
    w.drop_shadows();
    assert!(contains(&backing(&f), "exec"));
}

// Lazy shadow data: a process that only reads and writes the file and a
// process that maps it later (creating the shadow's data then) stay
// coherent in both directions.
#[test]
fn file_io_process_and_later_mapper_stay_coherent() {
    let w = World::new("lazy");
    let f = w.pmem_file("f", &zeros(PAGE));
    let (a1, a2, b1) = (w.root.join("a1"), w.root.join("a2"), w.root.join("b1"));
    let mut a = w.shim_cmd(probe());
    a.args([
        "open",
        s(&f),
        "rw",
        ",",
        "pwrite",
        "0",
        "AAAA",
        ",",
        "touch",
        s(&a1),
        ",",
        "waitfor",
        s(&b1),
        ",",
    ])
    .args([
        "pwrite",
        "100",
        "A2",
        ",",
        "pread",
        "200",
        "4",
        ",",
        "touch",
        s(&a2),
        ",",
        "exit",
    ]);
    let ha = std::thread::spawn(move || run(a));
    wait_for(&a1);
    let out_b = ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "load",
        "0",
        "4",
        ",",
        "store",
        "200",
        "BBBB",
        ",",
        "touch",
        s(&b1),
        ",",
        "waitfor",
        s(&a2),
        ",",
        "load",
        "100",
        "2",
        ",",
        "msync",
        ",",
        "exit",
    ]));
    let out_a = ok(ha.join().unwrap());
    assert!(
        out_b.contains("load: AAAA") && out_b.contains("load: A2"),
        "{out_b}"
    );
    assert!(
        out_a.contains("pread: BBBB"),
        "the writer did not see the mapper's store: {out_a}"
    );
    let b = backing(&f);
    assert!(contains(&b, "AAAA") && contains(&b, "A2") && contains(&b, "BBBB"));
    assert_eq!(w.stat_sum("shadows_created"), 1);
}

// A file that is only opened, read and written gets no shadow data.
#[test]
fn unmapped_files_get_no_shadow_copy() {
    let w = World::new("nocopy");
    let f = w.pmem_file("f", &zeros(PAGE));
    let stored = w.root.join("stored");
    let go = w.root.join("go");
    let mut c = w.shim_cmd(probe());
    c.args([
        "open",
        s(&f),
        "rw",
        ",",
        "pwrite",
        "0",
        "direct",
        ",",
        "touch",
        s(&stored),
        ",",
        "waitfor",
        s(&go),
        ",",
    ])
    .args(["fsync", ",", "exit"]);
    let h = std::thread::spawn(move || run(c));
    wait_for(&stored);
    // Only the header exists while the file is open.
    let files = w.shadow_files();
    assert!(files.iter().all(|n| n.ends_with(".meta")), "{files:?}");
    std::fs::write(&go, b"").unwrap();
    ok(h.join().unwrap());
    assert_eq!(w.stat_sum("shadows_created"), 0);
    assert!(contains(&backing(&f), "direct"));
}
