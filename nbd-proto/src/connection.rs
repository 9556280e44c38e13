//! The [`Connection`]: one NBD connection as a state machine with no I/O of its own.
//!
//! This file holds the phases, the byte paths in and out, and the queries;
//! the public option calls are in `connection/options.rs`, the commands in
//! `connection/commands.rs`. The phases' own state and logic live in
//! `negotiate.rs` ([`Negotiation`]) and `transmit.rs` ([`Transmission`]), which
//! know neither each other nor the connection: they borrow the shared
//! [`Core`] and answer with a [`Step`], and the connection changes phase.

use std::io::{self, IoSlice};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::core::{Core, Step};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::flags::{Strict, TransmissionFlags};
use crate::info::{BlockSizes, ExportInfo, HandshakeStyle};
use crate::negotiate::Negotiation;
use crate::slab::Cookie;
use crate::tls::{TlsConnector, TlsLayer};
use crate::trace;
use crate::transmit::Transmission;

mod commands;
mod counters;
mod options;

/// Where a connection is in its life, as libnbd's `aio_is_*` calls see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Greeting and option exchange in progress (libnbd's "connecting").
    Handshake,
    /// Opt mode: waiting for the caller's next `opt_*` call.
    Negotiating,
    /// Transmission: commands may be issued.
    Ready,
    /// Ended as asked (disconnect, abort).
    Closed,
    /// Ended by an error; [`Connection::error`] says which.
    Dead,
}

/// Whether the connection wants the socket to be read, written, both or neither
/// (libnbd's `aio_get_direction`). Arm the event loop's interest from this after
/// every call that changes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Nothing to do: the connection is over.
    None,
    /// Waiting for server bytes.
    Read,
    /// Output pending; nothing expected from the server.
    Write,
    /// Output pending and server bytes expected.
    Both,
}

impl Direction {
    /// Whether reading is wanted.
    pub fn is_read(self) -> bool {
        matches!(self, Direction::Read | Direction::Both)
    }
    /// Whether writing is wanted.
    pub fn is_write(self) -> bool {
        matches!(self, Direction::Write | Direction::Both)
    }
}

/// Where the adapter's last `recv_buf` pointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvTarget {
    Stage,
    Caller,
    Tls,
}

/// The region the last `recv_buf` offered, valid until `notify_read` reports on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecvOffer {
    target: RecvTarget,
    len: usize,
}

/// Most slices [`Connection::write_to`] offers to one vectored write.
const WRITE_TO_SLICES: usize = 64;

/// The connection's life. Each live phase owns its own state, so what the
/// handshake haggled over is gone once transmission starts.
enum State {
    /// Greeting and option haggling, including opt mode's wait for the caller.
    Handshake(Negotiation),
    /// Transmission: commands may be issued.
    Ready(Transmission),
    Closed,
    Dead(Error),
}

/// One NBD client connection: a pure state machine.
///
/// It never blocks and never does I/O. The adapter moves bytes:
/// - in: read into [`recv_buf`](Self::recv_buf) and report with
///   [`notify_read`](Self::notify_read) (zero-copy), or hand bytes to
///   [`handle_input`](Self::handle_input) (copying);
/// - out: write what [`output`](Self::output) lists and report with
///   [`notify_write`](Self::notify_write);
/// - and arms its event loop from [`direction`](Self::direction).
///
/// Results come out of [`poll_event`](Self::poll_event).
///
/// ```
/// use nbd_proto::{Config, Connection, Direction, Event};
/// use nbd_proto::wire::{consts, ExportNameReply, GreetingStart};
///
/// let mut conn = Connection::new(Config::default());
/// assert_eq!(conn.direction(), Direction::Read);
///
/// // A newstyle server without the fixed flag: the client goes straight to EXPORT_NAME.
/// let mut server = Vec::new();
/// GreetingStart::Newstyle.encode(&mut server);
/// server.extend_from_slice(&0u16.to_be_bytes());
/// conn.handle_input(&server).unwrap();
/// assert!(conn.direction().is_write());
/// let sent = conn.take_output();
/// assert_eq!(&sent[..4], &0u32.to_be_bytes()); // client flags
///
/// let mut reply = Vec::new();
/// ExportNameReply { size: 1 << 20, flags: consts::FLAG_HAS_FLAGS }.encode(true, &mut reply);
/// conn.handle_input(&reply).unwrap();
/// assert!(matches!(conn.poll_event(), Some(Event::Ready)));
/// assert_eq!(conn.size().unwrap(), 1 << 20);
/// assert_eq!(conn.protocol(), Some("newstyle"));
/// ```
pub struct Connection {
    /// Shared by both phases: bytes in and out, events, negotiated facts.
    core: Core,
    state: State,
    tls: Option<TlsLayer>,
    /// What the last `recv_buf` offered, until `notify_read` reports on it.
    recv_offer: Option<RecvOffer>,
    /// Bytes of the last `output` listing not yet reported written.
    out_offered: usize,
    /// The latest time the caller passed in, if any.
    now: Option<Instant>,
    /// When the handshake times out (`Config::handshake_timeout`).
    handshake_deadline: Deadline,
}

