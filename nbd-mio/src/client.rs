//! [`Client`]: one NBD connection driven by the caller's mio `Poll`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nbd_io::{
    pump, Connecting, Endpoint, Error, Progress, Reconnected, Request, Result, Socket, Target,
    UriPolicy,
};
use nbd_proto::{BlockStatus, CmdFlags, Completion, Config, Connection, Cookie, Event, ReadChunk};

use crate::reconnect::Reconnect;

/// An NBD connection registered with a caller's mio [`Registry`].
///
/// The socket is registered once, for readable and writable readiness, under the
/// caller's token (through [`SourceFd`]; the socket is an [`nbd_io::Socket`]).
/// On every event for that token call [`handle_event`](Self::handle_event):
/// it reads until the socket is drained (so no edge-triggered wakeup is
/// lost) and writes what it can, with [`nbd_io::pump`]. Every command call is
/// an `aio_` call, as in libnbd: it only queues the request and returns its
/// [`Cookie`]; call [`send`](Self::send) after issuing a batch to send them.
/// This adapter never waits, so it has no plain (waiting) command calls.
/// A write that would block waits for the next writable event, so an idle
/// or stalled connection costs nothing until the server moves.
///
/// Every way the connection can end reaches this loop: once the connection is
/// dead (refused connect, export refused during the handshake, server gone,
/// protocol violation), [`handle_event`](Self::handle_event) and
/// [`drive`](Self::drive) return its error, on the call that saw it and on every
/// later call, and its commands complete with errors. A clean end (after
/// [`aio_disconnect`](Self::aio_disconnect) or `aio_opt_abort`) is `Ok`, with
/// [`is_closed`](Self::is_closed) true and an `Event::Closed` without error.
/// The socket is deregistered when the connection ends, so no further events
/// come: a loop must stop waiting once `is_closed` is true.
///
/// Time: the core's deadlines ([`Config::handshake_timeout`],
/// [`Config::command_timeout`], [`Config::stall_timeout`]) need the loop's
/// help, since mio only wakes for readiness. Pass
/// [`poll_timeout`](Self::poll_timeout) to `Poll::poll` as its timeout, and
/// call [`handle_timeout`](Self::handle_timeout) after every wake-up (with or
/// without events): a command past its deadline then completes with
/// `ETIMEDOUT`, and a stalled server or slow handshake ends the connection
/// with the core's `TimedOut` error. Every driving call also passes the time
/// in, so `poll_timeout` is up to date after it.
///
/// ```no_run
/// use bytes::BytesMut;
/// use mio::{Events, Poll, Token};
/// use nbd_mio::Client;
/// use nbd_proto::{CmdFlags, Config};
///
/// let mut poll = Poll::new()?;
/// let mut client = Client::connect_uri("nbd+unix:///?socket=/tmp/nbd.sock", Config::default(), poll.registry(), Token(0))?;
/// let mut events = Events::with_capacity(16);
/// while !client.connection().is_ready() {
///     // Sleep until readiness or the connection's next deadline.
///     poll.poll(&mut events, client.poll_timeout())?;
///     for e in events.iter() {
///         // A refused handshake (no such export, ...) is returned here.
///         client.handle_event(e)?;
///     }
///     // A deadline that passed (with `handshake_timeout` set) is returned here.
///     client.handle_timeout(std::time::Instant::now())?;
/// }
/// let cookie = client.aio_pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())?;
/// client.send()?;
/// loop {
///     poll.poll(&mut events, client.poll_timeout())?;
///     for e in events.iter() {
///         client.handle_event(e)?;
///     }
///     client.handle_timeout(std::time::Instant::now())?;
///     if let Some(done) = client.next_completion() {
///         assert_eq!(done.cookie, cookie);
///         done.result?;
///         break;
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Client {
    pub(crate) conn: Connection,
    pub(crate) link: Link,
    pub(crate) token: Token,
    /// Registered with this registry (cloned handle), to register the
    /// socket of each new connect attempt and to deregister at the end.
    pub(crate) registry: Registry,
    /// The last write would have blocked: wait for a writable event.
    pub(crate) write_blocked: bool,
    pub(crate) completions: VecDeque<Completion>,
    pub(crate) events: VecDeque<Event>,
    pub(crate) closed: bool,
    /// The target and settings connected with: what a reconnect needs
    /// (`None` when the client was not made from a target).
    pub(crate) origin: Option<(Target, Config)>,
    /// The TLS settings connected with, which a reconnect uses again.
    pub(crate) origin_tls: Option<nbd_io::TlsRequest>,
    /// Automatic reconnect, when turned on (`set_reconnect`).
    pub(crate) reconnect: Option<Box<Reconnect>>,
    /// Reconnects not yet taken by `take_reconnects`.
    pub(crate) reconnects: VecDeque<Reconnected>,
}

