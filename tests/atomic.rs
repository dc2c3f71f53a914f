//! Failure-atomic sync (`DAXSHIM_ATOMIC`, issue 14): every sync commits
//! everything since the previous one as one unit. Each test changes files
//! under the shim, kills or crashes it (inside the writeback too), drops
//! every shadow (power loss) and checks the file, read without the shim
//! after a recovery, byte for byte against the image of the last
//! acknowledged sync or of the one in progress — never a mix.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn atomic_world(tag: &str) -> World {
    // (DAXSHIM_TEST_ATOMIC=0: the same tests without atomic mode, to see
    // them fail.)
    let on = std::env::var("DAXSHIM_TEST_ATOMIC").unwrap_or_else(|_| "1".into());
    World::new(tag).env("DAXSHIM_ATOMIC", &on)
}

fn lanes(f: &Path) -> Vec<PathBuf> {
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    (0..10)
        .map(|k| f.with_file_name(format!(".{name}.daxshim-log{k}")))
        .filter(|p| p.exists())
        .collect()
}

/// Opens `f` under the shim (atomic or not), which recovers it when no
/// process is attached.
fn recover_by_opening(w: &World, f: &Path) {
    ok(w.probe(&format!("open {} rw", s(f))));
}

/// Writes go to the shadow only until the sync; the writer and other
/// processes under the shim see them at once, a reader without the shim
/// only after the sync; a kill drops what was not synced.
#[test]
fn writes_reach_the_file_at_the_sync_and_a_kill_drops_the_rest() {
    let w = atomic_world("atomwr");
    let f = w.pmem_file("f", &b"0123456789".repeat(1000));
    let (a, b, c, d) = (
        w.root.join("a"),
        w.root.join("b"),
        w.root.join("c"),
        w.root.join("d"),
    );
    let child = w
        .probe_cmd(&format!(
            "open {f} rw
             pwrite 0 AAAA , pwrite 9998 END , pread 0 4
             touch {a} , waitfor {b}
             fsync
             touch {c} , waitfor {d}
             pwrite 0 BBBB , pwrite 20000 GROWN
             kill",
            f = s(&f),
            a = s(&a),
            b = s(&b),
            c = s(&c),
            d = s(&d)
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&a);
    let before = backing(&f);
    assert_eq!(
        &before[..4],
        b"0123",
        "a write reached the file before the sync"
    );
    assert_eq!(before.len(), 10_001, "the size is the backing's at once");
    // Another process under the shim sees the unsynced bytes.
    let seen = ok(w.probe(&format!("open {} ro , pread 0 4 , pread 9998 3", s(&f))));
    assert_eq!(seen, "pread: AAAA\npread: END\n");
    std::fs::write(&b, "").unwrap();
    wait_for(&c);
    let synced = backing(&f);
    assert_eq!(&synced[..4], b"AAAA");
    assert_eq!(&synced[9998..], b"END");
    std::fs::write(&d, "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "pread: AAAA\n");
    // Killed alone: its unsynced writes are dropped, the size given back.
    assert_eq!(
        backing(&f).len(),
        20_005,
        "(the growth is in the backing until recovery)"
    );
    let after = ok(w.probe(&format!("open {} ro , pread 0 4", s(&f))));
    assert_eq!(after, "pread: AAAA\n");
    assert_eq!(backing(&f), synced);
    assert!(w.stat_sum("atomic_syncs") >= 1);
    assert!(w.stat_sum("atomic_recoveries") >= 1);
}

/// Stores of one process are committed by another's sync (the shared
/// shadow, as the page cache), and stay when the storing process dies
/// while others are attached.
#[test]
fn another_process_sync_commits_stores_of_a_dead_one() {
    let w = atomic_world("atomshare");
    let f = w.pmem_file("f", &vec![b'.'; 64 * 1024]);
    let (a, b) = (w.root.join("a"), w.root.join("b"));
    // A holds the file open throughout.
    let mut holder = w
        .probe_cmd(&format!(
            "open {} ro , touch {} , waitfor {}",
            s(&f),
            s(&a),
            s(&b)
        ))
        .spawn()
        .unwrap();
    wait_for(&a);
    killed(w.probe(&format!(
        "open {} rw , map 65536 , store 100 MAPPED , pwrite 5000 WRITTEN , kill",
        s(&f)
    )));
    assert_eq!(&backing(&f)[100..106], b"......");
    ok(w.probe(&format!("open {} rw , fdatasync", s(&f))));
    let now = backing(&f);
    assert_eq!(&now[100..106], b"MAPPED");
    assert_eq!(&now[5000..5007], b"WRITTEN");
    std::fs::write(&b, "").unwrap();
    assert!(holder.wait().unwrap().success());
    w.drop_shadows();
    recover_by_opening(&w, &f);
    assert_eq!(backing(&f), now);
}

/// A crash after size changes gives the synced size and bytes back:
/// growth by a write, ftruncate both ways, O_TRUNC at open.
#[test]
fn size_changes_since_the_sync_are_undone_by_a_crash() {
    let w = atomic_world("atomsize");
    let content: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let f = w.pmem_file("f", &content);
    for (i, script) in [
        "ftruncate 1000 , pwrite 60000 X , kill",
        "ftruncate 100 , ftruncate 40000 , ftruncate 10 , kill",
        "pwrite 49990 abcdefghijklmnopqrstuvwxyz , ftruncate 20 , kill",
        "close , open {f} trunc , pwrite 0 new , kill",
    ]
    .iter()
    .enumerate()
    {
        let script = script.replace("{f}", s(&f));
        killed(w.probe(&format!("open {} rw , {script}", s(&f))));
        if i % 2 == 0 {
            w.drop_shadows(); // power loss too
        }
        recover_by_opening(&w, &f);
        assert_eq!(backing(&f), content, "{script}");
    }
    // And synced, they stay.
    ok(w.probe(&format!("open {} rw , ftruncate 777 , fsync", s(&f))));
    w.drop_shadows();
    recover_by_opening(&w, &f);
    assert_eq!(backing(&f), content[..777]);
}

/// The images `atomic_writer` wrote before each sync, and the last sync it
/// started (from its output).
fn images(dir: &Path) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    while let Ok(b) = std::fs::read(dir.join(format!("image-{}", v.len()))) {
        v.push(b);
    }
    v
}

/// Runs `atomic_writer` on `f` (killed after `kill_after` if given; env
/// extra), then power loss (every shadow dropped) unless `keep_shadows`,
/// then recovery by a process under the shim, and checks the file against
/// the images. Returns (syncs acknowledged, died by the injected crash).
fn writer_cycle(
    w: &World,
    f: &Path,
    seed: u64,
    env: &[(&str, String)],
    kill_after: Option<Duration>,
    after_first_sync: bool,
    keep_shadows: bool,
) -> (usize, bool) {
    let imgs = w.root.join(format!("img-{seed}"));
    let _ = std::fs::remove_dir_all(&imgs);
    std::fs::create_dir_all(&imgs).unwrap();
    // The file as this run finds it (the writer writes the same image-0,
    // unless it is killed before).
    std::fs::write(imgs.join("image-0"), std::fs::read(f).unwrap_or_default()).unwrap();
    let mut c = w.shim_cmd(c_example("atomic_writer"));
    c.args([s(f), s(&imgs), &seed.to_string(), "6"]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a2 = acks.clone();
    let lines = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .inspect(|l| {
                if l.starts_with("synced") {
                    a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .collect::<Vec<String>>()
    });
    let begun = Instant::now();
    // With `after_first_sync`, the delay runs from the first acknowledged
    // sync: a slow start (the emulated DAX guest) must not make every kill
    // land before anything was synced.
    let mut start = None;
    let mut died_alone = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            died_alone = true;
            break;
        }
        if start.is_none()
            && (!after_first_sync || acks.load(std::sync::atomic::Ordering::SeqCst) > 0)
        {
            start = Some(Instant::now());
        }
        if start.is_some_and(|s| kill_after.is_some_and(|d| s.elapsed() >= d)) {
            let _ = child.kill();
            break;
        }
        assert!(begun.elapsed() < TIMEOUT, "atomic_writer hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = child.wait().unwrap();
    let lines = lines.join().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.success() || status.code().is_none(),
        "atomic_writer failed: {status:?} {err}"
    );
    let acked = lines.iter().filter(|l| l.starts_with("synced")).count();
    let started = lines.iter().filter(|l| l.starts_with("sync ")).count();
    if !keep_shadows {
        w.drop_shadows();
    }
    if f.exists() {
        recover_by_opening(w, f);
    }
    let imgs_v = images(&imgs);
    // (Killed before it made the file: the image found, empty.)
    let now = std::fs::read(f).unwrap_or_default();
    // The last acknowledged sync, or the one in progress.
    let ok_images = [acked, started];
    assert!(
        ok_images
            .iter()
            .any(|&k| imgs_v.get(k).is_some_and(|i| *i == now)),
        "seed {seed}: after {acked} acknowledged sync(s) ({started} started) the file ({} bytes) \
         is neither image {acked} nor {started} (sizes {:?}); env {env:?}",
        now.len(),
        imgs_v.iter().map(|i| i.len()).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&imgs);
    (acked, died_alone && !status.success())
}

/// The crash injected inside the writeback, at line offsets swept across
/// whole syncs (the log being written, then applied), then power loss and
/// recovery: the file is always the image of the last acknowledged sync
/// or of the one in progress.
#[test]
fn a_crash_at_any_line_of_the_writeback_leaves_one_image_or_the_next() {
    let w = atomic_world("atomsweep");
    let f = w.pmem.join("f");
    let iters = crash_iters(120);
    let mut rng = Rng(0x0a70_41c0);
    let mut crashed = 0;
    let mut acked_total = 0;
    for i in 0..iters {
        // Small budgets land in the first syncs' logs, larger ones in later
        // syncs and in the applies: every line offset of the run is met.
        let budget = if i < iters / 2 {
            i * 7
        } else {
            rng.below(12_000)
        };
        let (acked, died) = writer_cycle(
            &w,
            &f,
            i,
            &[("DAXSHIM_DEBUG_CRASH_AFTER_LINES", budget.to_string())],
            None,
            false,
            i % 4 == 3,
        );
        crashed += died as u64;
        acked_total += acked;
    }
    assert!(
        crashed >= iters / 2,
        "only {crashed} of {iters} runs died inside a writeback"
    );
    assert!(acked_total > 0, "no sync was ever acknowledged");
}

/// Killed at random instants, with and without power loss.
#[test]
fn a_kill_at_any_instant_leaves_one_image_or_the_next() {
    let w = atomic_world("atomkill");
    let f = w.pmem.join("f");
    let iters = crash_iters(60);
    let mut rng = Rng(0x4b111);
    let mut acked_total = 0;
    for i in 0..iters {
        let delay = Duration::from_millis(2 + rng.below(60));
        let (acked, _) = writer_cycle(&w, &f, 1000 + i, &[], Some(delay), i % 3 == 2, i % 2 == 1);
        acked_total += acked;
    }
    assert!(acked_total > 0, "no sync was ever acknowledged");
}

/// No room for the log: the sync fails with ENOSPC, the file keeps its
/// synced bytes, the data stays for the next try, which succeeds once there
/// is room.
#[test]
fn no_room_for_the_log_fails_the_sync_and_keeps_the_data() {
    let w = atomic_world("atomspace");
    // A small file system of its own for the pmem directory.
    let small = w.root.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = w
        .cmd("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", s(&small)])
        .status()
        .is_ok_and(|st| st.success());
    assert!(mounted, "this test mounts a 2 MiB tmpfs (root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let f = small.join("f");
    std::fs::write(&f, vec![b'.'; 256 * 1024]).unwrap();
    let filler = small.join("filler");
    std::fs::write(&filler, vec![0u8; 1700 * 1024]).unwrap();
    let mut c = w.shim_cmd(probe());
    c.env("DAXSHIM_PMEM", &small);
    let big = "Z".repeat(100 * 1024);
    c.args(script_args(&format!(
        "open {f} rw
         pwrite 0 {big}
         try_fsync self
         pread 0 4
         touch {go} , waitfor {freed}
         try_fsync self",
        f = s(&f),
        go = s(&w.root.join("go")),
        freed = s(&w.root.join("freed"))
    )));
    c.stdout(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_for(&w.root.join("go"));
    assert_eq!(
        &backing(&f)[..4],
        b"....",
        "a failed sync applied something"
    );
    std::fs::remove_file(&filler).unwrap();
    std::fs::write(w.root.join("freed"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "ret=-1 errno={}\npread: ZZZZ\nret=0",
            libc_enospc()
        )),
        "{text}"
    );
    assert_eq!(&backing(&f)[..100 * 1024], big.as_bytes());
}

fn libc_enospc() -> i32 {
    28
}

/// Recovery without atomic mode: a process under the shim that does not
/// ask for it still recovers a crashed atomic file, and the file leaves
/// atomic mode (its log goes).
#[test]
fn a_process_without_atomic_mode_recovers_and_the_log_goes() {
    let w = atomic_world("atomplain");
    let f = w.pmem_file("f", &vec![b'x'; 10_000]);
    killed(w.probe(&format!(
        "open {} rw , pwrite 0 YYYY , fsync , pwrite 0 ZZZZ , ftruncate 5 , kill",
        s(&f)
    )));
    w.drop_shadows();
    assert_eq!(backing(&f).len(), 5);
    assert!(!lanes(&f).is_empty());
    let plain = World::new("atomplain2");
    let mut c = plain.shim_cmd(probe());
    c.env("DAXSHIM_PMEM", &w.pmem)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .args(script_args(&format!("open {} rw , pread 0 6", s(&f))));
    assert_eq!(ok(run(c)), "pread: YYYYxx\n");
    assert_eq!(backing(&f).len(), 10_000);
    assert!(lanes(&f).is_empty(), "the log stayed: {:?}", lanes(&f));
}

/// `daxshim recover` of the world's pmem directory: its output.
fn daxshim_recover(w: &World) -> String {
    let mut c = w.cmd(target_dir().join("daxshim"));
    c.env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env("DAXSHIM_LIB", lib())
        .args(["recover", s(&w.pmem)]);
    ok(run(c))
}

/// `daxshim recover DIR` recovers every crashed atomic file under DIR, and
/// removes the log of a file that is gone; `daxshim run --atomic` turns
/// the mode on.
#[test]
fn daxshim_recover_and_run_atomic() {
    let w = World::new("atomcli");
    let exe = target_dir().join("daxshim");
    let f = w.pmem_file("f", &vec![b'a'; 9000]);
    let g = w.pmem_file("g", &vec![b'b'; 9000]);
    for p in [&f, &g] {
        let mut c = w.cmd(&exe);
        c.env("DAXSHIM_SHADOW_DIR", &w.shadow)
            .env("DAXSHIM_LIB", lib())
            .args(["run", "--pmem", s(&w.pmem), "--atomic", "--", s(&probe())])
            .args(script_args(&format!(
                "open {} rw , pwrite 1 SYNCED , fsync , pwrite 1 LOST , ftruncate 3 , kill",
                s(p)
            )));
        killed(run(c));
    }
    std::fs::remove_file(&g).unwrap();
    // The shadow the killed process left says what will become of it.
    let mut c = w.cmd(&exe);
    c.env("DAXSHIM_SHADOW_DIR", &w.shadow).args(["status"]);
    let st = ok(run(c));
    assert!(
        st.contains("failure-atomic (DAXSHIM_ATOMIC): last committed sync #"),
        "{st}"
    );
    assert!(st.contains("dropped by the next process"), "{st}");
    w.drop_shadows();
    assert_eq!(backing(&f).len(), 3);
    let out = daxshim_recover(&w);
    assert!(out.contains("brought back"), "{out}");
    assert!(out.contains("gone"), "{out}");
    let now = backing(&f);
    assert_eq!(now.len(), 9000);
    assert_eq!(&now[..8], b"aSYNCEDa");
    assert!(lanes(&g).is_empty());
    // Nothing left to do the second time.
    let out = daxshim_recover(&w);
    assert!(!out.contains("brought back"), "{out}");
}

/// The shim finds a file's log by its lane 0 alone, made before any other
/// and removed after them all: whatever lanes the syncs used, lane 0 is
/// there. A log without it (left by an older version of the shim, or lane
/// 0 removed by hand) is still recovered by `daxshim recover`.
#[test]
fn lane_0_marks_a_log_and_daxshim_recover_finds_one_without_it() {
    let w = atomic_world("atomlane0");
    let f = w.pmem_file("f", &vec![b'a'; 9000]);
    killed(w.probe(&format!(
        "open {} rw , pwrite 1 ONE , fsync , pwrite 1 TWO , fsync , pwrite 1 LOST , ftruncate 3 , kill",
        s(&f)
    )));
    let name = |k: u32| f.with_file_name(format!(".f.daxshim-log{k}"));
    let found = lanes(&f);
    assert!(found.contains(&name(0)), "{found:?}");
    assert!(found.len() > 1, "{found:?}");
    // The newest records are not in lane 0: without it, nothing says there
    // is a log but the other lanes.
    std::fs::remove_file(name(0)).unwrap();
    w.drop_shadows();
    assert_eq!(backing(&f).len(), 3);
    let out = daxshim_recover(&w);
    assert!(out.contains("brought back"), "{out}");
    let now = backing(&f);
    assert_eq!(now.len(), 9000);
    assert_eq!(&now[..5], b"aTWOa");
    // Leaving atomic mode removes every lane, lane 0 with them.
    let plain = World::new("atomlane0b");
    let mut c = plain.shim_cmd(probe());
    c.env("DAXSHIM_PMEM", &w.pmem)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .args(script_args(&format!("open {} rw , pread 0 5", s(&f))));
    assert_eq!(ok(run(c)), "pread: aTWOa\n");
    assert!(lanes(&f).is_empty(), "{:?}", lanes(&f));
}

// SQLite without its journal (`journal_mode=OFF`, `synchronous=FULL`):
// only the shim's atomic sync keeps it intact across crashes.

fn harness() -> PathBuf {
    let p = target_dir().join("sqlharness");
    assert!(p.is_file(), "build with cargo build --release --workspace");
    p
}

/// The stock SQLite (Python's sqlite3 module: reads and writes with
/// pread/pwrite, no mapping) committing the harness's transactions (same
/// schema, payloads and checksums, so `sqlharness check` verifies them).
const STOCK_WRITER: &str = r#"
import sqlite3, sys
def payload(i):
    return bytes(((i * 31 + j) % 251) for j in range(64 + (i * 7919) % 3000))
def fnv(b):
    h = 0
    for x in b:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h - (1 << 64) if h >= 1 << 63 else h
c = sqlite3.connect(sys.argv[1], isolation_level=None)
assert c.execute("PRAGMA journal_mode=OFF").fetchone()[0] == "off"
c.execute("PRAGMA synchronous=FULL")
c.execute("PRAGMA mmap_size=0")
c.executescript("""BEGIN;
CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB NOT NULL, h INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counter(k INTEGER PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES (1, 0);
CREATE INDEX IF NOT EXISTS t_h ON t(h);
COMMIT;""")
i = c.execute("SELECT v FROM counter WHERE k = 1").fetchone()[0] + 1
while True:
    p = payload(i)
    c.execute("BEGIN")
    c.execute("INSERT INTO t(id, payload, h) VALUES (?, ?, ?)", (i, p, fnv(p)))
    c.execute("UPDATE counter SET v = ? WHERE k = 1", (i,))
    if i > 10:
        old = 1 + (i * 13) % (i - 1)
        c.execute("UPDATE t SET payload = ? WHERE id = ?", (payload(old), old))
    c.execute("COMMIT")
    print(i, flush=True)
    i += 1
"#;

/// Runs `c` until it acknowledged something and then for `delay` more (or
/// until it dies by itself), kills it; returns the last acknowledged
/// number and whether it died by itself.
fn run_acked_then_kill(mut c: std::process::Command, delay: Duration) -> (u64, bool) {
    c.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child = c.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let a2 = acked.clone();
    let t = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(n) = line.trim().parse::<u64>() {
                *a2.lock().unwrap() = n;
            }
        }
    });
    let mut start = Instant::now();
    let mut died = false;
    let mut counting = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            died = true;
            break;
        }
        if !counting && *acked.lock().unwrap() > 0 {
            counting = true;
            start = Instant::now();
        }
        if counting && start.elapsed() >= delay {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "nothing acknowledged in time");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    t.join().unwrap();
    let n = *acked.lock().unwrap();
    (n, died)
}

