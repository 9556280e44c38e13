//! [`Client`]: an NBD connection over an `nbd-io` socket, with blocking and aio-style calls.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_io::{
    pump, Endpoint, Error, Reconnected, Request, Result, Socket, Target, TlsRequest, UriPolicy,
};
use nbd_proto::{
    BlockStatus, CmdFlags, Completion, Config, Connection, Cookie, Direction, Event, ReadChunk,
};

use crate::reconnect::Reconnect;
use crate::wait;

/// Most reads per drive step before writes get another turn. A read shorter
/// than the space offered also ends the step: the socket is drained for now.
const READS_PER_STEP: usize = 8;
/// Largest piece the convenience calls (`read_exact_at`, `write_all_at`) send at once.
const CONVENIENCE_CHUNK: usize = 4 * 1024 * 1024;

/// One export from an export list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

/// A connected NBD client: the `nbd-proto` core driven over an `nbd-io`
/// [`Socket`], waiting with poll(2).
///
/// Calls are named as in libnbd (see `nbd_io`'s "One vocabulary in every
/// adapter"): a plain command call (`pread`, `pwrite`, `flush`, ...) issues
/// the command and waits for its result; an `aio_` call (`aio_pread`, ...,
/// `aio_disconnect`) queues it and returns at once, with a [`Cookie`] for a
/// command. [`Client::poll`] drives the socket and
/// [`Client::next_completion`] hands back finished commands, so many
/// commands can be in flight on one connection. The opt-mode calls
/// (`opt_list`, `opt_go`, ...) wait too.
///
/// No call waits forever in silence: [`Client::poll`] returns at once when
/// nothing is in flight and nothing is waiting to be sent. Time limits are
/// the core's ([`Config::handshake_timeout`], [`Config::command_timeout`],
/// [`Config::stall_timeout`]; see `nbd_proto::Connection::handle_timeout`):
/// every wait here (connecting, the handshake, blocking calls, `poll`,
/// `poll_many`) sleeps in poll(2) no longer than the earlier of the caller's
/// own timeout and the connection's next deadline
/// (`Connection::poll_timeout`), then passes the time in. So a wait costs no
/// CPU, and a deadline fires within one poll(2) wake-up of its instant: a
/// command past its deadline completes with `ETIMEDOUT` (the connection goes
/// on), a stalled server or a slow handshake ends the connection.
///
/// ```no_run
/// use nbd_blocking::Client;
/// use nbd_proto::CmdFlags;
/// let mut client = Client::connect_uri("nbd+unix:///?socket=/tmp/nbd.sock")?;
/// let mut head = vec![0u8; 512];
/// client.read_exact_at(&mut head, 0)?;
/// client.write_all_at(b"hello", 4096)?;
/// client.flush(CmdFlags::empty())?;
/// client.shutdown()?;
/// # Ok::<(), nbd_blocking::Error>(())
/// ```
pub struct Client {
    pub(crate) conn: Connection,
    pub(crate) socket: Socket,
    pub(crate) completed: VecDeque<Completion>,
    pub(crate) chunks: Vec<ReadChunk>,
    pub(crate) statuses: Vec<BlockStatus>,
    contexts: Vec<(u32, String)>,
    exports: Vec<ExportEntry>,
    option_result: Option<nbd_proto::Result<()>>,
    pub(crate) closed: bool,
    /// Where the client connected and with what settings: what a reconnect
    /// needs (`None` for a client made from a socket).
    pub(crate) origin: Option<(Target, Config)>,
    /// The TLS settings connected with, which a reconnect uses again.
    pub(crate) origin_tls: Option<TlsRequest>,
    /// Automatic reconnect, when turned on ([`Client::set_reconnect`]).
    pub(crate) reconnect: Option<Box<Reconnect>>,
    /// Reconnects not yet taken by [`Client::take_reconnects`].
    pub(crate) reconnects: VecDeque<Reconnected>,
}

impl Client {
    // ------------------------------------------------------------ connecting

