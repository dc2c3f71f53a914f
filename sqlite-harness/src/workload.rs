//! `workload` and `digest`: a mixed workload and the digest of its content.

use crate::data::{fnv, Rng};
use crate::db::{integrity, open};
use crate::{e, Args, Res};
use rusqlite::{params, Connection};

/// A mixed workload: inserts, updates, deletes, index builds and drops,
/// VACUUM, growth to several MiB. Prints a digest of the final content.
pub fn workload(a: &Args) -> Res<()> {
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
pub fn digest(a: &Args) -> Res<()> {
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
