//! mio adapter for the `nbd-proto` NBD client: NBD connections inside an event
//! loop the caller owns.
//!
//! A [`Client`] owns a mio TCP or Unix stream, registered with the caller's
//! `Registry` under the caller's `Token`. The caller polls; on each event for
//! that token it calls [`Client::handle_event`], which moves every byte that can
//! move; finished commands come back as values from [`Client::next_completion`]
//! with the caller's buffer. Many connections share one `Poll`, and
//! [`MultiConn`] spreads commands over several connections to a multi-conn export.
//!
//! See `examples/read_export.rs` for a complete loop and
//! `examples/side_by_side.rs` for NBD beside a TCP listener and a timer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod multi;
mod stream;

pub use client::Client;
pub use error::{Error, Result};
pub use multi::{MultiCompletion, MultiConn, MultiCookie};
pub use nbd_proto;
pub use stream::Stream;