/// After a crash: power loss (every shadow dropped), recovery by a process
/// under the shim opening the file, then SQLite without the shim finds the
/// database intact with every acknowledged transaction.
fn power_loss_then_check(w: &World, db: &Path, acked: u64, what: &str) {
    w.drop_shadows();
    recover_by_opening(w, db);
    let mut c = w.cmd(harness());
    c.args(["check", "--db", s(db), "--acked", &acked.to_string()]);
    let o = run(c);
    assert!(o.status.success(), "{what}: {}{}", stdout(&o), stderr(&o));
}

#[test]
fn sqlite_without_journal_survives_kills_and_power_loss() {
    let w = atomic_world("atomsql");
    let iters = crash_iters(10);
    let mut rng = Rng(0x05ee_d0ff);
    // The harness's SQLite writes pages through a shared mapping; the
    // stock one with pwrite.
    for (name, db) in [
        ("mmap", w.pmem.join("mapped.db")),
        ("pwrite", w.pmem.join("stock.db")),
    ] {
        let mut total = 0;
        for i in 0..iters {
            let c = if name == "mmap" {
                let mut c = w.shim_cmd(harness());
                c.args(["writer", "--db", s(&db), "--journal", "off"]);
                c
            } else {
                let mut c = w.shim_cmd(python());
                c.args(["-c", STOCK_WRITER, s(&db)]);
                c
            };
            let delay = Duration::from_millis(rng.below(200));
            let (acked, died) = run_acked_then_kill(c, delay);
            assert!(!died, "{name} {i}: the writer died by itself");
            total += acked;
            power_loss_then_check(
                &w,
                &db,
                acked,
                &format!("{name} iteration {i}, killed after {delay:?}"),
            );
        }
        assert!(total > 0, "{name}: nothing was acknowledged");
    }
    // (Killed writers leave no stats; the recovering processes do.)
    assert!(w.stat_sum("atomic_recoveries") > 0);
}

