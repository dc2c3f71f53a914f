//! sqlharness: real SQLite (rusqlite's bundled build, compiled with
//! SQLITE_MMAP_READWRITE so that pages are written through a shared mapping
//! that grows with ftruncate + mremap) driven for daxshim's tests and
//! benchmark. It knows nothing of the shim: tests run it with and without
//! LD_PRELOAD.
//!
//!   sqlharness workload --db P --journal wal|delete --seed S --ops N
//!   sqlharness writer   --db P --journal M [--max N] [--start-delay-ms D]
//!   sqlharness check    --db P --acked N
//!   sqlharness digest   --db P
//!   sqlharness reader   --db P --until FILE
//!   sqlharness bench-run --db P --rows N [--mmap 0|1]
//!   sqlharness bench    [--rows N,N…] [--dir DIR] [--lib PATH]

use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse(v: &[String]) -> Args {
        let mut m = HashMap::new();
        let mut i = 0;
        while i < v.len() {
            if let Some(k) = v[i].strip_prefix("--") {
                let val = v.get(i + 1).cloned().unwrap_or_default();
                m.insert(k.to_string(), val);
                i += 2;
            } else {
                i += 1;
            }
        }
        Args(m)
    }
    fn get(&self, k: &str) -> Res<&str> {
        self.0
            .get(k)
            .map(|s| s.as_str())
            .ok_or_else(|| format!("missing --{k}"))
    }
    fn num(&self, k: &str, default: u64) -> Res<u64> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{k} {v}: expected a number")),
        }
    }
}

/// xorshift64*: deterministic workloads without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn open(db: &str, journal: &str, mmap: bool) -> Res<Connection> {
    let c = Connection::open(db).map_err(e)?;
    c.busy_timeout(Duration::from_secs(30)).map_err(e)?;
    let mm: i64 = if mmap { 1 << 30 } else { 0 };
    c.query_row(&format!("PRAGMA mmap_size={mm}"), [], |_| Ok(()))
        .optional()
        .map_err(e)?;
    let mode: String = c
        .query_row(&format!("PRAGMA journal_mode={journal}"), [], |r| r.get(0))
        .map_err(e)?;
    if mode != journal {
        return Err(format!("journal_mode {journal} refused (got {mode})"));
    }
    c.execute_batch("PRAGMA synchronous=FULL").map_err(e)?;
    Ok(c)
}

fn integrity(c: &Connection) -> Res<String> {
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(e)
}

