//! Lazy shadows (performance issue, "Lazy shadows"): a mapping fills its
//! shadow on first access, kernel-side accesses to pages not filled yet
//! work, clean pages are evicted beyond DAXSHIM_CACHE_MAX while unsynced
//! stores stay, and processes that cannot fill lazily share the shadow.
//! Every script runs on emulated pmem under the shim and on an ordinary
//! file without it: outputs and final files must be identical.

mod common;
use common::*;

const PAGES: usize = 16384; // 64 MiB

/// Lazy filling needs the userfaultfd tracker (Linux ≥ 6.7) and a
/// userfaultfd that serves the kernel's own faults: root, or
/// `vm.unprivileged_userfaultfd=1`. Elsewhere (the DAX VM's 6.1 kernel) the
/// shim copies eagerly, and these tests check contents, not laziness.
fn lazy_expected(w: &World) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "1");
    // Which tracker the shim picks here (a run of `true` writes its stats).
    ok(run(w.shim_cmd("true")));
    let uffd = w.tracker() == "uffd";
    w.clear_stats();
    (root || sysctl) && uffd
}

/// Each page starts with its index, then a fill byte derived from it.
fn pattern() -> Vec<u8> {
    let mut v = vec![0u8; PAGES * 4096];
    for (i, p) in v.chunks_mut(4096).enumerate() {
        p[..8].copy_from_slice(&(i as u64).to_le_bytes());
        p[8..].fill((i % 251) as u8);
    }
    v
}

/// Python helpers shared by the scripts: `page(i)` is what page i holds.
const PRELUDE: &str = r#"
import os, mmap, sys, random, struct
P = 4096
def page(i): return struct.pack('<Q', i) + bytes([i % 251]) * (P - 8)
def check(m, i):
    got = m[i*P:(i+1)*P]
    assert got == page(i), f"page {i} wrong: {got[:12]!r}"
def shadow_bytes():
    d = os.environ.get("DAXSHIM_SHADOW_DIR")
    if not d or not os.path.isdir(d): return 0
    return sum(os.stat(os.path.join(d, n)).st_blocks * 512
               for n in os.listdir(d)
               if not n.endswith((".meta", ".lines")) and "orphan" not in n)
"#;

/// Runs `script` (after the prelude) on a pmem file under the shim and on a
/// plain file without it; both must agree on output and final contents.
/// Returns the output and whether the shim filled lazily.
fn both(w: &World, script: &str, extra: &[&str]) -> (String, bool) {
    let lazy = lazy_expected(w);
    let content = pattern();
    let pf = w.pmem_file("f", &content);
    let of = w.plain_file("f", &content);
    let code = format!("{PRELUDE}\n{script}");
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", &code, s(&pf)]).args(extra);
    if lazy {
        shim.env("LAZY_EXPECTED", "1");
    }
    let mut plain = w.cmd(python());
    plain.args(["-c", &code, s(&of)]).args(extra);
    let (x, y) = (ok(run(shim)), ok(run(plain)));
    assert_eq!(x, y, "shim vs page cache");
    assert!(backing(&pf) == backing(&of), "final files differ");
    w.assert_shadowed();
    (x, lazy)
}

