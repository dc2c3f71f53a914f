//! Real SQLite through the shim (issue: "SQLite through the shim").
//!
//! Two SQLite builds: the harness's bundled one with SQLITE_MMAP_READWRITE
//! (pages written through a shared mapping grown with mremap, durability from
//! fsync/fdatasync only), and the system's stock SQLite through Python's
//! sqlite3 module and the sqlite3 CLI (reads through a read-only mapping,
//! writes with pwrite64). Every test checks the backing file from a process
//! without the shim, and the shim's stats prove it was really in the path.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn harness() -> PathBuf {
    let p = target_dir().join("sqlharness");
    assert!(p.is_file(), "build with cargo build --release --workspace");
    p
}

fn harness_plain(w: &World, args: &[&str]) -> std::process::Output {
    let mut c = w.cmd(harness());
    c.args(args);
    run(c)
}

fn harness_shim(w: &World, args: &[&str]) -> std::process::Output {
    let mut c = w.shim_cmd(harness());
    c.args(args);
    run(c)
}

#[test]
fn mmap_readwrite_workload_matches_the_page_cache() {
    for journal in ["wal", "delete"] {
        for seed in ["1", "2"] {
            let w = World::new("sqlwl");
            let pdb = w.pmem.join("db");
            let odb = w.plain.join("db");
            let args = |db: &Path| {
                vec![
                    "workload".to_string(),
                    "--db".into(),
                    s(db).into(),
                    "--journal".into(),
                    journal.into(),
                    "--seed".into(),
                    seed.into(),
                    "--ops".into(),
                    "3000".into(),
                ]
            };
            let a = args(&pdb);
            let b = args(&odb);
            let shim = ok(harness_shim(
                &w,
                &a.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
            ));
            let plain = ok(harness_plain(
                &w,
                &b.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
            ));
            assert!(shim.contains("integrity=ok"), "{shim}");
            let digest = |o: &str| o.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
            assert_eq!(digest(&shim), digest(&plain), "{journal} seed {seed}");
            // The backing file, read by SQLite without the shim, holds it all.
            w.drop_shadows();
            let back = ok(harness_plain(&w, &["digest", "--db", s(&pdb)]));
            assert_eq!(
                digest(&back),
                digest(&plain),
                "backing after exit, {journal}"
            );
            assert!(
                w.stat_sum("mappings_shadowed") >= 1,
                "the database was not shadowed"
            );
            assert!(
                w.stat_sum("lines_written") > 0,
                "nothing went through the writeback"
            );
            assert!(w.stat_sum("syncs") > 0);
        }
    }
}

#[test]
fn stock_sqlite_python_and_cli_match_the_page_cache() {
    let script = r#"
import sqlite3, sys, hashlib
db, journal = sys.argv[1], sys.argv[2]
c = sqlite3.connect(db)
c.execute("PRAGMA mmap_size=268435456")
c.execute(f"PRAGMA journal_mode={journal}")
c.execute("PRAGMA synchronous=FULL")
c.execute("create table t(id integer primary key, v text, n integer)")
for i in range(3000):
    c.execute("insert into t(v, n) values (?, ?)", ("v%d" % i * (i % 7 + 1), i * 7 % 1000))
    if i % 50 == 0: c.commit()
c.commit()
c.execute("create index tn on t(n)")
c.execute("update t set v = v || 'u' where n < 300"); c.commit()
c.execute("delete from t where id % 5 = 0"); c.commit()
c.execute("vacuum")
h = hashlib.sha256()
for row in c.execute("select * from t order by id"): h.update(repr(row).encode())
print(c.execute("pragma integrity_check").fetchone()[0], c.execute("select count(*) from t").fetchone()[0], h.hexdigest())
"#;
    for journal in ["wal", "delete"] {
        let w = World::new("sqlpy");
        let mut outs = Vec::new();
        for (dir, shim) in [(&w.pmem, true), (&w.plain, false)] {
            let db = dir.join("db");
            let mut c = if shim {
                w.shim_cmd(python())
            } else {
                w.cmd(python())
            };
            c.args(["-c", script, s(&db), journal]);
            outs.push(ok(run(c)));
        }
        assert_eq!(outs[0], outs[1], "{journal}");
        assert!(outs[0].starts_with("ok 2400 "), "{}", outs[0]);
        assert!(w.stat_sum("mappings_shadowed") >= 1);
        // The backing, through Python without the shim.
        w.drop_shadows();
        let mut c = w.cmd(python());
        c.args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute('pragma integrity_check').fetchone()[0], c.execute('select count(*) from t').fetchone()[0])", s(&w.pmem.join("db"))]);
        assert_eq!(ok(run(c)).trim(), "ok 2400");
    }
    // The sqlite3 command-line shell (stock SQLite, another program).
    let w = World::new("sqlcli");
    let sql = "PRAGMA mmap_size=268435456; PRAGMA journal_mode=wal; CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT);
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<5000) INSERT INTO t SELECT x, printf('%0100d', x) FROM c;
        CREATE INDEX tb ON t(b); DELETE FROM t WHERE a % 3 = 0; VACUUM; PRAGMA integrity_check; SELECT count(*), sum(a) FROM t;";
    let mut outs = Vec::new();
    for (dir, shim) in [(&w.pmem, true), (&w.plain, false)] {
        let mut c = if shim {
            w.shim_cmd("sqlite3")
        } else {
            w.cmd("sqlite3")
        };
        c.arg(dir.join("db")).arg(sql);
        outs.push(ok(run(c)));
    }
    assert_eq!(outs[0], outs[1]);
    assert!(outs[0].contains("ok\n3334|"), "{}", outs[0]);
    assert!(w.stat_sum("mappings_shadowed") >= 1);
}

