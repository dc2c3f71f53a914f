//! Syscall User Dispatch (`DAXSHIM_SYSCALLS=trap`; issue: "Every writer is
//! coherent", part 1): system calls `LD_PRELOAD` cannot see — raw
//! `syscall()`, libc's internal `write` (`dprintf`, a shell builtin's
//! stdout) — reach the shadow at once, from any thread, a signal handler,
//! a forked child or an exec'd program, and the program's own `SIGSYS`
//! (seccomp) and signal masks keep working. Each probe script runs on an
//! ordinary file without the shim too: the kernel page cache is the
//! reference.

use crate::common::*;
use crate::while_mapped;
use crate::{zeros, PAGE};

fn trapping(tag: &str) -> World {
    World::new(tag).env("DAXSHIM_SYSCALLS", "trap")
}

// Every kind of hidden write is in the mapping before any sync (without
// dispatch they reach it only through the watcher, milliseconds later),
// and the backing ends up as the page cache's file.
#[test]
fn hidden_writes_reach_the_mapping_at_once() {
    let w = trapping("sudwrites");
    let (out, _) = w.probe_both_on_zeros(
        2 * PAGE,
        "open {f} rw
         map 8192
         store 100 mapped
         rawpwrite 300 raw
         load 300 3
         rawpwrite 5000 clean
         load 5000 5
         seek 600
         rawwrite written
         load 600 7
         rawpwritev 700 ve ctor
         load 700 6
         dprintf printed
         load 607 7
         threadpwrite 800 thread
         load 800 6
         sigwrite 900 handler
         load 900 7
         msync sync
         load 100 6",
    );
    for want in [
        "raw", "clean", "written", "vector", "printed", "thread", "handler", "mapped",
    ] {
        assert!(out.contains(&format!("load: {want}")), "{want}: {out}");
    }
    // Not one byte went around the shim (the watcher would have found it).
    assert_eq!(w.stat_sum("foreign_writes"), 0);
}

// A child forked after the program blocked every signal still traps (the
// kernel turns dispatch off in a child; SIGSYS must stay deliverable).
#[test]
fn a_forked_child_with_every_signal_blocked_still_traps() {
    let w = trapping("sudfork");
    let (out, _) = w.probe_both_on_zeros(
        2 * PAGE,
        "open {f} rw
         map 8192
         store 100 parent
         maskall
         fork
         rawpwrite 300 both
         load 300 4
         msync sync",
    );
    assert!(
        out.contains("maskall: ok") && out.contains("child: 0"),
        "{out}"
    );
    assert!(out.contains("load: both"), "{out}");
}

// A program's own seccomp filter with SECCOMP_RET_TRAP: its SIGSYS handler
// answers the trapped call, as without the shim; raw writes still go
// through the shim.
#[test]
fn a_programs_own_seccomp_trap_still_reaches_its_handler() {
    let w = trapping("sudseccomp");
    let (out, _) = w.probe_both_on_zeros(
        PAGE,
        "open {f} rw
         map 4096
         store 100 x
         seccomp
         rawpwrite 300 after
         load 300 5
         msync sync",
    );
    assert!(out.contains("seccomp: getppid=4242"), "{out}");
    assert!(out.contains("load: after"), "{out}");
}

// bash's builtins write through glibc's own stdout on a descriptor bash
// redirected itself (no stream the shim made): with dispatch the bytes go
// into the shadow, so the process that has the file mapped never finds a
// change made around the shim (`foreign_writes` stays 0), and its sync
// keeps them. Bash also forks and execs the probe, which starts trapped
// afresh.
#[test]
fn bash_builtins_and_exec_under_dispatch() {
    let w = trapping("sudbash");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let o = while_mapped(&w, &f, "store 100 AAAA", "load 0 5\nmsync sync", |done| {
        let mut c = w.shim_cmd("bash");
        c.arg("-c").arg(format!(
            "printf BUILT 1<>{f} && {probe} open {f} rw , rawpwrite 200 child && touch {done}",
            f = s(&f),
            probe = s(&probe()),
            done = s(done)
        ));
        ok(run(c));
    });
    let out = stdout(&o);
    assert!(out.contains("load: BUILT"), "{out}");
    let b = backing(&f);
    assert_eq!(&b[0..5], b"BUILT");
    assert!(contains(&b, "AAAA") && contains(&b, "child"));
    assert_eq!(w.stat_sum("foreign_writes"), 0);
}
