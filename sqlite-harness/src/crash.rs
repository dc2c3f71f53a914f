//! The crash tests' processes: `writer` acknowledges committed transactions,
//! `check` verifies a database after a crash, `reader` reads it meanwhile.

use crate::data::fnv;
use crate::db::{integrity, open};
use crate::{e, Args, Res};
use rusqlite::{params, Connection, OptionalExtension};
use std::io::Write;
use std::time::Duration;

fn payload(i: i64) -> Vec<u8> {
    let len = 64 + (i as usize * 7919) % 3000;
    (0..len)
        .map(|j| ((i as usize * 31 + j) % 251) as u8)
        .collect()
}

/// Commits numbered transactions and acknowledges each on stdout once
/// COMMIT returned. Each transaction inserts row i and sets the counter to i
/// (so the two must agree after any crash), and rewrites an older row.
pub fn writer(a: &Args) -> Res<()> {
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
pub fn check(a: &Args) -> Res<()> {
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
pub fn reader(a: &Args) -> Res<()> {
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
