//! Where libdaxshim.so is, wherever daxshim was installed.
//!
//! Lookup order: `$DAXSHIM_LIB`; next to the executable; `../lib/` and
//! `../lib/daxshim/` beside it (the layout of `scripts/install.sh`); else
//! the copy embedded in this executable at build time, written once to a
//! per-user cache directory under a name that carries its SHA-256, and
//! checked against that hash every time it is used.

use sha2::{Digest, Sha256};
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The release libdaxshim.so that `build.rs` built with this executable.
static EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libdaxshim.so"));
/// Its SHA-256, hex (computed by `build.rs`).
const EMBEDDED_SHA256: &str = env!("DAXSHIM_EMBEDDED_SHA256");

/// Finds the library, writing the embedded copy out when no installed one
/// is found.
pub fn find() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DAXSHIM_LIB") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("DAXSHIM_LIB={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let installed = [
        dir.join("libdaxshim.so"),
        dir.join("../lib/libdaxshim.so"),
        dir.join("../lib/daxshim/libdaxshim.so"),
    ];
    if let Some(p) = installed.iter().find(|p| p.is_file()) {
        return Ok(p.canonicalize().unwrap_or(p.clone()));
    }
    embedded_copy(&cache_dirs()).map_err(|e| {
        format!(
            "cannot find libdaxshim.so (looked in {}) nor write the embedded copy ({e}); set DAXSHIM_LIB",
            installed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// How much a cache directory must prove before a library in it is loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Trust {
    /// In the user's home: ours, not writable by others.
    Home,
    /// In a shared temporary directory: ours, mode 0700, not a symlink.
    Private,
}

/// `$XDG_CACHE_HOME/daxshim` or `~/.cache/daxshim`, then
/// `$TMPDIR/daxshim-<uid>` (TMPDIR defaults to /tmp).
fn cache_dirs() -> Vec<(PathBuf, Trust)> {
    let abs = |v: &str| {
        std::env::var_os(v)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let mut dirs = Vec::new();
    if let Some(x) = abs("XDG_CACHE_HOME") {
        dirs.push((x.join("daxshim"), Trust::Home));
    } else if let Some(h) = abs("HOME") {
        dirs.push((h.join(".cache/daxshim"), Trust::Home));
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    dirs.push((
        std::env::temp_dir().join(format!("daxshim-{uid}")),
        Trust::Private,
    ));
    dirs
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The file name of the embedded library in a cache directory.
fn cached_name() -> String {
    format!("libdaxshim-{}.so", &EMBEDDED_SHA256[..16])
}

/// The first cache directory that works, with the embedded library in it.
fn embedded_copy(dirs: &[(PathBuf, Trust)]) -> Result<PathBuf, String> {
    let mut errors = Vec::new();
    for (dir, trust) in dirs {
        match write_verified(dir, *trust, &cached_name(), EMBEDDED, EMBEDDED_SHA256) {
            Ok(p) => return Ok(p),
            Err(e) => errors.push(format!("{}: {e}", dir.display())),
        }
    }
    Err(errors.join("; "))
}

/// Creates `dir` if needed and checks that only we can change what is in it.
fn prepare_dir(dir: &Path, trust: Trust) -> Result<(), String> {
    let mut b = DirBuilder::new();
    b.mode(0o700).recursive(trust == Trust::Home);
    if let Err(e) = b.create(dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e.to_string());
        }
    }
    let md = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let open_to_others = match trust {
        Trust::Home => md.mode() & 0o022 != 0,
        Trust::Private => md.mode() & 0o077 != 0,
    };
    if !md.is_dir() {
        return Err("not a directory (or a symlink)".into());
    }
    if md.uid() != uid || open_to_others {
        return Err(format!(
            "refused: owned by uid {} with mode {:o}; must be ours and closed to others",
            md.uid(),
            md.mode() & 0o7777
        ));
    }
    if noexec(dir) {
        return Err("on a noexec file system (a library there cannot be loaded)".into());
    }
    Ok(())
}

fn noexec(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statvfs is valid output space.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and output pointer.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_flag & libc::ST_NOEXEC != 0
}

/// `dir/name` holding `bytes`: used as it is when its SHA-256 is `hash`,
/// else (re)written through a temporary file and a rename.
fn write_verified(
    dir: &Path,
    trust: Trust,
    name: &str,
    bytes: &[u8],
    hash: &str,
) -> Result<PathBuf, String> {
    prepare_dir(dir, trust)?;
    let path = dir.join(name);
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        if md.is_file() && std::fs::read(&path).is_ok_and(|b| sha256_hex(&b) == hash) {
            return Ok(path);
        }
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("daxshim-cli-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn embedded_library_matches_its_hash() {
        assert!(EMBEDDED.len() > 4096 && EMBEDDED.starts_with(b"\x7fELF"));
        assert_eq!(sha256_hex(EMBEDDED), EMBEDDED_SHA256);
    }

    #[test]
    fn writes_once_keeps_a_good_copy_and_replaces_a_bad_one() {
        let root = scratch("cache");
        let dir = root.join("a/b");
        let bytes = b"library bytes";
        let hash = sha256_hex(bytes);
        let p = write_verified(&dir, Trust::Home, "lib.so", bytes, &hash).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
        let ino = std::fs::metadata(&p).unwrap().ino();
        // A good copy is used as it is.
        let p2 = write_verified(&dir, Trust::Home, "lib.so", bytes, &hash).unwrap();
        assert_eq!(
            (p2.clone(), std::fs::metadata(&p2).unwrap().ino()),
            (p.clone(), ino)
        );
        // A damaged one is replaced by a new file (renamed over it).
        std::fs::write(&p, b"library bytez").unwrap();
        let p3 = write_verified(&dir, Trust::Home, "lib.so", bytes, &hash).unwrap();
        assert_eq!(std::fs::read(&p3).unwrap(), bytes);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temp file left"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_shared_directory_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = scratch("private");
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.join("daxshim-x");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = write_verified(&dir, Trust::Private, "l.so", b"x", &sha256_hex(b"x")).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        // A symlink to a private directory is refused too.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(write_verified(&link, Trust::Private, "l.so", b"x", &sha256_hex(b"x")).is_err());
        assert!(write_verified(&dir, Trust::Private, "l.so", b"x", &sha256_hex(b"x")).is_ok());
        // The first directory that fails is skipped.
        let not_a_dir = root.join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let dirs = [(not_a_dir, Trust::Home), (dir.clone(), Trust::Private)];
        let p = embedded_copy(&dirs).unwrap();
        assert_eq!(p, dir.join(cached_name()));
        assert_eq!(std::fs::read(&p).unwrap(), EMBEDDED);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