// Mapping 64 MiB and touching 40 pages fills a few chunks, not the file;
// the kernel's own accesses to pages never touched (write(2) from the
// mapping, readv(2) into it) wait for the fill instead of failing.
#[test]
fn mapping_fills_only_what_is_touched_and_kernel_accesses_work() {
    let w = World::new("lazy-touch");
    let script = r#"
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 0)
rnd = random.Random(7)
for i in rnd.sample(range(len(m) // P), 40):
    check(m, i)
if os.environ.get("LAZY_EXPECTED"):
    held = shadow_bytes()
    assert held < 8 << 20, f"{held} bytes of shadow after touching 40 pages"
# write(2) straight from a page nobody touched yet
r, wr = os.pipe()
os.write(wr, memoryview(m)[5000 * P:5000 * P + 100])
assert os.read(r, 100) == page(5000)[:100]
# readv(2) into a page nobody touched yet: a kernel-side store
src = os.open(f, os.O_RDONLY)
os.lseek(src, 0, 0)
n = os.readv(src, [memoryview(m)[9000 * P:9000 * P + 64]])
assert n == 64
assert m[9000 * P:9000 * P + 64] == page(0)[:64]
m[12345 * P:12345 * P + 5] = b"store"
m.flush()
print("ok", m[9000 * P:9000 * P + 8].hex())
"#;
    let (out, lazy) = both(&w, script, &[]);
    assert!(out.starts_with("ok"), "{out}");
    if lazy {
        assert!(w.stat_sum("lazy_faults") >= 40, "no lazy faults: not lazy?");
        assert!(w.stat_sum("lazy_filled_bytes") < 16 << 20);
    }
}

// DAXSHIM_CACHE_MAX: reading the whole 64 MiB through a 4 MiB cache keeps
// the shadow near 4 MiB, every byte read is right, and stores made before
// (not synced) survive the evictions until msync writes them back.
#[test]
fn cache_max_evicts_clean_pages_and_keeps_unsynced_stores() {
    let w = World::new("lazy-evict").env("DAXSHIM_CACHE_MAX", "4M");
    let script = r#"
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 0)
marks = list(range(100, 16384, 811))
for i in marks:
    m[i*P+100:i*P+106] = b"dirty!"
peak = 0
for i in range(len(m) // P):
    got = m[i*P:i*P+P]
    want = page(i)
    if i in marks: want = want[:100] + b"dirty!" + want[106:]
    assert got == want, f"page {i}"
    if i % 512 == 0 and os.environ.get("LAZY_EXPECTED"):
        peak = max(peak, shadow_bytes())
assert peak < (4 << 20) * 11 // 10 + len(marks) * (64 << 10), f"shadow peaked at {peak}"
for i in marks:
    assert m[i*P+100:i*P+106] == b"dirty!", f"store at page {i} lost"
m.flush()
print("ok", len(marks))
"#;
    let (out, lazy) = both(&w, script, &[]);
    assert!(out.starts_with("ok"), "{out}");
    assert!(
        !lazy || w.stat_sum("evicted_bytes") > 32 << 20,
        "evicted only {} bytes",
        w.stat_sum("evicted_bytes")
    );
}

// DAXSHIM_CACHE_MAX with several processes attached (their regions
// trapped, DAXSHIM_TRAP_MIN=0): three processes read random pages of the
// file and store into lines of their own, syncing now and then; the shadow
// stays bounded while they all run (every process evicts clean pages, the
// others refill them lazily), no read sees a wrong byte and every store
// reaches the file. Were eviction kept to a process alone on the shadow,
// as it was, the shadow would grow to all that was read.
#[test]
fn cache_max_evicts_while_several_processes_read_and_store() {
    let w = World::new("lazy-evict-many")
        .env("DAXSHIM_CACHE_MAX", "4M")
        .env("DAXSHIM_TRAP_MIN", "0");
    let (out, lazy) = both(&w, MANY_READERS, &[]);
    assert!(out.starts_with("ok"), "{out}");
    // Three processes read ~9,000 pages (35 MiB) through 4 MiB: most of
    // it was evicted while the others were attached.
    assert!(
        !lazy || w.stat_sum("evicted_bytes") > 16 << 20,
        "evicted only {} bytes",
        w.stat_sum("evicted_bytes")
    );
}

const MANY_READERS: &str = r#"
import subprocess, time, json
f = sys.argv[1]
child = r'''
import os, mmap, sys, random, struct, json
P = 4096
def page(i): return struct.pack('<Q', i) + bytes([i % 251]) * (P - 8)
k = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0)
rnd = random.Random(k)
mine = {}
lines = [(900 + 64 * j, 908 + 64 * j) for j in range(3)]
for n in range(3000):
    i = rnd.randrange(len(m) // P)
    got = bytearray(m[i*P:(i+1)*P])
    want = bytearray(page(i))
    for (a, b) in lines:
        want[a:b] = got[a:b]  # the children's own lines: checked below
    assert got == want, f"child {k}: page {i} wrong"
    a, b = lines[k]
    if i in mine:
        assert got[a:b] == mine[i], f"child {k}: store at page {i} lost"
    # A store opens its 2 MiB region to stores until the next sync, and
    # no other process evicts there meanwhile: a few per sync.
    if n % 50 == 0:
        v = struct.pack('<II', n + 1, k + 1)
        m[i*P+a:i*P+b] = v
        mine[i] = v
    if n % 200 == 199:
        m.flush()
m.flush()
print(json.dumps({str(i): v.hex() for i, v in mine.items()}))
'''
kids = [subprocess.Popen([sys.executable, "-c", child, f, str(k)], stdout=subprocess.PIPE, text=True)
        for k in range(3)]
def held():
    d = os.environ.get("DAXSHIM_SHADOW_DIR")
    if not d or not os.path.isdir(d): return 0
    total = 0
    for n in os.listdir(d):
        if n.endswith((".meta", ".regions")) or n.startswith("live-"): continue
        try: total += os.stat(os.path.join(d, n)).st_blocks * 512
        except FileNotFoundError: pass
    return total
peak = 0
while any(c.poll() is None for c in kids):
    if os.environ.get("LAZY_EXPECTED"):
        peak = max(peak, held())
    time.sleep(0.005)
stores = {}
for k, c in enumerate(kids):
    out, _ = c.communicate()
    assert c.returncode == 0, f"child {k} failed"
    stores[k] = json.loads(out)
fd = os.open(f, os.O_RDONLY)
for k, mine in stores.items():
    for i, v in mine.items():
        i = int(i)
        got = os.pread(fd, 8, i*P + 900 + 64*k)
        assert got.hex() == v, f"child {k}'s store at page {i}: {got.hex()} != {v}"
# ~27 MiB of distinct pages were read, plus their bases: a bound well
# below that (a test, not the benchmark: timing on a loaded machine lets
# fills run ahead of eviction for a while).
if os.environ.get("LAZY_EXPECTED"):
    assert peak < 20 << 20, f"shadow (data and bases) peaked at {peak >> 20} MiB"
print("ok", sum(len(v) for v in stores.values()))
"#;

// A lazy process and processes that cannot fill lazily (DAXSHIM_LAZY=off,
// the full-compare tracker) map one shadow at the same time: the eager ones
// fill every hole first and all see each other's stores.
#[test]
fn lazy_and_eager_processes_share_one_shadow() {
    let w = World::new("lazy-mixed");
    let script = r#"
import subprocess
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 0)
check(m, 3)
m[100*P:100*P+4] = b"lazy"
child = r'''
import os, mmap, sys
P = 4096
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0)
assert m[100*P:100*P+4] == b"lazy"
assert m[7000*P:7000*P+8] == (7000).to_bytes(8, "little")
m[int(sys.argv[2])*P:int(sys.argv[2])*P+5] = b"eager"
print("child", m[200*P:200*P+8].hex())
'''
for env, pg in ((dict(os.environ, DAXSHIM_LAZY="off"), 3000), (dict(os.environ, DAXSHIM_TRACKER="compare"), 3001)):
    out = subprocess.run([sys.executable, "-c", child, f, str(pg)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    print(out.stdout.strip())
    assert m[pg*P:pg*P+5] == b"eager", f"page {pg} store not seen"
check(m, 9999)
m.flush()
print("ok")
"#;
    let (out, _) = both(&w, script, &[]);
    assert!(out.contains("ok"), "{out}");
}

// A forked child fills pages of an inherited lazy mapping through its own
// fault thread; its stores reach the parent and the file.
#[test]
fn forked_child_fills_inherited_lazy_mappings() {
    let w = World::new("lazy-fork");
    let script = r#"
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 0)
check(m, 1)
pid = os.fork()
if pid == 0:
    for i in (2, 4000, 16000):
        check(m, i)
    m[15000*P:15000*P+5] = b"child"
    m.flush()
    os._exit(0)
_, st = os.waitpid(pid, 0)
assert st == 0, st
assert m[15000*P:15000*P+5] == b"child"
check(m, 8000)
print("ok")
"#;
    let (out, _) = both(&w, script, &[]);
    assert!(out.contains("ok"), "{out}");
}

// read/write through descriptors on a partly filled lazy shadow: pread sees
// mapped (unsynced) stores, pwrite into pages never filled and into filled
// ones shows in the mapping, a file grown by write shows too; MADV_REMOVE
// frees the range in the file, as the kernel page cache does.
#[test]
fn descriptor_io_and_madv_remove_on_lazy_shadows() {
    let w = World::new("lazy-io");
    let script = r#"
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 0)
m[10*P+101:10*P+106] = b"store"                 # fills chunk 0
assert os.pread(fd, 8, 10*P+100) == bytes([10 % 251]) + b"store" + bytes([10 % 251]) * 2
os.pwrite(fd, b"into-hole", 6000*P + 50)         # never filled
os.pwrite(fd, b"into-held", 11*P + 50)           # filled
assert m[6000*P+50:6000*P+59] == b"into-hole"
assert m[11*P+50:11*P+59] == b"into-held"
assert os.pread(fd, 6, 7000*P) == page(7000)[:6]  # pread of a hole
check(m, 6001)
size = len(m)
os.pwrite(fd, b"grown", size + 10)
m2 = mmap.mmap(fd, 0)
assert m2[size+10:size+15] == b"grown" and m2[size:size+10] == bytes(10)
m[8000*P:8001*P]                                  # fill, then free
m.madvise(mmap.MADV_REMOVE, 8000*P, 2*P)
assert m[8000*P:8002*P] == bytes(2*P)
assert os.pread(fd, 4, 8001*P) == bytes(4)
m.flush(); m2.flush()
print("ok")
"#;
    let (out, _) = both(&w, script, &[]);
    assert!(out.contains("ok"), "{out}");
}

