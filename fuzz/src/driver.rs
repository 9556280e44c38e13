//! Two connections driven in lockstep through the two input paths, with every
//! invariant the fuzz targets check.
//!
//! Connection A gets server bytes through [`Connection::handle_input`], one
//! chunk at a time. Connection B gets the same chunks through
//! [`Connection::recv_buf`] / [`Connection::notify_read`], each cut again into
//! pseudo-random smaller reads. Every call the harness makes goes to both, and
//! after every step the two must agree on everything observable: events,
//! client output, phase, queries. The events of A are also checked against
//! the connection's contract (see [`Driver`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nbd_proto::wire::consts::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, OPT_ABORT,
    OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REQUEST_LEN,
};
use nbd_proto::wire::{OptionRequest, RequestHeader};
use nbd_proto::{
    BlockStatus, CmdFlags, Completion, Config, Connection, Cookie, Error, Event, NbdOption, Phase,
    ReadChunk, Strict, TlsMode, MAX_REQUEST_SIZE,
};

use crate::rng::Splitter;

/// Byte a read buffer is filled with before it is handed to the connection, so
/// that a read reported `Ok` without being fully written shows.
pub const READ_POISON: u8 = 0xa5;
/// Largest read or write buffer the harness allocates and fills; longer
/// requests (up to [`MAX_REQUEST_SIZE`]) are clamped to this.
pub const MAX_BUFFER: u64 = 256 << 10;
/// Reads into B cut at the input's chosen sizes; after that they are at least
/// 4 KiB, so that a large payload read byte by byte does not make one run
/// take seconds.
pub const B_STEP_BUDGET: usize = 16 * 1024;
/// Client output allowed beyond the write payloads the harness submitted.
pub const OUTPUT_SLACK: usize = 1 << 20;
/// The context `block_status_filter` asks about.
pub const FILTER_CONTEXT: &str = "base:allocation";

/// What one scripted call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `pread`.
    Read,
    /// `pread_structured`.
    ReadStructured,
    /// `pwrite`.
    Write,
    /// `flush`.
    Flush,
    /// `trim`.
    Trim,
    /// `cache`.
    Cache,
    /// `zero`.
    Zero,
    /// `block_status`.
    BlockStatus,
    /// `block_status_filter` for [`FILTER_CONTEXT`].
    BlockStatusFilter,
    /// `disconnect`.
    Disconnect,
    /// `opt_list`.
    OptList,
    /// `opt_info`.
    OptInfo,
    /// `opt_go`.
    OptGo,
    /// `opt_structured_reply`.
    OptStructuredReply,
    /// `opt_abort`.
    OptAbort,
    /// `opt_extended_headers`.
    OptExtendedHeaders,
    /// `opt_list_meta_context`.
    OptListMetaContext,
    /// `opt_set_meta_context`.
    OptSetMetaContext,
    /// `set_strict_mode`, with the op's `flags` as the strict bits.
    SetStrict,
}

impl OpKind {
    /// Every kind, in the order byte selectors use.
    pub const ALL: [OpKind; 19] = [
        OpKind::Read,
        OpKind::ReadStructured,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Trim,
        OpKind::Cache,
        OpKind::Zero,
        OpKind::BlockStatus,
        OpKind::BlockStatusFilter,
        OpKind::Disconnect,
        OpKind::OptList,
        OpKind::OptInfo,
        OpKind::OptGo,
        OpKind::OptStructuredReply,
        OpKind::OptAbort,
        OpKind::OptExtendedHeaders,
        OpKind::OptListMetaContext,
        OpKind::OptSetMetaContext,
        OpKind::SetStrict,
    ];

    /// A transmission command (one that gets a cookie), as opposed to an option
    /// call, `disconnect` or a setting.
    pub fn is_command(self) -> bool {
        matches!(
            self,
            OpKind::Read
                | OpKind::ReadStructured
                | OpKind::Write
                | OpKind::Flush
                | OpKind::Trim
                | OpKind::Cache
                | OpKind::Zero
                | OpKind::BlockStatus
                | OpKind::BlockStatusFilter
        )
    }

    /// An opt-mode call.
    pub fn is_option(self) -> bool {
        matches!(
            self,
            OpKind::OptList
                | OpKind::OptInfo
                | OpKind::OptGo
                | OpKind::OptStructuredReply
                | OpKind::OptAbort
                | OpKind::OptExtendedHeaders
                | OpKind::OptListMetaContext
                | OpKind::OptSetMetaContext
        )
    }