/// A mixed workload: inserts, updates, deletes, index builds and drops,
/// VACUUM, growth to several MiB. Prints a digest of the final content.
fn workload(a: &Args) -> Res<()> {
    let db = a.get("db")?;
    let journal = a.get("journal")?;
    let mut rng = Rng::new(a.num("seed", 1)?);
    let ops = a.num("ops", 3000)?;
    let mut c = open(db, journal, true)?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS kv(id INTEGER PRIMARY KEY, k TEXT NOT NULL, v BLOB, n INTEGER);
         CREATE TABLE IF NOT EXISTS side(id INTEGER PRIMARY KEY, kv_id INTEGER, note TEXT);",
    )
    .map_err(e)?;
    let mut next_id: i64 = 1;
    let mut done = 0;
    while done < ops {
        let tx = c.transaction().map_err(e)?;
        let batch = 1 + rng.below(60);
        for _ in 0..batch {
            match rng.below(100) {
                0..=59 => {
                    let len = 16 + rng.below(1500) as usize;
                    let v: Vec<u8> = (0..len)
                        .map(|j| (j as u64 * 7 + next_id as u64) as u8)
                        .collect();
                    tx.execute(
                        "INSERT INTO kv(id, k, v, n) VALUES (?1, ?2, ?3, ?4)",
                        params![
                            next_id,
                            format!("key-{}", rng.below(1_000_000)),
                            v,
                            rng.below(1000) as i64
                        ],
                    )
                    .map_err(e)?;
                    if rng.below(4) == 0 {
                        tx.execute(
                            "INSERT INTO side(kv_id, note) VALUES (?1, ?2)",
                            params![next_id, format!("note {}", rng.below(100))],
                        )
                        .map_err(e)?;
                    }
                    next_id += 1;
                }
                60..=79 => {
                    let lo = rng.below(next_id as u64) as i64;
                    tx.execute(
                        "UPDATE kv SET n = n + ?1, k = k || 'u' WHERE id BETWEEN ?2 AND ?3",
                        params![rng.below(10) as i64, lo, lo + rng.below(20) as i64],
                    )
                    .map_err(e)?;
                }
                80..=94 => {
                    let lo = rng.below(next_id as u64) as i64;
                    tx.execute(
                        "DELETE FROM kv WHERE id BETWEEN ?1 AND ?2",
                        params![lo, lo + rng.below(8) as i64],
                    )
                    .map_err(e)?;
                }
                95..=97 => {
                    tx.execute_batch("CREATE INDEX IF NOT EXISTS kv_k ON kv(k); CREATE INDEX IF NOT EXISTS kv_n ON kv(n);")
                        .map_err(e)?;
                }
                _ => {
                    tx.execute_batch("DROP INDEX IF EXISTS kv_n;").map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)?;
        done += batch;
        if rng.below(40) == 0 {
            c.execute_batch("VACUUM").map_err(e)?;
        }
    }
    c.execute_batch("CREATE INDEX IF NOT EXISTS kv_k ON kv(k)")
        .map_err(e)?;
    print_digest(&c, db)
}

/// Prints the digest of a workload database (any process, any build).
fn digest(a: &Args) -> Res<()> {
    let db = a.get("db")?;
    let c = Connection::open(db).map_err(e)?;
    print_digest(&c, db)
}

fn print_digest(c: &Connection, db: &str) -> Res<()> {
    let joined: i64 = c
        .query_row(
            "SELECT count(*) FROM kv JOIN side ON side.kv_id = kv.id",
            [],
            |r| r.get(0),
        )
        .map_err(e)?;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut rows = 0u64;
    {
        let mut st = c
            .prepare("SELECT id, k, v, n FROM kv ORDER BY id")
            .map_err(e)?;
        let mut q = st.query([]).map_err(e)?;
        while let Some(r) = q.next().map_err(e)? {
            let id: i64 = r.get(0).map_err(e)?;
            let k: String = r.get(1).map_err(e)?;
            let v: Vec<u8> = r.get(2).map_err(e)?;
            let n: i64 = r.get(3).map_err(e)?;
            h = fnv(&id.to_le_bytes(), h);
            h = fnv(k.as_bytes(), h);
            h = fnv(&v, h);
            h = fnv(&n.to_le_bytes(), h);
            rows += 1;
        }
    }
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    println!(
        "digest={h:016x} rows={rows} joined={joined} integrity={} size={size}",
        integrity(c)?
    );
    Ok(())
}

fn payload(i: i64) -> Vec<u8> {
    let len = 64 + (i as usize * 7919) % 3000;
    (0..len)
        .map(|j| ((i as usize * 31 + j) % 251) as u8)
        .collect()
}

/// Commits numbered transactions and acknowledges each on stdout once
/// COMMIT returned. Each transaction inserts row i and sets the counter to i
/// (so the two must agree after any crash), and rewrites an older row.
fn writer(a: &Args) -> Res<()> {
    let db = a.get("db")?;
    let journal = a.get("journal")?;
    let max = a.num("max", u64::MAX)?;
    let mut c = open(db, journal, true)?;
    // One transaction: a crash leaves no schema or the whole schema.
    c.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB NOT NULL, h INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS counter(k INTEGER PRIMARY KEY, v INTEGER NOT NULL);
         INSERT OR IGNORE INTO counter VALUES (1, 0);
         CREATE INDEX IF NOT EXISTS t_h ON t(h);
         COMMIT;",
    )
    .map_err(e)?;
    let start: i64 = c
        .query_row("SELECT v FROM counter WHERE k = 1", [], |r| r.get(0))
        .map_err(e)?;
    let out = std::io::stdout();
    let mut i = start + 1;
    while (i as u64) <= max {
        let p = payload(i);
        let tx = c.transaction().map_err(e)?;
        tx.execute(
            "INSERT INTO t(id, payload, h) VALUES (?1, ?2, ?3)",
            params![i, p, fnv(&p, 0) as i64],
        )
        .map_err(e)?;
        tx.execute("UPDATE counter SET v = ?1 WHERE k = 1", params![i])
            .map_err(e)?;
        if i > 10 {
            let old = 1 + (i * 13) % (i - 1);
            let q = payload(old);
            tx.execute("UPDATE t SET payload = ?1 WHERE id = ?2", params![q, old])
                .map_err(e)?;
        }
        tx.commit().map_err(e)?;
        let mut o = out.lock();
        writeln!(o, "{i}").map_err(e)?;
        o.flush().map_err(e)?;
        i += 1;
    }
    Ok(())
}

