//! `errno` and signals exactly as the kernel's: the same probe on an
//! ordinary file without the shim is the reference.

use crate::common::*;
use crate::{zeros, PAGE};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

#[test]
fn errors_match_the_kernel() {
    let w = World::new("errno");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    for mode in ["ro", "rw"] {
        // msync: unaligned, over a hole in the mapping (the shim's own
        // mappings may sit anywhere around it, so not "beyond" it),
        // MS_ASYNC|MS_SYNC, unknown flag, MS_INVALIDATE, no flag; fsync of
        // a bad fd; mmap: length 0, unaligned offset, PROT_WRITE|MAP_SHARED
        // (EACCES on a read-only fd), MAP_SHARED_VALIDATE; munmap
        // unaligned; mremap growing in place.
        let out = w.probe_both(
            &pf,
            &of,
            &format!(
                "open {{f}} {mode}
                 map 8192 ro
                 try_msync 1 4096 4
                 try_munmap 4096 4096
                 try_msync 0 8192 4
                 try_msync 0 4096 7
                 try_msync 0 4096 64
                 try_msync 0 4096 2
                 try_msync 0 4096 0
                 try_fsync 987
                 try_mmap 0 3 1 0
                 try_mmap 4096 3 1 1
                 try_mmap 4096 3 1 0
                 try_mmap 4096 3 3 0
                 try_munmap 1 4096
                 try_mremap 16384 0"
            ),
        );
        assert!(
            out.contains("errno=22") && out.contains("errno=12") && out.contains("errno=9"),
            "{mode}: {out}"
        );
    }
    // MAP_SHARED_VALIDATE|MAP_SYNC: EOPNOTSUPP on an ordinary file, as the
    // kernel says; on (emulated) pmem the shim strips MAP_SYNC and maps.
    let sync_map = |f: &Path| format!("open {} rw , try_mmap 4096 3 0x80003 0", s(f));
    assert_eq!(ok(w.probe(&sync_map(&pf))), "ret=ok errno=0\n");
    assert_eq!(ok(w.probe_plain(&sync_map(&of))), "ret=-1 errno=95\n");
}

// Beyond end of file: SIGBUS, as with the kernel.
#[test]
fn access_beyond_eof_raises_sigbus_like_the_kernel() {
    let w = World::new("sigbus");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    for f in [&pf, &of] {
        let script = format!(
            "open {f} rw
             map 8192
             ftruncate 4096
             load 5000 1",
            f = s(f)
        );
        let o = if f == &pf {
            w.probe(&script)
        } else {
            w.probe_plain(&script)
        };
        assert_eq!(o.status.signal(), Some(7), "{}", s(f));
    }
    // The shim was in the path: the killed process left its shadow.
    assert!(!w.shadow_files().is_empty());
}