    /// A read of either kind.
    pub fn is_read(self) -> bool {
        matches!(self, OpKind::Read | OpKind::ReadStructured)
    }

    fn wire_command(self) -> Option<u16> {
        Some(match self {
            OpKind::Read | OpKind::ReadStructured => CMD_READ,
            OpKind::Write => CMD_WRITE,
            OpKind::Flush => CMD_FLUSH,
            OpKind::Trim => CMD_TRIM,
            OpKind::Cache => CMD_CACHE,
            OpKind::Zero => CMD_WRITE_ZEROES,
            OpKind::BlockStatus | OpKind::BlockStatusFilter => CMD_BLOCK_STATUS,
            _ => return None,
        })
    }

    fn wire_option(self) -> Option<u32> {
        Some(match self {
            OpKind::OptList => OPT_LIST,
            OpKind::OptInfo => OPT_INFO,
            OpKind::OptGo => OPT_GO,
            OpKind::OptStructuredReply => OPT_STRUCTURED_REPLY,
            OpKind::OptAbort => OPT_ABORT,
            OpKind::OptExtendedHeaders => OPT_EXTENDED_HEADERS,
            OpKind::OptListMetaContext => OPT_LIST_META_CONTEXT,
            OpKind::OptSetMetaContext => OPT_SET_META_CONTEXT,
            _ => return None,
        })
    }
}

/// One call the harness makes on both connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Which call.
    pub kind: OpKind,
    /// Export offset (commands).
    pub offset: u64,
    /// Length as asked; see [`Op::effective_length`].
    pub length: u64,
    /// Command flags, or the strict bits for [`OpKind::SetStrict`].
    pub flags: u16,
    /// Seed of a write's payload bytes.
    pub fill: u8,
}

impl Op {
    /// The length actually submitted: 0 for calls without one; reads and
    /// writes longer than [`MAX_BUFFER`] but within [`MAX_REQUEST_SIZE`] are
    /// clamped to [`MAX_BUFFER`] so that no run allocates much; longer ones
    /// become `MAX_REQUEST_SIZE + 1` (lazily zeroed, and always refused).
    pub fn effective_length(&self) -> u64 {
        if !self.kind.is_command() || self.kind == OpKind::Flush {
            return 0;
        }
        if matches!(
            self.kind,
            OpKind::Read | OpKind::ReadStructured | OpKind::Write
        ) {
            if self.length > MAX_REQUEST_SIZE {
                MAX_REQUEST_SIZE + 1
            } else {
                self.length.min(MAX_BUFFER)
            }
        } else {
            self.length
        }
    }

    /// The payload of a write op.
    pub fn write_payload(&self) -> Bytes {
        let len = self.effective_length() as usize;
        if len as u64 > MAX_BUFFER {
            return Bytes::from(vec![0u8; len]);
        }
        Bytes::from(pattern(self.fill, self.offset, len))
    }

    fn read_buffer(&self) -> BytesMut {
        let len = self.effective_length() as usize;
        if len as u64 > MAX_BUFFER {
            return BytesMut::zeroed(len);
        }
        let mut buf = BytesMut::zeroed(len);
        buf.fill(READ_POISON);
        buf
    }

    fn cmd_flags(&self) -> CmdFlags {
        CmdFlags::from_bits_retain(self.flags)
    }
}

/// Deterministic bytes for payloads: byte `i` depends on `seed` and on the
/// export offset `offset + i`, so that misplaced data shows.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset.wrapping_add(i);
            (at as u8 ^ (at >> 8) as u8 ^ (at >> 16) as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                ^ 0x5c
        })
        .collect()
}

/// Whether the phase is final.
pub fn is_terminal(phase: Phase) -> bool {
    matches!(phase, Phase::Closed | Phase::Dead)
}

/// What a run did, for tests that check the harness reaches where it should.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Server bytes fed.
    pub bytes_fed: usize,
    /// Calls made.
    pub ops: usize,
    /// Cookies handed out.
    pub cookies: usize,
    /// Commands completed with `Ok`.
    pub ok_completions: usize,
    /// Commands completed with an error.
    pub err_completions: usize,
    /// Option calls that succeeded (`OptionDone` with `Ok`, or `Ready` after `opt_go`).
    pub ok_options: usize,
    /// Exports listed.
    pub exports: usize,
    /// Read chunk events.
    pub read_chunks: usize,
    /// Block status events.
    pub block_statuses: usize,
    /// Meta context events.
    pub meta_contexts: usize,
    /// Whether transmission was reached.
    pub reached_ready: bool,
    /// The phase at the end.
    pub final_phase: Option<Phase>,
    /// Reads whose content the structured target compared with its model.
    pub verified_reads: usize,
}

