//! Seed inputs for both targets, written to `fuzz/corpus/` by the ignored test
//! `write_seed_corpus` (see README.md), and checked by the replay tests.

use nbd_proto::wire::consts::*;
use nbd_proto::wire::{
    BlockStatusChunk, ChunkHeader, ErrorChunk, ExportNameReply, Extent, GreetingStart, HoleChunk,
    Info, MetaContextReply, OldstyleRest, OptionReplyHeader, ServerEntry, SimpleReply,
};

use crate::driver::{pattern, OpKind};
use crate::server_bytes::{cfg, cfg2, cookie, encode, Header, RawOp, LOCKSTEP};
use crate::structured::{
    Action, At, BlockSizeSel, ChunkKind, ChunkLen, ChunkSpec, Corrupt, ExtentLen, ExtentSpec,
    Handshake, Issue, IssueKind, LengthSel, OffsetSel, Setup, SimpleSpec, SizeSel, StructuredInput,
    Target,
};

/// Transmission flags advertising every command and flag.
pub const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_DF
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

/// Export size of the seeds.
pub const SIZE: u64 = 1 << 20;

/// Builds a server's byte stream with the `nbd_proto::wire` encoders.
#[derive(Debug, Default, Clone)]
pub struct Server(Vec<u8>);

impl Server {
    /// An empty stream.
    pub fn new() -> Self {
        Server::default()
    }
    /// Oldstyle greeting.
    pub fn oldstyle(mut self, size: u64, flags: u16) -> Self {
        GreetingStart::Oldstyle.encode(&mut self.0);
        OldstyleRest {
            size,
            flags: u32::from(flags),
        }
        .encode(&mut self.0);
        self
    }
    /// Newstyle greeting with handshake flags.
    pub fn newstyle(mut self, server_flags: u16) -> Self {
        GreetingStart::Newstyle.encode(&mut self.0);
        self.0.extend_from_slice(&server_flags.to_be_bytes());
        self
    }
    /// An option reply.
    pub fn opt(mut self, option: u32, reply: u32, data: &[u8]) -> Self {
        OptionReplyHeader::encode_with(option, reply, data, &mut self.0);
        self
    }
    /// An `NBD_REP_INFO` reply.
    pub fn info(self, option: u32, info: Info) -> Self {
        let mut data = Vec::new();
        info.encode(&mut data);
        self.opt(option, REP_INFO, &data)
    }
    /// An `NBD_REP_SERVER` reply.
    pub fn server_entry(self, name: &str, description: &str) -> Self {
        let mut data = Vec::new();
        ServerEntry {
            name: name.into(),
            description: description.into(),
        }
        .encode(&mut data);
        self.opt(OPT_LIST, REP_SERVER, &data)
    }
    /// The successful `INFO` / `GO` sequence: export, block sizes, ack.
    pub fn go(self, option: u32, size: u64, flags: u16) -> Self {
        self.info(option, Info::Export { size, flags })
            .info(
                option,
                Info::BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: 32 << 20,
                },
            )
            .opt(option, REP_ACK, b"")
    }
    /// The reply to `NBD_OPT_EXPORT_NAME`.
    pub fn export_name(mut self, size: u64, flags: u16, zeroes: bool) -> Self {
        ExportNameReply { size, flags }.encode(zeroes, &mut self.0);
        self
    }
    /// A simple reply header.
    pub fn simple(mut self, cookie: u64, error: u32) -> Self {
        SimpleReply { error, cookie }.encode(&mut self.0);
        self
    }
    /// Raw bytes.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A chunk of any type.
    pub fn chunk(mut self, cookie: u64, done: bool, chunk_type: u16, payload: &[u8]) -> Self {
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            chunk_type,
            cookie,
            offset: 0,
            length: payload.len() as u64,
        }
        .encode_structured(&mut self.0);
        self.0.extend_from_slice(payload);
        self
    }
    /// An `OFFSET_DATA` chunk.
    pub fn data(self, cookie: u64, done: bool, offset: u64, data: &[u8]) -> Self {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        self.chunk(cookie, done, REPLY_TYPE_OFFSET_DATA, &payload)
    }
    /// An `OFFSET_HOLE` chunk.
    pub fn hole(self, cookie: u64, done: bool, offset: u64, length: u32) -> Self {
        let mut payload = Vec::new();
        HoleChunk { offset, length }.encode(&mut payload);
        self.chunk(cookie, done, REPLY_TYPE_OFFSET_HOLE, &payload)
    }
    /// An `ERROR` or `ERROR_OFFSET` chunk.
    pub fn error(
        self,
        cookie: u64,
        done: bool,
        error: u32,
        message: &str,
        offset: Option<u64>,
    ) -> Self {
        let mut payload = Vec::new();
        ErrorChunk {
            error,
            message: message.into(),
            offset,
        }
        .encode(&mut payload);
        let t = if offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        };
        self.chunk(cookie, done, t, &payload)
    }
    /// A `NONE` chunk with `DONE`.
    pub fn none(self, cookie: u64) -> Self {
        self.chunk(cookie, true, REPLY_TYPE_NONE, b"")
    }
    /// An `NBD_REP_META_CONTEXT` reply.
    pub fn meta_context(self, option: u32, id: u32, name: &str) -> Self {
        let mut data = Vec::new();
        MetaContextReply {
            id,
            name: name.into(),
        }
        .encode(&mut data);
        self.opt(option, REP_META_CONTEXT, &data)
    }
    /// An extended chunk header (echoing the request's offset) and its payload.
    pub fn ext_chunk(
        mut self,
        cookie: u64,
        done: bool,
        chunk_type: u16,
        request_offset: u64,
        payload: &[u8],
    ) -> Self {
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            chunk_type,
            cookie,
            offset: request_offset,
            length: payload.len() as u64,
        }
        .encode_extended(&mut self.0);
        self.0.extend_from_slice(payload);
        self
    }
    /// An extended `OFFSET_DATA` chunk for a request at `request_offset`.
    pub fn ext_data(
        self,
        cookie: u64,
        done: bool,
        request_offset: u64,
        offset: u64,
        data: &[u8],
    ) -> Self {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        self.ext_chunk(
            cookie,
            done,
            REPLY_TYPE_OFFSET_DATA,
            request_offset,
            &payload,
        )
    }
    /// A block status chunk, extended or compact, with `(length, flags)` extents.
    pub fn block_status(
        self,
        cookie: u64,
        done: bool,
        extended: bool,
        request_offset: u64,
        context_id: u32,
        extents: &[(u64, u64)],
    ) -> Self {
        let mut payload = Vec::new();
        BlockStatusChunk {
            context_id,
            extents: extents
                .iter()
                .map(|&(length, flags)| Extent { length, flags })
                .collect(),
        }
        .encode(extended, &mut payload);
        if extended {
            self.ext_chunk(
                cookie,
                done,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                request_offset,
                &payload,
            )
        } else {
            self.chunk(cookie, done, REPLY_TYPE_BLOCK_STATUS, &payload)
        }
    }
    /// The stream.
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

