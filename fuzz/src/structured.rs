//! Target `structured`: a scripted server, built from `arbitrary`-derived values.
//!
//! An input is a [`Setup`] (handshake style, export, strict bits, splits)
//! followed by up to [`MAX_ACTIONS`] [`Action`]s: the client issues a command,
//! the server sends a simple reply or one structured chunk (well-formed, or
//! slightly corrupted), raw garbage, or end of stream. Replies are built with
//! the `nbd_proto::wire` encoders and aimed at one of the issued cookies or at
//! a raw value. Every [`Driver`] invariant applies, plus one: while the stream
//! is uncorrupted, a read that completes `Ok` holds exactly the bytes the
//! scripted server sent for it (data as sent, zeroes for holes).

use std::collections::HashMap;

use arbitrary::{Arbitrary, Unstructured};
use nbd_proto::wire::consts::*;
use nbd_proto::wire::{
    BlockStatusChunk, ChunkHeader, ErrorChunk, ExportNameReply, Extent, GreetingStart, HoleChunk,
    Info, MetaContextReply, OldstyleRest, OptionReplyHeader, SimpleReply,
};
use nbd_proto::{Config, Strict};

use crate::driver::{pattern, Driver, Op, OpKind, Report, MAX_BUFFER, READ_POISON};
use crate::encode::{variant, Encode};
use crate::rng::{Splitter, SPLIT_SIZES};

/// The id the scripted server gives `base:allocation`.
pub const META_ID: u32 = 7;

/// Most actions taken from one input.
pub const MAX_ACTIONS: usize = 128;
/// Server bytes after which the remaining actions are dropped.
pub const MAX_SERVER_BYTES: usize = 1 << 20;
/// Chunks fed at the input's chosen sizes; after that, chunks are at least
/// [`LATE_CHUNK`] bytes, so that a large payload cut byte by byte does not make
/// one run take seconds.
pub const STEP_BUDGET: usize = 4096;
/// Smallest chunk once [`STEP_BUDGET`] is spent.
pub const LATE_CHUNK: usize = 4096;

/// How the run starts.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// Handshake the scripted server speaks.
    pub handshake: Handshake,
    /// Export size.
    pub size: SizeSel,
    /// Transmission flags (`HAS_FLAGS` is added).
    pub transmission_flags: u16,
    /// Strict bits, inverted: 0 means every check on.
    pub strict_off: u8,
    /// Low nibble: A's chunk size cap; high nibble: B's read size cap
    /// (indexes into [`SPLIT_SIZES`]).
    pub split: u8,
    /// Seed of the chunk sizes.
    pub seed: u8,
}

/// The server's handshake. The client runs with libnbd's defaults (plus
/// `full_info` and the `base:allocation` context where asked), and the server
/// answers what that client sends: extended headers first, then structured
/// replies if those were refused, then the meta context, then the export.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Oldstyle greeting.
    Oldstyle,
    /// Newstyle without the fixed flag: `NBD_OPT_EXPORT_NAME` only.
    Newstyle {
        /// Offer `NBD_FLAG_NO_ZEROES`.
        no_zeroes: bool,
    },
    /// Fixed newstyle refusing extended headers and `NBD_OPT_GO`, so the
    /// client falls back to `EXPORT_NAME`.
    FixedExportName {
        /// Accept structured replies.
        structured: bool,
        /// Offer `NBD_FLAG_NO_ZEROES`.
        no_zeroes: bool,
    },
    /// Fixed newstyle with `NBD_OPT_GO`.
    FixedGo {
        /// Accept extended headers (which bring structured replies).
        extended: bool,
        /// Accept structured replies (asked only if extended headers were refused).
        structured: bool,
        /// Ask for `base:allocation` and select it, as context [`META_ID`].
        meta: bool,
        /// Send `NBD_INFO_BLOCK_SIZE`.
        block_size: Option<BlockSizeSel>,
        /// Ask for (and send) name and description.
        full_info: bool,
    },
}

/// Block size constraints the server sends (possibly invalid, which the client ignores).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeSel {
    /// Minimum is `1 << (min_log2 % 18)`.
    pub min_log2: u8,
    /// Preferred is `1 << (pref_log2 % 27)`.
    pub pref_log2: u8,
    /// Maximum payload, as sent.
    pub maximum: u32,
}

