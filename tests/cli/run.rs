//! `daxshim run` installed, from a directory outside the repository.

use crate::common::*;
use crate::{daxshim, install};
use std::process::Command;

#[test]
fn run_works_installed_from_any_directory_and_keeps_the_exit_status() {
    let w = World::new("clirun");
    let exe = install(&w);
    let f = w.pmem_file("f", &[0u8; 4096]);
    let o = daxshim(
        &w,
        &exe,
        &[
            "run",
            "--pmem",
            s(&w.pmem),
            "--stats",
            &w.stats_pattern(),
            "--log",
            "info",
            "--",
            s(&probe()),
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "4096",
            ",",
            "store",
            "0",
            "installed",
            ",",
            "exit",
        ],
    );
    let err = stderr(&o);
    ok(o);
    assert!(
        err.contains("daxshim[") && err.contains("info: tracker"),
        "--log info: {err}"
    );
    assert_eq!(
        w.stat_sum("mappings_shadowed"),
        1,
        "not run under the installed library"
    );
    assert!(contains(&backing(&f), "installed"));
    // The command's own exit status.
    let o = daxshim(&w, &exe, &["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    // --dax: direct mappings.
    w.clear_stats();
    ok(daxshim(
        &w,
        &exe,
        &[
            "run",
            "--pmem",
            s(&w.pmem),
            "--dax",
            "--stats",
            &w.stats_pattern(),
            "--",
            s(&probe()),
            "open",
            s(&f),
            "rw",
            ",",
            "map",
            "4096",
            ",",
            "exit",
        ],
    ));
    assert_eq!(w.stat_sum("mappings_direct"), 1);
    // A missing library is daxshim's own failure.
    let mut c = Command::new(&exe);
    c.current_dir(&w.root)
        .env("DAXSHIM_LIB", "/nonexistent/libdaxshim.so")
        .args(["run", "--", "true"]);
    let o = run(c);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("DAXSHIM_LIB"));
}
