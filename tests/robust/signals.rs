//! The program's own signal handlers get their faults, and hooked calls
//! made from inside a handler neither deadlock nor lose data.

use crate::common::*;
use crate::hostile;

// The program's own SIGBUS/SIGSEGV handlers (sigaction with SA_SIGINFO and
// SA_ONSTACK or SA_RESETHAND, or signal()) get the fault, with the right
// address, exactly as without the shim.
#[test]
fn programs_own_fault_handlers_see_the_right_siginfo() {
    let w = World::new("signals");
    let pf = w.pmem_file("f", &[0u8; 4096]);
    let of = w.plain_file("f", &[0u8; 4096]);
    for mode in ["sigbus", "sigsegv"] {
        for how in ["sigaction", "resethand", "signal"] {
            let shim = ok(hostile(&w, true, &[mode, s(&pf), how]));
            let plain = ok(hostile(&w, false, &[mode, s(&of), how]));
            assert_eq!(shim, plain, "{mode} {how}");
            assert!(shim.starts_with("ok"), "{shim}");
        }
    }
    assert!(w.stat_sum("mappings_shadowed") >= 2);
}

// pwrite() from a signal handler while the interrupted code stores, syncs
// and reads: no deadlock, and the handler's writes are all there.
#[test]
fn hooked_calls_from_signal_handlers_do_not_deadlock() {
    let w = World::new("sigwrite");
    let f = w.pmem_file("f", &[0u8; 16384]);
    let out = ok(hostile(&w, true, &["sigwrite", s(&f), "3000"]));
    let n: usize = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(n >= 64, "too few handler writes: {out}");
    let b = backing(&f);
    // Slot w % 64 holds the handler's last write w to it.
    for w in n - 64..n {
        let at = 3072 + 16 * (w % 64);
        let want = format!("H{w:07}");
        assert_eq!(
            &b[at..at + 8],
            want.as_bytes(),
            "the handler's write {w} is missing: {out}"
        );
    }
    w.assert_shadowed();
}