/// The socket under the connection: still connecting, or connected.
pub(crate) enum Link {
    Connecting(Connecting),
    Open(Socket),
}

impl Link {
    /// The descriptor registered with the caller's registry.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            Link::Connecting(c) => c.socket().map(AsRawFd::as_raw_fd),
            Link::Open(s) => Some(s.as_raw_fd()),
        }
    }
}

impl Client {
    /// Starts connecting to `target` without blocking and registers the
    /// socket; the handshake follows on readiness events.
    ///
    /// TCP tries every address the host resolves to in turn, without
    /// blocking; resolving the name does block (see
    /// [`Connecting::start`]). A [`Target::Command`](nbd_io::Target::Command)
    /// or [`Target::Activation`](nbd_io::Target::Activation) starts its local
    /// server here. A failure known at once is returned here; a later one
    /// (a refused TCP connect on the last address) from
    /// [`handle_event`](Self::handle_event).
    pub fn connect(
        target: &Target,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        let origin = (target.clone(), config.clone());
        let mut client = Self::connect_with(Connecting::start(target)?, config, registry, token)?;
        client.origin = Some(origin);
        Ok(client)
    }

    /// Registers a connect the caller started (for example with
    /// [`Connecting::tcp`] over addresses it resolved itself).
    pub fn connect_with(
        connecting: Connecting,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        Self::start(
            Link::Connecting(connecting),
            Connection::new(config),
            registry,
            token,
        )
    }

    /// Runs NBD over a socket that is already connected (libnbd's
    /// `connect_socket`): a [`Socket`] from [`nbd_io::connect`] or
    /// [`Socket::from_fd`]. It is switched to non-blocking mode.
    pub fn connect_socket(
        socket: Socket,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        socket.set_nonblocking(true)?;
        Self::start(Link::Open(socket), Connection::new(config), registry, token)
    }

    /// Connects to an NBD URI accepted by the default [`UriPolicy`]; its
    /// export name replaces `config.export_name`. See
    /// [`connect_endpoint`](Self::connect_endpoint) for another policy.
    pub fn connect_uri(
        uri: &str,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        let endpoint = UriPolicy::default().resolve(uri)?;
        Self::connect_endpoint(&endpoint, config, registry, token)
    }

    /// Connects to what a URI resolved to (by a [`UriPolicy`] of the
    /// caller's): its target, with its export name replacing
    /// `config.export_name`. An `nbds` endpoint requires TLS, set up from its
    /// `tls-*` parameters (see [`nbd_io::tls`]); the files they name are read
    /// before connecting, and a reconnect ([`Client::set_reconnect`]) sets
    /// up the same TLS again.
    pub fn connect_endpoint(
        endpoint: &Endpoint,
        mut config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        config.export_name = endpoint.export_name.clone();
        if endpoint.tls.is_none() {
            return Self::connect(&endpoint.target, config, registry, token);
        }
        let conn = nbd_io::tls::connection_for(endpoint, config.clone())?;
        let connecting = Connecting::start(&endpoint.target)?;
        let mut client = Self::start(Link::Connecting(connecting), conn, registry, token)?;
        client.origin = Some((endpoint.target.clone(), config));
        client.origin_tls = endpoint.tls.clone();
        Ok(client)
    }

