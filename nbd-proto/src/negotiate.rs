//! The handshake: greeting, client flags, option haggling, and the opt-mode calls.
//!
//! One option is in flight at a time. The automatic path asks for extended
//! headers (falling back to structured replies), selects the requested meta
//! contexts, then sends `NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME` when
//! the server does not know GO. Opt mode stops after extended headers and
//! structured replies and lets the caller issue options one by one; its
//! `opt_go` and `opt_info` still select the requested contexts first, as libnbd's do.
//!
//! All of it is [`Negotiation`], owned by the connection only while the
//! handshake lasts: once transmission starts it is dropped, and nothing of the
//! option haggling can be touched any more. What outlives it (export info,
//! structured replies, extended headers, meta contexts, handshake style and
//! flags) is written to the shared [`Core`].

use std::collections::VecDeque;

use crate::core::{Core, Step};
use crate::error::{Error, Result, ServerText};
use crate::event::Event;
use crate::flags::{HandshakeFlags, TransmissionFlags};
use crate::info::{BlockSizes, ExportInfo, HandshakeStyle};
use crate::opt::{NbdOption, OptionReplyError};
use crate::stage::MAX_BUFFERED_PAYLOAD;
use crate::tls::TlsMode;
use crate::trace;
use crate::wire::consts::*;
use crate::wire::{
    decode_string, ExportNameReply, GreetingStart, Info, InfoRequest, MetaContextReply,
    MetaContextRequest, OldstyleRest, OptionReplyHeader, OptionRequest, ServerEntry,
};

/// The option waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingOpt {
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
    /// `auto`: the automatic switch that `Config::tls` asks for.
    StartTls {
        auto: bool,
    },
}

/// An `NBD_OPT_INFO` or `NBD_OPT_GO` waiting for its meta context selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InfoStep {
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
const MAX_OPTION_REPLIES: usize = 65_536;

impl PendingOpt {
    fn option(self) -> NbdOption {
        match self {
            PendingOpt::ExtendedHeaders { .. } => NbdOption::ExtendedHeaders,
            PendingOpt::StructuredReply { .. } => NbdOption::StructuredReply,
            PendingOpt::List => NbdOption::List,
            PendingOpt::ListMeta => NbdOption::ListMetaContext,
            PendingOpt::SetMeta { .. } => NbdOption::SetMetaContext,
            PendingOpt::Info { go: true, .. } => NbdOption::Go,
            PendingOpt::Info { go: false, .. } => NbdOption::Info,
            PendingOpt::ExportName => NbdOption::ExportName,
            PendingOpt::Abort { .. } => NbdOption::Abort,
            PendingOpt::StartTls { .. } => NbdOption::StartTls,
        }
    }
    fn is_abort(self) -> bool {
        matches!(self, PendingOpt::Abort { .. })
    }
    fn is_export_name(self) -> bool {
        self == PendingOpt::ExportName
    }
    /// The option the caller asked for: an `opt_go` / `opt_info` that is still
    /// selecting its meta contexts is reported as GO / INFO.
    fn caller_option(self) -> NbdOption {
        match self {
            PendingOpt::SetMeta { then: Some(step) } if step.go => NbdOption::Go,
            PendingOpt::SetMeta { then: Some(_) } => NbdOption::Info,
            other => other.option(),
        }
    }

    fn is_auto(self) -> bool {
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
                | PendingOpt::StartTls { auto: true }
        )
    }
}

/// What the handshake parser expects next from the server.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Greeting,
    OldstyleRest,
    HandshakeFlags,
    OptReplyHeader,
    OptReplyData(OptionReplyHeader),
    ExportNameReply,
    /// The zero padding after an `NBD_OPT_EXPORT_NAME` reply; transmission
    /// starts once it is skipped.
    ZeroPadding {
        left: u64,
    },
}

/// The handshake's own state: greeting, client flags, option haggling.
#[derive(Debug)]
pub(crate) struct Negotiation {
    expect: Expect,
    /// Opt mode, waiting for the caller's next option (libnbd's "negotiating").
    caller_turn: bool,
    /// The option waiting for its reply.
    pending: Option<PendingOpt>,
    /// Contexts of the list or selection in flight, kept until it succeeds.
    meta_pending: Vec<(u32, String)>,
    /// Exports listed by the `NBD_OPT_LIST` in flight.
    listed: usize,
    /// Both sides agreed to leave out the export name reply's zero padding.
    no_zeroes: bool,
    /// Why the connection ends once the abort sent after
    /// `NBD_REP_ERR_SHUTDOWN` completes.
    shutdown_error: Option<Error>,
    /// The acknowledged `NBD_OPT_STARTTLS` waiting for the connection to
    /// switch: whether it was the automatic one.
    starting_tls: Option<bool>,
}

