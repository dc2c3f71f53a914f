//! Robustness (issue: "Robustness"): signals, fork during syncs, calls from
//! signal handlers, fuzzed arguments compared with the kernel's answers,
//! descriptor juggling, files renamed, unlinked and truncated under their
//! mappings, hostile shadow directories.

mod common;
use common::*;

fn hostile(w: &World, shim: bool, args: &[&str]) -> std::process::Output {
    let mut c = if shim {
        w.shim_cmd(c_example("hostile"))
    } else {
        w.cmd(c_example("hostile"))
    };
    c.args(args);
    run(c)
}

// The program's own SIGBUS/SIGSEGV handlers (sigaction with SA_SIGINFO and
// SA_ONSTACK or SA_RESETHAND, or signal()) get the fault, with the right
// address, exactly as without the shim.
#[test]
fn programs_own_fault_handlers_see_the_right_siginfo() {
    let w = World::new("signals");
    let pf = w.pmem_file("f", &[0u8; 4096]);
    let of = w.plain_file("f", &[0u8; 4096]);
    for mode in ["sigbus", "sigsegv"] {
        for how in ["sigaction", "resethand", "signal"] {
            let shim = ok(hostile(&w, true, &[mode, s(&pf), how]));
            let plain = ok(hostile(&w, false, &[mode, s(&of), how]));
            assert_eq!(shim, plain, "{mode} {how}");
            assert!(shim.starts_with("ok"), "{shim}");
        }
    }
    assert!(w.stat_sum("mappings_shadowed") >= 2);
}

// pwrite() from a signal handler while the interrupted code stores, syncs
// and reads: no deadlock, and the handler's writes are all there.
#[test]
fn hooked_calls_from_signal_handlers_do_not_deadlock() {
    let w = World::new("sigwrite");
    let f = w.pmem_file("f", &[0u8; 16384]);
    let out = ok(hostile(&w, true, &["sigwrite", s(&f), "3000"]));
    let n: usize = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(n >= 64, "too few handler writes: {out}");
    let b = backing(&f);
    // Slot w % 64 holds the handler's last write w to it.
    for w in n - 64..n {
        let at = 3072 + 16 * (w % 64);
        let want = format!("H{w:07}");
        assert_eq!(
            &b[at..at + 8],
            want.as_bytes(),
            "the handler's write {w} is missing: {out}"
        );
    }
    w.assert_shadowed();
}

// fork while another thread is inside a sync: the child neither deadlocks
// nor loses its own sync.
#[test]
fn fork_while_another_thread_syncs() {
    let w = World::new("forksync");
    let f = w.pmem_file("f", &vec![0u8; 2 << 20]);
    let out = ok(hostile(&w, true, &["forksync", s(&f), "40"]));
    assert!(out.contains("ok forksync 40"), "{out}");
    w.drop_shadows();
    let b = backing(&f);
    for i in 0..40 {
        assert_eq!(
            b[(1 << 20) + 4096 * 3 + i],
            b'c',
            "child {i}'s msync did not persist"
        );
    }
    w.assert_shadowed();
}

