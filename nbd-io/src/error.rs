//! The one error type of the connection layer.

use std::io;

use nbd_proto::uri::UriError;
use nbd_proto::Errno;

/// Why reaching a server, or talking to it, failed.
///
/// Every error that comes from reaching a server names what was being
/// reached (the [`Target`](crate::Target) as text), so that a message read
/// on its own says where the problem is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting to the target failed (refused, unreachable, no such socket).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The target, as text.
        target: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The host name did not resolve, or resolved to no address.
    #[error("cannot resolve host name {host:?}: {source}")]
    Resolve {
        /// The host name as given.
        host: String,
        /// What the resolver said.
        #[source]
        source: io::Error,
    },
    /// The server program could not be started.
    #[error("cannot start server {program:?}: {source}")]
    Spawn {
        /// The program as given.
        program: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The URI is not a valid NBD URI.
    #[error("{0}")]
    Uri(#[from] UriError),
    /// The URI is valid but the [`UriPolicy`](crate::UriPolicy) in force refuses it.
    #[error("URI refused: {0}")]
    UriRefused(String),
    /// Something this build or platform cannot do (for example vsock where
    /// the kernel has no vsock support).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A socket failed after the connection was made.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The NBD layer failed: a caller error, a server error, a protocol violation.
    #[error("{0}")]
    Nbd(#[from] nbd_proto::Error),
    /// TLS could not be set up as asked: a certificate, key or PSK file that
    /// cannot be read or used, or a kind of TLS this build lacks. (A TLS
    /// failure on the wire is an [`Error::Nbd`] with `nbd_proto::Error::Tls`.)
    #[error("TLS: {0}")]
    Tls(String),
    /// A wait bounded by the caller ended first: a connect that did not
    /// finish by its deadline ([`connect_within`](crate::connect_within)).
    /// (A deadline of the NBD connection itself, such as a stall, is an
    /// [`Error::Nbd`] with `nbd_proto::Error::TimedOut`; both have the errno
    /// `ETIMEDOUT`.)
    #[error("timed out")]
    TimedOut,
    /// Commands whose completions the caller never took failed, or were still
    /// in flight when the connection ended: returned by a graceful shutdown,
    /// close or flush, which must not report such work as done.
    #[error("{count} command(s) failed; the first: {first}")]
    CommandsFailed {
        /// How many failed (or were abandoned in flight).
        count: usize,
        /// Why the first of them failed.
        first: nbd_proto::Error,
    },
}

impl Error {
    /// The errno-like kind, as libnbd's `nbd_get_errno` would give it; `None`
    /// for failures that only the operating system can classify (see
    /// [`Error::os_error`]).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Nbd(e) | Error::CommandsFailed { first: e, .. } => Some(e.errno()),
            Error::Uri(_) | Error::UriRefused(_) => Some(Errno::Inval),
            Error::Unsupported(_) => Some(Errno::NotSup),
            Error::Tls(_) => Some(Errno::Inval),
            Error::TimedOut => Some(Errno::TimedOut),
            Error::Connect { .. } | Error::Resolve { .. } | Error::Spawn { .. } | Error::Io(_) => {
                None
            }
        }
    }

    /// The operating system's error, where one caused this.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            Error::Connect { source, .. }
            | Error::Resolve { source, .. }
            | Error::Spawn { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    /// For callers that speak `std::io` (`Read`/`Write` over an export): the
    /// kind follows the errno (a command lost with a connection that timed
    /// out is `TimedOut`), and the error itself rides along.
    fn from(e: Error) -> Self {
        use io::ErrorKind;
        match e {
            Error::Io(io) => io,
            Error::TimedOut => io::Error::new(ErrorKind::TimedOut, e),
            // A command cut short by a connection that timed out (a stall or
            // handshake deadline) timed out too, as far as `std::io` can say.
            Error::Nbd(nbd_proto::Error::ConnectionLost(ref cause))
                if cause.errno() == Errno::TimedOut =>
            {
                io::Error::new(ErrorKind::TimedOut, e)
            }
            other => {
                let kind = match other.errno() {
                    Some(Errno::Inval) => ErrorKind::InvalidInput,
                    Some(Errno::Perm) => ErrorKind::PermissionDenied,
                    Some(Errno::NotSup) => ErrorKind::Unsupported,
                    Some(Errno::NotConn) => ErrorKind::NotConnected,
                    Some(Errno::NoEnt) => ErrorKind::NotFound,
                    Some(Errno::TimedOut) => ErrorKind::TimedOut,
                    _ => other.os_error().map_or(ErrorKind::Other, io::Error::kind),
                };
                io::Error::new(kind, other)
            }
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
