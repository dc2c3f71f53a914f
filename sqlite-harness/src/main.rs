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
//!   sqlharness damage   --db P     (stdio damage of a mapped database)

mod bench;
mod crash;
mod damage;
mod data;
mod db;
mod speedtest;
mod workload;

use std::collections::HashMap;

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

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = Args::parse(argv.get(1..).unwrap_or(&[]));
    let r = match argv.first().map(|s| s.as_str()) {
        Some("workload") => workload::workload(&a),
        Some("writer") => crash::writer(&a),
        Some("check") => crash::check(&a),
        Some("digest") => workload::digest(&a),
        Some("reader") => crash::reader(&a),
        Some("bench-run") => speedtest::bench_run(&a),
        Some("bench") => bench::bench(&a),
        Some("damage") => damage::damage(&a),
        _ => Err(
            "usage: sqlharness workload|writer|check|reader|bench-run|bench|damage (see source)"
                .into(),
        ),
    };
    if let Err(m) = r {
        eprintln!("sqlharness: {m}");
        std::process::exit(1);
    }
}
