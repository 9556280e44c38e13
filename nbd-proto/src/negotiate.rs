//! The handshake: greeting, client flags, option haggling, and the opt-mode calls.
//!
//! One option is in flight at a time. The automatic path asks for extended
//! headers (falling back to structured replies), selects the requested meta
//! contexts, then sends `NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME` when
//! the server does not know GO. Opt mode stops after extended headers and
//! structured replies and lets the caller issue options one by one; its
//! `opt_go` and `opt_info` still select the requested contexts first, as libnbd's do.

use crate::connection::{AfterDiscard, Connection, Rx, State};
use crate::error::{Error, Result, ServerText};
use crate::event::Event;
use crate::flags::{HandshakeFlags, TransmissionFlags};
use crate::info::{BlockSizes, ExportInfo, HandshakeStyle};
use crate::stage::MAX_BUFFERED_PAYLOAD;
use crate::wire::consts::*;
use crate::wire::{
    decode_string, ExportNameReply, GreetingStart, Info, InfoRequest, MetaContextReply,
    MetaContextRequest, OldstyleRest, OptionReplyHeader, OptionRequest, ServerEntry,
};

/// The option waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingOpt {
    /// `auto`: part of the automatic handshake, not an opt-mode call.
    ExtendedHeaders {
        auto: bool,
    },
    StructuredReply {
        auto: bool,
    },
    List,
    ListMeta,
    /// `then`: the INFO or GO this selection prepares (`None`: an opt-mode call).
    SetMeta {
        then: Option<InfoStep>,
    },
    /// `go`: GO rather than INFO.
    Info {
        go: bool,
        auto: bool,
    },
    /// Only ever sent by the client itself: the automatic path or its fallback.
    ExportName,
    /// `auto`: sent by the client itself after `NBD_REP_ERR_SHUTDOWN`.
    Abort {
        auto: bool,
    },
}

/// An `NBD_OPT_INFO` or `NBD_OPT_GO` waiting for its meta context selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InfoStep {
    go: bool,
    auto: bool,
}

/// The largest payload a legal reply of type `reply` to `pending` can carry,
/// or `None` when no legal reply to that option has that type. Strings are at
/// most `MAX_STRING_LEN` bytes, as the protocol requires; `NBD_REP_INFO` is
/// bounded by what the client buffers whole.
fn option_reply_limit(pending: PendingOpt, reply: u32) -> Option<usize> {
    if reply & REP_FLAG_ERROR != 0 {
        // An optional message.
        return Some(MAX_STRING_LEN);
    }
    match (pending, reply) {
        (_, REP_ACK) => Some(0),
        // Name length, name, description.
        (PendingOpt::List, REP_SERVER) => Some(4 + 2 * MAX_STRING_LEN),
        // Context id, name.
        (PendingOpt::ListMeta | PendingOpt::SetMeta { .. }, REP_META_CONTEXT) => {
            Some(4 + MAX_STRING_LEN)
        }
        // Unknown info types may be any length and must be ignored: the
        // bound is what is ever buffered whole.
        (PendingOpt::Info { .. }, REP_INFO) => Some(MAX_BUFFERED_PAYLOAD),
        _ => None,
    }
}

/// Most replies one option may bring (exports listed, contexts): a bound on
/// what a hostile server can make the client hold.
pub(crate) const MAX_OPTION_REPLIES: usize = 65_536;

impl PendingOpt {
    pub(crate) fn option(self) -> u32 {
        match self {
            PendingOpt::ExtendedHeaders { .. } => OPT_EXTENDED_HEADERS,
            PendingOpt::StructuredReply { .. } => OPT_STRUCTURED_REPLY,
            PendingOpt::List => OPT_LIST,
            PendingOpt::ListMeta => OPT_LIST_META_CONTEXT,
            PendingOpt::SetMeta { .. } => OPT_SET_META_CONTEXT,
            PendingOpt::Info { go: true, .. } => OPT_GO,
            PendingOpt::Info { go: false, .. } => OPT_INFO,
            PendingOpt::ExportName => OPT_EXPORT_NAME,
            PendingOpt::Abort { .. } => OPT_ABORT,
        }
    }
    pub(crate) fn is_abort(self) -> bool {
        matches!(self, PendingOpt::Abort { .. })
    }
    pub(crate) fn is_export_name(self) -> bool {
        self == PendingOpt::ExportName
    }
    /// The option the caller asked for: an `opt_go` / `opt_info` that is still
    /// selecting its meta contexts is reported as GO / INFO.
    pub(crate) fn caller_option(self) -> u32 {
        match self {
            PendingOpt::SetMeta { then: Some(step) } if step.go => OPT_GO,
            PendingOpt::SetMeta { then: Some(_) } => OPT_INFO,
            other => other.option(),
        }
    }

