//! Hostile servers end in bounded time.
//!
//! Every way a server can break the protocol, as one list of scenarios: a
//! starting point (a command or an option in flight), the server's bad bytes,
//! and the outcome the client must have reported. Each scenario is fed whole,
//! in random pieces, one byte at a time and through the zero-copy path, and the
//! server then goes quiet: no more bytes, no end of stream. The outcome (the
//! connection dead, or the one command or option failed) must already be there.
//!
//! Where a scenario gives a decisive prefix, the outcome must be reached once
//! that prefix is in, before any of the bytes after it: a length that no legal
//! reply allows ends the connection right after the header that announced it,
//! with no payload read or skipped.

mod support;

use nbd_proto::wire::consts::*;
use nbd_proto::wire::OptionReplyHeader;
use nbd_proto::{
    CmdFlags, Connection, Cookie, Errno, Event, MAX_ERROR_PAYLOAD, MAX_STATUS_PAYLOAD,
};
use support::*;

const V_OFF: u64 = 4096;
const V_LEN: usize = 512;
const BASE: &str = "base:allocation";
const BASE_ID: u32 = 7;
/// A compact structured chunk header.
const CHUNK: usize = STRUCTURED_REPLY_LEN;
/// An extended chunk header.
const EXT_CHUNK: usize = EXTENDED_REPLY_LEN;
/// An option reply header.
const OPT: usize = OptionReplyHeader::LEN;
const FOUR_GIB: u64 = u32::MAX as u64;

/// Where a scenario starts. The cookies in flight are listed victim first.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// Structured replies, compact headers: a 512-byte read at 4096, a flush.
    Read,
    /// The same without structured replies.
    ReadSimple,
    /// Extended headers: a 512-byte read at 4096, a flush.
    ReadExtended,
    /// Structured replies: a flush, a 512-byte read at 0.
    Flush,
    /// Structured replies, `base:allocation` negotiated: block status of 4096
    /// bytes at 0, a flush.
    BlockStatus,
    /// Nothing received yet.
    Greeting,
    /// The automatic handshake, `NBD_OPT_GO` in flight.
    Go,
    /// Opt mode, waiting for the caller: no option in flight.
    Negotiating,
    /// Opt mode, `NBD_OPT_LIST` in flight.
    OptList,
    /// Opt mode, `NBD_OPT_LIST_META_CONTEXT` in flight.
    OptListMeta,
    /// Opt mode, `NBD_OPT_INFO` in flight.
    OptInfo,
}

/// What the client must have reported once the bad bytes are in.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The connection is dead with this kind; every command completed once.
    Dead(Errno),
    /// Only the victim completed, with this kind; the connection works on.
    VictimFailed(Errno),
    /// The option in flight failed with this kind; still negotiating.
    OptionFailed(Errno),
    /// The server refused with `NBD_REP_ERR_SHUTDOWN`: the client's abort is
    /// queued, and writing it (no input needed) ends the connection with this kind.
    DeadOnceWritten(Errno),
}

struct Scenario {
    name: &'static str,
    start: Start,
    /// The server's bytes, given the cookies in flight (victim first).
    bytes: fn(&[Cookie]) -> Vec<u8>,
    /// How many of the bytes must suffice for the outcome (`None`: all).
    decisive: Option<usize>,
    outcome: Outcome,
}

use Outcome::*;

fn s() -> Script {
    Script::new()
}

/// A chunk header announcing `length`, followed by `tail` bytes of payload.
fn header_then(cookie: Cookie, chunk_type: u16, length: u64, tail: usize) -> Vec<u8> {
    let mut s = s();
    s.chunk_header(cookie.get(), REPLY_FLAG_DONE, chunk_type, length);
    s.raw(&pattern(tail, 9));
    s.take()
}

/// An option reply header announcing `length`, followed by `tail` bytes.
fn opt_header_then(option: u32, reply_type: u32, length: u32, tail: usize) -> Vec<u8> {
    let mut out = Vec::new();
    OptionReplyHeader {
        option,
        reply_type,
        length,
    }
    .encode(&mut out);
    out.extend_from_slice(&pattern(tail, 3));
    out
}

