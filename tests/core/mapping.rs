//! Unaware callers get a shadow, DAX-aware callers the direct mapping,
//! private mappings a private copy; files outside pmem are left alone.

use crate::common::*;
use crate::{zeros, PAGE};

// Shadow for unaware callers: stores stay out of the backing until a sync.
#[test]
fn stores_are_isolated_until_msync() {
    let w = World::new("isolation");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let stored = w.root.join("stored");
    let go = w.root.join("go");
    let c = w.probe_cmd(&format!(
        "open {f} rw
         map 8192
         store 100 hello
         touch {stored}
         waitfor {go}
         msync
         kill",
        f = s(&f),
        stored = s(&stored),
        go = s(&go)
    ));
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

// DAX-aware callers get the direct mapping: MAP_SHARED_VALIDATE|MAP_SYNC,
// MAP_DAX, DAXSHIM_DAX=1 and DAXSHIM_DAX=DIR.
#[test]
fn map_sync_map_dax_and_daxshim_dax_map_directly() {
    let cases: &[(&str, Option<&str>)] = &[
        ("validate-sync", None),
        ("dax", None),
        ("", Some("1")),
        ("", Some("DIR")),
    ];
    for (flags, dax_env) in cases {
        let mut w = World::new("direct");
        if let Some(v) = dax_env {
            let v = if *v == "DIR" {
                s(&w.pmem).to_string()
            } else {
                v.to_string()
            };
            w = w.env("DAXSHIM_DAX", &v);
        }
        let f = w.pmem_file("f", &zeros(PAGE));
        ok(w.probe(&format!(
            "open {f} rw
             map 4096 {flags}
             store 9 direct
             exit",
            f = s(&f)
        )));
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
    killed(w.probe(&format!(
        "open {f} rw
         map 4096 dax
         store 9 nosync
         kill",
        f = s(&f)
    )));
    w.drop_shadows();
    assert!(contains(&backing(&f), "nosync"));
}

// MAP_PRIVATE: a private copy of the shadow, never written back.
#[test]
fn private_mappings_are_never_written_back() {
    let w = World::new("private");
    let f = w.pmem_file("f", b"original-content");
    let out = ok(w.probe(&format!(
        "open {f} rw
         pwrite 0 ORIGINAL
         map 4096 private
         load 0 8
         store 0 privstor
         msync
         pread 0 8
         exit",
        f = s(&f)
    )));
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
    let c = w.probe_cmd(&format!(
        "open {f} rw
         map 4096
         store 9 plainfile
         touch {stored}
         waitfor {go}
         exit",
        f = s(&f),
        stored = s(&stored),
        go = s(&go)
    ));
    let h = std::thread::spawn(move || run(c));
    wait_for(&stored);
    // The kernel page cache: the store is visible to read() at once.
    assert!(contains(&backing(&f), "plainfile"));
    std::fs::write(&go, b"").unwrap();
    ok(h.join().unwrap());
    assert_eq!(w.stat_sum("mappings_shadowed"), 0);
    assert!(w.shadow_files().is_empty());
}
