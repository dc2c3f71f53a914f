//! `daxshim`: run programs under libdaxshim.so, inspect and write back what
//! it left in the shadow directory, crash-test programs.
//!
//! This binary does not link the hook library: it finds it and puts it in
//! front of `LD_PRELOAD` for the commands it runs (`run`, `crashtest`, and
//! the helper `sync` uses). It shares only the header layout with it, and
//! carries a copy of the library's bytes for when none is installed
//! (`library.rs`).

mod commands;
mod crashtest;
mod library;
mod progress;
mod shadows;
mod statsview;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// Every help page: the usage line first, as the README shows them.
const HELP: &str = "\
usage: {usage}

{before-help}{all-args}{after-help}";

const MAIN_HELP: &str = "\
usage: {usage}

{about-with-newline}
commands:
{subcommands}

options:
{options}{after-help}";

#[derive(Parser, Debug)]
#[command(
    name = "daxshim",
    version,
    override_usage = "daxshim COMMAND [ARGS...]",
    about = "Runs programs under libdaxshim.so (page-cache semantics on pmem), inspects and
writes back what it left in the shadow directory, crash-tests programs.",
    help_template = MAIN_HELP,
    subcommand_help_heading = "commands",
    arg_required_else_help = true,
    after_help = "`daxshim COMMAND --help` describes each. Exit status: the command's own for
run; 0 success, 1 a check or operation failed, 125 daxshim itself failed."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    #[command(about = "run a command under the shim", help_template = HELP)]
    Run(RunArgs),
    #[command(about = "list this user's shadows and what they hold", help_template = HELP)]
    Status(commands::StatusArgs),
    #[command(about = "write back shadows whose writers are gone", help_template = HELP)]
    Sync(commands::SyncArgs),
    #[command(about = "finish or undo interrupted failure-atomic syncs (DAXSHIM_ATOMIC)", help_template = HELP)]
    Recover(commands::RecoverArgs),
    #[command(about = "remove the shadows of given files", help_template = HELP)]
    Drop(commands::DropArgs),
    #[command(about = "remove unused clean shadows and those of deleted files", help_template = HELP)]
    Gc(commands::GcArgs),
    #[command(about = "summarise DAXSHIM_STATS files", help_template = HELP)]
    Stats(statsview::StatsArgs),
    #[command(about = "kill a command at random moments, drop every shadow, check the files", help_template = HELP)]
    Crashtest(crashtest::CrashtestArgs),
    #[command(about = "print a shell completion script (bash, zsh, fish)", help_template = HELP)]
    Completions(CompletionsArgs),
}

/// `daxshim run`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim run [--pmem DIR]... [--dax | --dax-dir DIR...] [--atomic | --atomic-dir DIR...] [--stats FILE] [--log LEVEL] -- CMD [ARGS...]",
    before_help = "Runs CMD with libdaxshim.so prepended to LD_PRELOAD (what was there stays).",
    after_help = "The library is looked up in $DAXSHIM_LIB, next to this executable, and in
../lib/ and ../lib/daxshim/ relative to it; else the copy built into this
executable is written to ~/.cache/daxshim/ ($XDG_CACHE_HOME/daxshim/; if that
fails, $TMPDIR/daxshim-UID/) and used from there.