/// The harness's SQLite killed inside the shim's writeback, after N lines.
#[test]
fn sqlite_without_journal_survives_a_crash_inside_the_writeback() {
    let w = atomic_world("atomsqltorn");
    let db = w.pmem.join("db");
    let iters = crash_iters(10);
    let mut rng = Rng(0x0dea_d0ff);
    let mut died_inside = 0;
    for i in 0..iters {
        let n = 1 + rng.below(4000);
        let mut c = w.shim_cmd(harness());
        c.args(["writer", "--db", s(&db), "--journal", "off"])
            .env("DAXSHIM_DEBUG_CRASH_AFTER_LINES", n.to_string());
        let (acked, died) = run_acked_then_kill(c, Duration::from_secs(20));
        died_inside += died as u64;
        power_loss_then_check(
            &w,
            &db,
            acked,
            &format!("iteration {i}, crash after {n} lines"),
        );
    }
    assert!(
        died_inside >= iters / 2,
        "{died_inside} of {iters} died inside a writeback"
    );
}

/// Kyoto Cabinet without its transactions (`kchashmgr set`: open, set,
/// close, whose sync commits the record): processes killed inside the
/// shim's writeback of that close, then power loss. The database passes
/// `kchashmgr check` and holds every acknowledged record, and no record of
/// a process that died is half there.
#[test]
fn kyoto_cabinet_without_transactions_survives_crashes_inside_the_writeback() {
    let w = atomic_world("atomkc");
    let db = w.pmem.join("k.kch");
    let stats = w.root.join("kc-stats.json");
    let mgr = |args: &[&str], env: Option<u64>| {
        let _ = std::fs::remove_file(&stats);
        let mut c = w.shim_cmd("kchashmgr");
        c.args(args)
            .env("DAXSHIM_STATS", &stats)
            .env("DAXSHIM_LOG", "debug");
        if let Some(n) = env {
            c.env("DAXSHIM_DEBUG_CRASH_AFTER_LINES", n.to_string());
        }
        run(c)
    };
    ok(mgr(&["create", s(&db)], None));
    let mut rng = Rng(0x6bc0);
    let (mut acked, mut crashed) = (Vec::new(), Vec::new());
    let mut log = String::new();
    for i in 1..=crash_iters(24) {
        let key = format!("key{i:04}");
        let value = format!("value-{i}-{}", "x".repeat((i * 37 % 500) as usize));
        let budget = (i % 3 == 0).then(|| rng.below(24));
        let o = mgr(&["set", s(&db), &key, &value], budget);
        let counts = std::fs::read_to_string(&stats).unwrap_or_else(|_| "no stats".into());
        let counts = counts
            .split(",\"sync_hist")
            .next()
            .unwrap_or("")
            .to_string();
        log += &format!(
            "{key} budget {budget:?} {:?} [{counts}]: {}\n",
            o.status,
            stderr(&o)
        );
        if o.status.success() {
            acked.push((key, value));
            continue;
        }
        assert!(budget.is_some(), "kchashmgr set failed: {}", stderr(&o));
        crashed.push(key);
        w.drop_shadows();
        recover_by_opening(&w, &db);
    }
    assert!(!crashed.is_empty(), "no process died inside a writeback");
    w.drop_shadows();
    recover_by_opening(&w, &db);
    let check = run({
        let mut c = w.cmd("kchashmgr");
        c.args(["check", s(&db)]);
        c
    });
    assert!(
        check.status.success(),
        "kchashmgr check: {}{}",
        stdout(&check),
        stderr(&check)
    );
    let listed = ok(run({
        let mut c = w.cmd("kchashmgr");
        c.args(["list", "-pv", s(&db)]);
        c
    }));
    let records: Vec<(String, String)> = listed
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in &acked {
        assert!(
            records.contains(&(k.clone(), v.clone())),
            "acknowledged {k} lost\n{log}"
        );
    }
    for (k, v) in &records {
        let known = acked.iter().any(|(ak, av)| ak == k && av == v);
        let whole = crashed.contains(k)
            && v.starts_with(&format!("value-{}", &k[3..].trim_start_matches('0')));
        assert!(
            known || whole,
            "record {k} is neither acknowledged nor whole: {v}"
        );
    }
}

