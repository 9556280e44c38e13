//! [`Client`]: one NBD connection driven by the caller's mio `Poll`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use mio::{Interest, Registry, Token};
use nbd_proto::uri::{NbdUri, Transport};
use nbd_proto::{CmdFlags, Completion, Config, Connection, Cookie, Event};

use crate::error::{Error, Result};
use crate::stream::Stream;

/// An NBD connection registered with a caller's mio [`Registry`].
///
/// The socket is registered once, for readable and writable readiness, under the
/// caller's token. On every event for that token call
/// [`handle_event`](Self::handle_event): it reads until the socket would block
/// (so no edge-triggered wakeup is lost) and writes what it can. Commands only
/// queue bytes; call [`send`](Self::send) after issuing a batch to send them.
/// A write that would block waits for the next writable event, so an idle
/// or stalled connection costs nothing until the server moves.
///
/// Every way the connection can end reaches this loop: once the connection is
/// dead (refused connect, export refused during the handshake, server gone,
/// protocol violation), [`handle_event`](Self::handle_event) and
/// [`drive`](Self::drive) return its error, on the call that saw it and on every
/// later call, and its commands complete with errors. A clean end (after
/// [`disconnect`](Self::disconnect) or `opt_abort`) is `Ok`, with
/// [`is_closed`](Self::is_closed) true and an `Event::Closed` without error.
/// The socket is deregistered when the connection ends, so no further events
/// come: a loop must stop waiting once `is_closed` is true.
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
///     poll.poll(&mut events, None)?;
///     for e in events.iter() {
///         // A refused handshake (no such export, ...) is returned here.
///         client.handle_event(e)?;
///     }
/// }
/// let cookie = client.pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())?;
/// client.send()?;
/// loop {
///     poll.poll(&mut events, None)?;
///     for e in events.iter() {
///         client.handle_event(e)?;
///     }
///     if let Some(done) = client.next_completion() {
///         assert_eq!(done.cookie, cookie);
///         done.result?;
///         break;
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Client {
    conn: Connection,
    stream: Stream,
    token: Token,
    /// Registered with this registry (cloned handle), to re-register on reconnect.
    registry: Registry,
    /// The last write would have blocked: wait for a writable event.
    write_blocked: bool,
    /// No byte has arrived yet: a failure may be a refused connect.
    connecting: bool,
    /// Further addresses to try if the current TCP connect fails.
    spare_addrs: VecDeque<SocketAddr>,
    completions: VecDeque<Completion>,
    events: VecDeque<Event>,
    closed: bool,
}