/// A comparable digest of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Digest {
    Negotiating,
    Ready,
    Export(String, String),
    MetaContext(u32, String),
    BlockStatus(BlockStatus),
    OptionDone(NbdOption, Result<(), Error>),
    /// An event kind this digest does not know, by its debug text.
    Other(String),
    Chunk(ReadChunk),
    Completed {
        cookie: Cookie,
        result: Result<(), Error>,
        len: Option<usize>,
        /// Content hash, for successful reads only (a failed read's buffer is unspecified).
        hash: Option<u64>,
    },
    Closed(Option<Error>),
}

/// Whether `NBD_FUZZ_TRACE` is set: then every event is printed to stderr.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("NBD_FUZZ_TRACE").is_some())
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn digest(event: &Event) -> Digest {
    match event {
        Event::Negotiating => Digest::Negotiating,
        Event::Ready => Digest::Ready,
        Event::Export { name, description } => Digest::Export(name.clone(), description.clone()),
        Event::MetaContext { id, name } => Digest::MetaContext(*id, name.clone()),
        Event::BlockStatus(b) => Digest::BlockStatus(b.clone()),
        Event::OptionDone { option, result } => Digest::OptionDone(*option, result.clone()),
        Event::ReadChunk(c) => Digest::Chunk(c.clone()),
        Event::Completed(c) => Digest::Completed {
            cookie: c.cookie,
            result: c.result.clone(),
            len: c.buffer.as_ref().map(|b| b.len()),
            hash: match (&c.result, &c.buffer) {
                (Ok(()), Some(b)) => Some(fnv(b)),
                _ => None,
            },
        },
        Event::Closed { error } => Digest::Closed(error.clone()),
        other => Digest::Other(format!("{other:?}")),
    }
}

/// A command the caller has in flight, as the harness remembers it.
#[derive(Debug, Clone)]
struct Live {
    kind: OpKind,
    offset: u64,
    length: u64,
    /// Context ids whose block status arrived.
    statuses: Vec<u32>,
}

/// The contract of the event stream, checked on connection A.
#[derive(Debug, Default)]
struct Tracker {
    opt_mode: bool,
    live: HashMap<Cookie, Live>,
    seen: HashSet<Cookie>,
    /// `Some(error)` once `Closed` was seen.
    closed: Option<Option<Error>>,
    ready_events: usize,
    /// The caller's option in flight.
    pending_opt: Option<u32>,
    /// The caller's `disconnect` succeeded: no command may start after it.
    disconnected: bool,
    events: usize,
}

/// Drives connections A and B with the same script and checks, after every step:
///
/// - no panic (anything that panics fails the run);
/// - A and B report identical events, client output, phase and queries;
/// - every cookie returned gets exactly one `Completed`, for a command in
///   flight, with the caller's buffer handed back for reads; `ReadChunk`s
///   stay inside their request and belong to a live `pread_structured`;
///   `BlockStatus` comes at most once per context, for a live block status
///   command and a negotiated context, with non-empty extents of which only
///   the last runs past the request;
/// - `OptionDone` answers exactly the caller's option in flight (automatic
///   steps report nothing), `Export` and `MetaContext` come only during the
///   listing calls, `Ready` once, `Negotiating` only in opt mode;
/// - `Closed` comes once and nothing comes after it; the phase is final
///   exactly when `Closed` was seen, and then nothing is in flight and the
///   direction is `None`;
/// - a call in a phase that does not allow it (or on a dead or closed
///   connection) fails, and a failed call sends nothing and starts nothing;
/// - a successful call sends exactly its request;
/// - after end of stream the connection is over and every command completed;
/// - client output and the event count stay bounded by what was fed and asked.
pub struct Driver {
    a: Connection,
    b: Connection,
    b_split: Splitter,
    b_steps: usize,
    tracker: Tracker,
    payload_total: usize,
    output_total: usize,
    ok_reads: Vec<(Cookie, BytesMut)>,
    eof_sent: bool,
    report: Report,
}

