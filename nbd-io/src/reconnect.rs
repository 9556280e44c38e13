//! Automatic reconnect, without I/O: the policy, the check that a new
//! connection reaches the same export, and the journal of unfinished
//! commands that is sent again on it.
//!
//! The adapter's side of it is described on [`Journal`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_proto::{
    CmdFlags, Completion, Config, Connection, Cookie, CookieMap, Error, TransmissionFlags,
};

use crate::overlap::uncovered_by_later;

/// When to reconnect, how often, and how long to wait between attempts.
///
/// ```
/// use std::time::Duration;
/// use nbd_io::ReconnectPolicy;
/// let policy = ReconnectPolicy::new(4);
/// assert_eq!(policy.delay(1), Duration::from_millis(100));
/// assert_eq!(policy.delay(3), Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconnectPolicy {
    /// Connect attempts after each lost connection before giving up.
    pub attempts: u32,
    /// Wait before the first attempt; each later attempt waits twice as long
    /// as the one before, up to `max_delay`.
    pub first_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
    /// Whether a connection ended by the stall deadline reconnects (the
    /// server hanging up and a reset socket always do).
    pub on_stall: bool,
    /// Most bytes of acknowledged but unflushed writes the [`Journal`]
    /// keeps to write again after a reconnect (payload bytes, plus
    /// [`REPLAY_ENTRY_COST`] for each write, zero or trim). Past it, a
    /// reconnect before the next flush makes the next flush or FUA write
    /// fail with `WritesLost` (EIO) instead of reporting done. Default
    /// [`DEFAULT_REPLAY_BUDGET`].
    pub replay_budget: usize,
    /// Longest one attempt may take to connect and finish the handshake
    /// when the connection's `Config::handshake_timeout` sets no limit of
    /// its own, so that a server that accepts and then says nothing cannot
    /// hold a reconnect forever. Default 30 s.
    pub attempt_timeout: Duration,
}

/// The default [`ReconnectPolicy::replay_budget`]: 64 MiB.
pub const DEFAULT_REPLAY_BUDGET: usize = 64 << 20;

/// What each kept write, zero or trim costs against the replay budget
/// besides its payload, so that many small ones are bounded too.
pub const REPLAY_ENTRY_COST: usize = 64;

impl ReconnectPolicy {
    /// `attempts` attempts, the first after 100 ms, doubling up to 5 s; a
    /// stall counts.
    pub fn new(attempts: u32) -> Self {
        ReconnectPolicy {
            attempts,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            on_stall: true,
            replay_budget: DEFAULT_REPLAY_BUDGET,
            attempt_timeout: Duration::from_secs(30),
        }
    }

    /// The handshake limit of a reconnect attempt: the connection's own
    /// (`configured`), or else [`attempt_timeout`](Self::attempt_timeout).
    /// Every attempt is bounded either way.
    ///
    /// ```
    /// use std::time::Duration;
    /// use nbd_io::ReconnectPolicy;
    /// let policy = ReconnectPolicy::new(3);
    /// assert_eq!(policy.attempt_limit(None), Duration::from_secs(30));
    /// let own = Some(Duration::from_secs(2));
    /// assert_eq!(policy.attempt_limit(own), Duration::from_secs(2));
    /// ```
    pub fn attempt_limit(&self, configured: Option<Duration>) -> Duration {
        configured.unwrap_or(self.attempt_timeout)
    }

    /// How long to wait before attempt `attempt` (counted from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }

    /// What every adapter's `set_reconnect` checks and keeps: the client
    /// has no command `in_flight`, knows where it connected (`origin`: where
    /// to connect again, a [`Target`](crate::Target) or an
    /// [`Endpoint`](crate::Endpoint), and the config of its first connect),
    /// and `conn` is in transmission. The
    /// attempts' config is `origin` with the export name `conn` uses, no opt
    /// mode, and a bounded handshake ([`attempt_limit`](Self::attempt_limit)).
    ///
    /// Errors (`EINVAL`) say which condition failed.
    pub fn prepare<T: Clone>(
        &self,
        conn: &Connection,
        origin: Option<&(T, Config)>,
        in_flight: usize,
    ) -> Result<Prepared<T>, Error> {
        refuse_in_flight(in_flight)?;
        let Some((place, origin)) = origin else {
            return Err(cannot_set("the client was not made from a target"));
        };
        if !conn.is_ready() {
            return Err(cannot_set("the connection is not in transmission"));
        }
        let mut config = origin.clone();
        // Each attempt is bounded, even where the first connect was not.
        config.handshake_timeout = Some(self.attempt_limit(config.handshake_timeout));
        config.opt_mode = false;
        config.export_name = conn.export_name().to_string();
        Ok(Prepared {
            place: place.clone(),
            config,
            identity: ExportIdentity::of(conn)?,
            journal: Journal::for_policy(self),
        })
    }