impl Negotiation {
    /// Waiting for the server's greeting.
    pub(crate) fn new() -> Self {
        Negotiation {
            expect: Expect::Greeting,
            caller_turn: false,
            pending: None,
            meta_pending: Vec::new(),
            listed: 0,
            no_zeroes: false,
            shutdown_error: None,
            starting_tls: None,
        }
    }

    /// Opt mode, waiting for the caller's next option.
    pub(crate) fn is_caller_turn(&self) -> bool {
        self.caller_turn
    }

    /// One parsing step over the staged bytes.
    pub(crate) fn step(&mut self, core: &mut Core) -> Step {
        match self.expect {
            Expect::Greeting => self.rx_greeting(core),
            Expect::OldstyleRest => self.rx_oldstyle_rest(core),
            Expect::HandshakeFlags => self.rx_handshake_flags(core),
            Expect::OptReplyHeader => self.rx_opt_reply_header(core),
            Expect::OptReplyData(h) => self.rx_opt_reply_data(core, h),
            Expect::ExportNameReply => self.rx_export_name_reply(core),
            Expect::ZeroPadding { left } => {
                if core.stage.is_empty() {
                    return Step::Blocked;
                }
                let n = (core.stage.len() as u64).min(left);
                core.stage.consume(n as usize);
                if n < left {
                    self.expect = Expect::ZeroPadding { left: left - n };
                    return Step::Progressed;
                }
                Step::Ready
            }
        }
    }

    // ------------------------------------------------------------ the end of the handshake

    /// Why the server closing its end now ends the connection in error, or
    /// `None` when an abort expected it.
    pub(crate) fn eof_error(&self) -> Option<Error> {
        if self.pending.is_some_and(PendingOpt::is_abort) {
            return None;
        }
        let hint = if self.pending.is_some_and(PendingOpt::is_export_name) {
            " after NBD_OPT_EXPORT_NAME (the export probably does not exist)"
        } else {
            " during the handshake"
        };
        Some(Error::NotConnected(format!(
            "server closed the connection{hint}"
        )))
    }

    /// The connection dies with `error`: a caller's option in flight fails
    /// with it. Automatic steps have no caller waiting; only `Closed` reports them.
    pub(crate) fn fail(&mut self, error: &Error, events: &mut VecDeque<Event>) {
        if let Some(pending) = self.pending.take().filter(|p| !p.is_auto()) {
            events.push_back(Event::OptionDone {
                option: pending.caller_option(),
                result: Err(error.clone()),
            });
        }
    }

    /// Whether the abort sent after an `NBD_REP_ERR_SHUTDOWN` refusal is on
    /// its way: the connection ends once it is written.
    pub(crate) fn is_aborting_after_shutdown(&self) -> bool {
        self.shutdown_error.is_some() && !self.caller_turn
    }

    /// The refusal that made the client abort, if it did: why the connection
    /// ends. The abort is then over, so no option is pending any more.
    pub(crate) fn take_shutdown_error(&mut self) -> Option<Error> {
        let error = self.shutdown_error.take()?;
        self.pending = None;
        Some(error)
    }

    // ------------------------------------------------------------ greeting

    fn rx_greeting(&mut self, core: &mut Core) -> Step {
        let Some(bytes) = core.stage.take::<{ GreetingStart::LEN }>() else {
            return Step::Blocked;
        };
        core.stats.chunks_received += 1;
        match GreetingStart::decode(&bytes) {
            Ok(GreetingStart::Oldstyle) if core.config.tls == TlsMode::Require => {
                return Step::Kill(Error::Tls(
                    "TLS is required, but the server speaks the oldstyle handshake, \
                     which cannot start TLS"
                        .into(),
                ))
            }
            Ok(GreetingStart::Oldstyle) => {
                trace::greeting("oldstyle");
                self.expect = Expect::OldstyleRest;
            }
            Ok(GreetingStart::Newstyle) => {
                trace::greeting("newstyle");
                self.expect = Expect::HandshakeFlags;
            }
            Err(e) => return Step::Kill(e.into()),
        }
        Step::Progressed
    }

