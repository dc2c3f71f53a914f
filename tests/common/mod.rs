//! Test helpers: find the built library, build the C examples, make
//! isolated pmem and shadow directories, run programs with LD_PRELOAD set on
//! the child only, each with a timeout and in a working directory of its
//! test's own (`command_in`: every child process starts there).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// target/<profile>/ of this test binary.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// A path as the `&str` a command line or a probe script wants.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every child process of the suite is created here, in `cwd`: a test's
/// own temporary directory (`World::cwd`). `cargo test` runs the tests in
/// the source tree, so a child that writes to a relative path (a fuzzed
/// `DAXSHIM_STATS` value, a database name) would otherwise leave the file
/// there. `run` refuses a command without a working directory.
pub fn command_in(prog: impl AsRef<OsStr>, cwd: &Path) -> Command {
    let mut c = Command::new(prog);
    c.current_dir(cwd);
    c
}

pub fn lib() -> PathBuf {
    let p = target_dir().join("libdaxshim.so");
    assert!(p.is_file(), "{} not built", p.display());
    p
}

/// Compiles examples/c/NAME.c once per test binary.
pub fn c_example(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut b = built.lock().unwrap();
    let out_dir = target_dir().join("c-examples");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/c/{name}.c"));
    let fresh = |o: &Path| {
        let (Ok(a), Ok(b)) = (std::fs::metadata(o), std::fs::metadata(&src)) else {
            return false;
        };
        a.modified().ok() > b.modified().ok()
    };
    if !b.iter().any(|n| n == name) && !fresh(&out) {
        let tmp = out_dir.join(format!("{name}.{}.tmp", std::process::id()));
        let st = command_in("gcc", &out_dir)
            .args(["-O2", "-Wall", "-D_GNU_SOURCE", "-I"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .arg("-lpthread")
            .status()
            .expect("gcc");
        assert!(st.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    if !b.iter().any(|n| n == name) {
        b.push(name.to_string());
    }
    out
}

pub fn probe() -> PathBuf {
    c_example("probe")
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// An isolated world: a pmem directory, an ordinary directory, a shadow
/// directory, the working directory of its processes. Removed on drop.
pub struct World {
    pub root: PathBuf,
    pub pmem: PathBuf,
    pub plain: PathBuf,
    pub shadow: PathBuf,
    /// Every process of this world starts here (`World::cmd`).
    pub cwd: PathBuf,
    pub extra_env: Vec<(String, String)>,
}

/// In the real-DAX VM: the DAX mount the pmem directories go under. The
/// shim then finds pmem by itself (no DAXSHIM_PMEM).
pub fn real_dax_dir() -> Option<PathBuf> {
    std::env::var_os("DAXSHIM_TEST_DAX_DIR").map(PathBuf::from)
}

impl World {
    pub fn new(tag: &str) -> World {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{tag}-{}-{n}", std::process::id());
        let root = std::env::temp_dir().join(format!("daxshim-test-{id}"));
        assert!(
            !s(&root).contains(char::is_whitespace),
            "probe scripts are split at whitespace: {}",
            root.display()
        );
        let _ = std::fs::remove_dir_all(&root);
        let pmem = match real_dax_dir() {
            Some(d) => d.join(format!("daxshim-test-{id}")),
            None => root.join("pmem"),
        };
        let _ = std::fs::remove_dir_all(&pmem);
        let plain = root.join("plain");
        let cwd = root.join("cwd");
        std::fs::create_dir_all(&pmem).unwrap();
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        let shadow = PathBuf::from(format!("/dev/shm/daxshim-test-{id}"));
        let _ = std::fs::remove_dir_all(&shadow);
        World {
            root,
            pmem,
            plain,
            shadow,
            cwd,
            extra_env: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> World {
        self.extra_env.push((k.into(), v.into()));
        self
    }

    pub fn pmem_file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.pmem.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn plain_file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.plain.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Power failure: every volatile byte of the shim is gone.
    pub fn drop_shadows(&self) {
        let _ = std::fs::remove_dir_all(&self.shadow);
    }

    pub fn shadow_files(&self) -> Vec<String> {
        match std::fs::read_dir(&self.shadow) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn stats_pattern(&self) -> String {
        format!("{}/stats-%p.json", self.root.display())
    }

    /// A command without the shim, run in this world's working directory.
    pub fn cmd(&self, prog: impl AsRef<OsStr>) -> Command {
        command_in(prog, &self.cwd)
    }

    /// A command with the shim preloaded on the child only.
    pub fn shim_cmd(&self, prog: impl AsRef<OsStr>) -> Command {
        let mut c = self.cmd(prog);
        c.env("LD_PRELOAD", lib());
        if real_dax_dir().is_none() {
            c.env("DAXSHIM_PMEM", &self.pmem);
        } else {
            c.env_remove("DAXSHIM_PMEM");
        }
        c.env("DAXSHIM_SHADOW_DIR", &self.shadow)
            .env("DAXSHIM_STATS", self.stats_pattern())
            .env_remove("DAXSHIM_DAX")
            .env_remove("DAXSHIM_TRACKER")
            .env_remove("DAXSHIM_LOG")
            // The suite's own knobs are not the shim's.
            .env_remove("DAXSHIM_TEST_DAX_DIR")
            .env_remove("DAXSHIM_TEST_TRACKER")
            .env_remove("DAXSHIM_TEST_WRITEBACK")
            .env_remove("DAXSHIM_TEST_SYSCALLS")
            .env_remove("DAXSHIM_TEST_TRAP_MIN")
            .env_remove("DAXSHIM_SYSCALLS")
            .env_remove("DAXSHIM_TRAP_MIN")
            .env_remove("DAXSHIM_CRASH_ITERS");
        // The whole suite can run on the full-compare oracle.
        if let Ok(t) = std::env::var("DAXSHIM_TEST_TRACKER") {
            c.env("DAXSHIM_TRACKER", t);
        }
        // …with every system call outside the hooks trapped…
        if let Ok(t) = std::env::var("DAXSHIM_TEST_SYSCALLS") {
            c.env("DAXSHIM_SYSCALLS", t);
        }
        // …with every shadow mapping's regions trapped (DAXSHIM_TRAP_MIN=0)…
        if let Ok(t) = std::env::var("DAXSHIM_TEST_TRAP_MIN") {
            c.env("DAXSHIM_TRAP_MIN", t);
        }
        // …and with emulated pmem written back the way real pmem is.
        if let Ok(t) = std::env::var("DAXSHIM_TEST_WRITEBACK") {
            c.env("DAXSHIM_WRITEBACK", t);
        }
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// The probe under the shim with this script, not started yet (for a
    /// test that does something while it runs).
    pub fn probe_cmd(&self, script: impl ProbeArgs) -> Command {
        let mut c = self.shim_cmd(probe());
        c.args(script.into_probe_args());
        c
    }

    /// Runs the probe under the shim.
    pub fn probe(&self, script: impl ProbeArgs) -> Output {
        run(self.probe_cmd(script))
    }

    /// Runs the probe without the shim (the kernel page cache reference).
    pub fn probe_plain(&self, script: impl ProbeArgs) -> Output {
        let mut c = self.cmd(probe());
        c.args(script.into_probe_args());
        run(c)
    }

    /// Runs one probe script on `pmem_file` under the shim and on
    /// `plain_file` without it, `{f}` standing for the file: both must exit
    /// 0 with the same output (the kernel page cache is the reference),
    /// which is returned.
    pub fn probe_both(&self, pmem_file: &Path, plain_file: &Path, script: &str) -> String {
        let on = |f: &Path| script.replace("{f}", s(f));
        let shim = ok(self.probe(&on(pmem_file)));
        let plain = ok(self.probe_plain(&on(plain_file)));
        assert_eq!(shim, plain, "shim vs kernel page cache for: {script}");
        shim
    }

    /// [`World::probe_both`] on a file `f` of `len` zero bytes made on pmem
    /// and on an ordinary file system; the two files must end up equal.
    /// Returns the output and the pmem file.
    pub fn probe_both_on_zeros(&self, len: usize, script: &str) -> (String, PathBuf) {
        let pf = self.pmem_file("f", &vec![0u8; len]);
        let of = self.plain_file("f", &vec![0u8; len]);
        let out = self.probe_both(&pf, &of, script);
        assert_eq!(
            backing(&pf),
            backing(&of),
            "pmem file vs ordinary file: {script}"
        );
        (out, pf)
    }

    /// Every stats file written so far, parsed into (key, value) maps.
    pub fn stats(&self) -> Vec<Stats> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.root).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("stats-") {
                v.push(Stats::parse(&std::fs::read_to_string(e.path()).unwrap()));
            }
        }
        v
    }

    pub fn clear_stats(&self) {
        for e in std::fs::read_dir(&self.root).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("stats-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The sum of one counter over all stats files.
    pub fn stat_sum(&self, key: &str) -> u64 {
        self.stats().iter().map(|s| s.get(key)).sum()
    }

    /// Fails unless the shim shadowed at least one mapping in this world
    /// (a test that would pass without the shim proves nothing).
    pub fn assert_shadowed(&self) {
        assert!(
            self.stat_sum("mappings_shadowed") >= 1,
            "the shim shadowed nothing: was it loaded?"
        );
    }

    /// The tracker the shim chose (from the stats files).
    pub fn tracker(&self) -> String {
        self.stats()
            .first()
            .map(|s| s.text("tracker"))
            .expect("no stats file")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.pmem);
        let _ = std::fs::remove_dir_all(&self.shadow);
    }
}

/// A probe script as the probe's arguments. The script reads as a small
/// program: one command per line, or several on a line separated by ` , `
/// (the probe's separator, which this puts between lines); arguments are
/// split at whitespace, so none can hold a space.
///
/// ```text
/// open /tmp/…/f rw
/// map 8192
/// store 100 hello , msync
/// kill
/// ```
pub fn script_args(script: &str) -> Vec<String> {
    let mut args = Vec::new();
    for line in script.lines() {
        let mut words = line.split_whitespace().peekable();
        if words.peek().is_none() {
            continue;
        }
        if !args.is_empty() {
            args.push(",".to_string());
        }
        args.extend(words.map(String::from));
    }
    args
}

/// What `World::probe` takes: a script (`script_args`), or the probe's
/// argument list as it is.
pub trait ProbeArgs {
    fn into_probe_args(self) -> Vec<String>;
}

impl ProbeArgs for &str {
    fn into_probe_args(self) -> Vec<String> {
        script_args(self)
    }
}

impl ProbeArgs for &String {
    fn into_probe_args(self) -> Vec<String> {
        script_args(self)
    }
}

impl ProbeArgs for &[&str] {
    fn into_probe_args(self) -> Vec<String> {
        self.iter().map(|a| a.to_string()).collect()
    }
}

impl<const N: usize> ProbeArgs for &[&str; N] {
    fn into_probe_args(self) -> Vec<String> {
        self.as_slice().into_probe_args()
    }
}

pub struct Stats(Vec<(String, String)>);

impl Stats {
    pub fn parse(s: &str) -> Stats {
        let body = s.trim().trim_start_matches('{').trim_end_matches('}');
        Stats(
            body.split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once(':')?;
                    Some((
                        k.trim().trim_matches('"').to_string(),
                        v.trim().trim_matches('"').to_string(),
                    ))
                })
                .collect(),
        )
    }

    pub fn text(&self, k: &str) -> String {
        self.0
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in stats"))
    }

    pub fn get(&self, k: &str) -> u64 {
        self.0
            .iter()
            .find(|(kk, _)| kk == k)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no integer {k} in stats"))
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a command with a timeout (a deadlock is a failure), capturing output.
pub fn run(mut c: Command) -> Output {
    assert!(
        c.get_current_dir().is_some(),
        "{c:?} has no working directory of its own: build it with World::cmd, \
         World::shim_cmd or command_in"
    );
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "timed out after {TIMEOUT:?}: {c:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean exit and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "status {:?} (signal {:?})\nstdout: {}\nstderr: {}",
        o.status.code(),
        o.status.signal(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts the process died of SIGKILL (the script's `kill`).
pub fn killed(o: Output) -> String {
    assert_eq!(
        o.status.signal(),
        Some(libc_sigkill()),
        "expected SIGKILL; status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn libc_sigkill() -> i32 {
    9
}

/// Reads a file the way a process without the shim would.
pub fn backing(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Waits until `p` exists.
pub fn wait_for(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < TIMEOUT, "waiting for {}", p.display());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The Python interpreter itself (not a version-manager wrapper script,
/// which would start many processes under the shim).
pub fn python() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let o = command_in("python3", &std::env::temp_dir())
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3");
        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
    })
    .clone()
}

/// Iterations of a crash test: `DAXSHIM_CRASH_ITERS` for a long run.
pub fn crash_iters(default: u64) -> u64 {
    std::env::var("DAXSHIM_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seeded xorshift generator: the same choices on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