    pub(crate) fn is_auto(self) -> bool {
        matches!(
            self,
            PendingOpt::ExtendedHeaders { auto: true }
                | PendingOpt::StructuredReply { auto: true }
                | PendingOpt::SetMeta {
                    then: Some(InfoStep { auto: true, .. })
                }
                | PendingOpt::Info { auto: true, .. }
                | PendingOpt::ExportName
                | PendingOpt::Abort { auto: true }
        )
    }
}

impl Connection {
    // ------------------------------------------------------------ greeting

    pub(crate) fn rx_greeting(&mut self) -> bool {
        let Some(bytes) = self.take::<{ GreetingStart::LEN }>() else {
            return false;
        };
        match GreetingStart::decode(&bytes) {
            Ok(GreetingStart::Oldstyle) => self.rx = Rx::OldstyleRest,
            Ok(GreetingStart::Newstyle) => self.rx = Rx::HandshakeFlags,
            Err(e) => self.kill(e.into()),
        }
        true
    }

    pub(crate) fn rx_oldstyle_rest(&mut self) -> bool {
        let Some(bytes) = self.take::<{ OldstyleRest::LEN }>() else {
            return false;
        };
        let rest = match OldstyleRest::decode(&bytes) {
            Ok(rest) => rest,
            // Unreachable: `take` gave exactly the length the decoder needs.
            Err(e) => {
                self.kill(e.into());
                return true;
            }
        };
        self.style = Some(HandshakeStyle::Oldstyle);
        self.info.size = Some(rest.size);
        // The low 16 bits are the transmission flags; the high ones are unused.
        self.info.flags = Some(TransmissionFlags::from_bits_retain(rest.flags as u16));
        self.enter_ready();
        true
    }

    pub(crate) fn rx_handshake_flags(&mut self) -> bool {
        let Some(bytes) = self.take::<2>() else {
            return false;
        };
        let server = u16::from_be_bytes(bytes);
        let wanted = self.config.handshake_flags;
        let mut sent = 0;
        if server & FLAG_FIXED_NEWSTYLE != 0 && wanted.contains(HandshakeFlags::FIXED_NEWSTYLE) {
            sent |= FLAG_C_FIXED_NEWSTYLE;
        }
        if server & FLAG_NO_ZEROES != 0 && wanted.contains(HandshakeFlags::NO_ZEROES) {
            sent |= FLAG_C_NO_ZEROES;
        }
        self.output
            .push_with(|b| b.extend_from_slice(&sent.to_be_bytes()));
        self.client_flags = Some(sent);
        self.no_zeroes = sent & FLAG_C_NO_ZEROES != 0;
        if sent & FLAG_C_FIXED_NEWSTYLE != 0 {
            self.style = Some(HandshakeStyle::FixedNewstyle);
            if self.config.request_extended_headers {
                let pending = PendingOpt::ExtendedHeaders { auto: true };
                self.send_option(OPT_EXTENDED_HEADERS, &[], pending);
            } else {
                self.after_extended_headers();
            }
        } else {
            // Plain newstyle knows only EXPORT_NAME, with no way to report errors.
            self.style = Some(HandshakeStyle::Newstyle);
            self.send_export_name();
        }
        true
    }

    /// Extended headers imply structured replies; otherwise ask for those.
    fn after_extended_headers(&mut self) {
        if !self.structured && self.config.request_structured_replies {
            self.send_option(
                OPT_STRUCTURED_REPLY,
                &[],
                PendingOpt::StructuredReply { auto: true },
            );
        } else {
            self.after_auto_options();
        }
    }

    /// After the options the client always sends: hand over (opt mode) or GO.
    fn after_auto_options(&mut self) {
        if self.config.opt_mode {
            self.wait_for_caller();
        } else if let Err(e) = self.start_info(true, true) {
            self.kill(e);
        }
    }

