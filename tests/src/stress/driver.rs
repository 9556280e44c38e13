//! The two ways of driving commands that the stress test exercises: the
//! blocking adapter's aio calls with `poll`, and the mio adapter in a mio
//! `Poll` loop. Both queue commands without waiting and hand back
//! completions as they arrive.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Poll, Token};
use nbd_proto::{BlockStatus, Completion, Config, Connection, Cookie, Event};

use super::ops::{Kind, Op};

/// The longest a driver waits for the server in one go before calling it a hang.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// One connection driven without blocking per command.
///
/// The runner never asks a driver to [`wait`](Self::wait) unless a command
/// is in flight whose completion has not been taken, so no wait can be an
/// idle wait that nothing ends.
pub trait Driver: Sized {
    /// The adapter's name, for messages.
    const NAME: &'static str;

    /// Connects and negotiates.
    fn connect(uri: &str, config: Config) -> Result<Self, String>;
    /// The protocol state.
    fn connection(&self) -> &Connection;
    /// Queues `op` without sending it.
    fn issue(&mut self, op: &Op) -> Result<Cookie, String>;
    /// Puts what is queued on the wire as far as the socket takes it now.
    fn send(&mut self) -> Result<(), String>;
    /// Waits up to `timeout` for the socket, then moves what can move.
    fn wait(&mut self, timeout: Duration) -> Result<(), String>;
    /// A finished command: `preferred` if it finished and the adapter can
    /// take completions by cookie, otherwise the oldest one.
    fn next_completion(&mut self, preferred: Option<Cookie>) -> Option<Completion>;
    /// The block status reports that arrived for `cookie`.
    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus>;
    /// Disconnects cleanly; nothing may be in flight.
    fn finish(self) -> Result<(), String>;

    /// Turns on automatic reconnect (nothing may be in flight yet).
    fn set_reconnect(&mut self, policy: nbd_io::ReconnectPolicy) -> Result<(), String> {
        let _ = policy;
        Err(format!("the {} driver has no reconnect", Self::NAME))
    }

    /// Whether the connection is over for good: closed or dead, and not
    /// about to be replaced by a reconnect.
    fn is_over(&self) -> bool {
        let conn = self.connection();
        conn.is_closed() || conn.is_dead()
    }

    /// How many reconnects happened since the last call.
    fn take_reconnects(&mut self) -> usize {
        0
    }
}

/// Queues `op` on a connection-shaped API: the same calls exist on both adapters.
macro_rules! issue_on {
    ($client:expr, $read:ident, $write:ident, $trim:ident, $zero:ident, $flush:ident, $cache:ident, $status:ident, $op:expr) => {{
        let op: &Op = $op;
        let c = $client;
        match op.kind {
            Kind::Read => c.$read(BytesMut::zeroed(op.len as usize), op.offset, op.flags),
            Kind::Write => c.$write(
                op.data.clone().expect("a write carries its payload"),
                op.offset,
                op.flags,
            ),
            Kind::Trim => c.$trim(op.len, op.offset, op.flags),
            Kind::Zero => c.$zero(op.len, op.offset, op.flags),
            Kind::Flush => c.$flush(op.flags),
            Kind::Cache => c.$cache(op.len, op.offset, op.flags),
            Kind::BlockStatus => c.$status(op.len, op.offset, op.flags),
        }
        .map_err(|e| e.to_string())
    }};
}

// ------------------------------------------------------------------ blocking

/// `nbd_blocking::Client` through its aio calls, `poll` and
/// `take_completion` / `next_completion`.
pub struct Blocking(nbd_blocking::Client);

impl Driver for Blocking {
    const NAME: &'static str = "blocking";

    fn set_reconnect(&mut self, policy: nbd_io::ReconnectPolicy) -> Result<(), String> {
        self.0
            .set_reconnect(Some(policy))
            .map_err(|e| e.to_string())
    }

    fn take_reconnects(&mut self) -> usize {
        self.0.take_reconnects().len()
    }

    fn is_over(&self) -> bool {
        let conn = self.0.connection();
        (conn.is_closed() || conn.is_dead()) && !self.0.is_reconnecting()
    }

    fn connect(uri: &str, config: Config) -> Result<Self, String> {
        let mut client =
            nbd_blocking::Client::connect_uri_with(uri, config).map_err(|e| e.to_string())?;
        // Bounds the final shutdown's wait.
        client.set_timeout(Some(STALL_LIMIT));
        Ok(Blocking(client))
    }

    fn connection(&self) -> &Connection {
        self.0.connection()
    }

    fn issue(&mut self, op: &Op) -> Result<Cookie, String> {
        issue_on!(
            &mut self.0,
            aio_pread,
            aio_pwrite,
            aio_trim,
            aio_zero,
            aio_flush,
            aio_cache,
            aio_block_status,
            op
        )
    }

