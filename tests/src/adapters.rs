//! One interface over the two I/O adapters of the client, so that one
//! behavioural suite (`tests/tests/behaviour.rs`) runs the same assertions
//! against both.
//!
//! [`Adapter`] is implemented for [`nbd_blocking::Client`] (its blocking
//! calls, and its aio calls plus `poll` for batches) and for [`MioAdapter`],
//! which owns a mio [`Poll`] and an [`nbd_mio::Client`] and runs the event loop
//! until what it waits for has happened.
//!
//! Every wait has a limit ([`WAIT_LIMIT`]): a lost wakeup or a command that
//! never completes panics with a message saying what was awaited, instead of
//! hanging the test run. A command that completes twice, or a completion for
//! a cookie nobody issued, panics too.
//!
//! ```no_run
//! use nbd_tests::adapters::{Adapter, MioAdapter};
//! use nbd_proto::{CmdFlags, Config};
//! let mut client = MioAdapter::connect("nbd+unix:///?socket=/tmp/s", Config::default()).unwrap();
//! let buf = client.pread(bytes::BytesMut::zeroed(512), 0, CmdFlags::empty()).unwrap();
//! assert_eq!(buf.len(), 512);
//! client.disconnect().unwrap();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::{Events, Poll, Token};
use nbd_proto::{BlockStatus, CmdFlags, Completion, Config, Connection, Cookie, Errno, Event};

/// The longest any adapter call here waits for the server before panicking.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// An error from either adapter, reduced to what the tests compare: the
/// errno-like kind, the NBD-layer error when there is one, and the text.
#[derive(Debug, Clone)]
pub struct CallError {
    /// The errno-like kind, where the adapter gives one (socket errors have none).
    pub errno: Option<Errno>,
    /// The NBD-layer error, when the failure came from `nbd-proto`.
    pub nbd: Option<nbd_proto::Error>,
    /// The adapter's message.
    pub message: String,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(errno) = self.errno {
            write!(f, " ({errno})")?;
        }
        Ok(())
    }
}

impl std::error::Error for CallError {}

impl From<nbd_proto::Error> for CallError {
    fn from(e: nbd_proto::Error) -> Self {
        CallError {
            errno: Some(e.errno()),
            message: e.to_string(),
            nbd: Some(e),
        }
    }
}

