//! `status`, `drop`, `sync` and `gc`: the shadows crashed processes left.

use crate::common::*;
use crate::{daxshim, install};
use std::path::Path;

/// A writer killed with unsynced stores, leaving its shadow behind.
fn killed_writer(w: &World, exe: &Path, f: &Path, text: &str) {
    let o = daxshim(
        w,
        exe,
        &[
            "run",
            "--pmem",
            s(&w.pmem),
            "--",
            s(&probe()),
            "open",
            s(f),
            "rw",
            ",",
            "map",
            "4096",
            ",",
            "store",
            "0",
            text,
            ",",
            "kill",
        ],
    );
    assert_eq!(o.status.code(), None, "{}", stderr(&o));
}

#[test]
fn status_drop_sync_and_gc_manage_what_crashed_processes_left() {
    let w = World::new("clistatus");
    let exe = install(&w);
    let f = w.pmem_file("f", &[0u8; 4096]);
    killed_writer(&w, &exe, &f, "unsynced");
    assert!(!contains(&backing(&f), "unsynced"));
    let out = ok(daxshim(&w, &exe, &["status"]));
    assert!(
        out.contains(s(&f)) && out.contains("dead, writer") && out.contains("NOT WRITTEN BACK"),
        "{out}"
    );
    let json = ok(daxshim(&w, &exe, &["status", "--json"]));
    assert!(
        json.contains("\"may_hold_unsynced\":true") && json.contains("\"alive\":false"),
        "{json}"
    );
    // drop refuses to lose unsynced data.
    let o = daxshim(&w, &exe, &["drop", s(&f)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("--force"));
    assert!(!w.shadow_files().is_empty());
    // sync writes it back, durably, and removes the shadow.
    let out = ok(daxshim(&w, &exe, &["sync"]));
    assert!(
        out.contains("written back") && out.contains("shadow removed"),
        "{out}"
    );
    assert!(w.shadow_files().is_empty());
    assert!(contains(&backing(&f), "unsynced"));
    assert!(ok(daxshim(&w, &exe, &["status"])).contains("no shadows"));

    // gc: a clean shadow left by a killed reader goes; the shadow of a
    // deleted file with unsynced data stays unless --force.
    let r = w.pmem_file("r", &[0u8; 4096]);
    let o = daxshim(
        &w,
        &exe,
        &[
            "run",
            "--pmem",
            s(&w.pmem),
            "--",
            s(&probe()),
            "open",
            s(&r),
            "ro",
            ",",
            "map",
            "4096",
            "ro",
            ",",
            "kill",
        ],
    );
    assert_eq!(o.status.code(), None);
    let g = w.pmem_file("g", &[0u8; 4096]);
    killed_writer(&w, &exe, &g, "lostfile");
    std::fs::remove_file(&g).unwrap();
    let out = ok(daxshim(&w, &exe, &["gc"]));
    assert!(
        out.contains(&format!("{}: shadow removed (clean)", s(&r))),
        "{out}"
    );
    assert!(out.contains("1 removed, 1 kept"), "{out}");
    let out = ok(daxshim(&w, &exe, &["gc", "--force"]));
    assert!(out.contains("shadow removed (file gone)"), "{out}");
    assert!(w.shadow_files().is_empty(), "{:?}", w.shadow_files());
    // drop --force of a clean file with no shadow says so.
    assert!(ok(daxshim(&w, &exe, &["drop", "--force", s(&f)])).contains("no shadow"));
}