impl Client {
    /// Starts a non-blocking TCP connect to `addr` (every resolved address is
    /// tried in turn; name resolution itself blocks) and registers the socket.
    pub fn connect_tcp(
        addr: impl ToSocketAddrs,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        let mut addrs: VecDeque<SocketAddr> = addr.to_socket_addrs()?.collect();
        let first = addrs.pop_front().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
        })?;
        let stream = Stream::connect_tcp(first)?;
        Self::start(stream, addrs, config, registry, token)
    }

    /// Starts a non-blocking Unix socket connect and registers the socket.
    pub fn connect_unix(
        path: impl AsRef<Path>,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        Self::start(
            Stream::connect_unix(path)?,
            VecDeque::new(),
            config,
            registry,
            token,
        )
    }

    /// Connects to an NBD URI; its export name replaces `config.export_name`.
    pub fn connect_uri(
        uri: &str,
        mut config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        let uri: NbdUri = uri.parse()?;
        if uri.tls {
            return Err(Error::Unsupported(format!(
                "{}: TLS is not supported yet",
                uri.scheme()
            )));
        }
        config.export_name = uri.export_name.clone();
        match &uri.transport {
            Transport::Tcp { host, port } => {
                Self::connect_tcp((host.as_str(), *port), config, registry, token)
            }
            Transport::Unix { socket } => Self::connect_unix(socket, config, registry, token),
            Transport::Vsock { .. } => Err(Error::Unsupported("vsock is not supported".into())),
        }
    }

    fn start(
        mut stream: Stream,
        spare_addrs: VecDeque<SocketAddr>,
        config: Config,
        registry: &Registry,
        token: Token,
    ) -> Result<Self> {
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Client {
            conn: Connection::new(config),
            stream,
            token,
            registry: registry.try_clone()?,
            write_blocked: false,
            connecting: true,
            spare_addrs,
            completions: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
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

    /// Moves every byte that can move now: writes until done or blocked, reads
    /// until the socket would block. Safe to call at any time.
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
        self.collect_events();
        self.end_result(result)
    }

    fn drive_inner(&mut self) -> Result<()> {
        loop {
            let wrote = self.write_some()?;
            let read = self.read_all()?;
            // Reads may have queued output (handshake replies, a disconnect
            // the core held back for the last reply); go round until idle.
            if !wrote && !read {
                return Ok(());
            }
        }
    }

    /// The result of a driving call: its own error, else the connection's
    /// sticky error if it is dead.
    fn end_result(&self, result: Result<()>) -> Result<()> {
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
            self.write_some().map(drop)
        };
        self.collect_events();
        self.end_result(result)
    }

    fn write_some(&mut self) -> Result<bool> {
        let mut progressed = false;
        while !self.write_blocked && self.conn.wants_write() {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = self.conn.output(&mut iov);
            if n == 0 {
                break;
            }
            match self.stream.write_vectored(&iov[..n]) {
                Ok(0) => {
                    return self
                        .socket_failed(io::ErrorKind::WriteZero.into())
                        .map(|()| true)
                }
                Ok(k) => {
                    self.conn.notify_write(k)?;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected && self.connecting => {
                    // The connect is still in progress; a writable event will follow.
                    self.write_blocked = true;
                }
                Err(e) => return self.connect_or_fail(e).map(|()| true),
            }
        }
        Ok(progressed)
    }

    fn read_all(&mut self) -> Result<bool> {
        let mut progressed = false;
        loop {
            let buf = self.conn.recv_buf();
            if buf.is_empty() {
                return Ok(progressed);
            }
            match self.stream.read(buf) {
                Ok(0) => {
                    if self.connecting {
                        if let Some(e) = self.stream.take_error()? {
                            return self.connect_or_fail(e).map(|()| true);
                        }
                    }
                    self.conn.notify_read(0)?;
                    return Ok(true);
                }
                Ok(n) => {
                    if self.connecting {
                        self.connecting = false;
                        self.stream.set_nodelay()?;
                    }
                    self.conn.notify_read(n)?;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progressed),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected && self.connecting => {
                    return Ok(progressed)
                }
                Err(e) => return self.connect_or_fail(e).map(|()| true),
            }
        }
    }

    /// A connect that failed moves on to the next address; anything else ends the connection.
    fn connect_or_fail(&mut self, e: io::Error) -> Result<()> {
        if self.connecting {
            if let Some(next) = self.spare_addrs.pop_front() {
                let _ = self.registry.deregister(&mut self.stream);
                self.stream = Stream::connect_tcp(next)?;
                self.registry.register(
                    &mut self.stream,
                    self.token,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                self.write_blocked = false;
                return Ok(());
            }
        }
        self.socket_failed(e)
    }

    /// A socket error ends the connection: the core sees end of stream, so every
    /// pending command fails exactly once. An expected end (the server hanging up
    /// after an abort or disconnect) is a clean close, not an error.
    fn socket_failed(&mut self, e: io::Error) -> Result<()> {
        let _ = self.conn.notify_read(0);
        if self.conn.is_closed() {
            Ok(())
        } else {
            Err(Error::Io(e))
        }
    }

    fn collect_events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Completed(c) => self.completions.push_back(c),
                Event::Closed { .. } => {
                    self.closed = true;
                    let _ = self.registry.deregister(&mut self.stream);
                    let _ = self.stream.shutdown();
                    self.events.push_back(event);
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
    pub fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.pread(buf, offset, flags)?)
    }

    /// Queues a read that also reports each chunk as an `Event::ReadChunk`.
    pub fn pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        Ok(self.conn.pread_structured(buf, offset, flags)?)
    }

    /// Queues a write; the payload is sent without copying.
    pub fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.pwrite(data, offset, flags)?)
    }

    /// Queues a flush (`NBD_CMD_FLUSH`).
    pub fn flush(&mut self, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.flush(flags)?)
    }

    /// Queues a trim.
    pub fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.trim(count, offset, flags)?)
    }

    /// Queues a cache (prefetch).
    pub fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.cache(count, offset, flags)?)
    }

    /// Queues a block status query over every negotiated meta context; each
    /// context's extents arrive as an `Event::BlockStatus` from
    /// [`next_event`](Self::next_event) before the completion.
    pub fn block_status(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.block_status(count, offset, flags)?)
    }

    /// Queues a write of zeroes.
    pub fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        Ok(self.conn.zero(count, offset, flags)?)
    }

    /// Asks the server to end the connection (libnbd's `aio_disconnect`).
    /// New commands are refused from now on (ESHUTDOWN). If commands are in
    /// flight, the core holds `NBD_CMD_DISC` back until they have all
    /// completed (a server that sees it earlier may cut them short) and it
    /// goes out from [`handle_event`](Self::handle_event) then; otherwise it
    /// is sent now. Keep handling events until [`is_closed`](Self::is_closed).
    pub fn disconnect(&mut self) -> Result<()> {
        self.conn.disconnect()?;
        // Commands queued but not yet sent must go out either way.
        self.send()
    }

    /// Commands issued and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    // ------------------------------------------------------------ opt mode

    /// Opt mode: asks for the export list; results arrive as events.
    pub fn opt_list(&mut self) -> Result<()> {
        self.conn.opt_list()?;
        self.send()
    }

    /// Opt mode: asks about the current export.
    pub fn opt_info(&mut self) -> Result<()> {
        self.conn.opt_info()?;
        self.send()
    }

    /// Opt mode: selects the export and enters transmission.
    pub fn opt_go(&mut self) -> Result<()> {
        self.conn.opt_go()?;
        self.send()
    }

    /// Opt mode: ends negotiation.
    pub fn opt_abort(&mut self) -> Result<()> {
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
    /// [`disconnect`](Self::disconnect) and handle events until
    /// [`is_closed`](Self::is_closed) first.
    pub fn close(mut self) -> Result<()> {
        let deregistered = if self.closed {
            Ok(())
        } else {
            self.registry.deregister(&mut self.stream)
        };
        let _ = self.stream.shutdown();
        let abandoned = self.conn.in_flight();
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