/// One writer and readers of two SQLite builds on one WAL database: the
/// -shm file carries the lock state between processes through one shadow.
#[test]
fn concurrent_writer_and_readers_on_a_wal_database() {
    let w = World::new("sqlmp");
    let db = w.pmem.join("db");
    let done = w.root.join("done");
    // Create the schema first so readers find it.
    ok(harness_shim(
        &w,
        &["writer", "--db", s(&db), "--journal", "wal", "--max", "1"],
    ));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut c = w.shim_cmd(harness());
        c.args(["reader", "--db", s(&db), "--until", s(&done)]);
        readers.push(std::thread::spawn(move || run(c)));
    }
    let py = format!(
        r#"
import sqlite3, os, time
c = sqlite3.connect({db:?}, timeout=30)
c.execute("PRAGMA mmap_size=268435456")
last, n = 0, 0
while True:
    stop = os.path.exists({done:?})
    m = c.execute("select coalesce(max(id),0) from t").fetchone()[0]
    assert m >= last, (m, last)
    last, n = m, n + 1
    if stop: break
    time.sleep(0.001)
print("py-reads", n, last)
"#,
        db = s(&db),
        done = s(&done)
    );
    let mut pc = w.shim_cmd(python());
    pc.args(["-c", &py]);
    let pyreader = std::thread::spawn(move || run(pc));
    let wo = ok(harness_shim(
        &w,
        &["writer", "--db", s(&db), "--journal", "wal", "--max", "400"],
    ));
    assert!(wo.trim_end().ends_with("400"));
    std::fs::write(&done, b"").unwrap();
    for r in readers {
        let o = ok(r.join().unwrap());
        assert!(o.contains("last=400"), "{o}");
    }
    let o = ok(pyreader.join().unwrap());
    assert!(o.contains(" 400"), "{o}");
    w.drop_shadows();
    assert!(ok(harness_plain(
        &w,
        &["check", "--db", s(&db), "--acked", "400"]
    ))
    .starts_with("ok rows=400"));
    assert!(w.stat_sum("lines_written") > 0);
}

/// Starts the writer under the shim, kills it with SIGKILL after `delay`,
/// and returns the last acknowledged transaction and whether the writer
/// died on its own before that.
fn run_and_kill(
    w: &World,
    db: &Path,
    journal: &str,
    delay: Duration,
    extra_env: &[(&str, String)],
) -> (u64, bool) {
    run_and_kill_from(w, db, journal, delay, extra_env, false)
}