    /// INFO or GO, preceded by the meta context selection when one is wanted.
    /// An error means nothing was sent: the selection cannot be encoded.
    fn start_info(&mut self, go: bool, auto: bool) -> Result<()> {
        if self.config.request_meta_context
            && self.structured
            && !self.config.meta_contexts.is_empty()
        {
            let queries = self.config.meta_contexts.clone();
            self.send_meta(
                OPT_SET_META_CONTEXT,
                &queries,
                PendingOpt::SetMeta {
                    then: Some(InfoStep { go, auto }),
                },
            )
        } else {
            self.send_info(go, auto);
            Ok(())
        }
    }

    /// Sends a meta context option, or refuses (sending nothing) when the
    /// queries do not fit the protocol's limits.
    fn send_meta(&mut self, option: u32, queries: &[String], pending: PendingOpt) -> Result<()> {
        crate::config::check_meta_queries(&self.config.export_name, queries)?;
        let mut data = Vec::new();
        MetaContextRequest::encode(&self.config.export_name, queries, &mut data);
        self.meta_pending.clear();
        self.send_option(option, &data, pending);
        Ok(())
    }

    fn wait_for_caller(&mut self) {
        self.state = State::Negotiating;
        self.rx = Rx::OptReplyHeader;
        self.events.push_back(Event::Negotiating);
    }

    // ------------------------------------------------------------ sending options

    fn send_option(&mut self, option: u32, data: &[u8], pending: PendingOpt) {
        self.listed = 0;
        self.output
            .push_with(|b| OptionRequest::encode_with(option, data, b));
        self.pending_opt = Some(pending);
        self.state = State::Handshake;
        self.rx = Rx::OptReplyHeader;
    }

    fn send_info(&mut self, go: bool, auto: bool) {
        let mut requests = Vec::with_capacity(3);
        if self.config.request_block_size {
            requests.push(INFO_BLOCK_SIZE);
        }
        if self.config.full_info {
            requests.extend([INFO_NAME, INFO_DESCRIPTION]);
        }
        let mut data = Vec::new();
        InfoRequest::encode(&self.config.export_name, &requests, &mut data);
        self.info = ExportInfo::default();
        let option = if go { OPT_GO } else { OPT_INFO };
        self.send_option(option, &data, PendingOpt::Info { go, auto });
    }

    fn send_export_name(&mut self) {
        let name = self.config.export_name.clone();
        self.output
            .push_with(|b| OptionRequest::encode_with(OPT_EXPORT_NAME, name.as_bytes(), b));
        self.pending_opt = Some(PendingOpt::ExportName);
        self.state = State::Handshake;
        self.rx = Rx::ExportNameReply;
    }

    /// Checks that the caller may start an option now.
    fn check_negotiating(&self) -> Result<()> {
        self.check_alive()?;
        match self.state {
            State::Negotiating => Ok(()),
            State::Ready => Err(Error::InvalidState(
                "negotiation is over: the connection is in transmission; options such as \
                 opt_list need opt mode (Config::opt_mode, libnbd's set_opt_mode) and must \
                 come before opt_go"
                    .into(),
            )),
            _ if self.pending_opt.is_some() => {
                Err(Error::InvalidState("another option is in flight".into()))
            }
            _ => Err(Error::InvalidState(
                "not negotiating: options can be issued only in opt mode once the greeting arrived"
                    .into(),
            )),
        }
    }

    /// Opt mode: asks for the export list (`NBD_OPT_LIST`). Each export arrives as
    /// an [`Event::Export`], then an [`Event::OptionDone`].
    pub fn opt_list(&mut self) -> Result<()> {
        self.check_negotiating()?;
        self.send_option(OPT_LIST, &[], PendingOpt::List);
        Ok(())
    }

    /// Opt mode: asks about the current export without entering transmission
    /// (`NBD_OPT_INFO`). On success the export queries answer.
    pub fn opt_info(&mut self) -> Result<()> {
        self.check_negotiating()?;
        self.start_info(false, false)
    }

    /// Opt mode: selects the current export and enters transmission (`NBD_OPT_GO`).
    /// Success is [`Event::Ready`]; a refusal is an [`Event::OptionDone`] with the
    /// error, and the connection stays negotiating.
    pub fn opt_go(&mut self) -> Result<()> {
        self.check_negotiating()?;
        self.start_info(true, false)
    }

