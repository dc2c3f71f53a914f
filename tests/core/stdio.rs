//! stdio on pmem files goes through the shim (issue: "Every writer is
//! coherent", part 1): what a stream writes is seen by the mappings at once
//! and never undone by their sync, in one process and across processes, as
//! with the kernel page cache (each script also runs on an ordinary file
//! without the shim, and both must print the same and leave the same bytes).

use crate::common::*;
use crate::{while_mapped, zeros, PAGE};

fn digits(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'0' + (i % 10) as u8).collect()
}

// The bug this fixes: the stream's bytes went to the backing behind the
// shadow's back, the mapping showed the old ones, and its msync wrote them
// back over the stream's.
#[test]
fn stdio_writes_reach_the_mapping_and_survive_its_msync() {
    let w = World::new("stdio");
    let (out, _) = w.probe_both_on_zeros(
        2 * PAGE,
        "open {f} rw
         map 8192
         store 100 mapped
         fopen {f} r+
         fileno
         fseek 103 set
         fwrite XY
         fseek 5000 set
         fprintf clean
         fclose
         load 100 6
         load 5000 5
         msync sync",
    );
    assert!(out.contains("load: mapXYd"), "{out}");
    assert!(out.contains("load: clean"), "{out}");
    assert!(out.contains("fileno: same file"), "{out}");
    w.assert_shadowed();
}

// Another process's stdio writes, into a page this one stored to and into
// one nobody stored to, are seen at once and survive this one's msync.
#[test]
fn another_processes_stdio_writes_survive_this_ones_msync() {
    let w = World::new("stdio2");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let after = "load 100 4\nload 5000 4\nmsync sync";
    let o = while_mapped(&w, &f, "store 100 AAAA", after, |done| {
        ok(w.probe(&*format!(
            "fopen {f} r+
             fseek 102 set
             fwrite BB
             fseek 5000 set
             fwrite CCCC
             fclose
             touch {done}",
            f = s(&f),
            done = s(done),
        )));
    });
    let out = stdout(&o);
    assert!(
        out.contains("load: AABB") && out.contains("load: CCCC"),
        "{out}"
    );
    let b = backing(&f);
    assert_eq!(&b[100..104], b"AABB");
    assert_eq!(&b[5000..5004], b"CCCC");
}

// Append mode positions at the end ("a"); the appended bytes land in the
// mapping's last page, which sees them at once; fprintf + fflush + fsync of
// the stream's descriptor persist; the mapping keeps its own stores.
#[test]
fn append_fprintf_fflush_and_fsync_of_fileno() {
    let w = World::new("stdio3");
    let size = 2 * PAGE - 10;
    let (out, _) = w.probe_both_on_zeros(
        size,
        "open {f} rw
         map 8192
         store 0 head
         fopen {f} a
         ftell
         fprintf tail
         fflush
         ffsync
         ftell
         fclose
         load 8182 4
         load 0 4
         msync sync",
    );
    assert!(
        out.contains("ftell: 8182") && out.contains("ftell: 8186"),
        "{out}"
    );
    assert!(
        out.contains("load: tail") && out.contains("load: head"),
        "{out}"
    );
    w.drop_shadows();
}

// fdopen and freopen on pmem files give streams through the shim; reads,
// ungetc, ftell and the descriptor's own position agree with the kernel.
#[test]
fn fdopen_freopen_and_mixed_stream_and_descriptor_io() {
    let w = World::new("stdio4");
    let pf = w.pmem_file("f", &digits(2 * PAGE));
    let of = w.plain_file("f", &digits(2 * PAGE));
    let out = w.probe_both(
        &pf,
        &of,
        "open {f} rw
         map 8192
         store 10 abc
         fdopen r+
         fread 4
         ftell
         ungetc Z
         fgetc
         ftell
         read 3
         fseek 11 set
         fwrite Q
         fflush
         load 10 3
         freopen - r
         fseek 10 set
         fread 3
         freopen {f} r+
         setvbuf none
         fseek 4096 set
         fwrite unbuffered
         load 4096 10
         fclose
         msync sync",
    );
    assert!(
        out.contains("fread: 4 0123") && out.contains("fgetc: 90"),
        "{out}"
    );
    assert!(
        out.contains("load: aQc") && out.contains("fread: 3 aQc"),
        "{out}"
    );
    assert!(out.contains("load: unbuffered"), "{out}");
    assert_eq!(backing(&pf), backing(&of));
}

// A stream whose descriptor was closed under it: fclose reports the failed
// flush (EBADF) as on an ordinary file.
#[test]
fn fclose_reports_errors_like_the_kernel() {
    let w = World::new("stdio5");
    let (out, _) = w.probe_both_on_zeros(
        PAGE,
        "fopen {f} r+
         usestream
         fwrite abc
         close
         fclose",
    );
    assert!(out.contains("fclose: -1 errno=9"), "{out}");
}

// A program's standard output redirected onto a pmem file that another
// process maps (a shell's `1<>` and `>>`, by an external program using
// stdio and by the shell's own builtin): the mapping sees the bytes and its
// msync keeps them; freopen of stdout onto a mapped file likewise.
#[test]
fn redirected_standard_streams_and_freopen_of_stdout() {
    let w = World::new("stdio6");
    let f = w.pmem_file("f", &zeros(2 * PAGE));
    let after = "load 0 2\nload 100 6\nmsync sync";
    let o = while_mapped(&w, &f, "store 100 mapped", after, |done| {
        let mut sh = w.shim_cmd("sh");
        sh.arg("-c").arg(format!(
            "env printf XY 1<>{f} && printf AB >> {f} && touch {done}",
            f = s(&f),
            done = s(done)
        ));
        ok(run(sh));
    });
    let out = stdout(&o);
    assert!(
        out.contains("load: XY") && out.contains("load: mapped"),
        "{out}"
    );
    let b = backing(&f);
    assert_eq!(&b[0..2], b"XY");
    assert_eq!(&b[100..106], b"mapped");
    assert_eq!(&b[2 * PAGE..], b"AB");

    // freopen(stdout): the probe's own output goes to the file from then on.
    let pf = w.pmem_file("g", &zeros(2 * PAGE));
    let of = w.plain_file("g", &zeros(2 * PAGE));
    let script = "open {f} rw
                  map 8192
                  store 4000 mapped
                  freopen {f} r+ stdout
                  puts hello
                  flushout
                  msync sync";
    w.probe_both(&pf, &of, script);
    let b = backing(&pf);
    assert!(b.starts_with(b"freopen: ok\nhello"), "{:?}", &b[..32]);
    assert_eq!(&b[4000..4006], b"mapped");
    assert_eq!(b, backing(&of));
}
