//! The suite over `nbd_blocking`: the harness waits with [`Client::poll`].

use std::time::Duration;

use nbd_blocking::Client;
use nbd_proto::{BlockStatus, Config, Cookie};

use crate::WAIT_LIMIT;

/// Adapter name for messages.
const NAME: &str = "blocking";

/// A blocking client; every wait of the suite is a [`Client::poll`].
struct Harness {
    client: Client,
}

impl Harness {
    /// Connects to `uri` and negotiates (the blocking connect waits for it).
    fn connect(uri: &str, config: Config) -> nbd_io::Result<Self> {
        let mut client = Client::connect_uri_with(uri, config)?;
        // No wait of the client, inside `connect` or `poll`, outlasts the
        // suite's limit without failing with TimedOut.
        client.set_timeout(Some(WAIT_LIMIT));
        Ok(Harness { client })
    }

    /// Nothing to start: [`Client::poll`] writes the queued requests itself.
    fn send(&mut self) -> nbd_io::Result<()> {
        Ok(())
    }

    /// One `poll`: writes and reads what can move, waiting at most `timeout`.
    fn step(&mut self, timeout: Duration) -> nbd_io::Result<()> {
        self.client.poll(Some(timeout)).map(drop)
    }

    /// The block status reports of `cookie`, one per meta context.
    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.client.take_block_status(cookie)
    }
}

/// The behavioural suite over this harness. The other harness mounts the
/// same file: one text of the tests, compiled once per adapter.
#[allow(clippy::duplicate_mod)]
#[path = "suite.rs"]
mod suite;