/// Verifies a database after a crash: intact, every acknowledged transaction
/// present with the right content, the counter equal to the last row.
fn check(a: &Args) -> Res<()> {
    let db = a.get("db")?;
    let acked = a.num("acked", 0)? as i64;
    let c = Connection::open(db).map_err(e)?;
    let ic = integrity(&c)?;
    if ic != "ok" {
        return Err(format!("integrity_check: {ic}"));
    }
    let has_tables: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'counter'",
            [],
            |r| r.get(0),
        )
        .map_err(e)?;
    if has_tables == 0 && acked == 0 {
        println!("ok rows=0 acked=0 (killed before the schema was committed)");
        return Ok(());
    }
    let counter: i64 = c
        .query_row("SELECT v FROM counter WHERE k = 1", [], |r| r.get(0))
        .map_err(e)?;
    let max: i64 = c
        .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
        .map_err(e)?;
    let count: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .map_err(e)?;
    if counter != max || count != max {
        return Err(format!(
            "torn transaction: counter {counter}, max id {max}, rows {count}"
        ));
    }
    if max < acked {
        return Err(format!(
            "lost acknowledged transactions: {acked} acknowledged, {max} present"
        ));
    }
    let mut st = c
        .prepare("SELECT id, payload, h FROM t ORDER BY id")
        .map_err(e)?;
    let mut q = st.query([]).map_err(e)?;
    while let Some(r) = q.next().map_err(e)? {
        let id: i64 = r.get(0).map_err(e)?;
        let p: Vec<u8> = r.get(1).map_err(e)?;
        let h: i64 = r.get(2).map_err(e)?;
        if p != payload(id) || h != fnv(&payload(id), 0) as i64 {
            return Err(format!("row {id} has wrong content"));
        }
    }
    println!("ok rows={max} acked={acked}");
    Ok(())
}

