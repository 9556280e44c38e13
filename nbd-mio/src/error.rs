//! Errors of the mio adapter.

use nbd_proto::uri::UriError;
use nbd_proto::Errno;

/// An error from the mio adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket or the registry failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The NBD layer failed: a caller error, a server error, a protocol violation.
    #[error("{0}")]
    Nbd(#[from] nbd_proto::Error),
    /// The URI could not be parsed.
    #[error("{0}")]
    Uri(#[from] UriError),
    /// The URI asks for something this adapter cannot do (TLS, vsock).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Commands the caller never took the completions of failed, or were
    /// still in flight when the connection was closed: returned by `close`,
    /// which must not report such work as done.
    #[error("{count} command(s) failed; the first: {first}")]
    CommandsFailed {
        /// How many failed (or were abandoned in flight).
        count: usize,
        /// Why the first of them failed.
        first: nbd_proto::Error,
    },
}

impl Error {
    /// The errno-like kind, where the NBD layer gave one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Nbd(e) | Error::CommandsFailed { first: e, .. } => Some(e.errno()),
            Error::Unsupported(_) => Some(Errno::NotSup),
            Error::Uri(_) => Some(Errno::Inval),
            Error::Io(_) => None,
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
