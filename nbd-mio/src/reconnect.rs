//! Opt-in automatic reconnect for the mio [`Client`], without blocking: the
//! pause between attempts is a deadline the loop learns from
//! [`Client::poll_timeout`], and each attempt connects and negotiates on
//! readiness events like the first connection did. The unfinished commands
//! are kept and sent again by the connection layer's [`Journal`].

use std::time::Instant;

use bytes::BytesMut;
use mio::unix::SourceFd;
use mio::Interest;
use nbd_io::{
    Connecting, ExportIdentity, Journal, ReconnectPolicy, Reconnected, Request, Result, Target,
};
use nbd_proto::{Completion, Config, Connection, Cookie, Event};

use crate::client::{Client, Link};

/// What a client that reconnects keeps.
pub(crate) struct Reconnect {
    policy: ReconnectPolicy,
    target: Target,
    config: Config,
    /// The TLS settings of an `nbds` endpoint, set up again on each attempt.
    tls: Option<nbd_io::TlsRequest>,
    identity: ExportIdentity,
    pub(crate) journal: Journal,
    state: State,
    /// Why the client gave up; sticky.
    pub(crate) failure: Option<nbd_proto::Error>,
}

/// Where a reconnect stands.
enum State {
    /// Connected (or never lost).
    Idle,
    /// Lost to `cause`; attempt `attempt` starts at `at`.
    Waiting {
        attempt: u32,
        at: Instant,
        cause: nbd_proto::Error,
    },
    /// Attempt `attempt` is connecting or negotiating.
    Attempting {
        attempt: u32,
        cause: nbd_proto::Error,
    },
}

impl Reconnect {
    /// Whether commands cut short by the death of `conn` are kept to send again.
    pub(crate) fn keeps_lost(&self, conn: &Connection) -> bool {
        self.failure.is_none()
            && (!matches!(self.state, State::Idle)
                || conn.error().is_some_and(|e| self.policy.counts(e)))
    }

    /// Whether a reconnect is under way (the dead connection is not the end).
    pub(crate) fn under_way(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// When the next attempt starts, while waiting for it.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { at, .. } => Some(at),
            _ => None,
        }
    }
}

impl Client {
    /// Turns automatic reconnect on (`Some`) or off (`None`); the same
    /// contract as `nbd_blocking::Client::set_reconnect`, without blocking.
    ///
    /// After a connection lost to a failure the policy counts, the next
    /// [`drive`](Self::drive) or [`handle_timeout`](Self::handle_timeout)
    /// does not return the error: the client waits
    /// [`ReconnectPolicy::delay`] (a deadline in
    /// [`poll_timeout`](Self::poll_timeout), so keep passing it to
    /// `Poll::poll` and calling `handle_timeout`), connects again to the same
    /// target, registered under the same token, negotiates with the same
    /// settings, checks that the export is the same one (size, meta
    /// contexts, no weaker flags), and sends again every command that had not
    /// completed, in submission order (see [`nbd_io::Journal`]). Each reconnect is
    /// reported by [`take_reconnects`](Self::take_reconnects). When the
    /// attempts run out, or the export changed, every pending command
    /// completes once with `ConnectionLost` and the cause, and the driving
    /// calls return the error from then on.
    ///
    /// Cookies issued while reconnect is on stay valid across connections.
    /// A structured read (or block status query) sent again reports its
    /// chunks afresh from the new connection: its `ReadChunk` and
    /// `BlockStatus` events from the lost connection still queued are
    /// dropped at the reconnect; those already taken may come again.
    ///
    /// Errors (`EINVAL`): the client was not made from a [`Target`]
    /// ([`Client::connect`], [`Client::connect_uri`],
    /// [`Client::connect_endpoint`]), it is not in transmission, or commands
    /// are in flight.
    pub fn set_reconnect(&mut self, policy: Option<ReconnectPolicy>) -> Result<()> {
        nbd_io::refuse_in_flight(self.in_flight())?;
        let Some(policy) = policy else {
            self.reconnect = None;
            return Ok(());
        };
        let prepared = policy.prepare(&self.conn, self.origin.as_ref(), self.in_flight())?;
        self.reconnect = Some(Box::new(Reconnect {
            policy,
            target: prepared.place,
            config: prepared.config,
            tls: self.origin_tls.clone(),
            identity: prepared.identity,
            journal: prepared.journal,
            state: State::Idle,
            failure: None,
        }));
        Ok(())
    }