    fn rx_oldstyle_rest(&mut self, core: &mut Core) -> Step {
        let Some(bytes) = core.stage.take::<{ OldstyleRest::LEN }>() else {
            return Step::Blocked;
        };
        let rest = match OldstyleRest::decode(&bytes) {
            Ok(rest) => rest,
            // Unreachable: `take` gave exactly the length the decoder needs.
            Err(e) => return Step::Kill(e.into()),
        };
        trace::export(rest.size, rest.flags as u16);
        core.style = Some(HandshakeStyle::Oldstyle);
        core.info.size = Some(rest.size);
        // The low 16 bits are the transmission flags; the high ones are unused.
        core.info.flags = Some(TransmissionFlags::from_bits_retain(rest.flags as u16));
        Step::Ready
    }

    fn rx_handshake_flags(&mut self, core: &mut Core) -> Step {
        let Some(bytes) = core.stage.take::<2>() else {
            return Step::Blocked;
        };
        let server = u16::from_be_bytes(bytes);
        let wanted = core.config.handshake_flags;
        let mut sent = 0;
        if server & FLAG_FIXED_NEWSTYLE != 0 && wanted.contains(HandshakeFlags::FIXED_NEWSTYLE) {
            sent |= FLAG_C_FIXED_NEWSTYLE;
        }
        if server & FLAG_NO_ZEROES != 0 && wanted.contains(HandshakeFlags::NO_ZEROES) {
            sent |= FLAG_C_NO_ZEROES;
        }
        if let Err(e) = check_tls_possible(core, server, sent) {
            // Not even the client flags go out.
            return Step::Kill(e);
        }
        core.output
            .push_with(|b| b.extend_from_slice(&sent.to_be_bytes()));
        trace::handshake_flags(server, sent);
        core.client_flags = Some(sent);
        self.no_zeroes = sent & FLAG_C_NO_ZEROES != 0;
        if sent & FLAG_C_FIXED_NEWSTYLE != 0 {
            core.style = Some(HandshakeStyle::FixedNewstyle);
            if core.config.tls != TlsMode::Disable && core.tls_connector.is_some() {
                // Before anything else, so nothing else is said in plaintext.
                let pending = PendingOpt::StartTls { auto: true };
                self.send_option(core, OPT_STARTTLS, &[], pending);
            } else if let Err(e) = self.start_auto_options(core) {
                return Step::Kill(e);
            }
        } else {
            // Plain newstyle knows only EXPORT_NAME, with no way to report errors.
            core.style = Some(HandshakeStyle::Newstyle);
            self.send_export_name(core);
        }
        Step::Progressed
    }

    /// The automatic options after TLS (or without it): extended headers
    /// first. An error ends the connection.
    fn start_auto_options(&mut self, core: &mut Core) -> Result<()> {
        if core.config.request_extended_headers {
            let pending = PendingOpt::ExtendedHeaders { auto: true };
            self.send_option(core, OPT_EXTENDED_HEADERS, &[], pending);
            Ok(())
        } else {
            self.after_extended_headers(core)
        }
    }

    /// The connection switched to TLS after the acknowledgement that
    /// returned [`Step::StartTls`] (the core forgot what was negotiated in
    /// plaintext): the automatic path negotiates everything again inside
    /// TLS, and a caller's `opt_starttls` is done. An error ends the connection.
    pub(crate) fn tls_started(&mut self, core: &mut Core) -> Result<()> {
        self.meta_pending.clear();
        match self.starting_tls.take() {
            Some(true) => self.start_auto_options(core),
            Some(false) => {
                self.option_done(core, NbdOption::StartTls, Ok(()));
                Ok(())
            }
            // Only called after a `Step::StartTls`, which sets it.
            None => Err(Error::Protocol(
                "TLS switch without an acknowledged NBD_OPT_STARTTLS".into(),
            )),
        }
    }

    /// Extended headers imply structured replies; otherwise ask for those.
    /// An error ends the connection.
    fn after_extended_headers(&mut self, core: &mut Core) -> Result<()> {
        if !core.structured && core.config.request_structured_replies {
            self.send_option(
                core,
                OPT_STRUCTURED_REPLY,
                &[],
                PendingOpt::StructuredReply { auto: true },
            );
            Ok(())
        } else {
            self.after_auto_options(core)
        }
    }

