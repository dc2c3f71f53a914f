//! Builds the release libdaxshim.so (the workspace's root package, a
//! cdylib) so that the CLI can embed it: `cargo install --path cli` then
//! gives a `daxshim` that needs no build tree (see `src/library.rs`).
//!
//! The library is built by a nested cargo in a target directory of its own
//! under OUT_DIR: the outer cargo holds the lock of its own target
//! directory while build scripts run, so building into that one would wait
//! for ever. The result is copied to `$OUT_DIR/libdaxshim.so` and its
//! SHA-256 handed to the crate as `DAXSHIM_EMBEDDED_SHA256`.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set by cargo"))
}

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("cli/ lives in the daxshim repository")
        .to_path_buf();
    let out = PathBuf::from(env("OUT_DIR"));
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo::rerun-if-changed={}", root.join(p).display());
    }
    let built = build_library(&root, &out.join("lib-target"));
    let bytes =
        std::fs::read(&built).unwrap_or_else(|e| panic!("cannot read {}: {e}", built.display()));
    std::fs::write(out.join("libdaxshim.so"), &bytes).expect("writing OUT_DIR/libdaxshim.so");
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo::rustc-env=DAXSHIM_EMBEDDED_SHA256={hash}");
}

/// `cargo build --release --lib -p daxshim` into `target_dir`; returns the
/// path of the built library.
fn build_library(root: &Path, target_dir: &Path) -> PathBuf {
    let target = env("TARGET");
    let mut c = Command::new(env("CARGO"));
    c.current_dir(root)
        .args(["build", "--release", "--lib", "-p", "daxshim"])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        // `cargo clippy` runs the crates of the workspace through
        // clippy-driver; the embedded library is just built.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let mut dir = target_dir.to_path_buf();
    if target != env("HOST") {
        c.args(["--target", &target]);
        dir.push(&target);
    }
    let st = c
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build libdaxshim.so: {e}"));
    assert!(st.success(), "building libdaxshim.so failed ({st})");
    dir.join("release/libdaxshim.so")
}