    /// The reconnects since the last call, oldest first.
    pub fn take_reconnects(&mut self) -> Vec<Reconnected> {
        self.reconnects.drain(..).collect()
    }

    /// Issues `request` (a read into `buffer`): through the journal when
    /// reconnect is on, and held there while a reconnect is under way.
    pub(crate) fn issue(&mut self, request: Request, buffer: Option<BytesMut>) -> Result<Cookie> {
        if let Some(failure) = self.reconnect.as_ref().and_then(|r| r.failure.clone()) {
            return Err(failure.into());
        }
        Ok(match &mut self.reconnect {
            // The connection in place is not ready yet: the journal holds it.
            Some(r) if r.under_way() => r.journal.hold(request, buffer),
            Some(r) if !self.conn.is_dead() || r.keeps_lost(&self.conn) => {
                r.journal.submit(&mut self.conn, request, buffer)?
            }
            _ => request.issue(&mut self.conn, buffer)?,
        })
    }

    /// A completion as the caller sees it, or `None` when kept to send again.
    pub(crate) fn caller_completion(&mut self, done: Completion) -> Option<Completion> {
        match &mut self.reconnect {
            Some(r) => {
                let keep = r.keeps_lost(&self.conn);
                r.journal.complete(done, keep)
            }
            None => Some(done),
        }
    }

    /// The caller's cookie for a cookie of the connection.
    pub(crate) fn caller_cookie(&self, wire: Cookie) -> Cookie {
        self.reconnect
            .as_ref()
            .and_then(|r| r.journal.caller_cookie(wire))
            .unwrap_or(wire)
    }

    /// Moves a reconnect on at `now`: starts waiting after a loss, starts an
    /// attempt when the wait is over, takes a negotiated attempt into use
    /// (sending the unfinished commands again), or gives up.
    pub(crate) fn step_reconnect(&mut self, now: Instant) {
        let Some(mut r) = self.reconnect.take() else {
            return;
        };
        // Each step that changes the state may allow another (a wait of
        // zero, an attempt that fails at once); every failed attempt counts,
        // so this ends.
        while self.step_once(&mut r, now) {}
        self.reconnect = Some(r);
    }

