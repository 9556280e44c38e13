//! Automatic reconnect, without I/O: the policy, the check that a new
//! connection reaches the same export, and the journal of unfinished
//! commands that is sent again on it.
//!
//! The adapter's side of it is described on [`Journal`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Completion, Connection, Cookie, Error, TransmissionFlags};

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
}

impl ReconnectPolicy {
    /// `attempts` attempts, the first after 100 ms, doubling up to 5 s; a
    /// stall counts.
    pub fn new(attempts: u32) -> Self {
        ReconnectPolicy {
            attempts,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            on_stall: true,
        }
    }

    /// How long to wait before attempt `attempt` (counted from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
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
    /// How many unfinished commands were sent again.
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
/// 4. If every attempt fails, [`Journal::give_up`] completes each kept
///    command once with the cause.
///
/// Ordering of durability: a flush, or a write with FUA, that is sent again
/// waits until every write, zero and trim submitted before it has completed
/// on the new connection, so it is reported done only after it succeeded on
/// the connection that holds them. Limit: a write the old server had
/// already acknowledged is not sent again; if that server lost it with its
/// cache when it went away, no client can tell.
#[derive(Debug, Default)]
pub struct Journal {
    /// By submission number (the caller's cookie without [`JOURNAL_COOKIE`]).
    entries: BTreeMap<u64, Entry>,
    /// Wire cookie on the current connection -> submission number.
    wire: HashMap<Cookie, u64>,
    /// Entries waiting to be sent (`wire` is `None`), so that submitting
    /// stays O(1) in the steady state.
    held: usize,
    next: u64,
}

impl Journal {
    /// An empty journal.
    pub fn new() -> Self {
        Journal::default()
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
        let mut entry = Entry {
            request,
            wire: None,
            buffer,
            resent: false,
        };
        // Behind commands waiting to be sent, or on a connection already
        // lost (that the adapter is about to replace), it waits its turn.
        if self.held == 0 && !conn.is_dead() {
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
        let entry = Entry {
            request,
            wire: None,
            buffer,
            resent: false,
        };
        self.entries.insert(n, entry);
        self.held += 1;
        Cookie::from_raw(n | JOURNAL_COOKIE)
    }

    /// Takes a completion of the connection. Returns it under the caller's
    /// cookie, except when `keep_lost` and the command was cut short by the
    /// end of the connection (`ConnectionLost`): then the journal keeps it
    /// (with its buffer) to send again, and returns `None`.
    pub fn complete(&mut self, mut done: Completion, keep_lost: bool) -> Option<Completion> {
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
        self.entries.remove(&n);
        done.cookie = Cookie::from_raw(n | JOURNAL_COOKIE);
        Some(done)
    }

    /// After a reconnect: forgets the old connection's cookies and sends the
    /// kept commands on `conn`, in submission order. Returns how many went
    /// out now; the rest wait behind a flush or FUA write (see
    /// [`Journal::send_held`]). Commands the new connection refuses come
    /// back as completions with that error.
    pub fn resend(&mut self, conn: &mut Connection) -> (usize, Vec<Completion>) {
        self.wire.clear();
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
        held.into_iter()
            .filter_map(|n| self.entries.remove(&n).map(|e| (n, e)))
            .map(|(n, e)| {
                let lost = Error::ConnectionLost(Box::new(cause.clone()));
                Completion::new(Cookie::from_raw(n | JOURNAL_COOKIE), Err(lost), e.buffer)
            })
            .collect()
    }
}
