//! The runtime configuration: parsed once by the constructor, read-only
//! afterwards.

use crate::config::Config;
use crate::persist::FlushKind;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

pub struct Runtime {
    pub cfg: Config,
    pub flush: FlushKind,
    /// `st_dev` of each `DAXSHIM_PMEM` directory: a file on another device
    /// cannot be under one, so most files are ruled out without a readlink.
    pub pmem_devs: Vec<u64>,
    /// Devices mounted with `-o dax` / `dax=always` (every file there is DAX,
    /// even where statx does not say so).
    pub dax_devs: Vec<u64>,
    pub shadow_dir: String,
    /// Set once the shadow directory was found unusable (warned once).
    pub shadow_dir_bad: AtomicBool,
    /// Set once the shadow directory was found usable: later attaches do
    /// not check it again (until one finds it gone).
    pub shadow_dir_ok: AtomicBool,
}

pub static RT: OnceLock<Runtime> = OnceLock::new();

pub fn rt() -> &'static Runtime {
    RT.get()
        .expect("daxshim runtime used before initialisation")
}