impl std::fmt::Debug for Connection {
    /// What a log line or a failed assertion wants to know: the phase, the
    /// export, what was negotiated and how much is in flight.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let disconnecting = match &self.state {
            State::Ready(tx) => tx.is_disconnecting(),
            _ => false,
        };
        f.debug_struct("Connection")
            .field("phase", &self.phase())
            .field("error", &self.error())
            .field("protocol", &self.protocol())
            .field("export_name", &self.core.config.export_name)
            .field("size", &self.core.info.size)
            .field("structured_replies", &self.core.structured)
            .field("extended_headers", &self.core.extended)
            .field("meta_contexts", &self.core.meta)
            .field("tls", &self.tls.is_some())
            .field("in_flight", &self.in_flight())
            .field("wants_write", &self.wants_write())
            .field("disconnecting", &disconnecting)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection that will negotiate as `config` says, waiting for the server's greeting.
    ///
    /// A `config` that fails [`Config::validate`] gives a connection that is dead
    /// from the start with that error (EINVAL): it sends nothing, reads nothing,
    /// and its only event is [`Event::Closed`] with the error.
    ///
    /// ```
    /// use nbd_proto::{Config, Connection, Direction, Errno, Event};
    /// let config = Config::default().export_name("x".repeat(5000));
    /// let mut conn = Connection::new(config);
    /// assert!(conn.is_dead());
    /// assert_eq!(conn.error().unwrap().errno(), Errno::Inval);
    /// assert_eq!(conn.direction(), Direction::None);
    /// assert!(matches!(conn.poll_event(), Some(Event::Closed { error: Some(_) })));
    /// ```
    pub fn new(config: Config) -> Self {
        let invalid = config.validate().err();
        let handshake_deadline = Deadline::arm(config.handshake_timeout);
        let mut conn = Connection {
            core: Core::new(config),
            state: State::Handshake(Negotiation::new()),
            tls: None,
            recv_offer: None,
            out_offered: 0,
            now: None,
            handshake_deadline,
        };
        if let Some(error) = invalid {
            conn.kill(error);
        }
        conn
    }

    /// Gives the connection its source of TLS sessions, used when the server
    /// acknowledges `NBD_OPT_STARTTLS` (see [`TlsConnector`] for why it is a
    /// connector). Needed for [`Config::tls`] other than
    /// [`TlsMode::Disable`](crate::TlsMode::Disable) and for
    /// [`opt_starttls`](Self::opt_starttls); set it before the server's
    /// greeting arrives. Replaces any earlier one.
    pub fn set_tls_connector(&mut self, connector: Box<dyn TlsConnector>) {
        self.core.tls_connector = Some(connector);
    }

    /// Whether the connection switched to TLS (libnbd's `get_tls_negotiated`):
    /// true from the server's acknowledgement of `NBD_OPT_STARTTLS` on. Every
    /// later byte, the TLS handshake first, runs through the session, so a
    /// connection where this is true and that reaches transmission finished
    /// the TLS handshake. With [`TlsMode::Allow`](crate::TlsMode::Allow) a
    /// false here after the handshake means the server was used in plaintext.
    pub fn tls_negotiated(&self) -> bool {
        self.core.tls_on
    }

    /// Runs every byte through `session` from now on.
    #[cfg(test)]
    pub(crate) fn install_tls(&mut self, session: Box<dyn crate::tls::TlsSession>) {
        self.tls = Some(TlsLayer::new(session, false));
        self.core.tls_on = true;
    }

    /// The server acknowledged `NBD_OPT_STARTTLS`: switch to a new session,
    /// forget what plaintext negotiated, and let the handshake go on inside.
    ///
    /// Any plaintext already read past the acknowledgement is an injection
    /// attack (an honest server waits for the client's first TLS message), and
    /// an acknowledgement of a request still waiting to be sent can only be
    /// forged: either ends the connection.
    fn start_tls(&mut self) {
        if !self.core.stage.is_empty() {
            return self.kill(injection_after_starttls());
        }
        if !self.core.output.is_empty() {
            return self.kill(Error::Protocol(
                "NBD_OPT_STARTTLS was acknowledged before the request was sent".into(),
            ));
        }
        let started = match self.core.tls_connector.as_mut() {
            Some(connector) => connector.start(),
            // The option is only sent with a connector present.
            None => Err(Error::Tls("no TLS connector to make a session".into())),
        };
        let session = match started {
            Ok(session) => session,
            Err(e) => return self.kill(e),
        };
        self.tls = Some(TlsLayer::new(session, true));
        self.core.tls_on = true;
        self.core.forget_negotiated();
        if let State::Handshake(negotiation) = &mut self.state {
            if let Err(e) = negotiation.tls_started(&mut self.core) {
                self.kill(e);
            }
        }
    }

    // ------------------------------------------------------------ bytes in

    /// Where the adapter should read the next server bytes to.
    ///
    /// During a large read payload with nothing buffered this is the exact
    /// unfilled region of the caller's read buffer (zero-copy); otherwise it is
    /// the connection's own buffer. Empty when no more input is expected.
    /// Follow each read with exactly one [`notify_read`](Self::notify_read);
    /// [`read_from`](Self::read_from) does both in one call.
    #[must_use = "read into the returned buffer, then report with notify_read"]
    pub fn recv_buf(&mut self) -> &mut [u8] {
        let (target, buf): (RecvTarget, &mut [u8]) = if !self.takes_input() {
            (RecvTarget::Stage, &mut [])
        } else if let Some(tls) = self.tls.as_mut() {
            (RecvTarget::Tls, tls.cipher_space())
        } else {
            let (caller, read_ahead) = match &mut self.state {
                State::Ready(tx) => {
                    let read_ahead = tx.read_ahead();
                    (tx.caller_region(self.core.stage.is_empty()), read_ahead)
                }
                _ => (None, usize::MAX),
            };
            match caller {
                Some(region) => (RecvTarget::Caller, region),
                None => {
                    let space = self.core.stage.space();
                    let n = space.len().min(read_ahead);
                    (RecvTarget::Stage, &mut space[..n])
                }
            }
        };
        self.recv_offer = Some(RecvOffer {
            target,
            len: buf.len(),
        });
        buf
    }

    /// Whether server bytes are still expected: the connection is not over.
    fn takes_input(&self) -> bool {
        matches!(self.state, State::Handshake(_) | State::Ready(_))
    }

    /// Reports that `n` bytes were read into the last [`recv_buf`](Self::recv_buf);
    /// `n == 0` means the server closed its end (that needs no `recv_buf`).
    ///
    /// Errors, changing nothing:
    /// - [`Error::InvalidArgument`] (EINVAL) if `n` is larger than the last
    ///   `recv_buf`, or if no `recv_buf` offered space since the last report:
    ///   each `recv_buf` takes exactly one report;
    /// - the sticky error if the connection cannot take input (it is over).
    ///
    /// Protocol errors in the bytes are not returned: they arrive as events and
    /// make the connection dead.
    pub fn notify_read(&mut self, n: usize) -> Result<()> {
        if n == 0 && matches!(self.state, State::Closed) {
            // The server hanging up after a clean close is expected.
            self.recv_offer = None;
            return Ok(());
        }
        self.check_alive()?;
        if n == 0 {
            self.recv_offer = None;
            self.on_eof();
            return Ok(());
        }
        let Some(offer) = self.recv_offer else {
            return Err(Error::InvalidArgument(format!(
                "notify_read({n}) without a recv_buf: each read needs a fresh recv_buf"
            )));
        };
        if n > offer.len {
            return Err(Error::InvalidArgument(format!(
                "notify_read({n}) after a recv_buf of {} bytes",
                offer.len
            )));
        }
        self.recv_offer = None;
        if let State::Ready(tx) = &mut self.state {
            tx.note_input(&self.core);
        }
        if offer.target != RecvTarget::Tls {
            self.core.stats.bytes_received += n as u64;
        }
        match offer.target {
            RecvTarget::Caller => {
                // Only transmission offers a caller's region, and nothing but
                // input changes the phase, so it is still the current one.
                if let State::Ready(tx) = &mut self.state {
                    tx.caller_read(&mut self.core, n);
                }
                self.process();
            }
            RecvTarget::Stage => {
                self.core.stage.commit(n);
                self.process();
            }
            RecvTarget::Tls if self.tls.as_ref().is_some_and(TlsLayer::awaits_client) => {
                self.kill(injection_after_starttls());
            }
            RecvTarget::Tls => self.tls_input(n),
        }
        Ok(())
    }

    /// Reads server bytes with `read` straight to where they belong, then
    /// handles them: [`recv_buf`](Self::recv_buf) and
    /// [`notify_read`](Self::notify_read) in one call that cannot mismatch them.
    ///
    /// `read` gets the region to fill and returns how many bytes it put there
    /// (`Ok(0)`: end of stream). Returns what `read` returned. Errors:
    /// - `read`'s own error, with nothing changed (so `WouldBlock` and
    ///   `Interrupted` can simply be retried later);
    /// - `InvalidInput` wrapping [`Error::InvalidArgument`] if `read` claims more
    ///   bytes than the region holds (nothing changes);
    /// - the sticky error (as an `io::Error`, see [`Error`]'s conversion) if the
    ///   connection takes no more input; `read` is then not called.
    ///
    /// As with `notify_read`, protocol errors in the bytes arrive as events.
    ///
    /// ```no_run
    /// # fn drive(sock: &mut std::net::TcpStream, conn: &mut nbd_proto::Connection) -> std::io::Result<()> {
    /// use std::io::Read;
    /// while conn.direction().is_read() {
    ///     match conn.read_from(|buf| sock.read(buf)) {
    ///         Ok(0) => break, // end of stream, already handled
    ///         Ok(_) => {}
    ///         Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
    ///         Err(e) => return Err(e),
    ///     }
    ///     while let Some(event) = conn.poll_event() {
    ///         // ...
    /// #       drop(event);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn read_from<F>(&mut self, read: F) -> io::Result<usize>
    where
        F: FnOnce(&mut [u8]) -> io::Result<usize>,
    {
        if !self.takes_input() {
            self.check_alive()?;
        }
        let buf = self.recv_buf();
        let offered = buf.len();
        let n = match read(buf) {
            Ok(n) => n,
            Err(e) => {
                self.recv_offer = None;
                return Err(e);
            }
        };
        if n > offered {
            self.recv_offer = None;
            return Err(Error::InvalidArgument(format!(
                "the reader claims {n} bytes read into a buffer of {offered}"
            ))
            .into());
        }
        self.notify_read(n)?;
        Ok(n)
    }

    /// Feeds server bytes by copying them: the same result as reading them through
    /// [`recv_buf`](Self::recv_buf) in any split. For fuzzers, tests and adapters
    /// that already hold the bytes. An empty slice means end of stream.
    ///
    /// Returns the sticky error if the connection is dead once the bytes are
    /// handled (whatever the split); bytes after a clean close are ignored.
    pub fn handle_input(&mut self, mut input: &[u8]) -> Result<()> {
        if input.is_empty() {
            return self.notify_read(0);
        }
        while !input.is_empty() {
            let buf = self.recv_buf();
            if buf.is_empty() {
                break;
            }
            let n = buf.len().min(input.len());
            buf[..n].copy_from_slice(&input[..n]);
            self.notify_read(n)?;
            input = &input[n..];
        }
        match &self.state {
            State::Dead(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Feeds `n` bytes of ciphertext to the session and parses the plaintext it
    /// yields. A session may take ciphertext only after its plaintext is drained,
    /// so the two alternate until all `n` bytes are in; a session that takes none
    /// and yields none cannot make progress, which is an error, never a silent drop.
    fn tls_input(&mut self, n: usize) {
        let mut taken = 0;
        while self.takes_input() {
            let Some(tls) = self.tls.as_mut() else { return };
            let mut moved = false;
            if taken < n {
                // `n` is at most the ciphertext space (notify_read checked it
                // against the offer) and `taken <= n` is kept below.
                match tls.decrypt_from(taken, n) {
                    Ok(k) => {
                        taken += k;
                        moved |= k > 0;
                    }
                    Err(e) => return self.kill(e),
                }
            }
            // Plaintext is steered as bytes are without TLS: a read payload
            // due with nothing staged goes straight into the caller's buffer
            // (one copy out of the session, none through the stage).
            let (read, to_caller) = match &mut self.state {
                State::Ready(tx) => {
                    let read_ahead = tx.read_ahead();
                    match tx.caller_region(self.core.stage.is_empty()) {
                        Some(region) => (tls.read_plaintext(region), true),
                        None => {
                            let space = self.core.stage.space();
                            let n = space.len().min(read_ahead);
                            (tls.read_plaintext(&mut space[..n]), false)
                        }
                    }
                }
                _ => (tls.read_plaintext(self.core.stage.space()), false),
            };
            match read {
                Ok(0) => {}
                Ok(k) => {
                    self.core.stats.bytes_received += k as u64;
                    match &mut self.state {
                        State::Ready(tx) if to_caller => tx.caller_read(&mut self.core, k),
                        _ => self.core.stage.commit(k),
                    }
                    self.process();
                    moved = true;
                }
                Err(e) => return self.kill(e),
            }
            if !moved {
                if taken < n {
                    let left = n - taken;
                    self.kill(Error::Tls(format!(
                        "TLS session refused {left} bytes of ciphertext"
                    )));
                }
                return;
            }
        }
    }

    /// Parses everything parseable in the stage, carrying out what each step
    /// of the current phase asks: a change of phase, or the end.
    fn process(&mut self) {
        loop {
            let step = match &mut self.state {
                State::Handshake(negotiation) => negotiation.step(&mut self.core),
                State::Ready(tx) => tx.step(&mut self.core),
                State::Closed | State::Dead(_) => return,
            };
            match step {
                Step::Blocked => return,
                Step::Progressed => {}
                Step::Ready => self.enter_ready(),
                Step::StartTls => self.start_tls(),
                Step::Close => self.close_clean(),
                Step::Kill(error) => self.kill(error),
            }
        }
    }

    /// Negotiation is over: its state is dropped and transmission starts.
    fn enter_ready(&mut self) {
        trace::phase("transmission");
        self.state = State::Ready(Transmission::new());
        self.core.events.push_back(Event::Ready);
    }

    // ------------------------------------------------------------ bytes out

    /// Lists the bytes waiting to go to the server, in order, as slices for one
    /// `write_vectored`; returns how many of `slices` were set. Follow the write
    /// with [`notify_write`](Self::notify_write). Write payloads appear as the
    /// caller's own memory, never copied. [`write_to`](Self::write_to) does
    /// both in one call.
    #[must_use = "write the listed slices, then report with notify_write"]
    pub fn output<'a>(&'a mut self, slices: &mut [IoSlice<'a>]) -> usize {
        self.out_offered = 0;
        if slices.is_empty() {
            return 0;
        }
        if self.tls.is_some() {
            self.pump_tls_output();
        }
        if let Some(tls) = self.tls.as_ref() {
            let pending = tls.pending_cipher();
            if pending.is_empty() {
                return 0;
            }
            self.out_offered = pending.len();
            slices[0] = IoSlice::new(pending);
            return 1;
        }
        let n = self.core.output.slices(slices);
        self.out_offered = slices[..n].iter().map(|s| s.len()).sum();
        n
    }

    /// Reports that the socket took `n` bytes of what [`output`](Self::output)
    /// listed last (several reports may share one listing, up to its total).
    ///
    /// Errors, changing nothing: [`Error::InvalidArgument`] (EINVAL) if `n` is
    /// more than the listing still holds, and the sticky error if the
    /// connection is over (`n == 0` is always fine).
    pub fn notify_write(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.check_alive()?;
        if n > self.out_offered {
            return Err(Error::InvalidArgument(format!(
                "notify_write({n}) but output listed only {} unwritten bytes",
                self.out_offered
            )));
        }
        self.out_offered -= n;
        match self.tls.as_mut() {
            Some(tls) => tls.consume_cipher(n),
            None => self.core.output.consume(n),
        }
        self.maybe_close_after_disconnect();
        Ok(())
    }

    /// Writes pending output with `write`, then reports it:
    /// [`output`](Self::output) and [`notify_write`](Self::notify_write) in one
    /// call that cannot mismatch them.
    ///
    /// `write` gets the slices for one vectored write and returns how many
    /// bytes the socket took. Returns that count; `Ok(0)` without calling
    /// `write` when nothing can be listed. Errors, each changing nothing:
    /// `write`'s own error; `WriteZero` if `write` took none of a non-empty
    /// write; `InvalidInput` wrapping [`Error::InvalidArgument`] if `write`
    /// claims more bytes than it was given; the sticky error if the connection
    /// is over.
    ///
    /// ```no_run
    /// # fn drive(sock: &mut std::net::TcpStream, conn: &mut nbd_proto::Connection) -> std::io::Result<()> {
    /// use std::io::Write;
    /// while conn.wants_write() {
    ///     match conn.write_to(|iov| sock.write_vectored(iov)) {
    ///         Ok(0) => break, // nothing could be listed (a TLS session holds it)
    ///         Ok(_) => {}
    ///         Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn write_to<F>(&mut self, write: F) -> io::Result<usize>
    where
        F: FnOnce(&[IoSlice<'_>]) -> io::Result<usize>,
    {
        self.check_alive()?;
        let result = {
            let mut iov = [IoSlice::new(&[]); WRITE_TO_SLICES];
            let n = self.output(&mut iov);
            if n == 0 {
                return Ok(0);
            }
            let listed: usize = iov[..n].iter().map(|s| s.len()).sum();
            write(&iov[..n]).map(|k| (k, listed))
        };
        let (written, listed) = result?;
        if written == 0 {
            // A socket that takes nothing of a non-empty write will not take more.
            return Err(io::ErrorKind::WriteZero.into());
        }
        if written > listed {
            return Err(Error::InvalidArgument(format!(
                "the writer claims {written} bytes written of {listed} given"
            ))
            .into());
        }
        self.notify_write(written)?;
        Ok(written)
    }

    /// Copies out and marks as written everything pending: for tests and simple
    /// adapters that do not need the zero-copy path. The bytes are gone from
    /// the connection once returned.
    #[must_use = "the returned bytes are marked as written: send them"]
    pub fn take_output(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = self.output(&mut iov);
            if n == 0 {
                break;
            }
            let before = all.len();
            for s in &iov[..n] {
                all.extend_from_slice(s);
            }
            let taken = all.len() - before;
            // Exactly what `output` listed: this cannot be refused.
            if self.notify_write(taken).is_err() {
                break;
            }
        }
        all
    }

    fn pump_tls_output(&mut self) {
        let Some(tls) = self.tls.as_mut() else { return };
        if let Err(e) = tls.encrypt(&mut self.core.output) {
            self.kill(e);
        }
    }

    /// Whether bytes are waiting to go out.
    pub fn wants_write(&self) -> bool {
        match &self.tls {
            Some(tls) => !self.core.output.is_empty() || tls.wants_write(),
            None => !self.core.output.is_empty(),
        }
    }

    /// What the event loop should wait for.
    pub fn direction(&self) -> Direction {
        let read = self.takes_input();
        match (read, self.wants_write()) {
            (true, true) => Direction::Both,
            (true, false) => Direction::Read,
            (false, true) => Direction::Write,
            (false, false) => Direction::None,
        }
    }

    // ------------------------------------------------------------ time

    /// When the connection next needs [`handle_timeout`](Self::handle_timeout):
    /// the earliest deadline of the handshake, a command or the stall, or
    /// `None` when nothing is timed (no timeout configured, nothing pending,
    /// or the connection is over). An instant at or before the latest `now`
    /// passed in means "call `handle_timeout` now" (a deadline waits to start).
    ///
    /// Call it after every call that changes the connection and wait at most
    /// until the instant it gives. O(1) while no command in flight has a
    /// deadline; one pass over the commands in flight otherwise.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Handshake(_) => self.handshake_deadline.wake(self.now),
            State::Ready(tx) => tx.poll_timeout(self.now),
            State::Closed | State::Dead(_) => None,
        }
    }

    /// Passes the time in: starts the deadlines that wait for it and carries
    /// out those that have passed at `now`. The core owns no clock; this is
    /// the only way it learns the time.
    ///
    /// When a deadline starts: each timeout is armed when its wait begins (the
    /// connection is created, a command is issued, a server byte arrives or the
    /// first command of an idle connection is issued) and starts at the first
    /// `handle_timeout(now)` after that; it passes exactly when a later `now`
    /// reaches start + timeout. So call this once right after creating the
    /// connection and after every turn of the event loop (as `poll_timeout`
    /// asks), with the current time; a `now` earlier than one already passed
    /// in counts as that one.
    ///
    /// What passing a deadline does:
    /// - the handshake's: the connection dies with [`Error::TimedOut`];
    /// - a command's: that command alone completes, once, with
    ///   [`Error::TimedOut`] (ETIMEDOUT) and its buffer. NBD has no cancel, so
    ///   its cookie stays reserved: a late reply is consumed and dropped, never
    ///   matched to another command. It no longer counts in
    ///   [`in_flight`](Self::in_flight), but a graceful
    ///   [`disconnect`](Self::disconnect) still waits for its reply;
    /// - the stall's (commands in flight, no server byte for that long): the
    ///   connection dies with [`Error::TimedOut`] and every pending command
    ///   fails once, with [`Error::ConnectionLost`] wrapping that error. The
    ///   tombstone of a timed-out command counts as in flight here: a server
    ///   that never sends its late reply is stalled.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use nbd_proto::{Config, Connection, Errno};
    /// let t0 = Instant::now();
    /// let config = Config::default().handshake_timeout(Some(Duration::from_secs(5)));
    /// let mut conn = Connection::new(config);
    /// conn.handle_timeout(t0); // the handshake's clock starts here
    /// assert_eq!(conn.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    /// conn.handle_timeout(t0 + Duration::from_secs(5));
    /// assert_eq!(conn.error().unwrap().errno(), Errno::TimedOut);
    /// ```
    ///
    /// Does nothing once the connection is over.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.now.map_or(now, |seen| seen.max(now));
        self.now = Some(now);
        let expired = match &mut self.state {
            State::Handshake(_) => {
                self.handshake_deadline.start(now);
                self.handshake_deadline
                    .passed(now)
                    .then(|| Error::TimedOut("the handshake did not finish in time".into()))
            }
            State::Ready(tx) => tx.handle_timeout(&mut self.core, now),
            State::Closed | State::Dead(_) => None,
        };
        if let Some(error) = expired {
            self.kill(error);
        }
    }

    // ------------------------------------------------------------ events

    /// The next event, oldest first. O(1); `None` when nothing happened since.
    #[must_use = "an event polled and dropped is lost"]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.core.events.pop_front()
    }

    // ------------------------------------------------------------ phase and errors

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match &self.state {
            State::Handshake(negotiation) if negotiation.is_caller_turn() => Phase::Negotiating,
            State::Handshake(_) => Phase::Handshake,
            State::Ready(_) => Phase::Ready,
            State::Closed => Phase::Closed,
            State::Dead(_) => Phase::Dead,
        }
    }

    /// Transmission phase: commands may be issued (libnbd's `aio_is_ready`).
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    /// Opt mode, waiting for the caller (libnbd's `aio_is_negotiating`).
    pub fn is_negotiating(&self) -> bool {
        matches!(&self.state, State::Handshake(negotiation) if negotiation.is_caller_turn())
    }

    /// Ended as asked (libnbd's `aio_is_closed`).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Ended by an error (libnbd's `aio_is_dead`).
    pub fn is_dead(&self) -> bool {
        matches!(self.state, State::Dead(_))
    }

    /// The error that killed the connection, if it is dead.
    pub fn error(&self) -> Option<&Error> {
        match &self.state {
            State::Dead(e) => Some(e),
            _ => None,
        }
    }

    /// Errors with the sticky error if the connection is dead or closed.
    fn check_alive(&self) -> Result<()> {
        match &self.state {
            State::Dead(e) => Err(e.clone()),
            State::Closed => Err(Error::NotConnected("connection is closed".into())),
            _ => Ok(()),
        }
    }

    /// Kills the connection: the error becomes sticky, every pending command and
    /// option fails exactly once, and a `Closed` event reports why.
    fn kill(&mut self, error: Error) {
        let ended = std::mem::replace(&mut self.state, State::Dead(error.clone()));
        match ended {
            State::Handshake(mut negotiation) => negotiation.fail(&error, &mut self.core.events),
            State::Ready(mut tx) => tx.fail_all(
                &Error::ConnectionLost(Box::new(error.clone())),
                &mut self.core.events,
            ),
            // Already over: the first end stays.
            State::Closed | State::Dead(_) => {
                self.state = ended;
                return;
            }
        }
        trace::dead(&error);
        self.shut_parser();
        self.core
            .events
            .push_back(Event::Closed { error: Some(error) });
    }

    /// Ends the connection as asked: pending commands fail, `Closed` without error.
    fn close_clean(&mut self) {
        if let State::Handshake(negotiation) = &mut self.state {
            if let Some(error) = negotiation.take_shutdown_error() {
                // The abort that followed a shutdown refusal is done; the refusal,
                // already reported to any caller, is why the connection ends.
                return self.kill(error);
            }
        }
        match std::mem::replace(&mut self.state, State::Closed) {
            // The option in flight, if any, ends with the connection unreported.
            State::Handshake(_) => {}
            State::Ready(mut tx) => tx.fail_all(
                &Error::NotConnected("connection closed before the reply arrived".into()),
                &mut self.core.events,
            ),
            ended @ (State::Closed | State::Dead(_)) => {
                self.state = ended;
                return;
            }
        }
        trace::phase("closed");
        self.shut_parser();
        self.core.events.push_back(Event::Closed { error: None });
    }

    fn shut_parser(&mut self) {
        self.core.stage.clear();
        self.core.output.clear();
        self.recv_offer = None;
        self.out_offered = 0;
    }

    /// The server closed its end: a clean close if the current phase expected
    /// it, otherwise the connection dies.
    fn on_eof(&mut self) {
        let unexpected = match &self.state {
            State::Handshake(negotiation) => negotiation.eof_error(),
            State::Ready(tx) => tx.eof_error(),
            State::Closed | State::Dead(_) => return,
        };
        match unexpected {
            None => self.close_clean(),
            Some(error) => {
                // A TLS session may know better why the server went away
                // (credentials refused in or right after its handshake).
                let why = self.tls.as_mut().and_then(TlsLayer::explain_end_of_stream);
                self.kill(why.unwrap_or(error));
            }
        }
    }

    /// Ends the connection once its last message is written: `NBD_CMD_DISC`
    /// (nothing can be in flight then), or the `NBD_OPT_ABORT` sent after an
    /// `NBD_REP_ERR_SHUTDOWN` refusal. The latter does not wait for the
    /// server's acknowledgement: a server going away need not send one, and
    /// the refusal is known already.
    fn maybe_close_after_disconnect(&mut self) {
        let flushed = self.core.output.is_empty()
            && self
                .tls
                .as_ref()
                .is_none_or(|t| t.pending_cipher().is_empty());
        if !flushed {
            return;
        }
        let last_written = match &self.state {
            State::Ready(tx) => tx.is_disconnect_queued(),
            State::Handshake(negotiation) => negotiation.is_aborting_after_shutdown(),
            State::Closed | State::Dead(_) => false,
        };
        if last_written {
            self.close_clean();
        }
    }

    // ------------------------------------------------------------ settings

    /// The strict checks in force.
    pub fn strict_mode(&self) -> Strict {
        self.core.config.strict
    }

    /// Changes the strict checks (libnbd's `set_strict_mode`); allowed at any time.
    pub fn set_strict_mode(&mut self, strict: Strict) {
        self.core.config.strict = strict;
    }

    /// The export name that `opt_go`, `opt_info` or the automatic handshake use.
    pub fn export_name(&self) -> &str {
        &self.core.config.export_name
    }

    /// Changes the export name; allowed until transmission starts.
    pub fn set_export_name(&mut self, name: &str) -> Result<()> {
        if !matches!(self.state, State::Handshake(_)) {
            return Err(Error::InvalidState(
                "the export name can only change before transmission".into(),
            ));
        }
        crate::config::check_export_name(name)?;
        if self.core.config.export_name != name {
            // Contexts belong to an export: a new export needs a new selection.
            self.core.meta.clear();
        }
        self.core.config.export_name = name.to_string();
        Ok(())
    }

    /// The command timeout in force for commands issued from now on.
    pub fn command_timeout(&self) -> Option<Duration> {
        self.core.config.command_timeout
    }

    /// Changes [`Config::command_timeout`] for the commands issued from now on
    /// (those in flight keep theirs), so one command can get its own deadline;
    /// allowed at any time.
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.core.config.command_timeout = timeout;
    }

    /// The stall timeout in force ([`Config::stall_timeout`]).
    pub fn stall_timeout(&self) -> Option<Duration> {
        self.core.config.stall_timeout
    }

    /// Changes [`Config::stall_timeout`]; allowed at any time. With commands
    /// in flight the stall clock starts over from the next `handle_timeout`,
    /// so a longer (or no) limit never ends a connection by the old one.
    pub fn set_stall_timeout(&mut self, timeout: Option<Duration>) {
        self.core.config.stall_timeout = timeout;
        if let State::Ready(tx) = &mut self.state {
            tx.restart_stall(&self.core);
        }
    }

    /// Changes whether `opt_info` / `opt_go` ask for name and description.
    pub fn set_full_info(&mut self, full: bool) {
        self.core.config.full_info = full;
    }

    // ------------------------------------------------------------ queries

    /// Everything known about the export.
    pub fn export_info(&self) -> &ExportInfo {
        &self.core.info
    }

    /// Export size in bytes (libnbd's `get_size`).
    ///
    /// A size above `i64::MAX` is an [`Error::Overflow`], never a wrapped number.
    pub fn size(&self) -> Result<u64> {
        let size = self
            .core
            .info
            .size
            .ok_or_else(|| Error::InvalidState("export size is not known yet".into()))?;
        if size > i64::MAX as u64 {
            return Err(Error::Overflow(format!(
                "export size {size} exceeds i64::MAX"
            )));
        }
        Ok(size)
    }

    fn flag(&self, flag: TransmissionFlags) -> Result<bool> {
        match self.core.info.flags {
            Some(_) => Ok(self.core.info.has(flag)),
            None => Err(Error::InvalidState("export flags are not known yet".into())),
        }
    }

    /// Whether the export refuses writes.
    pub fn is_read_only(&self) -> Result<bool> {
        self.flag(TransmissionFlags::READ_ONLY)
    }
    /// Whether flush is supported.
    pub fn can_flush(&self) -> Result<bool> {
        self.flag(TransmissionFlags::SEND_FLUSH)
    }
    /// Whether the FUA flag is supported.
    pub fn can_fua(&self) -> Result<bool> {
        self.flag(TransmissionFlags::SEND_FUA)
    }
    /// Whether the export is on rotational media.
    pub fn is_rotational(&self) -> Result<bool> {
        self.flag(TransmissionFlags::ROTATIONAL)
    }
    /// Whether trim is supported.
    pub fn can_trim(&self) -> Result<bool> {
        self.flag(TransmissionFlags::SEND_TRIM)
    }
    /// Whether write-zeroes is supported.
    pub fn can_zero(&self) -> Result<bool> {
        self.flag(TransmissionFlags::SEND_WRITE_ZEROES)
    }
    /// Whether fast zeroing is supported.
    pub fn can_fast_zero(&self) -> Result<bool> {
        self.flag(TransmissionFlags::SEND_FAST_ZERO)
    }
    /// Whether the don't-fragment read flag can be used (it also needs structured replies).
    pub fn can_df(&self) -> Result<bool> {
        Ok(self.flag(TransmissionFlags::SEND_DF)? && self.core.structured)
    }
    /// Whether several connections see one consistent export.
    pub fn can_multi_conn(&self) -> Result<bool> {
        self.flag(TransmissionFlags::CAN_MULTI_CONN)
    }
    /// Whether cache (prefetch) is supported.
    pub fn can_cache(&self) -> Result<bool> {
        self.flag(TransmissionFlags::SEND_CACHE)
    }

    /// The server's valid block size constraints, if it sent them.
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.core.info.block_sizes
    }

    /// The canonical export name, if the server sent it.
    pub fn canonical_name(&self) -> Option<&str> {
        self.core.info.canonical_name.as_deref()
    }

    /// The export description, if the server sent it.
    pub fn description(&self) -> Option<&str> {
        self.core.info.description.as_deref()
    }

    /// `"oldstyle"`, `"newstyle"` or `"newstyle-fixed"` once the greeting arrived.
    pub fn protocol(&self) -> Option<&'static str> {
        self.core.style.map(HandshakeStyle::protocol_name)
    }

    /// Whether structured replies were negotiated (extended headers imply them).
    pub fn structured_replies_negotiated(&self) -> bool {
        self.core.structured
    }

    /// Whether extended (64-bit) headers were negotiated.
    pub fn extended_headers_negotiated(&self) -> bool {
        self.core.extended
    }

    /// The negotiated meta contexts with their ids.
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.core.meta
    }

    /// Whether the meta context `name` was negotiated (libnbd's `can_meta_context`).
    pub fn can_meta_context(&self, name: &str) -> bool {
        self.core.meta.iter().any(|(_, n)| n == name)
    }

    /// Adds a context to request (libnbd's `add_meta_context`). A name the
    /// protocol cannot carry (see [`Config::validate`]) is refused with EINVAL.
    pub fn add_meta_context(&mut self, name: &str) -> Result<()> {
        crate::config::check_meta_context(name)?;
        self.core.config.meta_contexts.push(name.to_string());
        Ok(())
    }

    /// Forgets the contexts to request (libnbd's `clear_meta_contexts`).
    pub fn clear_meta_contexts(&mut self) {
        self.core.config.meta_contexts.clear();
    }

    /// The contexts to request.
    pub fn requested_meta_contexts(&self) -> &[String] {
        &self.core.config.meta_contexts
    }

    /// The client flags sent after a newstyle greeting, if any were sent.
    pub fn handshake_flags_sent(&self) -> Option<u32> {
        self.core.client_flags
    }

    /// Commands issued and not yet completed (libnbd's `aio_in_flight`).
    pub fn in_flight(&self) -> usize {
        match &self.state {
            State::Ready(tx) => tx.in_flight(),
            _ => 0,
        }
    }

    /// Whether `cookie` names a command still in flight. Once its `Completed`
    /// event has been queued this is false (libnbd's `aio_command_completed`).
    pub fn is_in_flight(&self, cookie: Cookie) -> bool {
        match &self.state {
            State::Ready(tx) => tx.is_in_flight(cookie),
            _ => false,
        }
    }
}

/// Server bytes between the `NBD_OPT_STARTTLS` acknowledgement and the
/// client's first TLS message: the same error whether they were read with the
/// acknowledgement (plaintext in the stage) or after it.
fn injection_after_starttls() -> Error {
    Error::Tls(
        "plaintext bytes arrived after the server acknowledged NBD_OPT_STARTTLS, before the \
         client's first TLS message: refusing them as an injection"
            .into(),
    )
}