impl Driver {
    /// Two fresh connections with `config`; B cuts every chunk into reads of
    /// at most `b_max` bytes, sized from `b_seed`.
    pub fn new(config: Config, b_max: usize, b_seed: u64) -> Self {
        let tracker = Tracker {
            opt_mode: config.opt_mode,
            ..Tracker::default()
        };
        let tls = config.tls != TlsMode::Disable;
        let mut a = Connection::new(config.clone());
        let mut b = Connection::new(config);
        if tls {
            // The toy session of the testkit: deterministic, so both input
            // paths see the same plaintext; a few bytes per call.
            let made = Arc::new(AtomicUsize::new(0));
            a.set_tls_connector(nbd_testkit::xor_connector(7, made.clone()));
            b.set_tls_connector(nbd_testkit::xor_connector(7, made));
        }
        let driver = Driver {
            a,
            b,
            b_split: Splitter::new(b_seed, b_max),
            b_steps: 0,
            tracker,
            payload_total: 0,
            output_total: 0,
            ok_reads: Vec::new(),
            eof_sent: false,
            report: Report::default(),
        };
        assert_eq!(driver.a.phase(), Phase::Handshake);
        driver
    }

    /// Connection A, for queries.
    pub fn conn(&self) -> &Connection {
        &self.a
    }

    /// The current phase (A and B agree, or the driver has panicked).
    pub fn phase(&self) -> Phase {
        self.a.phase()
    }

    /// Whether end of stream was delivered.
    pub fn eof_sent(&self) -> bool {
        self.eof_sent
    }

    /// Reads that completed `Ok` since the last call, with their buffers.
    pub fn take_ok_reads(&mut self) -> Vec<(Cookie, BytesMut)> {
        std::mem::take(&mut self.ok_reads)
    }

    /// Counts a read whose content a harness compared with its model.
    pub fn count_verified_read(&mut self) {
        self.report.verified_reads += 1;
    }

    /// Feeds one chunk of server bytes: whole to A, in smaller reads to B.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.report.bytes_fed += chunk.len();
        let was_dead = self.a.phase() == Phase::Dead;
        let ra = self.a.handle_input(chunk);