fn hdr(config: u8, strict: u8, split: u8, seed: u8, config2: u8) -> Header {
    Header {
        config,
        strict,
        split,
        seed,
        config2,
    }
}

fn op(kind: OpKind, offset: u16, length: u16) -> RawOp {
    RawOp::wait(kind, offset, length)
}

fn fixed_go() -> Server {
    Server::new()
        .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .opt(OPT_STRUCTURED_REPLY, REP_ACK, b"")
        .go(OPT_GO, SIZE, ALL_FLAGS)
}

const STRICT_ALL: u8 = 0x3f | LOCKSTEP;

/// Seeds of the `server_bytes` target, by name.
pub fn server_bytes_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let c = cookie;
    let mut seeds = Vec::new();

    seeds.push((
        "oldstyle-read-write-flush-disconnect",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xb4, 1, 0),
            &[
                op(OpKind::Read, 0, 512),
                op(OpKind::Write, 4096, 100),
                op(OpKind::Flush, 0, 0),
                op(OpKind::Disconnect, 0, 0),
            ],
            &Server::new()
                .oldstyle(SIZE, ALL_FLAGS)
                .simple(c(0), 0)
                .bytes(&pattern(7, 0, 512))
                .simple(c(1), 0)
                .simple(c(2), 0)
                .build(),
        ),
    ));

    seeds.push((
        "newstyle-export-name-reads",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0x99, 2, 0),
            &[
                op(OpKind::ReadStructured, 512, 1024),
                op(OpKind::Trim, 0, 4096),
                op(OpKind::Read, 0, 16),
            ],
            &Server::new()
                .newstyle(0)
                .export_name(SIZE, ALL_FLAGS, true)
                .simple(c(1), 0)
                .simple(c(0), 0)
                .bytes(&pattern(3, 512, 1024))
                .simple(c(2), EIO)
                .build(),
        ),
    ));

    let structured_reads = Server::new()
        .data(c(0), false, 0, &pattern(1, 0, 1024))
        .hole(c(0), false, 1024, 2048)
        .data(c(0), true, 3072, &pattern(1, 3072, 1024))
        .data(c(1), false, 8704, &pattern(2, 8704, 512))
        .data(c(1), true, 8192, &pattern(2, 8192, 512))
        .simple(c(2), 0)
        .none(c(3))
        .build();
    let structured_ops = [
        op(OpKind::ReadStructured, 0, 4096),
        op(OpKind::Read, 8192, 1024),
        op(OpKind::Write, 0, 512),
        op(OpKind::Zero, 4096, 4096),
        op(OpKind::Disconnect, 0, 0),
    ];
    seeds.push((
        "fixed-go-structured-reads",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xa8, 3, 0),
            &structured_ops,
            &fixed_go().bytes(&structured_reads).build(),
        ),
    ));
    seeds.push((
        "fixed-go-structured-reads-bytewise",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0x00, 4, 0),
            &structured_ops,
            &fixed_go().bytes(&structured_reads).build(),
        ),
    ));

    seeds.push((
        "fixed-go-error-chunks",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xbc, 5, 0),
            &[
                op(OpKind::ReadStructured, 0, 512),
                op(OpKind::Read, 1024, 512),
                op(OpKind::Trim, 0, 512),
                op(OpKind::Cache, 0, 512),
                op(OpKind::ReadStructured, 4096, 512),
                op(OpKind::Read, 8192, 512),
            ],
            &fixed_go()
                .error(c(0), true, EIO, "bad sector", Some(100))
                .error(c(1), false, EPERM, "", None)
                .none(c(1))
                .simple(c(2), ENOSPC)
                .chunk(c(3), true, REPLY_TYPE_BLOCK_STATUS, &[0; 12])
                .data(c(4), false, 4096, &pattern(4, 4096, 512))
                .data(c(4), true, 4096, &pattern(4, 4096, 512))
                .hole(c(5), false, 8192, 512)
                .none(c(5))
                .build(),
        ),
    ));

    seeds.push((
        "opt-mode-list-info-go",
        encode(
            hdr(
                cfg::DEFAULT | cfg::OPT_MODE | cfg::FULL_INFO,
                STRICT_ALL,
                0xbb,
                6,
                0,
            ),
            &[
                op(OpKind::OptList, 0, 0),
                op(OpKind::OptInfo, 0, 0),
                op(OpKind::OptGo, 0, 0),
                op(OpKind::ReadStructured, 0, 64),
            ],
            &Server::new()
                .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .opt(OPT_STRUCTURED_REPLY, REP_ACK, b"")
                .server_entry("disk0", "first disk")
                .server_entry("disk1", "")
                .opt(OPT_LIST, REP_ACK, b"")
                .info(
                    OPT_INFO,
                    Info::Export {
                        size: SIZE,
                        flags: ALL_FLAGS,
                    },
                )
                .info(OPT_INFO, Info::Name("disk0".into()))
                .info(OPT_INFO, Info::Description("first disk".into()))
                .info(OPT_INFO, Info::Unknown(99))
                .opt(OPT_INFO, REP_ACK, b"")
                .go(OPT_GO, SIZE, ALL_FLAGS)
                .data(c(0), true, 0, &pattern(9, 0, 64))
                .build(),
        ),
    ));

    seeds.push((
        "opt-mode-refusals-abort",
        encode(
            hdr(cfg::DEFAULT | cfg::OPT_MODE, STRICT_ALL, 0xb7, 7, 0),
            &[
                op(OpKind::OptList, 0, 0),
                op(OpKind::OptStructuredReply, 0, 0),
                op(OpKind::OptGo, 0, 0),
                op(OpKind::OptAbort, 0, 0),
            ],
            &Server::new()
                .newstyle(FLAG_FIXED_NEWSTYLE)
                .opt(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"")
                .opt(OPT_LIST, REP_ERR_POLICY, b"no listing")
                .opt(OPT_STRUCTURED_REPLY, REP_ACK, b"")
                .opt(OPT_GO, REP_ERR_UNKNOWN, b"no such export")
                .opt(OPT_ABORT, REP_ACK, b"")
                .build(),
        ),
    ));

    seeds.push((
        "fixed-unsup-fallback-export-name",
        encode(
            hdr(cfg::DEFAULT & !cfg::NO_ZEROES, STRICT_ALL, 0x7a, 8, 0),
            &[op(OpKind::Read, 0, 256), op(OpKind::Flush, 0, 0)],
            &Server::new()
                .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .opt(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"")
                .opt(OPT_GO, REP_ERR_UNSUP, b"")
                .export_name(SIZE, ALL_FLAGS, true)
                .simple(c(0), 0)
                .bytes(&pattern(5, 0, 256))
                .simple(c(1), 0)
                .build(),
        ),
    ));

    seeds.push((
        "soft-shutdown-eshutdown",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xc9, 9, 0),
            &[op(OpKind::ReadStructured, 0, 128), op(OpKind::Flush, 0, 0)],
            &fixed_go()
                .simple(c(1), ESHUTDOWN)
                .data(c(0), true, 0, &pattern(6, 0, 128))
                .build(),
        ),
    ));

    seeds.push((
        "rep-err-shutdown-during-go",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0x55, 10, 0),
            &[],
            &Server::new()
                .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .opt(OPT_STRUCTURED_REPLY, REP_ACK, b"")
                .opt(OPT_GO, REP_ERR_SHUTDOWN, b"going down")
                .opt(OPT_ABORT, REP_ACK, b"")
                .build(),
        ),
    ));

    seeds.push((
        "bad-magic-after-ready",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xff, 11, 0),
            &[op(OpKind::Read, 0, 512)],
            &Server::new()
                .oldstyle(SIZE, ALL_FLAGS)
                .bytes(b"definitely not an NBD reply")
                .build(),
        ),
    ));

    let mut strict_off = [
        op(OpKind::Trim, 0xffff, 0xffff),
        op(OpKind::Cache, 0, 0),
        op(OpKind::Read, 0xfff0, 0x20),
        op(OpKind::Write, 0, 0),
    ];
    strict_off[0].modes = 1 | (2 << 2);
    strict_off[0].flags = 0xff;
    seeds.push((
        "strict-off-odd-commands",
        encode(
            hdr(cfg::DEFAULT, LOCKSTEP, 0x3c, 12, 0),
            &strict_off,
            &Server::new()
                .oldstyle(0x1_0000, FLAG_HAS_FLAGS)
                .simple(c(0), 0)
                .simple(c(1), EINVAL)
                .simple(c(2), 0)
                .bytes(&[0x42; 0x20])
                .simple(c(3), 0)
                .build(),
        ),
    ));

    seeds.push((
        "extended-meta-block-status",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xb9, 14, cfg2::DEFAULT),
            &[
                op(OpKind::BlockStatus, 0, 4096),
                op(OpKind::ReadStructured, 1024, 1024),
                op(OpKind::BlockStatusFilter, 512, 512),
                op(OpKind::Write, 0, 100),
                op(OpKind::Disconnect, 0, 0),
            ],
            &Server::new()
                .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .opt(OPT_EXTENDED_HEADERS, REP_ACK, b"")
                .meta_context(OPT_SET_META_CONTEXT, 1, "base:allocation")
                .opt(OPT_SET_META_CONTEXT, REP_ACK, b"")
                .go(OPT_GO, SIZE, ALL_FLAGS | FLAG_BLOCK_STATUS_PAYLOAD)
                .block_status(c(0), true, true, 0, 1, &[(1024, 0), (2048, 3), (8192, 0)])
                .ext_data(c(1), false, 1024, 1536, &pattern(2, 1536, 512))
                .ext_chunk(
                    c(1),
                    false,
                    REPLY_TYPE_OFFSET_HOLE,
                    1024,
                    &[0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 2, 0],
                )
                .ext_chunk(c(1), true, REPLY_TYPE_NONE, 1024, b"")
                .block_status(c(2), true, true, 512, 1, &[(512, 1)])
                .ext_chunk(c(3), true, REPLY_TYPE_NONE, 0, b"")
                .build(),
        ),
    ));

    seeds.push((
        "opt-mode-meta-contexts",
        encode(
            hdr(
                cfg::DEFAULT | cfg::OPT_MODE,
                STRICT_ALL,
                0xaa,
                15,
                cfg2::DEFAULT | cfg2::DIRTY_BITMAP,
            ),
            &[
                op(OpKind::OptListMetaContext, 0, 0),
                op(OpKind::OptSetMetaContext, 0, 0),
                op(OpKind::OptGo, 0, 0),
                op(OpKind::BlockStatus, 0, 65535),
            ],
            &Server::new()
                .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .opt(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, b"")
                .opt(OPT_STRUCTURED_REPLY, REP_ACK, b"")
                .meta_context(OPT_LIST_META_CONTEXT, 0, "base:allocation")
                .meta_context(OPT_LIST_META_CONTEXT, 0, "qemu:dirty-bitmap:b0")
                .opt(OPT_LIST_META_CONTEXT, REP_ACK, b"")
                .meta_context(OPT_SET_META_CONTEXT, 5, "base:allocation")
                .meta_context(OPT_SET_META_CONTEXT, 6, "qemu:dirty-bitmap:b0")
                .opt(OPT_SET_META_CONTEXT, REP_ACK, b"")
                .meta_context(OPT_SET_META_CONTEXT, 5, "base:allocation")
                .meta_context(OPT_SET_META_CONTEXT, 6, "qemu:dirty-bitmap:b0")
                .opt(OPT_SET_META_CONTEXT, REP_ACK, b"")
                .go(OPT_GO, SIZE, ALL_FLAGS)
                .block_status(c(0), false, false, 0, 6, &[(65535, 1)])
                .block_status(c(0), true, false, 0, 5, &[(4096, 0), (61439, 3)])
                .build(),
        ),
    ));

    seeds.push((
        "stale-cookie-after-completion",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0xbb, 13, 0),
            &[op(OpKind::Flush, 0, 0), op(OpKind::Flush, 0, 0)],
            &fixed_go()
                .simple(c(0), 0)
                .simple(c(1), 0)
                .simple(c(1), 0)
                .build(),
        ),
    ));

    // STARTTLS with TLS required: the acknowledgement in plaintext, then
    // everything through the testkit's toy session (XOR with its key). Fed a
    // byte at a time, so the client's first TLS message goes out before the
    // server's next byte arrives, as over a socket.
    let mut tls_stream = Server::new()
        .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .opt(OPT_STARTTLS, REP_ACK, b"")
        .build();
    tls_stream.extend(nbd_testkit::xor(
        &Server::new()
            .opt(OPT_STRUCTURED_REPLY, REP_ACK, b"")
            .go(OPT_GO, SIZE, ALL_FLAGS)
            .data(c(0), true, 0, &pattern(14, 0, 512))
            .build(),
    ));
    seeds.push((
        "starttls-required-go-read",
        encode(
            hdr(cfg::DEFAULT, STRICT_ALL, 0x00, 14, cfg2::TLS_REQUIRE),
            &[op(OpKind::Read, 0, 512), op(OpKind::Disconnect, 0, 0)],
            &tls_stream,
        ),
    ));

    seeds
}