    /// One step; whether the state changed.
    fn step_once(&mut self, r: &mut Reconnect, now: Instant) -> bool {
        let (next, changed) = match std::mem::replace(&mut r.state, State::Idle) {
            State::Idle => match self.conn.error() {
                Some(cause) if r.failure.is_none() && r.policy.counts(cause) => {
                    let at = now + r.policy.delay(1);
                    let cause = cause.clone();
                    (
                        State::Waiting {
                            attempt: 1,
                            at,
                            cause,
                        },
                        true,
                    )
                }
                _ => {
                    self.send_held(r);
                    (State::Idle, false)
                }
            },
            State::Waiting { attempt, at, cause } if now >= at => {
                match self.start_attempt(r, now) {
                    Ok(()) => (State::Attempting { attempt, cause }, true),
                    Err(_) => (self.after_failed_attempt(r, attempt, cause, now), true),
                }
            }
            waiting @ State::Waiting { .. } => (waiting, false),
            State::Attempting { attempt, cause } if self.conn.is_ready() => {
                match r.identity.check(&self.conn) {
                    Ok(()) => {
                        let resent = r.journal.held();
                        // Chunks and block status reports of the commands
                        // sent again came from the lost connection; the new
                        // one reports afresh. Those not yet taken go.
                        let journal = &r.journal;
                        self.events.retain(|e| match e {
                            Event::ReadChunk(c) => !journal.is_pending(c.cookie()),
                            Event::BlockStatus(s) => !journal.is_pending(s.cookie),
                            _ => true,
                        });
                        let (_, refused) = r.journal.resend(&mut self.conn);
                        self.completions.extend(refused);
                        self.reconnects
                            .push_back(Reconnected::new(cause, attempt, resent));
                        let _ = self.write_some();
                    }
                    Err(why) => {
                        let refusal = nbd_proto::Error::NotConnected(format!(
                            "connection lost ({cause}); reconnected to {}, but {why}: not sending the pending commands there",
                            r.target
                        ));
                        let _ = self.conn.disconnect();
                        let _ = self.write_some();
                        self.give_up(r, &cause, refusal);
                    }
                }
                (State::Idle, true)
            }
            State::Attempting { attempt, cause }
                if self.conn.is_dead() || self.conn.is_closed() =>
            {
                (self.after_failed_attempt(r, attempt, cause, now), true)
            }
            attempting @ State::Attempting { .. } => (attempting, false),
        };
        r.state = next;
        changed
    }

    /// After attempt `attempt` failed: wait for the next, or give up.
    fn after_failed_attempt(
        &mut self,
        r: &mut Reconnect,
        attempt: u32,
        cause: nbd_proto::Error,
        now: Instant,
    ) -> State {
        if attempt < r.policy.attempts {
            State::Waiting {
                attempt: attempt + 1,
                at: now + r.policy.delay(attempt + 1),
                cause,
            }
        } else {
            let failure = nbd_proto::Error::NotConnected(format!(
                "connection lost ({cause}); {} reconnect attempt(s) failed",
                r.policy.attempts
            ));
            self.give_up(r, &cause, failure);
            State::Idle
        }
    }

    /// Fails every kept command once with `cause`; the client is over.
    fn give_up(&mut self, r: &mut Reconnect, cause: &nbd_proto::Error, failure: nbd_proto::Error) {
        self.completions.extend(r.journal.give_up(cause));
        r.failure = Some(failure);
        self.closed = true;
        let _ = self.release_socket();
    }

    /// Starts connecting to the target again, on a fresh connection
    /// registered under the same token.
    fn start_attempt(&mut self, r: &Reconnect, now: Instant) -> Result<()> {
        // Timeouts changed since connecting carry over to the new connection.
        let mut config = r.config.clone();
        config.stall_timeout = self.conn.stall_timeout();
        config.command_timeout = self.conn.command_timeout();
        // Made first: TLS settings that no longer work (files read again,
        // so renewed certificates are used) fail the attempt before any socket.
        let mut conn = match &r.tls {
            None => Connection::new(config),
            Some(tls) => {
                let endpoint = nbd_io::Endpoint {
                    target: r.target.clone(),
                    export_name: config.export_name.clone(),
                    tls: Some(tls.clone()),
                };
                nbd_io::tls::connection_for(&endpoint, config)?
            }
        };
        let _ = self.release_socket();
        let connecting = Connecting::start(&r.target)?;
        let link = Link::Connecting(connecting);
        if let Some(fd) = link.fd() {
            self.registry.register(
                &mut SourceFd(&fd),
                self.token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        self.link = link;
        self.write_blocked = false;
        conn.handle_timeout(now);
        self.conn = conn;
        Ok(())
    }

    /// Sends commands the journal holds back behind a resent flush, once
    /// the writes before them completed.
    fn send_held(&mut self, r: &mut Reconnect) {
        if r.journal.held() > 0 && self.conn.is_ready() {
            let (_, refused) = r.journal.send_held(&mut self.conn);
            self.completions.extend(refused);
            let _ = self.write_some();
        }
    }
}