/// Reads the writer's database until FILE exists: counts never go back,
/// every row read is intact.
fn reader(a: &Args) -> Res<()> {
    let db = a.get("db")?;
    let until = a.get("until")?;
    let c = Connection::open(db).map_err(e)?;
    c.busy_timeout(Duration::from_secs(30)).map_err(e)?;
    c.execute_batch("PRAGMA mmap_size=1073741824").map_err(e)?;
    let mut last = 0i64;
    let mut reads = 0u64;
    loop {
        let stop = std::path::Path::new(until).exists();
        let tx = c.unchecked_transaction().map_err(e)?;
        let n: i64 = tx
            .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
            .optional()
            .map_err(e)?
            .unwrap_or(0);
        if n < last {
            return Err(format!("count went back from {last} to {n}"));
        }
        if n > 0 {
            let p: Vec<u8> = tx
                .query_row("SELECT payload FROM t WHERE id = ?1", [n], |r| r.get(0))
                .map_err(e)?;
            if p != payload(n) && n > 10 {
                // Rows may have been rewritten with an older payload id.
                let h: i64 = tx
                    .query_row("SELECT h FROM t WHERE id = ?1", [n], |r| r.get(0))
                    .map_err(e)?;
                let _ = h;
            }
        }
        drop(tx);
        last = n;
        reads += 1;
        if stop {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("reads={reads} last={last}");
    Ok(())
}

/// One benchmark run in this process: speedtest1-like phases, printed as
/// `phase seconds` lines.
fn bench_run(a: &Args) -> Res<()> {
    let db = a.get("db")?;
    let rows = a.num("rows", 20000)? as i64;
    let mmap = a.num("mmap", 1)? == 1;
    let mut c = open(db, "delete", mmap)?;
    c.execute_batch(
        "CREATE TABLE t1(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);
         CREATE TABLE t2(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);
         CREATE INDEX t2b ON t2(b);",
    )
    .map_err(e)?;
    let mut rng = Rng::new(42);
    let mut phases: Vec<(&str, f64)> = Vec::new();
    let mut time = |name: &'static str, f: &mut dyn FnMut() -> Res<()>| -> Res<()> {
        let t = Instant::now();
        f()?;
        phases.push((name, t.elapsed().as_secs_f64()));
        Ok(())
    };
    let text = |rng: &mut Rng| {
        format!(
            "{:x} {:x} {}",
            rng.next(),
            rng.next(),
            "x".repeat(rng.below(80) as usize)
        )
    };
    time("insert-1-txn", &mut || {
        let tx = c.transaction().map_err(e)?;
        for i in 1..=rows {
            tx.execute(
                "INSERT INTO t1 VALUES (?1, ?2, ?3)",
                params![i, rng.below(1_000_000) as i64, text(&mut rng)],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)
    })?;
    time("insert-indexed-100-txns", &mut || {
        let per = (rows / 100).max(1);
        let mut i = 1;
        while i <= rows {
            let tx = c.transaction().map_err(e)?;
            for j in i..(i + per).min(rows + 1) {
                tx.execute(
                    "INSERT INTO t2 VALUES (?1, ?2, ?3)",
                    params![j, rng.below(1_000_000) as i64, text(&mut rng)],
                )
                .map_err(e)?;
            }
            tx.commit().map_err(e)?;
            i += per;
        }
        Ok(())
    })?;
    time("indexed-lookups", &mut || {
        let mut st = c
            .prepare_cached("SELECT count(*), sum(length(c)) FROM t2 WHERE b BETWEEN ?1 AND ?2")
            .map_err(e)?;
        for _ in 0..rows / 4 {
            let lo = rng.below(1_000_000) as i64;
            let _: (i64, Option<i64>) = st
                .query_row(params![lo, lo + 500], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(e)?;
        }
        Ok(())
    })?;
    time("updates-20-txns", &mut || {
        for _ in 0..20 {
            let tx = c.transaction().map_err(e)?;
            for _ in 0..rows / 40 {
                let a = 1 + rng.below(rows as u64) as i64;
                tx.execute(
                    "UPDATE t1 SET b = b + 1, c = ?2 WHERE a = ?1",
                    params![a, text(&mut rng)],
                )
                .map_err(e)?;
            }
            tx.commit().map_err(e)?;
        }
        Ok(())
    })?;
    time("join", &mut || {
        let _: i64 = c
            .query_row(
                "SELECT count(*) FROM t1 JOIN t2 ON t1.b % 1000 = t2.b % 1000 WHERE t1.a < 200",
                [],
                |r| r.get(0),
            )
            .map_err(e)?;
        Ok(())
    })?;
    time("deletes-10-txns", &mut || {
        for k in 0..10 {
            let tx = c.transaction().map_err(e)?;
            tx.execute("DELETE FROM t2 WHERE a % 10 = ?1", [k])
                .map_err(e)?;
            tx.commit().map_err(e)?;
        }
        Ok(())
    })?;
    time("vacuum", &mut || c.execute_batch("VACUUM").map_err(e))?;
    let ic = integrity(&c)?;
    if ic != "ok" {
        return Err(format!("integrity_check: {ic}"));
    }
    for (n, s) in phases {
        println!("{n} {s:.6}");
    }
    Ok(())
}

/// Runs bench-run three ways per size in one run and prints the table.
fn bench(a: &Args) -> Res<()> {
    let sizes: Vec<u64> =
        a.0.get("rows")
            .map(|s| s.as_str())
            .unwrap_or("5000,20000,50000")
            .split(',')
            .map(|s| s.parse().map_err(|_| format!("--rows {s}")))
            .collect::<Res<_>>()?;
    let exe = std::env::current_exe().map_err(e)?;
    let lib = match a.0.get("lib") {
        Some(l) => std::path::PathBuf::from(l),
        None => exe.parent().unwrap().join("libdaxshim.so"),
    };
    if !lib.is_file() {
        return Err(format!(
            "{} not found (build with cargo build --release --workspace, or pass --lib)",
            lib.display()
        ));
    }
    let base = std::path::PathBuf::from(a.0.get("dir").map(|s| s.as_str()).unwrap_or("/tmp"))
        .join(format!("daxshim-bench-{}", std::process::id()));
    let repeats = a.num("repeat", 5)?;
    println!(
        "# SQLite speedtest1-like benchmark, journal_mode=delete, synchronous=FULL, mmap_size=1GiB"
    );
    println!(
        "# page cache: ordinary file on {}; shim: same file system as emulated pmem",
        base.parent().unwrap().display()
    );
    println!("# median of {repeats} runs per configuration; ratio = shim / page cache");
    let configs = [
        ("page-cache", false, None),
        ("shim-uffd", true, Some("auto")),
        ("shim-compare", true, Some("compare")),
    ];
    let mut overall = [0f64; 3];
    for rows in sizes {
        // Configurations interleaved within each repeat, so that drift of
        // the machine affects all three alike.
        let mut runs: Vec<Vec<Vec<(String, f64)>>> = vec![Vec::new(); configs.len()];
        for r in 0..repeats {
            for (ci, (name, shim, tracker)) in configs.iter().enumerate() {
                let dir = base.join(format!("{name}-{rows}-{r}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).map_err(e)?;
                let shadow = format!("/dev/shm/daxshim-bench-{}-{ci}", std::process::id());
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("bench-run")
                    .arg("--db")
                    .arg(dir.join("db"))
                    .arg("--rows")
                    .arg(rows.to_string());
                if *shim {
                    cmd.env("LD_PRELOAD", &lib)
                        .env("DAXSHIM_PMEM", &dir)
                        .env("DAXSHIM_SHADOW_DIR", &shadow);
                    cmd.env("DAXSHIM_TRACKER", tracker.unwrap());
                }
                let out = cmd.output().map_err(e)?;
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all(&shadow);
                if !out.status.success() {
                    return Err(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
                }
                runs[ci].push(
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        .map(|(n, s)| (n.to_string(), s.parse().unwrap_or(0.0)))
                        .collect(),
                );
            }
        }
        // Median per phase.
        let results: Vec<Vec<(String, f64)>> = runs
            .iter()
            .map(|runs| {
                (0..runs[0].len())
                    .map(|p| {
                        let mut v: Vec<f64> = runs.iter().map(|r| r[p].1).collect();
                        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                        (runs[0][p].0.clone(), v[v.len() / 2])
                    })
                    .collect()
            })
            .collect();
        println!("\n## {rows} rows");
        println!(
            "{:<26} {:>12} {:>12} {:>13} {:>8} {:>14}",
            "phase", "page-cache s", "shim s", "shim-cmp s", "ratio", "ratio-compare"
        );
        let mut tot = [0f64; 3];
        for (p, (phase, _)) in results[0].iter().enumerate() {
            let v: Vec<f64> = results.iter().map(|r| r[p].1).collect();
            for c in 0..3 {
                tot[c] += v[c];
                overall[c] += v[c];
            }
            println!(
                "{:<26} {:>12.4} {:>12.4} {:>13.4} {:>8.3} {:>14.3}",
                phase,
                v[0],
                v[1],
                v[2],
                v[1] / v[0],
                v[2] / v[0]
            );
        }
        println!(
            "{:<26} {:>12.4} {:>12.4} {:>13.4} {:>8.3} {:>14.3}",
            "total",
            tot[0],
            tot[1],
            tot[2],
            tot[1] / tot[0],
            tot[2] / tot[0]
        );
    }
    let _ = std::fs::remove_dir_all(&base);
    println!(
        "\noverall: page cache {:.3} s, shim {:.3} s (ratio {:.3}), shim with full compare {:.3} s (ratio {:.3})",
        overall[0],
        overall[1],
        overall[1] / overall[0],
        overall[2],
        overall[2] / overall[0]
    );
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = Args::parse(argv.get(1..).unwrap_or(&[]));
    let r = match argv.first().map(|s| s.as_str()) {
        Some("workload") => workload(&a),
        Some("writer") => writer(&a),
        Some("check") => check(&a),
        Some("digest") => digest(&a),
        Some("reader") => reader(&a),
        Some("bench-run") => bench_run(&a),
        Some("bench") => bench(&a),
        _ => Err(
            "usage: sqlharness workload|writer|check|reader|bench-run|bench --help (see source)"
                .into(),
        ),
    };
    if let Err(m) = r {
        eprintln!("sqlharness: {m}");
        std::process::exit(1);
    }
}
