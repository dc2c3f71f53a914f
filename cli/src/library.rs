//! Where libdaxshim.so is, wherever daxshim was installed.

use std::path::{Path, PathBuf};

/// `$DAXSHIM_LIB`; next to the executable; `../lib/` and `../lib/daxshim/`
/// beside it (the layout of `scripts/install.sh`).
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
    let candidates = [
        dir.join("libdaxshim.so"),
        dir.join("../lib/libdaxshim.so"),
        dir.join("../lib/daxshim/libdaxshim.so"),
        // `cargo install --path cli` copies only the executable: the source
        // tree's build, if it is still there.
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/release/libdaxshim.so"
        )),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p.clone()))
        .ok_or_else(|| {
            format!(
                "cannot find libdaxshim.so (looked in {}); set DAXSHIM_LIB",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
