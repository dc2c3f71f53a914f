//! More real programs through the shim (issue: "Robustness"): LMDB with
//! MDB_WRITEMAP, whose lock.mdb carries process-shared robust mutexes in a
//! shared mapping that must stay one shared object across processes.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn lmdb_writer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/py/lmdb_writer.py")
}

fn check_plain(w: &World, dir: &Path, prefix: &str, acked: u64) -> String {
    let mut c = w.cmd(python());
    c.arg(lmdb_writer())
        .args(["--check", s(dir), prefix, &acked.to_string()]);
    let o = run(c);
    assert!(o.status.success(), "{prefix}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

#[test]
fn lmdb_writemap_several_writer_processes() {
    let w = World::new("lmdbmp");
    let dir = w.pmem.clone();
    let writers: Vec<_> = (0..3)
        .map(|k| {
            let mut c = w.shim_cmd(python());
            c.arg(lmdb_writer())
                .args([s(&dir), &format!("w{k}"), "150"]);
            std::thread::spawn(move || run(c))
        })
        .collect();
    for h in writers {
        let out = ok(h.join().unwrap());
        assert!(out.trim_end().ends_with("150"), "{out}");
    }
    assert!(
        w.stat_sum("mappings_shadowed") >= 6,
        "data.mdb and lock.mdb of 3 processes"
    );
    assert!(w.stat_sum("lines_written") > 0);
    w.drop_shadows();
    for k in 0..3 {
        assert!(check_plain(&w, &dir, &format!("w{k}"), 150).starts_with("ok 150"));
    }
}

/// Kill an LMDB writer at a random moment, drop every shadow (power
/// failure), open the backing without the shim: every acknowledged
/// transaction is there, none torn.
#[test]
fn lmdb_writemap_crash_with_power_failure_keeps_acknowledged_commits() {
    let iters: u64 = std::env::var("DAXSHIM_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let w = World::new("lmdbcrash");
    let dir = w.pmem.clone();
    let mut seed = 0x1d3b_u64;
    let mut total = 0;
    for i in 0..iters {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(100 + seed % 400);
        let mut c = w.shim_cmd(python());
        c.arg(lmdb_writer())
            .args([s(&dir), "c"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if i % 3 == 2 {
            // Die inside a writeback instead.
            c.env(
                "DAXSHIM_DEBUG_CRASH_AFTER_LINES",
                (1 + seed % 400).to_string(),
            );
        }
        let mut child = c.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut last = 0u64;
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(n) = l.trim().parse() {
                    if last == 0 {
                        let _ = first_tx.send(());
                    }
                    last = n;
                }
            }
            last
        });
        // The random moment counts from the first commit, however slowly
        // the interpreter starts (an emulated VM).
        let _ = first_rx.recv_timeout(Duration::from_secs(30));
        let start = Instant::now();
        while start.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let _ = child.wait();
        let acked = t.join().unwrap();
        total += acked;
        w.drop_shadows();
        if acked > 0 || dir.join("data.mdb").exists() {
            check_plain(&w, &dir, "c", acked);
        }
    }
    assert!(total > 0, "no LMDB transaction was ever acknowledged");
}

/// Runs a tdbtool session on `db` (through the shim if `shim`) and kills it
/// once every command was processed: no quit, no clean close.
fn tdb_session_then_kill(w: &World, db: &Path, shim: bool) {
    use std::io::{Read, Write};
    let cmds = format!(
        "create {}\ntransaction_start\ninsert alpha one\ninsert beta two\ntransaction_commit\n\
         transaction_start\ninsert gamma three\ndelete alpha\ntransaction_commit\nstore beta TWO\n",
        s(db)
    );
    let ncmds = cmds.lines().count();
    // stdbuf: prompts unbuffered (one per processed command), so the test
    // knows when the commits are done; it keeps LD_PRELOAD.
    let mut c = if shim {
        w.shim_cmd("stdbuf")
    } else {
        w.cmd("stdbuf")
    };
    c.args(["-o0", "tdbtool"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c
        .spawn()
        .expect("tdbtool (scripts/deps.sh installs tdb-tools)");
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(cmds.as_bytes())
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let start = Instant::now();
    while seen.matches("tdb> ").count() <= ncmds {
        assert!(start.elapsed() < TIMEOUT, "tdbtool stalled: {seen}");
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&chunk);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tdbdump(w: &World, db: &Path, shim: bool) -> String {
    let mut d = if shim {
        w.shim_cmd("tdbdump")
    } else {
        w.cmd("tdbdump")
    };
    d.arg(db);
    ok(run(d))
}

/// Samba's TDB (`tdbtool`, from Debian) maps its file `MAP_SHARED` and
/// commits transactions with fsync and msync.
#[test]
fn tdb_transactions_survive_kill_and_power_failure() {
    let w = World::new("tdb");
    // The kernel page cache after a kill: the reference.
    let plain_db = w.plain.join("t.tdb");
    tdb_session_then_kill(&w, &plain_db, false);
    let reference = tdbdump(&w, &plain_db, false);
    assert!(
        reference.contains("\"gamma\"")
            && reference.contains("\"TWO\"")
            && !reference.contains("\"alpha\""),
        "{reference}"
    );
    // Killed only: the next process through the shim sees the same.
    let a = w.pmem.join("a.tdb");
    tdb_session_then_kill(&w, &a, true);
    assert_eq!(tdbdump(&w, &a, true), reference);
    // Killed, then power failure: the committed transactions are in the
    // backing; the last store was never synced and may be lost.
    let b = w.pmem.join("b.tdb");
    tdb_session_then_kill(&w, &b, true);
    w.drop_shadows();
    let after = tdbdump(&w, &b, false);
    let as_committed = reference.replace("\"TWO\"", "\"two\"");
    assert!(after == reference || after == as_committed, "{after}");
    assert!(
        w.stat_sum("mappings_shadowed") >= 1,
        "the tdb file was never shadowed"
    );
}
