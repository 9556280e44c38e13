//! Errors of the blocking adapter: socket errors, protocol errors, bad URIs.

use nbd_proto::uri::UriError;
use nbd_proto::Errno;

/// An error from the blocking client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket failed (connect, read, write, poll).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The NBD layer failed: a caller error, a server error, a protocol violation.
    #[error("{0}")]
    Nbd(#[from] nbd_proto::Error),
    /// The URI could not be parsed.
    #[error("{0}")]
    Uri(#[from] UriError),
    /// The URI asks for something this adapter cannot do (TLS, vsock).
    #[error("unsupported URI: {0}")]
    Unsupported(String),
    /// No progress from the server within the time given.
    #[error("timed out")]
    TimedOut,
    /// Commands the caller never took the completions of failed (or were
    /// still in flight when the connection ended): returned by a graceful
    /// shutdown or flush, which must not report such work as done.
    #[error("{count} command(s) failed; the first: {first}")]
    CommandsFailed {
        /// How many failed.
        count: usize,
        /// Why the first of them failed.
        first: nbd_proto::Error,
    },
}

impl Error {
    /// The errno-like kind, as libnbd's `nbd_get_errno` would give it.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Nbd(e) | Error::CommandsFailed { first: e, .. } => Some(e.errno()),
            Error::Unsupported(_) => Some(Errno::NotSup),
            Error::Uri(_) => Some(Errno::Inval),
            Error::Io(_) | Error::TimedOut => None,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        match e {
            Error::Io(io) => io,
            Error::TimedOut => std::io::Error::new(ErrorKind::TimedOut, e),
            other => {
                let kind = match other.errno() {
                    Some(Errno::Inval) => ErrorKind::InvalidInput,
                    Some(Errno::Perm) => ErrorKind::PermissionDenied,
                    Some(Errno::NotSup) => ErrorKind::Unsupported,
                    Some(Errno::NotConn) => ErrorKind::NotConnected,
                    Some(Errno::NoEnt) => ErrorKind::NotFound,
                    _ => ErrorKind::Other,
                };
                std::io::Error::new(kind, other)
            }
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
