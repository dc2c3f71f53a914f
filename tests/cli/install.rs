//! `cargo install --path cli`: no library beside the command, its build tree
//! gone (issue #11).

use crate::common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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
