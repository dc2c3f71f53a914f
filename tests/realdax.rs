//! Real DAX (issue: "Real DAX"). These tests need a file system mounted
//! `-o dax` on (emulated) NVDIMM; they are ignored in an ordinary `cargo
//! test` and run by `scripts/test-dax.sh` inside the daxvm guest with
//! `--ignored`, where DAXSHIM_TEST_DAX_DIR names the DAX mount. The rest of
//! the suite runs there too, against the DAX mount.

mod common;
use common::*;

fn dax_world(tag: &str) -> World {
    assert!(
        real_dax_dir().is_some(),
        "run inside the DAX VM (scripts/test-dax.sh), with DAXSHIM_TEST_DAX_DIR set"
    );
    World::new(tag)
}

/// Counts the system calls a probe run makes (strace, in the guest).
fn syscalls(w: &World, names: &str, script: &str) -> (String, String) {
    let mut c = w.shim_cmd("strace");
    c.args(["-f", "-e", &format!("trace={names}"), "-o"])
        .arg(w.root.join("strace.txt"))
        .arg(probe())
        .args(script_args(script));
    let out = ok(run(c));
    (
        out,
        std::fs::read_to_string(w.root.join("strace.txt")).unwrap(),
    )
}

#[test]
#[ignore = "needs a -o dax file system: scripts/test-dax.sh"]
fn dax_files_are_detected_without_configuration() {
    let w = dax_world("detect");
    let f = w.pmem_file("f", &[0u8; 8192]);
    let t = w.plain_file("t", &[0u8; 8192]); // guest /tmp: tmpfs, not DAX
    for (file, shadowed) in [(&f, 1), (&t, 0)] {
        w.clear_stats();
        let mut c = w.probe_cmd(&format!(
            "open {f} rw
             map 8192
             store 0 x
             exit",
            f = s(file)
        ));
        c.env_remove("DAXSHIM_PMEM");
        ok(run(c));
        assert_eq!(
            w.stat_sum("mappings_shadowed"),
            shadowed,
            "{}",
            file.display()
        );
    }
}

#[test]
#[ignore = "needs a -o dax file system: scripts/test-dax.sh"]
fn map_sync_is_the_kernels_own_on_real_dax() {
    let w = dax_world("mapsync");
    let f = w.pmem_file("f", &[0u8; 8192]);
    // MAP_SHARED_VALIDATE|MAP_SYNC reaches the kernel: the mapping has the
    // synchronous-fault flag "sf", and stores are in the file at once.
    let out = killed(w.probe(&format!(
        "open {f} rw
         map 8192 validate-sync
         vmflags
         store 9 mapsync
         kill",
        f = s(&f)
    )));
    assert!(out.contains(" sf"), "not a MAP_SYNC mapping: {out}");
    w.drop_shadows();
    assert!(contains(&backing(&f), "mapsync"));
    // MAP_DAX and DAXSHIM_DAX: direct mappings with the flags the kernel takes.
    let out = killed(w.probe(&format!(
        "open {f} rw
         map 8192 dax
         vmflags
         store 30 mapdax
         kill",
        f = s(&f)
    )));
    assert!(out.contains("vmflags:") && !out.contains(" sf"), "{out}");
    assert!(contains(&backing(&f), "mapdax"));
    // An unaware mapping is a shadow: not in the file before a sync.
    let out = killed(w.probe(&format!(
        "open {f} rw
         map 8192
         vmflags
         store 50 shadowed
         kill",
        f = s(&f)
    )));
    assert!(out.contains("vmflags:"), "{out}");
    w.drop_shadows();
    assert!(!contains(&backing(&f), "shadowed"));
}