        let mut rest = chunk;
        while !rest.is_empty() {
            let mut n = self.b_split.next_size(rest.len());
            self.b_steps += 1;
            if self.b_steps > B_STEP_BUDGET {
                n = n.max(4096).min(rest.len());
            }
            let buf = self.b.recv_buf();
            if buf.is_empty() {
                // Over: what the server sends after is ignored.
                break;
            }
            let n = n.min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            if self.b.notify_read(n).is_err() {
                break;
            }
            rest = &rest[n..];
        }
        // handle_input reports death, and only death, whatever the split.
        assert_eq!(
            ra.is_err(),
            self.a.phase() == Phase::Dead,
            "handle_input returned {ra:?} with the connection {:?}",
            self.a.phase()
        );
        if was_dead {
            assert!(ra.is_err(), "handle_input on a dead connection succeeded");
        }
        self.sync();
    }

    /// Delivers end of stream to both connections; afterwards each must be over
    /// with every command completed.
    pub fn eof(&mut self) {
        let before = self.a.phase();
        let ra = self.a.handle_input(&[]);
        let rb = self.b.notify_read(0);
        assert_eq!(ra, rb, "EOF results differ between the input paths");
        match before {
            Phase::Dead => assert!(ra.is_err(), "EOF on a dead connection succeeded"),
            Phase::Closed => {}
            _ => assert!(ra.is_ok(), "EOF on a live connection returned {ra:?}"),
        }
        self.eof_sent = true;
        self.sync();
        assert!(
            is_terminal(self.a.phase()),
            "after EOF the connection is {:?}",
            self.a.phase()
        );
        assert!(
            self.tracker.live.is_empty(),
            "commands never completed after EOF: {:?}",
            self.tracker.live
        );
    }

    /// Makes one call on both connections, checks it, and returns its result.
    pub fn issue(&mut self, op: &Op) -> Result<Option<Cookie>, Error> {
        self.report.ops += 1;
        let phase = self.a.phase();
        let ra = call(&mut self.a, op);
        let rb = call(&mut self.b, op);
        assert_eq!(ra, rb, "{op:?} answered differently on the two input paths");
        if trace() {
            eprintln!("[{phase:?}] call {op:?} -> {ra:?}");
        }
        let length = op.effective_length();

        if is_terminal(phase) && op.kind != OpKind::SetStrict {
            assert!(ra.is_err(), "{op:?} succeeded on a {phase:?} connection");
        }
        if op.kind.is_command() {
            if phase != Phase::Ready || self.tracker.disconnected {
                assert!(
                    ra.is_err(),
                    "{op:?} succeeded in {phase:?} (disconnected: {})",
                    self.tracker.disconnected
                );
            }
            if matches!(
                op.kind,
                OpKind::Read | OpKind::ReadStructured | OpKind::Write
            ) && length > MAX_REQUEST_SIZE
            {
                assert!(ra.is_err(), "{op:?} above MAX_REQUEST_SIZE accepted");
            }
            if length > u64::from(u32::MAX) && !self.a.extended_headers_negotiated() {
                assert!(ra.is_err(), "{op:?} with a length beyond 32 bits accepted");
            }
            if op.offset.checked_add(length).is_none() {
                assert!(ra.is_err(), "{op:?} beyond 2^64 accepted");
            }
        }
        if op.kind.is_option() && phase != Phase::Negotiating {
            assert!(ra.is_err(), "{op:?} succeeded in {phase:?}");
        }
        if op.kind == OpKind::Disconnect && phase != Phase::Ready {
            assert!(ra.is_err(), "disconnect succeeded in {phase:?}");
        }

        let in_flight_before = self.tracker.live.len();
        if let Ok(Some(cookie)) = ra {
            assert!(op.kind.is_command(), "{op:?} returned a cookie");
            assert_ne!(cookie.get(), 0, "cookie 0 handed out");
            assert!(
                self.tracker.seen.insert(cookie),
                "cookie {cookie:?} handed out twice"
            );
            self.tracker.live.insert(
                cookie,
                Live {
                    kind: op.kind,
                    offset: op.offset,
                    length,
                    statuses: Vec::new(),
                },
            );
            self.report.cookies += 1;
            if op.kind == OpKind::Write {
                self.payload_total += length as usize;
            }
        }
        if ra.is_ok() && op.kind.is_option() {
            assert_eq!(
                self.tracker.pending_opt, None,
                "a second option started while one is in flight"
            );
            self.tracker.pending_opt = op.kind.wire_option();
        }
        if ra.is_ok() && op.kind == OpKind::Disconnect {
            self.tracker.disconnected = true;
        }

        let out = self.sync();
        // Past STARTTLS the requests are checked as the session encrypted them.
        let out = if self.a.tls_negotiated() {
            nbd_testkit::xor(&out)
        } else {
            out
        };

        match &ra {
            Err(_) => {
                assert!(out.is_empty(), "{op:?} failed but sent {} bytes", out.len());
                assert_eq!(self.tracker.live.len(), in_flight_before);
            }
            Ok(Some(cookie)) => check_request(
                op,
                length,
                *cookie,
                &out,
                self.a.extended_headers_negotiated(),
            ),
            Ok(None) => match op.kind {
                OpKind::Disconnect => {
                    if !out.is_empty() {
                        let h = RequestHeader::decode(&out)
                            .expect("disconnect sends one request header");
                        assert_eq!(h.command, CMD_DISC);
                    }
                }
                OpKind::SetStrict => assert!(out.is_empty(), "set_strict_mode sent bytes"),
                kind => {
                    let option = kind.wire_option().expect("only options remain");
                    assert!(
                        out.len() >= OptionRequest::LEN,
                        "{op:?} sent {} bytes",
                        out.len()
                    );
                    let h =
                        OptionRequest::decode(&out[..OptionRequest::LEN]).expect("option request");
                    // GO and INFO select the configured meta contexts first.
                    let meta_first = matches!(kind, OpKind::OptGo | OpKind::OptInfo)
                        && h.option == OPT_SET_META_CONTEXT;
                    assert!(
                        h.option == option || meta_first,
                        "{op:?} sent option {}",
                        h.option
                    );
                    assert_eq!(h.length as usize, out.len() - OptionRequest::LEN);
                }
            },
        }
        ra
    }

    /// Final checks; on a finished connection also checks that new calls fail.
    pub fn finish(mut self) -> Report {
        self.sync();
        if self.eof_sent {
            assert!(is_terminal(self.a.phase()));
            assert!(self.tracker.live.is_empty());
        }
        if is_terminal(self.a.phase()) {
            let probes = [
                OpKind::Read,
                OpKind::Flush,
                OpKind::Disconnect,
                OpKind::OptList,
                OpKind::OptGo,
            ];
            for kind in probes {
                let op = Op {
                    kind,
                    offset: 0,
                    length: 1,
                    flags: 0,
                    fill: 0,
                };
                assert!(self.issue(&op).is_err(), "{kind:?} succeeded after the end");
            }
        }
        self.report.final_phase = Some(self.a.phase());
        self.report
    }

    /// Takes both outputs, drains both event queues, and compares everything.
    /// Returns the client bytes sent during the step.
    fn sync(&mut self) -> Vec<u8> {
        let out_a = self.a.take_output();
        let out_b = self.b.take_output();
        assert!(
            out_a == out_b,
            "client output differs between the input paths"
        );
        self.output_total += out_a.len();
        assert!(
            self.output_total <= OUTPUT_SLACK + self.payload_total,
            "client output of {} bytes for {} bytes of write payload",
            self.output_total,
            self.payload_total
        );

        let mut digests_a = Vec::new();
        while let Some(event) = self.a.poll_event() {
            digests_a.push(digest(&event));
            self.observe(event);
        }
        let mut digests_b = Vec::new();
        while let Some(event) = self.b.poll_event() {
            digests_b.push(digest(&event));
        }
        assert_eq!(
            digests_a, digests_b,
            "events differ between the input paths"
        );
        if trace() {
            for d in &digests_a {
                eprintln!("[{:?}] {d:?}", self.a.phase());
            }
        }
        self.check_state();
        out_a
    }

    fn observe(&mut self, event: Event) {
        let t = &mut self.tracker;
        t.events += 1;
        assert!(t.closed.is_none(), "event after Closed: {event:?}");
        match event {
            Event::Negotiating => assert!(t.opt_mode, "Negotiating without opt mode"),
            Event::Ready => {
                t.ready_events += 1;
                assert_eq!(t.ready_events, 1, "Ready twice");
                // Oldstyle and plain newstyle servers know no options: opt mode
                // cannot apply and the connection goes straight to transmission.
                let options = self.a.protocol() == Some("newstyle-fixed");
                if t.opt_mode && options {
                    assert_eq!(
                        t.pending_opt,
                        Some(OPT_GO),
                        "Ready in opt mode without opt_go"
                    );
                    self.report.ok_options += 1;
                } else {
                    assert_eq!(t.pending_opt, None);
                }
                t.pending_opt = None;
                self.report.reached_ready = true;
            }
            Event::Export { .. } => {
                assert_eq!(t.pending_opt, Some(OPT_LIST), "Export outside opt_list");
                self.report.exports += 1;
            }
            Event::MetaContext { .. } => {
                assert!(
                    matches!(t.pending_opt, Some(OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT)),
                    "MetaContext outside opt_list_meta_context / opt_set_meta_context (pending {:?})",
                    t.pending_opt
                );
                self.report.meta_contexts += 1;
            }
            Event::BlockStatus(status) => {
                self.report.block_statuses += 1;
                let live = t
                    .live
                    .get_mut(&status.cookie)
                    .unwrap_or_else(|| panic!("{status:?} for a command not in flight"));
                assert!(
                    matches!(live.kind, OpKind::BlockStatus | OpKind::BlockStatusFilter),
                    "{status:?} for a {:?}",
                    live.kind
                );
                assert!(
                    self.a
                        .meta_contexts()
                        .iter()
                        .any(|(id, name)| *id == status.context_id && *name == status.context),
                    "{status:?} for a context not negotiated: {:?}",
                    self.a.meta_contexts()
                );
                assert!(
                    !live.statuses.contains(&status.context_id),
                    "second {status:?}"
                );
                live.statuses.push(status.context_id);
                let (last, before) = status.extents.split_last().expect("at least one extent");
                assert!(last.length > 0, "empty extent in {status:?}");
                let mut covered = 0u64;
                for e in before {
                    assert!(e.length > 0, "empty extent in {status:?}");
                    covered = covered.saturating_add(e.length);
                }
                // Only the last extent may run past the request (or lie wholly past it).
                assert!(
                    covered <= live.length,
                    "extents past the request in {status:?}"
                );
            }
            Event::OptionDone { option, result } => {
                if result.is_ok() {
                    assert!(
                        matches!(
                            option,
                            NbdOption::List
                                | NbdOption::Info
                                | NbdOption::StructuredReply
                                | NbdOption::ExtendedHeaders
                                | NbdOption::ListMetaContext
                                | NbdOption::SetMetaContext
                        ),
                        "OptionDone Ok for option {option}"
                    );
                    self.report.ok_options += 1;
                }
                // Automatic steps (and the abort after NBD_REP_ERR_SHUTDOWN)
                // report nothing; GO and INFO report as themselves even while
                // selecting meta contexts.
                assert_eq!(
                    t.pending_opt,
                    Some(option.code()),
                    "OptionDone for option {option} ({result:?}), which is not the caller's option in flight"
                );
                t.pending_opt = None;
            }
            Event::ReadChunk(chunk) => {
                self.report.read_chunks += 1;
                let cookie = chunk.cookie();
                let live = t
                    .live
                    .get(&cookie)
                    .unwrap_or_else(|| panic!("{chunk:?} for a command not in flight"));
                assert_eq!(
                    live.kind,
                    OpKind::ReadStructured,
                    "{chunk:?} for a {:?}",
                    live.kind
                );
                let end = live.offset.saturating_add(live.length);
                match chunk {
                    ReadChunk::Data { offset, length, .. }
                    | ReadChunk::Hole { offset, length, .. } => {
                        // A simple reply to a zero-length read reports its (empty) data.
                        let empty_read =
                            live.length == 0 && matches!(chunk, ReadChunk::Data { .. });
                        assert!(length > 0 || empty_read, "empty {chunk:?}");
                        assert!(
                            offset >= live.offset
                                && offset.checked_add(length).is_some_and(|e| e <= end),
                            "{chunk:?} outside the request {}+{}",
                            live.offset,
                            live.length
                        );
                    }
                    ReadChunk::Error { offset, .. } => {
                        if let Some(o) = offset {
                            assert!(
                                o >= live.offset
                                    && (o < end || (live.length == 0 && o == live.offset)),
                                "{chunk:?} outside the request {}+{}",
                                live.offset,
                                live.length
                            );
                        }
                    }
                    other => panic!("a read chunk this checker does not know: {other:?}"),
                }
            }
            Event::Completed(Completion {
                cookie,
                result,
                buffer,
                ..
            }) => {
                let live = t.live.remove(&cookie).unwrap_or_else(|| {
                    panic!(
                        "Completed for {cookie:?}, not in flight (seen: {})",
                        t.seen.contains(&cookie)
                    )
                });
                match (&buffer, live.kind.is_read()) {
                    (Some(b), true) => {
                        assert_eq!(b.len() as u64, live.length, "read buffer came back resized")
                    }
                    (None, false) => {}
                    (b, _) => panic!(
                        "{:?} completed with buffer {:?}",
                        live.kind,
                        b.as_ref().map(|b| b.len())
                    ),
                }
                if result.is_ok() {
                    self.report.ok_completions += 1;
                    if let Some(b) = buffer {
                        self.ok_reads.push((cookie, b));
                    }
                } else {
                    self.report.err_completions += 1;
                }
            }
            Event::Closed { error } => {
                t.pending_opt = None;
                t.closed = Some(error);
            }
            other => panic!("an event this checker does not know: {other:?}"),
        }
    }

    fn check_state(&self) {
        let (a, b, t) = (&self.a, &self.b, &self.tracker);
        let phase = a.phase();
        assert_eq!(phase, b.phase(), "phases differ between the input paths");
        assert_eq!(a.in_flight(), b.in_flight());
        assert_eq!(a.direction(), b.direction());
        assert_eq!(a.error(), b.error());
        assert_eq!(a.export_info(), b.export_info());
        assert_eq!(
            a.structured_replies_negotiated(),
            b.structured_replies_negotiated()
        );
        assert_eq!(a.protocol(), b.protocol());
        assert_eq!(
            a.extended_headers_negotiated(),
            b.extended_headers_negotiated()
        );
        assert_eq!(a.meta_contexts(), b.meta_contexts());
        assert_eq!(a.handshake_flags_sent(), b.handshake_flags_sent());
        assert_eq!(
            a.in_flight(),
            t.live.len(),
            "in_flight() disagrees with the cookies not yet completed"
        );
        for cookie in t.live.keys() {
            assert!(
                a.is_in_flight(*cookie) && b.is_in_flight(*cookie),
                "{cookie:?} not in flight"
            );
        }
        for cookie in t.seen.iter().filter(|c| !t.live.contains_key(c)) {
            assert!(
                !a.is_in_flight(*cookie),
                "completed {cookie:?} still in flight"
            );
        }
        assert_eq!(
            is_terminal(phase),
            t.closed.is_some(),
            "phase {phase:?} but Closed seen: {:?}",
            t.closed
        );
        match &t.closed {
            Some(None) => assert_eq!(phase, Phase::Closed),
            Some(Some(e)) => {
                assert_eq!(phase, Phase::Dead);
                assert_eq!(
                    a.error(),
                    Some(e),
                    "Closed error differs from the sticky error"
                );
            }
            None => {}
        }
        if is_terminal(phase) {
            assert_eq!(a.in_flight(), 0);
            assert_eq!(a.direction(), nbd_proto::Direction::None);
        }
        let bound = 16 + self.report.bytes_fed + 4 * self.report.ops;
        assert!(
            t.events <= bound,
            "{} events for {} bytes and {} calls",
            t.events,
            self.report.bytes_fed,
            self.report.ops
        );
    }
}

