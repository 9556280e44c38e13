//! Traffic counters, as libnbd's `nbd_stats_bytes_sent` and friends.
//!
//! A "chunk" is what libnbd calls one: a group of bytes that a magic number
//! starts and that cannot be split further without breaking the protocol.
//! Sent: each option request and each command request (a write's payload is
//! part of its command). Received: the greeting, each option reply, each
//! simple reply and each structured or extended reply chunk (a read's data
//! belongs to its reply). The client flags and the answer to
//! `NBD_OPT_EXPORT_NAME` start with no magic, so they are bytes but no chunk. Bytes are the protocol's
//! plaintext: with TLS they are counted before encryption and after
//! decryption, so they may differ from what crossed the socket.

/// The counters of one connection since it was created; see
/// [`Connection::stats`](crate::Connection::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes the client handed to the transport (libnbd's `stats_bytes_sent`).
    pub bytes_sent: u64,
    /// Bytes the client took from the transport (`stats_bytes_received`).
    pub bytes_received: u64,
    /// Option and command requests queued to send (`stats_chunks_sent`).
    pub chunks_sent: u64,
    /// Greetings, option replies, simple replies and reply chunks received
    /// (`stats_chunks_received`).
    pub chunks_received: u64,
}
