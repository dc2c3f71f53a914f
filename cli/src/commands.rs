//! `status`, `sync`, `drop`, `gc`: what the shim left in the shadow
//! directory, and writing it back or removing it.

use crate::progress::Progress;
use crate::shadows::{self, Proc, ShadowInfo};
use crate::{fail, human, library};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// A bar for sync and gc once they have run this long.
const SLOW: Duration = Duration::from_millis(500);

/// `daxshim status [--json]`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim status [--json]",
    before_help = "Lists this user's shadows ($DAXSHIM_SHADOW_DIR, default /dev/shm/daxshim-UID):
backing file, size, resident size, attached processes (alive or dead) and
whether the shadow may hold data not yet written back, then the orphans
(shadows kept aside because their file changed without the shim)."
)]
pub struct StatusArgs {
    /// Print one JSON object (shadow_dir, shadows, orphans)
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct StatusJson<'a> {
    shadow_dir: String,
    shadows: Vec<ShadowJson<'a>>,
    orphans: Vec<String>,
}

#[derive(Serialize)]
struct ShadowJson<'a> {
    shadow: &'a str,
    backing: &'a str,
    backing_present: bool,
    emulated: bool,
    has_data: bool,
    size: u64,
    resident: u64,
    processes: &'a [Proc],
    may_hold_unsynced: bool,
    /// Lazily filled, but a process mapped it without lazy filling: no
    /// eviction.
    no_evict: bool,
    /// Failure-atomic: the last committed sync (null: normal mode).
    atomic_gen: Option<u64>,
}

pub fn status(args: StatusArgs) -> ExitCode {
    let dir = shadows::shadow_dir();
    let (list, orphans) = shadows::list(&dir);
    if args.json {
        let j = StatusJson {
            shadow_dir: dir.to_string_lossy().into_owned(),
            shadows: list
                .iter()
                .map(|s| ShadowJson {
                    shadow: &s.key,
                    backing: &s.backing,
                    backing_present: s.backing_present,
                    emulated: s.emulated,
                    has_data: s.has_data,
                    size: s.size,
                    resident: s.resident,
                    processes: &s.procs,
                    may_hold_unsynced: s.may_hold_unsynced(),
                    no_evict: s.no_evict,
                    atomic_gen: s.atomic_gen,
                })
                .collect(),
            orphans: orphans
                .iter()
                .map(|o| o.to_string_lossy().into_owned())
                .collect(),
        };
        return match serde_json::to_string(&j) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("status: {e}")),
        };
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
            let untrapped: Vec<i32> = s
                .procs
                .iter()
                .filter(|p| p.alive && p.untrapped)
                .map(|p| p.pid)
                .collect();
            if s.no_evict {
                println!(
                    "  eviction (DAXSHIM_CACHE_MAX): off — a process mapped it without lazy filling (its holes were filled)"
                );
            } else if !untrapped.is_empty() && s.procs.iter().filter(|p| p.alive).count() > 1 {
                println!(
                    "  eviction (DAXSHIM_CACHE_MAX): only while alone; {untrapped:?} store without region traps (mapping under DAXSHIM_TRAP_MIN, or another tracker)"
                );
            }
        }
        if let Some(g) = s.atomic_gen {
            println!("  failure-atomic (DAXSHIM_ATOMIC): last committed sync #{g}");
        }
        let dead = s.dead_writers();
        if !dead.is_empty() && s.atomic_gen.is_some() {
            println!("  unsynced stores of dead processes {dead:?}: dropped by the next process that attaches alone (failure-atomic), or committed by a sync of a live one");
        } else if !dead.is_empty() {
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

/// `daxshim sync [FILE...]`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim sync [FILE...]",
    before_help = "Writes back shadows whose writers are gone (what the next process that maps
the file would do), makes the data durable and removes the shadow when
nothing else uses it. Without FILE: every such shadow of this user. Shadows
that live processes use are left to them (their syncs and their exit write
back)."
)]
pub struct SyncArgs {
    /// Files whose shadows to write back (default: every shadow with dead writers)
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// What the helper did to one file.
struct Attached {
    reconciles: u64,
    lines_written: u64,
    /// Interrupted failure-atomic syncs finished or undone.
    recoveries: u64,
}

/// Attaches to `path` through the library in a helper process (so the
/// protocol is the library's own) and reports what it wrote back.
fn sync_one(lib: &Path, path: &str, emulated: bool) -> Result<(u64, u64), String> {
    attach_one(lib, path, emulated).map(|a| (a.reconciles, a.lines_written))
}

fn attach_one(lib: &Path, path: &str, emulated: bool) -> Result<Attached, String> {
    let tmp = std::env::temp_dir().join(format!("daxshim-sync-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new(exe);
    c.arg(ATTACH_HELPER)
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
    let v = crate::statsview::parse(&stats).ok_or("helper wrote no DAXSHIM_STATS object")?;
    Ok(Attached {
        reconciles: v.num("reconciles"),
        lines_written: v.num("lines_written"),
        recoveries: v.num("atomic_recoveries"),
    })
}

/// The failure-atomic log's lanes of `file` (`.<name>.daxshim-logK`
/// beside it, K one digit) that exist.
fn lanes_of(file: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return Vec::new();
    };
    (0..10)
        .map(|k| dir.join(format!(".{}.daxshim-log{k}", name.to_string_lossy())))
        .filter(|p| p.exists())
        .collect()
}

/// The shim looks for a log by its lane 0 alone (made first, removed last):
/// a log that lacks it (left by an older version, or lane 0 removed by
/// hand) gets an empty one, so that the attach below finds the others.
fn first_lane_for(file: &Path) {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return;
    };
    let lane0 = dir.join(format!(".{}.daxshim-log0", name.to_string_lossy()));
    if !lane0.exists() && !lanes_of(file).is_empty() {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lane0)
            .and_then(|f| f.sync_all());
    }
}

