//! Descriptor juggling and the kernel's other ways into a file — `O_APPEND`,
//! `O_DIRECT`, `sendfile`, `copy_file_range`, `splice` — stay coherent with
//! the mappings, as with the page cache.

use crate::common::*;

// dup/dup2/dup3/F_DUPFD keep the descriptor table right: writes through a
// duplicate reach mappings, closing one duplicate keeps the others working.
#[test]
fn duplicated_descriptors_stay_coherent() {
    let script = r#"
import os, mmap, fcntl, sys
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 4096)
d1 = os.dup(fd); d2 = os.dup2(fd, 50); d3 = fcntl.fcntl(fd, fcntl.F_DUPFD, 60)
os.close(fd)
os.pwrite(d1, b"dup1", 0); os.pwrite(d2, b"dup2", 10); os.pwrite(d3, b"dup3", 20)
print(m[0:4], m[10:14], m[20:24])
m[30:34] = b"mmap"
os.close(d1)
os.closerange(d2, d2 + 1)            # close_range(2)
print(os.pread(d3, 4, 30))
m.flush()
"#;
    let w = World::new("dup");
    let pf = w.pmem_file("f", &[0u8; 4096]);
    let of = w.plain_file("f", &[0u8; 4096]);
    let mut outs = Vec::new();
    for (f, shim) in [(&pf, true), (&of, false)] {
        let mut c = if shim {
            w.shim_cmd(python())
        } else {
            w.cmd(python())
        };
        c.args(["-c", script, s(f)]);
        outs.push(ok(run(c)));
    }
    assert_eq!(outs[0], outs[1]);
    assert!(
        outs[0].contains("b'dup1' b'dup2' b'dup3'") && outs[0].contains("b'mmap'"),
        "{}",
        outs[0]
    );
    assert_eq!(backing(&pf), backing(&of));
    w.assert_shadowed();
}

// O_APPEND writes land at the end, in the backing and in the mapping.
#[test]
fn append_writes_land_at_the_end() {
    let w = World::new("append");
    let pf = w.pmem_file("f", b"0123456789");
    let of = w.plain_file("f", b"0123456789");
    let out = w.probe_both(
        &pf,
        &of,
        "open {f} append , map 4096 , write AAA , pwrite 0 BBB , pread 0 16 , load 10 6",
    );
    assert!(out.contains("pread: 0123456789AAABBB"), "{out}");
    assert_eq!(backing(&pf), backing(&of));
    w.assert_shadowed();
}

// sendfile, copy_file_range and splice move bytes inside the kernel; the
// shim keeps them coherent with mappings, as the page cache is.
#[test]
fn kernel_copies_are_coherent_with_mappings() {
    let script = r#"
import os, mmap, sys
a, b = sys.argv[1], sys.argv[2]   # a: the mapped file, b: another file
fa = os.open(a, os.O_RDWR); fb = os.open(b, os.O_RDWR)
m = mmap.mmap(fa, 8192)
m[0:6] = b"mapped"                         # only in the mapping (unsynced)
os.copy_file_range(fa, fb, 6, 0, 100)      # out of the mapped file
print("cfr-out", os.pread(fb, 6, 100))
os.pwrite(fb, b"fromB!", 200)
os.copy_file_range(fb, fa, 6, 200, 300)    # into the mapped file
print("cfr-in", m[300:306])
os.lseek(fa, 400, 0)
os.sendfile(fa, fb, 200, 6)                # into the mapped file at its position
print("sendfile-in", m[400:406], os.lseek(fa, 0, 1))
os.sendfile(fb, fa, 0, 6)                  # out of the mapped file
print("sendfile-out", os.pread(fb, 6, 0))
r, w = os.pipe()
os.write(w, b"piped!")
os.splice(r, fa, 6, offset_dst=500)        # pipe into the mapped file
print("splice-in", m[500:506])
os.splice(fa, w, 6, offset_src=0)          # mapped file into a pipe
print("splice-out", os.read(r, 6))
m.flush()
"#;
    let w = World::new("kcopy");
    let (pa, pb) = (
        w.pmem_file("a", &[0u8; 8192]),
        w.pmem_file("b", &[0u8; 8192]),
    );
    let (oa, ob) = (
        w.plain_file("a", &[0u8; 8192]),
        w.plain_file("b", &[0u8; 8192]),
    );
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", script, s(&pa), s(&pb)]);
    let mut plain = w.cmd(python());
    plain.args(["-c", script, s(&oa), s(&ob)]);
    let (x, y) = (ok(run(shim)), ok(run(plain)));
    assert_eq!(x, y);
    assert!(
        x.contains("cfr-out b'mapped'")
            && x.contains("sendfile-in b'fromB!'")
            && x.contains("splice-out b'mapped'"),
        "{x}"
    );
    assert_eq!(backing(&pa), backing(&oa));
    assert_eq!(backing(&pb), backing(&ob));
    w.assert_shadowed();
}

// O_DIRECT reads and writes stay coherent with the shadow.
#[test]
fn o_direct_io_is_coherent() {
    let script = r#"
import os, mmap, sys
f = sys.argv[1]
m = mmap.mmap(os.open(f, os.O_RDWR), 8192)
d = os.open(f, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)              # page-aligned buffer
buf[0:6] = b"direct"
os.pwritev(d, [buf], 4096)
print("mapped sees", m[4096:4102])
m[0:6] = b"mapped"
n = os.preadv(d, [buf], 0)
print("direct read sees", buf[0:6])
m.flush()
"#;
    let w = World::new("odirect");
    let pf = w.pmem_file("f", &[0u8; 8192]);
    let of = w.plain_file("f", &[0u8; 8192]);
    let mut shim = w.shim_cmd(python());
    shim.args(["-c", script, s(&pf)]);
    let x = ok(run(shim));
    assert_eq!(x, "mapped sees b'direct'\ndirect read sees b'mapped'\n");
    // The kernel page cache as the reference, where the control file
    // system takes O_DIRECT (tmpfs before Linux 6.6 does not).
    let mut plain = w.cmd(python());
    plain.args(["-c", script, s(&of)]);
    let o = run(plain);
    if o.status.success() {
        assert_eq!(stdout(&o), x);
        assert_eq!(backing(&pf), backing(&of));
    } else {
        assert!(stderr(&o).contains("Invalid argument"), "{}", stderr(&o));
    }
    w.assert_shadowed();
}