Exit status: CMD's own; 125 if daxshim itself failed; 126 if CMD cannot be
run; 127 if CMD was not found."
)]
struct RunArgs {
    /// Treat regular files under DIR as (emulated) pmem; repeatable
    #[arg(long, value_name = "DIR", value_parser = existing_dir)]
    pmem: Vec<String>,
    /// The whole command is DAX-aware: pmem files are mapped directly
    #[arg(long, conflicts_with = "dax_dir")]
    dax: bool,
    /// Files under DIR are mapped directly; repeatable
    #[arg(long, value_name = "DIR", value_parser = existing_dir)]
    dax_dir: Vec<String>,
    /// Failure-atomic sync for every pmem file: each sync commits everything
    /// since the previous one as one unit
    #[arg(long, conflicts_with = "atomic_dir")]
    atomic: bool,
    /// Failure-atomic sync for pmem files under DIR; repeatable
    #[arg(long, value_name = "DIR", value_parser = existing_dir)]
    atomic_dir: Vec<String>,
    /// Write the shim's counters as JSON at exit (%p = pid)
    #[arg(long, value_name = "FILE")]
    stats: Option<OsString>,
    /// The shim's diagnostics on stderr
    #[arg(long, value_name = "LEVEL")]
    log: Option<LogLevel>,
    /// The command to run, with its arguments
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// `daxshim completions SHELL`
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "daxshim completions bash|zsh|fish",
    before_help = "Prints a completion script for SHELL on stdout. For example:
  daxshim completions bash > ~/.local/share/bash-completion/completions/daxshim
  daxshim completions zsh > ~/.zfunc/_daxshim    (with ~/.zfunc in $fpath)
  daxshim completions fish > ~/.config/fish/completions/daxshim.fish"
)]
struct CompletionsArgs {
    #[arg(value_name = "SHELL")]
    shell: CompletionShell,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

pub(crate) fn fail(msg: &str) -> ExitCode {
    eprintln!("daxshim: {msg}");
    ExitCode::from(125)
}

/// Bytes for people.
pub(crate) fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// A `DIR` option: an existing directory, made absolute (the shim wants
/// absolute paths).
pub(crate) fn existing_dir(d: &str) -> Result<String, String> {
    let p = std::fs::canonicalize(d).map_err(|e| e.to_string())?;
    if !p.is_dir() {
        return Err("not a directory".into());
    }
    Ok(p.to_string_lossy().into_owned())
}

fn run(args: RunArgs) -> ExitCode {
    let lib = match library::find() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let cmd = &args.cmd;
    let mut preload = OsString::from(lib.as_os_str());
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]).env("LD_PRELOAD", preload);
    if !args.pmem.is_empty() {
        let mut v = args.pmem.join(":");
        if let Ok(old) = std::env::var("DAXSHIM_PMEM") {
            if !old.is_empty() {
                v = format!("{v}:{old}");
            }
        }
        c.env("DAXSHIM_PMEM", v);
    }
    if args.dax {
        c.env("DAXSHIM_DAX", "1");
    } else if !args.dax_dir.is_empty() {
        c.env("DAXSHIM_DAX", args.dax_dir.join(":"));
    }
    if args.atomic {
        c.env("DAXSHIM_ATOMIC", "1");
    } else if !args.atomic_dir.is_empty() {
        c.env("DAXSHIM_ATOMIC", args.atomic_dir.join(":"));
    }
    if let Some(s) = args.stats {
        c.env("DAXSHIM_STATS", s);
    }
    if let Some(l) = args.log {
        let v = l.to_possible_value().expect("no skipped levels");
        c.env("DAXSHIM_LOG", v.get_name());
    }
    let e = c.exec();
    eprintln!("daxshim: cannot run {}: {e}", cmd[0].to_string_lossy());
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn completions(args: CompletionsArgs) -> ExitCode {
    use clap_complete::Shell;
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "daxshim",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    // The helper process of `sync`, outside clap: not a command for people
    // (nor for their shell completions).
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == commands::ATTACH_HELPER) {
        return commands::attach_helper(&argv.map(PathBuf::from).collect::<Vec<_>>());
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            // Help and version are answers; every other parse error is a
            // bad option: 125, as documented (clap's own would be 2).
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(125),
            };
        }
    };
    match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Status(a) => commands::status(a),
        Cmd::Sync(a) => commands::sync(a),
        Cmd::Recover(a) => commands::recover(a),
        Cmd::Drop(a) => commands::drop(a),
        Cmd::Gc(a) => commands::gc(a),
        Cmd::Stats(a) => statsview::stats(a),
        Cmd::Crashtest(a) => crashtest::crashtest(a),
        Cmd::Completions(a) => completions(a),
    }
}
