//! Writers the shim cannot intercept (issue: "Every writer is coherent",
//! parts 2 and 3): a process without the shim, a raw system call, a direct
//! (DAX-aware) mapping. A sync never writes back a line only they changed;
//! their bytes reach the shadow no later than the next sync, mapping or
//! read; a line both sides changed is a conflict the shim's bytes win.

use crate::common::*;
use crate::while_mapped;
use crate::{zeros, PAGE};
use std::path::Path;

/// [`while_mapped`] with a process without the shim (the probe) writing
/// meanwhile: `outside` is its script on the same file.
fn with_outside_writer(w: &World, f: &Path, store: &str, outside: &str, then: &str) -> String {
    let o = while_mapped(w, f, store, then, |done| {
        ok(w.probe_plain(&*format!(
            "open {f} rw\n{outside}\ntouch {done}",
            f = s(f),
            done = s(done)
        )));
    });
    stdout(&o)
}

// A process without the shim writes into the page the shim process stored
// to (another line) and into a page nobody stored to: the shim process's
// pread sees them at once, its msync keeps them, its mapping shows them
// after the msync.
#[test]
fn a_writer_without_the_shim_is_never_undone() {
    let w = World::new("foreign");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let out = with_outside_writer(
        &w,
        &f,
        "store 100 AAAA",
        "pwrite 200 BBBB\npwrite 5000 CCCC",
        "pread 200 4\nmsync sync\nload 200 4\nload 5000 4\nload 100 4",
    );
    assert!(out.contains("pread: BBBB"), "{out}");
    assert!(
        out.contains("load: BBBB") && out.contains("load: CCCC"),
        "{out}"
    );
    assert!(out.contains("load: AAAA"), "{out}");
    let b = backing(&f);
    assert_eq!(&b[100..104], b"AAAA");
    assert_eq!(&b[200..204], b"BBBB");
    assert_eq!(&b[5000..5004], b"CCCC");
    assert!(w.stat_sum("foreign_writes") >= 2);
}

// The same line changed on both sides between two syncs: the shim's bytes
// win, and the conflict is logged and counted.
#[test]
fn a_line_changed_on_both_sides_is_a_conflict_the_shim_wins() {
    let w = World::new("conflict");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let o = while_mapped(&w, &f, "store 100 AAAA", "msync sync", |done| {
        ok(w.probe_plain(&*format!(
            "open {f} rw\npwrite 102 XX\npwrite 400 YY\ntouch {done}",
            f = s(&f),
            done = s(done)
        )));
    });
    let err = stderr(&o);
    let b = backing(&f);
    assert_eq!(&b[100..104], b"AAAA", "the shim's line won");
    assert_eq!(&b[400..402], b"YY", "the other line was kept");
    assert!(err.contains("offset 64"), "{err}");
    assert!(w.stat_sum("conflicts") >= 1 && w.stat_sum("foreign_writes") >= 1);
}

// Raw system calls from the shim's own process (no libc wrapper, so no
// hook: SYS_pwrite64, SYS_write, SYS_pwritev): never undone by the next
// msync, seen by the mapping after it.
#[test]
fn raw_system_call_writes_are_never_undone() {
    let w = World::new("rawsys");
    let (out, _) = w.probe_both_on_zeros(
        2 * PAGE,
        "open {f} rw
         map 8192
         store 100 mapped
         rawpwrite 300 raw
         rawpwrite 5000 clean
         seek 600
         rawwrite written
         rawpwritev 700 ve ctor
         msync sync
         load 300 3
         load 5000 5
         load 600 7
         load 700 6
         load 100 6",
    );
    assert!(
        out.contains("load: raw") && out.contains("load: clean"),
        "{out}"
    );
    assert!(
        out.contains("load: written") && out.contains("load: vector"),
        "{out}"
    );
}

// Truncated from outside: the shadow follows, nothing beyond the new size
// is written back. Extended from outside: the new bytes are kept and seen.
#[test]
fn truncate_and_extend_from_outside() {
    let w = World::new("outsize");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    with_outside_writer(&w, &f, "store 5000 BBBB", "ftruncate 50", "msync sync");
    assert_eq!(backing(&f).len(), 50, "written back beyond the new size");

    let g = w.pmem_file("g", &zeros(2 * PAGE));
    let out = with_outside_writer(
        &w,
        &g,
        "store 100 AAAA",
        "ftruncate 12288\npwrite 9000 ext",
        "msync sync\npread 9000 3",
    );
    assert!(out.contains("pread: ext"), "{out}");
    let b = backing(&g);
    assert_eq!(b.len(), 3 * PAGE);
    assert_eq!(&b[9000..9003], b"ext");
    assert_eq!(&b[100..104], b"AAAA");
}

// A DAX-aware writer (a direct mapping, MAP_DAX) and an unaware one (a
// shadow) store into the same page, different lines: both stores survive
// every sync of either, and the unaware one sees the direct one's bytes
// after its sync.
#[test]
fn dax_aware_and_unaware_writers_share_a_page() {
    let w = World::new("mixed");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let o = while_mapped(&w, &f, "store 200 shadow", "msync sync\nload 0 6", |done| {
        ok(w.probe(&*format!(
            "open {f} rw\nmap 8192 dax\nstore 0 DIRECT\nmsync sync\ntouch {done}",
            f = s(&f),
            done = s(done)
        )));
    });
    let out = stdout(&o);
    assert!(out.contains("load: DIRECT"), "{out}");
    let b = backing(&f);
    assert_eq!(&b[0..6], b"DIRECT");
    assert_eq!(&b[200..206], b"shadow");
}

// Without any call of the shim's process (it only polls its mapping), a
// write made by a process without the shim reaches the shadow: the watcher
// takes it in (bounded here by 10 s; its latency is measured, not tested).
#[test]
fn outside_writes_reach_the_mapping_without_a_shim_call() {
    let w = World::new("watch");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let out = with_outside_writer(
        &w,
        &f,
        "store 100 AAAA",
        "pwrite 5000 seen\npwrite 200 also",
        "waitload 5000 seen 10000\nwaitload 200 also 10000\nmsync sync",
    );
    assert_eq!(out.matches("waitload: ok").count(), 2, "{out}");
    let b = backing(&f);
    assert_eq!(&b[100..104], b"AAAA");
    assert_eq!(&b[5000..5004], b"seen");
}

// A shell's truncating `>` onto a file another process maps: the file is
// what the shell wrote, the mapping shows it, and its msync writes nothing
// of its lost stores back (as the kernel truncates the page cache).
#[test]
fn a_truncating_redirection_onto_a_mapped_file() {
    let w = World::new("redir");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let o = while_mapped(&w, &f, "store 100 AAAA", "load 0 2\nmsync sync", |done| {
        let mut sh = w.shim_cmd("sh");
        sh.arg("-c").arg(format!(
            "printf XY > {f} && touch {done}",
            f = s(&f),
            done = s(done)
        ));
        ok(run(sh));
    });
    let out = stdout(&o);
    assert!(out.contains("load: XY"), "{out}");
    assert_eq!(backing(&f), b"XY");
}