/// Export size.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSel {
    /// A size that fits in 32 bits.
    Bytes(u32),
    /// Any size.
    Huge(u64),
}

/// One step of the script.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The client issues a command.
    Issue(Issue),
    /// The server sends a simple reply (with read data for a successful read).
    Simple(SimpleSpec),
    /// The server sends one structured reply chunk.
    Chunk(ChunkSpec),
    /// The server sends `len % 5` raw bytes.
    Garbage {
        /// The bytes.
        bytes: [u8; 4],
        /// How many of them.
        len: u8,
    },
    /// The server closes its end.
    Eof,
    /// The client changes its strict bits (inverted, as [`Setup::strict_off`]).
    SetStrict(u8),
}

/// A command the client issues.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issue {
    /// Which command.
    pub kind: IssueKind,
    /// Where.
    pub offset: OffsetSel,
    /// How much.
    pub length: LengthSel,
    /// Command flags.
    pub flags: u8,
}

/// Commands of [`Issue`].
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueKind {
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
    /// `disconnect`.
    Disconnect,
    /// `block_status`.
    BlockStatus,
    /// `block_status_filter` for `base:allocation`.
    BlockStatusFilter,
}

/// A command's offset.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSel {
    /// As is.
    Small(u16),
    /// In 512-byte blocks.
    Blocks(u16),
    /// Back from the export's end.
    FromEnd(u16),
    /// Any offset.
    Raw(u64),
}

/// A command's length.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthSel {
    /// As is.
    Small(u16),
    /// In 512-byte blocks.
    Blocks(u8),
    /// Any 32-bit length.
    Raw(u32),
    /// Any length.
    Wide(u64),
}

/// Which cookie a reply names.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The `n % count`-th most recently issued cookie (0: the latest); the
    /// first cookie a connection hands out if none was.
    Issued(u8),
    /// Any value.
    Raw(u64),
}

/// Bytes changed after a reply is encoded. Anything but `None` (with an
/// effect) stops the content check for the rest of the run.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    /// Sent as built.
    None,
    /// Byte `at % len` is xored with `xor`.
    Flip {
        /// Which byte.
        at: u16,
        /// Bits to flip.
        xor: u8,
    },
    /// The last `n` bytes are dropped.
    Truncate(u8),
    /// Three bytes are appended.
    Extend([u8; 3]),
}

/// A simple reply.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleSpec {
    /// Cookie named.
    pub target: Target,
    /// NBD error value (0: success; a successful read carries its data).
    pub error: u8,
    /// Seed of the data bytes.
    pub fill: u8,
    /// Damage.
    pub corrupt: Corrupt,
}

/// A structured reply chunk.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpec {
    /// Cookie named.
    pub target: Target,
    /// Type and payload.
    pub kind: ChunkKind,
    /// `NBD_REPLY_FLAG_DONE`.
    pub done: bool,
    /// Damage.
    pub corrupt: Corrupt,
}

