//! Why a subcommand failed, and how `main` reports it.
//!
//! Two kinds of failure end a command differently. A failure on the NBD side
//! (connecting, the protocol, the server, a local file being copied) is one line
//! on standard error and exit code 1. A failure to write the report to standard
//! output is the reader's business: a reader that went away (`nbd info URI |
//! head -1`) ends the command quietly, as tools stopped by `SIGPIPE` do, while
//! any other write error (a full disk) is one line and exit code 1. They are
//! kept apart so that a server hanging up (also `EPIPE`, on the socket) is never
//! mistaken for a closed standard output.

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

/// Why a subcommand failed.
#[derive(Debug)]
pub enum Failure {
    /// The NBD side failed: connect, protocol, server, or a file being copied.
    Nbd(nbd_blocking::Error),
    /// Writing the report to standard output failed.
    Stdout(io::Error),
}

impl From<nbd_blocking::Error> for Failure {
    fn from(e: nbd_blocking::Error) -> Self {
        Failure::Nbd(e)
    }
}

impl From<nbd_proto::Error> for Failure {
    fn from(e: nbd_proto::Error) -> Self {
        Failure::Nbd(e.into())
    }
}

impl From<nbd_proto::uri::UriError> for Failure {
    fn from(e: nbd_proto::uri::UriError) -> Self {
        Failure::Nbd(e.into())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Nbd(e) => write!(f, "{e}"),
            Failure::Stdout(e) => write!(f, "error writing to standard output: {e}"),
        }
    }
}

impl Failure {
    /// A limit of `--timeout` that passed while talking to `server`, as one
    /// line saying what the command waited for; anything else unchanged.
    pub fn explain_timeout(self, server: &crate::operand::Operand, what: &str) -> Self {
        match self {
            Failure::Nbd(e) => Failure::Nbd(crate::deadline::explain(
                e,
                &format!("server {server}"),
                what,
            )),
            other => other,
        }
    }

    /// Prints the failure (unless the reader just went away) and gives the exit code.
    pub fn report(&self) -> ExitCode {
        match self {
            Failure::Stdout(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            other => {
                eprintln!("nbd: {other}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Writes `text` to standard output and flushes it, so that every write
/// error, the last one included, is seen here rather than lost at exit.
pub fn print(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Failure::Stdout)
}