    /// After the options the client always sends: hand over (opt mode) or GO.
    /// An error ends the connection.
    fn after_auto_options(&mut self, core: &mut Core) -> Result<()> {
        if core.config.opt_mode {
            self.wait_for_caller(core);
            Ok(())
        } else {
            self.start_info(core, true, true)
        }
    }

    /// INFO or GO, preceded by the meta context selection when one is wanted.
    /// An error means nothing was sent: the selection cannot be encoded.
    fn start_info(&mut self, core: &mut Core, go: bool, auto: bool) -> Result<()> {
        if core.config.request_meta_context
            && core.structured
            && !core.config.meta_contexts.is_empty()
        {
            let queries = core.config.meta_contexts.clone();
            self.send_meta(
                core,
                OPT_SET_META_CONTEXT,
                &queries,
                PendingOpt::SetMeta {
                    then: Some(InfoStep { go, auto }),
                },
            )
        } else {
            self.send_info(core, go, auto);
            Ok(())
        }
    }

    /// Sends a meta context option, or refuses (sending nothing) when the
    /// queries do not fit the protocol's limits.
    fn send_meta(
        &mut self,
        core: &mut Core,
        option: u32,
        queries: &[String],
        pending: PendingOpt,
    ) -> Result<()> {
        crate::config::check_meta_queries(&core.config.export_name, queries)?;
        let mut data = Vec::new();
        MetaContextRequest::encode(&core.config.export_name, queries, &mut data);
        self.meta_pending.clear();
        self.send_option(core, option, &data, pending);
        Ok(())
    }

    fn wait_for_caller(&mut self, core: &mut Core) {
        self.caller_turn = true;
        self.expect = Expect::OptReplyHeader;
        core.events.push_back(Event::Negotiating);
    }

    // ------------------------------------------------------------ sending options

    fn send_option(&mut self, core: &mut Core, option: u32, data: &[u8], pending: PendingOpt) {
        self.listed = 0;
        trace::option_sent(option, data.len());
        core.stats.chunks_sent += 1;
        core.output
            .push_with(|b| OptionRequest::encode_with(option, data, b));
        self.pending = Some(pending);
        self.caller_turn = false;
        self.expect = Expect::OptReplyHeader;
    }

    fn send_info(&mut self, core: &mut Core, go: bool, auto: bool) {
        let mut requests = Vec::with_capacity(3);
        if core.config.request_block_size {
            requests.push(INFO_BLOCK_SIZE);
        }
        if core.config.full_info {
            requests.extend([INFO_NAME, INFO_DESCRIPTION]);
        }
        let mut data = Vec::new();
        InfoRequest::encode(&core.config.export_name, &requests, &mut data);
        core.info = ExportInfo::default();
        let option = if go { OPT_GO } else { OPT_INFO };
        self.send_option(core, option, &data, PendingOpt::Info { go, auto });
    }

    fn send_export_name(&mut self, core: &mut Core) {
        let name = core.config.export_name.as_bytes();
        trace::option_sent(OPT_EXPORT_NAME, name.len());
        core.stats.chunks_sent += 1;
        core.output
            .push_with(|b| OptionRequest::encode_with(OPT_EXPORT_NAME, name, b));
        self.pending = Some(PendingOpt::ExportName);
        self.caller_turn = false;
        self.expect = Expect::ExportNameReply;
    }

    // ------------------------------------------------------------ the caller's options

    /// Checks that the caller may start an option now (the connection checked
    /// that it is alive and not in transmission).
    pub(crate) fn check_caller_turn(&self) -> Result<()> {
        if self.caller_turn {
            Ok(())
        } else if self.pending.is_some() {
            Err(Error::InvalidState("another option is in flight".into()))
        } else {
            Err(Error::InvalidState(
                "not negotiating: options can be issued only in opt mode once the greeting arrived"
                    .into(),
            ))
        }
    }