/// The data file a lane belongs to (`.<name>.daxshim-logK` → `<name>`).
fn data_of_lane(lane: &Path) -> Option<PathBuf> {
    let n = lane.file_name()?.to_str()?;
    let rest = n.strip_prefix('.')?;
    let rest = rest.strip_suffix(|c: char| c.is_ascii_digit())?;
    let name = rest
        .strip_suffix(".daxshim-log")
        .filter(|n| !n.is_empty())?;
    Some(lane.with_file_name(name))
}

/// Files with atomic-log lanes under `dir` (recursively, not following
/// symbolic links).
fn atomic_files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            atomic_files_under(&p, out);
        } else if let Some(d) = data_of_lane(&p) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
}

/// `daxshim recover [DIR...]`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim recover [DIR...]",
    before_help = "Finishes or undoes failure-atomic syncs (DAXSHIM_ATOMIC) that a crash or a
power loss interrupted: every file under DIR (recursively) with an atomic
log beside it (.NAME.daxshim-log0 to 7) is brought back to its last committed
sync, as the first process under the shim that opens it would. Run it at
boot, before programs without the shim read such files. Without DIR: the
directories of $DAXSHIM_PMEM. Files that live processes use are left to
them; logs whose file is gone are removed."
)]
pub struct RecoverArgs {
    /// Directories to search (default: those of $DAXSHIM_PMEM)
    #[arg(value_name = "DIR", value_parser = crate::existing_dir)]
    dirs: Vec<String>,
}