/// Kernel copies into an atomic file (`copy_file_range`, `sendfile`) wait
/// for the sync like writes; a rename under the shim moves the log with
/// the file; punching a hole is a write of zeros into the unit.
#[test]
fn kernel_copies_punching_and_rename_belong_to_the_unit() {
    let w = atomic_world("atomcopy");
    let src = w.plain_file(
        "src",
        &(0..4096u32)
            .map(|i| b'A' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let dst = w.pmem_file("dst", &vec![b'.'; 8192]);
    let moved = w.pmem.join("moved");
    let script = r#"
import os, subprocess, sys
src, dst, moved = sys.argv[1:4]
env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
def outside(p):
    return subprocess.run(["cat", p], env=env, capture_output=True).stdout
s = os.open(src, os.O_RDONLY)
d = os.open(dst, os.O_RDWR)
assert os.copy_file_range(s, d, 100, 0, 0) == 100
os.lseek(d, 200, 0)
assert os.sendfile(d, s, 100, 50) == 50
assert os.pread(d, 4, 0) == b"ABCD" and os.pread(d, 4, 200) == b"WXYZ"
print("before sync", outside(dst)[:4], outside(dst)[200:204])
os.fsync(d)
print("after sync", outside(dst)[:4], outside(dst)[200:204])
os.rename(dst, moved)
assert os.copy_file_range(s, d, 10, 1000, 4000) == 10
os.fdatasync(d)
assert os.copy_file_range(s, d, 10, 2000, 5000) == 10
print("renamed", outside(moved)[4000:4004], outside(moved)[5000:5004], flush=True)
os.kill(os.getpid(), 9)
"#;
    let mut c = w.shim_cmd(python());
    c.args(["-c", script, s(&src), s(&dst), s(&moved)]);
    let out = killed(run(c));
    assert_eq!(
        out,
        "before sync b'....' b'....'\nafter sync b'ABCD' b'WXYZ'\nrenamed b'MNOP' b'....'\n"
    );
    assert!(
        lanes(&dst).is_empty(),
        "the log stayed behind: {:?}",
        lanes(&dst)
    );
    assert_eq!(
        lanes(&moved).len(),
        4,
        "lane 0, the base record and two syncs, each in its lane"
    );
    w.drop_shadows();
    recover_by_opening(&w, &moved);
    let now = backing(&moved);
    assert_eq!(&now[4000..4004], b"MNOP");
    assert_eq!(
        &now[5000..5004],
        b"....",
        "an unsynced copy survived the crash"
    );
    // Punching: zeros, in the unit.
    killed(w.probe(&format!("open {} rw , punch 0 4096 , kill", s(&moved))));
    recover_by_opening(&w, &moved);
    assert_eq!(&backing(&moved)[..4], b"ABCD");
    ok(w.probe(&format!(
        "open {} rw , punch 0 4096 , pread 0 4 , fsync",
        s(&moved)
    )));
    assert_eq!(&backing(&moved)[..4096], &[0u8; 4096][..]);
    assert_eq!(backing(&moved).len(), 8192);
}

/// The log of a file that was deleted and replaced under the same name is
/// not the new file's: opening the new one replays nothing into it.
#[test]
fn a_replaced_file_is_not_recovered_from_the_old_ones_log() {
    let w = atomic_world("atomreplace");
    let f = w.pmem_file("f", &vec![b'o'; 20_000]);
    killed(w.probe(&format!(
        "open {} rw , pwrite 0 OLDSYNCED , fsync , pwrite 0 X , ftruncate 5 , kill",
        s(&f)
    )));
    w.drop_shadows();
    assert_eq!(lanes(&f).len(), 3, "lane 0, the base record and a sync");
    std::fs::remove_file(&f).unwrap();
    let fresh = vec![b'n'; 3000];
    std::fs::write(&f, &fresh).unwrap();
    assert_eq!(
        ok(w.probe(&format!("open {} rw , pread 0 4", s(&f)))),
        "pread: nnnn\n"
    );
    assert_eq!(backing(&f), fresh);
}

/// A file closed cleanly, then changed by a program without the shim: a
/// process that attaches in atomic mode and dies before its first sync
/// leaves a log whose recovery keeps that change (the records of the
/// earlier period are not replayed over it).
#[test]
fn recovery_keeps_what_changed_outside_the_shim_between_two_periods() {
    let w = atomic_world("atomperiods");
    let f = w.pmem_file("f", &vec![b'o'; 20_000]);
    ok(w.probe(&format!(
        "open {} rw , pwrite 0 SYNCED , fsync , pwrite 9000 LAST , fsync",
        s(&f)
    )));
    // Without the shim: over bytes both records wrote.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.write_all_at(b"OUTSIDE", 0).unwrap();
        file.write_all_at(b"OUT!", 9000).unwrap();
    }
    killed(w.probe(&format!("open {} rw , pread 0 7 , kill", s(&f))));
    w.drop_shadows();
    recover_by_opening(&w, &f);
    let b = backing(&f);
    assert_eq!(&b[..7], b"OUTSIDE");
    assert_eq!(&b[9000..9004], b"OUT!");
}

/// `syncfs` and `sync` commit a unit too; `daxshim sync FILE` recovers a
/// crashed atomic file that has no shadow left.
#[test]
fn syncfs_sync_and_daxshim_sync_file() {
    let w = atomic_world("atomsyncfs");
    let f = w.pmem_file("f", &vec![b'-'; 8192]);
    killed(w.probe(&format!(
        "open {} rw , pwrite 0 FS , syncfs , pwrite 2 S , sync , pwrite 4 LOST , ftruncate 1 , kill",
        s(&f)
    )));
    assert_eq!(&backing(&f)[..1], b"F");
    w.drop_shadows();
    let mut c = w.cmd(target_dir().join("daxshim"));
    c.env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env("DAXSHIM_LIB", lib())
        .args(["sync", s(&f)]);
    let out = ok(run(c));
    assert!(out.contains("brought back"), "{out}");
    let now = backing(&f);
    assert_eq!(now.len(), 8192);
    assert_eq!(&now[..6], b"FSS---");
}
