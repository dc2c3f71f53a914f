//! Shadows are private to their user and never stale: a file changed or
//! recreated behind the shim's back is not served from an old shadow. A
//! shadow that cannot be had safely means a direct mapping, with a warning,
//! and nothing lost.

use crate::common::*;
use crate::{zeros, PAGE};

#[test]
fn shadow_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new("perm");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 x
         kill",
        f = s(&f)
    )));
    let dmode = std::fs::metadata(&w.shadow).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    for n in w.shadow_files() {
        let m = std::fs::metadata(w.shadow.join(&n))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, 0o600, "{n}");
    }
}

#[test]
fn unsafe_shadow_dir_falls_back_to_direct_mapping_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    // Emulated pmem falls back by itself; on a real DAX file (the suite in
    // the DAX guest) only when told to (realdax: it fails otherwise).
    let w = World::new("baddir").env("DAXSHIM_FALLBACK", "direct");
    std::fs::create_dir_all(&w.shadow).unwrap();
    std::fs::set_permissions(&w.shadow, std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = w.pmem_file("f", &zeros(PAGE));
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         store 3 fallback
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    assert!(
        err.contains("daxshim") && err.contains("must not be accessible"),
        "{err}"
    );
    // Direct: the store is in the backing, nothing was lost.
    assert!(contains(&backing(&f), "fallback"));
}

// A shadow that cannot be created (here: the file size limit, 8 KiB in
// dash's 512-byte blocks, lets the header be made but makes growing the
// data fail, as a full /dev/shm would) falls back to the direct
// mapping with a warning: nothing is lost.
#[test]
fn shadow_creation_failure_falls_back_to_direct_mapping() {
    // Emulated pmem falls back by itself; on a real DAX file (the suite in
    // the DAX guest) only when told to (realdax: it fails otherwise).
    let w = World::new("nospace").env("DAXSHIM_FALLBACK", "direct");
    let f = w.pmem_file("f", &zeros(64 * PAGE));
    let mut c = w.shim_cmd("sh");
    c.arg("-c")
        .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\"")
        .arg(probe())
        .args(script_args(&format!(
            "open {f} rw
             map 262144
             store 200000 stillsafe
             kill",
            f = s(&f)
        )));
    let o = run(c);
    let err = stderr(&o);
    killed(o);
    assert!(err.contains("mapping the file directly"), "{err}");
    w.drop_shadows();
    assert!(contains(&backing(&f), "stillsafe"));
}

#[test]
fn file_rewritten_behind_the_shims_back_is_not_served_stale() {
    let w = World::new("stale");
    let f = w.pmem_file("f", &zeros(PAGE));
    // A reader dies, leaving a clean shadow behind.
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         load 0 1
         kill",
        f = s(&f)
    )));
    assert!(!w.shadow_files().is_empty());
    // Rewritten without the shim.
    std::fs::write(&f, b"rewritten-by-another-program").unwrap();
    let out = ok(w.probe(&format!(
        "open {f} rw
         map 4096
         load 0 9
         pread 0 9",
        f = s(&f)
    )));
    assert!(
        out.contains("load: rewritten") && out.contains("pread: rewritten"),
        "{out}"
    );
}

#[test]
fn unsynced_shadow_of_a_rewritten_file_is_kept_aside_not_served() {
    let w = World::new("orphan");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 unsynced
         kill",
        f = s(&f)
    )));
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&f, b"external").unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         load 0 8",
        f = s(&f)
    ));
    let err = stderr(&o);
    let out = ok(o);
    assert!(out.contains("load: external"), "{out}");
    assert!(err.contains("orphan"), "{err}");
    assert!(w.shadow_files().iter().any(|n| n.contains(".orphan-")));
}

#[test]
fn recreated_file_never_meets_the_old_shadow() {
    let w = World::new("recreate");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 oldfile
         kill",
        f = s(&f)
    )));
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, zeros(PAGE)).unwrap();
    let out = ok(w.probe(&format!(
        "open {f} rw
         map 4096
         load 0 7",
        f = s(&f)
    )));
    assert!(!out.contains("oldfile"), "{out}");
}

// A shadow left by another version of the shim (its header's version
// differs; its slots cannot be read) that holds data is kept aside as an
// orphan with a warning, never dropped or served.
#[test]
fn a_shadow_of_another_version_is_kept_aside() {
    let w = World::new("oldversion");
    let f = w.pmem_file("f", &zeros(PAGE));
    killed(w.probe(&format!(
        "open {f} rw
         map 4096
         store 0 unsynced
         kill",
        f = s(&f)
    )));
    let meta = w
        .shadow_files()
        .into_iter()
        .find(|n| n.ends_with(".meta"))
        .expect("a header");
    let meta = w.shadow.join(meta);
    let mut h = std::fs::read(&meta).unwrap();
    // The version field follows the 8-byte magic.
    h[8..12].copy_from_slice(&4u32.to_ne_bytes());
    std::fs::write(&meta, &h).unwrap();
    let o = w.probe(&format!(
        "open {f} rw
         map 4096
         load 0 8
         exit",
        f = s(&f)
    ));
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("another version"), "{err}");
    assert!(!out.contains("unsynced"), "served the old shadow: {out}");
    assert!(
        w.shadow_files().iter().any(|n| n.contains(".orphan-")),
        "{:?}",
        w.shadow_files()
    );
}

// A shadow directory on a disk file system: userfaultfd cannot fill
// shadows lazily there, so each is filled whole when mapped — said once per
// process, not once per mapping — and every store still reaches the file.
#[test]
fn a_shadow_directory_off_shared_memory_is_said_once_and_works() {
    // (In the DAX guest /tmp is tmpfs and the repository a 9p share: the
    // DAX file system itself serves as the disk file system there.)
    let parent = real_dax_dir().unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
    let dir = parent.join(format!("daxshim-diskshadow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir.parent().unwrap())
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&fs.stdout).trim(),
        "tmpfs",
        "this test needs a target directory off tmpfs"
    );
    let w = World::new("diskshadow").env("DAXSHIM_SHADOW_DIR", s(&dir));
    let f = w.pmem_file("f", &zeros(512 * PAGE));
    let o = w.probe(&format!(
        "open {f} rw
         map 2097152
         store 100 first
         msync
         munmap
         map 2097152
         store 1500000 second
         msync
         kill",
        f = s(&f)
    ));
    let err = stderr(&o);
    killed(o);
    // The killed process left its shadow there: it was shadowed.
    let left = std::fs::read_dir(&dir).map_or(0, |d| d.count());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(left > 0, "no shadow was made in {}", dir.display());
    // Said where lazy filling would otherwise be tried: the default
    // (userfaultfd) tracker; the mprotect and compare trackers never fill
    // lazily, so they have nothing to say.
    let lazy_tracker = std::env::var("DAXSHIM_TEST_TRACKER").is_err();
    let said = err.matches("is not on tmpfs").count();
    assert_eq!(said, usize::from(lazy_tracker), "{err}");
    assert!(!err.contains("cannot watch a lazy mapping"), "{err}");
    let b = backing(&f);
    assert!(contains(&b[..200], "first") && contains(&b[1_400_000..], "second"));
}