    /// Whether the error that ended a connection is worth a reconnect: the
    /// server closed it or the socket failed (the core's `NotConnected`),
    /// or, if `on_stall`, the stall deadline (`TimedOut`). Never a protocol
    /// violation, a TLS failure, or anything the caller did.
    pub fn counts(&self, cause: &Error) -> bool {
        match cause {
            Error::NotConnected(_) => true,
            Error::TimedOut(_) => self.on_stall,
            _ => false,
        }
    }
}

/// What an adapter keeps to reconnect, made by [`ReconnectPolicy::prepare`].
#[derive(Debug)]
pub struct Prepared<T> {
    /// Where every attempt connects.
    pub place: T,
    /// The settings of every attempt.
    pub config: Config,
    /// The export a new connection must reach.
    pub identity: ExportIdentity,
    /// The journal of unfinished commands, with the policy's budget.
    pub journal: Journal,
}

/// `EINVAL` when commands are in flight: reconnect is turned on or off only
/// between commands, so that each is journalled from its start or not at all.
pub fn refuse_in_flight(in_flight: usize) -> Result<(), Error> {
    match in_flight {
        0 => Ok(()),
        _ => Err(cannot_set("commands are in flight")),
    }
}

fn cannot_set(why: &str) -> Error {
    Error::InvalidArgument(format!("cannot set reconnect: {why}"))
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy::new(3)
    }
}

/// What a reconnect did, for the caller to learn (an event of the adapter).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnected {
    /// Why the connection was lost.
    pub cause: Error,
    /// Which attempt succeeded (from 1).
    pub attempt: u32,
    /// How many unfinished commands were sent again (acknowledged writes
    /// written again for durability, see [`Journal`], are not counted).
    pub resent: usize,
}

impl Reconnected {
    /// A report: the connection was lost to `cause`, attempt `attempt`
    /// succeeded, and `resent` commands went out again.
    pub fn new(cause: Error, attempt: u32, resent: usize) -> Self {
        Reconnected {
            cause,
            attempt,
            resent,
        }
    }
}

/// What must not change across a reconnect: the export's size, its flags
/// may only grow (read-only where it was writable, or a lost capability such
/// as flush or FUA, is another export as far as the pending commands are
/// concerned), and every meta context negotiated before must be negotiated
/// again (block status commands may be among those sent again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportIdentity {
    size: u64,
    flags: TransmissionFlags,
    contexts: Vec<String>,
}

impl ExportIdentity {
    /// The identity of the export `conn` is connected to (it must be in
    /// transmission).
    pub fn of(conn: &Connection) -> nbd_proto::Result<Self> {
        Ok(ExportIdentity {
            size: conn.size()?,
            flags: conn.export_info().flags.unwrap_or_default(),
            contexts: conn
                .meta_contexts()
                .iter()
                .map(|(_, name)| name.clone())
                .collect(),
        })
    }

    /// Whether `conn` reaches the same export; the reason when not.
    pub fn check(&self, conn: &Connection) -> Result<(), String> {
        let now = ExportIdentity::of(conn).map_err(|e| e.to_string())?;
        if now.size != self.size {
            return Err(format!(
                "the export's size changed from {} to {}",
                self.size, now.size
            ));
        }
        if now.flags.contains(TransmissionFlags::READ_ONLY)
            && !self.flags.contains(TransmissionFlags::READ_ONLY)
        {
            return Err("the export became read-only".into());
        }
        let abilities = !(TransmissionFlags::READ_ONLY | TransmissionFlags::ROTATIONAL);
        let lost = (self.flags & abilities) - now.flags;
        if !lost.is_empty() {
            return Err(format!("the export lost {lost:?}"));
        }
        if let Some(missing) = self.contexts.iter().find(|c| !now.contexts.contains(c)) {
            return Err(format!(
                "the meta context {missing:?} is no longer negotiated"
            ));
        }
        Ok(())
    }
}

