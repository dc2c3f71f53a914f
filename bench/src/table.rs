//! Running a case under each configuration, and its table.

use crate::die;
use std::path::Path;
use std::process::Command;

fn run_case(case: &str, dir: &Path, lib: &Path, cfg: &str, quick: bool) -> Vec<(String, f64)> {
    let exe = std::env::current_exe().unwrap();
    let sub = dir.join(format!("{case}-{cfg}"));
    let _ = std::fs::remove_dir_all(&sub);
    std::fs::create_dir_all(&sub).unwrap();
    let shadow = format!("/dev/shm/daxshim-bench-{}", std::process::id());
    let mut c = Command::new(exe);
    c.args(["one", case]).arg(&sub);
    if quick {
        c.arg("--quick");
    }
    if cfg != "page-cache" {
        c.env("LD_PRELOAD", lib)
            .env("DAXSHIM_PMEM", &sub)
            .env("DAXSHIM_SHADOW_DIR", &shadow)
            .env(
                "DAXSHIM_TRACKER",
                if cfg == "shim-compare" {
                    "compare"
                } else {
                    "auto"
                },
            );
        match cfg {
            // The userfaultfd tracker with the whole file copied at the
            // first mapping, as before lazy shadows.
            "shim-eager" => {
                c.env("DAXSHIM_LAZY", "off");
            }
            "shim-64M" => {
                c.env("DAXSHIM_CACHE_MAX", "64M");
            }
            // Emulated pmem written back as real pmem is: stores (non-
            // temporal for long runs) and cache flushes through a mapping.
            "shim-stores" => {
                c.env("DAXSHIM_WRITEBACK", "stores");
            }
            "shim-mprotect" => {
                c.env("DAXSHIM_TRACKER", "mprotect");
            }
            // Syscall User Dispatch on: every system call not made through
            // a hook traps.
            "shim-trap" => {
                c.env("DAXSHIM_SYSCALLS", "trap");
            }
            _ => {}
        }
    }
    let out = c.output().unwrap_or_else(|e| die(&e.to_string()));
    let _ = std::fs::remove_dir_all(&sub);
    let _ = std::fs::remove_dir_all(&shadow);
    if !out.status.success() {
        die(&format!(
            "{case} {cfg}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN)))
        .collect()
}

pub const CFGS: &[&str] = &[
    "page-cache",
    "shim-uffd",
    "shim-eager",
    "shim-mprotect",
    "shim-compare",
];

pub fn table(
    title: &str,
    unit: &str,
    case: &str,
    (dir, lib, quick): (&Path, &Path, bool),
    cfgs: &[&str],
) -> Vec<Vec<(String, f64)>> {
    let res: Vec<_> = cfgs
        .iter()
        .map(|c| run_case(case, dir, lib, c, quick))
        .collect();
    println!("\n## {title} ({unit})");
    print!("{:<22}", "");
    for c in cfgs {
        print!(" {c:>13}");
    }
    println!();
    for (i, (k, _)) in res[0].iter().enumerate() {
        print!("{k:<22}");
        for r in &res {
            print!(" {:>13.2}", r.get(i).map_or(f64::NAN, |x| x.1));
        }
        println!();
    }
    res
}
