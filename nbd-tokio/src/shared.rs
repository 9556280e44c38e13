//! What the driver task and every handle share: the protocol state behind
//! one short-held lock, and a slot per command in flight where its reply
//! waits for its future.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use nbd_io::{Endpoint, Reconnected};
use nbd_proto::{BlockStatus, Completion, Config, Connection, Cookie, CookieMap, Event, ReadChunk};
use tokio::sync::Notify;

use crate::reconnect::Reconnect;

/// One export from an export list (opt mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

/// The shared half of a connection.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the driver: output was queued, or a handle went away.
    pub(crate) wake_driver: Notify,
    /// Wakes the tasks that wait for a phase: the handshake, an option's
    /// result, the end of the connection.
    pub(crate) changed: Notify,
}

impl Shared {
    pub(crate) fn new(conn: Connection) -> Self {
        Shared {
            state: Mutex::new(State {
                conn,
                slots: CookieMap::default(),
                exports: Vec::new(),
                contexts: Vec::new(),
                option_result: None,
                driver_done: false,
                origin: None,
                reconnect: None,
                reconnects: Vec::new(),
                closing: false,
                disconnect_deferred: false,
            }),
            wake_driver: Notify::new(),
            changed: Notify::new(),
        }
    }

    /// Locks the state. Nothing panics while holding it, but a caller's
    /// panic elsewhere must not wedge every other task: a poisoned lock is
    /// taken as it is (the state is consistent after every call).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The protocol state and what its events left for the waiting tasks.
pub(crate) struct State {
    pub(crate) conn: Connection,
    /// One slot per command issued and not yet taken by its future.
    slots: CookieMap<Cookie, Slot>,
    /// Opt mode: exports listed by the option in flight.
    pub(crate) exports: Vec<ExportEntry>,
    /// Opt mode: meta contexts listed or selected by the option in flight.
    pub(crate) contexts: Vec<(u32, String)>,
    /// Opt mode: the result of the option in flight, once it arrived.
    pub(crate) option_result: Option<nbd_proto::Result<()>>,
    /// The driver has ended and closed the socket.
    pub(crate) driver_done: bool,
    /// Where and how the client connected, when it knows (what a reconnect
    /// needs).
    pub(crate) origin: Option<(Endpoint, Config)>,
    /// Automatic reconnect, when turned on.
    pub(crate) reconnect: Option<Box<Reconnect>>,
    /// Reconnects not yet taken by `Client::take_reconnects`.
    pub(crate) reconnects: Vec<Reconnected>,
    /// A disconnect was asked for (shutdown, or the last handle dropped):
    /// a connection that replaces a lost one is ended as soon as it can be.
    pub(crate) closing: bool,
    /// The disconnect waits until the journal holds nothing back (commands
    /// to be sent again, or a connection being replaced).
    pub(crate) disconnect_deferred: bool,
}

/// Where one command's reply waits for its future.
#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    done: Option<Completion>,
    /// `Some` for a structured read: its chunks, in order.
    chunks: Option<Vec<ReadChunk>>,
    statuses: Vec<BlockStatus>,
    /// The future was dropped: the reply is consumed and dropped on arrival.
    abandoned: bool,
}

/// A finished command as the core reported it, with what arrived for it
/// on the way: the chunks of a structured read, the extents of a block
/// status query.
#[derive(Debug)]
#[non_exhaustive]
pub struct Reply {
    /// The core's completion: cookie, result, the read buffer handed back
    /// (also when the read failed).
    pub completion: Completion,
    /// The chunks of a read issued by `aio_pread_structured`, in arrival
    /// order; empty for other commands.
    pub chunks: Vec<ReadChunk>,
    /// One report per meta context for a block status query; empty for
    /// other commands.
    pub statuses: Vec<BlockStatus>,
}

/// What polling a command's slot found.
pub(crate) enum Polled {
    Done(Reply),
    Waiting,
    /// No slot: taken already (a future polled after it returned).
    Missing,
}

impl State {
    /// Opens the slot of a command just issued.
    pub(crate) fn open_slot(&mut self, cookie: Cookie, structured: bool) {
        self.slots.insert(
            cookie,
            Slot {
                chunks: structured.then(Vec::new),
                ..Slot::default()
            },
        );
    }

