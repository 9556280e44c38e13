//! `--timeout SECONDS`: how long `info`, `copy` and `dump` wait for a server.
//!
//! Without the option the command waits as long as the server takes: there
//! is no built-in limit. With it, the limit is the core's (see
//! `nbd_proto::Config`): it bounds connecting and the handshake together
//! (`handshake_timeout`), and how long the server may send nothing while
//! requests wait for replies (`stall_timeout`). A request the server is
//! working on and still answering around is never cut short.
//!
//! When a limit passes, the error is one line naming the side (the server,
//! the source, the destination) and what the command was waiting for.

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use nbd_blocking::Error;
use nbd_proto::{Config, Errno};

/// The `--timeout` option, shared by the subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct TimeoutArg {
    /// Give up when the server has not answered for SECONDS: while
    /// connecting and negotiating, or while requests wait for replies.
    /// Without it, wait as long as the server takes.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<Duration>,
}

/// The limit in force for this run of the command; set once by `main`.
static LIMIT: OnceLock<Option<Duration>> = OnceLock::new();

/// Sets the limit of this run (`--timeout`); later calls change nothing.
pub fn set(arg: &TimeoutArg) {
    let _ = LIMIT.set(arg.timeout);
}

fn limit() -> Option<Duration> {
    LIMIT.get().copied().flatten()
}

/// `config` with this run's limits: the handshake (connecting included) and
/// the stall timeout.
pub fn apply(config: Config) -> Config {
    match limit() {
        Some(t) => config.handshake_timeout(Some(t)).stall_timeout(Some(t)),
        None => config,
    }
}

/// A positive number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 1e9) {
        return Err(format!("the timeout must be more than 0 seconds, not {s}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Whether `e` is a limit of this run that passed (and not yet explained).
pub fn timed_out(e: &Error) -> bool {
    let lost_to_a_deadline = matches!(
        e,
        Error::Nbd(nbd_proto::Error::ConnectionLost(cause)) if cause.errno() == Errno::TimedOut
    );
    limit().is_some() && (e.errno() == Some(Errno::TimedOut) || lost_to_a_deadline)
}

/// `e`, as one line saying that `who` (a side, a server as the user named
/// it) did not answer within the limit while the command waited for `what`;
/// any other error unchanged.
pub fn explain(e: Error, who: &str, what: &str) -> Error {
    if !timed_out(&e) {
        return e;
    }
    let secs = limit().map_or(0.0, |t| t.as_secs_f64());
    Error::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "{who}: no answer from the server within {secs} s (--timeout) while waiting for {what}"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parse_with_fractions_and_refuse_nonsense() {
        assert_eq!(parse_seconds("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "x", "", "NaN", "inf"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