/// One command, as it can be issued again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `pread` (or `pread_structured` when `structured`) into a buffer of `len` bytes.
    Read {
        /// Bytes to read (the buffer's length).
        len: usize,
        /// Export offset.
        offset: u64,
        /// Command flags.
        flags: CmdFlags,
        /// Whether each chunk is reported (`pread_structured`).
        structured: bool,
    },
    /// `pwrite` of `data`.
    Write {
        /// The payload (kept until the write completes).
        data: Bytes,
        /// Export offset.
        offset: u64,
        /// Command flags.
        flags: CmdFlags,
    },
    /// `flush`.
    Flush {
        /// Command flags.
        flags: CmdFlags,
    },
    /// `trim`.
    Trim {
        /// Bytes.
        count: u64,
        /// Export offset.
        offset: u64,
        /// Command flags.
        flags: CmdFlags,
    },
    /// `zero`.
    Zero {
        /// Bytes.
        count: u64,
        /// Export offset.
        offset: u64,
        /// Command flags.
        flags: CmdFlags,
    },
    /// `cache`.
    Cache {
        /// Bytes.
        count: u64,
        /// Export offset.
        offset: u64,
        /// Command flags.
        flags: CmdFlags,
    },
    /// `block_status` over every negotiated context.
    BlockStatus {
        /// Bytes.
        count: u64,
        /// Export offset.
        offset: u64,
        /// Command flags.
        flags: CmdFlags,
    },
}

impl Request {
    /// Issues this request on `conn`; a read fills `buffer` (resized to its length).
    pub fn issue(
        &self,
        conn: &mut Connection,
        buffer: Option<BytesMut>,
    ) -> nbd_proto::Result<Cookie> {
        match *self {
            Request::Read {
                len,
                offset,
                flags,
                structured,
            } => {
                let mut buf = buffer.unwrap_or_default();
                buf.resize(len, 0);
                if structured {
                    conn.pread_structured(buf, offset, flags)
                } else {
                    conn.pread(buf, offset, flags)
                }
            }
            Request::Write {
                ref data,
                offset,
                flags,
            } => conn.pwrite(data.clone(), offset, flags),
            Request::Flush { flags } => conn.flush(flags),
            Request::Trim {
                count,
                offset,
                flags,
            } => conn.trim(count, offset, flags),
            Request::Zero {
                count,
                offset,
                flags,
            } => conn.zero(count, offset, flags),
            Request::Cache {
                count,
                offset,
                flags,
            } => conn.cache(count, offset, flags),
            Request::BlockStatus {
                count,
                offset,
                flags,
            } => conn.block_status(count, offset, flags),
        }
    }

    /// Whether it changes the export's data.
    fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Write { .. } | Request::Trim { .. } | Request::Zero { .. }
        )
    }

    /// The export range a write, trim or zero changes.
    fn changed_range(&self) -> Option<Range<u64>> {
        let (offset, len) = match self {
            Request::Write { data, offset, .. } => (*offset, data.len() as u64),
            Request::Trim { count, offset, .. } | Request::Zero { count, offset, .. } => {
                (*offset, *count)
            }
            _ => return None,
        };
        Some(offset..offset.saturating_add(len))
    }

    /// The same write, trim or zero over `range`, a part of its
    /// [`changed_range`](Self::changed_range).
    fn confined_to(&self, range: Range<u64>) -> Request {
        let count = range.end - range.start;
        match *self {
            Request::Write {
                ref data,
                offset,
                flags,
            } => {
                let from = (range.start - offset) as usize;
                Request::Write {
                    data: data.slice(from..from + count as usize),
                    offset: range.start,
                    flags,
                }
            }
            Request::Trim { flags, .. } => Request::Trim {
                count,
                offset: range.start,
                flags,
            },
            Request::Zero { flags, .. } => Request::Zero {
                count,
                offset: range.start,
                flags,
            },
            ref other => other.clone(),
        }
    }

    /// What keeping it for replay costs against the budget.
    fn replay_cost(&self) -> usize {
        let payload = match self {
            Request::Write { data, .. } => data.len(),
            _ => 0,
        };
        payload.saturating_add(REPLAY_ENTRY_COST)
    }

    /// Whether it promises durability of what was written before it.
    fn is_barrier(&self) -> bool {
        match self {
            Request::Flush { .. } => true,
            Request::Write { flags, .. }
            | Request::Zero { flags, .. }
            | Request::Trim { flags, .. } => flags.contains(CmdFlags::FUA),
            _ => false,
        }
    }
}

