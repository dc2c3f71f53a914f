//! The `daxshim` command (issue: "The daxshim command"), run as a user
//! would: installed into a prefix the way scripts/install.sh lays it out
//! (bin/daxshim, lib/libdaxshim.so), started from a directory outside the
//! repository; and installed by `cargo install --path cli`, with no library
//! beside it and its build tree gone (issue #11).

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An installed copy: prefix/bin/daxshim and prefix/lib/libdaxshim.so.
fn install(w: &World) -> PathBuf {
    let prefix = w.root.join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("lib")).unwrap();
    std::fs::copy(target_dir().join("daxshim"), prefix.join("bin/daxshim")).unwrap();
    std::fs::copy(lib(), prefix.join("lib/libdaxshim.so")).unwrap();
    prefix.join("bin/daxshim")
}

/// `daxshim ARGS` from the world's root (outside the repository), with the
/// world's shadow directory.
fn daxshim(w: &World, exe: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(exe);
    c.current_dir(&w.root)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env_remove("LD_PRELOAD")
        .env_remove("DAXSHIM_PMEM")
        .env_remove("DAXSHIM_LIB")
        .args(args);
    run(c)
}

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

#[test]
fn stats_renders_counters_and_latency_percentiles() {
    let w = World::new("clistats");
    let exe = install(&w);
    let f = w.pmem_file("f", &[0u8; 65536]);
    ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "65536",
        ",",
        "store",
        "100",
        "a",
        ",",
        "msync",
        ",",
        "store",
        "9000",
        "b",
        ",",
        "msync",
        ",",
        "exit",
    ]));
    let files: Vec<String> = std::fs::read_dir(&w.root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stats-"))
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    let mut args = vec!["stats"];
    args.extend(files.iter().map(|x| x.as_str()));
    let out = ok(daxshim(&w, &exe, &args));
    assert!(out.contains("1 shadowed"), "{out}");
    assert!(out.contains("lines written        2 "), "{out}");
    assert!(
        out.contains("writeback saved") && out.contains("p50 <") && out.contains("p99 <"),
        "{out}"
    );
    // The histogram as a bar chart: a row per bucket from the fastest sync
    // to the slowest; the fullest bucket's bar is 40 glyphs long.
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" |")).collect();
    assert!(!rows.is_empty(), "no chart: {out}");
    let bar = |r: &str| r.chars().filter(|c| *c == '#' || *c == '█').count();
    assert_eq!(rows.iter().map(|r| bar(r)).max(), Some(40), "{out}");
    assert!(
        rows.first().is_some_and(|r| bar(r) > 0) && rows.last().is_some_and(|r| bar(r) > 0),
        "{out}"
    );
    let counts: u64 = rows
        .iter()
        .map(|r| r.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let syncs: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("syncs "))
        .and_then(|l| l.trim().split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no syncs line: {out}"));
    assert!(syncs >= 2, "{out}");
    assert_eq!(counts, syncs, "every sync in the chart: {out}");
    let bogus = w.root.join("bogus.json");
    std::fs::write(&bogus, "{\"x\":1}").unwrap();
    assert_eq!(
        daxshim(&w, &exe, &["stats", s(&bogus)]).status.code(),
        Some(125)
    );
}

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