#[test]
#[ignore = "needs a -o dax file system: scripts/test-dax.sh"]
fn writeback_on_real_dax_flushes_without_msync_and_persists_size_changes() {
    let w = dax_world("flushonly");
    let f = w.pmem_file("f", &[0u8; 8192]);
    // Data only: the caller's msync is validated by the kernel (one msync of
    // the shadow range); the writeback itself is cache flushes, no msync or
    // fdatasync of the backing.
    let (_, trace) = syscalls(
        &w,
        "msync,fdatasync,fsync",
        &format!(
            "open {f} rw
             map 8192
             store 100 flushed
             msync
             _exit",
            f = s(&f)
        ),
    );
    let msyncs = trace.lines().filter(|l| l.contains("msync(")).count();
    assert_eq!(msyncs, 1, "{trace}");
    assert!(
        !trace.contains("fdatasync(") && !trace.contains("fsync("),
        "{trace}"
    );
    w.drop_shadows();
    assert!(contains(&backing(&f), "flushed"));
    // A size change is metadata: msync(MS_SYNC) makes it durable with one
    // fdatasync of the backing, as the kernel's msync would.
    let (_, trace) = syscalls(
        &w,
        "msync,fdatasync",
        &format!(
            "open {f} rw
             map 8192
             ftruncate 16384
             mremap 16384
             store 12000 grown
             msync
             _exit",
            f = s(&f)
        ),
    );
    assert_eq!(
        trace.lines().filter(|l| l.contains("fdatasync(")).count(),
        1,
        "{trace}"
    );
    w.drop_shadows();
    let b = backing(&f);
    assert_eq!(b.len(), 16384);
    assert!(contains(&b, "grown"));
}

#[test]
#[ignore = "needs a -o dax file system: scripts/test-dax.sh"]
fn device_dax_and_non_regular_files_pass_through() {
    // /dev/dax* (device DAX) and other character devices are not regular
    // files: the shim never shadows them. /dev/zero stands in here (the VM
    // has no device-DAX namespace).
    let w = dax_world("devdax");
    ok(w.probe(
        "open /dev/zero rw
         map 4096
         store 0 x
         exit",
    ));
    assert_eq!(w.stat_sum("mappings_shadowed"), 0);
}

// No shadow can be made for a real DAX file: the call that needed it fails
// with the kernel's errno for the exhausted resource and nothing is mapped
// directly (an unaware program never gets DAX semantics it did not ask
// for); the log says why. A shadow file system full for the data (a
// 64 KiB tmpfs, the shadow copied whole): `mmap` fails with ENOMEM. Full
// even for the header (no inode left): `open` fails with ENOMEM. With
// DAXSHIM_FALLBACK=direct both go on and map the file directly. (Emulated
// pmem maps directly either way: core::shadows.)
#[test]
#[ignore = "needs a -o dax file system: scripts/test-dax.sh"]
fn no_shadow_for_a_real_dax_file_fails_the_call_unless_told_otherwise() {
    let w = dax_world("noshadow");
    let f = w.pmem_file("f", &[7u8; 1 << 20]);
    let small = w.root.join("small-shm");
    std::fs::create_dir_all(&small).unwrap();
    let script = format!(
        "open {f} rw
         try_mmap 1048576 3 1 0
         exit",
        f = s(&f)
    );
    for (mount_opts, fallback) in [
        ("size=64k", "fail"),
        ("size=64k", "direct"),
        ("size=64k,nr_inodes=2", "fail"),
        ("size=64k,nr_inodes=2", "direct"),
    ] {
        w.clear_stats();
        // A private mount namespace, so the small tmpfs needs no cleanup.
        let mut c = w.shim_cmd("unshare");
        c.args(["-m", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o {mount_opts},mode=0700 tmpfs {d} && exec \"$0\" \"$@\"",
                d = small.display()
            ))
            .arg(probe())
            .args(script_args(&script))
            .env("DAXSHIM_SHADOW_DIR", small.join("d"))
            .env("DAXSHIM_LAZY", "off")
            .env("DAXSHIM_FALLBACK", fallback);
        let o = run(c);
        let (out, err) = (stdout(&o), stderr(&o));
        let case = format!("{mount_opts} {fallback}: {out}{err}");
        match (mount_opts.contains("nr_inodes"), fallback) {
            (false, "fail") => {
                assert!(o.status.success(), "{case}");
                assert!(out.contains("ret=-1 errno=12"), "{case}");
                assert!(err.contains("DAXSHIM_FALLBACK=direct"), "{case}");
                assert_eq!(w.stat_sum("mappings_direct"), 0, "{case}");
            }
            (true, "fail") => {
                assert_eq!(o.status.code(), Some(2), "{case}");
                assert!(out.contains("FAIL open: Cannot allocate memory"), "{case}");
                assert!(err.contains("DAXSHIM_FALLBACK=direct"), "{case}");
            }
            _ => {
                assert!(o.status.success(), "{case}");
                assert!(out.contains("ret=ok"), "{case}");
                assert_eq!(w.stat_sum("mappings_direct"), 1, "{case}");
                assert!(w.stat_sum("fallbacks_direct") >= 1, "{case}");
            }
        }
    }
}
