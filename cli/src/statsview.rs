//! `daxshim stats FILE…`: the JSON written by `DAXSHIM_STATS`, summed over
//! files and rendered for people.

use crate::{fail, human};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// `daxshim stats FILE...`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim stats FILE...",
    before_help = "Reads stats files written by DAXSHIM_STATS (one per process), adds them up
and prints: mappings shadowed and direct, pages dirtied, cachelines compared
and written, the share of dirty-page writeback the cacheline diff saved,
syncs and their latency percentiles, and the sync latency histogram as a
bar chart."
)]
pub struct StatsArgs {
    /// DAXSHIM_STATS files (use %p in DAXSHIM_STATS to get one per process)
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// One DAXSHIM_STATS file: integer counters, the tracker and flush
/// instruction names, and the sync latency histogram.
#[derive(Deserialize, Debug, Default)]
pub struct Values {
    #[serde(default)]
    tracker: Option<String>,
    #[serde(default, rename = "sync_hist_log2_ns")]
    hist: Vec<u64>,
    /// Every other key; the counters are its integers.
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

impl Values {
    pub fn num(&self, k: &str) -> u64 {
        self.rest.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
    }

    fn has(&self, k: &str) -> bool {
        self.rest.get(k).is_some_and(|v| v.is_u64())
    }

    fn counters(&self) -> impl Iterator<Item = (&String, u64)> {
        self.rest.iter().filter_map(|(k, v)| Some((k, v.as_u64()?)))
    }
}

/// Parses what the library writes; `None` for anything that is not a
/// DAXSHIM_STATS object.
pub fn parse(s: &str) -> Option<Values> {
    let v: Values = serde_json::from_str(s).ok()?;
    (v.has("syncs") && v.has("lines_written")).then_some(v)
}

fn dur(ns: u64) -> String {
    match ns {
        n if n < 10_000 => format!("{n} ns"),
        n if n < 10_000_000 => format!("{:.1} µs", n as f64 / 1e3),
        n if n < 10_000_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        n => format!("{:.1} s", n as f64 / 1e9),
    }
}

/// Upper bound of the bucket holding the q-quantile.
fn percentile(hist: &[u64], q: f64) -> Option<u64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (k, c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(1u64 << (k + 1).min(63));
        }
    }
    None
}

/// `█` where the locale says UTF-8, else `#`.
fn bar_glyph() -> char {
    let utf8 = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("utf-8") || v.contains("utf8")
        });
    if utf8 {
        '█'
    } else {
        '#'
    }
}

/// The latency histogram as text, one row per log2 bucket from the first
/// non-empty one to the last: the bucket's range, a bar scaled to the
/// fullest bucket (`width` glyphs), the count.
fn chart(hist: &[u64], width: usize, glyph: char) -> Vec<String> {
    let (Some(first), Some(last)) = (
        hist.iter().position(|&c| c > 0),
        hist.iter().rposition(|&c| c > 0),
    ) else {
        return Vec::new();
    };
    let max = hist[first..=last].iter().copied().max().unwrap_or(1);
    (first..=last)
        .map(|k| {
            let c = hist[k];
            // Every non-empty bucket gets at least one glyph.
            let len = (c as u128 * width as u128).div_ceil(max as u128) as usize;
            let lo = dur(1u64 << k.min(63));
            let hi = dur(1u64 << (k + 1).min(63));
            let bar: String = std::iter::repeat_n(glyph, len).collect();
            format!("{lo:>9} - {hi:>9} |{bar:<width$} {c}")
        })
        .collect()
}