/// Like `run`, with a longer timeout: a cold `cargo install` builds every
/// dependency.
fn run_for(mut c: Command, limit: Duration) -> Output {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("timed out after {limit:?}: {c:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Moves a directory aside while alive, back when dropped (even when the
/// test fails).
struct Aside {
    dir: PathBuf,
    away: PathBuf,
}

impl Aside {
    fn new(dir: &Path) -> Aside {
        let away = dir.with_extension("away");
        std::fs::rename(dir, &away).unwrap();
        Aside {
            dir: dir.to_path_buf(),
            away,
        }
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.away, &self.dir);
    }
}

/// Issue #11: "A test installs into a temporary root, deletes target/'s
/// library, and runs `daxshim run` from `/`." The install builds in a
/// target directory of its own (kept between runs, so that only the first
/// run compiles everything), which is moved away before the installed
/// command runs: no library of its build can be found, and the shared
/// target/ that concurrent tests use is left alone.
#[test]
fn cargo_install_gives_a_daxshim_that_needs_no_build_tree() {
    let w = World::new("cliinstall");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let build = target_dir().parent().unwrap().join("cli-install-test");
    if !build.exists() && build.with_extension("away").exists() {
        // A run killed while its build was away.
        std::fs::rename(build.with_extension("away"), &build).unwrap();
    }
    let prefix = w.root.join("installed");
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    c.current_dir(repo)
        .args([
            "install",
            "--path",
            "cli",
            "--locked",
            "--offline",
            "--root",
        ])
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", &build)
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    ok(run_for(c, Duration::from_secs(900)));
    let exe = prefix.join("bin/daxshim");
    // The command only (and cargo's own records of what it installed).
    let files: Vec<String> = walk(&prefix)
        .into_iter()
        .filter(|f| !f.starts_with(".crates"))
        .collect();
    assert_eq!(files, ["bin/daxshim"]);
    let _gone = Aside::new(&build);

    // From `/`, without DAXSHIM_LIB, with an empty cache.
    let cache = w.root.join("cache");
    let home = w.root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(&exe);
        c.current_dir("/")
            .env("XDG_CACHE_HOME", &cache)
            .env("HOME", &home)
            .env("DAXSHIM_SHADOW_DIR", &w.shadow)
            .env_remove("DAXSHIM_LIB")
            .env_remove("LD_PRELOAD")
            .env_remove("DAXSHIM_PMEM")
            .args(args);
        c
    };
    let preload = |c: Command| ok(run(c)).trim().to_string();
    let mut c = cmd(&["run", "--", "sh", "-c", "printf %s \"$LD_PRELOAD\""]);
    c.env("TMPDIR", w.root.join("unused"));
    let lib = PathBuf::from(preload(c));
    assert_eq!(
        lib.parent(),
        Some(cache.join("daxshim").as_path()),
        "{lib:?}"
    );
    let name = lib.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("libdaxshim-") && name.ends_with(".so") && name.len() == 30,
        "{name}"
    );
    let good = std::fs::read(&lib).unwrap();
    assert!(good.starts_with(b"\x7fELF"));
    assert!(!lib.starts_with(repo));

    // The shim is really in the path: a mapping of a pmem file is shadowed.
    let f = w.pmem_file("f", &[0u8; 4096]);
    let stats = w.root.join("installed-stats.json");
    let script = [
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "4096",
        ",",
        "store",
        "0",
        "cached",
        ",",
        "msync",
        ",",
        "exit",
    ];
    let probe = probe();
    let mut args = vec![
        "run",
        "--pmem",
        s(&w.pmem),
        "--stats",
        s(&stats),
        "--",
        s(&probe),
    ];
    args.extend(script);
    ok(run(cmd(&args)));
    let st = Stats::parse(&std::fs::read_to_string(&stats).unwrap());
    assert_eq!(st.get("mappings_shadowed"), 1);
    assert!(contains(&backing(&f), "cached"));

    // A damaged copy is replaced (a new file renamed over it) before use.
    std::fs::write(&lib, b"not a library").unwrap();
    std::fs::remove_file(&stats).unwrap();
    ok(run(cmd(&args)));
    assert_eq!(std::fs::read(&lib).unwrap(), good);
    assert_eq!(
        Stats::parse(&std::fs::read_to_string(&stats).unwrap()).get("mappings_shadowed"),
        1
    );
    assert_eq!(
        walk(&cache),
        [format!("daxshim/{name}")],
        "temporary files left"
    );

    // No usable cache directory (XDG_CACHE_HOME is a file): a private
    // directory in TMPDIR, mode 0700.
    let mut c = cmd(&["run", "--", "sh", "-c", "printf %s \"$LD_PRELOAD\""]);
    let tmp = w.root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    c.env("XDG_CACHE_HOME", &stats).env("TMPDIR", &tmp);
    let lib2 = PathBuf::from(preload(c));
    let dir = lib2.parent().unwrap();
    assert!(dir.parent() == Some(tmp.as_path()), "{lib2:?}");
    assert!(dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("daxshim-"));
    let md = std::fs::symlink_metadata(dir).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o700);
    // …and one that others may enter is refused.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = cmd(&["run", "--", "true"]);
    c.env("XDG_CACHE_HOME", &stats).env("TMPDIR", &tmp);
    let o = run(c);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
}

/// Every file under `dir`, relative to it, sorted.
fn walk(dir: &Path) -> Vec<String> {
    fn go(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                go(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out);
    out.sort();
    out
}