    fn send(&mut self) -> Result<(), String> {
        // A zero timeout: write (and read) what can move, never wait.
        self.0
            .poll(Some(Duration::ZERO))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        // Always a finite timeout: `poll(None)` on an idle connection would
        // wait for ever.
        self.0
            .poll(Some(timeout))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn next_completion(&mut self, preferred: Option<Cookie>) -> Option<Completion> {
        preferred
            .and_then(|cookie| self.0.take_completion(cookie))
            .or_else(|| self.0.next_completion())
    }

    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.0.take_block_status(cookie)
    }

    fn finish(self) -> Result<(), String> {
        self.0.shutdown().map_err(|e| e.to_string())
    }
}

// ------------------------------------------------------------------ mio

/// The token of the one connection in [`Mio`]'s poll.
const TOKEN: Token = Token(1);

/// `nbd_mio::Client` in a mio `Poll` loop of its own: `poll`, then
/// `handle_event` for each event, then completions and events taken off
/// the client.
pub struct Mio {
    poll: Poll,
    events: Events,
    client: nbd_mio::Client,
    statuses: HashMap<Cookie, Vec<BlockStatus>>,
}

impl Mio {
    /// Moves block status events into the per-cookie store; other events
    /// (the final `Closed`) need no action, the client's state says it.
    fn absorb(&mut self) {
        while let Some(event) = self.client.next_event() {
            if let Event::BlockStatus(status) = event {
                self.statuses.entry(status.cookie).or_default().push(status);
            }
        }
    }

    fn poll_once(&mut self, timeout: Duration) -> Result<(), String> {
        if self.client.is_closed() {
            // Deregistered: no event can come, and waiting would only hide it.
            return Err(format!(
                "the connection is over ({:?})",
                self.client.connection().error()
            ));
        }
        // The client's own deadlines (timeouts, a reconnect's pause) come
        // first: it is told the time after every wake-up.
        let timeout = self
            .client
            .poll_timeout()
            .map_or(timeout, |due| due.min(timeout));
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("mio poll: {e}")),
        }
        let mut result = Ok(());
        for event in self.events.iter() {
            if event.token() != TOKEN {
                return Err(format!(
                    "an event for token {:?}, never used",
                    event.token()
                ));
            }
            if let Err(e) = self.client.handle_event(event) {
                result = Err(e.to_string());
            }
        }
        if result.is_ok() {
            result = self
                .client
                .handle_timeout(Instant::now())
                .map_err(|e| e.to_string());
        }
        self.absorb();
        result
    }
}

impl Driver for Mio {
    const NAME: &'static str = "mio";

    fn set_reconnect(&mut self, policy: nbd_io::ReconnectPolicy) -> Result<(), String> {
        self.client
            .set_reconnect(Some(policy))
            .map_err(|e| e.to_string())
    }

    fn take_reconnects(&mut self) -> usize {
        self.client.take_reconnects().len()
    }

    fn is_over(&self) -> bool {
        // Between a lost connection and its reconnect the old connection is
        // dead but the client is not closed.
        self.client.is_closed()
    }

    fn connect(uri: &str, config: Config) -> Result<Self, String> {
        let poll = Poll::new().map_err(|e| e.to_string())?;
        let client = nbd_mio::Client::connect_uri(uri, config, poll.registry(), TOKEN)
            .map_err(|e| e.to_string())?;
        let mut mio = Mio {
            poll,
            events: Events::with_capacity(16),
            client,
            statuses: HashMap::new(),
        };
        let deadline = Instant::now() + STALL_LIMIT;
        while !mio.client.connection().is_ready() {
            if let Some(e) = mio.client.connection().error() {
                return Err(format!("handshake: {e}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("no handshake within {STALL_LIMIT:?}"));
            }
            mio.poll_once(Duration::from_millis(500))?;
        }
        Ok(mio)
    }

    fn connection(&self) -> &Connection {
        self.client.connection()
    }

    fn issue(&mut self, op: &Op) -> Result<Cookie, String> {
        issue_on!(
            &mut self.client,
            aio_pread,
            aio_pwrite,
            aio_trim,
            aio_zero,
            aio_flush,
            aio_cache,
            aio_block_status,
            op
        )
    }

    fn send(&mut self) -> Result<(), String> {
        let result = self.client.send().map_err(|e| e.to_string());
        self.absorb();
        result
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        self.poll_once(timeout)
    }

    fn next_completion(&mut self, _preferred: Option<Cookie>) -> Option<Completion> {
        // nbd-mio hands completions out in arrival order only.
        self.client.next_completion()
    }

    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.absorb();
        self.statuses.remove(&cookie).unwrap_or_default()
    }

    fn finish(mut self) -> Result<(), String> {
        self.client.aio_disconnect().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + STALL_LIMIT;
        while !self.client.is_closed() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the server did not close within {STALL_LIMIT:?} of NBD_CMD_DISC"
                ));
            }
            self.poll_once(Duration::from_millis(500))?;
        }
        if let Some(e) = self.client.connection().error() {
            return Err(format!("closed with an error: {e}"));
        }
        self.client.close().map_err(|e| e.to_string())
    }
}
