//! What both phases of a connection share, and how a phase answers the connection.
//!
//! The handshake (`negotiate.rs`) and transmission (`transmit.rs`) each own
//! their state privately; they borrow this core for the bytes in and out, the
//! event queue and the facts negotiation settles and transmission relies on.
//! Neither phase knows the other or the `Connection`: a change of phase, or the
//! end of the connection, is a [`Step`] the connection carries out.

use std::collections::VecDeque;

use crate::config::Config;
use crate::error::Error;
use crate::event::Event;
use crate::info::{ExportInfo, HandshakeStyle};
use crate::output::Output;
use crate::stage::Stage;
use crate::stats::Stats;
use crate::tls::TlsConnector;

/// The state every phase reads or writes.
pub(crate) struct Core {
    pub(crate) config: Config,
    /// Plaintext received and not yet parsed.
    pub(crate) stage: Stage,
    /// Bytes waiting to go to the server.
    pub(crate) output: Output,
    pub(crate) events: VecDeque<Event>,
    pub(crate) info: ExportInfo,
    /// Set once the greeting arrived; kept for the queries after the handshake.
    pub(crate) style: Option<HandshakeStyle>,
    /// The client flags sent after a newstyle greeting.
    pub(crate) client_flags: Option<u32>,
    pub(crate) structured: bool,
    pub(crate) extended: bool,
    /// Negotiated meta contexts: id and name.
    pub(crate) meta: Vec<(u32, String)>,
    /// Makes the session when the server acknowledges `NBD_OPT_STARTTLS`.
    pub(crate) tls_connector: Option<Box<dyn TlsConnector>>,
    /// Every byte runs through a TLS session now.
    pub(crate) tls_on: bool,
    /// Traffic counters; bytes sent are counted by `output` itself.
    pub(crate) stats: Stats,
}

impl Core {
    pub(crate) fn new(config: Config) -> Self {
        Core {
            config,
            stage: Stage::new(),
            output: Output::new(),
            events: VecDeque::new(),
            info: ExportInfo::default(),
            style: None,
            client_flags: None,
            structured: false,
            extended: false,
            meta: Vec::new(),
            tls_connector: None,
            tls_on: false,
            stats: Stats::default(),
        }
    }

    /// Forgets what was negotiated in plaintext once TLS starts, as the
    /// protocol demands: a man in the middle may have forged any of it.
    pub(crate) fn forget_negotiated(&mut self) {
        self.structured = false;
        self.extended = false;
        self.meta.clear();
        self.info = ExportInfo::default();
    }
}

/// What one parsing step of a phase asks of the connection.
#[derive(Debug)]
#[must_use = "a step may end the phase or the connection"]
pub(crate) enum Step {
    /// More input is needed.
    Blocked,
    /// Input was parsed: try the next step.
    Progressed,
    /// Negotiation is over: transmission starts.
    Ready,
    /// The server acknowledged `NBD_OPT_STARTTLS`: every byte from now on is TLS.
    StartTls,
    /// The connection ends as asked.
    Close,
    /// The connection dies with this error.
    Kill(Error),
}
