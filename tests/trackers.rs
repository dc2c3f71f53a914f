//! The fallback tracker (performance issue: "mprotect+SIGSEGV as the
//! fallback… make it survive vm.max_map_count"): selected with
//! DAXSHIM_TRACKER=mprotect here, automatically on kernels without
//! userfaultfd write-protect in async mode. The whole core, robustness,
//! programs and SQLite suites also run on it (scripts/test.sh).

mod common;
use common::*;

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(65530)
}

// Every other page of a large mapping written: each opened page splits a
// VMA, far past vm.max_map_count. No store may fail or be lost: the shim
// opens the whole range when the kernel refuses and compares it at sync.
#[test]
fn mprotect_tracker_survives_max_map_count() {
    let pages = (max_map_count() / 2 + 8192) * 2;
    let w = World::new("maxmap").env("DAXSHIM_TRACKER", "mprotect");
    let script = r#"
import os, mmap, sys
f, pages = sys.argv[1], int(sys.argv[2])
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, pages * 4096)
for i in range(0, pages, 2):
    m[i * 4096:i * 4096 + 8] = i.to_bytes(8, "little")
m.flush()
for i in range(1, pages, 64):
    m[i * 4096] = 1
m.flush()
print("ok")
"#;
    let pf = w.pmem_file("f", &[]);
    let of = w.plain_file("f", &[]);
    for f in [&pf, &of] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_len((pages * 4096) as u64)
            .unwrap();
    }
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", script, s(&pf), &pages.to_string()]);
    let mut plain = w.cmd(python());
    plain.args(["-c", script, s(&of), &pages.to_string()]);
    assert_eq!(ok(run(shim)), ok(run(plain)));
    w.drop_shadows();
    assert!(backing(&pf) == backing(&of), "stores lost");
    assert_eq!(w.tracker(), "mprotect");
    assert!(w.stat_sum("pages_dirtied") >= pages as u64 / 2);
}

// Kernel-side stores into clean tracked pages (readv into the mapping) and
// MADV_POPULATE_WRITE work as without the shim, and are written back.
#[test]
fn mprotect_tracker_lets_the_kernel_store() {
    let w = World::new("mpkern").env("DAXSHIM_TRACKER", "mprotect");
    let script = r#"
import os, mmap, sys
f, src = sys.argv[1], sys.argv[2]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 65536)
m[0:4] = b"user"
m.flush()
s = os.open(src, os.O_RDONLY)
print(os.readv(s, [memoryview(m)[8192:8192 + 16]]))
print(os.preadv(s, [memoryview(m)[12288:12288 + 4]], 4))
m.madvise(23, 16384, 8192)   # MADV_POPULATE_WRITE
m[16384:16388] = b"popw"
m.flush()
print(m[8192:8208], m[12288:12292])
"#;
    let src = w.plain_file("src", b"from-the-kernel!");
    let pf = w.pmem_file("f", &[0u8; 65536]);
    let of = w.plain_file("f", &[0u8; 65536]);
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", script, s(&pf), s(&src)]);
    let mut plain = w.cmd(python());
    plain.args(["-c", script, s(&of), s(&src)]);
    let out = ok(run(shim));
    assert_eq!(out, ok(run(plain)));
    assert!(out.contains("from-the-kernel!"), "{out}");
    w.drop_shadows();
    assert!(backing(&pf) == backing(&of));
    assert_eq!(w.tracker(), "mprotect");
}