/// A command the caller submitted that has not completed yet.
#[derive(Debug)]
struct Entry {
    request: Request,
    /// Its cookie on the current connection; `None` while it waits to be
    /// sent (again).
    wire: Option<Cookie>,
    /// A read's buffer while the journal holds it (the connection has it
    /// while the read is in flight).
    buffer: Option<BytesMut>,
    /// Sent again after a reconnect: a barrier then waits for the writes before it.
    resent: bool,
    /// For a flush: how many writes had been acknowledged when it was
    /// submitted (the ones its success makes durable).
    covers: u64,
    /// A barrier that must fail with `WritesLost` and this reason, whatever
    /// the server answers: writes it would report durable were lost.
    doomed: Option<String>,
}

/// A write, zero or trim the server acknowledged, kept until a flush covers
/// it so that it can be written again on the next connection.
#[derive(Debug)]
struct Replay {
    request: Request,
    /// Its place in the order of acknowledgements (from 1).
    ack: u64,
}

/// The caller's cookies live in their own space, so that they never equal a
/// wire cookie of some connection by accident.
const JOURNAL_COOKIE: u64 = 1 << 63;

/// The commands not yet completed, in submission order, under cookies that
/// stay the same across connections.
///
/// An adapter that offers reconnect (opt-in) keeps a [`Journal`] beside its
/// `nbd_proto::Connection` and routes every command through it:
///
/// 1. [`Journal::submit`] issues the command on the connection and records
///    it (a write keeps its payload, a cheap `Bytes` clone). The caller's
///    cookies are the journal's, stable across connections.
/// 2. Every `Event::Completed` goes through [`Journal::complete`]. When the
///    connection died of a failure the [`ReconnectPolicy`] counts (the
///    server hung up, the socket was reset, the stall deadline), the
///    commands it cut short are kept back, read buffers included, instead
///    of reaching the caller.
/// 3. The adapter connects again to the same target with the same `Config`,
///    checks [`ExportIdentity`], and calls [`Journal::resend`]: the kept
///    commands go out again in the order they were first submitted. A
///    command that completed (successfully or not) is never sent again.
///    Read chunks and block status reports the adapter still holds for a
///    command sent again ([`Journal::is_pending`]) came from the lost
///    connection: drop them, as the new connection reports afresh.
/// 4. If every attempt fails, [`Journal::give_up`] completes each kept
///    command once with the cause.
///
/// Durability: a write the old server acknowledged may have lived only in
/// its cache. So the journal keeps every write, zero and trim acknowledged
/// since the last successful flush (a cheap `Bytes` clone of a write's
/// payload), and [`Journal::resend`] writes them again first, and holds
/// every unfinished command until they have all completed. They go out
/// together, and a server may carry out commands in flight in any order, so
/// where kept writes overlap only the parts that no later one covers are
/// written: the export ends as it was after the writes in submission order. A flush, or a write with FUA, that is sent again
/// also waits until every write submitted before it has completed on the
/// new connection. So a flush or FUA write is reported done only after it
/// succeeded on the connection that holds every write before it. A
/// successful flush drops the kept writes it covers: those acknowledged
/// before it was submitted.
///
/// The kept writes are bounded by the replay budget
/// ([`ReconnectPolicy::replay_budget`]). Past it the journal drops them
/// all and marks the unflushed state unrecoverable until a flush covers it;
/// if the connection is lost meanwhile, every flush or FUA write pending at
/// the reconnect (or, if there is none, the next one submitted) completes
/// with [`Error::WritesLost`] (EIO) even if the new server accepts it:
/// never reported done. A kept write that the new server refuses does the
/// same.
#[derive(Debug)]
pub struct Journal {
    /// By submission number (the caller's cookie without [`JOURNAL_COOKIE`]).
    entries: BTreeMap<u64, Entry>,
    /// Wire cookie on the current connection -> submission number.
    wire: CookieMap<Cookie, u64>,
    /// Entries waiting to be sent (`wire` is `None`), so that submitting
    /// stays O(1) in the steady state.
    held: usize,
    next: u64,
    /// Acknowledged writes not yet covered by a flush, by submission number.
    replays: BTreeMap<u64, Replay>,
    /// Wire cookie of a kept write being written again -> submission number.
    /// While it is not empty, no other command goes out.
    replay_wire: CookieMap<Cookie, u64>,
    /// What `replays` costs against `budget`.
    replay_bytes: usize,
    budget: usize,
    /// Writes acknowledged so far (numbers each [`Replay::ack`]).
    acks: u64,
    /// Over budget: the last acknowledgement not kept. Unrecoverable if the
    /// connection is lost before a flush covers it.
    unkept: Option<u64>,
    /// The next barrier submitted fails with this reason.
    doom_next: Option<String>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal::with_replay_budget(DEFAULT_REPLAY_BUDGET)
    }
}