pub fn stats(args: StatsArgs) -> ExitCode {
    let mut nums: BTreeMap<String, u64> = BTreeMap::new();
    let mut hist: Vec<u64> = Vec::new();
    let mut files = 0;
    let mut trackers = Vec::new();
    for f in &args.files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => return fail(&format!("{}: {e}", f.display())),
        };
        let Some(v) = parse(&text) else {
            return fail(&format!("{}: not a DAXSHIM_STATS file", f.display()));
        };
        for (k, n) in v.counters() {
            if k != "pid" {
                *nums.entry(k.clone()).or_default() += n;
            }
        }
        if hist.len() < v.hist.len() {
            hist.resize(v.hist.len(), 0);
        }
        for (i, c) in v.hist.iter().enumerate() {
            hist[i] += c;
        }
        if let Some(t) = v.tracker {
            if !trackers.contains(&t) {
                trackers.push(t);
            }
        }
        files += 1;
    }
    let n = |k: &str| nums.get(k).copied().unwrap_or(0);
    println!(
        "processes            {files} (tracker: {})",
        trackers.join(", ")
    );
    println!(
        "mappings             {} shadowed, {} direct ({} fell back to direct)",
        n("mappings_shadowed"),
        n("mappings_direct"),
        n("fallbacks_direct")
    );
    println!(
        "shadows created      {}, reconciled after a crash: {}",
        n("shadows_created"),
        n("reconciles")
    );
    println!("pages dirtied        {}", n("pages_dirtied"));
    println!("lines compared       {}", n("lines_compared"));
    let written = n("lines_written") * 64;
    if n("pages_dirtied") > 0 {
        let dirty = n("pages_dirtied") * 4096;
        let saved = 100.0 * (1.0 - written as f64 / dirty as f64).max(0.0);
        println!(
            "lines written        {} ({} instead of {} of dirty pages: {saved:.1}% of the writeback saved)",
            n("lines_written"),
            human(written),
            human(dirty)
        );
    } else {
        println!(
            "lines written        {} ({})",
            n("lines_written"),
            human(written)
        );
    }
    println!("bytes flushed        {}", human(n("bytes_flushed")));
    let syncs = n("syncs");
    if let Some(mean) = n("sync_ns").checked_div(syncs) {
        println!(
            "syncs                {syncs}, {} in all, mean {}",
            dur(n("sync_ns")),
            dur(mean)
        );
        let p = |q| percentile(&hist, q).map(dur).unwrap_or_else(|| "-".into());
        println!(
            "sync latency         p50 < {}, p90 < {}, p99 < {}, max < {}",
            p(0.5),
            p(0.9),
            p(0.99),
            p(1.0)
        );
        for row in chart(&hist, 40, bar_glyph()) {
            println!("  {row}");
        }
    } else {
        println!("syncs                0");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_library_format() {
        let v = parse("{\"pid\":7,\"tracker\":\"uffd\",\"flush\":\"clwb\",\"syncs\":3,\"lines_written\":10,\"sync_hist_log2_ns\":[0,1,2]}\n").unwrap();
        assert_eq!(v.num("syncs"), 3);
        assert_eq!(v.num("lines_written"), 10);
        assert_eq!(v.tracker.as_deref(), Some("uffd"));
        assert_eq!(v.hist, vec![0, 1, 2]);
        // Counters are the integers; the names are not.
        let keys: Vec<&String> = v.counters().map(|(k, _)| k).collect();
        assert_eq!(keys, ["lines_written", "pid", "syncs"]);
        assert!(parse("{\"x\":1}").is_none());
        assert!(parse("{\"syncs\":1,\"lines_written\":\"2\"}").is_none());
        assert!(parse("not json").is_none());
    }

    #[test]
    fn chart_has_a_row_per_bucket_scaled_to_the_fullest() {
        let mut h = vec![0u64; 40];
        h[10] = 10;
        h[12] = 1;
        let rows = chart(&h, 20, '#');
        assert_eq!(rows.len(), 3, "{rows:#?}");
        assert!(
            rows[0].starts_with("  1024 ns -   2048 ns |####################"),
            "{}",
            rows[0]
        );
        assert!(rows[0].ends_with(" 10"));
        assert!(rows[1].contains("|                     0"), "{}", rows[1]);
        assert!(rows[2].contains("|##                   1"), "{}", rows[2]);
        assert!(chart(&[0, 0], 20, '#').is_empty());
    }

    #[test]
    fn percentiles_are_bucket_bounds() {
        // 10 syncs in [1024, 2048) ns, 1 in [2^20, 2^21).
        let mut h = vec![0u64; 40];
        h[10] = 10;
        h[20] = 1;
        assert_eq!(percentile(&h, 0.5), Some(2048));
        assert_eq!(percentile(&h, 0.9), Some(2048));
        assert_eq!(percentile(&h, 1.0), Some(1 << 21));
        assert_eq!(percentile(&[0, 0], 0.5), None);
    }
}