    fn start(link: Link, mut conn: Connection, registry: &Registry, token: Token) -> Result<Self> {
        let fd = link.fd().ok_or_else(|| {
            nbd_proto::Error::InvalidArgument(
                "the connect is over: its socket was already handed out".into(),
            )
        })?;
        let registry = registry.try_clone()?;
        registry.register(
            &mut SourceFd(&fd),
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // The handshake's clock (if it has one) runs from the connect on.
        conn.handle_timeout(Instant::now());
        Ok(Client {
            conn,
            link,
            token,
            registry,
            write_blocked: false,
            completions: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
            origin: None,
            origin_tls: None,
            reconnect: None,
            reconnects: VecDeque::new(),
        })
    }

    /// The token this connection was registered under.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The protocol state: phase, export queries, settings.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Traffic counters of this connection (libnbd's `stats_bytes_sent`,
    /// `stats_bytes_received`, `stats_chunks_sent`, `stats_chunks_received`).
    pub fn stats(&self) -> nbd_proto::Stats {
        self.conn.stats()
    }

    /// Mutable protocol state, for settings such as strict mode.
    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Whether the connection is over (closed or dead); its last events are still queued.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    // ------------------------------------------------------------ driving

    /// Handles a readiness event for this connection's token.
    ///
    /// Returns the connection's error once it is dead (see [`drive`](Self::drive)).
    pub fn handle_event(&mut self, event: &mio::event::Event) -> Result<()> {
        if event.is_writable() {
            self.write_blocked = false;
        }
        self.drive()
    }

    /// Moves every byte that can move now: finds out whether a connect under
    /// way has finished, writes until done or blocked, reads until the socket
    /// is drained. Safe to call at any time.
    ///
    /// Once the connection is dead this returns its error, on the call that
    /// saw it end and on every later one (a socket error is returned as such
    /// the first time); every pending command has then completed with an
    /// error. After a clean close it returns `Ok` and does nothing.
    pub fn drive(&mut self) -> Result<()> {
        let result = if self.closed {
            Ok(())
        } else {
            self.drive_inner()
        };
        let now = Instant::now();
        self.conn.handle_timeout(now);
        self.collect_events();
        self.step_reconnect(now);
        self.end_result(result)
    }

    // ------------------------------------------------------------ time

    /// When the connection next needs [`handle_timeout`](Self::handle_timeout)
    /// (`Connection::poll_timeout`): `None` when nothing is timed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let core = self.conn.poll_timeout();
        match self.reconnect.as_ref().and_then(|r| r.wake_at()) {
            Some(at) => Some(core.map_or(at, |t| t.min(at))),
            None => core,
        }
    }