impl Journal {
    /// An empty journal with the default replay budget.
    pub fn new() -> Self {
        Journal::default()
    }

    /// An empty journal for `policy` (its replay budget).
    pub fn for_policy(policy: &ReconnectPolicy) -> Self {
        Journal::with_replay_budget(policy.replay_budget)
    }

    /// An empty journal that keeps at most `budget` bytes of unflushed
    /// writes to write again (see [`ReconnectPolicy::replay_budget`]).
    pub fn with_replay_budget(budget: usize) -> Self {
        Journal {
            entries: BTreeMap::new(),
            wire: CookieMap::default(),
            held: 0,
            next: 0,
            replays: BTreeMap::new(),
            replay_wire: CookieMap::default(),
            replay_bytes: 0,
            budget,
            acks: 0,
            unkept: None,
            doom_next: None,
        }
    }

    /// Acknowledged writes, zeroes and trims kept to write again after a
    /// reconnect (not yet covered by a successful flush).
    pub fn unflushed(&self) -> usize {
        self.replays.len()
    }

    /// Whether acknowledged writes were dropped over the replay budget and
    /// no flush has covered them yet: a reconnect now would lose them.
    pub fn over_budget(&self) -> bool {
        self.unkept.is_some()
    }

    /// Commands submitted and not completed (in flight, or waiting to be sent again).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every submitted command has completed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `cookie` (the caller's) names a command not completed yet.
    pub fn is_pending(&self, cookie: Cookie) -> bool {
        cookie.get() & JOURNAL_COOKIE != 0
            && self.entries.contains_key(&(cookie.get() & !JOURNAL_COOKIE))
    }

    /// Commands waiting to be sent (again).
    pub fn held(&self) -> usize {
        self.held
    }

    /// The caller's cookie for a cookie of the current connection (to
    /// translate chunk and block status events).
    pub fn caller_cookie(&self, wire: Cookie) -> Option<Cookie> {
        self.wire
            .get(&wire)
            .map(|&n| Cookie::from_raw(n | JOURNAL_COOKIE))
    }

    /// Issues `request` on `conn` (a read into `buffer`) and records it;
    /// returns the caller's cookie. While commands wait to be sent again,
    /// or while `conn` is dead (call this only when the adapter will
    /// reconnect, or give up), it queues behind them, so submission order
    /// holds on the wire. A command the connection refuses is not recorded.
    pub fn submit(
        &mut self,
        conn: &mut Connection,
        request: Request,
        buffer: Option<BytesMut>,
    ) -> nbd_proto::Result<Cookie> {
        let mut entry = self.entry(request, buffer);
        // Behind commands waiting to be sent or kept writes being written
        // again, or on a connection already lost (that the adapter is about
        // to replace), it waits its turn.
        if self.held == 0 && self.replay_wire.is_empty() && !conn.is_dead() {
            let wire = entry.request.issue(conn, entry.buffer.take())?;
            entry.wire = Some(wire);
        }
        let n = self.next;
        self.next += 1;
        match entry.wire {
            Some(wire) => {
                self.wire.insert(wire, n);
            }
            None => self.held += 1,
        }
        self.entries.insert(n, entry);
        Ok(Cookie::from_raw(n | JOURNAL_COOKIE))
    }

