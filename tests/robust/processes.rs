//! New processes from a process with shadow mappings: `fork` during a
//! sync, `posix_spawn`, `vfork`, a daemon's double fork.

use crate::common::*;
use crate::hostile;

// fork while another thread is inside a sync: the child neither deadlocks
// nor loses its own sync.
#[test]
fn fork_while_another_thread_syncs() {
    let w = World::new("forksync");
    let f = w.pmem_file("f", &vec![0u8; 2 << 20]);
    let out = ok(hostile(&w, true, &["forksync", s(&f), "40"]));
    assert!(out.contains("ok forksync 40"), "{out}");
    w.drop_shadows();
    let b = backing(&f);
    for i in 0..40 {
        assert_eq!(
            b[(1 << 20) + 4096 * 3 + i],
            b'c',
            "child {i}'s msync did not persist"
        );
    }
    w.assert_shadowed();
}

// posix_spawn, subprocess (vfork), and daemon-style double fork from a
// process with shadow mappings: no deadlock, children run with or without
// the shim, the parent's stores survive.
#[test]
fn spawn_vfork_and_double_fork_with_shadow_mappings() {
    let script = r#"
import os, mmap, subprocess, sys
f = sys.argv[1]
fd = os.open(f, os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[0:6] = b"parent"
pid = os.posix_spawn("/bin/true", ["true"], os.environ)
assert os.waitpid(pid, 0)[1] == 0
env = dict(os.environ); env.pop("LD_PRELOAD", None)
assert subprocess.run(["/bin/true"], env=env).returncode == 0    # without the shim
assert subprocess.run(["/bin/true"]).returncode == 0             # with the shim
r, w = os.pipe()
if os.fork() == 0:                    # daemon(): fork, setsid, fork again
    os.setsid()
    if os.fork() == 0:
        m[10:16] = b"daemon"
        m.flush()
        os.write(w, b"x")
        os._exit(0)
    os._exit(0)
os.wait()
os.read(r, 1)
print(m[0:6], m[10:16])
m.flush()
"#;
    let w = World::new("spawn");
    let f = w.pmem_file("f", &[0u8; 4096]);
    let mut c = w.shim_cmd(python());
    c.args(["-c", script, s(&f)]);
    let out = ok(run(c));
    assert!(out.contains("b'parent' b'daemon'"), "{out}");
    w.drop_shadows();
    let b = backing(&f);
    assert!(contains(&b, "parent") && contains(&b, "daemon"));
    assert!(
        w.stats().len() >= 2,
        "parent and children ran without the shim"
    );
}

// Lazy fills (served in the faulting thread) racing what a program does
// around them: a first touch inside its own SIGALRM handler every 300 µs,
// another thread reading, a third replacing 4 MiB windows of the mapping
// with MAP_FIXED and reading them (the handler's table and views change
// under fills), forks whose children read the inherited mapping. Every
// page read must hold its own index; the backing must be unchanged after.
#[test]
fn lazy_fills_race_signal_handlers_forks_and_remaps() {
    let w = World::new("lazyrace");
    let mut content = vec![0u8; 64 << 20];
    for (i, p) in content.chunks_mut(4096).enumerate() {
        p[..8].copy_from_slice(&(i as u64).to_le_bytes());
        p[8..].fill((i % 251) as u8);
    }
    let f = w.pmem_file("f", &content);
    let out = ok(hostile(&w, true, &["lazyrace", s(&f), "1500"]));
    assert!(out.contains("ok lazyrace raced"), "{out}");
    let plain = w.plain_file("f", &content);
    let out = ok(hostile(&w, false, &["lazyrace", s(&plain), "300"]));
    assert!(out.contains("ok lazyrace"), "{out}");
    assert!(backing(&f) == content, "the backing changed");
    w.assert_shadowed();
}
