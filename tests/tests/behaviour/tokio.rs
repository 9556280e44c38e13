//! The suite over `nbd_tokio`: the harness keeps each command's future and
//! runs a tokio runtime of its own, where the client's driver task lives,
//! inside `step` (see `tokio/aio.rs`).
//!
//! Nothing drives the connection outside `step`, so a lost wakeup (of the
//! driver by the socket, or of a command's future by the driver) shows up
//! as a wait of the suite running out, not as a slow pass.

use std::time::Duration;

use nbd_proto::{BlockStatus, Config, Cookie};

#[path = "../tokio/aio.rs"]
#[allow(dead_code, reason = "each test crate uses a part of it")]
mod aio;

/// The client the suite issues commands on.
type Client = aio::AioClient;

/// Adapter name for messages.
const NAME: &str = "tokio";

/// A tokio client behind the `aio_` vocabulary.
struct Harness {
    client: Client,
}

impl Harness {
    /// Connects to `uri` and negotiates.
    fn connect(uri: &str, config: Config) -> nbd_io::Result<Self> {
        Ok(Harness {
            client: Client::connect(uri, config)?,
        })
    }

    /// Nothing to start: the driver task writes the queued requests as soon
    /// as the runtime runs, in `step`.
    fn send(&mut self) -> nbd_io::Result<()> {
        Ok(())
    }

    /// Runs the runtime until something happens, at most `timeout`.
    fn step(&mut self, timeout: Duration) -> nbd_io::Result<()> {
        self.client.step(timeout)
    }

    /// The block status reports of `cookie`, one per meta context.
    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.client.take_block_status(cookie)
    }
}

/// The behavioural suite over this harness. The other harnesses mount the
/// same file: one text of the tests, compiled once per adapter.
#[allow(clippy::duplicate_mod)]
#[path = "suite.rs"]
mod suite;
