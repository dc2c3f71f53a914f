//! Every subcommand's `--help`, usage errors (exit status 125), and the
//! shell completion scripts.

use crate::common::*;
use crate::{daxshim, install};
use std::process::Command;

#[test]
fn every_subcommand_has_help_and_errors_exit_125() {
    let w = World::new("clihelp");
    let exe = install(&w);
    let o = daxshim(&w, &exe, &["--help"]);
    let out = ok(o);
    for sub in [
        "run",
        "status",
        "sync",
        "drop",
        "gc",
        "stats",
        "crashtest",
        "completions",
    ] {
        assert!(out.contains(sub), "{sub} missing from --help");
        let o = daxshim(&w, &exe, &[sub, "--help"]);
        let text = ok(o);
        assert!(
            text.starts_with("usage: daxshim") && text.contains(&format!("daxshim {sub}")),
            "{sub}: {text}"
        );
    }
    for bad in [
        &["frobnicate"][..],
        &["run", "--bogus", "--", "true"],
        &["run"],
        &["status", "extra"],
        &["crashtest", "--", "true"],
        &[
            "crashtest",
            "--iterations",
            "many",
            "--check",
            "true",
            "--",
            "true",
        ],
        &["run", "--dax", "--dax-dir", "/", "--", "true"],
        &["run", "--log", "loud", "--", "true"],
        &["stats"],
        &["completions", "powershell"],
        &[],
    ] {
        let o = daxshim(&w, &exe, bad);
        assert_eq!(o.status.code(), Some(125), "{bad:?}");
        assert!(!stderr(&o).is_empty(), "{bad:?} said nothing");
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let w = World::new("clicompl");
    let exe = install(&w);
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(daxshim(&w, &exe, &["completions", shell]));
        for sub in ["run", "crashtest", "completions", "pmem", "max-delay"] {
            assert!(out.contains(sub), "{shell}: {sub} missing");
        }
        // The helper process of `sync` is no command for people.
        assert!(!out.contains("__attach"), "{shell}");
    }
    // bash accepts the script and completes the subcommands with it.
    let script = w.root.join("daxshim.bash");
    std::fs::write(&script, ok(daxshim(&w, &exe, &["completions", "bash"]))).unwrap();
    let mut c = Command::new("bash");
    c.current_dir(&w.root)
        .arg("-c")
        .arg(
            "source \"$1\" && COMP_WORDS=(daxshim cr) COMP_CWORD=1 COMP_LINE='daxshim cr' \
             COMP_POINT=10 && _daxshim daxshim cr daxshim && echo \"${COMPREPLY[*]}\"",
        )
        .arg("bash")
        .arg(&script);
    assert_eq!(ok(run(c)).trim(), "crashtest");
}