// Random mmap/msync/mremap/munmap/madvise arguments: the same return values
// and errno as the kernel gives on an ordinary file.
#[test]
fn fuzzed_mapping_calls_match_the_kernel() {
    let w = World::new("fuzz");
    let pf = w.pmem_file("f", &[0u8; 65536]);
    let of = w.plain_file("f", &[0u8; 65536]);
    for seed in ["1", "5", "9", "13"] {
        let shim = ok(hostile(&w, true, &["fuzz", s(&pf), seed, "400"]));
        let plain = ok(hostile(&w, false, &["fuzz", s(&of), seed, "400"]));
        let diff: Vec<_> = shim
            .lines()
            .zip(plain.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .collect();
        assert!(diff.is_empty(), "seed {seed}: shim vs kernel: {diff:#?}");
        assert_eq!(shim.lines().count(), plain.lines().count());
        assert!(
            shim.matches(" -1 ").count() > 100,
            "too few error cases: {shim}"
        );
    }
    assert!(w.stat_sum("mappings_shadowed") > 0);
}

// dup/dup2/dup3/F_DUPFD keep the descriptor table right: writes through a
// duplicate reach mappings, closing one duplicate keeps the others working.
#[test]
fn duplicated_descriptors_stay_coherent() {
    let script = r#"
import os, mmap, fcntl, sys
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 4096)
d1 = os.dup(fd); d2 = os.dup2(fd, 50); d3 = fcntl.fcntl(fd, fcntl.F_DUPFD, 60)
os.close(fd)
os.pwrite(d1, b"dup1", 0); os.pwrite(d2, b"dup2", 10); os.pwrite(d3, b"dup3", 20)
print(m[0:4], m[10:14], m[20:24])
m[30:34] = b"mmap"
os.close(d1)
os.closerange(d2, d2 + 1)            # close_range(2)
print(os.pread(d3, 4, 30))
m.flush()
"#;
    let w = World::new("dup");
    let pf = w.pmem_file("f", &[0u8; 4096]);
    let of = w.plain_file("f", &[0u8; 4096]);
    let mut outs = Vec::new();
    for (f, shim) in [(&pf, true), (&of, false)] {
        let mut c = if shim {
            w.shim_cmd(python())
        } else {
            w.cmd(python())
        };
        c.args(["-c", script, s(f)]);
        outs.push(ok(run(c)));
    }
    assert_eq!(outs[0], outs[1]);
    assert!(
        outs[0].contains("b'dup1' b'dup2' b'dup3'") && outs[0].contains("b'mmap'"),
        "{}",
        outs[0]
    );
    assert_eq!(backing(&pf), backing(&of));
    w.assert_shadowed();
}

// O_APPEND writes land at the end, in the backing and in the mapping.
#[test]
fn append_writes_land_at_the_end() {
    let w = World::new("append");
    let pf = w.pmem_file("f", b"0123456789");
    let of = w.plain_file("f", b"0123456789");
    let out = w.probe_both(
        &pf,
        &of,
        "open {f} append , map 4096 , write AAA , pwrite 0 BBB , pread 0 16 , load 10 6",
    );
    assert!(out.contains("pread: 0123456789AAABBB"), "{out}");
    assert_eq!(backing(&pf), backing(&of));
    w.assert_shadowed();
}

// Renamed and unlinked while mapped: stores still reach the file through
// its mapping and syncs (the kernel keeps the inode; so does the shim).
#[test]
fn rename_and_unlink_while_mapped() {
    let w = World::new("rename");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let g = w.pmem.join("g");
    let renamed = w.root.join("renamed");
    let go = w.root.join("go");
    let c = w.probe_cmd(&format!(
        "open {f} rw
         map 4096
         touch {renamed}
         waitfor {go}
         store 0 after-rename
         fsync
         exit",
        f = s(&f),
        renamed = s(&renamed),
        go = s(&go)
    ));
    let h = std::thread::spawn(move || run(c));
    wait_for(&renamed);
    std::fs::rename(&f, &g).unwrap();
    std::fs::write(&go, b"").unwrap();
    ok(h.join().unwrap());
    assert!(contains(&backing(&g), "after-rename"));
    // Unlinked while mapped: the mapping still works, no stale shadow stays.
    ok(w.probe(&format!(
        "open {g} rw
         map 4096
         store 0 unlinked
         pread 0 8
         fsync
         exit",
        g = s(&g)
    )));
    std::fs::remove_file(&g).unwrap();
    assert!(w.shadow_files().is_empty(), "{:?}", w.shadow_files());
    w.assert_shadowed();
}

