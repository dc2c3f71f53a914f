//! `bench-run`: one benchmark run in this process.

use crate::data::Rng;
use crate::db::{integrity, open};
use crate::{e, Args, Res};
use rusqlite::params;
use std::time::Instant;

/// One benchmark run in this process: speedtest1-like phases, printed as
/// `phase seconds` lines.
pub fn bench_run(a: &Args) -> Res<()> {
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
