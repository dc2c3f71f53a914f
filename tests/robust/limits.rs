//! The shim spends none of the program's descriptors (issue: "The shim
//! spends none of the program's resources"): it holds a constant number,
//! whatever the number of files, at high numbers the program does not
//! expect `open` to return, out of reach of its `close_range`/`closefrom`;
//! and one mapping of its own per file plus a constant.
//! Each case runs the same program without the shim as the reference.

use crate::common::*;

/// Runs examples/c/fdlimits.c through `sh -c 'ulimit -n LIMIT; exec …'`.
fn fdlimits(w: &World, shim: bool, limit: u32, args: &[&str]) -> std::process::Output {
    let mut c = if shim { w.shim_cmd("sh") } else { w.cmd("sh") };
    c.arg("-c")
        .arg(format!("ulimit -n {limit}; exec \"$0\" \"$@\""))
        .arg(c_example("fdlimits"))
        .args(args);
    run(c)
}

fn field(out: &str, name: &str) -> u64 {
    out.split_whitespace()
        .skip_while(|w| *w != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

// 1,000 pmem files opened and mapped under a soft limit of 1,100
// descriptors: works with the shim as without it, and the shim's
// descriptors are a constant (not one or more per file). Again with every
// descriptor closed after its mapping: the shim keeps none per file either.
#[test]
fn a_thousand_mapped_files_under_a_limit_of_1100() {
    for close in [false, true] {
        let w = World::new("fdmany");
        let plain_dir = w.plain.join("many");
        std::fs::create_dir_all(&plain_dir).unwrap();
        let mut args = vec!["many", s(&plain_dir), "1000"];
        if close {
            args.push("close");
        }
        let plain = ok(fdlimits(&w, false, 1100, &args));
        args[1] = s(&w.pmem);
        let shim = ok(fdlimits(&w, true, 1100, &args));
        let (fp, fs) = (field(&plain, "fds"), field(&shim, "fds"));
        assert!(
            fs <= fp + 40,
            "close {close}: {fs} descriptors under the shim, {fp} without"
        );
        // Mappings: one of the shim's own per file (its header), plus a
        // constant (the views and bases of the 16 most recently used). The
        // mprotect tracker splits a mapping at its first store (a
        // read-only rest): one more per file, its known price.
        let per_file = if w.tracker() == "mprotect" { 2 } else { 1 };
        for k in ["maps", "synced"] {
            let (mp, ms) = (field(&plain, k), field(&shim, k));
            assert!(
                ms <= mp + per_file * 1000 + 100,
                "close {close}: {ms} mappings ({k}) under the shim, {mp} without"
            );
        }
        assert_eq!(w.stat_sum("mappings_shadowed"), 1000);
        assert_eq!(w.stat_sum("fallbacks_direct"), 0);
        for i in [0, 499, 999] {
            let f = w.pmem.join(format!("f{i}"));
            assert!(contains(&backing(&f), &format!("file-{i}")), "f{i}");
        }
    }
}

// A program that closes 0, 1 and 2 gets them back from its next opens,
// although the shim holds descriptors of its own.
#[test]
fn closed_standard_descriptors_are_the_next_ones_opened() {
    let w = World::new("fdlow");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let p = w.plain_file("f", &[0u8; 4096]);
    let plain = ok(fdlimits(&w, false, 1024, &["lowfds", s(&p)]));
    let shim = ok(fdlimits(&w, true, 1024, &["lowfds", s(&f)]));
    assert_eq!(plain.trim(), "lowfds: 0 1 2");
    assert_eq!(shim, plain);
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
    assert_eq!(backing(&f)[0], b'L');
}

// A daemon's "close every descriptor from 3 on" (close_range, closefrom)
// closes the program's own and leaves the shim's: mapping, pwrite and
// msync of the pmem file keep working afterwards.
#[test]
fn close_range_and_closefrom_leave_the_shims_descriptors() {
    for how in ["range", "from"] {
        let w = World::new("fdclose");
        let f = w.pmem_file("f", &[0u8; 4096]);
        let p = w.plain_file("f", &[0u8; 4096]);
        let plain = ok(fdlimits(&w, false, 1024, &["closeall", s(&p), how]));
        let shim = ok(fdlimits(&w, true, 1024, &["closeall", s(&f), how]));
        assert_eq!(shim, plain, "{how}");
        assert_eq!(w.stat_sum("mappings_shadowed"), 1, "{how}");
        assert_eq!(backing(&f), backing(&p), "{how}");
    }
}

// SQLite's many-database case: a few hundred databases open at once (each
// mapped, written and committed) under a soft limit of 1,024 descriptors.
// Before, the shim's four descriptors per file made SQLite's own open fail
// with "unable to open database file" from about the 120th on.
#[test]
fn four_hundred_sqlite_databases_open_at_once_under_1024() {
    let w = World::new("manydb");
    let script = r#"
import os, sqlite3, sys
d, n = sys.argv[1], int(sys.argv[2])
cons = []
for i in range(n):
    c = sqlite3.connect(os.path.join(d, f"db{i}.sqlite"))
    c.execute("PRAGMA mmap_size=1048576")
    c.execute("create table t(x)")
    c.execute("insert into t values (?)", (f"row-{i}",))
    c.commit()
    assert c.execute("select x from t").fetchone()[0] == f"row-{i}"
    cons.append(c)
print("open", len(cons))
for c in cons:
    c.close()
"#;
    let mut c = w.shim_cmd("sh");
    c.arg("-c")
        .arg("ulimit -n 1024; exec \"$0\" -c \"$1\" \"$2\" \"$3\"")
        .arg(python())
        .arg(script)
        .arg(&w.pmem)
        .arg("400");
    let out = ok(run(c));
    assert!(out.contains("open 400"), "{out}");
    assert!(w.stat_sum("mappings_shadowed") >= 400);
    // Every database is intact for a reader without the shim.
    for i in [0, 199, 399] {
        let db = w.pmem.join(format!("db{i}.sqlite"));
        let mut q = w.cmd(python());
        q.arg("-c")
            .arg("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select x from t').fetchone()[0])")
            .arg(&db);
        assert_eq!(ok(run(q)).trim(), format!("row-{i}"));
    }
}

// A program at vm.max_map_count: its own mmap gets ENOMEM as without the
// shim, and a sync of a file whose writeback views the shim had let go
// (the least recently used of 20) still succeeds with a single mapping
// freed: the shim unmaps other files' views to make room.
#[test]
fn a_program_at_the_mapping_limit_gets_enomem_and_its_syncs_still_work() {
    let w = World::new("maxmaps");
    let plain_dir = w.plain.join("m");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = ok(fdlimits(&w, false, 1024, &["maxmaps", s(&plain_dir), "1"]));
    let shim = ok(fdlimits(&w, true, 1024, &["maxmaps", s(&w.pmem), "1"]));
    assert_eq!(plain.trim(), "maxmaps: errno=12 msync=0");
    assert_eq!(shim, plain);
    assert!(contains(&backing(&w.pmem.join("m0")), "second"));
}

// The shim's own mappings (headers, views, bases), its threads' stacks and
// its memory are placed away from where the kernel puts a program's
// hint-free mappings: 64 MiB, a 4 MiB pmem file (read whole, stored to,
// synced: the fault thread, the watcher and the writeback views start
// meanwhile) and 64 MiB again land one below the other, as without the
// shim. (Before: the second 64 MiB landed 234 MiB further down.)
#[test]
fn the_programs_mappings_land_where_they_would_without_the_shim() {
    let w = World::new("layout");
    let content = vec![1u8; 4 << 20];
    let f = w.pmem_file("f", &content);
    let p = w.plain_file("f", &content);
    let plain = ok(fdlimits(&w, false, 1024, &["layout", s(&p)]));
    let shim = ok(fdlimits(&w, true, 1024, &["layout", s(&f)]));
    assert_eq!(plain.trim(), "layout: file -4194304 second -67108864");
    assert_eq!(shim, plain);
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
}

// A mapped file whose descriptors the program closed, renamed by the
// program after its backing descriptor left the shim's cache (20 files
// synced): the shim reopens it at its new name, and the sync succeeds.
#[test]
fn a_renamed_file_without_descriptors_is_still_written_back() {
    let w = World::new("renamed");
    let plain_dir = w.plain.join("m");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = ok(fdlimits(&w, false, 1024, &["rename", s(&plain_dir)]));
    let shim = ok(fdlimits(&w, true, 1024, &["rename", s(&w.pmem)]));
    assert_eq!(plain.trim(), "rename: msync=0");
    assert_eq!(shim, plain);
    assert!(contains(&backing(&w.pmem.join("r0")), "moved"));
}
