//! `status`, `sync`, `drop`, `gc`: what the shim left in the shadow
//! directory, and writing it back or removing it.

use crate::shadows::{self, ShadowInfo};
use crate::{fail, find_library, human};
use std::path::Path;
use std::process::{Command, ExitCode};

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub const STATUS_USAGE: &str = "\
usage: daxshim status [--json]

Lists this user's shadows ($DAXSHIM_SHADOW_DIR, default /dev/shm/daxshim-UID):
backing file, size, resident size, attached processes (alive or dead) and
whether the shadow may hold data not yet written back, then the orphans
(shadows kept aside because their file changed without the shim).";

pub fn status(args: &[String]) -> ExitCode {
    let mut as_json = false;
    for a in args {
        match a.as_str() {
            "--json" => as_json = true,
            "-h" | "--help" => {
                println!("{STATUS_USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                return fail(&format!(
                    "status: unexpected argument {a} (see daxshim status --help)"
                ))
            }
        }
    }
    let dir = shadows::shadow_dir();
    let (list, orphans) = shadows::list(&dir);
    if as_json {
        let items: Vec<String> = list
            .iter()
            .map(|s| {
                let procs: Vec<String> = s
                    .procs
                    .iter()
                    .map(|p| format!("{{\"pid\":{},\"alive\":{},\"writer\":{}}}", p.pid, p.alive, p.writer))
                    .collect();
                format!(
                    "{{\"shadow\":{},\"backing\":{},\"backing_present\":{},\"emulated\":{},\"has_data\":{},\"size\":{},\"resident\":{},\"processes\":[{}],\"may_hold_unsynced\":{}}}",
                    json_str(&s.key),
                    json_str(&s.backing),
                    s.backing_present,
                    s.emulated,
                    s.has_data,
                    s.size,
                    s.resident,
                    procs.join(","),
                    s.may_hold_unsynced()
                )
            })
            .collect();
        let orph: Vec<String> = orphans
            .iter()
            .map(|o| json_str(&o.to_string_lossy()))
            .collect();
        println!(
            "{{\"shadow_dir\":{},\"shadows\":[{}],\"orphans\":[{}]}}",
            json_str(&dir.to_string_lossy()),
            items.join(","),
            orph.join(",")
        );
        return ExitCode::SUCCESS;
    }
    println!("shadow directory {}", dir.display());
    if list.is_empty() {
        println!("no shadows");
    }
    for s in &list {
        let kind = if s.emulated {
            "emulated pmem"
        } else {
            "real DAX"
        };
        let gone = if s.backing_present {
            ""
        } else {
            " (file gone or replaced)"
        };
        println!("{}{gone}", s.backing);
        println!("  shadow {}  {kind}", s.key);
        if s.has_data {
            println!("  size {}, resident {}", human(s.size), human(s.resident));
        } else {
            println!("  no data copy (no process has mapped the file)");
        }
        if s.procs.is_empty() {
            println!("  processes: none");
        } else {
            let ps: Vec<String> = s
                .procs
                .iter()
                .map(|p| {
                    format!(
                        "{} ({}{})",
                        p.pid,
                        if p.alive { "alive" } else { "dead" },
                        if p.writer { ", writer" } else { "" }
                    )
                })
                .collect();
            println!("  processes: {}", ps.join(", "));
        }
        let dead = s.dead_writers();
        if !dead.is_empty() {
            println!("  NOT WRITTEN BACK: stores of dead processes {dead:?} are only in the shadow; run `daxshim sync {}`", s.backing);
        } else if s.may_hold_unsynced() {
            println!(
                "  may hold data not yet written back (live writers sync or write back at exit)"
            );
        } else {
            println!("  clean");
        }
    }
    for o in &orphans {
        let size = std::fs::metadata(o).map(|m| m.len()).unwrap_or(0);
        println!("orphan {} ({}): unsynced data of a file changed without the shim; `daxshim gc --force` removes it", o.display(), human(size));
    }
    ExitCode::SUCCESS
}

pub const SYNC_USAGE: &str = "\
usage: daxshim sync [FILE...]

Writes back shadows whose writers are gone (what the next process that maps
the file would do), makes the data durable and removes the shadow when
nothing else uses it. Without FILE: every such shadow of this user. Shadows
that live processes use are left to them (their syncs and their exit write
back).";

