//! Files renamed, unlinked, truncated and regrown under their mappings;
//! links and symlinked pmem directories; hostile shadow directories.

use crate::common::*;

// Renamed and unlinked while mapped: stores still reach the file through
// its mapping and syncs (the kernel keeps the inode; so does the shim).
#[test]
fn rename_and_unlink_while_mapped() {
    let w = World::new("rename");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let g = w.pmem.join("g");
    let renamed = w.root.join("renamed");
    let go = w.root.join("go");
    let c = w.probe_cmd(&format!(
        "open {f} rw
         map 4096
         touch {renamed}
         waitfor {go}
         store 0 after-rename
         fsync
         exit",
        f = s(&f),
        renamed = s(&renamed),
        go = s(&go)
    ));
    let h = std::thread::spawn(move || run(c));
    wait_for(&renamed);
    std::fs::rename(&f, &g).unwrap();
    std::fs::write(&go, b"").unwrap();
    ok(h.join().unwrap());
    assert!(contains(&backing(&g), "after-rename"));
    // Unlinked while mapped: the mapping still works, no stale shadow stays.
    ok(w.probe(&format!(
        "open {g} rw
         map 4096
         store 0 unlinked
         pread 0 8
         fsync
         exit",
        g = s(&g)
    )));
    std::fs::remove_file(&g).unwrap();
    assert!(w.shadow_files().is_empty(), "{:?}", w.shadow_files());
    w.assert_shadowed();
}

// Another process truncates the file to zero and regrows it while it is
// mapped: the mapping sees zeros after the regrow, as with the kernel.
#[test]
fn truncate_to_zero_and_regrow_by_another_process() {
    let w = World::new("truncregrow");
    let mut outs = Vec::new();
    for pmem in [true, false] {
        let f = if pmem {
            w.pmem_file("f", &[b'x'; 8192])
        } else {
            w.plain_file("f", &[b'x'; 8192])
        };
        let (a, b) = (
            w.root.join(format!("a{pmem}")),
            w.root.join(format!("b{pmem}")),
        );
        let mut c = if pmem {
            w.shim_cmd(probe())
        } else {
            w.cmd(probe())
        };
        c.args(script_args(&format!(
            "open {f} rw
             map 8192
             load 0 4
             touch {a}
             waitfor {b}
             load 0 4
             store 100 new
             msync
             exit",
            f = s(&f),
            a = s(&a),
            b = s(&b)
        )));
        let h = std::thread::spawn(move || run(c));
        wait_for(&a);
        let script = format!(
            "open {f} rw
             ftruncate 0
             ftruncate 8192
             pwrite 4096 regrown",
            f = s(&f)
        );
        ok(if pmem {
            w.probe(&script)
        } else {
            w.probe_plain(&script)
        });
        std::fs::write(&b, b"").unwrap();
        let out = ok(h.join().unwrap());
        let bk = backing(&f);
        outs.push((
            out.replace(['\0'], "."),
            bk.len(),
            contains(&bk, "new"),
            contains(&bk, "regrown"),
            bk[0],
        ));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0].4, 0, "the regrown file starts with zeros");
    w.assert_shadowed();
}

// A symlink or a hard link to a pmem file, and a pmem directory that is
// itself a symlink: the same file, the same shadow.
#[test]
fn links_and_symlinked_pmem_directories_reach_the_same_shadow() {
    let w = World::new("links");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let sym = w.pmem.join("sym");
    std::os::unix::fs::symlink(&f, &sym).unwrap();
    let hard = w.pmem.join("hard");
    std::fs::hard_link(&f, &hard).unwrap();
    let out = ok(w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 viaorig
         open {sym} rw
         pread 0 7
         open {hard} rw
         pread 0 7
         exit",
        f = s(&f),
        sym = s(&sym),
        hard = s(&hard)
    )));
    assert_eq!(out.matches("pread: viaorig").count(), 2, "{out}");
    // DAXSHIM_PMEM naming a symlink to the directory.
    if real_dax_dir().is_none() {
        let link = w.root.join("pmemlink");
        std::os::unix::fs::symlink(&w.pmem, &link).unwrap();
        let mut c = w.probe_cmd(&format!(
            "open {f} rw
             map 4096
             store 20 vialink
             kill",
            f = s(&link.join("f"))
        ));
        c.env("DAXSHIM_PMEM", &link);
        killed(run(c));
        assert!(
            !contains(&backing(&f), "vialink"),
            "not shadowed through the symlinked directory"
        );
    }
    w.assert_shadowed();
}

// Hostile shadow directories: a symlink as the directory, or a symlink
// planted where a shadow file goes, is refused with a warning; the program
// maps the file directly and loses nothing.
#[test]
fn planted_symlinks_are_refused() {
    // Emulated pmem falls back by itself; on a real DAX file (the suite in
    // the DAX guest) only when told to (realdax: it fails otherwise).
    let w = World::new("planted").env("DAXSHIM_FALLBACK", "direct");
    let f = w.pmem_file("f", &[0u8; 4096]);
    // The directory itself is a symlink.
    let target = w.root.join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, &w.shadow).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 safe1
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(
        err.contains("not a directory") || err.contains("symlink"),
        "{err}"
    );
    assert!(contains(&backing(&f), "safe1"));
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "wrote through the planted symlink"
    );
    std::fs::remove_file(&w.shadow).unwrap();
    // A symlink planted in place of the shadow's meta file.
    std::fs::create_dir(&w.shadow).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&w.shadow, std::fs::Permissions::from_mode(0o700)).unwrap();
    killed(w.probe(&format!("open {} rw , map 4096 , kill", s(&f))));
    let meta = std::fs::read_dir(&w.shadow)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".meta"))
        .unwrap()
        .path();
    let victim = w.root.join("victim");
    std::fs::write(&victim, b"do not touch").unwrap();
    for e in std::fs::read_dir(&w.shadow).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    std::os::unix::fs::symlink(&victim, &meta).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 safe2
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(
        err.contains("bypasses the shadow") || err.contains("directly"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    assert!(contains(&backing(&f), "safe2"));
    // A shadow directory that belongs to another user.
    for e in std::fs::read_dir(&w.shadow).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    std::os::unix::fs::chown(&w.shadow, Some(65534), Some(65534)).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 safe3
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(contains(&backing(&f), "safe3"));
    assert_eq!(
        std::fs::read_dir(&w.shadow).unwrap().count(),
        0,
        "wrote into another user's directory"
    );
}