fn scenarios() -> Vec<Scenario> {
    vec![
        // ------------------------------------------------ framing lost
        Scenario {
            name: "bad reply magic",
            start: Start::Read,
            bytes: |_| pattern(16, 0x12),
            decisive: Some(4),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "simple reply for an unknown cookie",
            start: Start::Read,
            bytes: |_| s().simple_raw(0xdead_beef, 0, &[]).take(),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "chunk for an unknown cookie",
            start: Start::Read,
            bytes: |_| {
                s().chunk_header(0xdead_beef, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
                    .take()
            },
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "chunk after the DONE chunk",
            start: Start::Read,
            bytes: |c| s().data(c[0], V_OFF, &[1; V_LEN], true).none(c[0]).take(),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "structured chunk without structured replies",
            start: Start::ReadSimple,
            bytes: |c| s().none(c[0]).take(),
            decisive: Some(4),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "extended reply where compact headers were negotiated",
            start: Start::Read,
            bytes: |c| s().ext_none(c[1], 0).take(),
            decisive: Some(4),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "compact reply where extended headers were negotiated",
            start: Start::ReadExtended,
            bytes: |c| s().simple(c[1], 0, &[]).take(),
            decisive: Some(4),
            outcome: Dead(Errno::Proto),
        },
        // ------------------------------------------------ the length rule
        Scenario {
            name: "OFFSET_DATA claiming 4 GiB for a 512-byte read",
            start: Start::Read,
            bytes: |c| header_then(c[0], REPLY_TYPE_OFFSET_DATA, FOUR_GIB, 8 + 20),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_DATA one byte longer than its read allows",
            start: Start::Read,
            bytes: |c| header_then(c[0], REPLY_TYPE_OFFSET_DATA, 8 + V_LEN as u64 + 1, 8 + 512),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "extended OFFSET_DATA claiming 2^64-1 bytes",
            start: Start::ReadExtended,
            bytes: |c| {
                s().ext_chunk_header(
                    c[0].get(),
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    V_OFF,
                    u64::MAX,
                )
                .raw(&V_OFF.to_be_bytes())
                .take()
            },
            decisive: Some(EXT_CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_HOLE longer than 12 bytes",
            start: Start::Read,
            bytes: |c| header_then(c[0], REPLY_TYPE_OFFSET_HOLE, 13, 13),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_HOLE claiming 4 GiB",
            start: Start::Read,
            bytes: |c| header_then(c[0], REPLY_TYPE_OFFSET_HOLE, FOUR_GIB, 12),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "NONE with a payload",
            start: Start::Flush,
            bytes: |c| header_then(c[0], REPLY_TYPE_NONE, 5, 5),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "ERROR chunk beyond what a 16-bit message length allows",
            start: Start::Read,
            bytes: |c| header_then(c[0], REPLY_TYPE_ERROR, MAX_ERROR_PAYLOAD + 1, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "ERROR_OFFSET chunk claiming 4 GiB to a flush",
            start: Start::Flush,
            bytes: |c| header_then(c[0], REPLY_TYPE_ERROR_OFFSET, FOUR_GIB, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "unknown chunk type beyond the read's largest legal chunk",
            start: Start::Read,
            bytes: |c| header_then(c[0], 77, MAX_ERROR_PAYLOAD + 1, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "block status chunk of 1 MiB to a read",
            start: Start::Read,
            bytes: |c| header_then(c[0], REPLY_TYPE_BLOCK_STATUS, 1 << 20, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_DATA to a flush beyond any flush reply",
            start: Start::Flush,
            bytes: |c| header_then(c[0], REPLY_TYPE_OFFSET_DATA, MAX_ERROR_PAYLOAD + 1, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "block status chunk beyond MAX_STATUS_PAYLOAD",
            start: Start::BlockStatus,
            bytes: |c| header_then(c[0], REPLY_TYPE_BLOCK_STATUS, MAX_STATUS_PAYLOAD + 1, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "block status chunk with more descriptors than bytes asked about",
            start: Start::BlockStatus,
            // 4096 bytes allow 4097 descriptors at most.
            bytes: |c| header_then(c[0], REPLY_TYPE_BLOCK_STATUS, 4 + 8 * 4098, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "block status chunk with one descriptor per byte asked about, plus one",
            start: Start::BlockStatus,
            // Within the limit, so framing holds; the extents run past the request.
            bytes: |c| {
                let mut pairs = vec![(1, 0); 4097];
                pairs[0] = (2, 0);
                s().block_status(c[0], true, BASE_ID, &pairs).take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_DATA to block status beyond its largest legal chunk",
            start: Start::BlockStatus,
            bytes: |c| header_then(c[0], REPLY_TYPE_OFFSET_DATA, MAX_STATUS_PAYLOAD + 1, 100),
            decisive: Some(CHUNK),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "extended BLOCK_STATUS_EXT claiming 4 GiB to a read",
            start: Start::ReadExtended,
            bytes: |c| {
                s().ext_chunk_header(
                    c[0].get(),
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    V_OFF,
                    FOUR_GIB,
                )
                .raw(&[0; 40])
                .take()
            },
            decisive: Some(EXT_CHUNK),
            outcome: Dead(Errno::Proto),
        },
        // ------------------------------------------------ confined to one reply
        Scenario {
            name: "data chunk outside its request",
            start: Start::Read,
            bytes: |c| {
                s().data(c[0], V_OFF + 512, &[1; 16], false)
                    .none(c[0])
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "hole chunk outside its request",
            start: Start::Read,
            bytes: |c| s().hole(c[0], V_OFF + 256, 512, true).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "overlapping chunks",
            start: Start::Read,
            bytes: |c| {
                s().data(c[0], V_OFF, &[1; 256], false)
                    .hole(c[0], V_OFF + 128, 256, true)
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "read reply ending without covering the read",
            start: Start::Read,
            bytes: |c| s().none(c[0]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "NONE without DONE",
            start: Start::Read,
            bytes: |c| s().chunk(c[0], false, REPLY_TYPE_NONE, &[]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_DATA too short for its offset",
            start: Start::Read,
            bytes: |c| {
                s().chunk(c[0], true, REPLY_TYPE_OFFSET_DATA, &[0; 5])
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_HOLE shorter than 12 bytes",
            start: Start::Read,
            bytes: |c| {
                s().chunk(c[0], true, REPLY_TYPE_OFFSET_HOLE, &[0; 11])
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "unknown chunk type within the read's limit",
            start: Start::Read,
            bytes: |c| s().chunk(c[0], true, 77, &pattern(300, 1)).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "block status chunk in a reply to a read",
            start: Start::Read,
            bytes: |c| {
                s().chunk(c[0], true, REPLY_TYPE_BLOCK_STATUS, &[0; 12])
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "OFFSET_DATA in a reply to a flush",
            start: Start::Flush,
            bytes: |c| s().data(c[0], 0, &[9; 512], true).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "error chunk with error value 0",
            start: Start::Read,
            bytes: |c| s().error_chunk(c[0], 0, "no error?", None, true).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "error chunk whose message overruns it",
            start: Start::Read,
            bytes: |c| {
                let mut payload = EIO.to_be_bytes().to_vec();
                payload.extend_from_slice(&100u16.to_be_bytes());
                payload.extend_from_slice(b"only ten b");
                s().chunk(c[0], true, REPLY_TYPE_ERROR, &payload).take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "error offset outside the request",
            start: Start::Read,
            bytes: |c| {
                s().error_chunk(c[0], EIO, "", Some(V_OFF + V_LEN as u64), true)
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "simple reply to a read after structured replies",
            start: Start::Read,
            bytes: |c| s().simple(c[0], 0, &[3; V_LEN]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "extended reply naming the wrong offset",
            start: Start::ReadExtended,
            bytes: |c| {
                s().ext_data(c[0], V_OFF + 1, V_OFF, &[1; V_LEN], true)
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "empty block status chunk",
            start: Start::BlockStatus,
            bytes: |c| s().chunk(c[0], true, REPLY_TYPE_BLOCK_STATUS, &[]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "block status chunk not 4 + 8n bytes",
            start: Start::BlockStatus,
            bytes: |c| {
                s().chunk(c[0], true, REPLY_TYPE_BLOCK_STATUS, &[0; 15])
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "block status for an unknown context",
            start: Start::BlockStatus,
            bytes: |c| s().block_status(c[0], true, 99, &[(4096, 0)]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "block status reply without the context asked about",
            start: Start::BlockStatus,
            bytes: |c| s().none(c[0]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        Scenario {
            name: "64-bit block status without extended headers",
            start: Start::BlockStatus,
            bytes: |c| {
                let payload = status_payload(true, BASE_ID, &[(4096, 0)]);
                s().chunk(c[0], true, REPLY_TYPE_BLOCK_STATUS_EXT, &payload)
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Proto),
        },
        // ------------------------------------------------ server errors
        Scenario {
            name: "server error chunk",
            start: Start::Read,
            bytes: |c| s().error_chunk(c[0], EIO, "bad sector", None, true).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Io),
        },
        Scenario {
            name: "unknown error chunk type",
            start: Start::Read,
            bytes: |c| {
                let mut payload = EIO.to_be_bytes().to_vec();
                payload.extend_from_slice(&0u16.to_be_bytes());
                s().chunk(c[0], true, REPLY_TYPE_FLAG_ERROR | 9, &payload)
                    .take()
            },
            decisive: None,
            outcome: VictimFailed(Errno::Io),
        },
        Scenario {
            name: "server error simple reply",
            start: Start::ReadSimple,
            bytes: |c| s().simple(c[0], EIO, &[]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Io),
        },
        Scenario {
            name: "server shutting down",
            start: Start::Flush,
            bytes: |c| s().simple(c[0], ESHUTDOWN, &[]).take(),
            decisive: None,
            outcome: VictimFailed(Errno::Shutdown),
        },
        // ------------------------------------------------ handshake
        Scenario {
            name: "bad greeting magic",
            start: Start::Greeting,
            bytes: |_| pattern(18, 0x55),
            decisive: Some(16),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "option reply with a bad magic",
            start: Start::Go,
            bytes: |_| pattern(OPT, 0x66),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "option reply for another option",
            start: Start::Go,
            bytes: |_| s().ack(OPT_LIST).take(),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "option reply claiming 4 GiB",
            start: Start::Go,
            bytes: |_| opt_header_then(OPT_GO, REP_INFO, u32::MAX, 12),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "INFO reply beyond what is buffered",
            start: Start::Go,
            bytes: |_| opt_header_then(OPT_GO, REP_INFO, 16 * 1024 + 1, 12),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "ACK with a payload",
            start: Start::Go,
            bytes: |_| opt_header_then(OPT_GO, REP_ACK, 4, 4),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "reply type the option cannot have",
            start: Start::Go,
            bytes: |_| s().server_entry("x", "").take(),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "option error with a message over 4096 bytes",
            start: Start::Go,
            bytes: |_| opt_header_then(OPT_GO, REP_ERR_UNKNOWN, 4097, 4097),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "truncated INFO_EXPORT",
            start: Start::Go,
            bytes: |_| s().opt_reply(OPT_GO, REP_INFO, &[0, 0, 1, 2]).take(),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "GO acknowledged without INFO_EXPORT",
            start: Start::Go,
            bytes: |_| s().ack(OPT_GO).take(),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "automatic GO refused",
            start: Start::Go,
            bytes: |_| {
                s().opt_error(OPT_GO, REP_ERR_UNKNOWN, "no such export")
                    .take()
            },
            decisive: None,
            outcome: Dead(Errno::NoEnt),
        },
        Scenario {
            name: "automatic GO refused because the server shuts down",
            start: Start::Go,
            bytes: |_| s().opt_error(OPT_GO, REP_ERR_SHUTDOWN, "bye").take(),
            decisive: None,
            outcome: DeadOnceWritten(Errno::Shutdown),
        },
        Scenario {
            name: "export entry beyond two strings",
            start: Start::OptList,
            bytes: |_| opt_header_then(OPT_LIST, REP_SERVER, 4 + 2 * 4096 + 1, 10),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "export entry whose name overruns it",
            start: Start::OptList,
            bytes: |_| {
                s().opt_reply(OPT_LIST, REP_SERVER, &[0, 0, 0, 100, 1, 2])
                    .take()
            },
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "meta context reply beyond one name",
            start: Start::OptListMeta,
            bytes: |_| opt_header_then(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, 4 + 4096 + 1, 10),
            decisive: Some(OPT),
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "malformed meta context reply",
            start: Start::OptListMeta,
            bytes: |_| {
                s().opt_reply(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, &[0, 0, 1])
                    .take()
            },
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "option reply while no option is in flight",
            start: Start::Negotiating,
            bytes: |_| s().ack(OPT_LIST).take(),
            decisive: None,
            outcome: Dead(Errno::Proto),
        },
        Scenario {
            name: "LIST refused",
            start: Start::OptList,
            bytes: |_| s().opt_error(OPT_LIST, REP_ERR_POLICY, "no").take(),
            decisive: None,
            outcome: OptionFailed(Errno::Perm),
        },
        Scenario {
            name: "INFO refused",
            start: Start::OptInfo,
            bytes: |_| s().opt_error(OPT_INFO, REP_ERR_UNKNOWN, "").take(),
            decisive: None,
            outcome: OptionFailed(Errno::NoEnt),
        },
    ]
}

// ---------------------------------------------------------------- starting points

/// A connection in opt mode, negotiating, structured replies acknowledged.
fn negotiating() -> Connection {
    let mut conn = Connection::new(compact().opt_mode(true));
    feed(
        &mut conn,
        &s().newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .ack(OPT_STRUCTURED_REPLY)
            .take(),
    );
    let _ = conn.take_output();
    assert!(conn.is_negotiating());
    drain(&mut conn);
    conn
}

fn start(at: Start) -> (Connection, Vec<Cookie>) {
    let read_then_flush = |mut conn: Connection| {
        let read = conn
            .pread(buffer(V_LEN, 0xff), V_OFF, CmdFlags::empty())
            .unwrap();
        let flush = conn.flush(CmdFlags::empty()).unwrap();
        (conn, vec![read, flush])
    };
    let (mut conn, cookies) = match at {
        Start::Read => read_then_flush(ready(Export::default())),
        Start::ReadSimple => read_then_flush(ready(Export::simple())),
        Start::ReadExtended => read_then_flush(ready(Export {
            extended: true,
            ..Export::default()
        })),
        Start::Flush => {
            let mut conn = ready(Export::default());
            let flush = conn.flush(CmdFlags::empty()).unwrap();
            let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
            (conn, vec![flush, read])
        }
        Start::BlockStatus => {
            let config = compact().meta_context(BASE);
            let mut conn = handshake_meta(config, Export::default(), &[(BASE_ID, BASE)]);
            let status = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
            let flush = conn.flush(CmdFlags::empty()).unwrap();
            (conn, vec![status, flush])
        }
        Start::Greeting => (Connection::new(compact()), vec![]),
        Start::Go => {
            let mut conn = Connection::new(compact());
            feed(
                &mut conn,
                &s().newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
            );
            let _ = conn.take_output();
            feed(&mut conn, &s().ack(OPT_STRUCTURED_REPLY).take());
            let options = parse_options(&conn.take_output());
            assert_eq!(options[0].option, OPT_GO);
            (conn, vec![])
        }
        Start::Negotiating => (negotiating(), vec![]),
        Start::OptList => {
            let mut conn = negotiating();
            conn.opt_list().unwrap();
            (conn, vec![])
        }
        Start::OptListMeta => {
            let mut conn = negotiating();
            conn.opt_list_meta_context().unwrap();
            (conn, vec![])
        }
        Start::OptInfo => {
            let mut conn = negotiating();
            conn.opt_info().unwrap();
            (conn, vec![])
        }
    };
    let _ = conn.take_output();
    assert!(drain(&mut conn).is_empty());
    (conn, cookies)
}

/// Correct replies to the commands after the victim, for a connection started at `at`.
fn bystander_replies(at: Start, bystanders: &[Cookie]) -> Vec<u8> {
    let mut s = s();
    for &c in bystanders {
        match at {
            Start::Flush => s.data(c, 0, &[4; 512], true),
            Start::ReadExtended => s.ext_none(c, 0),
            _ => s.simple(c, 0, &[]),
        };
    }
    s.take()
}

// ---------------------------------------------------------------- feeding

#[derive(Debug, Clone, Copy)]
enum Feed {
    Whole,
    Pieces(u64),
    ByteAtATime,
    ZeroCopy(u64),
}

/// Feeds `bytes` as `how` says, stopping where the connection takes no more.
fn feed_as(conn: &mut Connection, bytes: &[u8], how: Feed) {
    if bytes.is_empty() {
        return;
    }
    let input = |conn: &mut Connection, piece: &[u8]| {
        if let Err(e) = conn.handle_input(piece) {
            assert_eq!(conn.error(), Some(&e), "only death is an error");
        }
    };
    match how {
        Feed::Whole => input(conn, bytes),
        Feed::ByteAtATime => bytes.chunks(1).for_each(|b| input(conn, b)),
        Feed::Pieces(seed) => {
            let mut rng = Rng::new(seed);
            let mut rest = bytes;
            while !rest.is_empty() {
                let n = (rng.between(1, 64) as usize).min(rest.len());
                input(conn, &rest[..n]);
                rest = &rest[n..];
            }
        }
        Feed::ZeroCopy(seed) => {
            let mut rng = Rng::new(seed);
            let mut rest = bytes;
            while !rest.is_empty() {
                let want = rng.between(1, 700) as usize;
                let buf = conn.recv_buf();
                if buf.is_empty() {
                    break;
                }
                let n = want.min(buf.len()).min(rest.len());
                buf[..n].copy_from_slice(&rest[..n]);
                conn.notify_read(n).unwrap();
                rest = &rest[n..];
            }
        }
    }
}

// ---------------------------------------------------------------- checking

fn check(sc: &Scenario, conn: &mut Connection, events: &[Event], cookies: &[Cookie], how: Feed) {
    let ctx = format!("{} ({how:?})", sc.name);
    match sc.outcome {
        Dead(errno) => {
            assert!(conn.is_dead(), "{ctx}: not dead: {events:?}");
            assert_dead(conn, events, errno);
            assert_completed_once(events, cookies);
        }
        VictimFailed(errno) => {
            assert!(conn.is_ready(), "{ctx}: {:?}", conn.error());
            let done: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Completed(c) => Some(c),
                    _ => None,
                })
                .collect();
            assert_eq!(
                done.len(),
                1,
                "{ctx}: only the victim completes: {events:?}"
            );
            assert_eq!(done[0].cookie, cookies[0], "{ctx}");
            assert_eq!(
                errno_of(&done[0].result),
                errno,
                "{ctx}: {:?}",
                done[0].result
            );
            assert_eq!(conn.in_flight(), cookies.len() - 1, "{ctx}");
            // And the connection works on: the others complete correctly.
            let replies = bystander_replies(sc.start, &cookies[1..]);
            feed(conn, &replies);
            let rest = completions(drain(conn));
            assert_eq!(rest.len(), cookies.len() - 1, "{ctx}");
            for c in rest {
                assert!(c.result.is_ok(), "{ctx}: {:?}", c.result);
            }
        }
        DeadOnceWritten(errno) => {
            assert!(events.is_empty(), "{ctx}: {events:?}");
            let sent = parse_options(&conn.take_output());
            assert_eq!(sent.len(), 1, "{ctx}");
            assert_eq!(sent[0].option, OPT_ABORT, "{ctx}");
            let events = drain(conn);
            assert_dead(conn, &events, errno);
        }
        OptionFailed(errno) => {
            assert!(conn.is_negotiating(), "{ctx}: {:?}", conn.phase());
            let failed: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    Event::OptionDone { result: Err(e), .. } => Some(e.errno()),
                    _ => None,
                })
                .collect();
            assert_eq!(failed, vec![errno], "{ctx}: {events:?}");
        }
    }
}

fn run(sc: &Scenario, how: Feed) {
    let (mut conn, cookies) = start(sc.start);
    let bytes = (sc.bytes)(&cookies);
    let decisive = sc.decisive.unwrap_or(bytes.len());
    assert!(
        decisive <= bytes.len(),
        "{}: decisive prefix too long",
        sc.name
    );
    feed_as(&mut conn, &bytes[..decisive], how);
    // The server goes quiet here: no more bytes, no end of stream.
    let events = drain(&mut conn);
    check(sc, &mut conn, &events, &cookies, how);
    if conn.is_dead() {
        // What the server sends after the decisive prefix changes nothing.
        feed_as(&mut conn, &bytes[decisive..], how);
        assert!(
            drain(&mut conn).is_empty(),
            "{}: events after death",
            sc.name
        );
    }
}

#[test]
fn every_hostile_scenario_is_reported_without_further_input() {
    let list = scenarios();
    assert!(list.len() >= 50, "the list shrank: {}", list.len());
    for sc in &list {
        for how in [
            Feed::Whole,
            Feed::Pieces(1),
            Feed::Pieces(7),
            Feed::ByteAtATime,
            Feed::ZeroCopy(3),
        ] {
            run(sc, how);
        }
    }
}

#[test]
fn each_decisive_prefix_is_needed_whole() {
    // The outcome comes exactly at the decisive prefix: one byte short of it,
    // nothing is decided yet (the checks are not satisfied early by accident).
    for sc in scenarios() {
        let (mut conn, cookies) = start(sc.start);
        let bytes = (sc.bytes)(&cookies);
        let decisive = sc.decisive.unwrap_or(bytes.len());
        feed_as(&mut conn, &bytes[..decisive - 1], Feed::Whole);
        let events = drain(&mut conn);
        let reported = events.iter().any(|e| {
            matches!(
                e,
                Event::Closed { .. } | Event::OptionDone { result: Err(_), .. }
            ) || matches!(e, Event::Completed(c) if c.result.is_err())
        });
        assert!(
            !reported,
            "{}: decided before its last byte: {events:?}",
            sc.name
        );
    }
}

#[test]
fn a_4_gib_data_chunk_for_a_512_byte_read_kills_right_after_its_header() {
    // The case that left `nbd dump` waiting forever: a few payload bytes, then
    // silence. The header alone must end it.
    let mut conn = ready(Export::default());
    let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let other = conn.pread(buffer(512, 0), 512, CmdFlags::empty()).unwrap();
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let mut s = s();
    s.chunk_header(
        read.get(),
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        FOUR_GIB - 1,
    );
    let header = s.take();
    assert_eq!(header.len(), CHUNK);
    feed(&mut conn, &header);
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert_completed_once(&events, &[read, other, flush]);
    for c in completions(events) {
        let e = c.result.unwrap_err();
        assert_eq!(e.errno(), Errno::NotConn);
        assert!(e.to_string().contains("framing"), "{e}");
        assert_eq!(
            c.buffer.map(|b| b.len()),
            (c.cookie != flush).then_some(512)
        );
    }
    // The few bytes that follow are not read into anything.
    assert!(conn.handle_input(&0u64.to_be_bytes()).is_err());
    assert!(drain(&mut conn).is_empty());
}
