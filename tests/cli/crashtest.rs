//! `daxshim crashtest`: SQLite's crash writer finds no failure, a broken
//! check is reported, and the progress bar appears on a terminal only.

use crate::common::*;
use crate::{daxshim, install};
use std::process::Command;

#[test]
fn crashtest_finds_no_failure_in_sqlite_and_reports_a_broken_check() {
    let w = World::new("clicrash");
    let exe = install(&w);
    let h = target_dir().join("sqlharness");
    let db = w.pmem.join("db");
    let check = format!(
        "a=$(tail -n1 \"$DAXSHIM_CRASHTEST_OUTPUT\"); {} check --db {} --acked ${{a:-0}}",
        s(&h),
        s(&db)
    );
    let o = daxshim(
        &w,
        &exe,
        &[
            "crashtest",
            "--iterations",
            "9",
            "--seed",
            "5",
            "--max-delay",
            "150",
            "--pmem",
            s(&w.pmem),
            "--check",
            &check,
            "--",
            s(&h),
            "writer",
            "--db",
            s(&db),
            "--journal",
            "delete",
        ],
    );
    let out = ok(o);
    assert!(out.contains("9 iterations, 0 failed"), "{out}");
    assert!(
        out.contains("died inside a writeback"),
        "no iteration crashed inside a writeback: {out}"
    );
    // A check that fails is reported with the seed to replay it.
    let o = daxshim(
        &w,
        &exe,
        &[
            "crashtest",
            "--iterations",
            "2",
            "--seed",
            "0x10",
            "--max-delay",
            "20",
            "--pmem",
            s(&w.pmem),
            "--check",
            "echo broken >&2; exit 4",
            "--",
            s(&h),
            "writer",
            "--db",
            s(&db),
            "--journal",
            "delete",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("2 iterations, 2 failed")
            && out.contains("seed 0x10")
            && out.contains("broken"),
        "{out}"
    );
}

#[test]
fn crashtest_draws_a_progress_bar_on_a_terminal_only() {
    let w = World::new("clitty");
    let exe = install(&w);
    let args = format!(
        "{} crashtest --iterations 3 --seed 7 --max-delay 30 --check true -- sleep 1",
        s(&exe)
    );
    // util-linux's script(1) gives the command a terminal.
    let mut c = Command::new("script");
    c.args(["-qec", &args, "/dev/null"])
        .current_dir(&w.root)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env_remove("DAXSHIM_LIB");
    let tty = ok(run(c));
    assert!(
        tty.contains("daxshim crashtest [") && tty.contains("/3 iterations"),
        "no bar on the terminal: {tty:?}"
    );
    assert!(tty.contains("3 iterations, 0 failed"), "{tty:?}");
    assert!(!tty.contains("iteration 0:"), "{tty:?}");
    // Not a terminal: one line per iteration, no bar.
    let a: Vec<&str> = args.split(' ').skip(1).collect();
    let o = daxshim(&w, &exe, &a);
    let err = stderr(&o);
    let out = ok(o);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("iteration ")).count(),
        3,
        "{out}"
    );
    assert!(
        !err.contains('[') && !out.contains("daxshim crashtest ["),
        "{err}"
    );
}
