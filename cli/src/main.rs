//! `daxshim`: run programs under libdaxshim.so, inspect and write back what
//! it left in the shadow directory, crash-test programs.
//!
//! This binary does not link the hook library: it finds it and puts it in
//! front of `LD_PRELOAD` for the commands it runs (`run`, `crashtest`, and
//! the helper `sync` uses). It shares only the header layout with it.

mod commands;
mod crashtest;
mod shadows;
mod statsview;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const MAIN_USAGE: &str = "\
usage: daxshim COMMAND [ARGS...]

commands:
  run        run a command under the shim
  status     list this user's shadows and what they hold
  sync       write back shadows whose writers are gone
  drop       remove the shadows of given files
  gc         remove unused clean shadows and those of deleted files
  stats      summarise DAXSHIM_STATS files
  crashtest  kill a command at random moments, drop every shadow, check the files

`daxshim COMMAND --help` describes each. Exit status: the command's own for
run; 0 success, 1 a check or operation failed, 125 daxshim itself failed.";

const USAGE: &str = "\
usage: daxshim run [--pmem DIR]... [--dax | --dax-dir DIR...] [--stats FILE] [--log LEVEL] -- CMD [ARGS...]

Runs CMD with libdaxshim.so prepended to LD_PRELOAD (what was there stays).
  --pmem DIR     treat regular files under DIR as (emulated) pmem; repeatable
  --dax          the whole command is DAX-aware: pmem files are mapped directly
  --dax-dir DIR  files under DIR are mapped directly; repeatable
  --stats FILE   write the shim's counters as JSON at exit (%p = pid)
  --log LEVEL    error | warn | info | debug

The library is looked up in $DAXSHIM_LIB, next to this executable, and in
../lib/ and ../lib/daxshim/ relative to it.

Exit status: CMD's own; 125 if daxshim itself failed; 126 if CMD cannot be
run; 127 if CMD was not found.";

pub(crate) fn fail(msg: &str) -> ExitCode {
    eprintln!("daxshim: {msg}");
    ExitCode::from(125)
}

/// Bytes for people.
pub(crate) fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// Where libdaxshim.so is, wherever daxshim was installed.
pub(crate) fn find_library() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DAXSHIM_LIB") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("DAXSHIM_LIB={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("libdaxshim.so"),
        dir.join("../lib/libdaxshim.so"),
        dir.join("../lib/daxshim/libdaxshim.so"),
        // `cargo install --path cli` copies only the executable: the source
        // tree's build, if it is still there.
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/release/libdaxshim.so"
        )),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p.clone()))
        .ok_or_else(|| {
            format!(
                "cannot find libdaxshim.so (looked in {}); set DAXSHIM_LIB",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn absolute_dir(opt: &str, d: &str) -> Result<String, String> {
    let p = std::fs::canonicalize(d).map_err(|e| format!("{opt} {d}: {e}"))?;
    if !p.is_dir() {
        return Err(format!("{opt} {d}: not a directory"));
    }
    Ok(p.to_string_lossy().into_owned())
}

fn run(args: &[String]) -> ExitCode {
    let mut pmem = Vec::new();
    let mut dax_dirs = Vec::new();
    let mut dax_all = false;
    let mut stats = None;
    let mut log = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = |name: &str| -> Result<String, String> {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let r = match a {
            "--" => {
                i += 1;
                break;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--pmem" => value("--pmem")
                .and_then(|d| absolute_dir("--pmem", &d))
                .map(|d| pmem.push(d)),
            "--dax-dir" => value("--dax-dir")
                .and_then(|d| absolute_dir("--dax-dir", &d))
                .map(|d| dax_dirs.push(d)),
            "--dax" => {
                dax_all = true;
                Ok(())
            }
            "--stats" => value("--stats").map(|s| stats = Some(s)),
            "--log" => value("--log").and_then(|l| match l.as_str() {
                "error" | "warn" | "info" | "debug" => {
                    log = Some(l);
                    Ok(())
                }
                _ => Err(format!("--log {l}: expected error, warn, info or debug")),
            }),
            _ if a.starts_with('-') => Err(format!("unknown option {a} (see daxshim run --help)")),
            _ => break, // the command itself, without "--"
        };
        if let Err(e) = r {
            return fail(&e);
        }
        i += 1;
    }
    let cmd = &args[i.min(args.len())..];
    if cmd.is_empty() {
        return fail("no command given (usage: daxshim run [OPTIONS] -- CMD [ARGS...])");
    }
    if dax_all && !dax_dirs.is_empty() {
        return fail("--dax and --dax-dir exclude each other");
    }
    let lib = match find_library() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let mut preload = OsString::from(lib.as_os_str());
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]).env("LD_PRELOAD", preload);
    if !pmem.is_empty() {
        let mut v = pmem.join(":");
        if let Ok(old) = std::env::var("DAXSHIM_PMEM") {
            if !old.is_empty() {
                v = format!("{v}:{old}");
            }
        }
        c.env("DAXSHIM_PMEM", v);
    }
    if dax_all {
        c.env("DAXSHIM_DAX", "1");
    } else if !dax_dirs.is_empty() {
        c.env("DAXSHIM_DAX", dax_dirs.join(":"));
    }
    if let Some(s) = stats {
        c.env("DAXSHIM_STATS", s);
    }
    if let Some(l) = log {
        c.env("DAXSHIM_LOG", l);
    }
    let e = c.exec();
    eprintln!("daxshim: cannot run {}: {e}", cmd[0]);
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("run") => run(rest),
        Some("status") => commands::status(rest),
        Some("sync") => commands::sync(rest),
        Some("drop") => commands::drop(rest),
        Some("gc") => commands::gc(rest),
        Some("stats") => statsview::stats(rest),
        Some("crashtest") => crashtest::crashtest(rest),
        Some("__attach") => commands::attach_helper(rest),
        Some("-h" | "--help" | "help") => {
            println!("{MAIN_USAGE}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("{MAIN_USAGE}");
            ExitCode::from(125)
        }
        Some(other) => fail(&format!("unknown command {other} (try daxshim --help)")),
    }
}
