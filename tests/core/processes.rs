//! The writer goes away — `munmap` + `_exit`, exit without `munmap`,
//! `SIGKILL`, `exec` — and nothing is lost: the next process sees its
//! stores and its sync makes them durable. `fork`, threads, and descriptors
//! inherited from a parent without the shim.

use crate::common::*;
use crate::{zeros, PAGE};

#[test]
fn stores_survive_munmap_and_underscore_exit() {
    let w = World::new("munmap");
    let f = w.pmem_file("f", &zeros(PAGE));
    ok(w.probe(&format!(
        "open {f} rw
         map 4096
         store 7 unmapped
         munmap
         _exit",
        f = s(&f)
    )));
    let out = killed(w.probe(&format!(
        "open {f} rw
         map 4096
         load 7 8
         fsync
         kill",
        f = s(&f)
    )));
    assert!(out.contains("load: unmapped"), "{out}");
    let o = w.probe(&format!("open {f} ro , pread 7 8", f = s(&f)));
    assert!(ok(o).contains("pread: unmapped"));
    w.drop_shadows();
    assert!(contains(&backing(&f), "unmapped"));
}

#[test]
fn exit_without_munmap_writes_back() {
    let w = World::new("exit");
    let f = w.pmem_file("f", &zeros(PAGE));
    ok(w.probe(&format!(
        "open {f} rw
         map 4096
         store 7 atexit
         exit",
        f = s(&f)
    )));
    w.drop_shadows();
    assert!(contains(&backing(&f), "atexit"));
    assert!(w.shadow_files().is_empty());
}

#[test]
fn sigkilled_writer_is_seen_by_the_next_process_and_made_durable() {
    let w = World::new("sigkill");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         store 7 killed
         kill",
        f = s(&f)
    )));
    assert!(!contains(&backing(&f), "killed"));
    assert!(
        !w.shadow_files().is_empty(),
        "the shadow must outlive its writer"
    );
    let out = killed(w.probe(&format!(
        "open {f} rw
         map 4096
         load 7 6
         fsync
         kill",
        f = s(&f)
    )));
    assert!(out.contains("load: killed"));
    w.drop_shadows();
    assert!(contains(&backing(&f), "killed"));
}

// Compared with the kernel page cache: after the writer goes away (munmap +
// _exit, exit, SIGKILL, close + _exit), the next process sees its stores.
#[test]
fn lifecycle_observations_match_the_page_cache() {
    for ending in ["munmap , _exit", "exit", "kill", "close , _exit"] {
        let w = World::new("lifecycle");
        let pf = w.pmem_file("f", &zeros(PAGE));
        let of = w.plain_file("f", &zeros(PAGE));
        let mut outs = Vec::new();
        for (f, shim) in [(&pf, true), (&of, false)] {
            let writer = format!(
                "open {f} rw
                 map 4096
                 store 11 lifecycle
                 {ending}",
                f = s(f)
            );
            let reader = format!(
                "open {f} ro
                 map 4096 ro
                 load 11 9
                 pread 11 9",
                f = s(f)
            );
            let (wo, ro) = if shim {
                (w.probe(&writer), w.probe(&reader))
            } else {
                (w.probe_plain(&writer), w.probe_plain(&reader))
            };
            outs.push((wo.status.code(), ok(ro)));
        }
        assert_eq!(outs[0], outs[1], "{ending:?}");
        assert!(outs[0].1.contains("load: lifecycle") && outs[0].1.contains("pread: lifecycle"));
    }
}