fn issue(kind: IssueKind, offset: OffsetSel, length: LengthSel) -> Action {
    Action::Issue(Issue {
        kind,
        offset,
        length,
        flags: 0,
    })
}

fn chunk(target: u8, kind: ChunkKind, done: bool) -> Action {
    Action::Chunk(ChunkSpec {
        target: Target::Issued(target),
        kind,
        done,
        corrupt: Corrupt::None,
    })
}

fn simple(target: u8, error: u8, fill: u8) -> Action {
    Action::Simple(SimpleSpec {
        target: Target::Issued(target),
        error,
        fill,
        corrupt: Corrupt::None,
    })
}

fn setup(handshake: Handshake, split: u8, seed: u8) -> Setup {
    Setup {
        handshake,
        size: SizeSel::Bytes(SIZE as u32),
        transmission_flags: ALL_FLAGS,
        strict_off: 0,
        split,
        seed,
    }
}

fn go(structured: bool) -> Handshake {
    Handshake::FixedGo {
        extended: false,
        structured,
        meta: false,
        block_size: Some(BlockSizeSel {
            min_log2: 0,
            pref_log2: 12,
            maximum: 32 << 20,
        }),
        full_info: true,
    }
}

/// Seeds of the `structured` target, by name.
pub fn structured_seeds() -> Vec<(&'static str, StructuredInput)> {
    use ChunkKind::{Data, Hole};
    let extent = |length: ExtentLen, flags: u8| ExtentSpec { length, flags };
    let mut extended = setup(
        Handshake::FixedGo {
            extended: true,
            structured: true,
            meta: true,
            block_size: None,
            full_info: false,
        },
        0x9a,
        9,
    );
    extended.transmission_flags |= FLAG_BLOCK_STATUS_PAYLOAD;
    vec![
        (
            "go-structured-data-holes",
            StructuredInput {
                setup: setup(go(true), 0xa6, 1),
                actions: vec![
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Small(0),
                        LengthSel::Small(4096),
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Next,
                            len: ChunkLen::Exact(1000),
                            fill: 1,
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Hole {
                            at: At::Next,
                            len: ChunkLen::Exact(2000),
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Next,
                            len: ChunkLen::Rest,
                            fill: 2,
                        },
                        true,
                    ),
                    issue(IssueKind::Read, OffsetSel::Blocks(16), LengthSel::Blocks(2)),
                    chunk(
                        0,
                        Data {
                            at: At::Rel(512),
                            len: ChunkLen::Rest,
                            fill: 3,
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Rel(0),
                            len: ChunkLen::Exact(512),
                            fill: 4,
                        },
                        true,
                    ),
                    issue(IssueKind::Write, OffsetSel::Small(0), LengthSel::Small(300)),
                    simple(0, 0, 0),
                    issue(IssueKind::Flush, OffsetSel::Small(0), LengthSel::Small(0)),
                    chunk(0, ChunkKind::None, true),
                    issue(
                        IssueKind::Disconnect,
                        OffsetSel::Small(0),
                        LengthSel::Small(0),
                    ),
                    Action::Eof,
                ],
            },
        ),
        (
            "oldstyle-simple-replies",
            StructuredInput {
                setup: setup(Handshake::Oldstyle, 0x5c, 2),
                actions: vec![
                    issue(
                        IssueKind::Read,
                        OffsetSel::Small(100),
                        LengthSel::Small(1000),
                    ),
                    issue(IssueKind::Trim, OffsetSel::Blocks(8), LengthSel::Blocks(8)),
                    issue(
                        IssueKind::Read,
                        OffsetSel::FromEnd(512),
                        LengthSel::Small(512),
                    ),
                    simple(0, 0, 9),
                    simple(2, 0, 8),
                    simple(1, 5, 0),
                    issue(IssueKind::Zero, OffsetSel::Small(0), LengthSel::Small(10)),
                    simple(0, 28, 0),
                ],
            },
        ),
        (
            "go-structured-errors",
            StructuredInput {
                setup: setup(go(true), 0x88, 3),
                actions: vec![
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Small(0),
                        LengthSel::Small(512),
                    ),
                    chunk(
                        0,
                        ChunkKind::Error {
                            error: 5,
                            message_len: 9,
                            at: Some(At::Rel(100)),
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Rel(0),
                            len: ChunkLen::Rest,
                            fill: 1,
                        },
                        true,
                    ),
                    issue(
                        IssueKind::Read,
                        OffsetSel::Small(512),
                        LengthSel::Small(512),
                    ),
                    chunk(
                        0,
                        ChunkKind::Error {
                            error: 1,
                            message_len: 0,
                            at: None,
                        },
                        true,
                    ),
                    issue(IssueKind::Cache, OffsetSel::Small(0), LengthSel::Small(512)),
                    chunk(
                        0,
                        ChunkKind::Other {
                            chunk_type: 5,
                            payload_len: 12,
                        },
                        true,
                    ),
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Small(0),
                        LengthSel::Small(64),
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Rel(0),
                            len: ChunkLen::Exact(32),
                            fill: 5,
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Rel(16),
                            len: ChunkLen::Exact(48),
                            fill: 5,
                        },
                        true,
                    ),
                    chunk(3, ChunkKind::None, true),
                ],
            },
        ),
        (
            "newstyle-no-zeroes",
            StructuredInput {
                setup: setup(Handshake::Newstyle { no_zeroes: true }, 0x49, 4),
                actions: vec![
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Small(7),
                        LengthSel::Small(77),
                    ),
                    simple(0, 0, 7),
                    issue(
                        IssueKind::Disconnect,
                        OffsetSel::Small(0),
                        LengthSel::Small(0),
                    ),
                ],
            },
        ),
        (
            "export-name-fallback-structured",
            StructuredInput {
                setup: setup(
                    Handshake::FixedExportName {
                        structured: true,
                        no_zeroes: false,
                    },
                    0x3b,
                    5,
                ),
                actions: vec![
                    issue(IssueKind::Read, OffsetSel::Small(0), LengthSel::Blocks(4)),
                    chunk(
                        0,
                        Hole {
                            at: At::Next,
                            len: ChunkLen::Exact(1024),
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Next,
                            len: ChunkLen::Rest,
                            fill: 6,
                        },
                        false,
                    ),
                    chunk(0, ChunkKind::None, true),
                ],
            },
        ),
        (
            "soft-shutdown",
            StructuredInput {
                setup: setup(go(true), 0xcd, 6),
                actions: vec![
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Small(0),
                        LengthSel::Small(256),
                    ),
                    issue(IssueKind::Write, OffsetSel::Small(0), LengthSel::Small(256)),
                    simple(0, 108, 0),
                    chunk(
                        1,
                        Data {
                            at: At::Next,
                            len: ChunkLen::Rest,
                            fill: 2,
                        },
                        true,
                    ),
                    issue(IssueKind::Flush, OffsetSel::Small(0), LengthSel::Small(0)),
                ],
            },
        ),
        (
            "corrupted-replies",
            StructuredInput {
                setup: setup(go(true), 0x77, 7),
                actions: vec![
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Small(0),
                        LengthSel::Small(512),
                    ),
                    issue(
                        IssueKind::Read,
                        OffsetSel::Small(512),
                        LengthSel::Small(512),
                    ),
                    Action::Chunk(ChunkSpec {
                        target: Target::Issued(1),
                        kind: Data {
                            at: At::Next,
                            len: ChunkLen::Rest,
                            fill: 1,
                        },
                        done: true,
                        corrupt: Corrupt::Flip { at: 19, xor: 1 },
                    }),
                    Action::Chunk(ChunkSpec {
                        target: Target::Issued(0),
                        kind: Hole {
                            at: At::Next,
                            len: ChunkLen::Rest,
                        },
                        done: true,
                        corrupt: Corrupt::Truncate(3),
                    }),
                    Action::Garbage {
                        bytes: *b"\x66\x8e\x33\xef",
                        len: 4,
                    },
                ],
            },
        ),
        (
            "extended-block-status-reads",
            StructuredInput {
                setup: extended,
                actions: vec![
                    issue(
                        IssueKind::BlockStatus,
                        OffsetSel::Small(0),
                        LengthSel::Small(8192),
                    ),
                    chunk(
                        0,
                        ChunkKind::BlockStatus {
                            context: None,
                            count: 2,
                            extents: [
                                extent(ExtentLen::Exact(4096), 3),
                                extent(ExtentLen::Rest, 0),
                                extent(ExtentLen::Rest, 0),
                            ],
                            wrong_width: false,
                        },
                        true,
                    ),
                    issue(
                        IssueKind::ReadStructured,
                        OffsetSel::Blocks(2),
                        LengthSel::Blocks(4),
                    ),
                    chunk(
                        0,
                        Hole {
                            at: At::Next,
                            len: ChunkLen::Exact(512),
                        },
                        false,
                    ),
                    chunk(
                        0,
                        Data {
                            at: At::Next,
                            len: ChunkLen::Rest,
                            fill: 3,
                        },
                        true,
                    ),
                    issue(
                        IssueKind::BlockStatusFilter,
                        OffsetSel::Small(0),
                        LengthSel::Small(512),
                    ),
                    chunk(
                        0,
                        ChunkKind::BlockStatus {
                            context: None,
                            count: 1,
                            extents: [extent(ExtentLen::Rest, 1); 3],
                            wrong_width: false,
                        },
                        true,
                    ),
                    issue(IssueKind::Trim, OffsetSel::Small(0), LengthSel::Small(512)),
                    chunk(0, ChunkKind::None, true),
                    issue(
                        IssueKind::Disconnect,
                        OffsetSel::Small(0),
                        LengthSel::Small(0),
                    ),
                ],
            },
        ),
        (
            "plain-go-no-structured",
            StructuredInput {
                setup: setup(
                    Handshake::FixedGo {
                        extended: false,
                        structured: false,
                        meta: false,
                        block_size: None,
                        full_info: false,
                    },
                    0x2f,
                    8,
                ),
                actions: vec![
                    issue(IssueKind::Read, OffsetSel::Small(0), LengthSel::Blocks(200)),
                    simple(0, 0, 11),
                    issue(IssueKind::Write, OffsetSel::Blocks(1), LengthSel::Small(1)),
                    issue(IssueKind::Read, OffsetSel::Small(0), LengthSel::Small(1)),
                    simple(0, 0, 0),
                    simple(1, 0, 0),
                    chunk(
                        0,
                        Data {
                            at: At::Next,
                            len: ChunkLen::Rest,
                            fill: 1,
                        },
                        true,
                    ),
                ],
            },
        ),
    ]
}