    /// Reaches `target` (any transport of [`nbd_io::connect`], including a
    /// server program it starts) and negotiates as `config` says. Returns
    /// once the export is ready, or, in opt mode, once the server waits for
    /// options. A server the target started is stopped when the client is
    /// dropped.
    ///
    /// [`Config::handshake_timeout`] bounds connecting and the handshake
    /// together: its clock starts before the connect
    /// ([`nbd_io::connect_within`]). A connect that does not finish in time
    /// is [`Error::TimedOut`]; a handshake that does not, the core's
    /// `TimedOut` error (errno `ETIMEDOUT` either way).
    ///
    /// ```no_run
    /// use nbd_blocking::{Client, Target};
    /// use nbd_proto::Config;
    /// let target = Target::activation(["nbdkit", "memory", "1G"]);
    /// let client = Client::connect(&target, Config::default())?;
    /// assert_eq!(client.size()?, 1 << 30);
    /// # Ok::<(), nbd_blocking::Error>(())
    /// ```
    pub fn connect(target: &Target, config: Config) -> Result<Self> {
        let started = Instant::now();
        let deadline = config
            .handshake_timeout
            .and_then(|t| started.checked_add(t));
        let socket = nbd_io::connect_within(target, deadline)?;
        let origin = (target.clone(), config.clone());
        let mut client = Self::negotiate(socket, Connection::new(config), started)?;
        client.origin = Some(origin);
        Ok(client)
    }

    /// Negotiates over a socket that is already connected (libnbd's
    /// `connect_socket`), for example one made with [`Socket::from_fd`].
    /// The client switches it to non-blocking mode and owns it from now on.
    /// [`Config::handshake_timeout`] bounds the handshake from this call on.
    pub fn connect_socket(socket: Socket, config: Config) -> Result<Self> {
        Self::connect_socket_with(socket, Connection::new(config))
    }

    /// Drives `conn`, a connection not yet started (for example one with a
    /// TLS connector, as [`nbd_io::tls::connection_for`] makes), over a
    /// socket that is already connected, until it is ready or negotiating.
    /// [`Config::handshake_timeout`] bounds the handshake from this call on.
    pub fn connect_socket_with(socket: Socket, conn: Connection) -> Result<Self> {
        Self::negotiate(socket, conn, Instant::now())
    }

    /// Negotiates over `socket`, the handshake's clock running from `started`.
    fn negotiate(socket: Socket, mut conn: Connection, started: Instant) -> Result<Self> {
        socket.set_nonblocking(true)?;
        // The handshake deadline starts at the first time passed in.
        conn.handle_timeout(started);
        let mut client = Client {
            conn,
            socket,
            completed: VecDeque::new(),
            chunks: Vec::new(),
            statuses: Vec::new(),
            contexts: Vec::new(),
            exports: Vec::new(),
            option_result: None,
            closed: false,
            origin: None,
            origin_tls: None,
            reconnect: None,
            reconnects: VecDeque::new(),
        };
        client.run_until(|c| c.conn.is_ready() || c.conn.is_negotiating())?;
        Ok(client)
    }

    /// Connects over TCP to `host` (every address it resolves to in turn)
    /// and negotiates with the default configuration.
    pub fn connect_tcp(host: &str, port: u16) -> Result<Self> {
        Self::connect_tcp_with(host, port, Config::default())
    }

    /// Connects over TCP and negotiates as `config` says.
    pub fn connect_tcp_with(host: &str, port: u16, config: Config) -> Result<Self> {
        let host = host.to_string();
        Self::connect(&Target::Tcp { host, port }, config)
    }

    /// Connects to a Unix socket with the default configuration and negotiates.
    pub fn connect_unix(path: impl Into<PathBuf>) -> Result<Self> {
        Self::connect_unix_with(path, Config::default())
    }

    /// Connects to a Unix socket and negotiates as `config` says.
    pub fn connect_unix_with(path: impl Into<PathBuf>, config: Config) -> Result<Self> {
        Self::connect(&Target::Unix(path.into()), config)
    }

    /// Connects to an NBD URI (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`, `nbd+vsock://CID[:port]/export`)
    /// with the default configuration and URI policy.
    pub fn connect_uri(uri: &str) -> Result<Self> {
        Self::connect_uri_with(uri, Config::default())
    }

    /// Connects to an NBD URI accepted by the default [`UriPolicy`] (every
    /// transport, no local files); the URI's export name replaces
    /// `config.export_name`.
    pub fn connect_uri_with(uri: &str, config: Config) -> Result<Self> {
        Self::connect_uri_with_policy(uri, config, &UriPolicy::default())
    }

