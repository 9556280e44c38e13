//! Errors, each with the errno-like kind that libnbd users look for.

use std::fmt;

use crate::opt::{NbdOption, OptionReplyError};
use crate::wire::consts;

/// The errno-like kind of an [`Error`], as libnbd's `nbd_get_errno` would report it.
///
/// [`Errno::raw`] gives the Linux number, so an adapter can turn an error into an
/// `std::io::Error` with the usual kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    /// `EPERM`: operation not permitted (for example a write to a read-only export).
    Perm,
    /// `ENOENT`: no such export.
    NoEnt,
    /// `EIO`: input/output error on the server.
    Io,
    /// `ENOMEM`: the server ran out of memory.
    NoMem,
    /// `EINVAL`: invalid argument.
    Inval,
    /// `ENOSPC`: no space left on the server.
    NoSpc,
    /// `ERANGE`: a request larger than allowed.
    Range,
    /// `EPROTO`: the server broke the protocol.
    Proto,
    /// `EOVERFLOW`: a value does not fit where it must go.
    Overflow,
    /// `ENOTSUP`: not supported by the server.
    NotSup,
    /// `ENOTCONN`: the connection is not (or no longer) usable.
    NotConn,
    /// `ESHUTDOWN`: the server or client is shutting down.
    Shutdown,
    /// `ETIMEDOUT`: a deadline passed (handshake, command or stall).
    TimedOut,
}

impl Errno {
    /// The Linux errno number.
    pub fn raw(self) -> i32 {
        match self {
            Errno::Perm => 1,
            Errno::NoEnt => 2,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Range => 34,
            Errno::Proto => 71,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::NotConn => 107,
            Errno::Shutdown => 108,
            Errno::TimedOut => 110,
        }
    }

    /// The symbolic name, such as `"EINVAL"`.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::NoEnt => "ENOENT",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Range => "ERANGE",
            Errno::Proto => "EPROTO",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::NotConn => "ENOTCONN",
            Errno::Shutdown => "ESHUTDOWN",
            Errno::TimedOut => "ETIMEDOUT",
        }
    }

    /// Maps an NBD error value from the wire. Unknown values count as `EINVAL`,
    /// as the protocol tells clients to treat them.
    pub fn from_nbd(value: u32) -> Errno {
        match value {
            consts::EPERM => Errno::Perm,
            consts::EIO => Errno::Io,
            consts::ENOMEM => Errno::NoMem,
            consts::ENOSPC => Errno::NoSpc,
            consts::EOVERFLOW => Errno::Overflow,
            consts::ENOTSUP => Errno::NotSup,
            consts::ESHUTDOWN => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }

    /// The NBD wire value for this kind, for fake servers (`EINVAL` where NBD has none).
    pub fn to_nbd(self) -> u32 {
        match self {
            Errno::Perm => consts::EPERM,
            Errno::Io => consts::EIO,
            Errno::NoMem => consts::ENOMEM,
            Errno::NoSpc => consts::ENOSPC,
            Errno::Overflow => consts::EOVERFLOW,
            Errno::NotSup => consts::ENOTSUP,
            Errno::Shutdown => consts::ESHUTDOWN,
            _ => consts::EINVAL,
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Text that came from the server, shown with control characters and quotes escaped
/// so a hostile server cannot forge terminal output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerText(pub String);

impl fmt::Display for ServerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_debug())
    }
}