/// Checks that a successful command sent exactly its request header and payload.
fn check_request(op: &Op, length: u64, cookie: Cookie, out: &[u8], extended: bool) {
    let header_len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    assert!(out.len() >= header_len, "{op:?} sent {} bytes", out.len());
    let h = RequestHeader::decode(&out[..header_len]).expect("a request header");
    let magic = u32::from_be_bytes(out[..4].try_into().expect("4 bytes"));
    assert_eq!(
        magic == EXTENDED_REQUEST_MAGIC,
        extended,
        "request header style"
    );
    assert_eq!(
        h.cookie,
        cookie.get(),
        "request cookie differs from the returned one"
    );
    assert_eq!(Some(h.command), op.kind.wire_command());
    let payload = &out[header_len..];
    let offset = if op.kind == OpKind::Flush {
        0
    } else {
        op.offset
    };
    assert_eq!(h.offset, offset);
    match op.kind {
        OpKind::BlockStatusFilter => {
            assert_eq!(
                h.flags,
                op.flags | CMD_FLAG_PAYLOAD_LEN,
                "request flags differ"
            );
            assert_eq!(h.length, payload.len() as u64, "filter payload length");
            assert!(
                payload.len() >= 12 && payload.len() % 4 == 0,
                "filter payload of {} bytes",
                payload.len()
            );
            assert_eq!(payload[..8], length.to_be_bytes(), "filter effect length");
        }
        OpKind::Write => {
            assert_eq!(h.flags, op.flags, "request flags differ");
            assert_eq!(h.length, length, "request length differs");
            assert!(payload == &op.write_payload()[..], "write payload differs");
        }
        _ => {
            assert_eq!(h.flags, op.flags, "request flags differ");
            assert_eq!(h.length, length, "request length differs");
            assert!(
                payload.is_empty(),
                "{op:?} sent {} bytes after its header",
                payload.len()
            );
        }
    }
}

