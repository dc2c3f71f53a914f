//! Fuzzed input: mapping calls compared with the kernel's answers, and
//! `DAXSHIM_*` values.

use crate::common::*;
use crate::hostile;

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