/// Chunk types.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    Data {
        /// Offset.
        at: At,
        /// Length of the data.
        len: ChunkLen,
        /// Seed of the data bytes.
        fill: u8,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    Hole {
        /// Offset.
        at: At,
        /// Length of the hole.
        len: ChunkLen,
    },
    /// `NBD_REPLY_TYPE_ERROR`, or `ERROR_OFFSET` with an offset.
    Error {
        /// NBD error value.
        error: u8,
        /// Length of the message.
        message_len: u8,
        /// Offset for `ERROR_OFFSET`.
        at: Option<At>,
    },
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`, as negotiated (or the other
    /// one with `wrong_width`).
    BlockStatus {
        /// Context id: [`META_ID`] if `None`.
        context: Option<u32>,
        /// How many of `extents` are sent.
        count: u8,
        /// Extents.
        extents: [ExtentSpec; 3],
        /// Send the width that was not negotiated.
        wrong_width: bool,
    },
    /// Any type with a zeroed payload.
    Other {
        /// Chunk type.
        chunk_type: u16,
        /// Payload length.
        payload_len: u8,
    },
}

/// One block status extent.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentSpec {
    /// Its length.
    pub length: ExtentLen,
    /// Status flags.
    pub flags: u8,
}

/// An extent's length.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentLen {
    /// What the request has left after the previous extents (at least 1).
    Rest,
    /// As is (0 is invalid).
    Exact(u32),
}

/// A chunk's offset.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Right after the previous chunk the server sent for the command.
    Next,
    /// From the start of the command's request.
    Rel(u16),
    /// Any offset.
    Abs(u64),
}

/// A chunk's length.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkLen {
    /// Up to the end of the request.
    Rest,
    /// As is.
    Exact(u16),
    /// Any 32-bit length (data is capped at [`MAX_BUFFER`]).
    Raw(u32),
}

/// A whole `structured` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructuredInput {
    /// How the run starts.
    pub setup: Setup,
    /// The script.
    pub actions: Vec<Action>,
}

impl StructuredInput {
    /// Decodes fuzzer bytes: a [`Setup`], then actions until the bytes run out.
    pub fn decode(data: &[u8]) -> arbitrary::Result<Self> {
        let mut u = Unstructured::new(data);
        let setup = Setup::arbitrary(&mut u)?;
        let mut actions = Vec::new();
        while !u.is_empty() && actions.len() < MAX_ACTIONS {
            actions.push(Action::arbitrary(&mut u)?);
        }
        Ok(StructuredInput { setup, actions })
    }

    /// The bytes that [`StructuredInput::decode`] turns back into `self`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.setup.encode(&mut out);
        for a in &self.actions {
            a.encode(&mut out);
        }
        out
    }
}

// ---------------------------------------------------------------- the server side

/// What the scripted server knows of a command.
#[derive(Debug, Clone)]
struct ServerCmd {
    offset: u64,
    length: u64,
    /// What a successful read must hold.
    expected: Option<Vec<u8>>,
    /// Where `At::Next` points, relative to `offset`.
    cursor: u64,
}

#[derive(Debug, Default)]
struct Model {
    size: u64,
    /// Replies use extended headers.
    extended: bool,
    cmds: HashMap<u64, ServerCmd>,
    issued: Vec<u64>,
    tainted: bool,
}

impl Setup {
    fn export_size(&self) -> u64 {
        match self.size {
            SizeSel::Bytes(n) => u64::from(n),
            SizeSel::Huge(n) => n,
        }
    }

    fn tflags(&self) -> u16 {
        self.transmission_flags | FLAG_HAS_FLAGS
    }

    /// The client's configuration, everything the server says up to
    /// transmission, and whether extended headers were agreed.
    pub fn handshake(&self) -> (Config, Vec<u8>, bool) {
        let mut config =
            Config::default().strict(Strict::from_bits_truncate(u32::from(!self.strict_off)));
        let (size, flags) = (self.export_size(), self.tflags());
        let mut s = Vec::new();
        let mut extended_agreed = false;
        let export_name_reply = |s: &mut Vec<u8>, no_zeroes: bool| {
            ExportNameReply { size, flags }.encode(!no_zeroes, s);
        };
        match self.handshake {
            Handshake::Oldstyle => {
                GreetingStart::Oldstyle.encode(&mut s);
                OldstyleRest {
                    size,
                    flags: u32::from(flags),
                }
                .encode(&mut s);
            }
            Handshake::Newstyle { no_zeroes } => {
                GreetingStart::Newstyle.encode(&mut s);
                let server = if no_zeroes { FLAG_NO_ZEROES } else { 0 };
                s.extend_from_slice(&server.to_be_bytes());
                export_name_reply(&mut s, no_zeroes);
            }
            Handshake::FixedExportName {
                structured,
                no_zeroes,
            } => {
                GreetingStart::Newstyle.encode(&mut s);
                let server = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
                s.extend_from_slice(&server.to_be_bytes());
                OptionReplyHeader::encode_with(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, b"", &mut s);
                structured_reply(&mut s, structured);
                OptionReplyHeader::encode_with(OPT_GO, REP_ERR_UNSUP, b"", &mut s);
                export_name_reply(&mut s, no_zeroes);
            }
            Handshake::FixedGo {
                extended,
                structured,
                meta,
                block_size,
                full_info,
            } => {
                config.full_info = full_info;
                if meta {
                    config.meta_contexts = vec!["base:allocation".into()];
                }
                GreetingStart::Newstyle.encode(&mut s);
                s.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                let reply = if extended { REP_ACK } else { REP_ERR_UNSUP };
                OptionReplyHeader::encode_with(OPT_EXTENDED_HEADERS, reply, b"", &mut s);
                if !extended {
                    structured_reply(&mut s, structured);
                }
                extended_agreed = extended;
                if meta && (extended || structured) {
                    let mut data = Vec::new();
                    MetaContextReply {
                        id: META_ID,
                        name: "base:allocation".into(),
                    }
                    .encode(&mut data);
                    OptionReplyHeader::encode_with(
                        OPT_SET_META_CONTEXT,
                        REP_META_CONTEXT,
                        &data,
                        &mut s,
                    );
                    OptionReplyHeader::encode_with(OPT_SET_META_CONTEXT, REP_ACK, b"", &mut s);
                }
                let mut info = |i: Info| {
                    let mut data = Vec::new();
                    i.encode(&mut data);
                    OptionReplyHeader::encode_with(OPT_GO, REP_INFO, &data, &mut s);
                };
                info(Info::Export { size, flags });
                if let Some(b) = block_size {
                    info(Info::BlockSize {
                        minimum: 1 << (b.min_log2 % 18),
                        preferred: 1 << (b.pref_log2 % 27),
                        maximum: b.maximum,
                    });
                }
                if full_info {
                    info(Info::Name("disk0".into()));
                    info(Info::Description("fuzz export".into()));
                }
                OptionReplyHeader::encode_with(OPT_GO, REP_ACK, b"", &mut s);
            }
        }
        (config, s, extended_agreed)
    }
}

fn structured_reply(s: &mut Vec<u8>, accept: bool) {
    let reply = if accept { REP_ACK } else { REP_ERR_UNSUP };
    OptionReplyHeader::encode_with(OPT_STRUCTURED_REPLY, reply, b"", s);
}

impl Issue {
    /// The call this stands for, on an export of `size` bytes.
    pub fn op(&self, size: u64) -> Op {
        let kind = match self.kind {
            IssueKind::Read => OpKind::Read,
            IssueKind::ReadStructured => OpKind::ReadStructured,
            IssueKind::Write => OpKind::Write,
            IssueKind::Flush => OpKind::Flush,
            IssueKind::Trim => OpKind::Trim,
            IssueKind::Cache => OpKind::Cache,
            IssueKind::Zero => OpKind::Zero,
            IssueKind::Disconnect => OpKind::Disconnect,
            IssueKind::BlockStatus => OpKind::BlockStatus,
            IssueKind::BlockStatusFilter => OpKind::BlockStatusFilter,
        };
        let offset = match self.offset {
            OffsetSel::Small(n) => u64::from(n),
            OffsetSel::Blocks(n) => u64::from(n) * 512,
            OffsetSel::FromEnd(n) => size.wrapping_sub(u64::from(n)),
            OffsetSel::Raw(n) => n,
        };
        let length = match self.length {
            LengthSel::Small(n) => u64::from(n),
            LengthSel::Blocks(n) => u64::from(n) * 512,
            LengthSel::Raw(n) => u64::from(n),
            LengthSel::Wide(n) => n,
        };
        Op {
            kind,
            offset,
            length,
            flags: u16::from(self.flags),
            fill: offset as u8 ^ self.flags,
        }
    }
}

impl Model {
    fn resolve(&self, target: Target) -> u64 {
        match target {
            Target::Raw(c) => c,
            Target::Issued(_) if self.issued.is_empty() => 1 << 32,
            Target::Issued(i) => {
                let n = self.issued.len();
                self.issued[n - 1 - usize::from(i) % n]
            }
        }
    }

    fn corrupt(&mut self, msg: &mut Vec<u8>, corrupt: Corrupt) {
        match corrupt {
            Corrupt::None => {}
            Corrupt::Flip { at, xor } => {
                if !msg.is_empty() && xor != 0 {
                    let i = usize::from(at) % msg.len();
                    msg[i] ^= xor;
                    self.tainted = true;
                }
            }
            Corrupt::Truncate(n) => {
                let n = usize::from(n).min(msg.len());
                if n > 0 {
                    msg.truncate(msg.len() - n);
                    self.tainted = true;
                }
            }
            Corrupt::Extend(bytes) => {
                msg.extend_from_slice(&bytes);
                self.tainted = true;
            }
        }
    }

    fn simple(&mut self, spec: &SimpleSpec) -> Vec<u8> {
        let cookie = self.resolve(spec.target);
        let mut msg = Vec::new();
        SimpleReply {
            error: u32::from(spec.error),
            cookie,
        }
        .encode(&mut msg);
        if spec.error == 0 {
            if let Some(cmd) = self.cmds.get_mut(&cookie) {
                if let Some(expected) = cmd.expected.as_mut() {
                    let data = pattern(spec.fill, cmd.offset, cmd.length as usize);
                    expected.copy_from_slice(&data);
                    msg.extend_from_slice(&data);
                }
            }
        }
        self.corrupt(&mut msg, spec.corrupt);
        msg
    }

    fn chunk(&mut self, spec: &ChunkSpec) -> Vec<u8> {
        let cookie = self.resolve(spec.target);
        // The command's shape (not its expected content, which may be large).
        let cmd = self.cmds.get(&cookie).map_or(
            ServerCmd {
                offset: 0,
                length: 0,
                expected: None,
                cursor: 0,
            },
            |c| ServerCmd {
                expected: None,
                ..*c
            },
        );
        let at = |at: At| match at {
            At::Next => cmd.offset.wrapping_add(cmd.cursor),
            At::Rel(r) => cmd.offset.wrapping_add(u64::from(r)),
            At::Abs(a) => a,
        };
        let len = |offset: u64, len: ChunkLen| match len {
            ChunkLen::Rest => cmd.offset.saturating_add(cmd.length).saturating_sub(offset),
            ChunkLen::Exact(n) => u64::from(n),
            ChunkLen::Raw(n) => u64::from(n),
        };
        // What the chunk says about the read's content: offset, length, data (None: zeroes).
        let (chunk_type, payload, covered) = match spec.kind {
            ChunkKind::Data {
                at: a,
                len: l,
                fill,
            } => {
                let offset = at(a);
                let n = len(offset, l).min(MAX_BUFFER);
                let data = pattern(fill, offset, n as usize);
                let mut payload = offset.to_be_bytes().to_vec();
                payload.extend_from_slice(&data);
                (
                    REPLY_TYPE_OFFSET_DATA,
                    payload,
                    Some((offset, n, Some(data))),
                )
            }
            ChunkKind::Hole { at: a, len: l } => {
                let offset = at(a);
                let n = len(offset, l).min(u64::from(u32::MAX));
                let mut payload = Vec::new();
                HoleChunk {
                    offset,
                    length: n as u32,
                }
                .encode(&mut payload);
                (REPLY_TYPE_OFFSET_HOLE, payload, Some((offset, n, None)))
            }
            ChunkKind::Error {
                error,
                message_len,
                at: a,
            } => {
                let mut payload = Vec::new();
                ErrorChunk {
                    error: u32::from(error),
                    message: "e".repeat(usize::from(message_len)),
                    offset: a.map(at),
                }
                .encode(&mut payload);
                let t = if a.is_some() {
                    REPLY_TYPE_ERROR_OFFSET
                } else {
                    REPLY_TYPE_ERROR
                };
                (t, payload, None)
            }
            ChunkKind::None => (REPLY_TYPE_NONE, Vec::new(), None),
            ChunkKind::BlockStatus {
                context,
                count,
                extents,
                wrong_width,
            } => {
                let wide = self.extended != wrong_width;
                let mut left = cmd.length;
                let extents = extents[..usize::from(count % 4)]
                    .iter()
                    .map(|e| {
                        let length = match e.length {
                            ExtentLen::Rest => left.max(1),
                            ExtentLen::Exact(n) => u64::from(n),
                        };
                        left = left.saturating_sub(length);
                        Extent {
                            length,
                            flags: u64::from(e.flags),
                        }
                    })
                    .collect();
                let mut payload = Vec::new();
                BlockStatusChunk {
                    context_id: context.unwrap_or(META_ID),
                    extents,
                }
                .encode(wide, &mut payload);
                let t = if wide {
                    REPLY_TYPE_BLOCK_STATUS_EXT
                } else {
                    REPLY_TYPE_BLOCK_STATUS
                };
                (t, payload, None)
            }
            ChunkKind::Other {
                chunk_type,
                payload_len,
            } => (chunk_type, vec![0; usize::from(payload_len)], None),
        };
        if let (Some((offset, n, data)), Some(cmd)) = (covered, self.cmds.get_mut(&cookie)) {
            let chunk_end = offset.saturating_add(n);
            if let Some(expected) = cmd.expected.as_mut() {
                let start = offset.max(cmd.offset);
                let end = chunk_end.min(cmd.offset.saturating_add(cmd.length));
                for abs in start..end.max(start) {
                    let byte = data.as_ref().map_or(0, |d| d[(abs - offset) as usize]);
                    expected[(abs - cmd.offset) as usize] = byte;
                }
            }
            if chunk_end >= cmd.offset {
                cmd.cursor = chunk_end - cmd.offset;
            }
        }
        let mut msg = Vec::new();
        let header = ChunkHeader {
            flags: if spec.done { REPLY_FLAG_DONE } else { 0 },
            chunk_type,
            cookie,
            offset: cmd.offset,
            length: payload.len() as u64,
        };
        if self.extended {
            header.encode_extended(&mut msg);
        } else {
            header.encode_structured(&mut msg);
        }
        msg.extend_from_slice(&payload);
        self.corrupt(&mut msg, spec.corrupt);
        msg
    }
}

/// Feeds `bytes` in chunks, counting steps against [`STEP_BUDGET`].
fn feed_all(driver: &mut Driver, split: &mut Splitter, steps: &mut usize, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let mut n = split.next_size(bytes.len());
        *steps += 1;
        if *steps > STEP_BUDGET {
            n = n.max(LATE_CHUNK).min(bytes.len());
        }
        driver.feed(&bytes[..n]);
        bytes = &bytes[n..];
    }
}

fn verify(driver: &mut Driver, model: &Model) {
    for (cookie, buf) in driver.take_ok_reads() {
        let cmd = model
            .cmds
            .get(&cookie.get())
            .unwrap_or_else(|| panic!("Ok read {cookie:?} the model never issued"));
        if model.tainted {
            continue;
        }
        let expected = cmd
            .expected
            .as_ref()
            .expect("reads have an expected content");
        if buf[..] != expected[..] {
            let first = buf.iter().zip(expected).position(|(a, b)| a != b);
            panic!(
                "read {cookie:?} of {} bytes at {} completed Ok with content differing from what the server sent (first difference at byte {first:?})",
                cmd.length, cmd.offset
            );
        }
        driver.count_verified_read();
    }
}

/// Runs one `structured` input from fuzzer bytes; panics if an invariant breaks.
pub fn run_bytes(data: &[u8]) -> Option<Report> {
    let input = StructuredInput::decode(data).ok()?;
    Some(run(&input))
}

/// Runs one `structured` input; panics if an invariant breaks.
pub fn run(input: &StructuredInput) -> Report {
    let setup = &input.setup;
    let (config, handshake, extended) = setup.handshake();
    let seed = u64::from(setup.seed);
    let mut driver = Driver::new(
        config,
        SPLIT_SIZES[usize::from(setup.split >> 4)],
        seed ^ 0x5eed,
    );
    let mut split = Splitter::new(seed, SPLIT_SIZES[usize::from(setup.split & 15)]);
    let mut model = Model {
        size: setup.export_size(),
        extended,
        ..Model::default()
    };
    let mut steps = 0;
    feed_all(&mut driver, &mut split, &mut steps, &handshake);
    let mut sent = handshake.len();

    for action in &input.actions {
        if sent > MAX_SERVER_BYTES {
            break;
        }
        let bytes = match action {
            Action::Issue(issue) => {
                let op = issue.op(model.size);
                if let Ok(Some(cookie)) = driver.issue(&op) {
                    let length = op.effective_length();
                    let expected = op
                        .kind
                        .is_read()
                        .then(|| vec![READ_POISON; length as usize]);
                    model.cmds.insert(
                        cookie.get(),
                        ServerCmd {
                            offset: op.offset,
                            length,
                            expected,
                            cursor: 0,
                        },
                    );
                    model.issued.push(cookie.get());
                }
                Vec::new()
            }
            Action::Simple(spec) => model.simple(spec),
            Action::Chunk(spec) => model.chunk(spec),
            Action::Garbage { bytes, len } => {
                let n = usize::from(*len % 5);
                if n > 0 {
                    model.tainted = true;
                }
                bytes[..n].to_vec()
            }
            Action::Eof => {
                driver.eof();
                Vec::new()
            }
            Action::SetStrict(bits) => {
                let op = Op {
                    kind: OpKind::SetStrict,
                    offset: 0,
                    length: 0,
                    flags: u16::from(!*bits),
                    fill: 0,
                };
                let _ = driver.issue(&op);
                Vec::new()
            }
        };
        sent += bytes.len();
        feed_all(&mut driver, &mut split, &mut steps, &bytes);
        verify(&mut driver, &model);
    }
    if !driver.eof_sent() {
        driver.eof();
        verify(&mut driver, &model);
    }
    driver.finish()
}

// ---------------------------------------------------------------- encoding for seeds

impl Encode for Setup {
    fn encode(&self, out: &mut Vec<u8>) {
        self.handshake.encode(out);
        self.size.encode(out);
        self.transmission_flags.encode(out);
        self.strict_off.encode(out);
        self.split.encode(out);
        self.seed.encode(out);
    }
}

impl Encode for Handshake {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Handshake::Oldstyle => variant(out, 0, 4),
            Handshake::Newstyle { no_zeroes } => {
                variant(out, 1, 4);
                no_zeroes.encode(out);
            }
            Handshake::FixedExportName {
                structured,
                no_zeroes,
            } => {
                variant(out, 2, 4);
                structured.encode(out);
                no_zeroes.encode(out);
            }
            Handshake::FixedGo {
                extended,
                structured,
                meta,
                block_size,
                full_info,
            } => {
                variant(out, 3, 4);
                extended.encode(out);
                structured.encode(out);
                meta.encode(out);
                block_size.encode(out);
                full_info.encode(out);
            }
        }
    }
}

impl Encode for BlockSizeSel {
    fn encode(&self, out: &mut Vec<u8>) {
        self.min_log2.encode(out);
        self.pref_log2.encode(out);
        self.maximum.encode(out);
    }
}

impl Encode for SizeSel {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            SizeSel::Bytes(n) => {
                variant(out, 0, 2);
                n.encode(out);
            }
            SizeSel::Huge(n) => {
                variant(out, 1, 2);
                n.encode(out);
            }
        }
    }
}

impl Encode for Action {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Action::Issue(i) => {
                variant(out, 0, 6);
                i.encode(out);
            }
            Action::Simple(s) => {
                variant(out, 1, 6);
                s.encode(out);
            }
            Action::Chunk(c) => {
                variant(out, 2, 6);
                c.encode(out);
            }
            Action::Garbage { bytes, len } => {
                variant(out, 3, 6);
                bytes.encode(out);
                len.encode(out);
            }
            Action::Eof => variant(out, 4, 6),
            Action::SetStrict(b) => {
                variant(out, 5, 6);
                b.encode(out);
            }
        }
    }
}

impl Encode for Issue {
    fn encode(&self, out: &mut Vec<u8>) {
        self.kind.encode(out);
        self.offset.encode(out);
        self.length.encode(out);
        self.flags.encode(out);
    }
}

impl Encode for IssueKind {
    fn encode(&self, out: &mut Vec<u8>) {
        let i = match self {
            IssueKind::Read => 0,
            IssueKind::ReadStructured => 1,
            IssueKind::Write => 2,
            IssueKind::Flush => 3,
            IssueKind::Trim => 4,
            IssueKind::Cache => 5,
            IssueKind::Zero => 6,
            IssueKind::Disconnect => 7,
            IssueKind::BlockStatus => 8,
            IssueKind::BlockStatusFilter => 9,
        };
        variant(out, i, 10);
    }
}

impl Encode for OffsetSel {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OffsetSel::Small(n) => {
                variant(out, 0, 4);
                n.encode(out);
            }
            OffsetSel::Blocks(n) => {
                variant(out, 1, 4);
                n.encode(out);
            }
            OffsetSel::FromEnd(n) => {
                variant(out, 2, 4);
                n.encode(out);
            }
            OffsetSel::Raw(n) => {
                variant(out, 3, 4);
                n.encode(out);
            }
        }
    }
}

impl Encode for LengthSel {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            LengthSel::Small(n) => {
                variant(out, 0, 4);
                n.encode(out);
            }
            LengthSel::Blocks(n) => {
                variant(out, 1, 4);
                n.encode(out);
            }
            LengthSel::Raw(n) => {
                variant(out, 2, 4);
                n.encode(out);
            }
            LengthSel::Wide(n) => {
                variant(out, 3, 4);
                n.encode(out);
            }
        }
    }
}

impl Encode for Target {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Target::Issued(n) => {
                variant(out, 0, 2);
                n.encode(out);
            }
            Target::Raw(n) => {
                variant(out, 1, 2);
                n.encode(out);
            }
        }
    }
}

impl Encode for Corrupt {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Corrupt::None => variant(out, 0, 4),
            Corrupt::Flip { at, xor } => {
                variant(out, 1, 4);
                at.encode(out);
                xor.encode(out);
            }
            Corrupt::Truncate(n) => {
                variant(out, 2, 4);
                n.encode(out);
            }
            Corrupt::Extend(b) => {
                variant(out, 3, 4);
                b.encode(out);
            }
        }
    }
}

impl Encode for SimpleSpec {
    fn encode(&self, out: &mut Vec<u8>) {
        self.target.encode(out);
        self.error.encode(out);
        self.fill.encode(out);
        self.corrupt.encode(out);
    }
}

impl Encode for ChunkSpec {
    fn encode(&self, out: &mut Vec<u8>) {
        self.target.encode(out);
        self.kind.encode(out);
        self.done.encode(out);
        self.corrupt.encode(out);
    }
}

impl Encode for ChunkKind {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ChunkKind::Data { at, len, fill } => {
                variant(out, 0, 6);
                at.encode(out);
                len.encode(out);
                fill.encode(out);
            }
            ChunkKind::Hole { at, len } => {
                variant(out, 1, 6);
                at.encode(out);
                len.encode(out);
            }
            ChunkKind::Error {
                error,
                message_len,
                at,
            } => {
                variant(out, 2, 6);
                error.encode(out);
                message_len.encode(out);
                at.encode(out);
            }
            ChunkKind::None => variant(out, 3, 6),
            ChunkKind::BlockStatus {
                context,
                count,
                extents,
                wrong_width,
            } => {
                variant(out, 4, 6);
                context.encode(out);
                count.encode(out);
                extents.encode(out);
                wrong_width.encode(out);
            }
            ChunkKind::Other {
                chunk_type,
                payload_len,
            } => {
                variant(out, 5, 6);
                chunk_type.encode(out);
                payload_len.encode(out);
            }
        }
    }
}

impl Encode for At {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            At::Next => variant(out, 0, 3),
            At::Rel(n) => {
                variant(out, 1, 3);
                n.encode(out);
            }
            At::Abs(n) => {
                variant(out, 2, 3);
                n.encode(out);
            }
        }
    }
}

impl Encode for ChunkLen {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ChunkLen::Rest => variant(out, 0, 3),
            ChunkLen::Exact(n) => {
                variant(out, 1, 3);
                n.encode(out);
            }
            ChunkLen::Raw(n) => {
                variant(out, 2, 3);
                n.encode(out);
            }
        }
    }
}

impl Encode for ExtentSpec {
    fn encode(&self, out: &mut Vec<u8>) {
        self.length.encode(out);
        self.flags.encode(out);
    }
}

impl Encode for ExtentLen {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ExtentLen::Rest => variant(out, 0, 2),
            ExtentLen::Exact(n) => {
                variant(out, 1, 2);
                n.encode(out);
            }
        }
    }
}
