//! Opt-in automatic reconnect for [`Client`]: connecting again after a lost
//! connection and sending the unfinished commands again, with the
//! connection layer's [`Journal`].

use bytes::BytesMut;
use nbd_io::{
    Endpoint, ExportIdentity, Journal, ReconnectPolicy, Reconnected, Request, Result, Target,
    TlsRequest,
};
use nbd_proto::{Completion, Config, Cookie};

use crate::client::Client;

/// What a client that reconnects keeps: where and how it connected, the
/// export it must find again, and its journal.
pub(crate) struct Reconnect {
    policy: ReconnectPolicy,
    target: Target,
    config: Config,
    /// The TLS settings of an `nbds` endpoint, set up again on each attempt.
    tls: Option<TlsRequest>,
    identity: ExportIdentity,
    pub(crate) journal: Journal,
    /// The last reconnect failed: the connection stays dead.
    gave_up: bool,
}

impl Reconnect {
    /// Whether the commands cut short by the death of `conn` are kept to
    /// send again (rather than completed with the loss).
    pub(crate) fn keeps_lost(&self, conn: &nbd_proto::Connection) -> bool {
        !self.gave_up && conn.error().is_some_and(|e| self.policy.counts(e))
    }
}

impl Client {
    /// Turns automatic reconnect on (`Some`) or off (`None`).
    ///
    /// With a policy, a connection lost to a failure the policy counts (the
    /// server hung up, the socket was reset, the stall deadline) no longer
    /// fails the commands in flight: the next wait connects again to the same
    /// target with the same settings (waiting [`ReconnectPolicy::delay`]
    /// before each attempt), checks that it reaches the same export (same
    /// size, no flag weaker, the same meta contexts; otherwise the reconnect
    /// is refused), and sends every command that had not completed again, in
    /// the order it was first submitted. A command that completed is never
    /// sent again; writes acknowledged since the last flush are written
    /// again first (within [`ReconnectPolicy::replay_budget`]), and a flush
    /// or FUA write sent again waits for the writes before it (see
    /// [`nbd_io::Journal`]; past the budget it fails with EIO instead). Each reconnect is reported by
    /// [`Client::take_reconnects`]. When every attempt fails, each pending
    /// command completes once with `ConnectionLost` and the cause, and the
    /// wait returns an error; the client does not try again.
    ///
    /// The reconnect runs inside the wait that finds the connection lost (a
    /// blocking call, [`Client::poll`], [`Client::poll_many`] or
    /// [`Client::shutdown`]), sleeping between attempts: such a wait can take
    /// longer than a `poll` timeout, by up to the policy's delays plus each
    /// attempt's connect and handshake (bounded by `Config::handshake_timeout`).
    ///
    /// Cookies returned while reconnect is on are the journal's: they stay
    /// valid across connections. A structured read (or block status query)
    /// sent again reports its chunks afresh from the new connection: those
    /// the lost connection had delivered and [`Client::take_chunks`] (or
    /// [`Client::take_block_status`]) had not yet taken are dropped at the
    /// reconnect; those already taken were reported, and may come again.
    ///
    /// Errors (`EINVAL`): the client was made from a socket
    /// ([`Client::connect_socket`]) and so knows no target to connect to
    /// again; it is not in transmission; it is in opt mode; or commands are
    /// in flight.
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
            gave_up: false,
        }));
        Ok(())
    }

    /// The reconnects that happened since the last call, oldest first: why
    /// each connection was lost, which attempt succeeded, and how many
    /// commands went out again.
    pub fn take_reconnects(&mut self) -> Vec<Reconnected> {
        self.reconnects.drain(..).collect()
    }

    /// Whether the connection was lost to a failure the reconnect policy
    /// counts, and the next wait will connect again: the current
    /// [`connection`](Client::connection) is dead, but the client is not.
    pub fn is_reconnecting(&self) -> bool {
        self.reconnect
            .as_ref()
            .is_some_and(|r| r.keeps_lost(&self.conn))
    }

    /// Issues `request` (a read into `buffer`): through the journal when
    /// reconnect is on.
    pub(crate) fn issue(&mut self, request: Request, buffer: Option<BytesMut>) -> Result<Cookie> {
        Ok(match &mut self.reconnect {
            // A connection lost and about to be replaced takes the command
            // into the journal, to go out after the reconnect.
            Some(r) if !self.conn.is_dead() || r.keeps_lost(&self.conn) => {
                r.journal.submit(&mut self.conn, request, buffer)?
            }
            _ => request.issue(&mut self.conn, buffer)?,
        })
    }

    /// A completion of the connection, as the caller sees it (under its
    /// journal cookie), or `None` when the journal keeps it to send again.
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

    /// Sends commands the journal holds back (behind a resent flush) once
    /// the writes before them completed.
    pub(crate) fn send_held(&mut self) {
        let Some(r) = &mut self.reconnect else {
            return;
        };
        if r.journal.held() == 0 || !self.conn.is_ready() {
            return;
        }
        let (_, refused) = r.journal.send_held(&mut self.conn);
        self.completed.extend(refused);
    }

    /// If the connection died of a failure the policy counts, connects
    /// again and sends the unfinished commands again; otherwise nothing.
    /// An error when every attempt failed (or the export changed): the
    /// pending commands have then completed with the cause.
    pub(crate) fn recover(&mut self) -> Result<()> {
        let Some(r) = &self.reconnect else {
            return Ok(());
        };
        let Some(cause) = self.conn.error().cloned() else {
            return Ok(());
        };
        if !r.keeps_lost(&self.conn) {
            return Ok(());
        }
        let mut r = self.reconnect.take().expect("checked above");
        let result = self.reconnect_with(&mut r, &cause);
        if result.is_err() {
            r.gave_up = true;
            self.completed.extend(r.journal.give_up(&cause));
        }
        self.reconnect = Some(r);
        result
    }

    fn reconnect_with(&mut self, r: &mut Reconnect, cause: &nbd_proto::Error) -> Result<()> {
        // Timeouts changed since connecting (set_timeout, ...) carry over.
        r.config.stall_timeout = self.conn.stall_timeout();
        r.config.command_timeout = self.conn.command_timeout();
        let mut last = None;
        for attempt in 1..=r.policy.attempts {
            std::thread::sleep(r.policy.delay(attempt));
            let dialled = match &r.tls {
                None => Client::connect(&r.target, r.config.clone()),
                Some(tls) => {
                    let endpoint = Endpoint {
                        target: r.target.clone(),
                        export_name: r.config.export_name.clone(),
                        tls: Some(tls.clone()),
                    };
                    Client::connect_endpoint(&endpoint, r.config.clone())
                }
            };
            let mut fresh = match dialled {
                Ok(fresh) => fresh,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            if let Err(why) = r.identity.check(&fresh.conn) {
                return Err(nbd_proto::Error::NotConnected(format!(
                    "connection lost ({cause}); reconnected to {}, but {why}: not sending the pending commands there",
                    r.target
                ))
                .into());
            }
            // The fresh client takes the dead connection and socket away.
            std::mem::swap(&mut self.conn, &mut fresh.conn);
            std::mem::swap(&mut self.socket, &mut fresh.socket);
            self.closed = false;
            let resent = r.journal.held();
            // Chunks and block status reports of the commands sent again
            // came from the lost connection; the new one reports afresh.
            let journal = &r.journal;
            self.chunks.retain(|c| !journal.is_pending(c.cookie()));
            self.statuses.retain(|s| !journal.is_pending(s.cookie));
            let (_, refused) = r.journal.resend(&mut self.conn);
            self.completed.extend(refused);
            self.reconnects
                .push_back(Reconnected::new(cause.clone(), attempt, resent));
            return Ok(());
        }
        let last = last.map_or_else(|| "no attempt allowed".to_string(), |e| e.to_string());
        Err(nbd_proto::Error::NotConnected(format!(
            "connection lost ({cause}); {} reconnect attempt(s) failed, the last: {last}",
            r.policy.attempts
        ))
        .into())
    }
}
