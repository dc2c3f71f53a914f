//! `daxshim stats FILE…`: the JSON written by `DAXSHIM_STATS`, summed over
//! files and rendered for people.

use crate::{fail, human};
use std::collections::BTreeMap;
use std::process::ExitCode;

pub const USAGE: &str = "\
usage: daxshim stats FILE...

Reads stats files written by DAXSHIM_STATS (one per process), adds them up
and prints: mappings shadowed and direct, pages dirtied, cachelines compared
and written, the share of dirty-page writeback the cacheline diff saved,
syncs and their latency percentiles.";

#[derive(Default)]
pub struct Values {
    nums: BTreeMap<String, u64>,
    hist: Vec<u64>,
    texts: BTreeMap<String, String>,
}

impl Values {
    pub fn num(&self, k: &str) -> u64 {
        self.nums.get(k).copied().unwrap_or(0)
    }
}

/// A flat JSON object of numbers and strings plus one array of numbers
/// (what the library writes); anything else is ignored.
pub fn parse(s: &str) -> Values {
    let mut v = Values::default();
    let body = s.trim().trim_start_matches('{').trim_end_matches('}');
    let mut rest = body;
    while let Some(q) = rest.find('"') {
        rest = &rest[q + 1..];
        let Some(e) = rest.find('"') else { break };
        let key = rest[..e].to_string();
        rest = rest[e + 1..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start();
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').unwrap_or(r.len());
            v.hist = r[..end]
                .split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            v.texts.insert(key, r[..end].to_string());
            rest = &r[(end + 1).min(r.len())..];
        } else {
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            if let Ok(n) = rest[..end].trim().parse() {
                v.nums.insert(key, n);
            }
            rest = &rest[end..];
        }
    }
    v
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

pub fn stats(args: &[String]) -> ExitCode {
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return if args.is_empty() {
            ExitCode::from(125)
        } else {
            ExitCode::SUCCESS
        };
    }
    let mut total = Values::default();
    let mut files = 0;
    let mut trackers = Vec::new();
    for f in args {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => return fail(&format!("{f}: {e}")),
        };
        let v = parse(&text);
        if !v.nums.contains_key("syncs") || !v.nums.contains_key("lines_written") {
            return fail(&format!("{f}: not a DAXSHIM_STATS file"));
        }
        for (k, n) in &v.nums {
            if k != "pid" {
                *total.nums.entry(k.clone()).or_default() += n;
            }
        }
        if total.hist.len() < v.hist.len() {
            total.hist.resize(v.hist.len(), 0);
        }
        for (i, c) in v.hist.iter().enumerate() {
            total.hist[i] += c;
        }
        if let Some(t) = v.texts.get("tracker") {
            if !trackers.contains(t) {
                trackers.push(t.clone());
            }
        }
        files += 1;
    }
    let n = |k: &str| total.num(k);
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
        let p = |q| {
            percentile(&total.hist, q)
                .map(dur)
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "sync latency         p50 < {}, p90 < {}, p99 < {}, max < {}",
            p(0.5),
            p(0.9),
            p(0.99),
            p(1.0)
        );
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
        let v = parse("{\"pid\":7,\"tracker\":\"uffd\",\"flush\":\"clwb\",\"syncs\":3,\"lines_written\":10,\"sync_hist_log2_ns\":[0,1,2]}\n");
        assert_eq!(v.num("syncs"), 3);
        assert_eq!(v.num("lines_written"), 10);
        assert_eq!(v.texts["tracker"], "uffd");
        assert_eq!(v.hist, vec![0, 1, 2]);
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