    /// Opt mode: asks for extended headers (`NBD_OPT_EXTENDED_HEADERS`).
    pub fn opt_extended_headers(&mut self) -> Result<()> {
        self.check_negotiating()?;
        self.send_option(
            OPT_EXTENDED_HEADERS,
            &[],
            PendingOpt::ExtendedHeaders { auto: false },
        );
        Ok(())
    }

    /// Opt mode: lists the contexts matching the configured
    /// [`meta_contexts`](crate::Config::meta_contexts) (all, if none are
    /// configured) with `NBD_OPT_LIST_META_CONTEXT`. Each arrives as an
    /// [`Event::MetaContext`], then an [`Event::OptionDone`].
    pub fn opt_list_meta_context(&mut self) -> Result<()> {
        let queries = self.config.meta_contexts.clone();
        self.opt_list_meta_context_queries(&queries)
    }

    /// Opt mode: lists the contexts matching `queries` (all, if empty).
    pub fn opt_list_meta_context_queries(&mut self, queries: &[String]) -> Result<()> {
        self.check_meta_allowed(queries)?;
        self.send_meta(OPT_LIST_META_CONTEXT, queries, PendingOpt::ListMeta)
    }

    /// Opt mode: selects the configured contexts for the current export with
    /// `NBD_OPT_SET_META_CONTEXT`; each selected one arrives as an
    /// [`Event::MetaContext`] with its id, then an [`Event::OptionDone`].
    pub fn opt_set_meta_context(&mut self) -> Result<()> {
        let queries = self.config.meta_contexts.clone();
        self.opt_set_meta_context_queries(&queries)
    }

    /// Opt mode: selects the contexts matching `queries`.
    pub fn opt_set_meta_context_queries(&mut self, queries: &[String]) -> Result<()> {
        self.check_meta_allowed(queries)?;
        self.send_meta(
            OPT_SET_META_CONTEXT,
            queries,
            PendingOpt::SetMeta { then: None },
        )
    }

    fn check_meta_allowed(&self, queries: &[String]) -> Result<()> {
        self.check_negotiating()?;
        if !self.structured {
            return Err(Error::InvalidState(
                "meta contexts need structured replies to be negotiated first".into(),
            ));
        }
        // The same limits as Config::validate and add_meta_context.
        crate::config::check_meta_queries(&self.config.export_name, queries)
    }