/// [`run_and_kill`]; with `after_first_ack` the delay starts when the
/// writer acknowledges its first transaction (it has mapped the database
/// by then), however slow its start-up (an emulated VM: ~0.3 s).
fn run_and_kill_from(
    w: &World,
    db: &Path,
    journal: &str,
    delay: Duration,
    extra_env: &[(&str, String)],
    after_first_ack: bool,
) -> (u64, bool) {
    let mut c = w.shim_cmd(harness());
    c.args(["writer", "--db", s(db), "--journal", journal]);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child = c.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let acked = Arc::new(Mutex::new(0u64));
    let a2 = acked.clone();
    let t = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(l) = line else { break };
            if let Ok(n) = l.trim().parse::<u64>() {
                *a2.lock().unwrap() = n;
            }
        }
    });
    let mut start = Instant::now();
    let mut died = false;
    if after_first_ack {
        while *acked.lock().unwrap() == 0 {
            if child.try_wait().unwrap().is_some() {
                died = true;
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the writer acknowledged nothing in 60 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        start = Instant::now();
    }
    while !died && start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            died = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    t.join().unwrap();
    let n = *acked.lock().unwrap();
    (n, died)
}

fn check_backing(w: &World, db: &Path, acked: u64, what: &str) {
    let o = harness_plain(w, &["check", "--db", s(db), "--acked", &acked.to_string()]);
    assert!(o.status.success(), "{what}: {}{}", stdout(&o), stderr(&o));
}

/// Kill at a random moment, drop every shadow (power failure), open the
/// backing with SQLite without the shim: intact, nothing acknowledged lost.
#[test]
fn crash_with_power_failure_keeps_every_acknowledged_commit() {
    let iters = crash_iters(12);
    let mut total_acked = 0;
    for journal in ["wal", "delete"] {
        let w = World::new("sqlcrash");
        let db = w.pmem.join("db");
        let mut rng = Rng(0x5eed ^ journal.len() as u64);
        for i in 0..iters {
            // Every other kill comes after the first commit: a slow start
            // (the emulated DAX guest takes ~0.3 s to its first commit)
            // must not make every kill land before the database is mapped.
            let delay = Duration::from_millis(20 + rng.below(150));
            let (acked, _) = run_and_kill_from(&w, &db, journal, delay, &[], i % 2 == 1);
            total_acked += acked;
            w.drop_shadows();
            check_backing(
                &w,
                &db,
                acked,
                &format!("{journal} iteration {i}, killed after {delay:?}"),
            );
        }
    }
    assert!(total_acked > 0, "no transaction was ever acknowledged");
}

/// Kill only: the next process through the shim sees everything the killed
/// one committed, and after it the backing is durable too.
#[test]
fn crash_without_power_failure_next_process_sees_everything() {
    let iters = crash_iters(8);
    for journal in ["wal", "delete"] {
        let w = World::new("sqlkill");
        let db = w.pmem.join("db");
        let mut rng = Rng(0xc0ffee ^ journal.len() as u64);
        for i in 0..iters {
            // Killed once it has committed (and so mapped the database):
            // a kill before that leaves no shadow to reconcile.
            let (acked, died) = run_and_kill_from(
                &w,
                &db,
                journal,
                Duration::from_millis(rng.below(120)),
                &[],
                true,
            );
            assert!(
                acked > 0 && !died,
                "{journal} {i}: acked {acked}, died {died}"
            );
            let before = w.stat_sum("reconciles");
            let o = harness_shim(
                &w,
                &["check", "--db", s(&db), "--acked", &acked.to_string()],
            );
            assert!(
                o.status.success(),
                "{journal} {i}: {}{}",
                stdout(&o),
                stderr(&o)
            );
            // The checker was the first to attach after the kill: it
            // reconciled what the dead writer left.
            assert!(
                w.stat_sum("reconciles") > before,
                "{journal} {i}: the next process did not reconcile"
            );
        }
        w.drop_shadows();
        check_backing(&w, &db, 0, journal);
    }
}

/// Fault injection inside the shim: the writer dies in the middle of a
/// writeback (after N cachelines); the torn backing plus SQLite's journal
/// must still recover to a committed state.
#[test]
fn crash_inside_the_writeback_recovers() {
    let iters = crash_iters(10);
    let mut died_mid_writeback = 0;
    for journal in ["wal", "delete"] {
        let w = World::new("sqltorn");
        let db = w.pmem.join("db");
        let mut rng = Rng(0xdead ^ journal.len() as u64);
        for i in 0..iters {
            let n = 1 + rng.below(3000);
            let (acked, died) = run_and_kill(
                &w,
                &db,
                journal,
                Duration::from_secs(10),
                &[("DAXSHIM_DEBUG_CRASH_AFTER_LINES", n.to_string())],
            );
            w.drop_shadows();
            check_backing(
                &w,
                &db,
                acked,
                &format!("{journal} iteration {i}, crash after {n} lines"),
            );
            if died {
                died_mid_writeback += 1;
            }
        }
    }
    // Every iteration must have died by the injected crash, not our timeout.
    assert_eq!(died_mid_writeback, 2 * iters);
}

/// SQLite's own tests damage a database through stdio (its `hexio_write`
/// helper) in the process that has it open and mapped, and expect SQLite to
/// report the damage on its next read: the page cache shows the mapping the
/// stdio write at once, and so must the shim.
#[test]
fn stdio_damage_of_a_mapped_database_is_seen_by_sqlite() {
    let w = World::new("sqldamage");
    let plain = ok(harness_plain(
        &w,
        &["damage", "--db", s(&w.plain.join("db"))],
    ));
    assert_eq!(plain.trim(), "damage: corrupt", "the kernel's answer");
    let shim = ok(harness_shim(&w, &["damage", "--db", s(&w.pmem.join("db"))]));
    assert_eq!(shim.trim(), "damage: corrupt");
    w.assert_shadowed();
}
