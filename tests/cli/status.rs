//! `status`, `drop`, `sync` and `gc`: the shadows crashed processes left.

use crate::common::*;
use crate::{daxshim, install};
use std::path::Path;

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

/// Python: maps FILE writable; with `half` reads the first half of its
/// pages, says how much shadow (data and bases) the directory holds, waits
/// for a line, reads the second half, says it again and waits for a line;
/// with `eager` reads a byte and exits; else stores a word, says "ready"
/// and waits for a line before it syncs and exits.
const EVICT_SCRIPT: &str = r#"
import os, mmap, sys, time
P = 4096
def held():
    d = os.environ["DAXSHIM_SHADOW_DIR"]
    total = 0
    for n in os.listdir(d):
        if n.endswith((".meta", ".regions")) or n.startswith("live-"): continue
        total += os.stat(os.path.join(d, n)).st_blocks * 512
    return total
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0)
half = len(m) // P // 2
if sys.argv[2] == "half":
    s = sum(m[i*P] for i in range(1, half))
    print("half", held(), flush=True)
    sys.stdin.readline()
    s += sum(m[i*P] for i in range(half, 2 * half))
    # The fault thread evicts beside the reader: on a loaded machine it
    # may run behind it for a while.
    for _ in range(200):
        if held() < 16 << 20: break
        time.sleep(0.05)
    print("done", held(), flush=True)
    sys.stdin.readline()
elif sys.argv[2] == "eager":
    print("eager", m[P], flush=True)
else:
    m[0:4] = b"kid!"
    print("ready", flush=True)
    sys.stdin.readline()
    m.flush()
"#;

/// DAXSHIM_CACHE_MAX with a process attached whose stores are not trapped
/// (its mapping is under DAXSHIM_TRAP_MIN): `status` says eviction keeps to
/// a process alone, and the other process does not evict while it is
/// attached; once it is gone, it does. A process without lazy filling
/// then maps the file: `status` says eviction is off.
#[test]
fn status_says_when_eviction_keeps_to_a_process_alone_or_is_off() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let w = World::new("clievict")
        .env("DAXSHIM_CACHE_MAX", "4M")
        .env("DAXSHIM_TRAP_MIN", "0");
    let exe = install(&w);
    let f = w.pmem_file("f", &vec![7u8; 64 << 20]);
    let start = |arg: &str, env: &[(&str, &str)]| {
        let mut c = w.shim_cmd(python());
        c.args(["-c", EVICT_SCRIPT, s(&f), arg])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        (child, out)
    };
    let line = |r: &mut BufReader<std::process::ChildStdout>| {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    let (mut kid, mut kid_out) = start("kid", &[("DAXSHIM_TRAP_MIN", "off")]);
    assert_eq!(line(&mut kid_out), "ready");
    let (mut reader, mut reader_out) = start("half", &[]);
    let half = line(&mut reader_out);
    let status = ok(daxshim(&w, &exe, &["status"]));
    kid.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    assert!(kid.wait().unwrap().success());
    reader.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let done = line(&mut reader_out);
    // A process without lazy filling fills the holes: no eviction at all.
    let (mut eager, mut eager_out) = start("eager", &[("DAXSHIM_LAZY", "off")]);
    assert_eq!(line(&mut eager_out), "eager 7");
    assert!(eager.wait().unwrap().success());
    let status_eager = ok(daxshim(&w, &exe, &["status"]));
    reader.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    assert!(reader.wait().unwrap().success());
    assert!(
        status.contains(&format!(
            "eviction (DAXSHIM_CACHE_MAX): only while alone; [{}]",
            kid.id()
        )),
        "{status}"
    );
    assert_eq!(&backing(&f)[..4], b"kid!");
    let held = |l: &str| -> u64 { l.split_whitespace().nth(1).unwrap().parse().unwrap() };
    // Where the shim fills lazily (a userfaultfd that serves the kernel's
    // own faults), and so evicts.
    if w.stat_sum("lazy_faults") > 0 {
        // 32 MiB read beside the untrapped process: nothing evicted.
        assert!(held(&half) > 28 << 20, "{half}");
        // Alone, the next 32 MiB went through the 4 MiB cache.
        assert!(held(&done) < 16 << 20, "{done}");
        assert!(
            status_eager.contains("eviction (DAXSHIM_CACHE_MAX): off"),
            "{status_eager}"
        );
    }
}
