//! What the connection reports, drained with [`Connection::poll_event`](crate::Connection::poll_event).

use bytes::BytesMut;

use crate::error::Error;
use crate::opt::NbdOption;
use crate::slab::Cookie;
use crate::wire::Extent;

/// Something the caller should know about, in the order it happened.
///
/// New kinds of event may be added, so a `match` needs a wildcard arm for the
/// events it does not handle.
///
/// ```
/// use nbd_proto::{Event, NbdOption};
/// fn describe(event: &Event) -> String {
///     match event {
///         Event::OptionDone { option: NbdOption::Go, result } => format!("GO: {result:?}"),
///         Event::Closed { error } => format!("closed: {error:?}"),
///         _ => String::from("something else"),
///     }
/// }
/// assert_eq!(describe(&Event::Ready), "something else");
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Opt mode: the connection waits for the caller's next `opt_*` call.
    Negotiating,
    /// Transmission phase reached; the export's information is available.
    Ready,
    /// One export listed by `opt_list`.
    Export {
        /// Export name.
        name: String,
        /// Description (may be empty).
        description: String,
    },
    /// One meta context listed by `opt_list_meta_context` (id 0) or selected
    /// by `opt_set_meta_context`.
    MetaContext {
        /// Context id, for matching block status replies.
        id: u32,
        /// Context name.
        name: String,
    },
    /// The extents of one context for a block status command.
    BlockStatus(BlockStatus),
    /// An `opt_*` call finished.
    OptionDone {
        /// Which option.
        option: NbdOption,
        /// Its outcome; the server's refusal arrives as [`Error::OptionRefused`].
        result: Result<(), Error>,
    },
    /// One piece of a read submitted with
    /// [`pread_structured`](crate::Connection::pread_structured).
    ReadChunk(ReadChunk),
    /// A command finished: exactly once for every cookie.
    Completed(Completion),
    /// The connection is over. `None` when it ended as asked (disconnect or abort).
    Closed {
        /// Why it ended, if not by request.
        error: Option<Error>,
    },
}

/// Extents reported for one meta context by a block status command.
///
/// Only the connection makes these; more fields may be added, so build
/// patterns with `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockStatus {
    /// The command's cookie.
    pub cookie: Cookie,
    /// The context id.
    pub context_id: u32,
    /// The context name.
    pub context: String,
    /// Extents from the request's offset on; the last may run past the request.
    pub extents: Vec<Extent>,
}

/// A finished command.
///
/// The connection makes these (layers above it may, with
/// [`Completion::new`]); more fields may be added, so build patterns with `..`.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion {
    /// The cookie its call returned.
    pub cookie: Cookie,
    /// Success, or why it failed. A failed read's buffer content is unspecified.
    pub result: Result<(), Error>,
    /// The caller's read buffer, handed back; `None` for other commands.
    pub buffer: Option<BytesMut>,
}

impl Completion {
    /// A completion made outside the connection, for layers above it that
    /// complete commands themselves (such as a reconnect journal that gives
    /// up on commands it kept back from a dead connection).
    pub fn new(cookie: Cookie, result: Result<(), Error>, buffer: Option<BytesMut>) -> Self {
        Completion {
            cookie,
            result,
            buffer,
        }
    }
}

/// One chunk of a structured read reply, as libnbd's `pread_structured` callback sees it.
///
/// New kinds of chunk may be added, so a `match` needs a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadChunk {
    /// Data for `offset..offset + length` is in the buffer.
    Data {
        /// The read's cookie.
        cookie: Cookie,
        /// Export offset of the data.
        offset: u64,
        /// Length of the data.
        length: u64,
    },
    /// `offset..offset + length` reads as zeroes (the buffer was zero-filled).
    Hole {
        /// The read's cookie.
        cookie: Cookie,
        /// Export offset of the hole.
        offset: u64,
        /// Length of the hole.
        length: u64,
    },
    /// The server reported an error for the read, at `offset` if it said where.
    Error {
        /// The read's cookie.
        cookie: Cookie,
        /// Export offset of the error, from `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
        /// The error.
        error: Error,
    },
}

impl ReadChunk {
    /// The cookie of the read this chunk belongs to; every kind of chunk has one.
    pub fn cookie(&self) -> Cookie {
        match self {
            ReadChunk::Data { cookie, .. }
            | ReadChunk::Hole { cookie, .. }
            | ReadChunk::Error { cookie, .. } => *cookie,
        }
    }
}