// exec leaves the stores in the shared shadow; the next process sees them
// and its sync makes them durable.
#[test]
fn exec_leaves_stores_for_the_next_process() {
    let w = World::new("exec");
    let f = w.pmem_file("f", &zeros(PAGE));
    let script = format!(
        r#"
import mmap, os
fd = os.open({f:?}, os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[20:24] = b"exec"
os.execv("/bin/true", ["true"])
"#,
        f = s(&f)
    );
    let mut c = w.shim_cmd(python());
    c.args(["-c", &script]);
    ok(run(c));
    let out = killed(w.probe(&format!(
        "open {f} rw
         map 4096
         load 20 4
         fsync
         kill",
        f = s(&f)
    )));
    assert!(out.contains("load: exec"), "{out}");
    w.drop_shadows();
    assert!(contains(&backing(&f), "exec"));
}

// fork: the child's mappings stay coherent with the parent's; its syncs work.
#[test]
fn forked_child_stays_coherent_and_syncs() {
    let w = World::new("fork");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    // After `fork`, the rest runs in the child; the parent waits, then
    // continues with nothing left (prints child's status).
    let out = ok(w.probe(&format!(
        "open {f} rw
         map 8192
         store 0 parent
         fork
         load 0 6
         store 5000 child
         msync
         _exit",
        f = s(&f)
    )));
    assert!(out.contains("load: parent"), "{out}");
    assert!(out.contains("child: 0"), "{out}");
    assert!(
        contains(&backing(&f), "child"),
        "the child's msync did not write back"
    );
    assert!(
        contains(&backing(&f), "parent"),
        "the parent's exit did not write back"
    );
}

// Threads: stores to shared and private pages, concurrent syncs, and other
// threads mapping and unmapping the same file; nothing is lost.
#[test]
fn threads_store_sync_map_and_unmap_concurrently() {
    // Seeded; DAXSHIM_STRESS_ROUNDS=N for a long run.
    let rounds: usize = std::env::var("DAXSHIM_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for seed in ["1", "7"] {
        let threads = 8usize;
        let w = World::new("threads");
        let f = w.pmem_file("f", &zeros(PAGE));
        let mut c = w.shim_cmd(c_example("threads"));
        c.arg(&f)
            .arg(threads.to_string())
            .arg(rounds.to_string())
            .arg(seed);
        assert!(ok(run(c)).contains("done"), "seed {seed}");
        assert!(!w.shadow_files().is_empty(), "the mapping was not shadowed");
        w.drop_shadows(); // only what the syncs persisted counts
        let b = backing(&f);
        for t in 0..threads {
            let slot = u64::from_ne_bytes(b[t * 8..t * 8 + 8].try_into().unwrap());
            assert_eq!(slot, rounds as u64, "thread {t}'s counter");
            let page = &b[PAGE * (t + 1)..PAGE * (t + 2)];
            let want = format!("{t}:{rounds}\0");
            for l in 0..64 {
                assert!(
                    page[l * 64..].starts_with(want.as_bytes()),
                    "thread {t} line {l}"
                );
            }
        }
    }
}

// Descriptors inherited from the parent are adopted at start-up.
#[test]
fn inherited_descriptors_are_shadowed() {
    let w = World::new("inherit");
    let f = w.pmem_file("f", &zeros(PAGE));
    let script = format!(
        r#"
import os, sys
fd = os.open({f:?}, os.O_RDWR)
os.set_inheritable(fd, True)
os.execv({probe:?}, ["probe", "usefd", str(fd), ",", "map", "4096", ",", "store", "0", "inherited", ",", "msync", ",", "kill"])
"#,
        f = s(&f),
        probe = s(&probe())
    );
    // Only the exec'd probe runs under the shim: python opens the file
    // without it, then puts the library in the environment of the exec.
    let script = script.replace(
        "os.execv(",
        "os.environ['LD_PRELOAD'] = os.environ['X_PRELOAD']; os.execve(",
    );
    let script = script.replace("\"kill\"])", "\"kill\"], os.environ)");
    let mut c = w.cmd(python());
    c.args(["-c", &script])
        .env("DAXSHIM_PMEM", &w.pmem)
        .env("DAXSHIM_SHADOW_DIR", &w.shadow)
        .env("X_PRELOAD", lib());
    killed(run(c));
    assert!(
        !w.shadow_files().is_empty(),
        "the inherited descriptor was not shadowed"
    );
    w.drop_shadows();
    assert!(contains(&backing(&f), "inherited"));
}
