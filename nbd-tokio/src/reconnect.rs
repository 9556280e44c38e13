//! Opt-in automatic reconnect for the tokio [`Client`]: the driver task
//! connects again after a lost connection (sleeping between attempts with
//! the runtime's timer, never blocking it), checks the export, and sends
//! the unfinished commands again with the connection layer's [`Journal`].

use std::sync::Arc;
use std::task::Waker;

use nbd_io::{
    Endpoint, ExportIdentity, Journal, ReconnectPolicy, Reconnected, Request, Result, Socket,
    Target,
};
use nbd_proto::{Config, Connection, Cookie};

use crate::client::Client;
use crate::shared::{Shared, State};
use crate::{connect, driver};

/// What a client that reconnects keeps.
pub(crate) struct Reconnect {
    policy: ReconnectPolicy,
    /// Where and how to connect again (TLS settings included; their
    /// files are read again on each attempt).
    endpoint: Endpoint,
    config: Config,
    identity: ExportIdentity,
    pub(crate) journal: Journal,
    /// The driver is replacing a lost connection: commands wait in the
    /// journal meanwhile.
    reconnecting: bool,
    /// Why the client gave up; sticky.
    failure: Option<nbd_proto::Error>,
}

impl Reconnect {
    /// Whether commands cut short by the death of `conn` are kept to send again.
    pub(crate) fn keeps_lost(&self, conn: &Connection) -> bool {
        self.failure.is_none()
            && (self.reconnecting || conn.error().is_some_and(|e| self.policy.counts(e)))
    }
}

impl Client {
    /// Turns automatic reconnect on (`Some`) or off (`None`); the same
    /// contract as `nbd_blocking::Client::set_reconnect`, without blocking
    /// the runtime.
    ///
    /// With a policy, a connection lost to a failure the policy counts (the
    /// server hung up, the socket was reset, the stall deadline) no longer
    /// fails the commands in flight: the driver task waits
    /// [`ReconnectPolicy::delay`] (tokio's timer), connects again to the same
    /// target with the same settings, checks that it reaches the same export
    /// (size, meta contexts, no weaker flags; otherwise the reconnect is
    /// refused), and sends again every command that had not completed, in
    /// submission order. Writes acknowledged since the last flush are written
    /// again first, so a flush or FUA write is reported done only on a
    /// connection that holds every write before it (see [`Journal`]).
    /// Commands issued meanwhile wait and go out on the new connection. Each
    /// reconnect is reported by [`take_reconnects`](Self::take_reconnects).
    /// When the attempts run out, or the export changed, every pending
    /// command completes once with `ConnectionLost` and the cause, and new
    /// commands fail with the reason.
    ///
    /// [`shutdown`](Self::shutdown), `aio_disconnect` or dropping the last
    /// handle while a connection is being replaced (or while the journal
    /// holds commands back) waits for the reconnect and the commands sent
    /// again, then ends the new connection cleanly; commands issued after
    /// it fail with `ESHUTDOWN`.
    ///
    /// Cancel safety holds across a reconnect: a command whose future was
    /// dropped is sent again like the others and its reply is consumed and
    /// dropped. Cookies issued while reconnect is on are the journal's and
    /// stay valid across connections. A structured read or block status
    /// query sent again reports only what the new connection sends: the
    /// chunks and reports the lost connection had delivered for it are
    /// dropped at the reconnect, so none appears twice.
    ///
    /// Errors (`EINVAL`): the client was not made from a [`Target`]
    /// ([`Client::connect`], [`Client::connect_uri`], ...), it is not in
    /// transmission, or commands are in flight.
    pub fn set_reconnect(&self, policy: Option<ReconnectPolicy>) -> Result<()> {
        let mut state = self.lock();
        let in_flight = match &state.reconnect {
            Some(r) => r.journal.len(),
            None => state.conn.in_flight(),
        };
        nbd_io::refuse_in_flight(in_flight)?;
        let Some(policy) = policy else {
            state.reconnect = None;
            return Ok(());
        };
        let prepared = policy.prepare(&state.conn, state.origin.as_ref(), in_flight)?;
        state.reconnect = Some(Box::new(Reconnect {
            policy,
            endpoint: prepared.place,
            config: prepared.config,
            identity: prepared.identity,
            journal: prepared.journal,
            reconnecting: false,
            failure: None,
        }));
        Ok(())
    }

    /// The reconnects since the last call, oldest first: why each
    /// connection was lost, which attempt succeeded, and how many commands
    /// went out again.
    pub fn take_reconnects(&self) -> Vec<Reconnected> {
        std::mem::take(&mut self.lock().reconnects)
    }
}

impl State {
    /// Issues `request` (a read into `buffer`): through the journal when
    /// reconnect is on, held there while a reconnect is under way.
    pub(crate) fn issue(
        &mut self,
        request: Request,
        buffer: Option<bytes::BytesMut>,
    ) -> Result<Cookie> {
        let Some(r) = &mut self.reconnect else {
            return Ok(request.issue(&mut self.conn, buffer)?);
        };
        if let Some(failure) = &r.failure {
            return Err(failure.clone().into());
        }
        if self.closing {
            return Err(nbd_proto::Error::Shutdown("the client is disconnecting".into()).into());
        }
        Ok(if r.reconnecting {
            r.journal.hold(request, buffer)
        } else if !self.conn.is_dead() || r.keeps_lost(&self.conn) {
            r.journal.submit(&mut self.conn, request, buffer)?
        } else {
            request.issue(&mut self.conn, buffer)?
        })
    }

