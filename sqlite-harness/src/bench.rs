//! `bench`: runs `bench-run` with and without the shim and prints the table.

use crate::{e, Args, Res};

/// Runs bench-run three ways per size in one run and prints the table.
pub fn bench(a: &Args) -> Res<()> {
    let sizes: Vec<u64> =
        a.0.get("rows")
            .map(|s| s.as_str())
            .unwrap_or("5000,20000,50000")
            .split(',')
            .map(|s| s.parse().map_err(|_| format!("--rows {s}")))
            .collect::<Res<_>>()?;
    let exe = std::env::current_exe().map_err(e)?;
    let lib = match a.0.get("lib") {
        Some(l) => std::path::PathBuf::from(l),
        None => exe.parent().unwrap().join("libdaxshim.so"),
    };
    if !lib.is_file() {
        return Err(format!(
            "{} not found (build with cargo build --release --workspace, or pass --lib)",
            lib.display()
        ));
    }
    let base = std::path::PathBuf::from(a.0.get("dir").map(|s| s.as_str()).unwrap_or("/tmp"))
        .join(format!("daxshim-bench-{}", std::process::id()));
    let repeats = a.num("repeat", 5)?;
    println!(
        "# SQLite speedtest1-like benchmark, journal_mode=delete, synchronous=FULL, mmap_size=1GiB"
    );
    println!(
        "# page cache: ordinary file on {}; shim: same file system as emulated pmem",
        base.parent().unwrap().display()
    );
    println!("# median of {repeats} runs per configuration; ratio = shim / page cache");
    // (name, column, tracker, DAXSHIM_SYSCALLS); the first is the page
    // cache (no shim), the reference of every ratio.
    let configs = [
        ("page-cache", "page-cache", None, None),
        ("shim-uffd", "shim", Some("auto"), None),
        ("shim-trap", "shim-trap", Some("auto"), Some("trap")),
        ("shim-compare", "shim-cmp", Some("compare"), None),
    ];
    let mut overall = [0f64; 4];
    for rows in sizes {
        // Configurations interleaved within each repeat, so that drift of
        // the machine affects all three alike.
        let mut runs: Vec<Vec<Vec<(String, f64)>>> = vec![Vec::new(); configs.len()];
        for r in 0..repeats {
            for (ci, (name, _, tracker, syscalls)) in configs.iter().enumerate() {
                let dir = base.join(format!("{name}-{rows}-{r}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).map_err(e)?;
                let shadow = format!("/dev/shm/daxshim-bench-{}-{ci}", std::process::id());
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("bench-run")
                    .arg("--db")
                    .arg(dir.join("db"))
                    .arg("--rows")
                    .arg(rows.to_string());
                cmd.env_remove("DAXSHIM_SYSCALLS");
                if let Some(t) = tracker {
                    cmd.env("LD_PRELOAD", &lib)
                        .env("DAXSHIM_PMEM", &dir)
                        .env("DAXSHIM_SHADOW_DIR", &shadow)
                        .env("DAXSHIM_TRACKER", t);
                }
                if let Some(v) = syscalls {
                    cmd.env("DAXSHIM_SYSCALLS", v);
                }
                let out = cmd.output().map_err(e)?;
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all(&shadow);
                if !out.status.success() {
                    return Err(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
                }
                runs[ci].push(
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        .map(|(n, s)| (n.to_string(), s.parse().unwrap_or(0.0)))
                        .collect(),
                );
            }
        }
        // Median per phase.
        let results: Vec<Vec<(String, f64)>> = runs
            .iter()
            .map(|runs| {
                (0..runs[0].len())
                    .map(|p| {
                        let mut v: Vec<f64> = runs.iter().map(|r| r[p].1).collect();
                        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                        (runs[0][p].0.clone(), v[v.len() / 2])
                    })
                    .collect()
            })
            .collect();
        println!("\n## {rows} rows");
        let row = |label: &str, v: &[f64]| {
            print!("{label:<26}");
            for x in v {
                print!(" {x:>12.4}");
            }
            for x in &v[1..] {
                print!(" {:>12.3}", x / v[0]);
            }
            println!();
        };
        print!("{:<26}", "phase");
        for (_, col, _, _) in &configs {
            print!(" {:>12}", format!("{col} s"));
        }
        for (_, col, _, _) in &configs[1..] {
            print!(" {:>12}", format!("ratio-{col}"));
        }
        println!();
        let mut tot = [0f64; 4];
        for (p, (phase, _)) in results[0].iter().enumerate() {
            let v: Vec<f64> = results.iter().map(|r| r[p].1).collect();
            for c in 0..configs.len() {
                tot[c] += v[c];
                overall[c] += v[c];
            }
            row(phase, &v);
        }
        row("total", &tot);
    }
    let _ = std::fs::remove_dir_all(&base);
    println!(
        "\noverall: page cache {:.3} s, shim {:.3} s (ratio {:.3}), shim with DAXSHIM_SYSCALLS=trap {:.3} s (ratio {:.3}), shim with full compare {:.3} s (ratio {:.3})",
        overall[0],
        overall[1],
        overall[1] / overall[0],
        overall[2],
        overall[2] / overall[0],
        overall[3],
        overall[3] / overall[0]
    );
    Ok(())
}