    /// The timeout to pass to `Poll::poll`: how long from now until
    /// [`next_deadline`](Self::next_deadline) (zero if it is due), `None`
    /// when nothing is timed. With several connections on one `Poll`, pass
    /// the shortest.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.next_deadline()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Passes the time in (`Connection::handle_timeout`): starts the
    /// deadlines waiting for it and carries out those that passed at `now`.
    /// Call it after every wake-up of the loop. A command whose deadline
    /// passed completes with `ETIMEDOUT` (see
    /// [`next_completion`](Self::next_completion)); a passed stall or
    /// handshake deadline ends the connection and its error is returned, as
    /// from [`drive`](Self::drive).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        self.conn.handle_timeout(now);
        self.collect_events();
        self.step_reconnect(now);
        self.end_result(Ok(()))
    }

    fn drive_inner(&mut self) -> Result<()> {
        if !self.connected()? {
            return Ok(());
        }
        loop {
            let wrote = self.write_some()?;
            let Link::Open(socket) = &mut self.link else {
                return Ok(());
            };
            // Edge-triggered: read until drained, or the edge is lost.
            let read = pump::read_available(&mut self.conn, socket, None)?;
            // Reads may have queued output (handshake replies, a disconnect
            // the core held back for the last reply); go round until idle.
            if !wrote && !read {
                return Ok(());
            }
        }
    }

    /// Whether the socket is connected, finding out first if a connect is
    /// under way. A connect that fails for good ends the connection, so its
    /// error reaches the loop once and the connection's error after that.
    fn connected(&mut self) -> Result<bool> {
        let result = self.advance_connect();
        if result.is_err() {
            let _ = self.conn.notify_read(0);
        }
        result
    }

    fn advance_connect(&mut self) -> Result<bool> {
        loop {
            let Link::Connecting(connecting) = &mut self.link else {
                return Ok(true);
            };
            match connecting.advance()? {
                Progress::Waiting => return Ok(false),
                Progress::Retrying { abandoned, .. } => {
                    // The next address, on a socket of its own: watch it
                    // instead, and see at once whether it connected already.
                    let _ = self
                        .registry
                        .deregister(&mut SourceFd(&abandoned.as_raw_fd()));
                    drop(abandoned);
                    if let Some(fd) = self.link.fd() {
                        self.registry.register(
                            &mut SourceFd(&fd),
                            self.token,
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                    }
                    self.write_blocked = false;
                }
                Progress::Connected(socket) => {
                    // The same descriptor: its registration carries on.
                    self.link = Link::Open(socket);
                    return Ok(true);
                }
            }
        }
    }

    /// The result of a driving call: its own error, else the connection's
    /// sticky error if it is dead.
    fn end_result(&self, result: Result<()>) -> Result<()> {
        if let Some(r) = &self.reconnect {
            if let Some(failure) = &r.failure {
                return Err(failure.clone().into());
            }
            if r.keeps_lost(&self.conn) {
                // Lost, and a reconnect is under way: not the end.
                return Ok(());
            }
        }
        result?;
        match self.conn.error() {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Writes what is pending without reading; call after issuing commands.
    /// Returns the connection's error once it is dead.
    pub fn send(&mut self) -> Result<()> {
        let result = if self.closed {
            Ok(())
        } else {
            match self.connected() {
                Ok(true) => self.write_some().map(drop),
                other => other.map(drop),
            }
        };
        let now = Instant::now();
        self.conn.handle_timeout(now);
        self.collect_events();
        self.step_reconnect(now);
        self.end_result(result)
    }

    /// Writes until done or the socket would block; whether anything moved.
    pub(crate) fn write_some(&mut self) -> Result<bool> {
        let Link::Open(socket) = &mut self.link else {
            return Ok(false);
        };
        if self.write_blocked {
            return Ok(false);
        }
        let written = pump::write_pending(&mut self.conn, socket)?;
        self.write_blocked = written.blocked;
        Ok(written.moved)
    }

    /// Stops watching the socket and shuts it down.
    pub(crate) fn release_socket(&mut self) -> io::Result<()> {
        let deregistered = match self.link.fd() {
            Some(fd) => self.registry.deregister(&mut SourceFd(&fd)),
            None => Ok(()),
        };
        if let Link::Open(socket) = &self.link {
            let _ = socket.shutdown();
        }
        deregistered
    }

    fn collect_events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Completed(c) => {
                    if let Some(c) = self.caller_completion(c) {
                        self.completions.push_back(c);
                    }
                }
                Event::Closed { .. }
                    if self
                        .reconnect
                        .as_ref()
                        .is_some_and(|r| r.keeps_lost(&self.conn)) =>
                {
                    // Lost, and about to reconnect: only the socket is over.
                    let _ = self.release_socket();
                }
                Event::Closed { .. } => {
                    self.closed = true;
                    let _ = self.release_socket();
                    self.events.push_back(event);
                }
                Event::ReadChunk(mut chunk) => {
                    match &mut chunk {
                        ReadChunk::Data { cookie, .. }
                        | ReadChunk::Hole { cookie, .. }
                        | ReadChunk::Error { cookie, .. } => *cookie = self.caller_cookie(*cookie),
                        _ => {}
                    }
                    self.events.push_back(Event::ReadChunk(chunk));
                }
                Event::BlockStatus(mut status) => {
                    status.cookie = self.caller_cookie(status.cookie);
                    self.events.push_back(Event::BlockStatus(status));
                }
                other => self.events.push_back(other),
            }
        }
    }

    /// The oldest finished command not yet taken: cookie, result, buffer back.
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    /// The oldest other event not yet taken: `Ready`, `Negotiating`, `Export`,
    /// `OptionDone`, `ReadChunk` (for structured reads), `Closed`.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ------------------------------------------------------------ commands

    /// Queues a read into `buf`; call [`send`](Self::send) to send.
    pub fn aio_pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let len = buf.len();
        let read = Request::Read {
            len,
            offset,
            flags,
            structured: false,
        };
        self.issue(read, Some(buf))
    }

    /// Queues a read that also reports each chunk as an `Event::ReadChunk`.
    pub fn aio_pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        let len = buf.len();
        let read = Request::Read {
            len,
            offset,
            flags,
            structured: true,
        };
        self.issue(read, Some(buf))
    }

    /// Queues a write; the payload is sent without copying.
    pub fn aio_pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let write = Request::Write {
            data,
            offset,
            flags,
        };
        self.issue(write, None)
    }

    /// Queues a flush (`NBD_CMD_FLUSH`).
    pub fn aio_flush(&mut self, flags: CmdFlags) -> Result<Cookie> {
        self.issue(Request::Flush { flags }, None)
    }

    /// Queues a trim.
    pub fn aio_trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let request = Request::Trim {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Queues a cache (prefetch).
    pub fn aio_cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let request = Request::Cache {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Queues a block status query over every negotiated meta context; each
    /// context's extents arrive as an `Event::BlockStatus` from
    /// [`next_event`](Self::next_event) before the completion.
    pub fn aio_block_status(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let request = Request::BlockStatus {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Takes the block status reports that arrived for `cookie` (one per
    /// negotiated context) out of the event queue, leaving every other event.
    pub fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        let mut mine = Vec::new();
        let mut rest = std::collections::VecDeque::with_capacity(self.events.len());
        for event in self.events.drain(..) {
            match event {
                Event::BlockStatus(status) if status.cookie == cookie => mine.push(status),
                other => rest.push_back(other),
            }
        }
        self.events = rest;
        mine
    }

    /// Queues a write of zeroes.
    pub fn aio_zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let request = Request::Zero {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Asks the server to end the connection (libnbd's `aio_disconnect`).
    /// New commands are refused from now on (ESHUTDOWN). If commands are in
    /// flight, the core holds `NBD_CMD_DISC` back until they have all
    /// completed (a server that sees it earlier may cut them short) and it
    /// goes out from [`handle_event`](Self::handle_event) then; otherwise it
    /// is sent now. Keep handling events until [`is_closed`](Self::is_closed).
    pub fn aio_disconnect(&mut self) -> Result<()> {
        self.conn.disconnect()?;
        // Commands queued but not yet sent must go out either way.
        self.send()
    }

    /// Commands issued and not yet completed.
    pub fn in_flight(&self) -> usize {
        match &self.reconnect {
            Some(r) => r.journal.len(),
            None => self.conn.in_flight(),
        }
    }

    // ------------------------------------------------------------ opt mode

    /// Opt mode: asks for the export list; results arrive as events.
    pub fn aio_opt_list(&mut self) -> Result<()> {
        self.conn.opt_list()?;
        self.send()
    }

    /// Opt mode: asks about the current export.
    pub fn aio_opt_info(&mut self) -> Result<()> {
        self.conn.opt_info()?;
        self.send()
    }

    /// Opt mode: selects the export and enters transmission.
    pub fn aio_opt_go(&mut self) -> Result<()> {
        self.conn.opt_go()?;
        self.send()
    }

    /// Opt mode: asks the server to start TLS (libnbd's `aio_opt_starttls`;
    /// see [`nbd_proto::Connection::opt_starttls`]). The result arrives as
    /// an `OptionDone` event.
    pub fn aio_opt_starttls(&mut self) -> Result<()> {
        self.conn.opt_starttls()?;
        self.send()
    }

    /// Opt mode: ends negotiation.
    pub fn aio_opt_abort(&mut self) -> Result<()> {
        self.conn.opt_abort()?;
        self.send()
    }

    /// Removes the socket from the registry (unless the connection already
    /// did, on closing) and closes it, at once.
    ///
    /// `Ok` means every command issued on this client either succeeded or had
    /// its completion taken by the caller. Commands still in flight are
    /// abandoned (their outcome is unknown), and completions not taken that
    /// failed are not done: either makes it [`Error::CommandsFailed`], with
    /// how many and the first cause. To end gracefully, call
    /// [`aio_disconnect`](Self::aio_disconnect) and handle events until
    /// [`is_closed`](Self::is_closed) first.
    pub fn close(mut self) -> Result<()> {
        let deregistered = if self.closed {
            Ok(())
        } else {
            self.release_socket()
        };
        let abandoned = self.in_flight();
        let mut failures = self
            .completions
            .iter()
            .filter_map(|c| c.result.as_ref().err());
        let first = failures.next().cloned();
        let count = first.is_some() as usize + failures.count() + abandoned;
        if count > 0 {
            let first = first.unwrap_or_else(|| {
                nbd_proto::Error::NotConnected(format!(
                    "closed with {abandoned} command(s) in flight; their outcome is unknown"
                ))
            });
            return Err(Error::CommandsFailed { count, first });
        }
        Ok(deregistered?)
    }
}
