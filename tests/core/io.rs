//! File I/O and mappings, in one process and across processes, observe one
//! file, as the kernel page cache gives them; size and allocation changes
//! keep the shadow equal to the file.

use crate::common::*;
use crate::{zeros, PAGE};
use std::path::Path;

// Coherence within a process, same observations as the kernel page cache.
#[test]
fn file_io_and_mappings_agree_like_the_page_cache() {
    let w = World::new("coherent");
    let (out, _) = w.probe_both_on_zeros(
        2 * PAGE,
        "open {f} rw
         map 8192
         store 100 mapped
         pread 100 6
         pwrite 200 written
         load 200 7
         seek 100
         read 6
         seek 300
         writev ab cd
         load 300 4
         preadv 100 3 3
         ftruncate 16384
         mremap 16384
         store 12000 grown
         pread 12000 5",
    );
    assert!(
        out.contains("pread: mapped")
            && out.contains("load: written")
            && out.contains("pread: grown")
    );
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
    // Exit wrote everything back: the backing equals the ordinary file.
}

// Two processes mapping one file see each other's stores at once; one's
// fsync persists the other's stores (as the kernel's would).
#[test]
fn two_processes_share_one_shadow() {
    let w = World::new("twoproc");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let (a_ready, b_ready, done) = (w.root.join("a"), w.root.join("b"), w.root.join("done"));
    let b = w.probe_cmd(&format!(
        "open {f} rw
         map 8192
         waitfor {a_ready}
         load 0 3
         store 4100 BBB
         touch {b_ready}
         waitfor {done}
         kill",
        f = s(&f),
        a_ready = s(&a_ready),
        b_ready = s(&b_ready),
        done = s(&done)
    ));
    let hb = std::thread::spawn(move || run(b));
    let out_a = killed(w.probe(&format!(
        "open {f} rw
         map 8192
         store 0 AAA
         touch {a_ready}
         waitfor {b_ready}
         load 4100 3
         fsync
         touch {done}
         kill",
        f = s(&f),
        a_ready = s(&a_ready),
        b_ready = s(&b_ready),
        done = s(&done)
    )));
    let out_b = killed(hb.join().unwrap());
    assert!(
        out_b.contains("load: AAA"),
        "B did not see A's store: {out_b}"
    );
    assert!(
        out_a.contains("load: BBB"),
        "A did not see B's store: {out_a}"
    );
    w.drop_shadows();
    let bk = backing(&f);
    assert!(
        contains(&bk, "AAA") && contains(&bk, "BBB"),
        "A's fsync did not persist both stores"
    );
}

// Lazy shadow data: a process that only reads and writes the file and a
// process that maps it later (creating the shadow's data then) stay
// coherent in both directions.
#[test]
fn file_io_process_and_later_mapper_stay_coherent() {
    let w = World::new("lazy");
    let f = w.pmem_file("f", &zeros(PAGE));
    let (a1, a2, b1) = (w.root.join("a1"), w.root.join("a2"), w.root.join("b1"));
    let a = w.probe_cmd(&format!(
        "open {f} rw
         pwrite 0 AAAA
         touch {a1}
         waitfor {b1}
         pwrite 100 A2
         pread 200 4
         touch {a2}
         exit",
        f = s(&f),
        a1 = s(&a1),
        a2 = s(&a2),
        b1 = s(&b1)
    ));
    let ha = std::thread::spawn(move || run(a));
    wait_for(&a1);
    let out_b = ok(w.probe(&format!(
        "open {f} rw
         map 4096
         load 0 4
         store 200 BBBB
         touch {b1}
         waitfor {a2}
         load 100 2
         msync
         exit",
        f = s(&f),
        a2 = s(&a2),
        b1 = s(&b1)
    )));
    let out_a = ok(ha.join().unwrap());
    assert!(
        out_b.contains("load: AAAA") && out_b.contains("load: A2"),
        "{out_b}"
    );
    assert!(
        out_a.contains("pread: BBBB"),
        "the writer did not see the mapper's store: {out_a}"
    );
    let b = backing(&f);
    assert!(contains(&b, "AAAA") && contains(&b, "A2") && contains(&b, "BBBB"));
    assert_eq!(w.stat_sum("shadows_created"), 1);
}

