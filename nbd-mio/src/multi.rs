//! [`MultiConn`]: several connections to one multi-conn export, used as one.
//!
//! Commands are spread round-robin over the connections. A flush is honoured
//! across all of them: it waits until every write issued before it (on any
//! connection) has completed, then sends one `NBD_CMD_FLUSH`, which the server's
//! multi-conn promise makes cover the writes of every connection. Trims and
//! zeroes count as writes for that; caches and block status queries do not.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use mio::{Registry, Token};
use nbd_proto::{BlockStatus, CmdFlags, Config, Cookie, CookieMap, CookieSet};

use nbd_io::{Error, Result, Target, UriPolicy};

use crate::client::Client;

/// Names one command issued through a [`MultiConn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MultiCookie(u64);

/// A finished [`MultiConn`] command.
#[derive(Debug)]
pub struct MultiCompletion {
    /// The id its call returned.
    pub cookie: MultiCookie,
    /// Success, or why it failed.
    pub result: Result<(), nbd_proto::Error>,
    /// The read buffer, handed back.
    pub buffer: Option<BytesMut>,
}

struct PendingFlush {
    id: MultiCookie,
    flags: CmdFlags,
    /// Writes that must complete before the flush goes out.
    waiting_for: CookieSet<MultiCookie>,
}

/// N connections to one export whose server advertises multi-conn.
///
/// Register each under its own token (`base`, `base + 1`, ...), pass every
/// event to [`handle_event`](Self::handle_event), and call
/// [`send`](Self::send) after issuing commands. As with [`Client`],
/// `handle_event` returns a connection's error once it is dead (a refused
/// handshake included), so a loop waiting for [`is_ready`](Self::is_ready)
/// or for completions ends instead of waiting forever.
pub struct MultiConn {
    clients: Vec<Client>,
    base: usize,
    next: usize,
    next_id: u64,
    /// (connection, cookie) to the caller's id.
    ids: CookieMap<(usize, Cookie), MultiCookie>,
    writes_in_flight: CookieSet<MultiCookie>,
    /// Block status queries in flight.
    queries_in_flight: CookieSet<MultiCookie>,
    /// Reports of finished block status queries, until taken.
    statuses: CookieMap<MultiCookie, Vec<BlockStatus>>,
    flushes: Vec<PendingFlush>,
    completions: VecDeque<MultiCompletion>,
    /// The caller asked to disconnect: no new commands; each connection is
    /// told once the flushes held back here have gone out.
    disconnecting: bool,
}

impl MultiConn {
    /// Opens `count` connections to `uri` (accepted by the default
    /// [`UriPolicy`]; its export name replaces `config.export_name`),
    /// registered under tokens `base..base + count`. An `nbds` URI makes
    /// each connection require TLS, as [`Client::connect_uri`] does.
    pub fn connect_uri(
        uri: &str,
        count: usize,
        config: Config,
        registry: &Registry,
        base: Token,
    ) -> Result<Self> {
        let endpoint = UriPolicy::default().resolve(uri)?;
        Self::open(count, base, |token| {
            Client::connect_endpoint(&endpoint, config.clone(), registry, token)
        })
    }

    /// Opens `count` connections to `target`, registered under tokens
    /// `base..base + count`, each connecting without blocking as
    /// [`Client::connect`] does.
    ///
    /// A target that starts a server program of its own (command, socket
    /// activation) would start one server per connection, which multi-conn
    /// cannot make consistent: with more than one connection it is refused.
    pub fn connect(
        target: &Target,
        count: usize,
        config: Config,
        registry: &Registry,
        base: Token,
    ) -> Result<Self> {
        if count > 1 && target.starts_server() {
            return Err(nbd_proto::Error::InvalidArgument(format!(
                "{target}: each connection would start a server of its own; \
                 a multi-conn group needs one server"
            ))
            .into());
        }
        Self::open(count, base, |token| {
            Client::connect(target, config.clone(), registry, token)
        })
    }

    fn open(
        count: usize,
        base: Token,
        connect: impl FnMut(Token) -> Result<Client>,
    ) -> Result<Self> {
        if count == 0 {
            return Err(nbd_proto::Error::InvalidArgument(
                "a multi-conn group needs at least one connection".into(),
            )
            .into());
        }
        let clients = (0..count)
            .map(|i| Token(base.0 + i))
            .map(connect)
            .collect::<Result<Vec<_>>>()?;
        Ok(MultiConn {
            clients,
            base: base.0,
            next: 0,
            next_id: 1,
            ids: CookieMap::default(),
            writes_in_flight: CookieSet::default(),
            queries_in_flight: CookieSet::default(),
            statuses: CookieMap::default(),
            flushes: Vec::new(),
            completions: VecDeque::new(),
            disconnecting: false,
        })
    }

