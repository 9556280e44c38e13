//! The opt-mode calls: thin checks of the phase, then [`Negotiation`] does the work.

use super::{Connection, State};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::negotiate::Negotiation;

impl Connection {
    /// The handshake's state and the core, if the caller may start an option now.
    fn negotiation(&mut self) -> Result<(&mut Negotiation, &mut Core)> {
        self.check_alive()?;
        match &mut self.state {
            State::Handshake(negotiation) => {
                negotiation.check_caller_turn()?;
                Ok((negotiation, &mut self.core))
            }
            _ => Err(Error::InvalidState(
                "negotiation is over: the connection is in transmission; options such as \
                 opt_list need opt mode (Config::opt_mode, libnbd's set_opt_mode) and must \
                 come before opt_go"
                    .into(),
            )),
        }
    }

    /// Opt mode: asks for the export list (`NBD_OPT_LIST`). Each export arrives as
    /// an [`Event::Export`](crate::Event::Export), then an
    /// [`Event::OptionDone`](crate::Event::OptionDone).
    pub fn opt_list(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_list(core);
        Ok(())
    }

    /// Opt mode: asks about the current export without entering transmission
    /// (`NBD_OPT_INFO`). On success the export queries answer.
    pub fn opt_info(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_info(core, false)
    }

    /// Opt mode: selects the current export and enters transmission (`NBD_OPT_GO`).
    /// Success is [`Event::Ready`](crate::Event::Ready); a refusal is an
    /// [`Event::OptionDone`](crate::Event::OptionDone) with the error, and the
    /// connection stays negotiating.
    pub fn opt_go(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_info(core, true)
    }

    /// Opt mode: asks for extended headers (`NBD_OPT_EXTENDED_HEADERS`).
    pub fn opt_extended_headers(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_extended_headers(core);
        Ok(())
    }

    /// Opt mode: lists the contexts matching the configured
    /// [`meta_contexts`](crate::Config::meta_contexts) (all, if none are
    /// configured) with `NBD_OPT_LIST_META_CONTEXT`. Each arrives as an
    /// [`Event::MetaContext`](crate::Event::MetaContext), then an
    /// [`Event::OptionDone`](crate::Event::OptionDone).
    pub fn opt_list_meta_context(&mut self) -> Result<()> {
        let queries = self.core.config.meta_contexts.clone();
        self.opt_list_meta_context_queries(&queries)
    }

    /// Opt mode: lists the contexts matching `queries` (all, if empty).
    pub fn opt_list_meta_context_queries(&mut self, queries: &[String]) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_meta_context(core, queries, false)
    }

    /// Opt mode: selects the configured contexts for the current export with
    /// `NBD_OPT_SET_META_CONTEXT`; each selected one arrives as an
    /// [`Event::MetaContext`](crate::Event::MetaContext) with its id, then an
    /// [`Event::OptionDone`](crate::Event::OptionDone).
    pub fn opt_set_meta_context(&mut self) -> Result<()> {
        let queries = self.core.config.meta_contexts.clone();
        self.opt_set_meta_context_queries(&queries)
    }

    /// Opt mode: selects the contexts matching `queries`.
    pub fn opt_set_meta_context_queries(&mut self, queries: &[String]) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_meta_context(core, queries, true)
    }

    /// Opt mode: asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub fn opt_structured_reply(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_structured_reply(core);
        Ok(())
    }

    /// Opt mode: asks the server to start TLS (`NBD_OPT_STARTTLS`, libnbd's
    /// `opt_starttls`). On the server's acknowledgement the connection
    /// switches to a session from its [`TlsConnector`](crate::TlsConnector)
    /// and forgets what was negotiated in plaintext (structured replies,
    /// extended headers, meta contexts, export information); then an
    /// [`Event::OptionDone`](crate::Event::OptionDone) reports the result. A
    /// refusal leaves the connection negotiating in plaintext.
    ///
    /// With [`TlsMode::Allow`](crate::TlsMode::Allow) or
    /// [`Require`](crate::TlsMode::Require) the connection already tried
    /// before handing over, so this is for [`TlsMode::Disable`](crate::TlsMode::Disable)
    /// (the protocol's selective TLS) and for tests. Prefer `Require`: a
    /// server that keeps plaintext state across the switch is open to
    /// injection.
    ///
    /// Errors, sending nothing: [`Error::InvalidState`] if TLS is on already,
    /// [`Error::NotSupported`] without a connector.
    pub fn opt_starttls(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_starttls(core)
    }

    /// Opt mode: ends negotiation without transmission (`NBD_OPT_ABORT`). The
    /// connection closes cleanly when the server acknowledges or hangs up.
    pub fn opt_abort(&mut self) -> Result<()> {
        let (negotiation, core) = self.negotiation()?;
        negotiation.opt_abort(core);
        Ok(())
    }
}