// A file that is only opened, read and written gets no shadow data.
#[test]
fn unmapped_files_get_no_shadow_copy() {
    let w = World::new("nocopy");
    let f = w.pmem_file("f", &zeros(PAGE));
    let stored = w.root.join("stored");
    let go = w.root.join("go");
    let c = w.probe_cmd(&format!(
        "open {f} rw
         pwrite 0 direct
         touch {stored}
         waitfor {go}
         fsync
         exit",
        f = s(&f),
        stored = s(&stored),
        go = s(&go)
    ));
    let h = std::thread::spawn(move || run(c));
    wait_for(&stored);
    // Only the header exists while the file is open (and the process's
    // presence file).
    let files = w.shadow_files();
    assert!(
        files
            .iter()
            .all(|n| n.ends_with(".meta") || n.starts_with("live-")),
        "{files:?}"
    );
    std::fs::write(&go, b"").unwrap();
    ok(h.join().unwrap());
    assert_eq!(w.stat_sum("shadows_created"), 0);
    assert!(contains(&backing(&f), "direct"));
}

// ftruncate, fallocate and hole punching keep the shadow equal to the file.
#[test]
fn size_and_allocation_changes_match_the_page_cache() {
    let w = World::new("falloc");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    w.probe_both(
        &pf,
        &of,
        "open {f} rw
         map 16384
         fill 0 8192 a
         msync
         fallocate 0 16384
         store 12000 tail
         pread 12000 4
         punch 4096 4096
         load 4090 12
         pread 4090 12
         ftruncate 6000
         pread 5990 100
         ftruncate 8192
         load 5998 4",
    );
    assert_eq!(backing(&pf), backing(&of));
    assert_eq!(w.stat_sum("mappings_shadowed"), 1);
}

// truncate(2) by path: the shadow follows.
#[test]
fn truncate_by_path_resizes_the_shadow() {
    use std::os::unix::process::ExitStatusExt;
    let w = World::new("truncpath");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let script = format!(
        r#"
import mmap, os
fd = os.open({f:?}, os.O_RDWR)
m = mmap.mmap(fd, 8192)
m[0:4] = b"keep"
os.truncate({f:?}, 4096)
print(os.pread(fd, 10, 0)[:4], os.fstat(fd).st_size)
try:
    m[5000]
except Exception as e:
    print("error", type(e).__name__)
"#,
        f = s(&f)
    );
    let mut c = w.shim_cmd(python());
    c.args(["-c", &script]);
    let o = run(c);
    // Reading beyond the new end of file raises SIGBUS, as with the kernel.
    assert_eq!(o.status.signal(), Some(7), "{}", stderr(&o));
    assert!(stdout(&o).contains("b'keep' 4096"), "{}", stdout(&o));
}

// A mapping longer than the file: pages beyond the end that the file grows
// over later are stored to and synced, across a shrink and a regrowth, and
// each sync writes them back (the userfaultfd tracker leaves pages beyond
// the end unarmed and must count them as written once they exist). The
// process is killed after its last sync, so only what the syncs wrote is in
// the backing; the same script on an ordinary file is the reference.
#[test]
fn stores_where_the_file_grew_under_a_longer_mapping_are_synced() {
    let w = World::new("growmap");
    let pf = w.pmem_file("f", &zeros(2 * PAGE));
    let of = w.plain_file("f", &zeros(2 * PAGE));
    let script = "open {f} rw
         map 65536
         store 100 first
         msync
         ftruncate 20000
         store 12000 grown
         msync
         ftruncate 4096
         ftruncate 40000
         store 30000 again
         store 5000 there
         msync
         kill";
    let on = |f: &Path| script.replace("{f}", s(f));
    killed(w.probe(&on(&pf)));
    killed(w.probe_plain(&on(&of)));
    let got = backing(&pf);
    assert_eq!(got.len(), 40000);
    assert!(contains(&got, "again") && contains(&got, "there"));
    assert_eq!(got, backing(&of));
}
