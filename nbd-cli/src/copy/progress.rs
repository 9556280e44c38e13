//! `--progress`: a bar with rate and time left on a terminal, or nbdcopy's
//! machine-readable `N/100` lines on a descriptor the caller opened.
//!
//! Workers only add to one atomic counter; a reporter thread samples it ten
//! times a second, so progress costs the copy nothing measurable.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes, as `-p` / `--progress[=FD]` asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A bar on standard error, drawn only when it is a terminal.
    Terminal,
    /// `N/100` lines written to this inherited descriptor.
    Descriptor(RawFd),
}

/// Parses the value of `--progress=`: a descriptor number.
pub fn parse_descriptor(text: &str) -> Result<RawFd, String> {
    match text.parse::<RawFd>() {
        Ok(fd) if fd >= 0 => Ok(fd),
        _ => Err(format!(
            "--progress takes a file descriptor number, not {text:?}"
        )),
    }
}

/// Bytes of the copy finished so far, shared by the workers.
#[derive(Debug, Default)]
pub struct Counter {
    done: AtomicU64,
    over: AtomicBool,
}

impl Counter {
    /// Adds `n` finished bytes.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes finished so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Tells the reporter that the copy is over.
    pub fn finish(&self) {
        self.over.store(true, Ordering::Release);
    }

    fn is_over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }
}

/// The whole percentage of `done` out of `total`, 100 for an empty copy.
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 100;
    }
    (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
}

/// A descriptor the user handed over for progress lines.
pub struct Lines {
    out: File,
    last: Option<u64>,
}

impl Lines {
    /// Writes progress lines to `fd`, which must be open. A duplicate is
    /// written to, so `fd` itself (standard error, say) stays open after.
    pub fn open(fd: RawFd) -> io::Result<Lines> {
        // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; a bad
        // number is an error return (EBADF), not undefined behaviour.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup == -1 {
            return Err(io::Error::other(format!(
                "--progress={fd}: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: `dup` was just created here and nothing else owns it.
        let out = unsafe { File::from_raw_fd(dup) };
        Ok(Lines { out, last: None })
    }

    /// Writes `N/100` if the percentage changed since the last line.
    fn show(&mut self, percent: u64) {
        if self.last != Some(percent) {
            self.last = Some(percent);
            // A reader that went away must not fail the copy itself.
            let _ = writeln!(self.out, "{percent}/100");
        }
    }
}

/// Runs until `counter` is finished (unpark this thread after finishing it,
/// so the last state shows at once), showing `counter`'s progress out of
/// `total` bytes (`None`: a stream of unknown length, shown as bytes and rate
/// only) on `target`; ends with the final state (100% on success).
pub fn report(target: Target, total: Option<u64>, counter: &Counter, lines: Option<Lines>) {
    match (target, total, lines) {
        (Target::Terminal, Some(total), _) => bar(total, counter),
        (Target::Terminal, None, _) => spinner(counter),
        (Target::Descriptor(_), Some(total), Some(lines)) => descriptor(total, counter, lines),
        // A stream of unknown length has no percentage to write.
        (Target::Descriptor(_), _, _) => while tick(counter) {},
    }
}

/// Waits a tenth of a second, or less if the copy ends (its end unparks
/// the reporter thread); whether the copy is still running.
fn tick(counter: &Counter) -> bool {
    if !counter.is_over() {
        std::thread::park_timeout(Duration::from_millis(100));
    }
    !counter.is_over()
}

fn descriptor(total: u64, counter: &Counter, mut lines: Lines) {
    lines.show(percent(counter.done(), total));
    while tick(counter) {
        lines.show(percent(counter.done(), total));
    }
    lines.show(percent(counter.done(), total));
}

fn bar(total: u64, counter: &Counter) {
    if !io::stderr().is_terminal() {
        // Nothing to draw on; wait so the caller's join has one meaning.
        while tick(counter) {}
        return;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{percent:>3}% [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>-");
    bar.set_style(style);
    while tick(counter) {
        bar.set_position(counter.done().min(total));
    }
    bar.set_position(counter.done().min(total));
    if counter.done() >= total {
        bar.finish();
    } else {
        bar.abandon();
    }
}

/// Bytes and rate for a copy of unknown length.
fn spinner(counter: &Counter) {
    if !io::stderr().is_terminal() {
        while tick(counter) {}
        return;
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    spinner.set_style(style);
    while tick(counter) {
        spinner.set_position(counter.done());
    }
    spinner.set_position(counter.done());
    spinner.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_are_whole_and_bounded() {
        assert_eq!(percent(0, 10), 0);
        assert_eq!(percent(5, 10), 50);
        assert_eq!(percent(9, 10), 90);
        assert_eq!(percent(10, 10), 100);
        assert_eq!(percent(20, 10), 100);
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX - 1, u64::MAX), 99);
    }

    #[test]
    fn descriptors_are_numbers() {
        assert_eq!(parse_descriptor("3"), Ok(3));
        assert!(parse_descriptor("-1").is_err());
        assert!(parse_descriptor("x").is_err());
    }
}
