//! Every sync call persists, durably (it survives kill + dropping the
//! shadows, a power failure); nothing else does. The writeback copies only
//! the cachelines that changed; a failed writeback keeps the dirty state.

use crate::common::*;
use crate::{zeros, PAGE};

#[test]
fn every_sync_call_persists() {
    let syncs = [
        "msync",
        "msync sync 4096 4096",
        "msync async",
        "fsync",
        "fdatasync",
        "sfr 0 0 wait",
        "syncfs",
        "sync",
    ];
    for sync in syncs {
        let w = World::new("sync");
        let f = w.pmem_file("f", &zeros(2 * PAGE));
        killed(w.probe(&format!(
            "open {f} rw
             map 8192
             store 5000 durable
             {sync}
             kill",
            f = s(&f)
        )));
        w.drop_shadows();
        assert!(
            contains(&backing(&f), "durable"),
            "{sync:?} did not persist"
        );
    }
}

// The negative control: without a sync, a power failure loses the store.
#[test]
fn without_sync_power_failure_loses_the_store() {
    let w = World::new("nosync");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         store 10 volatile
         kill",
        f = s(&f)
    )));
    w.drop_shadows();
    assert!(!contains(&backing(&f), "volatile"));
}

// A range-scoped msync writes back only its range.
#[test]
fn msync_is_range_scoped() {
    let w = World::new("range");
    let f = w.pmem_file("f", &zeros(3 * PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 12288
         store 10 first
         store 8200 third
         msync sync 8192 4096
         kill",
        f = s(&f)
    )));
    w.drop_shadows();
    let b = backing(&f);
    assert!(contains(&b, "third"));
    assert!(!contains(&b, "first"), "msync of page 2 wrote page 0 too");
}

// A failed writeback returns EIO and keeps the dirty state: the retry
// writes the data.
#[test]
fn failed_sync_returns_eio_and_retry_persists() {
    for sync in ["try_msync 0 4096 4", "try_fsync self"] {
        let w = World::new("eio").env("DAXSHIM_DEBUG_FAIL_SYNCS", "1");
        let f = w.pmem_file("f", &zeros(PAGE));
        let out = killed(w.probe(&format!(
            "open {f} rw
             map 4096
             store 5 retried
             {sync}
             {sync}
             kill",
            f = s(&f)
        )));
        assert_eq!(out, "ret=-1 errno=5\nret=0 errno=0\n", "{sync:?}");
        w.drop_shadows();
        assert!(contains(&backing(&f), "retried"), "{sync:?}");
    }
}

// The flush engine writes only the lines that changed.
#[test]
fn sync_writes_only_changed_cachelines() {
    // Both writebacks of emulated pmem: pwrite of the changed spans (the
    // default), and stores + cache flushes through the mapping (real pmem's).
    for mode in ["auto", "stores"] {
        sync_writes_only_changed_cachelines_with(mode);
    }
}

fn sync_writes_only_changed_cachelines_with(mode: &str) {
    let w = World::new("lines").env("DAXSHIM_WRITEBACK", mode);
    let f = w.pmem_file("f", &zeros(256 * PAGE));
    ok(w.probe(&format!(
        "open {f} rw
         map 1048576
         store 70000 x
         store 70070 y
         store 900000 z
         msync
         close
         munmap",
        f = s(&f)
    )));
    assert_eq!(w.stat_sum("lines_written"), 3);
    // Real pmem is always written back by stores and flushes.
    let flushed = if mode == "stores" || real_dax_dir().is_some() {
        3 * 64
    } else {
        0
    };
    assert_eq!(w.stat_sum("bytes_flushed"), flushed, "{mode}");
    assert_eq!(backing(&f)[70000], b'x');
    assert_eq!(backing(&f)[900000], b'z');
    if w.tracker() == "uffd" || w.tracker() == "mprotect" {
        // Exact tracking: two dirty pages, 64 lines each, were compared.
        assert_eq!(w.stat_sum("pages_dirtied"), 2);
        let compared = w.stat_sum("lines_compared");
        assert!(compared <= 128, "compared {compared}");
    } else {
        // No tracker (kernel without userfaultfd WP async): every line of
        // the file is compared.
        assert!(w.stat_sum("lines_compared") >= 16384);
    }
}

#[test]
fn compare_tracker_is_a_correct_oracle() {
    let w = World::new("compare").env("DAXSHIM_TRACKER", "compare");
    let f = w.pmem_file("f", &zeros(256 * PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 1048576
         store 70000 cmp
         msync
         kill",
        f = s(&f)
    )));
    w.drop_shadows();
    assert!(contains(&backing(&f), "cmp"));
    // Killed: no stats. Run once more to count a full compare.
    w.clear_stats();
    ok(w.probe(&format!(
        "open {f} rw
         map 1048576
         store 1 q
         msync
         munmap
         close",
        f = s(&f)
    )));
    assert_eq!(w.stat_sum("lines_written"), 1);
    assert!(w.stat_sum("lines_compared") >= 16384);
}

// Python's mmap module (code we did not write), under the shim.
#[test]
fn python_mmap_module_flush_persists_and_isolates() {
    let w = World::new("python");
    let f = w.pmem_file("f", &zeros(PAGE));
    let script = format!(
        r#"
import mmap, os, signal
fd = os.open({f:?}, os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[10:16] = b"python"
print("before-flush", open({f:?}, "rb").read().find(b"python") >= 0)  # read() goes through the shim
m.flush()
os.kill(os.getpid(), signal.SIGKILL)
"#,
        f = s(&f)
    );
    let mut c = w.shim_cmd(python());
    c.args(["-c", &script]);
    let o = run(c);
    let out = stdout(&o);
    killed(o);
    assert!(
        out.contains("before-flush True"),
        "read() must see the mapped store: {out}"
    );
    w.drop_shadows();
    assert!(contains(&backing(&f), "python"));
}