    /// `NBD_OPT_LIST`.
    pub(crate) fn opt_list(&mut self, core: &mut Core) {
        self.send_option(core, OPT_LIST, &[], PendingOpt::List);
    }

    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`, with the meta context
    /// selection first when one is wanted.
    pub(crate) fn opt_info(&mut self, core: &mut Core, go: bool) -> Result<()> {
        self.start_info(core, go, false)
    }

    /// `NBD_OPT_EXTENDED_HEADERS`.
    pub(crate) fn opt_extended_headers(&mut self, core: &mut Core) {
        self.send_option(
            core,
            OPT_EXTENDED_HEADERS,
            &[],
            PendingOpt::ExtendedHeaders { auto: false },
        );
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub(crate) fn opt_structured_reply(&mut self, core: &mut Core) {
        self.send_option(
            core,
            OPT_STRUCTURED_REPLY,
            &[],
            PendingOpt::StructuredReply { auto: false },
        );
    }

    /// `NBD_OPT_STARTTLS`, refused without sending anything when TLS is on
    /// already (asking twice is a client error in the protocol) or when
    /// there is no connector to make a session.
    pub(crate) fn opt_starttls(&mut self, core: &mut Core) -> Result<()> {
        if core.tls_on {
            return Err(Error::InvalidState("TLS is already negotiated".into()));
        }
        if core.tls_connector.is_none() {
            return Err(Error::NotSupported(
                "no TLS connector: see Connection::set_tls_connector".into(),
            ));
        }
        self.send_option(
            core,
            OPT_STARTTLS,
            &[],
            PendingOpt::StartTls { auto: false },
        );
        Ok(())
    }

    /// `NBD_OPT_ABORT`.
    pub(crate) fn opt_abort(&mut self, core: &mut Core) {
        self.send_option(core, OPT_ABORT, &[], PendingOpt::Abort { auto: false });
    }

    /// `NBD_OPT_LIST_META_CONTEXT` (`select == false`) or
    /// `NBD_OPT_SET_META_CONTEXT` for `queries`.
    pub(crate) fn opt_meta_context(
        &mut self,
        core: &mut Core,
        queries: &[String],
        select: bool,
    ) -> Result<()> {
        if !core.structured {
            return Err(Error::InvalidState(
                "meta contexts need structured replies to be negotiated first".into(),
            ));
        }
        // The same limits as Config::validate and add_meta_context.
        crate::config::check_meta_queries(&core.config.export_name, queries)?;
        if select {
            let pending = PendingOpt::SetMeta { then: None };
            self.send_meta(core, OPT_SET_META_CONTEXT, queries, pending)
        } else {
            self.send_meta(core, OPT_LIST_META_CONTEXT, queries, PendingOpt::ListMeta)
        }
    }

    // ------------------------------------------------------------ option replies

    fn rx_opt_reply_header(&mut self, core: &mut Core) -> Step {
        let Some(bytes) = core.stage.take::<{ OptionReplyHeader::LEN }>() else {
            return Step::Blocked;
        };
        let header = match OptionReplyHeader::decode(&bytes) {
            Ok(h) => h,
            Err(e) => return Step::Kill(e.into()),
        };
        trace::option_reply(&header);
        core.stats.chunks_received += 1;
        let Some(pending) = self.pending else {
            return Step::Kill(Error::Protocol(format!(
                "option reply for {} when no option was sent",
                option_name(header.option)
            )));
        };
        if header.option != pending.option().code() {
            return Step::Kill(Error::Protocol(format!(
                "reply for {} while waiting for {}",
                option_name(header.option),
                pending.option().name()
            )));
        }
        if pending.is_abort() {
            // Whatever the server says, the abort is done; its payload is not
            // waited for.
            return Step::Close;
        }
        // The length rule of the handshake: judged before any payload byte is
        // read, so a server cannot make the client wait for bytes no legal
        // reply has.
        let name = option_name(header.option);
        let reply = reply_type_name(header.reply_type);
        let Some(limit) = option_reply_limit(pending, header.reply_type) else {
            return Step::Kill(Error::Protocol(format!(
                "unexpected {reply} reply to {name}"
            )));
        };
        if header.length as usize > limit {
            return Step::Kill(Error::Protocol(format!(
                "{reply} reply to {name} of {} bytes exceeds the {limit} bytes a legal one can have",
                header.length
            )));
        }
        self.expect = Expect::OptReplyData(header);
        Step::Progressed
    }

    fn rx_opt_reply_data(&mut self, core: &mut Core, header: OptionReplyHeader) -> Step {
        // The limit checked with the header keeps this within the stage.
        let Some(data) = core.stage.take_vec(header.length as usize) else {
            return Step::Blocked;
        };
        self.expect = Expect::OptReplyHeader;
        let Some(pending) = self.pending else {
            // Unreachable: the header was accepted only with an option pending,
            // and nothing clears it between header and payload.
            return Step::Kill(Error::Protocol(
                "option reply with no option pending".into(),
            ));
        };
        match self.on_opt_reply(core, pending, header.reply_type, &data) {
            Ok(step) => step,
            Err(e) => Step::Kill(e),
        }
    }

    /// Handles one option reply: `Ready` when transmission starts, an error
    /// when the connection ends.
    fn on_opt_reply(
        &mut self,
        core: &mut Core,
        pending: PendingOpt,
        reply: u32,
        data: &[u8],
    ) -> Result<Step> {
        if reply & REP_FLAG_ERROR != 0 {
            let message = ServerText(decode_string("option error message", data)?);
            let error = Error::OptionRefused {
                option: pending.option(),
                reply: OptionReplyError::from_code(reply),
                message,
            };
            self.on_opt_error(core, pending, error)?;
            return Ok(Step::Progressed);
        }
        match (pending, reply) {
            (PendingOpt::ExtendedHeaders { auto }, REP_ACK) => {
                // Extended headers carry structured replies with them.
                core.extended = true;
                core.structured = true;
                self.pending = None;
                if auto {
                    self.after_extended_headers(core)?;
                } else {
                    self.option_done(core, NbdOption::ExtendedHeaders, Ok(()));
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
                self.pending = None;
                for (id, name) in std::mem::take(&mut self.meta_pending) {
                    core.events.push_back(Event::MetaContext { id, name });
                }
                self.option_done(core, NbdOption::ListMetaContext, Ok(()));
            }
            (PendingOpt::SetMeta { then }, REP_ACK) => {
                self.pending = None;
                core.meta = std::mem::take(&mut self.meta_pending);
                match then {
                    Some(step) => self.send_info(core, step.go, step.auto),
                    None => {
                        for (id, name) in core.meta.clone() {
                            core.events.push_back(Event::MetaContext { id, name });
                        }
                        self.option_done(core, NbdOption::SetMetaContext, Ok(()));
                    }
                }
            }
            (PendingOpt::StructuredReply { auto }, REP_ACK) => {
                core.structured = true;
                self.pending = None;
                if auto {
                    self.after_auto_options(core)?;
                } else {
                    self.option_done(core, NbdOption::StructuredReply, Ok(()));
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
                core.events.push_back(Event::Export {
                    name: entry.name,
                    description: entry.description,
                });
            }
            (PendingOpt::List, REP_ACK) => {
                self.pending = None;
                self.option_done(core, NbdOption::List, Ok(()));
            }
            (PendingOpt::StartTls { auto }, REP_ACK) => {
                // The connection switches before parsing another byte.
                self.pending = None;
                self.starting_tls = Some(auto);
                return Ok(Step::StartTls);
            }
            (PendingOpt::Info { .. }, REP_INFO) => apply_info(&mut core.info, Info::decode(data)?),
            (PendingOpt::Info { go, .. }, REP_ACK) => {
                if core.info.size.is_none() || core.info.flags.is_none() {
                    return Err(Error::Protocol(format!(
                        "{} succeeded without NBD_INFO_EXPORT",
                        pending.option().name()
                    )));
                }
                self.pending = None;
                if go {
                    return Ok(Step::Ready);
                }
                self.option_done(core, NbdOption::Info, Ok(()));
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "unexpected {} reply to {}",
                    reply_type_name(reply),
                    pending.option().name()
                )))
            }
        }
        Ok(Step::Progressed)
    }

    /// Handles a refusal; an error return ends the connection.
    fn on_opt_error(&mut self, core: &mut Core, pending: PendingOpt, error: Error) -> Result<()> {
        let Error::OptionRefused { reply, .. } = error else {
            // Only ever called with the refusal built by `on_opt_reply`.
            return Err(error);
        };
        self.pending = None;
        if matches!(pending, PendingOpt::StartTls { .. }) && core.config.tls == TlsMode::Require {
            // No other option, not even an abort, goes out in plaintext.
            return Err(Error::Tls(format!(
                "TLS is required, but the server refused it ({error})"
            )));
        }
        if reply == OptionReplyError::Shutdown {
            // The server is going away: say goodbye properly, then report why.
            if !pending.is_auto() {
                core.events.push_back(Event::OptionDone {
                    option: pending.caller_option(),
                    result: Err(error.clone()),
                });
            }
            self.send_option(core, OPT_ABORT, &[], PendingOpt::Abort { auto: true });
            self.shutdown_error = Some(error);
            return Ok(());
        }
        // A list or selection that ends in an error keeps nothing of it.
        self.meta_pending.clear();
        match pending {
            PendingOpt::ExtendedHeaders { auto: true } => {
                core.extended = false;
                self.after_extended_headers(core)
            }
            PendingOpt::SetMeta { then: Some(step) } => {
                // Without contexts the export is still usable: go on.
                core.meta.clear();
                self.send_info(core, step.go, step.auto);
                Ok(())
            }
            PendingOpt::SetMeta { then: None } => {
                core.meta.clear();
                self.option_done(core, NbdOption::SetMetaContext, Err(error));
                Ok(())
            }
            PendingOpt::StructuredReply { auto: true } => {
                core.structured = false;
                self.after_auto_options(core)
            }
            // TLS was only allowed: go on in plaintext.
            PendingOpt::StartTls { auto: true } => self.start_auto_options(core),
            PendingOpt::Info {
                go: true,
                auto: true,
            } if reply == OptionReplyError::Unsup => {
                // An old server: select the export the old way.
                self.send_export_name(core);
                Ok(())
            }
            PendingOpt::Info { auto: true, .. } => Err(error),
            PendingOpt::Info { .. } => {
                core.info = ExportInfo::default();
                self.option_done(core, pending.option(), Err(error));
                Ok(())
            }
            _ => {
                self.option_done(core, pending.option(), Err(error));
                Ok(())
            }
        }
    }

    fn option_done(&mut self, core: &mut Core, option: NbdOption, result: Result<()>) {
        core.events.push_back(Event::OptionDone { option, result });
        self.caller_turn = true;
        self.expect = Expect::OptReplyHeader;
    }

    // ------------------------------------------------------------ EXPORT_NAME

    fn rx_export_name_reply(&mut self, core: &mut Core) -> Step {
        let Some(bytes) = core.stage.take::<{ ExportNameReply::LEN }>() else {
            return Step::Blocked;
        };
        let reply = match ExportNameReply::decode(&bytes) {
            Ok(reply) => reply,
            // Unreachable: `take` gave exactly the length the decoder needs.
            Err(e) => return Step::Kill(e.into()),
        };
        // No magic starts this answer: as libnbd, it is not a chunk of its own.
        trace::export(reply.size, reply.flags);
        core.info.size = Some(reply.size);
        core.info.flags = Some(TransmissionFlags::from_bits_retain(reply.flags));
        self.pending = None;
        if self.no_zeroes {
            return Step::Ready;
        }
        self.expect = Expect::ZeroPadding {
            left: ZERO_PAD_LEN as u64,
        };
        Step::Progressed
    }
}

/// With TLS required, checks that the handshake can start it before the client
/// flags go out: a fixed newstyle server, the fixed flag offered by the
/// client too, and a connector to make the session.
fn check_tls_possible(core: &Core, server_flags: u16, sent: u32) -> Result<()> {
    if core.config.tls != TlsMode::Require {
        return Ok(());
    }
    let why = if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        "the server does not speak fixed newstyle, so it cannot start TLS"
    } else if sent & FLAG_C_FIXED_NEWSTYLE == 0 {
        "the handshake flags leave out fixed newstyle, without which TLS cannot start"
    } else if core.tls_connector.is_none() {
        "no TLS connector was given to make a session (Connection::set_tls_connector)"
    } else {
        return Ok(());
    };
    Err(Error::Tls(format!("TLS is required, but {why}")))
}

/// Records one `NBD_REP_INFO` in what is known about the export.
fn apply_info(export: &mut ExportInfo, info: Info) {
    match info {
        Info::Export { size, flags } => {
            export.size = Some(size);
            export.flags = Some(TransmissionFlags::from_bits_retain(flags));
        }
        Info::Name(name) => export.canonical_name = Some(name),
        Info::Description(text) => export.description = Some(text),
        Info::BlockSize {
            minimum,
            preferred,
            maximum,
        } => {
            // Invalid constraints are ignored, as the protocol allows.
            if let Some(sizes) = BlockSizes::validated(minimum, preferred, maximum) {
                export.block_sizes = Some(sizes);
            }
        }
        Info::Unknown(_) => {}
    }
}