pub fn recover(args: RecoverArgs) -> ExitCode {
    let lib = match library::find() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let mut dirs: Vec<PathBuf> = args.dirs.iter().map(PathBuf::from).collect();
    if dirs.is_empty() {
        let pmem = std::env::var("DAXSHIM_PMEM").unwrap_or_default();
        dirs = pmem
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    if dirs.is_empty() {
        return fail("name the directories to search (or set DAXSHIM_PMEM)");
    }
    let mut files = Vec::new();
    for d in &dirs {
        atomic_files_under(d, &mut files);
    }
    if files.is_empty() {
        println!(
            "no failure-atomic logs under {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::SUCCESS;
    }
    let (list, _) = shadows::list(&shadows::shadow_dir());
    let mut failed = false;
    for f in files {
        let shown = f.display();
        if !f.exists() {
            for l in lanes_of(&f) {
                let _ = std::fs::remove_file(l);
            }
            println!("{shown}: the file is gone; its log was removed");
            continue;
        }
        let live = shadows::file_id(&f)
            .ok()
            .and_then(|id| list.iter().find(|s| s.key == id.key()).map(|s| s.live()))
            .unwrap_or_default();
        if !live.is_empty() {
            println!("{shown}: in use by {live:?}; left to them");
            continue;
        }
        let emulated = !is_dax(&f);
        first_lane_for(&f);
        match attach_one(&lib, &f.to_string_lossy(), emulated) {
            Ok(a) if a.recoveries > 0 => {
                println!("{shown}: brought back to its last committed sync")
            }
            Ok(_) => println!("{shown}: nothing to recover (its last process detached cleanly)"),
            Err(e) => {
                println!("{shown}: recovery failed: {e}");
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

/// Is `f` on a real DAX file system (statx says so)? Else it is treated as
/// emulated pmem for the helper.
fn is_dax(f: &Path) -> bool {
    const STATX_ATTR_DAX: u64 = 0x0020_0000;
    let Ok(c) = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statx is a valid value to be overwritten; a C
    // string and a valid output pointer.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_BASIC_STATS,
            &mut stx,
        ) == 0
            && stx.stx_attributes & STATX_ATTR_DAX != 0
    }
}

/// The first argument that makes `daxshim` the helper of `sync`.
pub const ATTACH_HELPER: &str = "__attach";

/// The helper: open the file through the shim (attach, which reconciles),
/// close it (detach, which removes a clean shadow).
pub fn attach_helper(files: &[PathBuf]) -> ExitCode {
    for p in files {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(p) {
            eprintln!("daxshim: {}: {e}", p.display());
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

pub fn sync(args: SyncArgs) -> ExitCode {
    let lib = match library::find() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let dir = shadows::shadow_dir();
    let (list, _) = shadows::list(&dir);
    let targets: Vec<ShadowInfo> = if args.files.is_empty() {
        list.into_iter()
            .filter(|s| !s.dead_writers().is_empty())
            .collect()
    } else {
        let mut v = Vec::new();
        for a in &args.files {
            let id = match shadows::file_id(a) {
                Ok(id) => id,
                Err(e) => return fail(&format!("{}: {e}", a.display())),
            };
            match list.iter().find(|s| s.key == id.key()) {
                Some(s) => v.push(s.clone()),
                None if !lanes_of(a).is_empty() => {
                    // A failure-atomic log: the helper's attach recovers.
                    let path = std::fs::canonicalize(a).unwrap_or_else(|_| a.clone());
                    match attach_one(&lib, &path.to_string_lossy(), !is_dax(&path)) {
                        Ok(r) if r.recoveries > 0 => println!(
                            "{}: brought back to its last committed atomic sync",
                            a.display()
                        ),
                        Ok(_) => println!("{}: no shadow, nothing to write back", a.display()),
                        Err(e) => return fail(&format!("{}: recovery failed: {e}", a.display())),
                    }
                }
                None => println!("{}: no shadow, nothing to write back", a.display()),
            }
        }
        v
    };
    if targets.is_empty() && args.files.is_empty() {
        println!("nothing to write back");
    }
    let mut failed = false;
    let progress = Progress::new(targets.len() as u64, "sync", "shadows", SLOW);
    for s in targets {
        progress.inc();
        let live = s.live();
        if !live.is_empty() {
            progress.println(&format!(
                "{}: in use by {live:?}; their syncs write it back",
                s.backing
            ));
            continue;
        }
        if !s.backing_present {
            progress.println(&format!("{}: the file is gone or was replaced; the shadow's data cannot be written back (daxshim gc --force removes it)", s.backing));
            failed = true;
            continue;
        }
        match sync_one(&lib, &s.backing, s.emulated) {
            Ok((rec, lines)) => {
                let removed = !s.meta.exists();
                progress.println(&format!(
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
                ));
            }
            Err(e) => {
                progress.println(&format!("{}: write-back failed: {e}", s.backing));
                failed = true;
            }
        }
    }
    progress.finish();
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

const DROP_ABOUT: &str = "\
drop removes the shadows of FILEs. gc removes every shadow of this user that
no process uses and that is clean or whose file no longer exists. Both
refuse to remove a shadow that may hold data not yet written back (run
`daxshim sync` first) unless --force is given; gc --force also removes
orphans. Shadows in use by live processes are never removed.";

/// `daxshim drop [--force] FILE...`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim drop [--force] FILE...\n       daxshim gc [--force]",
    before_help = DROP_ABOUT
)]
pub struct DropArgs {
    /// Remove shadows that may hold data not yet written back too
    #[arg(short, long)]
    force: bool,
    /// Files whose shadows to remove
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// `daxshim gc [--force]`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim gc [--force]\n       daxshim drop [--force] FILE...",
    before_help = DROP_ABOUT
)]
pub struct GcArgs {
    /// Remove shadows that may hold data not yet written back, and orphans
    #[arg(short, long)]
    force: bool,
}

fn remove_report(s: &ShadowInfo, force: bool, why: &str, out: &dyn Fn(&str)) -> bool {
    if !s.live().is_empty() {
        out(&format!(
            "{}: in use by {:?}; not removed",
            s.backing,
            s.live()
        ));
        return false;
    }
    if s.may_hold_unsynced() && !force {
        out(&format!(
            "{}: may hold data not yet written back; run `daxshim sync {}` or pass --force",
            s.backing, s.backing
        ));
        return false;
    }
    match shadows::remove(s) {
        Ok(()) => {
            out(&format!("{}: shadow removed ({why})", s.backing));
            true
        }
        Err(e) => {
            out(&format!("{}: not removed: {e}", s.backing));
            false
        }
    }
}

fn print(line: &str) {
    println!("{line}");
}

pub fn drop(args: DropArgs) -> ExitCode {
    let dir = shadows::shadow_dir();
    let (list, _) = shadows::list(&dir);
    let mut ok = true;
    for f in &args.files {
        let key = match shadows::file_id(f) {
            Ok(id) => id.key(),
            Err(e) => {
                println!("{}: {e}", f.display());
                ok = false;
                continue;
            }
        };
        match list.iter().find(|s| s.key == key) {
            None => println!("{}: no shadow", f.display()),
            Some(s) => ok &= remove_report(s, args.force, "dropped", &print),
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub fn gc(args: GcArgs) -> ExitCode {
    let force = args.force;
    let dir = shadows::shadow_dir();
    let (list, orphans) = shadows::list(&dir);
    let mut removed = 0;
    let mut kept = 0;
    let progress = Progress::new((list.len() + orphans.len()) as u64, "gc", "shadows", SLOW);
    let out = |line: &str| progress.println(line);
    for s in &list {
        progress.inc();
        let removable = !s.backing_present || !s.may_hold_unsynced();
        if !s.live().is_empty() || !removable {
            if s.live().is_empty() && s.may_hold_unsynced() {
                out(&format!(
                    "{}: kept: holds data not yet written back (daxshim sync)",
                    s.backing
                ));
            }
            kept += 1;
            continue;
        }
        let why = if s.backing_present {
            "clean"
        } else {
            "file gone"
        };
        if remove_report(s, force, why, &out) {
            removed += 1;
        } else {
            kept += 1;
        }
    }
    for o in &orphans {
        progress.inc();
        if force {
            match std::fs::remove_file(o) {
                Ok(()) => {
                    out(&format!("{}: orphan removed", o.display()));
                    removed += 1;
                }
                Err(e) => out(&format!("{}: {e}", o.display())),
            }
        } else {
            out(&format!(
                "{}: orphan kept (--force removes it)",
                o.display()
            ));
            kept += 1;
        }
    }
    progress.finish();
    // What dead processes left of their presence (not shadows: not counted).
    shadows::remove_stale_presences(&dir);
    println!("{removed} removed, {kept} kept");
    ExitCode::SUCCESS
}