/// Both adapters report `nbd_io::Error`, the connection layer's one error type.
impl From<nbd_io::Error> for CallError {
    fn from(e: nbd_io::Error) -> Self {
        let nbd = match &e {
            nbd_io::Error::Nbd(inner) => Some(inner.clone()),
            _ => None,
        };
        CallError {
            errno: e.errno(),
            nbd,
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for CallError {
    fn from(e: std::io::Error) -> Self {
        CallError {
            errno: None,
            nbd: None,
            message: e.to_string(),
        }
    }
}

/// Result of an adapter call.
pub type CallResult<T> = Result<T, CallError>;

/// One command of a batch (see [`Adapter::submit`]).
#[derive(Debug, Clone)]
pub enum Cmd {
    /// Read `len` bytes at `offset`.
    Read {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: usize,
        /// Command flags.
        flags: CmdFlags,
    },
    /// Write `data` at `offset`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Bytes,
        /// Command flags.
        flags: CmdFlags,
    },
    /// Flush.
    Flush {
        /// Command flags.
        flags: CmdFlags,
    },
    /// Trim `len` bytes at `offset`.
    Trim {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// Command flags.
        flags: CmdFlags,
    },
    /// Write `len` zeroes at `offset`.
    Zero {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// Command flags.
        flags: CmdFlags,
    },
    /// Prefetch `len` bytes at `offset`.
    Cache {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// Command flags.
        flags: CmdFlags,
    },
}

impl Cmd {
    /// A plain read.
    pub fn read(offset: u64, len: usize) -> Self {
        Cmd::Read {
            offset,
            len,
            flags: CmdFlags::empty(),
        }
    }

    /// A plain write.
    pub fn write(offset: u64, data: impl Into<Bytes>) -> Self {
        Cmd::Write {
            offset,
            data: data.into(),
            flags: CmdFlags::empty(),
        }
    }
}

/// A finished command of a batch: its index in the batch, result and buffer.
#[derive(Debug)]
pub struct Done {
    /// Position of the command in the batch given to [`Adapter::start`].
    pub index: usize,
    /// The command's result.
    pub result: Result<(), nbd_proto::Error>,
    /// The read buffer (reads only).
    pub buffer: Option<BytesMut>,
}

/// What the behavioural suite needs from an adapter.
pub trait Adapter: Sized {
    /// Name for messages (`"blocking"`, `"mio"`).
    const NAME: &'static str;

    /// Connects to `uri` and negotiates (or, in opt mode, stops negotiating).
    fn connect(uri: &str, config: Config) -> CallResult<Self>;
    /// The protocol state.
    fn connection(&self) -> &Connection;
    /// The protocol state, for settings such as strict mode.
    fn connection_mut(&mut self) -> &mut Connection;

    /// Reads `buf.len()` bytes at `offset` into `buf`, waiting for the reply.
    fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> CallResult<BytesMut>;
    /// Writes `data` at `offset`, waiting for the reply.
    fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> CallResult<()>;
    /// Flushes, waiting for the reply.
    fn flush(&mut self, flags: CmdFlags) -> CallResult<()>;
    /// Trims `count` bytes at `offset`, waiting for the reply.
    fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()>;
    /// Writes `count` zeroes at `offset`, waiting for the reply.
    fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()>;
    /// Prefetches `count` bytes at `offset`, waiting for the reply.
    fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()>;
    /// Block status over every negotiated meta context, one report per context.
    fn block_status(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> CallResult<Vec<BlockStatus>>;

    /// Queues one command without waiting.
    fn issue(&mut self, cmd: Cmd) -> CallResult<Cookie>;
    /// Sends what is queued and drives until every queued byte is on the
    /// socket (or the connection ended); replies that arrive meanwhile wait
    /// in the completion queue.
    fn send_all(&mut self);
    /// Waits up to `timeout` for the socket and moves what can move. An error
    /// is a failure seen while driving (the connection then fails its
    /// commands; they still arrive through [`take_completion`](Self::take_completion)).
    fn step(&mut self, timeout: Duration) -> CallResult<()>;
    /// The oldest completion not yet taken.
    fn take_completion(&mut self) -> Option<Completion>;
    /// Commands issued and not completed.
    fn in_flight(&self) -> usize;
    /// Disconnects cleanly: what is in flight finishes, the server hangs up.
    fn disconnect(self) -> CallResult<()>;

    /// Issues every command of `cmds` (panicking if one is refused at once),
    /// then sends them all: afterwards they are on the wire.
    fn start(&mut self, cmds: Vec<Cmd>) -> Vec<Cookie> {
        let cookies = cmds
            .into_iter()
            .enumerate()
            .map(|(i, cmd)| {
                let what = format!("{cmd:?}");
                self.issue(cmd)
                    .unwrap_or_else(|e| panic!("{}: command {i} ({what:.80}): {e}", Self::NAME))
            })
            .collect();
        self.send_all();
        cookies
    }

    /// Drives until every cookie of `cookies` (from [`start`](Self::start))
    /// completed; returns them in completion order with their index in
    /// `cookies`. Panics if one completes twice, an unknown one completes, the
    /// connection ends with some never completed, or [`WAIT_LIMIT`] passes.
    fn collect(&mut self, cookies: &[Cookie]) -> Vec<Done> {
        let index: HashMap<Cookie, usize> =
            cookies.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        assert_eq!(index.len(), cookies.len(), "duplicate cookies issued");
        let mut seen = vec![false; cookies.len()];
        let mut done = Vec::with_capacity(cookies.len());
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut drive_errors = Vec::new();
        while done.len() < cookies.len() {
            let mut got_one = false;
            while let Some(c) = self.take_completion() {
                got_one = true;
                let i = *index.get(&c.cookie).unwrap_or_else(|| {
                    panic!("{}: completion of a cookie not issued: {c:?}", Self::NAME)
                });
                assert!(!seen[i], "{}: command {i} completed twice", Self::NAME);
                seen[i] = true;
                done.push(Done {
                    index: i,
                    result: c.result,
                    buffer: c.buffer,
                });
            }
            if done.len() == cookies.len() {
                break;
            }
            let missing: Vec<usize> = (0..seen.len()).filter(|i| !seen[*i]).collect();
            let phase = self.connection().phase();
            if !got_one && matches!(phase, nbd_proto::Phase::Closed | nbd_proto::Phase::Dead) {
                // Nothing more can arrive: the connection is over.
                assert!(
                    self.take_completion().is_none(),
                    "{}: completion after the connection ended",
                    Self::NAME
                );
                panic!(
                    "{}: connection ended ({phase:?}, {:?}) but commands {missing:?} never completed; drive errors: {drive_errors:?}",
                    Self::NAME,
                    self.connection().error()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: waited {WAIT_LIMIT:?} and commands {missing:?} of {} never completed (in flight {}, phase {phase:?}); drive errors: {drive_errors:?}",
                Self::NAME,
                cookies.len(),
                self.in_flight()
            );
            if let Err(e) = self.step(left.min(Duration::from_secs(1))) {
                drive_errors.push(e.to_string());
            }
        }
        done
    }

    /// [`start`](Self::start) then [`collect`](Self::collect): all commands in
    /// flight at once, results in completion order.
    fn submit(&mut self, cmds: Vec<Cmd>) -> Vec<Done> {
        let cookies = self.start(cmds);
        self.collect(&cookies)
    }

    /// Submits plain reads of `(offset, len)`, all in flight at once; results
    /// in completion order.
    fn submit_reads(&mut self, reads: &[(u64, usize)]) -> Vec<Done> {
        self.submit(reads.iter().map(|&(o, l)| Cmd::read(o, l)).collect())
    }
}

// ------------------------------------------------------------------ blocking

impl Adapter for nbd_blocking::Client {
    const NAME: &'static str = "blocking";

    fn connect(uri: &str, config: Config) -> CallResult<Self> {
        let mut client = nbd_blocking::Client::connect_uri_with(uri, config)?;
        // A blocking call never waits longer than the limit (it then fails
        // with TimedOut, which the tests report).
        client.set_timeout(Some(WAIT_LIMIT));
        Ok(client)
    }

    fn connection(&self) -> &Connection {
        nbd_blocking::Client::connection(self)
    }

    fn connection_mut(&mut self) -> &mut Connection {
        nbd_blocking::Client::connection_mut(self)
    }

    fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> CallResult<BytesMut> {
        Ok(nbd_blocking::Client::pread(self, buf, offset, flags)?)
    }

    fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> CallResult<()> {
        Ok(nbd_blocking::Client::pwrite(self, data, offset, flags)?)
    }

    fn flush(&mut self, flags: CmdFlags) -> CallResult<()> {
        Ok(nbd_blocking::Client::flush(self, flags)?)
    }

    fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()> {
        Ok(nbd_blocking::Client::trim(self, count, offset, flags)?)
    }

    fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()> {
        Ok(nbd_blocking::Client::zero(self, count, offset, flags)?)
    }

    fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()> {
        Ok(nbd_blocking::Client::cache(self, count, offset, flags)?)
    }

    fn block_status(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> CallResult<Vec<BlockStatus>> {
        Ok(nbd_blocking::Client::block_status(
            self, count, offset, flags,
        )?)
    }

    fn issue(&mut self, cmd: Cmd) -> CallResult<Cookie> {
        Ok(match cmd {
            Cmd::Read { offset, len, flags } => {
                self.aio_pread(BytesMut::zeroed(len), offset, flags)?
            }
            Cmd::Write {
                offset,
                data,
                flags,
            } => self.aio_pwrite(data, offset, flags)?,
            Cmd::Flush { flags } => self.aio_flush(flags)?,
            Cmd::Trim { offset, len, flags } => self.aio_trim(len, offset, flags)?,
            Cmd::Zero { offset, len, flags } => self.aio_zero(len, offset, flags)?,
            Cmd::Cache { offset, len, flags } => self.aio_cache(len, offset, flags)?,
        })
    }

    fn send_all(&mut self) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while nbd_blocking::Client::connection(self).wants_write() {
            assert!(
                Instant::now() < deadline,
                "blocking: requests still unsent after {WAIT_LIMIT:?}"
            );
            if self.poll(Some(Duration::from_secs(1))).is_err() {
                // The connection failed; its commands complete with errors.
                break;
            }
        }
    }

    fn step(&mut self, timeout: Duration) -> CallResult<()> {
        self.poll(Some(timeout))?;
        Ok(())
    }

    fn take_completion(&mut self) -> Option<Completion> {
        self.next_completion()
    }

    fn in_flight(&self) -> usize {
        nbd_blocking::Client::in_flight(self)
    }

    fn disconnect(self) -> CallResult<()> {
        Ok(self.shutdown()?)
    }
}

// ------------------------------------------------------------------ mio

/// An [`nbd_mio::Client`] with a mio [`Poll`] of its own, driven until what a
/// call waits for has happened.
///
/// The loop is the one an application would write: `poll`, then
/// `handle_event` for each event, then take completions. Nothing here calls
/// `drive` on a timer, so a lost edge-triggered wakeup shows up as a
/// [`WAIT_LIMIT`] panic rather than being papered over.
pub struct MioAdapter {
    poll: Poll,
    events: Events,
    client: nbd_mio::Client,
    statuses: Vec<BlockStatus>,
    other_events: Vec<Event>,
    /// Completions taken off the client while waiting for another cookie.
    requeue: Vec<Completion>,
    /// How many times `poll` returned (wakeups), for tests that count them.
    pub wakeups: u64,
}

/// The token the adapter registers its one connection under.
pub const MIO_TOKEN: Token = Token(7);

impl MioAdapter {
    /// The mio client.
    pub fn client(&mut self) -> &mut nbd_mio::Client {
        &mut self.client
    }

    /// Runs the loop until `done` holds, panicking after [`WAIT_LIMIT`] with
    /// `what` in the message. Errors from `handle_event` are collected and
    /// returned (the connection reports them as failed commands too).
    pub fn run_until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Vec<CallError> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut errors = Vec::new();
        loop {
            self.absorb();
            if done(self) {
                return errors;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "mio: waited {WAIT_LIMIT:?} for {what}; in flight {}, phase {:?}, wants_write {}, errors {errors:?}",
                self.client.in_flight(),
                self.client.connection().phase(),
                self.client.connection().wants_write(),
            );
            if let Err(e) = self.poll_once(left.min(Duration::from_secs(1))) {
                errors.push(e);
            }
        }
    }

    fn poll_once(&mut self, timeout: Duration) -> CallResult<()> {
        if self.client.is_closed() {
            // Deregistered: no event can come. Do not spin; let the caller
            // see the closed state.
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            return Ok(());
        }
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.wakeups += 1;
        let mut result = Ok(());
        for event in self.events.iter() {
            assert_eq!(event.token(), MIO_TOKEN, "an event for a token never used");
            if let Err(e) = self.client.handle_event(event) {
                result = Err(e.into());
            }
        }
        self.absorb();
        result
    }

    /// Moves the client's non-completion events into the adapter.
    fn absorb(&mut self) {
        while let Some(event) = self.client.next_event() {
            match event {
                Event::BlockStatus(status) => self.statuses.push(status),
                other => self.other_events.push(other),
            }
        }
    }

    /// Events other than completions and block status seen so far (`Ready`,
    /// `Closed`, read chunks, ...).
    pub fn take_events(&mut self) -> Vec<Event> {
        self.absorb();
        std::mem::take(&mut self.other_events)
    }

    fn wait_for(&mut self, cookie: Cookie) -> Completion {
        if let Some(at) = self.requeue.iter().position(|c| c.cookie == cookie) {
            return self.requeue.remove(at);
        }
        let mut found = None;
        let mut pending = Vec::new();
        self.run_until(&format!("the completion of {cookie:?}"), |a| {
            while let Some(c) = a.client.next_completion() {
                if c.cookie == cookie {
                    assert!(found.is_none(), "mio: {cookie:?} completed twice");
                    found = Some(c);
                } else {
                    pending.push(c);
                }
            }
            if found.is_none() && a.client.is_closed() {
                panic!(
                    "mio: the connection closed ({:?}) and {cookie:?} never completed",
                    a.client.connection().error()
                );
            }
            found.is_some()
        });
        // Keep other completions for whoever waits for them (none of the
        // single-command calls leaves any, but be exact).
        self.requeue.extend(pending);
        found.expect("run_until returns once found")
    }

    fn complete(&mut self, cookie: CallResult<Cookie>) -> CallResult<Option<BytesMut>> {
        let cookie = cookie?;
        self.client.send()?;
        let done = self.wait_for(cookie);
        done.result?;
        Ok(done.buffer)
    }
}

impl Adapter for MioAdapter {
    const NAME: &'static str = "mio";

    fn connect(uri: &str, config: Config) -> CallResult<Self> {
        let poll = Poll::new()?;
        let client = nbd_mio::Client::connect_uri(uri, config, poll.registry(), MIO_TOKEN)?;
        let mut adapter = MioAdapter {
            poll,
            events: Events::with_capacity(64),
            client,
            statuses: Vec::new(),
            other_events: Vec::new(),
            wakeups: 0,
            requeue: Vec::new(),
        };
        let errors = adapter.run_until("the handshake", |a| {
            a.client.connection().is_ready()
                || a.client.connection().is_negotiating()
                || a.client.is_closed()
        });
        if let Some(e) = adapter.client.connection().error() {
            return Err(e.clone().into());
        }
        if adapter.client.is_closed() {
            return Err(errors.into_iter().next().unwrap_or_else(|| CallError {
                errno: Some(Errno::NotConn),
                nbd: None,
                message: "the connection closed during the handshake".into(),
            }));
        }
        Ok(adapter)
    }

    fn connection(&self) -> &Connection {
        self.client.connection()
    }

    fn connection_mut(&mut self) -> &mut Connection {
        self.client.connection_mut()
    }

    fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> CallResult<BytesMut> {
        let cookie = self
            .client
            .aio_pread(buf, offset, flags)
            .map_err(Into::into);
        Ok(self
            .complete(cookie)?
            .expect("a read completion hands its buffer back"))
    }

    fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> CallResult<()> {
        let cookie = self
            .client
            .aio_pwrite(data, offset, flags)
            .map_err(Into::into);
        self.complete(cookie).map(drop)
    }

    fn flush(&mut self, flags: CmdFlags) -> CallResult<()> {
        let cookie = self.client.aio_flush(flags).map_err(Into::into);
        self.complete(cookie).map(drop)
    }

    fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()> {
        let cookie = self
            .client
            .aio_trim(count, offset, flags)
            .map_err(Into::into);
        self.complete(cookie).map(drop)
    }

    fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()> {
        let cookie = self
            .client
            .aio_zero(count, offset, flags)
            .map_err(Into::into);
        self.complete(cookie).map(drop)
    }

    fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> CallResult<()> {
        let cookie = self
            .client
            .aio_cache(count, offset, flags)
            .map_err(Into::into);
        self.complete(cookie).map(drop)
    }

    fn block_status(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> CallResult<Vec<BlockStatus>> {
        let cookie = self.client.aio_block_status(count, offset, flags)?;
        self.client.send()?;
        let done = self.wait_for(cookie);
        self.absorb();
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.statuses)
            .into_iter()
            .partition(|s| s.cookie == cookie);
        self.statuses = rest;
        done.result?;
        Ok(mine)
    }

    fn issue(&mut self, cmd: Cmd) -> CallResult<Cookie> {
        let c = &mut self.client;
        Ok(match cmd {
            Cmd::Read { offset, len, flags } => {
                c.aio_pread(BytesMut::zeroed(len), offset, flags)?
            }
            Cmd::Write {
                offset,
                data,
                flags,
            } => c.aio_pwrite(data, offset, flags)?,
            Cmd::Flush { flags } => c.aio_flush(flags)?,
            Cmd::Trim { offset, len, flags } => c.aio_trim(len, offset, flags)?,
            Cmd::Zero { offset, len, flags } => c.aio_zero(len, offset, flags)?,
            Cmd::Cache { offset, len, flags } => c.aio_cache(len, offset, flags)?,
        })
    }

    fn send_all(&mut self) {
        let first = self.client.send();
        let mut errors = Vec::new();
        if let Err(e) = first {
            errors.push(CallError::from(e));
        }
        errors.extend(self.run_until("every request to be written", |a| {
            a.client.is_closed() || !a.client.connection().wants_write()
        }));
        // Errors mean the connection failed; its commands then complete with
        // errors, which the caller checks.
        let _ = errors;
    }

    fn step(&mut self, timeout: Duration) -> CallResult<()> {
        self.poll_once(timeout)
    }

    fn take_completion(&mut self) -> Option<Completion> {
        if !self.requeue.is_empty() {
            return Some(self.requeue.remove(0));
        }
        self.client.next_completion()
    }

    fn in_flight(&self) -> usize {
        self.client.in_flight()
    }

    fn disconnect(mut self) -> CallResult<()> {
        self.client.aio_disconnect()?;
        let errors = self.run_until("the server to close after NBD_CMD_DISC", |a| {
            a.client.is_closed()
        });
        if let Some(e) = self.client.connection().error() {
            return Err(e.clone().into());
        }
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        Ok(())
    }
}