    /// Asks to end the connection (shutdown, `aio_disconnect`, the last
    /// handle dropped). With reconnect on, commands the journal holds back
    /// (to be sent again, or issued while the connection is replaced) go
    /// out first: the disconnect waits for them (the core then holds
    /// `NBD_CMD_DISC` back until nothing is in flight).
    pub(crate) fn ask_disconnect(&mut self) -> nbd_proto::Result<()> {
        self.closing = true;
        if self.holds_back() {
            self.disconnect_deferred = true;
            return Ok(());
        }
        self.conn.disconnect()
    }

    /// Carries out a deferred disconnect once nothing is held back; the
    /// driver calls it every pass. Whether it did.
    pub(crate) fn finish_closing(&mut self) -> bool {
        if self.disconnect_deferred && self.conn.is_ready() && !self.holds_back() {
            self.disconnect_deferred = false;
            let _ = self.conn.disconnect();
            return true;
        }
        false
    }

    /// Whether the journal holds commands back from the connection.
    fn holds_back(&self) -> bool {
        self.reconnect.as_ref().is_some_and(|r| {
            r.reconnecting
                || r.journal.held() > 0
                || (self.conn.is_dead() && r.keeps_lost(&self.conn))
        })
    }

    /// Commands issued and not completed.
    pub(crate) fn pending(&self) -> usize {
        match &self.reconnect {
            Some(r) => r.journal.len(),
            None => self.conn.in_flight(),
        }
    }
}

/// After the connection of `shared` ended: if reconnect is on and the cause
/// counts, connects again (with the policy's attempts and delays), takes
/// the new connection into use and sends the unfinished commands again;
/// returns its socket for the driver to go on with. `None` when there is
/// nothing to do, or when it gave up (the pending commands then have
/// completed once with the cause).
pub(crate) async fn recover(shared: &Arc<Shared>) -> Option<Socket> {
    let (cause, policy, endpoint, config) = {
        let mut state = shared.lock();
        let cause = state.conn.error().cloned()?;
        let stall = state.conn.stall_timeout();
        let command = state.conn.command_timeout();
        let closing = state.closing;
        let r = state.reconnect.as_mut()?;
        if r.failure.is_some() || !r.policy.counts(&cause) {
            return None;
        }
        if closing && r.journal.is_empty() {
            // Asked to end, and nothing is owed to anyone: no need to return.
            return None;
        }
        r.reconnecting = true;
        // Timeouts changed since connecting carry over.
        let mut config = r.config.clone();
        config.stall_timeout = stall;
        config.command_timeout = command;
        (cause, r.policy.clone(), r.endpoint.clone(), config)
    };
    let mut last = None;
    for attempt in 1..=policy.attempts {
        tokio::time::sleep(policy.delay(attempt)).await;
        let fresh = match attempt_once(&endpoint, config.clone()).await {
            Ok(fresh) => fresh,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let (conn, socket) = fresh;
        let mut wake = Vec::new();
        let taken = {
            let mut state = shared.lock();
            take_over(
                &mut state,
                conn,
                &cause,
                attempt,
                &endpoint.target,
                &mut wake,
            )
        };
        finish(shared, wake);
        return taken.then_some(socket);
    }
    let last = last.map_or_else(|| "no attempt allowed".to_string(), |e| e.to_string());
    let failure = nbd_proto::Error::NotConnected(format!(
        "connection lost ({cause}); {} reconnect attempt(s) failed, the last: {last}",
        policy.attempts
    ));
    let mut wake = Vec::new();
    give_up(&mut shared.lock(), &cause, failure, &mut wake);
    finish(shared, wake);
    None
}

/// One attempt: connect and negotiate.
async fn attempt_once(endpoint: &Endpoint, config: Config) -> Result<(Connection, Socket)> {
    // Made first: TLS settings that no longer work fail the attempt before
    // any socket.
    let conn = nbd_io::tls::connection_for(endpoint, config)?;
    let socket = connect::finish(connect::start(&endpoint.target).await?).await?;
    driver::handshake(socket, conn).await
}

/// Puts `conn` in place of the lost connection if it reaches the same
/// export and sends the unfinished commands on it; otherwise gives up.
/// Whether it was taken.
fn take_over(
    state: &mut State,
    mut conn: Connection,
    cause: &nbd_proto::Error,
    attempt: u32,
    target: &Target,
    wake: &mut Vec<Waker>,
) -> bool {
    let Some(r) = state.reconnect.as_mut() else {
        return false;
    };
    if let Err(why) = r.identity.check(&conn) {
        let _ = conn.disconnect();
        let refusal = nbd_proto::Error::NotConnected(format!(
            "connection lost ({cause}); reconnected to {target}, but {why}: not sending the pending commands there"
        ));
        give_up(state, cause, refusal, wake);
        return false;
    }
    r.reconnecting = false;
    let resent = r.journal.held();
    let (_, refused) = r.journal.resend(&mut conn);
    state.conn = conn;
    state.forget_partial_replies();
    for done in refused {
        state.deliver(done, wake);
    }
    state
        .reconnects
        .push(Reconnected::new(cause.clone(), attempt, resent));
    if state.closing {
        // Asked to end while the connection was being replaced: once what
        // is sent again has gone out (see `State::finish_closing`).
        state.disconnect_deferred = true;
    }
    true
}

/// Fails every kept command once with `cause`; the client is over.
fn give_up(
    state: &mut State,
    cause: &nbd_proto::Error,
    failure: nbd_proto::Error,
    wake: &mut Vec<Waker>,
) {
    let Some(r) = state.reconnect.as_mut() else {
        return;
    };
    r.reconnecting = false;
    let failed = r.journal.give_up(cause);
    r.failure = Some(failure);
    for done in failed {
        state.deliver(done, wake);
    }
}

/// Wakes the commands completed and the tasks waiting for a change.
fn finish(shared: &Shared, wake: Vec<Waker>) {
    for waker in wake {
        waker.wake();
    }
    shared.changed.notify_waiters();
}
