//! Progress bars on stderr, drawn only when stderr is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: ProgressBar,
    /// Drawn once the run has lasted this long (`None`: never; hidden or
    /// already drawn).
    show_after: Option<Duration>,
    start: Instant,
}

impl Progress {
    /// A bar of `len` steps, `what` before it and `msg` after it. It
    /// appears once the run has lasted `after` (zero: at once), and only
    /// when stderr is a terminal.
    pub fn new(len: u64, what: &str, msg: &'static str, after: Duration) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        let style =
            ProgressStyle::with_template("{prefix} [{bar:24}] {pos}/{len} {msg} ({elapsed})")
                .expect("valid template")
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("daxshim {what}"));
        bar.set_message(msg);
        let p = Progress {
            bar,
            show_after: std::io::stderr().is_terminal().then_some(after),
            start: Instant::now(),
        };
        p.maybe_show();
        p
    }

    /// Is the bar on the terminal (else the caller prints its own lines)?
    pub fn drawn(&self) -> bool {
        !self.bar.is_hidden()
    }

    fn maybe_show(&self) {
        if let Some(after) = self.show_after {
            if self.bar.is_hidden() && self.start.elapsed() >= after {
                self.bar.set_draw_target(ProgressDrawTarget::stderr());
            }
        }
    }

    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    pub fn inc(&self) {
        self.bar.inc(1);
        self.maybe_show();
    }

    /// Prints a line on stdout without tearing the bar.
    pub fn println(&self, line: &str) {
        self.bar.suspend(|| println!("{line}"));
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