    /// Records `request` (a read into `buffer`) without issuing it, to be
    /// sent by the next [`resend`](Self::resend) or
    /// [`send_held`](Self::send_held): for an adapter whose connection is
    /// being replaced. Returns the caller's cookie.
    pub fn hold(&mut self, request: Request, buffer: Option<BytesMut>) -> Cookie {
        let n = self.next;
        self.next += 1;
        let entry = self.entry(request, buffer);
        self.entries.insert(n, entry);
        self.held += 1;
        Cookie::from_raw(n | JOURNAL_COOKIE)
    }

    /// A new entry for `request`: a flush notes what it covers, and a
    /// barrier takes a pending loss of unflushed writes.
    fn entry(&mut self, request: Request, buffer: Option<BytesMut>) -> Entry {
        let doomed = if request.is_barrier() {
            self.doom_next.take()
        } else {
            None
        };
        Entry {
            request,
            wire: None,
            buffer,
            resent: false,
            covers: self.acks,
            doomed,
        }
    }

    /// Takes a completion of the connection. Returns it under the caller's
    /// cookie, except when `keep_lost` and the command was cut short by the
    /// end of the connection (`ConnectionLost`): then the journal keeps it
    /// (with its buffer) to send again, and returns `None`.
    ///
    /// The completion of a kept write being written again is the journal's
    /// own and is never returned.
    pub fn complete(&mut self, mut done: Completion, keep_lost: bool) -> Option<Completion> {
        if let Some(n) = self.replay_wire.remove(&done.cookie) {
            self.replay_done(n, &done.result, keep_lost);
            return None;
        }
        let Some(n) = self.wire.remove(&done.cookie) else {
            // Not one of the journal's: pass it on as it is.
            return Some(done);
        };
        let lost = matches!(done.result, Err(Error::ConnectionLost(_)));
        if keep_lost && lost {
            if let Some(entry) = self.entries.get_mut(&n) {
                entry.wire = None;
                entry.buffer = done.buffer.take();
                self.held += 1;
                return None;
            }
        }
        if let Some(entry) = self.entries.remove(&n) {
            if done.result.is_ok() {
                if matches!(entry.request, Request::Flush { .. }) {
                    self.flushed(entry.covers);
                }
                if let Some(why) = entry.doomed {
                    done.result = Err(Error::WritesLost(why));
                }
                if entry.request.is_write() {
                    self.keep(n, entry.request);
                }
            }
        }
        done.cookie = Cookie::from_raw(n | JOURNAL_COOKIE);
        Some(done)
    }

    /// Keeps acknowledged write `n` to write again, within the budget.
    fn keep(&mut self, n: u64, request: Request) {
        self.acks += 1;
        let ack = self.acks;
        let cost = request.replay_cost();
        let total = self.replay_bytes.saturating_add(cost);
        if self.unkept.is_some() || total > self.budget {
            // Replaying only some of the unflushed writes would not make a
            // later flush honest, so none are kept until a flush covers them.
            self.replays.clear();
            self.replay_bytes = 0;
            self.unkept = Some(ack);
            return;
        }
        self.replay_bytes = total;
        self.replays.insert(n, Replay { request, ack });
    }

    /// A flush that covered the first `covers` acknowledgements succeeded.
    fn flushed(&mut self, covers: u64) {
        let before = self.replays.len();
        self.replays.retain(|_, r| r.ack > covers);
        if self.replays.len() != before {
            self.replay_bytes = self.replays.values().map(|r| r.request.replay_cost()).sum();
        }
        if self.unkept.is_some_and(|ack| ack <= covers) {
            self.unkept = None;
        }
    }

    /// Kept write `n`, written again, completed with `result`.
    fn replay_done(&mut self, n: u64, result: &nbd_proto::Result<()>, keep_lost: bool) {
        match result {
            // It stays kept until a flush covers it.
            Ok(()) => {}
            // Written again on the connection after this one.
            Err(Error::ConnectionLost(_)) if keep_lost => {}
            Err(e) => {
                if let Some(replay) = self.replays.remove(&n) {
                    self.replay_bytes -= replay.request.replay_cost();
                }
                self.lose_unflushed(format!(
                    "a write acknowledged by the lost connection failed when written again: {e}"
                ));
            }
        }
    }

    /// Acknowledged writes were lost: every pending flush or FUA write
    /// (or, with none pending, the next one) fails with `WritesLost`.
    fn lose_unflushed(&mut self, why: String) {
        let mut doomed = false;
        for entry in self.entries.values_mut() {
            if entry.request.is_barrier() {
                entry.doomed = Some(why.clone());
                doomed = true;
            }
        }
        if !doomed {
            self.doom_next = Some(why);
        }
    }

