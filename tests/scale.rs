//! Scale (issue 13): costs that follow the work, not the size of the file.
//! These tests check correctness only (the costs are measured by
//! `daxshim-bench --scale`, BENCHMARKS.md). Each script runs on emulated
//! pmem under the shim and on an ordinary file without it: outputs and
//! final files must be identical, and what a process *without* the shim
//! reads after each sync is part of the output — so a store a sync missed
//! shows as a difference.

mod common;
use common::*;

/// Python helpers: `outside(offs)` reads bytes of the file from a process
/// without the shim (the backing, under the shim: what is durable).
const PRELUDE: &str = r#"
import os, mmap, sys, ctypes, subprocess
P = 4096
R = 2 << 20
f = sys.argv[1]
def outside(offs):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\n"
            "print(' '.join(os.pread(fd,8,int(o)).hex() for o in sys.argv[2:]))")
    r = subprocess.run([sys.executable, "-c", code, f] + [str(o) for o in offs],
                       env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip()
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
"#;

fn both(w: &World, size: u64, script: &str) -> String {
    let pf = w.pmem_file("f", &[]);
    let of = w.plain_file("f", &[]);
    for p in [&pf, &of] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .and_then(|f| f.set_len(size))
            .unwrap();
    }
    let code = format!("{PRELUDE}\n{script}");
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", &code, s(&pf)]);
    let mut plain = w.cmd(python());
    plain.args(["-c", &code, s(&of)]);
    let (x, y) = (ok(run(shim)), ok(run(plain)));
    assert_eq!(x, y, "shim vs page cache");
    assert!(backing(&pf) == backing(&of), "final files differ");
    w.assert_shadowed();
    x
}

// A 64 MiB mapping with its 2 MiB regions trapped (DAXSHIM_TRAP_MIN=32M),
// every page read first: each sync writes exactly the stores made since the
// previous one — through the mapping into cold and hot regions, the kernel
// storing into a cold region (readv), a forked child, after the program's
// own mprotect, and after the mapping shrank with mremap below the
// threshold (its regions moved read-only) — and nothing else is reported
// dirty.
#[test]
fn syncs_of_a_trapped_mapping_write_every_store_and_only_those() {
    let w = World::new("scale-traps").env("DAXSHIM_TRAP_MIN", "32M");
    let script = r#"
fd = os.open(f, os.O_RDWR)
n = os.fstat(fd).st_size
m = mmap.mmap(fd, n)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
s = sum(m[i] for i in range(0, n, P))
m.flush()  # the first sync protects every region
def store(off, b):
    m[off:off + len(b)] = b
# 1: first stores into two cold regions
store(3 * R + 5 * P, b"round-1a"); store(20 * R + 100, b"round-1b")
m.flush(); print(1, outside([3 * R + 5 * P, 20 * R + 100]))
# 2: the same region again (trapped again), and the kernel storing into a
#    cold region through readv
store(3 * R + 5 * P + 8, b"round-2a")
src = os.open("/proc/self/cmdline", os.O_RDONLY)
os.readv(src, [memoryview(m)[5 * R + 64:5 * R + 72]])
m.flush(); print(2, outside([3 * R + 5 * P, 3 * R + 5 * P + 8, 5 * R + 64]))
# 3: the program's own mprotect: read-only, then writable again, then a store
assert libc.mprotect(base + 9 * R, R, mmap.PROT_READ) == 0
assert libc.mprotect(base + 9 * R, R, mmap.PROT_READ | mmap.PROT_WRITE) == 0
store(9 * R + 4 * P, b"mprot-4a")
m.flush(); print(3, outside([9 * R + 4 * P]))
# 4: a sync of a range inside one region reports that part only; the rest of
#    the region is written at the next whole sync
store(11 * R + P, b"part-5aa"); store(11 * R + 100 * P, b"part-5bb")
assert libc.msync(base + 11 * R, P * 2, 4) == 0
print(4, outside([11 * R + P]))
m.flush(); print(4, outside([11 * R + 100 * P]))
# 5: a forked child stores into a cold region and syncs; the parent stores
#    into another
pid = os.fork()
if pid == 0:
    store(7 * R + 300, b"child-3a"); m.flush(); os._exit(0)
os.waitpid(pid, 0)
store(8 * R, b"parent3b")
m.flush(); print(5, outside([7 * R + 300, 8 * R]))
# 6: shrink the mapping to 24 MiB (below the threshold) in place: its
#    regions keep their protection, so it stays trapped
q = libc.mremap(base, n, 24 << 20, 0)
assert q == base, q
ctypes.memmove(base + 10 * R + 7, b"remap-6a", 8)
assert libc.msync(base, 24 << 20, 4) == 0
print(6, outside([10 * R + 7]))
"#;
    let out = both(&w, 64 << 20, script);
    assert!(out.contains("726f756e642d3161"), "{out}"); // "round-1a"
                                                        // Trapped: each round's first store to a region faulted once.
    assert!(w.stat_sum("store_traps") >= 7, "regions were not trapped");
    // Only the stores were found dirty, not the 16,384 pages read.
    let dirtied = w.stat_sum("pages_dirtied");
    assert!(dirtied <= 32, "{dirtied} pages reported dirty");
}

// A thread that blocks every signal (a common idiom for worker threads)
// still gets lazy pages filled and regions trapped: the shim keeps SIGBUS
// and SIGSEGV out of the masks the program sets (a fault's signal that is
// blocked kills the process).
#[test]
fn a_thread_blocking_every_signal_still_fills_and_stores() {
    let w = World::new("scale-masked").env("DAXSHIM_TRAP_MIN", "32M");
    let script = r#"
import signal, threading
fd = os.open(f, os.O_RDWR)
n = os.fstat(fd).st_size
for k in range(0, n, R):
    os.pwrite(fd, b"data-%08d" % k, k + 64)
m = mmap.mmap(fd, n)
m.flush()  # protects every region
out = []
def worker():
    signal.pthread_sigmask(signal.SIG_BLOCK, range(1, signal.NSIG))
    for k in range(0, n, R):
        out.append(m[k + 64:k + 77])
        m[k + 200:k + 208] = b"worker!!"
    m.flush()
t = threading.Thread(target=worker); t.start(); t.join()
print(out[0], out[-1], len(out))
print(outside([R + 200, n - R + 200]))
"#;
    let out = both(&w, 64 << 20, script);
    assert!(out.contains("776f726b65722121"), "{out}"); // "worker!!"
}
