//! The suite over `nbd_mio`: the harness owns a mio [`Poll`] and waits as an
//! application's event loop would, `Poll::poll` then
//! [`Client::handle_event`] for each event.
//!
//! Nothing here drives the client on a timer, so a lost edge-triggered
//! wakeup shows up as a wait of the suite running out, not as a slow pass.

use std::io;
use std::time::{Duration, Instant};

use ::mio::{Events, Poll, Token};
use nbd_mio::Client;
use nbd_proto::{BlockStatus, Config, Cookie, Event};

use crate::WAIT_LIMIT;

/// Adapter name for messages.
const NAME: &str = "mio";

/// The token the harness registers its one connection under.
const TOKEN: Token = Token(7);

/// An mio client with the `Poll` it is registered with.
struct Harness {
    poll: Poll,
    events: Events,
    client: Client,
    /// Block status reports taken off the client's events, until the suite
    /// asks for those of their cookie.
    statuses: Vec<BlockStatus>,
}

impl Harness {
    /// Connects to `uri` and runs the loop until the handshake is over: the
    /// export is ready (or, in opt mode, the server waits for options), or
    /// the connection failed.
    fn connect(uri: &str, config: Config) -> nbd_io::Result<Self> {
        let poll = Poll::new()?;
        let client = Client::connect_uri(uri, config, poll.registry(), TOKEN)?;
        let mut harness = Harness {
            poll,
            events: Events::with_capacity(64),
            client,
            statuses: Vec::new(),
        };
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut first_error = None;
        loop {
            let conn = harness.client.connection();
            if conn.is_ready() || conn.is_negotiating() {
                return Ok(harness);
            }
            if let Some(e) = conn.error() {
                return Err(e.clone().into());
            }
            if harness.client.is_closed() {
                return Err(first_error.unwrap_or_else(|| {
                    nbd_proto::Error::NotConnected(
                        "the connection closed during the handshake".into(),
                    )
                    .into()
                }));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{NAME}: the handshake with {uri} took more than {WAIT_LIMIT:?} (phase {:?})",
                harness.client.connection().phase()
            );
            if let Err(e) = harness.step(left.min(Duration::from_secs(1))) {
                first_error.get_or_insert(e);
            }
        }
    }

    /// Writes the queued requests until they are all out or the socket
    /// would block; the rest goes on writable events.
    fn send(&mut self) -> nbd_io::Result<()> {
        self.client.send()
    }

    /// One turn of the loop: waits at most `timeout` for events and hands
    /// each to the client. An error is the connection's (it is then dead and
    /// its commands have completed with errors).
    fn step(&mut self, timeout: Duration) -> nbd_io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            other => other?,
        }
        let mut result = Ok(());
        for event in self.events.iter() {
            assert_eq!(
                event.token(),
                TOKEN,
                "{NAME}: an event for a token never used"
            );
            if let Err(e) = self.client.handle_event(event) {
                result = Err(e);
            }
        }
        self.take_events();
        result
    }

    /// The block status reports of `cookie`, one per meta context (they
    /// arrive as events before the command's completion).
    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.take_events();
        let (mine, rest) = std::mem::take(&mut self.statuses)
            .into_iter()
            .partition(|s| s.cookie == cookie);
        self.statuses = rest;
        mine
    }

    /// Keeps the block status events; the others (`Ready`, `Closed`, ...)
    /// the suite reads from the connection's phase instead.
    fn take_events(&mut self) {
        while let Some(event) = self.client.next_event() {
            if let Event::BlockStatus(status) = event {
                self.statuses.push(status);
            }
        }
    }
}

/// The behavioural suite over this harness. The other harness mounts the
/// same file: one text of the tests, compiled once per adapter.
#[allow(clippy::duplicate_mod)]
#[path = "suite.rs"]
mod suite;