    /// After a reconnect: forgets the old connection's cookies, writes the
    /// kept acknowledged writes again on `conn` (where they overlap, only
    /// what no later one covers), then sends the unfinished
    /// commands, each in submission order. Returns how many unfinished
    /// commands went out now; the rest wait for the kept writes, or behind a
    /// flush or FUA write (see [`Journal::send_held`]). Commands the new
    /// connection refuses come back as completions with that error.
    pub fn resend(&mut self, conn: &mut Connection) -> (usize, Vec<Completion>) {
        self.wire.clear();
        self.replay_wire.clear();
        if self.unkept.take().is_some() {
            self.lose_unflushed(format!(
                "the connection was lost with more unflushed writes than the replay budget ({} bytes) keeps",
                self.budget
            ));
        }
        let mut refused = None;
        // Sent together, overlapping kept writes could land in any order:
        // only what no later one covers goes out, so the pieces are disjoint.
        let pieces = uncovered_by_later(
            self.replays
                .iter()
                .filter_map(|(&n, r)| Some((n, r.request.changed_range()?))),
        );
        for (n, range) in pieces {
            let request = self.replays[&n].request.confined_to(range);
            match request.issue(conn, None) {
                Ok(wire) => {
                    self.replay_wire.insert(wire, n);
                }
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = refused {
            // Written again only in part, they prove nothing: drop them.
            self.replays.clear();
            self.replay_bytes = 0;
            self.lose_unflushed(format!(
                "the new connection refused a write acknowledged by the lost one: {e}"
            ));
        }
        for entry in self.entries.values_mut() {
            entry.wire = None;
            entry.resent = true;
        }
        self.held = self.entries.len();
        self.send_held(conn)
    }

    /// Sends the commands waiting to be sent, in submission order, stopping
    /// at a resent flush or FUA write while a write submitted before it is
    /// still in flight. Call it after each batch of completions while
    /// [`held`](Self::held) is not zero. Returns how many went out, and the
    /// completions of those the connection refused.
    pub fn send_held(&mut self, conn: &mut Connection) -> (usize, Vec<Completion>) {
        if !self.replay_wire.is_empty() {
            // Kept writes are being written again: everything waits for them.
            return (0, Vec::new());
        }
        let mut sent = 0;
        let mut refused = Vec::new();
        let mut writes_in_flight = false;
        let mut numbers = Vec::new();
        for (&n, entry) in &self.entries {
            if entry.wire.is_some() {
                writes_in_flight |= entry.request.is_write();
                continue;
            }
            if entry.resent && entry.request.is_barrier() && writes_in_flight {
                break;
            }
            numbers.push(n);
            // Once this one is sent it is in flight for those after it.
            writes_in_flight |= entry.request.is_write();
        }
        for n in numbers {
            let Some(entry) = self.entries.get_mut(&n) else {
                continue;
            };
            match entry.request.issue(conn, entry.buffer.take()) {
                Ok(wire) => {
                    entry.wire = Some(wire);
                    self.wire.insert(wire, n);
                    self.held -= 1;
                    sent += 1;
                }
                Err(e) => {
                    let buffer = entry.buffer.take();
                    self.entries.remove(&n);
                    self.held -= 1;
                    let cookie = Cookie::from_raw(n | JOURNAL_COOKIE);
                    refused.push(Completion::new(cookie, Err(e), buffer));
                }
            }
        }
        (sent, refused)
    }

    /// Ends every command still waiting to be sent: each completes once with
    /// `ConnectionLost(cause)`, a read with its buffer.
    pub fn give_up(&mut self, cause: &Error) -> Vec<Completion> {
        let held: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.wire.is_none())
            .map(|(&n, _)| n)
            .collect();
        self.held = 0;
        self.replays.clear();
        self.replay_wire.clear();
        self.replay_bytes = 0;
        held.into_iter()
            .filter_map(|n| self.entries.remove(&n).map(|e| (n, e)))
            .map(|(n, e)| {
                let lost = Error::ConnectionLost(Box::new(cause.clone()));
                Completion::new(Cookie::from_raw(n | JOURNAL_COOKIE), Err(lost), e.buffer)
            })
            .collect()
    }
}