// A chunk that cannot be filled (here: the shadow directory is a 256 KiB
// tmpfs, full after a few fills) must not leave the faulting thread
// faulting forever: like the kernel when it cannot read a page in, the
// shim raises SIGBUS in it.
#[test]
fn a_fill_that_cannot_be_done_raises_sigbus() {
    let w = World::new("lazy-full");
    if !lazy_expected(&w) {
        eprintln!("note: lazy shadows unavailable here; nothing to fill");
        return;
    }
    let f = w.pmem_file("f", &pattern()[..4 << 20]);
    let small = w.root.join("small-shm");
    std::fs::create_dir_all(&small).unwrap();
    let script = r#"
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0)
print("start", flush=True)
s = 0
for i in range(0, len(m), 4096):
    s += m[i]
print("read all", s)
"#;
    // A private mount namespace, so the small tmpfs needs no cleanup.
    let mut c = w.shim_cmd("unshare");
    c.args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=256k,mode=0700 tmpfs {d} && exec \"$0\" -c \"$1\" \"$2\"",
            d = small.display()
        ))
        .arg(python())
        .arg(script)
        .arg(&f)
        .env("DAXSHIM_SHADOW_DIR", small.join("d"));
    let started = std::time::Instant::now();
    let out = run(c);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(text.contains("start"), "the program did not start: {text}");
    assert!(
        !text.contains("read all"),
        "reads past a failed fill: {text}"
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{text}");
    // ENOSPC from the fault thread's copy, ENOMEM from UFFDIO_COPY.
    assert!(
        text.contains("No space left on device") || text.contains("Cannot allocate memory"),
        "{text}"
    );
}