/// Attaches to `path` through the library in a helper process (so the
/// protocol is the library's own) and reports what it wrote back.
fn sync_one(lib: &Path, path: &str, emulated: bool) -> Result<(u64, u64), String> {
    let tmp = std::env::temp_dir().join(format!("daxshim-sync-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new(exe);
    c.arg("__attach")
        .arg(path)
        .env("LD_PRELOAD", lib)
        .env("DAXSHIM_STATS", &tmp)
        .env_remove("DAXSHIM_DAX");
    if emulated {
        let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
        c.env("DAXSHIM_PMEM", parent);
    }
    let out = c.output().map_err(|e| format!("cannot run helper: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let stats = std::fs::read_to_string(&tmp).map_err(|e| format!("helper wrote no stats: {e}"))?;
    let _ = std::fs::remove_file(&tmp);
    let v = crate::statsview::parse(&stats);
    Ok((v.num("reconciles"), v.num("lines_written")))
}

/// The helper: open the file through the shim (attach, which reconciles),
/// close it (detach, which removes a clean shadow).
pub fn attach_helper(args: &[String]) -> ExitCode {
    for p in args {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(p) {
            eprintln!("daxshim: {p}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

pub fn sync(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{SYNC_USAGE}");
        return ExitCode::SUCCESS;
    }
    if let Some(a) = args.iter().find(|a| a.starts_with('-')) {
        return fail(&format!(
            "sync: unknown option {a} (see daxshim sync --help)"
        ));
    }
    let lib = match find_library() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let dir = shadows::shadow_dir();
    let (list, _) = shadows::list(&dir);
    let targets: Vec<ShadowInfo> = if args.is_empty() {
        list.into_iter()
            .filter(|s| !s.dead_writers().is_empty())
            .collect()
    } else {
        let mut v = Vec::new();
        for a in args {
            let id = match shadows::file_id(Path::new(a)) {
                Ok(id) => id,
                Err(e) => return fail(&format!("{a}: {e}")),
            };
            match list.iter().find(|s| s.key == id.key()) {
                Some(s) => v.push(s.clone()),
                None => println!("{a}: no shadow, nothing to write back"),
            }
        }
        v
    };
    if targets.is_empty() && args.is_empty() {
        println!("nothing to write back");
    }
    let mut failed = false;
    for s in targets {
        let live = s.live();
        if !live.is_empty() {
            println!(
                "{}: in use by {live:?}; their syncs write it back",
                s.backing
            );
            continue;
        }
        if !s.backing_present {
            println!("{}: the file is gone or was replaced; the shadow's data cannot be written back (daxshim gc --force removes it)", s.backing);
            failed = true;
            continue;
        }
        match sync_one(&lib, &s.backing, s.emulated) {
            Ok((rec, lines)) => {
                let removed = !s.meta.exists();
                println!(
                    "{}: {} ({} cachelines, {}){}",
                    s.backing,
                    if rec > 0 {
                        "written back and made durable"
                    } else {
                        "nothing to write back"
                    },
                    lines,
                    human(lines * 64),
                    if removed { "; shadow removed" } else { "" }
                );
            }
            Err(e) => {
                println!("{}: write-back failed: {e}", s.backing);
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

pub const DROP_USAGE: &str = "\
usage: daxshim drop [--force] FILE...
       daxshim gc [--force]

drop removes the shadows of FILEs. gc removes every shadow of this user that
no process uses and that is clean or whose file no longer exists. Both
refuse to remove a shadow that may hold data not yet written back (run
`daxshim sync` first) unless --force is given; gc --force also removes
orphans. Shadows in use by live processes are never removed.";

fn remove_report(s: &ShadowInfo, force: bool, why: &str) -> bool {
    if !s.live().is_empty() {
        println!("{}: in use by {:?}; not removed", s.backing, s.live());
        return false;
    }
    if s.may_hold_unsynced() && !force {
        println!(
            "{}: may hold data not yet written back; run `daxshim sync {}` or pass --force",
            s.backing, s.backing
        );
        return false;
    }
    match shadows::remove(s) {
        Ok(()) => {
            println!("{}: shadow removed ({why})", s.backing);
            true
        }
        Err(e) => {
            println!("{}: not removed: {e}", s.backing);
            false
        }
    }
}

pub fn drop(args: &[String]) -> ExitCode {
    let force = args.iter().any(|a| a == "--force" || a == "-f");
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{DROP_USAGE}");
        return ExitCode::SUCCESS;
    }
    let files: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if let Some(a) = args
        .iter()
        .find(|a| a.starts_with('-') && *a != "--force" && *a != "-f")
    {
        return fail(&format!(
            "drop: unknown option {a} (see daxshim drop --help)"
        ));
    }
    if files.is_empty() {
        return fail("drop: no FILE given (see daxshim drop --help)");
    }
    let dir = shadows::shadow_dir();
    let (list, _) = shadows::list(&dir);
    let mut ok = true;
    for f in files {
        let key = match shadows::file_id(Path::new(f)) {
            Ok(id) => id.key(),
            Err(e) => {
                println!("{f}: {e}");
                ok = false;
                continue;
            }
        };
        match list.iter().find(|s| s.key == key) {
            None => println!("{f}: no shadow"),
            Some(s) => ok &= remove_report(s, force, "dropped"),
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub fn gc(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{DROP_USAGE}");
        return ExitCode::SUCCESS;
    }
    let force = args.iter().any(|a| a == "--force" || a == "-f");
    if let Some(a) = args.iter().find(|a| *a != "--force" && *a != "-f") {
        return fail(&format!(
            "gc: unexpected argument {a} (see daxshim gc --help)"
        ));
    }
    let dir = shadows::shadow_dir();
    let (list, orphans) = shadows::list(&dir);
    let mut removed = 0;
    let mut kept = 0;
    for s in &list {
        let removable = !s.backing_present || !s.may_hold_unsynced();
        if !s.live().is_empty() || !removable {
            if s.live().is_empty() && s.may_hold_unsynced() {
                println!(
                    "{}: kept: holds data not yet written back (daxshim sync)",
                    s.backing
                );
            }
            kept += 1;
            continue;
        }
        let why = if s.backing_present {
            "clean"
        } else {
            "file gone"
        };
        if remove_report(s, force, why) {
            removed += 1;
        } else {
            kept += 1;
        }
    }
    for o in &orphans {
        if force {
            match std::fs::remove_file(o) {
                Ok(()) => {
                    println!("{}: orphan removed", o.display());
                    removed += 1;
                }
                Err(e) => println!("{}: {e}", o.display()),
            }
        } else {
            println!("{}: orphan kept (--force removes it)", o.display());
            kept += 1;
        }
    }
    println!("{removed} removed, {kept} kept");
    ExitCode::SUCCESS
}
