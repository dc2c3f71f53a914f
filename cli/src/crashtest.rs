//! `daxshim crashtest`: run a program under the shim, kill it at random
//! moments (some inside a writeback), simulate a power failure by dropping
//! every shadow, and check the files the program left with a command of the
//! user's, run without the shim.

use crate::{fail, find_library};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub const USAGE: &str = "\
usage: daxshim crashtest [--iterations N] [--seed S] [--max-delay MS] [--pmem DIR]...
                         --check CHECKCMD -- CMD [ARGS...]

Runs CMD under the shim N times (default 20). Each iteration kills it with
SIGKILL at a random moment within MS milliseconds (default 1000) -- or, one
iteration in three, makes the shim kill it in the middle of a writeback,
after a random number of cachelines -- then simulates a power failure by
deleting every shadow (all that was volatile), and runs CHECKCMD (a shell
command) without the shim on what is left. CMD continues from that state in
the next iteration.

CHECKCMD sees DAXSHIM_CRASHTEST_OUTPUT (a file with CMD's stdout of that
iteration, e.g. its acknowledged commits), DAXSHIM_CRASHTEST_ITERATION and
DAXSHIM_CRASHTEST_SEED. It must exit 0 when the files are consistent.

Every failed iteration is reported with its seed; `--seed SEED
--iterations 1` replays it. Exit status: 0 all checks passed, 1 a check
failed, 125 daxshim itself failed.";

/// splitmix64: the iteration's random choices come from its seed alone.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Plan {
    delay: Duration,
    crash_after_lines: Option<u64>,
}

fn plan(seed: u64, max_delay_ms: u64) -> Plan {
    let r = mix(seed);
    let inside_writeback = r.is_multiple_of(3);
    Plan {
        delay: Duration::from_millis(mix(r) % max_delay_ms.max(1)),
        crash_after_lines: inside_writeback.then(|| 1 + mix(r ^ 0x5a5a) % 1000),
    }
}

fn parse_num(opt: &str, v: Option<&String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{opt} needs a value"))?;
    let r = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        v.parse()
    };
    r.map_err(|_| format!("{opt} {v}: expected a number"))
}

