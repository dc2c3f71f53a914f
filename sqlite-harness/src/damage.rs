//! `damage`: what SQLite's own tests do with its `hexio_write` helper —
//! damage a database file through stdio, in the same process that has it
//! open (and mapped), and expect SQLite to report the damage on its next
//! read. Under the kernel page cache the mapping shows the damage at once.

use crate::{db, e, Args, Res};
use std::ffi::CString;

/// Fills a table over several pages, reads it all (through the mapping),
/// overwrites the header of the table's root page with stdio, reads again,
/// and prints `damage: ok N` (read N rows) or `damage: corrupt` (SQLite
/// reported `SQLITE_CORRUPT`).
pub fn damage(a: &Args) -> Res<()> {
    let path = a.get("db")?;
    let c = db::open(path, "delete", true)?;
    c.execute_batch(
        "CREATE TABLE t(x);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO t SELECT randomblob(100) FROM n;",
    )
    .map_err(e)?;
    let rows: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .map_err(e)?;
    let page: i64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(e)?;
    let root: i64 = c
        .query_row(
            "SELECT rootpage FROM sqlite_schema WHERE name = 't'",
            [],
            |r| r.get(0),
        )
        .map_err(e)?;
    eprintln!("damage: {rows} rows; root page {root} of {page} bytes");
    stdio_overwrite(path, (root - 1) * page, &[0xff; 16])?;
    let r = c.query_row("SELECT count(*), sum(length(x)) FROM t", [], |r| {
        r.get::<_, i64>(0)
    });
    match r {
        Ok(n) => println!("damage: ok {n}"),
        Err(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::DatabaseCorrupt =>
        {
            println!("damage: corrupt")
        }
        Err(x) => return Err(e(x)),
    }
    Ok(())
}

/// `fopen(path, "r+")`, `fseek`, `fwrite`, `fclose`: C's stdio, as a C
/// program (or SQLite's test helpers) would use it.
fn stdio_overwrite(path: &str, off: i64, bytes: &[u8]) -> Res<()> {
    let p = CString::new(path).map_err(e)?;
    // SAFETY: C strings; the stream is used only here and closed.
    unsafe {
        let fp = libc::fopen(p.as_ptr(), c"r+".as_ptr());
        if fp.is_null() {
            return Err(format!("fopen {path}: {}", std::io::Error::last_os_error()));
        }
        let ok = libc::fseek(fp, off as libc::c_long, libc::SEEK_SET) == 0
            && libc::fwrite(bytes.as_ptr() as *const libc::c_void, 1, bytes.len(), fp)
                == bytes.len();
        let closed = libc::fclose(fp) == 0;
        if !(ok && closed) {
            return Err(format!("stdio write to {path} failed"));
        }
    }
    Ok(())
}