// Another process truncates the file to zero and regrows it while it is
// mapped: the mapping sees zeros after the regrow, as with the kernel.
#[test]
fn truncate_to_zero_and_regrow_by_another_process() {
    let w = World::new("truncregrow");
    let mut outs = Vec::new();
    for pmem in [true, false] {
        let f = if pmem {
            w.pmem_file("f", &[b'x'; 8192])
        } else {
            w.plain_file("f", &[b'x'; 8192])
        };
        let (a, b) = (
            w.root.join(format!("a{pmem}")),
            w.root.join(format!("b{pmem}")),
        );
        let mut c = if pmem {
            w.shim_cmd(probe())
        } else {
            w.cmd(probe())
        };
        c.args(script_args(&format!(
            "open {f} rw
             map 8192
             load 0 4
             touch {a}
             waitfor {b}
             load 0 4
             store 100 new
             msync
             exit",
            f = s(&f),
            a = s(&a),
            b = s(&b)
        )));
        let h = std::thread::spawn(move || run(c));
        wait_for(&a);
        let script = format!(
            "open {f} rw
             ftruncate 0
             ftruncate 8192
             pwrite 4096 regrown",
            f = s(&f)
        );
        ok(if pmem {
            w.probe(&script)
        } else {
            w.probe_plain(&script)
        });
        std::fs::write(&b, b"").unwrap();
        let out = ok(h.join().unwrap());
        let bk = backing(&f);
        outs.push((
            out.replace(['\0'], "."),
            bk.len(),
            contains(&bk, "new"),
            contains(&bk, "regrown"),
            bk[0],
        ));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0].4, 0, "the regrown file starts with zeros");
    w.assert_shadowed();
}

// A symlink or a hard link to a pmem file, and a pmem directory that is
// itself a symlink: the same file, the same shadow.
#[test]
fn links_and_symlinked_pmem_directories_reach_the_same_shadow() {
    let w = World::new("links");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let sym = w.pmem.join("sym");
    std::os::unix::fs::symlink(&f, &sym).unwrap();
    let hard = w.pmem.join("hard");
    std::fs::hard_link(&f, &hard).unwrap();
    let out = ok(w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 viaorig
         open {sym} rw
         pread 0 7
         open {hard} rw
         pread 0 7
         exit",
        f = s(&f),
        sym = s(&sym),
        hard = s(&hard)
    )));
    assert_eq!(out.matches("pread: viaorig").count(), 2, "{out}");
    // DAXSHIM_PMEM naming a symlink to the directory.
    if real_dax_dir().is_none() {
        let link = w.root.join("pmemlink");
        std::os::unix::fs::symlink(&w.pmem, &link).unwrap();
        let mut c = w.probe_cmd(&format!(
            "open {f} rw
             map 4096
             store 20 vialink
             kill",
            f = s(&link.join("f"))
        ));
        c.env("DAXSHIM_PMEM", &link);
        killed(run(c));
        assert!(
            !contains(&backing(&f), "vialink"),
            "not shadowed through the symlinked directory"
        );
    }
    w.assert_shadowed();
}