    /// Opt mode: asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub fn opt_structured_reply(&mut self) -> Result<()> {
        self.check_negotiating()?;
        self.send_option(
            OPT_STRUCTURED_REPLY,
            &[],
            PendingOpt::StructuredReply { auto: false },
        );
        Ok(())
    }

    /// Opt mode: ends negotiation without transmission (`NBD_OPT_ABORT`). The
    /// connection closes cleanly when the server acknowledges or hangs up.
    pub fn opt_abort(&mut self) -> Result<()> {
        self.check_negotiating()?;
        self.send_option(OPT_ABORT, &[], PendingOpt::Abort { auto: false });
        Ok(())
    }

    // ------------------------------------------------------------ option replies

    pub(crate) fn rx_opt_reply_header(&mut self) -> bool {
        let Some(bytes) = self.take::<{ OptionReplyHeader::LEN }>() else {
            return false;
        };
        let header = match OptionReplyHeader::decode(&bytes) {
            Ok(h) => h,
            Err(e) => {
                self.kill(e.into());
                return true;
            }
        };
        let Some(pending) = self.pending_opt else {
            self.kill(Error::Protocol(format!(
                "option reply for {} when no option was sent",
                option_name(header.option)
            )));
            return true;
        };
        if header.option != pending.option() {
            self.kill(Error::Protocol(format!(
                "reply for {} while waiting for {}",
                option_name(header.option),
                option_name(pending.option())
            )));
            return true;
        }
        if pending.is_abort() {
            // Whatever the server says, the abort is done; its payload is not
            // waited for.
            self.close_clean();
            return true;
        }
        // The length rule of the handshake: judged before any payload byte is
        // read, so a server cannot make the client wait for bytes no legal
        // reply has.
        let name = option_name(header.option);
        let reply = reply_type_name(header.reply_type);
        let Some(limit) = option_reply_limit(pending, header.reply_type) else {
            self.kill(Error::Protocol(format!(
                "unexpected {reply} reply to {name}"
            )));
            return true;
        };
        if header.length as usize > limit {
            self.kill(Error::Protocol(format!(
                "{reply} reply to {name} of {} bytes exceeds the {limit} bytes a legal one can have",
                header.length
            )));
            return true;
        }
        self.rx = Rx::OptReplyData(header);
        true
    }

    pub(crate) fn rx_opt_reply_data(&mut self, header: OptionReplyHeader) -> bool {
        // The limit checked with the header keeps this within the stage.
        let Some(data) = self.take_vec(header.length as usize) else {
            return false;
        };
        self.rx = Rx::OptReplyHeader;
        let Some(pending) = self.pending_opt else {
            // Unreachable: the header was accepted only with an option pending,
            // and nothing clears it between header and payload.
            self.kill(Error::Protocol(
                "option reply with no option pending".into(),
            ));
            return true;
        };
        if let Err(e) = self.on_opt_reply(pending, header.reply_type, &data) {
            self.kill(e);
        }
        true
    }

    /// Handles one option reply; an error return kills the connection.
    fn on_opt_reply(&mut self, pending: PendingOpt, reply: u32, data: &[u8]) -> Result<()> {
        if reply & REP_FLAG_ERROR != 0 {
            let message = ServerText(decode_string("option error message", data)?);
            let error = Error::OptionRefused {
                option: pending.option(),
                reply,
                message,
            };
            return self.on_opt_error(pending, error);
        }
        match (pending, reply) {
            (PendingOpt::ExtendedHeaders { auto }, REP_ACK) => {
                // Extended headers carry structured replies with them.
                self.extended = true;
                self.structured = true;
                self.pending_opt = None;
                if auto {
                    self.after_extended_headers();
                } else {
                    self.option_done(OPT_EXTENDED_HEADERS, Ok(()));
                }
            }
            (PendingOpt::ListMeta | PendingOpt::SetMeta { .. }, REP_META_CONTEXT) => {
                if self.meta_pending.len() >= MAX_OPTION_REPLIES {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_OPTION_REPLIES} meta contexts"
                    )));
                }
                let ctx = MetaContextReply::decode(data)?;
                self.meta_pending.push((ctx.id, ctx.name));
            }
            (PendingOpt::ListMeta, REP_ACK) => {
                self.pending_opt = None;
                for (id, name) in std::mem::take(&mut self.meta_pending) {
                    self.events.push_back(Event::MetaContext { id, name });
                }
                self.option_done(OPT_LIST_META_CONTEXT, Ok(()));
            }
            (PendingOpt::SetMeta { then }, REP_ACK) => {
                self.pending_opt = None;
                self.meta = std::mem::take(&mut self.meta_pending);
                match then {
                    Some(step) => self.send_info(step.go, step.auto),
                    None => {
                        for (id, name) in self.meta.clone() {
                            self.events.push_back(Event::MetaContext { id, name });
                        }
                        self.option_done(OPT_SET_META_CONTEXT, Ok(()));
                    }
                }
            }
            (PendingOpt::StructuredReply { auto }, REP_ACK) => {
                self.structured = true;
                self.pending_opt = None;
                if auto {
                    self.after_auto_options();
                } else {
                    self.option_done(OPT_STRUCTURED_REPLY, Ok(()));
                }
            }
            (PendingOpt::List, REP_SERVER) => {
                self.listed += 1;
                if self.listed > MAX_OPTION_REPLIES {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_OPTION_REPLIES} exports listed"
                    )));
                }
                let entry = ServerEntry::decode(data)?;
                self.events.push_back(Event::Export {
                    name: entry.name,
                    description: entry.description,
                });
            }
            (PendingOpt::List, REP_ACK) => {
                self.pending_opt = None;
                self.option_done(OPT_LIST, Ok(()));
            }
            (PendingOpt::Info { .. }, REP_INFO) => self.apply_info(Info::decode(data)?),
            (PendingOpt::Info { go, .. }, REP_ACK) => {
                if self.info.size.is_none() || self.info.flags.is_none() {
                    return Err(Error::Protocol(format!(
                        "{} succeeded without NBD_INFO_EXPORT",
                        option_name(pending.option())
                    )));
                }
                self.pending_opt = None;
                if go {
                    self.enter_ready();
                } else {
                    self.option_done(OPT_INFO, Ok(()));
                }
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "unexpected {} reply to {}",
                    reply_type_name(reply),
                    option_name(pending.option())
                )))
            }
        }
        Ok(())
    }

    fn on_opt_error(&mut self, pending: PendingOpt, error: Error) -> Result<()> {
        let Error::OptionRefused { reply, .. } = error else {
            // Only ever called with the refusal built by `on_opt_reply`.
            return Err(error);
        };
        self.pending_opt = None;
        if reply == REP_ERR_SHUTDOWN {
            // The server is going away: say goodbye properly, then report why.
            if !pending.is_auto() {
                self.events.push_back(Event::OptionDone {
                    option: pending.caller_option(),
                    result: Err(error.clone()),
                });
            }
            self.send_option(OPT_ABORT, &[], PendingOpt::Abort { auto: true });
            self.shutdown_error = Some(error);
            return Ok(());
        }
        // A list or selection that ends in an error keeps nothing of it.
        self.meta_pending.clear();
        match pending {
            PendingOpt::ExtendedHeaders { auto: true } => {
                self.extended = false;
                self.after_extended_headers();
                Ok(())
            }
            PendingOpt::SetMeta { then: Some(step) } => {
                // Without contexts the export is still usable: go on.
                self.meta.clear();
                self.send_info(step.go, step.auto);
                Ok(())
            }
            PendingOpt::SetMeta { then: None } => {
                self.meta.clear();
                self.option_done(OPT_SET_META_CONTEXT, Err(error));
                Ok(())
            }
            PendingOpt::StructuredReply { auto: true } => {
                self.structured = false;
                self.after_auto_options();
                Ok(())
            }
            PendingOpt::Info {
                go: true,
                auto: true,
            } if reply == REP_ERR_UNSUP => {
                // An old server: select the export the old way.
                self.send_export_name();
                Ok(())
            }
            PendingOpt::Info { auto: true, .. } => Err(error),
            PendingOpt::Info { .. } => {
                self.info = ExportInfo::default();
                self.option_done(pending.option(), Err(error));
                Ok(())
            }
            _ => {
                self.option_done(pending.option(), Err(error));
                Ok(())
            }
        }
    }

    fn option_done(&mut self, option: u32, result: Result<()>) {
        self.events.push_back(Event::OptionDone { option, result });
        self.state = State::Negotiating;
        self.rx = Rx::OptReplyHeader;
    }

    fn apply_info(&mut self, info: Info) {
        match info {
            Info::Export { size, flags } => {
                self.info.size = Some(size);
                self.info.flags = Some(TransmissionFlags::from_bits_retain(flags));
            }
            Info::Name(name) => self.info.canonical_name = Some(name),
            Info::Description(text) => self.info.description = Some(text),
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                // Invalid constraints are ignored, as the protocol allows.
                if let Some(sizes) = BlockSizes::validated(minimum, preferred, maximum) {
                    self.info.block_sizes = Some(sizes);
                }
            }
            Info::Unknown(_) => {}
        }
    }

    // ------------------------------------------------------------ EXPORT_NAME

    pub(crate) fn rx_export_name_reply(&mut self) -> bool {
        let Some(bytes) = self.take::<{ ExportNameReply::LEN }>() else {
            return false;
        };
        let reply = match ExportNameReply::decode(&bytes) {
            Ok(reply) => reply,
            // Unreachable: `take` gave exactly the length the decoder needs.
            Err(e) => {
                self.kill(e.into());
                return true;
            }
        };
        self.info.size = Some(reply.size);
        self.info.flags = Some(TransmissionFlags::from_bits_retain(reply.flags));
        self.pending_opt = None;
        if self.no_zeroes {
            self.enter_ready();
        } else {
            self.rx = Rx::Discard {
                left: ZERO_PAD_LEN as u64,
                then: AfterDiscard::Ready,
            };
        }
        true
    }

    pub(crate) fn enter_ready(&mut self) {
        self.state = State::Ready;
        self.rx = Rx::ReplyHeader;
        self.events.push_back(Event::Ready);
    }
}
