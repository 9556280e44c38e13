//! Reading the traffic counters (libnbd's `nbd_stats_*` calls).

use super::Connection;
use crate::stats::Stats;

impl Connection {
    /// Every counter at once; see [`Stats`] for what a byte and a chunk are.
    /// Valid in every phase, after the connection ended too; each read is a
    /// few loads, never a walk over anything.
    ///
    /// ```
    /// use nbd_proto::{Config, Connection};
    /// let conn = Connection::new(Config::default());
    /// assert_eq!(conn.stats().bytes_sent, 0);
    /// assert_eq!(conn.stats_chunks_received(), 0);
    /// ```
    pub fn stats(&self) -> Stats {
        Stats {
            bytes_sent: self.core.output.sent_total(),
            ..self.core.stats
        }
    }

    /// Plaintext bytes handed to the transport (libnbd's `stats_bytes_sent`).
    pub fn stats_bytes_sent(&self) -> u64 {
        self.core.output.sent_total()
    }

    /// Plaintext bytes taken from the transport (libnbd's `stats_bytes_received`).
    pub fn stats_bytes_received(&self) -> u64 {
        self.core.stats.bytes_received
    }

    /// Option and command requests queued to send (libnbd's `stats_chunks_sent`).
    pub fn stats_chunks_sent(&self) -> u64 {
        self.core.stats.chunks_sent
    }

    /// Greetings, option replies, simple replies and reply chunks received
    /// (libnbd's `stats_chunks_received`).
    pub fn stats_chunks_received(&self) -> u64 {
        self.core.stats.chunks_received
    }
}