    /// Takes the command's reply if it arrived, else remembers who to wake.
    pub(crate) fn poll_slot(&mut self, cookie: Cookie, waker: &Waker) -> Polled {
        let Some(slot) = self.slots.get_mut(&cookie) else {
            return Polled::Missing;
        };
        if slot.done.is_none() {
            match &slot.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => slot.waker = Some(waker.clone()),
            }
            return Polled::Waiting;
        }
        let slot = self.slots.remove(&cookie).expect("looked up above");
        Polled::Done(Reply {
            completion: slot.done.expect("checked above"),
            chunks: slot.chunks.unwrap_or_default(),
            statuses: slot.statuses,
        })
    }

    /// The command's future was dropped: a reply that arrived is dropped
    /// now, one still to come is consumed and dropped when it arrives.
    pub(crate) fn abandon_slot(&mut self, cookie: Cookie) {
        let Some(slot) = self.slots.get_mut(&cookie) else {
            return;
        };
        if slot.done.is_some() {
            self.slots.remove(&cookie);
        } else {
            *slot = Slot {
                abandoned: true,
                ..Slot::default()
            };
        }
    }

    /// Drains the core's events into the slots and the opt-mode results.
    /// Wakers to wake (outside the lock) are pushed onto `wake`; returns
    /// whether a phase changed (handshake over, option done, closed), for
    /// the tasks waiting on [`Shared::changed`].
    pub(crate) fn dispatch(&mut self, wake: &mut Vec<Waker>) -> bool {
        let mut changed = false;
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Completed(done) => {
                    let done = match &mut self.reconnect {
                        Some(r) => {
                            let keep = r.keeps_lost(&self.conn);
                            r.journal.complete(done, keep)
                        }
                        None => Some(done),
                    };
                    if let Some(done) = done {
                        self.deliver(done, wake);
                    }
                }
                Event::ReadChunk(mut chunk) => {
                    match &mut chunk {
                        ReadChunk::Data { cookie, .. }
                        | ReadChunk::Hole { cookie, .. }
                        | ReadChunk::Error { cookie, .. } => *cookie = self.caller_cookie(*cookie),
                        _ => {}
                    }
                    if let Some(chunks) = self
                        .slots
                        .get_mut(&chunk.cookie())
                        .and_then(|s| s.chunks.as_mut())
                    {
                        chunks.push(chunk);
                    }
                }
                Event::BlockStatus(mut status) => {
                    status.cookie = self.caller_cookie(status.cookie);
                    if let Some(slot) = self.slots.get_mut(&status.cookie) {
                        if !slot.abandoned {
                            slot.statuses.push(status);
                        }
                    }
                }
                Event::Export { name, description } => {
                    self.exports.push(ExportEntry { name, description })
                }
                Event::MetaContext { id, name } => self.contexts.push((id, name)),
                Event::OptionDone { result, .. } => {
                    self.option_result = Some(result);
                    changed = true;
                }
                // Ready, Negotiating, Closed and kinds added later: the
                // waiting tasks read the phase from the connection.
                _ => changed = true,
            }
        }
        changed
    }

    /// After a reconnect: the chunks and block status reports gathered for
    /// commands not yet completed came from the lost connection, and the
    /// commands were sent again; the new connection reports afresh.
    pub(crate) fn forget_partial_replies(&mut self) {
        for slot in self.slots.values_mut() {
            if slot.done.is_none() {
                if let Some(chunks) = &mut slot.chunks {
                    chunks.clear();
                }
                slot.statuses.clear();
            }
        }
    }

    /// Puts a completion (under the caller's cookie) in its slot.
    pub(crate) fn deliver(&mut self, done: Completion, wake: &mut Vec<Waker>) {
        let cookie = done.cookie;
        if let Some(slot) = self.slots.get_mut(&cookie) {
            if slot.abandoned {
                self.slots.remove(&cookie);
            } else {
                slot.done = Some(done);
                wake.extend(slot.waker.take());
            }
        }
    }

    /// Sends the commands the journal holds back, once the connection is
    /// ready and the writes before them completed; those the connection
    /// refuses complete at once. Returns how many went out.
    pub(crate) fn send_held(&mut self, wake: &mut Vec<Waker>) -> usize {
        let Some(r) = &mut self.reconnect else {
            return 0;
        };
        if r.journal.held() == 0 || !self.conn.is_ready() {
            return 0;
        }
        let (sent, refused) = r.journal.send_held(&mut self.conn);
        for done in refused {
            self.deliver(done, wake);
        }
        sent
    }

    /// The caller's cookie for a cookie of the connection.
    fn caller_cookie(&self, wire: Cookie) -> Cookie {
        self.reconnect
            .as_ref()
            .and_then(|r| r.journal.caller_cookie(wire))
            .unwrap_or(wire)
    }

    /// Whether the connection is over: closed as asked, or dead.
    pub(crate) fn is_over(&self) -> bool {
        self.conn.is_closed() || self.conn.is_dead()
    }
}
