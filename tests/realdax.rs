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