    /// Connects to an NBD URI if `policy` accepts it (libnbd's
    /// `set_uri_allow_transports`, `set_uri_allow_tls`,
    /// `set_uri_allow_local_file`); the URI's export name replaces
    /// `config.export_name`. A TLS URI (`nbds`) requires TLS, set up from
    /// its `tls-*` parameters (see [`nbd_io::tls`]).
    pub fn connect_uri_with_policy(uri: &str, config: Config, policy: &UriPolicy) -> Result<Self> {
        Self::connect_endpoint(&policy.resolve(uri)?, config)
    }

    /// Connects to what a URI resolved to (by a [`UriPolicy`] of the
    /// caller's): its target, its export name in place of
    /// `config.export_name`, and, for an `nbds` endpoint, TLS required with
    /// its settings. Files the TLS settings name are read before connecting.
    ///
    /// It is connected as [`Client::connect`] connects its target (the
    /// handshake timeout covers the connect), and a reconnect
    /// ([`Client::set_reconnect`]) sets up the same TLS again.
    pub fn connect_endpoint(endpoint: &Endpoint, mut config: Config) -> Result<Self> {
        config.export_name = endpoint.export_name.clone();
        if endpoint.tls.is_none() {
            return Self::connect(&endpoint.target, config);
        }
        let started = Instant::now();
        let deadline = config
            .handshake_timeout
            .and_then(|t| started.checked_add(t));
        let conn = nbd_io::tls::connection_for(endpoint, config.clone())?;
        let socket = nbd_io::connect_within(&endpoint.target, deadline)?;
        let mut client = Self::negotiate(socket, conn, started)?;
        client.origin = Some((endpoint.target.clone(), config));
        client.origin_tls = endpoint.tls.clone();
        Ok(client)
    }

