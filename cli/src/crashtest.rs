//! `daxshim crashtest`: run a program under the shim, kill it at random
//! moments (some inside a writeback), simulate a power failure by dropping
//! every shadow, and check the files the program left with a command of the
//! user's, run without the shim.

use crate::progress::Progress;
use crate::{fail, library};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// `daxshim crashtest`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim crashtest [--iterations N] [--seed S] [--max-delay MS] [--pmem DIR]...
                         --check CHECKCMD -- CMD [ARGS...]",
    before_help = "Runs CMD under the shim N times. Each iteration kills it with SIGKILL at a
random moment within MS milliseconds -- or, one iteration in three, makes the
shim kill it in the middle of a writeback, after a random number of
cachelines -- then simulates a power failure by deleting every shadow (all
that was volatile), and runs CHECKCMD (a shell command) without the shim on
what is left. CMD continues from that state in the next iteration.

CHECKCMD sees DAXSHIM_CRASHTEST_OUTPUT (a file with CMD's stdout of that
iteration, e.g. its acknowledged commits), DAXSHIM_CRASHTEST_ITERATION and
DAXSHIM_CRASHTEST_SEED. It must exit 0 when the files are consistent.

On a terminal, progress is a bar on stderr; otherwise one line per iteration
on stdout. Every failed iteration is reported with its seed; `--seed SEED
--iterations 1` replays it.",
    after_help = "Exit status: 0 all checks passed, 1 a check failed, 125 daxshim itself failed."
)]
pub struct CrashtestArgs {
    /// Iterations to run
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = parse_num)]
    iterations: u64,
    /// Seed of the first iteration (decimal or 0x hex; default: the clock)
    #[arg(long, value_name = "S", value_parser = parse_num)]
    seed: Option<u64>,
    /// Upper bound of the random delay before SIGKILL, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = parse_num)]
    max_delay: u64,
    /// Treat regular files under DIR as (emulated) pmem; repeatable
    #[arg(long, value_name = "DIR", value_parser = crate::existing_dir)]
    pmem: Vec<String>,
    /// Shell command that checks the files after each crash (exit 0: consistent)
    #[arg(long, value_name = "CHECKCMD", required = true)]
    check: String,
    /// The command to crash, with its arguments
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

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

/// How long a writeback-crash iteration waits at least for the shim to kill
/// the command.
const CRASH_WAIT_MIN: Duration = Duration::from_secs(10);

fn plan(seed: u64, max_delay_ms: u64) -> Plan {
    let r = mix(seed);
    let inside_writeback = r.is_multiple_of(3);
    Plan {
        delay: Duration::from_millis(mix(r) % max_delay_ms.max(1)),
        crash_after_lines: inside_writeback.then(|| 1 + mix(r ^ 0x5a5a) % 1000),
    }
}

fn parse_num(v: &str) -> Result<u64, String> {
    let r = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        v.parse()
    };
    r.map_err(|_| "expected a number (decimal or 0x hex)".to_string())
}

pub fn crashtest(args: CrashtestArgs) -> ExitCode {
    let CrashtestArgs {
        iterations,
        seed,
        max_delay,
        pmem,
        check,
        cmd,
    } = args;
    let lib = match library::find() {
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
    let progress = Progress::new(iterations, "crashtest", "iterations", Duration::ZERO);
    let mut failures = Vec::new();
    for it in 0..iterations {
        let s = seed.wrapping_add(it);
        let p = plan(s, max_delay);
        let out_path = work.join(format!("output-{it}"));
        let out = match std::fs::File::create(&out_path) {
            Ok(f) => f,
            Err(e) => {
                progress.finish();
                return fail(&format!("{}: {e}", out_path.display()));
            }
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
            Err(e) => {
                progress.finish();
                return fail(&format!("cannot run {}: {e}", cmd[0].to_string_lossy()));
            }
        };
        let start = Instant::now();
        let limit = if p.crash_after_lines.is_some() {
            // The shim kills the command itself once it has written that
            // many cachelines back; a slow machine (an emulated DAX guest
            // takes ~0.3 s to SQLite's first commit) must not turn that
            // into an ordinary kill. The cap is for commands that stop
            // writing.
            Duration::from_millis(max_delay.max(1) * 5).max(CRASH_WAIT_MIN)
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
        progress.set_message(format!("iterations, {} failed", failures.len()));
        progress.inc();
        if !progress.drawn() {
            println!(
                "iteration {it}: seed {s:#x}, {what}: {}",
                if ok { "ok" } else { "CHECK FAILED" }
            );
        }
        let _ = std::fs::remove_file(&out_path);
    }
    progress.finish();
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
