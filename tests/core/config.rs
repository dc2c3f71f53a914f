//! How the shim is configured and loaded: invalid settings stop the
//! program before `main`; `daxshim run` preloads it; another allocator
//! preloaded before or after it.

use crate::common::*;
use crate::{zeros, PAGE};

// Bad configuration: one line naming the variable, status 125, before main.
#[test]
fn invalid_env_values_exit_125_before_main() {
    let cases = [
        ("DAXSHIM_LOG", "loud"),
        ("DAXSHIM_PMEM", "relative/dir"),
        ("DAXSHIM_PMEM", "/nonexistent-daxshim-dir"),
        ("DAXSHIM_DAX", "yes"),
        ("DAXSHIM_ATOMIC", "yes"),
        ("DAXSHIM_ATOMIC", "relative/dir"),
        ("DAXSHIM_TRACKER", "magic"),
        ("DAXSHIM_FLUSH", "wbinvd"),
        ("DAXSHIM_SHADOW_DIR", "shm"),
        ("DAXSHIM_STATS", ""),
        ("DAXSHIM_SYSCALLS", "always"),
        ("DAXSHIM_FALLBACK", "maybe"),
    ];
    for (var, val) in cases {
        let w = World::new("badenv");
        let main_ran = w.root.join("main-ran");
        let mut c = w.probe_cmd(&format!("touch {}", s(&main_ran)));
        c.env(var, val);
        let o = run(c);
        assert_eq!(o.status.code(), Some(125), "{var}={val}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(var), "{err}");
        assert!(err.contains("expected"), "{err}");
        assert!(!main_ran.exists(), "main ran despite {var}={val}");
    }
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
        .args(script_args(&format!(
            "open {f} rw
             map 4096
             store 0 viacli
             exit",
            f = s(&f)
        )));
    ok(run(c));
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
    assert!(contains(&backing(&f), "viacli"));
    let mut c = w.cmd(&cli);
    c.args(["run", "--", "/nonexistent/cmd"]);
    assert_eq!(run(c).status.code(), Some(127));
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
        let mut c = w.probe_cmd(&format!(
            "open {f} rw
             map 16384
             store 9000 jemalloc
             fork
             msync
             pread 9000 8
             _exit",
            f = s(&f)
        ));
        c.env("LD_PRELOAD", preload);
        let out = ok(run(c));
        assert!(
            out.contains("pread: jemalloc") && out.contains("child: 0"),
            "{out}"
        );
        w.drop_shadows();
        assert!(contains(&backing(&f), "jemalloc"));
    }
}