    /// Whether `token` belongs to this group.
    pub fn owns(&self, token: Token) -> bool {
        (self.base..self.base + self.clients.len()).contains(&token.0)
    }

    /// The connections.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Whether every connection has reached transmission. Errors if one died or
    /// if the server does not advertise multi-conn while several are open.
    pub fn is_ready(&self) -> Result<bool> {
        for c in &self.clients {
            if let Some(e) = c.connection().error() {
                return Err(e.clone().into());
            }
        }
        if !self.clients.iter().all(|c| c.connection().is_ready()) {
            return Ok(false);
        }
        if self.clients.len() > 1 && !self.clients[0].connection().can_multi_conn()? {
            return Err(Error::Unsupported(
                "the server does not advertise multi-conn; several connections would not be consistent".into(),
            ));
        }
        Ok(true)
    }

    /// Handles a readiness event for any of the group's tokens.
    pub fn handle_event(&mut self, event: &mio::event::Event) -> Result<()> {
        if !self.owns(event.token()) {
            return Ok(());
        }
        let i = event.token().0 - self.base;
        let result = self.clients[i].handle_event(event);
        self.collect_all();
        result
    }

    /// Sends what the connections have queued. Every connection gets its turn
    /// even if one fails; the first failure is returned, and the commands of a
    /// failed connection complete with errors.
    pub fn send(&mut self) -> Result<()> {
        let mut first_error = None;
        for c in &mut self.clients {
            if let Err(e) = c.send() {
                first_error.get_or_insert(e);
            }
        }
        self.collect_all();
        first_error.map_or(Ok(()), Err)
    }

    /// The timeout to pass to `Poll::poll`: the soonest of every
    /// connection's [`Client::poll_timeout`]; `None` when nothing is timed.
    pub fn poll_timeout(&self) -> Option<std::time::Duration> {
        self.clients.iter().filter_map(Client::poll_timeout).min()
    }

    /// Passes the time in to every connection ([`Client::handle_timeout`]);
    /// call it after every wake-up of the loop. Every connection gets its
    /// turn; the first error is returned.
    pub fn handle_timeout(&mut self, now: std::time::Instant) -> Result<()> {
        let mut first_error = None;
        for c in &mut self.clients {
            if let Err(e) = c.handle_timeout(now) {
                first_error.get_or_insert(e);
            }
        }
        self.collect_all();
        first_error.map_or(Ok(()), Err)
    }

    /// Takes the completions of every connection: a connection that failed
    /// while sending gets no more events, but its commands completed all the same.
    fn collect_all(&mut self) {
        for i in 0..self.clients.len() {
            self.collect(i);
        }
        self.release_disconnects();
    }

    fn collect(&mut self, i: usize) {
        while let Some(done) = self.clients[i].next_completion() {
            let Some(id) = self.ids.remove(&(i, done.cookie)) else {
                continue;
            };
            self.writes_in_flight.remove(&id);
            if self.queries_in_flight.remove(&id) {
                let reports = self.clients[i].take_block_status(done.cookie);
                // Nothing is kept for a query without reports (a failed one).
                if !reports.is_empty() {
                    self.statuses.insert(id, reports);
                }
            }
            for f in &mut self.flushes {
                f.waiting_for.remove(&id);
            }
            self.completions.push_back(MultiCompletion {
                cookie: id,
                result: done.result,
                buffer: done.buffer,
            });
        }
        self.release_flushes();
    }

    /// Sends the flushes whose writes have all completed.
    ///
    /// Each goes out on the next connection that takes it; if none does (all
    /// closed), the flush completes with the last connection's error, so it is
    /// never lost.
    fn release_flushes(&mut self) {
        let mut at = 0;
        while at < self.flushes.len() {
            if !self.flushes[at].waiting_for.is_empty() {
                at += 1;
                continue;
            }
            let f = self.flushes.remove(at);
            let mut last_error = None;
            let mut sent = false;
            for _ in 0..self.clients.len() {
                let i = self.pick();
                match self.clients[i].aio_flush(f.flags) {
                    Ok(cookie) => {
                        self.ids.insert((i, cookie), f.id);
                        // A send failure fails the flush through the connection's completions.
                        let _ = self.clients[i].send();
                        sent = true;
                        break;
                    }
                    Err(Error::Nbd(e)) => last_error = Some(e),
                    Err(e) => last_error = Some(nbd_proto::Error::NotConnected(e.to_string())),
                }
            }
            if !sent {
                let error = last_error
                    .unwrap_or_else(|| nbd_proto::Error::NotConnected("no connection".into()));
                self.completions.push_back(MultiCompletion {
                    cookie: f.id,
                    result: Err(error),
                    buffer: None,
                });
            }
        }
    }

    fn pick(&mut self) -> usize {
        let i = self.next % self.clients.len();
        self.next = self.next.wrapping_add(1);
        i
    }