    /// Sets the stall timeout ([`Config::stall_timeout`], through
    /// `Connection::set_stall_timeout`): how long the server may send nothing
    /// while commands are in flight; `None` (the default) waits as long as
    /// the server takes.
    ///
    /// When it passes, the connection ends: every wait (blocking calls,
    /// [`Client::poll`], [`Client::poll_many`]) returns the core's
    /// `TimedOut` error ([`Error::errno`] is `ETIMEDOUT`), and every pending
    /// command completes once with `ConnectionLost` wrapping it, its buffer
    /// handed back. (Before the core kept time, this limit left the commands
    /// in flight; a connection whose server stalled is now over, which is
    /// what a caller can act on.) For a limit on one command that keeps the
    /// connection, use [`Client::set_command_timeout`].
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.conn.set_stall_timeout(timeout);
    }

    /// Sets [`Config::command_timeout`] for the commands issued from now on:
    /// a command not answered in time completes alone with `ETIMEDOUT`; its
    /// late reply is dropped when it comes and the connection goes on.
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.conn.set_command_timeout(timeout);
    }

    // ------------------------------------------------------------ the core and socket

    /// The protocol state: export queries (`size`, `can_trim`, ...), phase, settings.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Traffic counters of this connection (libnbd's `stats_bytes_sent`,
    /// `stats_bytes_received`, `stats_chunks_sent`, `stats_chunks_received`).
    pub fn stats(&self) -> nbd_proto::Stats {
        self.conn.stats()
    }

    /// Mutable access to the protocol state, for settings such as strict mode.
    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The socket under the client: what it is connected to
    /// ([`Socket::peer`]) and the server it started, if any
    /// ([`Socket::server_pid`]). Reading or writing it directly would
    /// desynchronise the connection.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// Export size in bytes.
    pub fn size(&self) -> Result<u64> {
        Ok(self.conn.size()?)
    }

    /// Drives the socket once: writes what is pending, reads what has arrived,
    /// waiting up to `timeout` (`None`: forever) if neither can proceed.
    /// Returns whether anything moved.
    ///
    /// Returns `Ok(false)` at once, without waiting, when there is nothing to
    /// wait for: no command in flight and nothing to send (an idle client, or
    /// a connection that closed cleanly). A loop that polls until its commands
    /// complete therefore never sleeps forever on a server that owes it nothing.
    ///
    /// It also passes the time in: a command whose deadline passed completes
    /// (with `ETIMEDOUT`), which counts as something moving. The wait is cut
    /// short at the connection's next deadline.
    ///
    /// Errors: the connection's own error once it is dead (its commands have
    /// completed with errors, still available from
    /// [`Client::next_completion`]), including the core's `TimedOut` when the
    /// stall timeout of [`Client::set_timeout`] ended it.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<bool> {
        Self::poll_many(&mut [self], timeout)
    }

    /// Drives several clients at once: each moves what it can, and if none could,
    /// waits up to `timeout` for any of their sockets. Returns whether anything moved.
    ///
    /// This lets one thread copy between two exports without busy-waiting. As
    /// with [`Client::poll`], it returns `Ok(false)` at once when no client has
    /// anything to wait for, returns the error of a client whose connection is
    /// dead (a stall timeout of [`Client::set_timeout`] included). The wait is
    /// cut short at the earliest deadline of any client.
    pub fn poll_many(clients: &mut [&mut Client], timeout: Option<Duration>) -> Result<bool> {
        if Self::try_io_each(clients)? {
            return Ok(true);
        }
        for c in clients.iter_mut() {
            c.recover()?;
            c.check_dead()?;
        }
        let now = Instant::now();
        let mut wait = timeout;
        let mut waits = Vec::with_capacity(clients.len());
        for c in clients.iter() {
            if !c.nothing_to_wait_for() {
                wait = earlier(wait, c.until_deadline(now));
                waits.push((c.socket.as_fd(), c.conn.direction()));
            }
        }
        if waits.is_empty() {
            return Ok(false);
        }
        if wait::any_ready(&waits, wait)? && Self::try_io_each(clients)? {
            return Ok(true);
        }
        let mut expired = false;
        for c in clients.iter_mut() {
            expired |= c.pass_time();
        }
        for c in clients.iter_mut() {
            c.recover()?;
            c.check_dead()?;
        }
        Ok(expired)
    }

    /// Moves what each client can move now, and passes the time in; whether
    /// anything moved or a deadline completed a command.
    fn try_io_each(clients: &mut [&mut Client]) -> Result<bool> {
        let mut progressed = false;
        for c in clients.iter_mut() {
            progressed |= c.try_io()?;
            progressed |= c.pass_time();
        }
        Ok(progressed)
    }

    /// Whether waiting on the socket would be pointless: nothing in flight,
    /// nothing to send, no handshake step under way, or the connection is
    /// over. (The late reply of a timed-out command is not waited for: it
    /// is read, and dropped, whenever the socket is next driven.)
    fn nothing_to_wait_for(&self) -> bool {
        let settled = self.conn.in_flight() == 0
            && !self.conn.wants_write()
            && (self.conn.is_ready() || self.conn.is_negotiating());
        settled || self.conn.direction() == Direction::None
    }

    /// How long from `now` until the connection's next deadline; `None`
    /// when nothing is timed. Zero when the connection wants the time now.
    fn until_deadline(&self, now: Instant) -> Option<Duration> {
        self.conn
            .poll_timeout()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Passes the current time to the connection and collects what that
    /// finished; whether a command completed or the connection died.
    fn pass_time(&mut self) -> bool {
        let before = self.completed.len();
        let was_dead = self.conn.is_dead();
        self.conn.handle_timeout(Instant::now());
        self.collect_events();
        self.completed.len() != before || self.conn.is_dead() != was_dead
    }

    fn check_dead(&self) -> Result<()> {
        match self.conn.error() {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Writes and reads what can move now; whether anything moved.
    fn try_io(&mut self) -> Result<bool> {
        let moved = self.pump()?;
        Ok(moved.wrote || moved.read)
    }

    /// One turn of `nbd-io`'s byte pump: writes what is pending until the
    /// socket would block, then reads at most [`READS_PER_STEP`] times,
    /// stopping at a short read. The connection's events are collected
    /// whatever happened, so a socket that failed still hands every pending
    /// command its completion.
    fn pump(&mut self) -> Result<Moved> {
        let moved = pump::write_pending(&mut self.conn, &mut self.socket).and_then(|written| {
            let read =
                pump::read_available(&mut self.conn, &mut self.socket, Some(READS_PER_STEP))?;
            Ok(Moved {
                wrote: written.moved,
                read,
            })
        });
        self.collect_events();
        match moved {
            // A socket that failed killed the connection; with reconnect on
            // that is no error yet: the next wait connects again.
            Err(_)
                if self
                    .reconnect
                    .as_ref()
                    .is_some_and(|r| r.keeps_lost(&self.conn)) =>
            {
                Ok(Moved {
                    wrote: false,
                    read: true,
                })
            }
            other => other,
        }
    }

    /// Waits with poll(2) until the socket is ready in the direction the
    /// connection wants, or `timeout` passes; false on timeout.
    fn wait_ready(&self, timeout: Option<Duration>) -> Result<bool> {
        let socket = [(self.socket.as_fd(), self.conn.direction())];
        Ok(wait::any_ready(&socket, timeout)?)
    }

    fn collect_events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Completed(c) => {
                    if let Some(c) = self.caller_completion(c) {
                        self.completed.push_back(c);
                    }
                }
                Event::ReadChunk(mut chunk) => {
                    match &mut chunk {
                        ReadChunk::Data { cookie, .. }
                        | ReadChunk::Hole { cookie, .. }
                        | ReadChunk::Error { cookie, .. } => *cookie = self.caller_cookie(*cookie),
                        _ => {}
                    }
                    self.chunks.push(chunk)
                }
                Event::BlockStatus(mut status) => {
                    status.cookie = self.caller_cookie(status.cookie);
                    self.statuses.push(status)
                }
                Event::MetaContext { id, name } => self.contexts.push((id, name)),
                Event::Export { name, description } => {
                    self.exports.push(ExportEntry { name, description })
                }
                Event::OptionDone { result, .. } => self.option_result = Some(result),
                Event::Closed { .. } => self.closed = true,
                // Ready, Negotiating, and kinds this client does not use.
                _ => {}
            }
        }
        self.send_held();
    }

    /// Drives the socket until `done` holds or the connection ends (a
    /// deadline of the core's included).
    ///
    /// Each round writes what is pending and reads what has arrived, then
    /// passes the time in; when nothing arrived it waits on the socket at
    /// once, until the connection's next deadline at most, rather than
    /// trying again, so a command answered later costs one write, one poll
    /// and one read.
    fn run_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> Result<()> {
        loop {
            if done(self) {
                return Ok(());
            }
            self.recover()?;
            self.check_dead()?;
            if self.conn.is_closed() {
                return Err(nbd_proto::Error::NotConnected("connection is closed".into()).into());
            }
            let Moved { read, .. } = self.pump()?;
            if self.pass_time() || read {
                continue;
            }
            if self.conn.direction() == Direction::None {
                // Over: the checks at the top say how.
                continue;
            }
            self.wait_ready(self.until_deadline(Instant::now()))?;
            self.pass_time();
        }
    }

    // ------------------------------------------------------------ aio calls

    /// Starts a read into `buf` (its length is the read's length); returns at once.
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

    /// Starts a read that also reports each reply chunk (see [`Client::take_chunks`]).
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

    /// Starts a write of `data`; returns at once. The payload is sent without copying.
    pub fn aio_pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.issue(
            Request::Write {
                data,
                offset,
                flags,
            },
            None,
        )
    }

    /// Starts a flush.
    pub fn aio_flush(&mut self, flags: CmdFlags) -> Result<Cookie> {
        self.issue(Request::Flush { flags }, None)
    }

    /// Starts a trim of `count` bytes at `offset`.
    pub fn aio_trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.issue(
            Request::Trim {
                count,
                offset,
                flags,
            },
            None,
        )
    }

    /// Starts a cache (prefetch) of `count` bytes at `offset`.
    pub fn aio_cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.issue(
            Request::Cache {
                count,
                offset,
                flags,
            },
            None,
        )
    }

    /// Starts writing `count` zeroes at `offset`.
    pub fn aio_zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.issue(
            Request::Zero {
                count,
                offset,
                flags,
            },
            None,
        )
    }

    /// Starts a block status query over every negotiated meta context; the
    /// extents are taken with [`Client::take_block_status`].
    pub fn aio_block_status(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.issue(
            Request::BlockStatus {
                count,
                offset,
                flags,
            },
            None,
        )
    }

    /// Takes the block status reports that arrived for `cookie`, one per context.
    pub fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.statuses)
            .into_iter()
            .partition(|s| s.cookie == cookie);
        self.statuses = rest;
        mine
    }

    /// Commands issued and not yet completed (libnbd's `aio_in_flight`).
    pub fn in_flight(&self) -> usize {
        match &self.reconnect {
            Some(r) => r.journal.len(),
            None => self.conn.in_flight(),
        }
    }

    /// The oldest finished command not yet taken, if any.
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.completed.pop_front()
    }

    /// Takes the completion of `cookie` if it has finished (libnbd's
    /// `aio_command_completed`, handing back the result and buffer).
    pub fn take_completion(&mut self, cookie: Cookie) -> Option<Completion> {
        let at = self.completed.iter().position(|c| c.cookie == cookie)?;
        self.completed.remove(at)
    }

    /// Takes the chunk reports of structured reads collected so far.
    pub fn take_chunks(&mut self) -> Vec<ReadChunk> {
        std::mem::take(&mut self.chunks)
    }

    /// Blocks until `cookie` finishes and returns its completion.
    ///
    /// A cookie that is neither in flight nor waiting to be taken (already
    /// taken, or never issued here) is an `EINVAL` error, not a wait forever.
    pub fn wait_for(&mut self, cookie: Cookie) -> Result<Completion> {
        if let Some(done) = self.take_completion(cookie) {
            return Ok(done);
        }
        let pending = match &self.reconnect {
            Some(r) => r.journal.is_pending(cookie),
            None => self.conn.is_in_flight(cookie),
        };
        if !pending {
            return Err(nbd_proto::Error::InvalidArgument(format!(
                "{cookie:?} is not in flight and has no completion waiting"
            ))
            .into());
        }
        let mut found = None;
        self.run_until(|c| {
            found = c.take_completion(cookie);
            found.is_some()
        })
        .or_else(|e| match self.take_completion(cookie) {
            Some(done) => {
                found = Some(done);
                Ok(())
            }
            None => Err(e),
        })?;
        Ok(found.expect("loop ends only when found"))
    }

    fn complete(&mut self, cookie: Cookie) -> Result<Option<BytesMut>> {
        let done = self.wait_for(cookie)?;
        done.result?;
        Ok(done.buffer)
    }

    // ------------------------------------------------------------ blocking calls

    /// Reads `buf.len()` bytes at `offset` straight into `buf` and hands it back.
    pub fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<BytesMut> {
        let cookie = self.aio_pread(buf, offset, flags)?;
        Ok(self.complete(cookie)?.expect("reads return their buffer"))
    }

    /// Reads like [`Client::pread`] and also returns the reply's chunks in order:
    /// data, holes and errors with their offsets (libnbd's `pread_structured`).
    pub fn pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<(BytesMut, Vec<ReadChunk>)> {
        let cookie = self.aio_pread_structured(buf, offset, flags)?;
        let done = self.wait_for(cookie)?;
        let mut mine = Vec::new();
        self.chunks.retain(|c| {
            let keep = c.cookie() != cookie;
            if !keep {
                mine.push(c.clone());
            }
            keep
        });
        done.result?;
        Ok((done.buffer.expect("reads return their buffer"), mine))
    }

    /// Writes `data` at `offset` and waits until the server acknowledges it.
    pub fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<()> {
        let cookie = self.aio_pwrite(data, offset, flags)?;
        self.complete(cookie).map(drop)
    }

    /// The status of `count` bytes at `offset` in every negotiated meta context
    /// (libnbd's `block_status_64`): one report per context, each a run of
    /// extents from `offset` (the last may run past the request).
    pub fn block_status(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Vec<BlockStatus>> {
        let cookie = self.aio_block_status(count, offset, flags)?;
        let done = self.wait_for(cookie)?;
        let reports = self.take_block_status(cookie);
        done.result?;
        Ok(reports)
    }

    /// The largest request the convenience calls send: 4 MiB, or less if the
    /// server's maximum block size says so.
    pub fn max_request(&self) -> usize {
        match self.conn.block_sizes() {
            Some(sizes) => CONVENIENCE_CHUNK.min(sizes.maximum as usize),
            None => CONVENIENCE_CHUNK,
        }
    }

    /// Fills `buf` from `offset`, splitting large reads (copies from internal buffers).
    pub fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let chunk = self.max_request();
        let mut scratch = BytesMut::new();
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            scratch.resize(part.len(), 0);
            let at = offset + (i * chunk) as u64;
            scratch = self.pread(scratch, at, CmdFlags::empty())?;
            part.copy_from_slice(&scratch);
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`, splitting large writes.
    pub fn write_all_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let chunk = self.max_request();
        for (i, part) in data.chunks(chunk).enumerate() {
            let at = offset + (i * chunk) as u64;
            self.pwrite(Bytes::copy_from_slice(part), at, CmdFlags::empty())?;
        }
        Ok(())
    }

    /// Flushes written data to stable storage.
    pub fn flush(&mut self, flags: CmdFlags) -> Result<()> {
        let cookie = self.aio_flush(flags)?;
        self.complete(cookie).map(drop)
    }

    /// Discards `count` bytes at `offset`.
    pub fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        let cookie = self.aio_trim(count, offset, flags)?;
        self.complete(cookie).map(drop)
    }

    /// Asks the server to prefetch `count` bytes at `offset`.
    pub fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        let cookie = self.aio_cache(count, offset, flags)?;
        self.complete(cookie).map(drop)
    }

    /// Writes `count` zeroes at `offset`.
    pub fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        let cookie = self.aio_zero(count, offset, flags)?;
        self.complete(cookie).map(drop)
    }

    /// Asks the server to end the connection without waiting (libnbd's
    /// `aio_disconnect`). New commands are refused from now on. If commands
    /// are in flight, the core holds `NBD_CMD_DISC` back until they have all
    /// completed (a server that sees it earlier may cut them short); driving
    /// the client ([`Client::poll`]) sends it then. The connection is closed
    /// once [`Client::connection`] says `is_closed`.
    pub fn aio_disconnect(&mut self) -> Result<()> {
        self.conn.disconnect()?;
        self.try_io().map(drop)
    }

    /// Disconnects gracefully (libnbd's `shutdown`): waits until every command
    /// in flight has completed, then sends `NBD_CMD_DISC`, waits for the
    /// connection to close and shuts the socket. In opt mode it aborts the
    /// negotiation instead.
    ///
    /// `Ok` means every command issued on this client either succeeded or had
    /// its completion taken by the caller: nothing the server did not
    /// acknowledge is reported as done. If completions that were never taken
    /// failed (including commands cut short because the connection ended), it
    /// returns [`Error::CommandsFailed`] with how many and the first cause.
    /// Otherwise a failure of the connection itself (dead, timed out, socket
    /// error) is returned as such.
    pub fn shutdown(mut self) -> Result<()> {
        if self.reconnect.is_some() {
            // Commands the journal still holds (a lost connection not yet
            // replaced, or a resent flush waiting its turn) go out first; if
            // the reconnect fails they complete with its cause, reported below.
            let _ = self.run_until(|c| c.in_flight() == 0);
        }
        let ended = if self.conn.is_negotiating() {
            self.conn
                .opt_abort()
                .map_err(Error::from)
                .and_then(|()| self.run_until(|c| c.closed))
        } else if self.conn.is_ready() {
            self.aio_disconnect()
                .and_then(|()| self.run_until(|c| c.closed))
        } else {
            self.check_dead()
        };
        let _ = self.socket.shutdown();
        match self.untaken_failures() {
            Some(failed) => Err(failed),
            None => ended,
        }
    }

    /// Waits until nothing is in flight, then takes every completion the
    /// caller has not taken: an error if any of them failed. For owners of a
    /// client that issue only blocking calls (such as [`crate::ExportFile`]),
    /// whose leftover completions belong to calls that already returned.
    pub(crate) fn settle(&mut self) -> Result<()> {
        let waited = self.run_until(|c| c.in_flight() == 0);
        let failed = self.untaken_failures();
        self.completed.clear();
        self.chunks.clear();
        self.statuses.clear();
        match failed {
            Some(failed) => Err(failed),
            None => waited,
        }
    }

    /// [`Error::CommandsFailed`] for the completions not taken that failed,
    /// counting commands still in flight (abandoned) as failed too.
    fn untaken_failures(&self) -> Option<Error> {
        let mut failures = self
            .completed
            .iter()
            .filter_map(|c| c.result.as_ref().err());
        let first = failures.next()?.clone();
        let count = 1 + failures.count() + self.in_flight();
        Some(Error::CommandsFailed { count, first })
    }

    // ------------------------------------------------------------ opt mode

    fn wait_option(&mut self) -> Result<()> {
        self.option_result = None;
        self.run_until(|c| c.option_result.is_some())?;
        Ok(self.option_result.take().expect("waited for it")?)
    }

    /// Lists the server's exports (opt mode).
    pub fn opt_list(&mut self) -> Result<Vec<ExportEntry>> {
        self.exports.clear();
        self.conn.opt_list()?;
        self.wait_option()?;
        Ok(std::mem::take(&mut self.exports))
    }

    /// Asks about the current export; afterwards the export queries answer (opt mode).
    pub fn opt_info(&mut self) -> Result<()> {
        self.conn.opt_info()?;
        self.wait_option()
    }

    /// Asks for extended headers (opt mode).
    pub fn opt_extended_headers(&mut self) -> Result<()> {
        self.conn.opt_extended_headers()?;
        self.wait_option()
    }

    /// Lists the meta contexts matching `queries` (all, if empty) (opt mode).
    pub fn opt_list_meta_context(&mut self, queries: &[String]) -> Result<Vec<String>> {
        self.contexts.clear();
        self.conn.opt_list_meta_context_queries(queries)?;
        self.wait_option()?;
        Ok(std::mem::take(&mut self.contexts)
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }

    /// Selects the meta contexts matching `queries` for the current export;
    /// returns the selected ones with their ids (opt mode).
    pub fn opt_set_meta_context(&mut self, queries: &[String]) -> Result<Vec<(u32, String)>> {
        self.contexts.clear();
        self.conn.opt_set_meta_context_queries(queries)?;
        self.wait_option()?;
        Ok(std::mem::take(&mut self.contexts))
    }

    /// Asks the server to start TLS (opt mode, libnbd's `opt_starttls`); the
    /// connection needs a TLS connector (see
    /// [`nbd_proto::Connection::opt_starttls`]). A refusal is returned as the
    /// error and leaves the connection negotiating in plaintext; a failed TLS
    /// handshake ends the connection.
    pub fn opt_starttls(&mut self) -> Result<()> {
        self.conn.opt_starttls()?;
        self.wait_option()
    }

    /// Asks for structured replies (opt mode).
    pub fn opt_structured_reply(&mut self) -> Result<()> {
        self.conn.opt_structured_reply()?;
        self.wait_option()
    }

    /// Selects the current export and enters transmission (opt mode). On refusal
    /// the error is returned and the connection stays negotiating.
    pub fn opt_go(&mut self) -> Result<()> {
        self.option_result = None;
        self.conn.opt_go()?;
        self.run_until(|c| c.conn.is_ready() || c.option_result.is_some())?;
        match self.option_result.take() {
            Some(result) => Ok(result?),
            None => Ok(()),
        }
    }

    /// Ends negotiation without transmission and closes (opt mode).
    pub fn opt_abort(mut self) -> Result<()> {
        self.conn.opt_abort()?;
        let result = self.run_until(|c| c.closed);
        let _ = self.socket.shutdown();
        result
    }

    /// Changes the export name used by `opt_info` and `opt_go`.
    pub fn set_export_name(&mut self, name: &str) -> Result<()> {
        Ok(self.conn.set_export_name(name)?)
    }
}

impl Drop for Client {
    /// Closes without blocking. Commands still in flight are abandoned: their
    /// outcome is unknown and never reported (call [`Client::shutdown`] to wait
    /// for them). With nothing in flight the server is told goodbye if the
    /// socket takes it at once: `NBD_CMD_DISC`, or `NBD_OPT_ABORT` in opt
    /// mode; with commands in flight it is not, as the server could then cut
    /// them short. A server the client started is then stopped.
    fn drop(&mut self) {
        let goodbye = if self.conn.is_negotiating() {
            self.conn.opt_abort().is_ok()
        } else {
            self.conn.is_ready() && self.conn.in_flight() == 0 && self.conn.disconnect().is_ok()
        };
        if goodbye {
            let _ = pump::write_pending(&mut self.conn, &mut self.socket);
        }
    }
}

/// The earlier of two optional waits (`None`: no limit).
fn earlier(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What one turn of the byte pump moved.
struct Moved {
    wrote: bool,
    read: bool,
}