fn call(conn: &mut Connection, op: &Op) -> Result<Option<Cookie>, Error> {
    let flags = op.cmd_flags();
    let (offset, length) = (op.offset, op.effective_length());
    match op.kind {
        OpKind::Read => conn.pread(op.read_buffer(), offset, flags).map(Some),
        OpKind::ReadStructured => conn
            .pread_structured(op.read_buffer(), offset, flags)
            .map(Some),
        OpKind::Write => conn.pwrite(op.write_payload(), offset, flags).map(Some),
        OpKind::Flush => conn.flush(flags).map(Some),
        OpKind::Trim => conn.trim(length, offset, flags).map(Some),
        OpKind::Cache => conn.cache(length, offset, flags).map(Some),
        OpKind::Zero => conn.zero(length, offset, flags).map(Some),
        OpKind::BlockStatus => conn.block_status(length, offset, flags).map(Some),
        OpKind::BlockStatusFilter => conn
            .block_status_filter(length, offset, flags, &[FILTER_CONTEXT])
            .map(Some),
        OpKind::Disconnect => conn.disconnect().map(|()| None),
        OpKind::OptList => conn.opt_list().map(|()| None),
        OpKind::OptInfo => conn.opt_info().map(|()| None),
        OpKind::OptGo => conn.opt_go().map(|()| None),
        OpKind::OptStructuredReply => conn.opt_structured_reply().map(|()| None),
        OpKind::OptAbort => conn.opt_abort().map(|()| None),
        OpKind::OptExtendedHeaders => conn.opt_extended_headers().map(|()| None),
        OpKind::OptListMetaContext => conn.opt_list_meta_context().map(|()| None),
        OpKind::OptSetMetaContext => conn.opt_set_meta_context().map(|()| None),
        OpKind::SetStrict => {
            conn.set_strict_mode(Strict::from_bits_truncate(u32::from(op.flags)));
            Ok(None)
        }
    }
}