// Hostile shadow directories: a symlink as the directory, or a symlink
// planted where a shadow file goes, is refused with a warning; the program
// maps the file directly and loses nothing.
#[test]
fn planted_symlinks_are_refused() {
    let w = World::new("planted");
    let f = w.pmem_file("f", &[0u8; 4096]);
    // The directory itself is a symlink.
    let target = w.root.join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, &w.shadow).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 safe1
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(
        err.contains("not a directory") || err.contains("symlink"),
        "{err}"
    );
    assert!(contains(&backing(&f), "safe1"));
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "wrote through the planted symlink"
    );
    std::fs::remove_file(&w.shadow).unwrap();
    // A symlink planted in place of the shadow's meta file.
    std::fs::create_dir(&w.shadow).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&w.shadow, std::fs::Permissions::from_mode(0o700)).unwrap();
    killed(w.probe(&format!("open {} rw , map 4096 , kill", s(&f))));
    let meta = std::fs::read_dir(&w.shadow)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".meta"))
        .unwrap()
        .path();
    let victim = w.root.join("victim");
    std::fs::write(&victim, b"do not touch").unwrap();
    for e in std::fs::read_dir(&w.shadow).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    std::os::unix::fs::symlink(&victim, &meta).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 safe2
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(
        err.contains("bypasses the shadow") || err.contains("directly"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    assert!(contains(&backing(&f), "safe2"));
    // A shadow directory that belongs to another user.
    for e in std::fs::read_dir(&w.shadow).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    std::os::unix::fs::chown(&w.shadow, Some(65534), Some(65534)).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 safe3
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(contains(&backing(&f), "safe3"));
    assert_eq!(
        std::fs::read_dir(&w.shadow).unwrap().count(),
        0,
        "wrote into another user's directory"
    );
}

// Fuzzed DAXSHIM_* values: always exit 125 with one line, or run; never a
// crash or a hang.
#[test]
fn fuzzed_environment_values_never_crash() {
    let vars = [
        "DAXSHIM_PMEM",
        "DAXSHIM_DAX",
        "DAXSHIM_SHADOW_DIR",
        "DAXSHIM_LOG",
        "DAXSHIM_STATS",
        "DAXSHIM_TRACKER",
        "DAXSHIM_FLUSH",
        "DAXSHIM_DEBUG_CRASH_AFTER_LINES",
        "DAXSHIM_DEBUG_FAIL_SYNCS",
    ];
    let values = [
        "",
        "1",
        "0",
        "-1",
        "/",
        "//",
        "::",
        "/tmp:",
        ":/tmp",
        "x".repeat(5000).as_str(),
        "\u{e9}t\u{e9}",
        "debug\n",
        "/nonexistent",
        "99999999999999999999999",
        "auto",
        "uffd ",
        "%p%p%p",
    ]
    .map(String::from);
    let w = World::new("envfuzz");
    for v in vars {
        for val in &values {
            let mut c = w.shim_cmd(probe());
            // Stats paths stay inside the test's directory (the shim writes them).
            let val = if v == "DAXSHIM_STATS" {
                format!("{}/stats{val}", w.root.display())
            } else {
                val.clone()
            };
            c.env(v, &val).args(["sleep", "0"]);
            let o = run(c);
            match o.status.code() {
                Some(0) => {}
                Some(125) => {
                    let err = stderr(&o);
                    assert_eq!(err.lines().count(), 1, "{v}={val:?}: {err}");
                    assert!(err.contains(v), "{v}={val:?}: {err}");
                }
                other => panic!("{v}={val:?}: status {other:?}, stderr {}", stderr(&o)),
            }
        }
    }
}

// sendfile, copy_file_range and splice move bytes inside the kernel; the
// shim keeps them coherent with mappings, as the page cache is.
#[test]
fn kernel_copies_are_coherent_with_mappings() {
    let script = r#"
import os, mmap, sys
a, b = sys.argv[1], sys.argv[2]   # a: the mapped file, b: another file
fa = os.open(a, os.O_RDWR); fb = os.open(b, os.O_RDWR)
m = mmap.mmap(fa, 8192)
m[0:6] = b"mapped"                         # only in the mapping (unsynced)
os.copy_file_range(fa, fb, 6, 0, 100)      # out of the mapped file
print("cfr-out", os.pread(fb, 6, 100))
os.pwrite(fb, b"fromB!", 200)
os.copy_file_range(fb, fa, 6, 200, 300)    # into the mapped file
print("cfr-in", m[300:306])
os.lseek(fa, 400, 0)
os.sendfile(fa, fb, 200, 6)                # into the mapped file at its position
print("sendfile-in", m[400:406], os.lseek(fa, 0, 1))
os.sendfile(fb, fa, 0, 6)                  # out of the mapped file
print("sendfile-out", os.pread(fb, 6, 0))
r, w = os.pipe()
os.write(w, b"piped!")
os.splice(r, fa, 6, offset_dst=500)        # pipe into the mapped file
print("splice-in", m[500:506])
os.splice(fa, w, 6, offset_src=0)          # mapped file into a pipe
print("splice-out", os.read(r, 6))
m.flush()
"#;
    let w = World::new("kcopy");
    let (pa, pb) = (
        w.pmem_file("a", &[0u8; 8192]),
        w.pmem_file("b", &[0u8; 8192]),
    );
    let (oa, ob) = (
        w.plain_file("a", &[0u8; 8192]),
        w.plain_file("b", &[0u8; 8192]),
    );
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", script, s(&pa), s(&pb)]);
    let mut plain = w.cmd(python());
    plain.args(["-c", script, s(&oa), s(&ob)]);
    let (x, y) = (ok(run(shim)), ok(run(plain)));
    assert_eq!(x, y);
    assert!(
        x.contains("cfr-out b'mapped'")
            && x.contains("sendfile-in b'fromB!'")
            && x.contains("splice-out b'mapped'"),
        "{x}"
    );
    assert_eq!(backing(&pa), backing(&oa));
    assert_eq!(backing(&pb), backing(&ob));
    w.assert_shadowed();
}

// posix_spawn, subprocess (vfork), and daemon-style double fork from a
// process with shadow mappings: no deadlock, children run with or without
// the shim, the parent's stores survive.
#[test]
fn spawn_vfork_and_double_fork_with_shadow_mappings() {
    let script = r#"
import os, mmap, subprocess, sys
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[0:6] = b"parent"
pid = os.posix_spawn("/bin/true", ["true"], os.environ)
assert os.waitpid(pid, 0)[1] == 0
env = dict(os.environ); env.pop("LD_PRELOAD", None)
assert subprocess.run(["/bin/true"], env=env).returncode == 0    # without the shim
assert subprocess.run(["/bin/true"]).returncode == 0             # with the shim
r, w = os.pipe()
if os.fork() == 0:                    # daemon(): fork, setsid, fork again
    os.setsid()
    if os.fork() == 0:
        m[10:16] = b"daemon"
        m.flush()
        os.write(w, b"x")
        os._exit(0)
    os._exit(0)
os.wait()
os.read(r, 1)
print(m[0:6], m[10:16])
m.flush()
"#;
    let w = World::new("spawn");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let mut c = w.shim_cmd(python());
    c.args(["-c", script, s(&f)]);
    let out = ok(run(c));
    assert!(out.contains("b'parent' b'daemon'"), "{out}");
    w.drop_shadows();
    let b = backing(&f);
    assert!(contains(&b, "parent") && contains(&b, "daemon"));
    assert!(
        w.stats().len() >= 2,
        "parent and children ran without the shim"
    );
}

// O_DIRECT reads and writes stay coherent with the shadow.
#[test]
fn o_direct_io_is_coherent() {
    let script = r#"
import os, mmap, sys
f = sys.argv[1]
m = mmap.mmap(os.open(f, os.O_RDWR), 8192)
d = os.open(f, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)              # page-aligned buffer
buf[0:6] = b"direct"
os.pwritev(d, [buf], 4096)
print("mapped sees", m[4096:4102])
m[0:6] = b"mapped"
n = os.preadv(d, [buf], 0)
print("direct read sees", buf[0:6])
m.flush()
"#;
    let w = World::new("odirect");
    let pf = w.pmem_file("f", &[0u8; 8192]);
    let of = w.plain_file("f", &[0u8; 8192]);
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", script, s(&pf)]);
    let x = ok(run(shim));
    assert_eq!(x, "mapped sees b'direct'\ndirect read sees b'mapped'\n");
    // The kernel page cache as the reference, where the control file
    // system takes O_DIRECT (tmpfs before Linux 6.6 does not).
    let mut plain = w.cmd(python());
    plain.args(["-c", script, s(&of)]);
    let o = run(plain);
    if o.status.success() {
        assert_eq!(stdout(&o), x);
        assert_eq!(backing(&pf), backing(&of));
    } else {
        assert!(stderr(&o).contains("Invalid argument"), "{}", stderr(&o));
    }
    w.assert_shadowed();
}
