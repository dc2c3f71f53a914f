//! The scale tables as one picture: a panel per cost, the file size
//! across (log scale), one line per configuration, so that a cost that
//! grows with the file shows as a slope.

use crate::die;
use crate::table::Point;
use plotters::prelude::*;
use std::path::Path;

/// Key, panel title, y axis.
const PANELS: &[(&str, &str, &str)] = &[
    (
        "read-ns",
        "random read: first touch of a page",
        "ns per page",
    ),
    (
        "store-ns",
        "random store: first touch of a page",
        "ns per page",
    ),
    ("seq-ns", "sequential read of every page", "ns per page"),
    (
        "sync-us",
        "msync(MS_SYNC), all touched, 1 page dirty",
        "µs per sync",
    ),
];

fn color(series: &str) -> RGBColor {
    match series {
        "page-cache" => RGBColor(31, 119, 180),
        "page-cache pread" => RGBColor(44, 160, 44),
        "before" => RGBColor(255, 127, 14),
        _ => RGBColor(214, 39, 40),
    }
}

/// 1, 2, 5 × 10^k within lo..hi (only the powers of 10 across more than
/// four decades): few enough labels to read.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let steps: &[f64] = if hi / lo > 1e4 {
        &[1.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    let mut v = Vec::new();
    let mut d = 10f64.powf(lo.log10().floor());
    while d <= hi {
        v.extend(
            steps
                .iter()
                .map(|m| m * d)
                .filter(|t| (lo..=hi).contains(t)),
        );
        d *= 10.0;
    }
    v
}

/// Writes the picture of `pts` (configurations `cfgs`) to `path`.
pub fn write(path: &Path, pts: &[Point], cfgs: &[&str]) {
    if let Err(e) = draw(path, pts, cfgs) {
        die(&format!("{}: {e}", path.display()));
    }
}

fn draw(path: &Path, pts: &[Point], cfgs: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "daxshim: cost against file size (median of 3 runs; lower is better)",
        ("sans-serif", 24),
    )?;
    for (area, &(key, title, unit)) in root.split_evenly((2, 2)).iter().zip(PANELS) {
        let line = |k: &str, cfg: &str| -> Vec<(f64, f64)> {
            pts.iter()
                .filter(|p| p.key == k && p.cfg == cfg && p.v.is_finite() && p.v > 0.0)
                .map(|p| (p.gib as f64, p.v))
                .collect()
        };
        let mut series: Vec<(String, Vec<(f64, f64)>)> =
            cfgs.iter().map(|c| (c.to_string(), line(key, c))).collect();
        if key == "seq-ns" {
            series.push(("page-cache pread".into(), line("pread-ns", "page-cache")));
        }
        let ys = series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
        let lo = ys.clone().fold(f64::INFINITY, f64::min);
        let hi = ys.fold(0.0, f64::max);
        // A decade of room above the data for the legend.
        let (lo, hi) = if lo.is_finite() {
            (lo / 1.5, hi * 10.0)
        } else {
            (1.0, 10.0)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(
                (0.7f64..23.0)
                    .log_scale()
                    .with_key_points(vec![1.0, 4.0, 16.0]),
                (lo..hi).log_scale().with_key_points(ticks(lo, hi)),
            )?;
        chart
            .configure_mesh()
            .x_desc("file size (GiB; the 16 GiB file is sparse)")
            .y_desc(unit)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()?;
        for (name, data) in series {
            if data.is_empty() {
                continue;
            }
            let c = color(&name);
            let style = c.stroke_width(2);
            if name == "page-cache pread" {
                chart.draw_series(DashedLineSeries::new(data.clone(), 8, 5, style))?
            } else {
                chart.draw_series(LineSeries::new(data.clone(), style))?
            }
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            chart.draw_series(data.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
