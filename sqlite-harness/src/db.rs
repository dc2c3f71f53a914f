//! Opening a database the way every subcommand does, and its integrity check.

use crate::{e, Res};
use rusqlite::{Connection, OptionalExtension};
use std::time::Duration;

pub fn open(db: &str, journal: &str, mmap: bool) -> Res<Connection> {
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

pub fn integrity(c: &Connection) -> Res<String> {
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(e)
}