pub fn crashtest(args: &[String]) -> ExitCode {
    let mut iterations = 20u64;
    let mut seed = None;
    let mut max_delay = 1000u64;
    let mut pmem = Vec::new();
    let mut check = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let r: Result<(), String> = match a {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--" => {
                i += 1;
                break;
            }
            "--iterations" => parse_num(a, args.get(i + 1)).map(|n| iterations = n),
            "--seed" => parse_num(a, args.get(i + 1)).map(|n| seed = Some(n)),
            "--max-delay" => parse_num(a, args.get(i + 1)).map(|n| max_delay = n),
            "--pmem" => match args.get(i + 1).map(std::fs::canonicalize) {
                Some(Ok(p)) if p.is_dir() => {
                    pmem.push(p.to_string_lossy().into_owned());
                    Ok(())
                }
                _ => Err(format!(
                    "--pmem {}: not an existing directory",
                    args.get(i + 1).map(|s| s.as_str()).unwrap_or("")
                )),
            },
            "--check" => match args.get(i + 1) {
                Some(c) => {
                    check = Some(c.clone());
                    Ok(())
                }
                None => Err("--check needs a shell command".into()),
            },
            _ => Err(format!("unknown option {a} (see daxshim crashtest --help)")),
        };
        if let Err(e) = r {
            return fail(&format!("crashtest: {e}"));
        }
        i += 2;
    }
    let cmd: Vec<String> = args[i.min(args.len())..].to_vec();
    let Some(check) = check else {
        return fail("crashtest: --check CHECKCMD is required");
    };
    if cmd.is_empty() {
        return fail("crashtest: no command after --");
    }
    let lib = match find_library() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    // A private shadow directory: dropping it is the power failure.
    let shadow = PathBuf::from(format!("/dev/shm/daxshim-crashtest-{}", std::process::id()));
    let work = std::env::temp_dir().join(format!("daxshim-crashtest-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        return fail(&format!("cannot create {}: {e}", work.display()));
    }
    let tty = std::io::stderr().is_terminal();
    let mut failures = Vec::new();
    for it in 0..iterations {
        let s = seed.wrapping_add(it);
        let p = plan(s, max_delay);
        let out_path = work.join(format!("output-{it}"));
        let out = match std::fs::File::create(&out_path) {
            Ok(f) => f,
            Err(e) => return fail(&format!("{}: {e}", out_path.display())),
        };
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..])
            .env("LD_PRELOAD", &lib)
            .env("DAXSHIM_SHADOW_DIR", &shadow)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null());
        if !pmem.is_empty() {
            c.env("DAXSHIM_PMEM", pmem.join(":"));
        }
        if let Some(n) = p.crash_after_lines {
            c.env("DAXSHIM_DEBUG_CRASH_AFTER_LINES", n.to_string());
        }
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => return fail(&format!("cannot run {}: {e}", cmd[0])),
        };
        let start = Instant::now();
        let limit = if p.crash_after_lines.is_some() {
            Duration::from_millis(max_delay.max(1) * 5)
        } else {
            p.delay
        };
        let mut how = "killed";
        while start.elapsed() < limit {
            if let Ok(Some(st)) = child.try_wait() {
                how = if st.code().is_some() {
                    "exited by itself"
                } else {
                    "died inside a writeback"
                };
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let _ = child.wait();
        let what = match p.crash_after_lines {
            Some(n) => format!("crash after {n} written cachelines: {how}"),
            None => format!("SIGKILL after {} ms: {how}", p.delay.as_millis()),
        };
        // Power failure: everything volatile is gone.
        let _ = std::fs::remove_dir_all(&shadow);
        let st = Command::new("sh")
            .arg("-c")
            .arg(&check)
            .env_remove("LD_PRELOAD")
            .env("DAXSHIM_CRASHTEST_OUTPUT", &out_path)
            .env("DAXSHIM_CRASHTEST_ITERATION", it.to_string())
            .env("DAXSHIM_CRASHTEST_SEED", format!("{s:#x}"))
            .stdin(Stdio::null())
            .output();
        let ok = match &st {
            Ok(o) => o.status.success(),
            Err(_) => false,
        };
        if !ok {
            let detail = match &st {
                Ok(o) => format!(
                    "check exited {:?}: {}",
                    o.status.code(),
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .lines()
                        .chain(String::from_utf8_lossy(&o.stderr).trim().lines())
                        .last()
                        .unwrap_or("")
                ),
                Err(e) => format!("cannot run check: {e}"),
            };
            failures.push(format!("iteration {it} (seed {s:#x}, {what}): {detail}"));
        }
        if tty {
            eprint!(
                "\rdaxshim crashtest: {}/{iterations} iterations, {} failed ",
                it + 1,
                failures.len()
            );
            let _ = std::io::stderr().flush();
        } else {
            println!(
                "iteration {it}: seed {s:#x}, {what}: {}",
                if ok { "ok" } else { "CHECK FAILED" }
            );
        }
        let _ = std::fs::remove_file(&out_path);
    }
    if tty {
        eprintln!();
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&shadow);
    println!(
        "{iterations} iterations, {} failed (seed {seed:#x})",
        failures.len()
    );
    for f in &failures {
        println!("FAILED {f}");
    }
    if !failures.is_empty() {
        println!(
            "replay one with: daxshim crashtest --seed SEED --iterations 1 [same options] -- CMD"
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_depend_on_the_seed_alone() {
        let a = plan(42, 500);
        let b = plan(42, 500);
        assert_eq!(a.delay, b.delay);
        assert_eq!(a.crash_after_lines, b.crash_after_lines);
        assert!(a.delay < Duration::from_millis(500));
        // Over many seeds, about a third crash inside a writeback.
        let inside = (0..300)
            .filter(|s| plan(*s, 100).crash_after_lines.is_some())
            .count();
        assert!((60..140).contains(&inside), "{inside}");
    }
}
