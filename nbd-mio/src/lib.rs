//! mio adapter for the `nbd-proto` NBD client: NBD connections inside an event
//! loop the caller owns.
//!
//! A [`Client`] owns an [`nbd_io::Socket`] (TCP, Unix, vsock, a server
//! subprocess, or a socket the caller hands over), registered with the
//! caller's `Registry` under the caller's `Token`; it connects without
//! blocking ([`nbd_io::Connecting`]). The caller polls; on each event for
//! that token it calls [`Client::handle_event`], which moves every byte that can
//! move ([`nbd_io::pump`]). Commands are queued by `aio_` calls (libnbd's
//! names: `aio_pread`, `aio_pwrite`, `aio_flush`, ..., `aio_disconnect`,
//! `aio_opt_go`); finished commands come back as values from [`Client::next_completion`]
//! with the caller's buffer. Many connections share one `Poll`, and
//! [`MultiConn`] spreads commands over several connections to a multi-conn export.
//!
//! Deadlines (handshake, per command, stall) are the core's: the loop passes
//! [`Client::poll_timeout`] to `Poll::poll` and calls
//! [`Client::handle_timeout`] after each wake-up, so a timed-out command
//! completes with `ETIMEDOUT` and a stalled connection ends, without the loop
//! keeping clocks of its own.
//!
//! See `examples/read_export.rs` for a complete loop (with deadlines) and
//! `examples/side_by_side.rs` for NBD beside a TCP listener and a timer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod multi;
mod reconnect;

pub use client::Client;
pub use multi::{MultiCompletion, MultiConn, MultiCookie};
pub use nbd_io::{self, Error, ReconnectPolicy, Reconnected, Result};
pub use nbd_proto;