    fn issue(&mut self, i: usize, cookie: Cookie) -> MultiCookie {
        let id = MultiCookie(self.next_id);
        self.next_id += 1;
        self.ids.insert((i, cookie), id);
        id
    }

    /// New commands are refused once the caller asked to disconnect.
    fn check_accepting(&self) -> Result<()> {
        if self.disconnecting {
            return Err(nbd_proto::Error::Shutdown(
                "the connections are disconnecting; no new commands".into(),
            )
            .into());
        }
        Ok(())
    }

    /// Queues a read on the next connection.
    pub fn aio_pread(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<MultiCookie> {
        self.check_accepting()?;
        let i = self.pick();
        let cookie = self.clients[i].aio_pread(buf, offset, flags)?;
        Ok(self.issue(i, cookie))
    }

    /// Queues a write on the next connection.
    pub fn aio_pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<MultiCookie> {
        self.issue_write(|c| c.aio_pwrite(data, offset, flags))
    }

    /// Queues a command that changes data on the next connection, as a write
    /// for the flushes issued after it.
    fn issue_write(
        &mut self,
        start: impl FnOnce(&mut Client) -> Result<Cookie>,
    ) -> Result<MultiCookie> {
        self.check_accepting()?;
        let i = self.pick();
        let cookie = start(&mut self.clients[i])?;
        let id = self.issue(i, cookie);
        self.writes_in_flight.insert(id);
        Ok(id)
    }

    /// Queues a trim of `count` bytes at `offset` on the next connection.
    pub fn aio_trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<MultiCookie> {
        self.issue_write(|c| c.aio_trim(count, offset, flags))
    }

    /// Queues a write of `count` zeroes at `offset` on the next connection.
    pub fn aio_zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<MultiCookie> {
        self.issue_write(|c| c.aio_zero(count, offset, flags))
    }

    /// Queues a cache (prefetch) of `count` bytes at `offset` on the next connection.
    pub fn aio_cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<MultiCookie> {
        self.check_accepting()?;
        let i = self.pick();
        let cookie = self.clients[i].aio_cache(count, offset, flags)?;
        Ok(self.issue(i, cookie))
    }

    /// Queues a block status query on the next connection (every connection
    /// negotiated the same contexts). Once it has completed, its reports are
    /// taken with [`take_block_status`](Self::take_block_status).
    pub fn aio_block_status(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<MultiCookie> {
        self.check_accepting()?;
        let i = self.pick();
        let cookie = self.clients[i].aio_block_status(count, offset, flags)?;
        let id = self.issue(i, cookie);
        self.queries_in_flight.insert(id);
        Ok(id)
    }

    /// Takes the reports (one per context) of the finished block status
    /// query `id`; empty if it has none, failed, or they were taken already.
    /// Each report's `cookie` is the one of the connection that carried it.
    pub fn take_block_status(&mut self, id: MultiCookie) -> Vec<BlockStatus> {
        self.statuses.remove(&id).unwrap_or_default()
    }

    /// Queues a flush covering every write issued before it on any connection.
    pub fn aio_flush(&mut self, flags: CmdFlags) -> Result<MultiCookie> {
        self.check_accepting()?;
        let id = MultiCookie(self.next_id);
        self.next_id += 1;
        self.flushes.push(PendingFlush {
            id,
            flags,
            waiting_for: self.writes_in_flight.clone(),
        });
        self.release_flushes();
        Ok(id)
    }

    /// Commands issued through the group and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ids.len() + self.flushes.len()
    }

    /// The oldest finished command not yet taken.
    pub fn next_completion(&mut self) -> Option<MultiCompletion> {
        if self.completions.is_empty() {
            self.collect_all();
        }
        self.completions.pop_front()
    }

    /// Disconnects every connection gracefully, without waiting: new commands
    /// are refused, every command issued through the group (flushes held back
    /// for earlier writes included) still goes out and completes, and each
    /// connection sends `NBD_CMD_DISC` once nothing of it is in flight. Keep
    /// handling events until [`is_closed`](Self::is_closed); take the
    /// completions to see whether everything succeeded.
    pub fn aio_disconnect(&mut self) -> Result<()> {
        self.disconnecting = true;
        self.release_disconnects();
        self.send()
    }

    /// Tells each connection to disconnect once no flush waits here to be
    /// sent on one of them (each holds its `NBD_CMD_DISC` for its own
    /// commands). A connection that is already over needs no telling.
    fn release_disconnects(&mut self) {
        if !self.disconnecting || !self.flushes.is_empty() {
            return;
        }
        for c in &mut self.clients {
            if c.connection().is_ready() {
                // A failure here is the connection's end, which handle_event
                // reports and which fails its commands.
                let _ = c.aio_disconnect();
            }
        }
    }

    /// Whether every connection of the group is over (closed or dead).
    pub fn is_closed(&self) -> bool {
        self.clients.iter().all(Client::is_closed)
    }
}