/// Every error of the crate.
///
/// Errors are values, never panics. [`Error::errno`] gives the errno-like kind.
/// Connection-level errors are sticky: once one happens, every later call on the
/// connection returns a clone of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something invalid; nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The call is not allowed in the connection's current phase.
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// The server did not advertise what the call needs; nothing was sent.
    #[error("not supported by the server: {0}")]
    NotSupported(String),
    /// A write-like command on a read-only export; nothing was sent.
    #[error("export is read-only: {0}")]
    ReadOnly(String),
    /// A request larger than the server or the protocol allows; nothing was sent.
    #[error("request too large: {0}")]
    TooLarge(String),
    /// A value does not fit (export size above `i64::MAX`, for example).
    #[error("value overflows: {0}")]
    Overflow(String),
    /// The server failed a command with an NBD error.
    #[error("server error {errno}{}", .message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Server {
        /// The error kind the server sent.
        errno: Errno,
        /// The message of a structured error chunk, if any.
        message: Option<ServerText>,
    },
    /// The server refused an option with an `NBD_REP_ERR_*` reply.
    ///
    /// ```
    /// use nbd_proto::{Errno, Error, NbdOption, OptionReplyError, ServerText};
    /// let e = Error::OptionRefused {
    ///     option: NbdOption::Go,
    ///     reply: OptionReplyError::Unknown,
    ///     message: ServerText("no such export".into()),
    /// };
    /// assert_eq!(e.errno(), Errno::NoEnt);
    /// assert_eq!(e.to_string(), "server refused NBD_OPT_GO: NBD_REP_ERR_UNKNOWN: \"no such export\"");
    /// ```
    #[error("server refused {option}: {reply}{}", if .message.0.is_empty() { String::new() } else { format!(": {}", .message) })]
    OptionRefused {
        /// The option refused.
        option: NbdOption,
        /// The error reply the server sent (`NBD_REP_ERR_*`).
        reply: OptionReplyError,
        /// The server's message.
        message: ServerText,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection is closed or dead; the command could not complete.
    #[error("not connected: {0}")]
    NotConnected(String),
    /// The command could not complete because the connection died; the error
    /// that killed it (a protocol violation, the server hanging up, a TLS
    /// failure) is kept as it is, for callers that match on it.
    ///
    /// ```
    /// use nbd_proto::{Errno, Error};
    /// let cause = Error::Protocol("bad reply magic".into());
    /// let lost = Error::ConnectionLost(Box::new(cause.clone()));
    /// assert_eq!(lost.errno(), Errno::NotConn);
    /// assert_eq!(lost.to_string(), "connection lost: protocol error: bad reply magic");
    /// assert!(matches!(lost, Error::ConnectionLost(c) if *c == cause));
    /// ```
    #[error("{}", lost_text(.0))]
    ConnectionLost(Box<Error>),
    /// The connection is shutting down (the server sent `ESHUTDOWN`, or a disconnect
    /// was requested); no new command can start.
    #[error("shutting down: {0}")]
    Shutdown(String),
    /// The TLS layer failed.
    #[error("TLS error: {0}")]
    Tls(String),
    /// A deadline passed: the handshake's, a command's, or the stall deadline
    /// (see [`Config::command_timeout`](crate::Config::command_timeout)).
    #[error("timed out: {0}")]
    TimedOut(String),
    /// Writes the server had acknowledged may not have reached stable
    /// storage: the connection that held them was lost before a flush, and
    /// they could not be written again on its successor. A flush or FUA
    /// write that would otherwise have reported them durable fails with this.
    ///
    /// ```
    /// use nbd_proto::{Errno, Error};
    /// let e = Error::WritesLost("over the replay budget".into());
    /// assert_eq!(e.errno(), Errno::Io);
    /// ```
    #[error("acknowledged writes may be lost: {0}")]
    WritesLost(String),
}

impl Error {
    /// The errno-like kind of this error.
    ///
    /// ```
    /// use nbd_proto::{Errno, Error};
    /// let e = Error::TooLarge("read of 128 MiB".into());
    /// assert_eq!(e.errno(), Errno::Range);
    /// assert_eq!(e.errno().raw(), 34);
    /// ```
    pub fn errno(&self) -> Errno {
        match self {
            Error::InvalidArgument(_) => Errno::Inval,
            Error::InvalidState(_) => Errno::Inval,
            Error::NotSupported(_) => Errno::NotSup,
            Error::ReadOnly(_) => Errno::Perm,
            Error::TooLarge(_) => Errno::Range,
            Error::Overflow(_) => Errno::Overflow,
            Error::Server { errno, .. } => *errno,
            Error::OptionRefused { reply, .. } => reply.errno(),
            Error::Protocol(_) => Errno::Proto,
            Error::NotConnected(_) | Error::ConnectionLost(_) => Errno::NotConn,
            Error::Shutdown(_) => Errno::Shutdown,
            Error::Tls(_) => Errno::Proto,
            Error::TimedOut(_) => Errno::TimedOut,
            Error::WritesLost(_) => Errno::Io,
        }
    }
}

/// How a command lost to a dead connection reads: the cause once, without
/// "not connected" said twice when the cause already says it.
fn lost_text(cause: &Error) -> String {
    match cause {
        Error::NotConnected(_) | Error::ConnectionLost(_) => cause.to_string(),
        other => format!("connection lost: {other}"),
    }
}

impl From<crate::wire::DecodeError> for Error {
    fn from(e: crate::wire::DecodeError) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// An [`Error`] as an `std::io::Error` of the matching kind, carrying the
/// error itself (recover it with `get_ref` and `downcast_ref`). Used by
/// [`Connection::read_from`](crate::Connection::read_from) and
/// [`Connection::write_to`](crate::Connection::write_to).
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind;
        let kind = match e.errno() {
            Errno::Inval => ErrorKind::InvalidInput,
            Errno::NotConn => ErrorKind::NotConnected,
            Errno::Proto => ErrorKind::InvalidData,
            Errno::NotSup => ErrorKind::Unsupported,
            Errno::Perm => ErrorKind::PermissionDenied,
            Errno::Shutdown => ErrorKind::ConnectionAborted,
            Errno::TimedOut => ErrorKind::TimedOut,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
