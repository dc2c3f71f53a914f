//! `daxshim stats`: counters, percentiles and the latency chart.

use crate::common::*;
use crate::{daxshim, install};

#[test]
fn stats_renders_counters_and_latency_percentiles() {
    let w = World::new("clistats");
    let exe = install(&w);
    let f = w.pmem_file("f", &[0u8; 65536]);
    ok(w.probe(&[
        "open",
        s(&f),
        "rw",
        ",",
        "map",
        "65536",
        ",",
        "store",
        "100",
        "a",
        ",",
        "msync",
        ",",
        "store",
        "9000",
        "b",
        ",",
        "msync",
        ",",
        "exit",
    ]));
    let files: Vec<String> = std::fs::read_dir(&w.root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stats-"))
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    let mut args = vec!["stats"];
    args.extend(files.iter().map(|x| x.as_str()));
    let out = ok(daxshim(&w, &exe, &args));
    assert!(out.contains("1 shadowed"), "{out}");
    assert!(out.contains("lines written        2 "), "{out}");
    assert!(
        out.contains("writeback saved") && out.contains("p50 <") && out.contains("p99 <"),
        "{out}"
    );
    // The histogram as a bar chart: a row per bucket from the fastest sync
    // to the slowest; the fullest bucket's bar is 40 glyphs long.
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" |")).collect();
    assert!(!rows.is_empty(), "no chart: {out}");
    let bar = |r: &str| r.chars().filter(|c| *c == '#' || *c == '█').count();
    assert_eq!(rows.iter().map(|r| bar(r)).max(), Some(40), "{out}");
    assert!(
        rows.first().is_some_and(|r| bar(r) > 0) && rows.last().is_some_and(|r| bar(r) > 0),
        "{out}"
    );
    let counts: u64 = rows
        .iter()
        .map(|r| r.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let syncs: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("syncs "))
        .and_then(|l| l.trim().split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no syncs line: {out}"));
    assert!(syncs >= 2, "{out}");
    assert_eq!(counts, syncs, "every sync in the chart: {out}");
    let bogus = w.root.join("bogus.json");
    std::fs::write(&bogus, "{\"x\":1}").unwrap();
    assert_eq!(
        daxshim(&w, &exe, &["stats", s(&bogus)]).status.code(),
        Some(125)
    );
}
