//! Extended headers: their negotiation, the 32-byte requests, the rule that
//! every reply is an extended chunk echoing its request's offset, the 64-bit
//! lengths they allow, and split invariance of a transcript that uses them.

mod support;

use bytes::{Bytes, BytesMut};
use nbd_proto::wire::consts::*;
use nbd_proto::wire::RequestHeader;
use nbd_proto::{
    CmdFlags, Config, Connection, Cookie, Errno, Error, Event, NbdOption, ReadChunk, Strict,
    MAX_REQUEST_SIZE,
};
use proptest::prelude::*;
use support::Rng;
use support::*;

const BASE: &str = "base:allocation";
const DIRTY: &str = "qemu:dirty-bitmap:bm0";
const BASE_ID: u32 = 21;
const DIRTY_ID: u32 = 4;

fn extended_export(size: u64) -> Export {
    Export {
        size,
        extended: true,
        ..Export::default()
    }
}

/// Extended headers, no contexts.
fn extended_conn(size: u64) -> Connection {
    let conn = handshake(Config::default(), extended_export(size));
    assert!(conn.extended_headers_negotiated());
    assert!(conn.structured_replies_negotiated());
    conn
}

fn header(command: u16, flags: u16, cookie: Cookie, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: cookie.get(),
        offset,
        length,
    }
}

fn errno(result: &Result<(), Error>) -> Errno {
    result.as_ref().expect_err("expected a failure").errno()
}

// ---------------------------------------------------------------- negotiation

#[test]
fn automatic_negotiation_asks_for_extended_headers_first() {
    // handshake() checks the order: EXTENDED_HEADERS, then straight to GO.
    let conn = extended_conn(1 << 20);
    assert_eq!(conn.size().unwrap(), 1 << 20);

    // Refused: structured replies next, then GO.
    let conn = handshake(Config::default(), Export::default());
    assert!(!conn.extended_headers_negotiated());
    assert!(conn.structured_replies_negotiated());

    // Refused, with structured replies refused too: simple replies.
    let conn = handshake(Config::default(), Export::simple());
    assert!(!conn.extended_headers_negotiated());
    assert!(!conn.structured_replies_negotiated());

    // Not asked for at all.
    let conn = handshake(compact(), Export::default());
    assert!(!conn.extended_headers_negotiated());
}

fn opt_mode(config: Config) -> (Connection, Vec<SentOption>) {
    let mut conn = Connection::new(config.opt_mode(true));
    feed(
        &mut conn,
        &Script::new()
            .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .take(),
    );
    let sent = conn.take_output();
    let (_, rest) = split_client_flags(&sent);
    let options = parse_options(rest);
    (conn, options)
}

#[test]
fn opt_mode_waits_after_extended_headers_or_their_fallback() {
    // Acknowledged: negotiating at once, no STRUCTURED_REPLY.
    let (mut conn, options) = opt_mode(Config::default());
    assert_eq!(options.len(), 1);
    assert_eq!(options[0].option, OPT_EXTENDED_HEADERS);
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Negotiating]),
        "{events:?}"
    );
    assert!(conn.take_output().is_empty());
    assert!(conn.extended_headers_negotiated());
    assert!(conn.structured_replies_negotiated());

    // Refused: STRUCTURED_REPLY, then negotiating.
    let (mut conn, _) = opt_mode(Config::default());
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_EXTENDED_HEADERS, REP_ERR_POLICY, "")
            .take(),
    );
    assert!(drain(&mut conn).is_empty());
    let options = parse_options(&conn.take_output());
    assert_eq!(options.len(), 1);
    assert_eq!(options[0].option, OPT_STRUCTURED_REPLY);
    feed(&mut conn, &Script::new().ack(OPT_STRUCTURED_REPLY).take());
    assert!(matches!(drain(&mut conn).as_slice(), [Event::Negotiating]));
    assert!(!conn.extended_headers_negotiated());
    assert!(conn.structured_replies_negotiated());
}

#[test]
fn opt_extended_headers_reports_its_outcome() {
    let (mut conn, options) = opt_mode(
        Config::default()
            .request_extended_headers(false)
            .request_structured_replies(false),
    );
    assert!(options.is_empty());
    assert!(matches!(drain(&mut conn).as_slice(), [Event::Negotiating]));

    conn.opt_extended_headers().unwrap();
    let options = parse_options(&conn.take_output());
    assert_eq!(
        options,
        vec![SentOption {
            option: OPT_EXTENDED_HEADERS,
            data: vec![]
        }]
    );
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "not here")
            .take(),
    );
    let events = drain(&mut conn);
    match events.as_slice() {
        [Event::OptionDone {
            option: NbdOption::ExtendedHeaders,
            result: Err(e),
        }] => assert_eq!(e.errno(), Errno::NotSup),
        other => panic!("{other:?}"),
    }
    assert!(!conn.extended_headers_negotiated());
    assert!(!conn.structured_replies_negotiated());
    assert!(conn.is_negotiating());

    conn.opt_extended_headers().unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    let events = drain(&mut conn);
    assert!(
        matches!(
            events.as_slice(),
            [Event::OptionDone {
                option: NbdOption::ExtendedHeaders,
                result: Ok(())
            }]
        ),
        "{events:?}"
    );
    assert!(conn.extended_headers_negotiated());
    assert!(conn.structured_replies_negotiated());
    assert!(conn.is_negotiating());

    // Then GO; transmission uses extended headers.
    conn.opt_go().unwrap();
    assert_eq!(parse_options(&conn.take_output())[0].option, OPT_GO);
    feed(
        &mut conn,
        &Script::new()
            .info_export(OPT_GO, 1 << 20, ALL_FLAGS)
            .ack(OPT_GO)
            .take(),
    );
    assert!(matches!(drain(&mut conn).as_slice(), [Event::Ready]));
    let cookie = conn.flush(CmdFlags::empty()).unwrap();
    assert_eq!(
        sent_extended_request(&mut conn).header,
        header(CMD_FLUSH, 0, cookie, 0, 0)
    );
}

// ---------------------------------------------------------------- requests

#[test]
fn every_request_is_a_32_byte_extended_header() {
    let mut conn = extended_conn(1 << 20);
    let data = pattern(100, 9);
    let read = conn.pread(buffer(1024, 0), 512, CmdFlags::DF).unwrap();
    let write = conn
        .pwrite(Bytes::from(data.clone()), 4096, CmdFlags::FUA)
        .unwrap();
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    let trim = conn.trim(8192, 0, CmdFlags::FUA).unwrap();
    let zero = conn.zero(512, 1024, CmdFlags::NO_HOLE).unwrap();
    let cache = conn.cache(65536, 65536, CmdFlags::empty()).unwrap();
    let sent = conn.take_output();
    assert_eq!(sent.len(), 6 * EXTENDED_REQUEST_LEN + data.len());
    let requests = parse_extended_requests(&sent);
    let headers: Vec<RequestHeader> = requests.iter().map(|r| r.header).collect();
    assert_eq!(
        headers,
        vec![
            header(CMD_READ, CMD_FLAG_DF, read, 512, 1024),
            header(CMD_WRITE, CMD_FLAG_FUA, write, 4096, 100),
            header(CMD_FLUSH, 0, flush, 0, 0),
            header(CMD_TRIM, CMD_FLAG_FUA, trim, 0, 8192),
            header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, zero, 1024, 512),
            header(CMD_CACHE, 0, cache, 65536, 65536),
        ]
    );
    // NBD_CMD_DISC too (sent at once with nothing in flight).
    let mut idle = extended_conn(1 << 20);
    idle.disconnect().unwrap();
    assert_eq!(
        sent_extended_request(&mut idle).header,
        RequestHeader {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0
        }
    );
    assert_eq!(requests[1].payload, data);
    assert!(requests
        .iter()
        .enumerate()
        .all(|(i, r)| i == 1 || r.payload.is_empty()));
}

#[test]
fn extended_headers_lift_the_32_bit_limit_except_for_reads_and_writes() {
    let size = 1u64 << 40;
    let big = 5u64 << 30;
    let mut conn = handshake_meta(
        Config::default().meta_context(BASE),
        extended_export(size),
        &[(BASE_ID, BASE)],
    );
    let trim = conn.trim(big, 0, CmdFlags::empty()).unwrap();
    let zero = conn.zero(big, 1 << 32, CmdFlags::empty()).unwrap();
    let cache = conn.cache(1 << 32, 0, CmdFlags::empty()).unwrap();
    let status = conn.block_status(size, 0, CmdFlags::empty()).unwrap();
    let headers: Vec<RequestHeader> = sent_extended_requests(&mut conn)
        .into_iter()
        .map(|r| r.header)
        .collect();
    assert_eq!(
        headers,
        vec![
            header(CMD_TRIM, 0, trim, 0, big),
            header(CMD_WRITE_ZEROES, 0, zero, 1 << 32, big),
            header(CMD_CACHE, 0, cache, 0, 1 << 32),
            header(CMD_BLOCK_STATUS, 0, status, 0, size),
        ]
    );

    // Reads and writes stay capped.
    let too_big = MAX_REQUEST_SIZE as usize + 1;
    let err = conn
        .pread(BytesMut::zeroed(too_big), 0, CmdFlags::empty())
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge(_)), "{err:?}");
    assert_eq!(err.errno(), Errno::Range);
    let err = conn
        .pwrite(Bytes::from(vec![0; too_big]), 0, CmdFlags::empty())
        .unwrap_err();
    assert_eq!(err.errno(), Errno::Range);
    assert!(conn.take_output().is_empty());
    let read = conn
        .pread(
            BytesMut::zeroed(MAX_REQUEST_SIZE as usize),
            0,
            CmdFlags::empty(),
        )
        .unwrap();
    assert_eq!(
        sent_extended_request(&mut conn).header,
        header(CMD_READ, 0, read, 0, MAX_REQUEST_SIZE)
    );
}

#[test]
fn compact_headers_refuse_lengths_over_32_bits() {
    let size = 1u64 << 40;
    let mut conn = handshake_meta(
        compact().meta_context(BASE),
        Export {
            size,
            ..Export::default()
        },
        &[(BASE_ID, BASE)],
    );
    let over = 1u64 << 32;
    let refused = [
        conn.trim(over, 0, CmdFlags::empty()),
        conn.zero(over, 0, CmdFlags::empty()),
        conn.cache(over, 0, CmdFlags::empty()),
        conn.block_status(over, 0, CmdFlags::empty()),
    ];
    for result in refused {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{err:?}");
        assert_eq!(err.errno(), Errno::Range);
    }
    assert!(conn.take_output().is_empty());
    assert_eq!(conn.in_flight(), 0);
    // The largest 32-bit length is fine, in a 28-byte header.
    let max = u64::from(u32::MAX);
    let trim = conn.trim(max, 0, CmdFlags::empty()).unwrap();
    let status = conn.block_status(max, 1, CmdFlags::empty()).unwrap();
    let sent = conn.take_output();
    assert_eq!(sent.len(), 2 * REQUEST_LEN);
    let headers: Vec<RequestHeader> = parse_requests(&sent)
        .into_iter()
        .map(|r| r.header)
        .collect();
    assert_eq!(
        headers,
        vec![
            header(CMD_TRIM, 0, trim, 0, max),
            header(CMD_BLOCK_STATUS, 0, status, 1, max),
        ]
    );
}

// ---------------------------------------------------------------- replies

#[test]
fn a_simple_or_structured_reply_kills_an_extended_connection() {
    for kind in ["simple", "structured", "garbage"] {
        let mut conn = extended_conn(1 << 20);
        let a = conn.flush(CmdFlags::empty()).unwrap();
        let b = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let mut s = Script::new();
        match kind {
            "simple" => s.simple(a, 0, &[]),
            "structured" => s.none(a),
            _ => s.raw(&[0xde, 0xad, 0xbe, 0xef]),
        };
        feed(&mut conn, &s.take());
        let events = drain(&mut conn);
        assert_dead(&conn, &events, Errno::Proto);
        assert_completed_once(&events, &[a, b]);
        for c in completions(events) {
            assert_eq!(errno(&c.result), Errno::NotConn, "{kind}");
        }
        assert!(matches!(conn.error(), Some(Error::Protocol(_))), "{kind}");
    }
}

#[test]
fn an_extended_reply_kills_a_compact_connection() {
    for structured in [true, false] {
        let export = if structured {
            Export::default()
        } else {
            Export::simple()
        };
        let mut conn = handshake(compact(), export);
        let a = conn.flush(CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        feed(&mut conn, &Script::new().ext_none(a, 0).take());
        let events = drain(&mut conn);
        assert_completed_once(&events, &[a]);
        assert_dead(&conn, &events, Errno::Proto);
    }
}

#[test]
fn an_extended_read_reply_fills_the_buffer() {
    let mut conn = extended_conn(1 << 20);
    let offset = 65536;
    let cookie = conn
        .pread_structured(buffer(1024, 0xee), offset, CmdFlags::empty())
        .unwrap();
    let _ = conn.take_output();
    let data = pattern(768, 5);
    let mut s = Script::new();
    s.ext_hole(cookie, offset, offset, 256, false).ext_data(
        cookie,
        offset,
        offset + 256,
        &data,
        true,
    );
    feed(&mut conn, &s.take());
    let mut events = drain(&mut conn);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(matches!(
        &events[0],
        Event::ReadChunk(ReadChunk::Hole { cookie: c, offset: o, length: 256 }) if *c == cookie && *o == offset
    ));
    assert!(matches!(
        &events[1],
        Event::ReadChunk(ReadChunk::Data { cookie: c, offset: o, length: 768 }) if *c == cookie && *o == offset + 256
    ));
    let Some(Event::Completed(c)) = events.pop() else {
        panic!("completion last")
    };
    assert!(c.result.is_ok(), "{:?}", c.result);
    let buf = c.buffer.unwrap();
    assert!(buf[..256].iter().all(|&b| b == 0));
    assert_eq!(&buf[256..], &data[..]);

    // An error chunk fails the read with the server's errno.
    let cookie = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.ext_error_chunk(cookie, 0, EIO, "media", true).take(),
    );
    let c = one_completion(&mut conn);
    assert_eq!(errno(&c.result), Errno::Io);
    assert!(conn.is_ready());
}

#[test]
fn a_reply_offset_other_than_the_request_offset_fails_only_that_command() {
    let mut conn = extended_conn(1 << 20);
    let a = conn
        .pread(buffer(512, 0xaa), 4096, CmdFlags::empty())
        .unwrap();
    let b = conn
        .pread(buffer(512, 0xbb), 8192, CmdFlags::empty())
        .unwrap();
    let c = conn.trim(4096, 4096, CmdFlags::empty()).unwrap();
    let d = conn.flush(CmdFlags::empty()).unwrap();
    let e = conn.pread(buffer(512, 0xcc), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let data_a = pattern(512, 1);
    let data_b = pattern(512, 2);
    let data_e = pattern(512, 3);
    let mut s = Script::new();
    // a: a data chunk whose header says offset 0; its payload is skipped.
    s.ext_chunk_header(a.get(), REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 0, 8 + 512)
        .raw(&4096u64.to_be_bytes())
        .raw(&data_a)
        // b: right.
        .ext_data(b, 8192, 8192, &data_b, true)
        // c: NONE at the wrong offset.
        .ext_none(c, 0)
        // d: flush at 0, right.
        .ext_none(d, 0)
        // e: a wrong-offset chunk, then the data: fails once, at the end.
        .ext_chunk(e, false, REPLY_TYPE_NONE, 512, &[])
        .ext_data(e, 0, 0, &data_e, true);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert_completed_once(&events, &[a, b, c, d, e]);
    let by_cookie = completions_by_cookie(events);
    assert_eq!(errno(&by_cookie[&a].result), Errno::Proto);
    assert!(
        by_cookie[&a]
            .buffer
            .as_ref()
            .unwrap()
            .iter()
            .all(|&x| x == 0xaa),
        "the skipped payload never lands in the buffer"
    );
    assert!(by_cookie[&b].result.is_ok());
    assert_eq!(by_cookie[&b].buffer.as_deref(), Some(&data_b[..]));
    assert_eq!(errno(&by_cookie[&c].result), Errno::Proto);
    assert!(by_cookie[&d].result.is_ok());
    assert_eq!(errno(&by_cookie[&e].result), Errno::Proto);
    assert!(conn.is_ready());
    assert_eq!(conn.in_flight(), 0);
}

#[test]
fn a_wrong_offset_on_a_status_chunk_fails_that_command() {
    let mut conn = handshake_meta(
        Config::default().meta_context(BASE),
        extended_export(1 << 30),
        &[(BASE_ID, BASE)],
    );
    let a = conn.block_status(4096, 4096, CmdFlags::empty()).unwrap();
    let b = conn.block_status(4096, 8192, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    s.block_status_ext(a, 8192, true, BASE_ID, &[(4096, 0)])
        .block_status_ext(b, 8192, true, BASE_ID, &[(4096, 1)]);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert_completed_once(&events, &[a, b]);
    let statuses: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::BlockStatus(bs) => Some((bs.cookie, bs.context.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(statuses, vec![(b, BASE.to_string())]);
    let by_cookie = completions_by_cookie(events);
    assert_eq!(errno(&by_cookie[&a].result), Errno::Proto);
    assert!(by_cookie[&b].result.is_ok());
}

// ---------------------------------------------------------------- split invariance

const EXPORT_SIZE: u64 = 1 << 30;

#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        offset: u64,
        len: usize,
        chunk_events: bool,
    },
    Status {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    /// Block status asking about one context (`base` or not).
    Filter {
        offset: u64,
        len: u64,
        base: bool,
    },
    Write {
        offset: u64,
        len: usize,
    },
    Trim {
        offset: u64,
        len: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let offset = 0..EXPORT_SIZE / 2;
    let read_len = prop_oneof![4 => 1usize..4096, 1 => 32 * 1024usize..80 * 1024];
    prop_oneof![
        4 => (offset.clone(), read_len, any::<bool>())
            .prop_map(|(offset, len, chunk_events)| Op::Read { offset, len, chunk_events }),
        4 => (offset.clone(), 1u64..(1 << 28), any::<bool>())
            .prop_map(|(offset, len, req_one)| Op::Status { offset, len, req_one }),
        2 => (offset.clone(), 1u64..(1 << 28), any::<bool>())
            .prop_map(|(offset, len, base)| Op::Filter { offset, len, base }),
        1 => (offset.clone(), 1usize..2048).prop_map(|(offset, len)| Op::Write { offset, len }),
        1 => (offset, 1u64..(1 << 20)).prop_map(|(offset, len)| Op::Trim { offset, len }),
    ]
}

fn split_config() -> Config {
    Config::default()
        .export_name("split")
        .meta_context(BASE)
        .meta_context(DIRTY)
}

fn handshake_bytes() -> Vec<u8> {
    let mut s = Script::new();
    s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .ack(OPT_EXTENDED_HEADERS)
        .meta_context(OPT_SET_META_CONTEXT, BASE_ID, BASE)
        .meta_context(OPT_SET_META_CONTEXT, DIRTY_ID, DIRTY)
        .ack(OPT_SET_META_CONTEXT)
        .info_export(OPT_GO, EXPORT_SIZE, ALL_FLAGS | FLAG_BLOCK_STATUS_PAYLOAD)
        .ack(OPT_GO);
    s.take()
}

fn issue(conn: &mut Connection, ops: &[Op]) -> Vec<Cookie> {
    ops.iter()
        .enumerate()
        .map(|(i, op)| {
            match *op {
                Op::Read {
                    offset,
                    len,
                    chunk_events,
                } => {
                    let buf = buffer(len, 0xa5);
                    if chunk_events {
                        conn.pread_structured(buf, offset, CmdFlags::empty())
                    } else {
                        conn.pread(buf, offset, CmdFlags::empty())
                    }
                }
                Op::Status {
                    offset,
                    len,
                    req_one,
                } => {
                    let flags = if req_one {
                        CmdFlags::REQ_ONE
                    } else {
                        CmdFlags::empty()
                    };
                    conn.block_status(len, offset, flags)
                }
                Op::Filter { offset, len, base } => conn.block_status_filter(
                    len,
                    offset,
                    CmdFlags::empty(),
                    &[if base { BASE } else { DIRTY }],
                ),
                Op::Write { offset, len } => {
                    conn.pwrite(Bytes::from(pattern(len, i as u8)), offset, CmdFlags::FUA)
                }
                Op::Trim { offset, len } => conn.trim(len, offset, CmdFlags::empty()),
            }
            .expect("valid command")
        })
        .collect()
}

/// What a command should end with: success (with the read's bytes, or the
/// status reports' extents by context id) or failure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Read(Vec<u8>),
    Status(Vec<(u32, Vec<(u64, u64)>)>),
    Ok,
    Err,
}

/// Extents for `len` bytes: 1 to 4 of them, the last maybe running past the end.
fn extents_for(len: u64, one: bool, rng: &mut Rng) -> Vec<(u64, u64)> {
    let n = if one { 1 } else { rng.between(1, 4) };
    let mut out = Vec::new();
    let mut left = len;
    for k in 0..n {
        let last = k + 1 == n || left <= 1;
        let length = if last {
            left + if rng.chance(0.3) {
                rng.between(1, 1 << 20)
            } else {
                0
            }
        } else {
            rng.between(1, left - 1)
        };
        out.push((length, rng.below(4)));
        if last {
            break;
        }
        left -= length;
    }
    out
}

/// The server's replies, commands interleaved, and what each should end with.
fn replies(ops: &[Op], cookies: &[Cookie], rng: &mut Rng) -> (Vec<u8>, Vec<Expect>) {
    let mut per_command: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut expect = Vec::new();
    for (i, (op, &cookie)) in ops.iter().zip(cookies).enumerate() {
        let mut msgs = Vec::new();
        let mut s = Script::new();
        match *op {
            Op::Read { offset, len, .. } => {
                let data = pattern(len, (i as u8).wrapping_mul(11));
                let pieces = rng.between(1, 3) as usize;
                let mut cuts: Vec<usize> = (1..pieces)
                    .map(|_| rng.between(1, len.max(2) as u64 - 1) as usize)
                    .filter(|&c| c < len)
                    .collect();
                cuts.extend([0, len]);
                cuts.sort_unstable();
                cuts.dedup();
                let mut ranges: Vec<(usize, usize)> =
                    cuts.windows(2).map(|w| (w[0], w[1])).collect();
                for k in (1..ranges.len()).rev() {
                    let j = rng.below(k as u64 + 1) as usize;
                    ranges.swap(k, j);
                }
                // Sometimes one chunk names the wrong request offset.
                let bad = rng
                    .chance(0.15)
                    .then(|| rng.below(ranges.len() as u64) as usize);
                let mut content = data.clone();
                for (k, &(a, b)) in ranges.iter().enumerate() {
                    let last = k + 1 == ranges.len();
                    let header_offset = if bad == Some(k) { offset + 1 } else { offset };
                    if rng.chance(0.3) {
                        s.ext_hole(
                            cookie,
                            header_offset,
                            offset + a as u64,
                            (b - a) as u32,
                            last,
                        );
                        content[a..b].fill(0);
                    } else {
                        s.ext_data(cookie, header_offset, offset + a as u64, &data[a..b], last);
                    }
                    msgs.push(s.take());
                }
                expect.push(match bad {
                    Some(_) => Expect::Err,
                    None => Expect::Read(content),
                });
            }
            Op::Status {
                offset,
                len,
                req_one,
            } => {
                let mut contexts = vec![BASE_ID, DIRTY_ID];
                if rng.chance(0.5) {
                    contexts.reverse();
                }
                let mut reports = Vec::new();
                // 0: missing context, 1: duplicate, 2: zero-length extent,
                // 3: empty payload; else valid.
                let fault = rng.below(10);
                let end_with_none = rng.chance(0.25);
                let mut sent = contexts.clone();
                match fault {
                    0 => {
                        sent.pop();
                    }
                    1 => sent.push(sent[0]),
                    _ => {}
                }
                for (k, &id) in sent.iter().enumerate() {
                    let mut pairs = extents_for(len, req_one, rng);
                    if fault == 2 && k == 0 {
                        pairs[0].0 = 0;
                    }
                    let last = k + 1 == sent.len() && !end_with_none;
                    if fault == 3 && k == 0 {
                        s.ext_chunk(cookie, last, REPLY_TYPE_BLOCK_STATUS_EXT, offset, &[]);
                    } else {
                        s.block_status_ext(cookie, offset, last, id, &pairs);
                    }
                    msgs.push(s.take());
                    let broken_first = k == 0 && matches!(fault, 2 | 3);
                    let duplicate = fault == 1 && k + 1 == sent.len();
                    let valid = !broken_first && !duplicate;
                    if valid {
                        reports.push((id, pairs));
                    }
                }
                if end_with_none {
                    s.ext_none(cookie, offset);
                    msgs.push(s.take());
                }
                expect.push(if fault <= 3 {
                    Expect::Err
                } else {
                    Expect::Status(reports)
                });
            }
            Op::Filter { offset, len, base } => {
                let id = if base { BASE_ID } else { DIRTY_ID };
                let pairs = extents_for(len, false, rng);
                if rng.chance(0.2) {
                    // The other context, not asked for.
                    let other = if base { DIRTY_ID } else { BASE_ID };
                    s.block_status_ext(cookie, offset, false, other, &[(len, 0)]);
                    msgs.push(s.take());
                    s.block_status_ext(cookie, offset, true, id, &pairs);
                    msgs.push(s.take());
                    expect.push(Expect::Err);
                } else {
                    s.block_status_ext(cookie, offset, true, id, &pairs);
                    msgs.push(s.take());
                    expect.push(Expect::Status(vec![(id, pairs)]));
                }
            }
            Op::Write { offset, .. } | Op::Trim { offset, .. } => {
                if rng.chance(0.25) {
                    s.ext_error_chunk(cookie, offset, ENOSPC, "full", true);
                    expect.push(Expect::Err);
                } else {
                    s.ext_none(cookie, offset);
                    expect.push(Expect::Ok);
                }
                msgs.push(s.take());
            }
        }
        msgs.reverse(); // popped from the back
        per_command.push(msgs);
    }
    let mut out = Vec::new();
    loop {
        let live: Vec<usize> = (0..per_command.len())
            .filter(|&i| !per_command[i].is_empty())
            .collect();
        if live.is_empty() {
            break;
        }
        let pick = live[rng.below(live.len() as u64) as usize];
        out.extend(per_command[pick].pop().unwrap());
    }
    (out, expect)
}

/// One status report: cookie, context id, context name, extents.
type Report = (Cookie, u32, String, Vec<(u64, u64)>);

/// Everything observable from one run.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    events: Vec<String>,
    /// Each completion: cookie, whether it succeeded, the buffer handed back.
    completions: Vec<(Cookie, bool, Option<Vec<u8>>)>,
    /// Each status report: cookie, context id, context name, extents.
    statuses: Vec<Report>,
    sent: Vec<u8>,
}

fn run(ops: &[Op], reply_bytes: &[u8], cookies: &[Cookie], mode: Mode, seed: u64) -> Run {
    let mut rng = Rng::new(seed);
    let mut conn = Connection::new(split_config());
    let mut events = Vec::new();
    let mut done = Vec::new();
    let mut statuses = Vec::new();
    let mut record = |conn: &mut Connection| {
        while let Some(e) = conn.poll_event() {
            events.push(format!("{e:?}"));
            match e {
                Event::Completed(c) => {
                    done.push((c.cookie, c.result.is_ok(), c.buffer.map(|b| b.to_vec())))
                }
                Event::BlockStatus(b) => {
                    assert!(
                        !done.iter().any(|d| d.0 == b.cookie),
                        "status after its completion"
                    );
                    statuses.push((
                        b.cookie,
                        b.context_id,
                        b.context,
                        b.extents.iter().map(|e| (e.length, e.flags)).collect(),
                    ))
                }
                _ => {}
            }
        }
    };
    feed_with(&mut conn, &handshake_bytes(), mode, &mut rng);
    let mut sent = conn.take_output();
    record(&mut conn);
    assert!(conn.is_ready(), "{mode:?}: {:?}", conn.error());
    assert!(conn.extended_headers_negotiated());
    let issued = issue(&mut conn, ops);
    assert_eq!(issued, cookies, "cookies are deterministic");
    sent.extend(conn.take_output());
    feed_with(&mut conn, reply_bytes, mode, &mut rng);
    record(&mut conn);
    assert!(conn.is_ready(), "{mode:?}: {:?}", conn.error());
    assert_eq!(conn.in_flight(), 0);
    conn.handle_input(&[]).unwrap();
    record(&mut conn);
    assert!(conn.is_dead());
    Run {
        events,
        completions: done,
        statuses,
        sent,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn extended_transcripts_do_not_depend_on_how_input_is_split(
        ops in prop::collection::vec(op_strategy(), 1..12),
        reply_seed in any::<u64>(),
        feed_seed in any::<u64>(),
    ) {
        // The cookies are deterministic: learn them from a first connection.
        let mut probe = Connection::new(split_config());
        probe.handle_input(&handshake_bytes()).unwrap();
        let _ = probe.take_output();
        let cookies = issue(&mut probe, &ops);
        let (reply_bytes, expect) = replies(&ops, &cookies, &mut Rng::new(reply_seed));

        let whole = run(&ops, &reply_bytes, &cookies, Mode::Whole, feed_seed);

        // The requests: one extended header each, filters with their payload.
        let sent = &whole.sent[handshake_len(&whole.sent)..];
        let requests = parse_extended_requests(sent);
        prop_assert_eq!(requests.len(), ops.len());
        for (op, r) in ops.iter().zip(&requests) {
            match *op {
                Op::Filter { len, base, .. } => {
                    prop_assert_eq!(r.header.flags, CMD_FLAG_PAYLOAD_LEN);
                    let mut want = len.to_be_bytes().to_vec();
                    want.extend_from_slice(&(if base { BASE_ID } else { DIRTY_ID }).to_be_bytes());
                    prop_assert_eq!(&r.payload, &want);
                }
                Op::Status { len, .. } => prop_assert_eq!(r.header.length, len),
                _ => {}
            }
        }

        // Every command completed exactly once, as expected.
        prop_assert_eq!(whole.completions.len(), ops.len());
        let mut seen: Vec<Cookie> = whole.completions.iter().map(|c| c.0).collect();
        seen.sort();
        seen.dedup();
        prop_assert_eq!(seen.len(), ops.len());
        for (cookie, ok, buf) in &whole.completions {
            let i = cookies.iter().position(|c| c == cookie).unwrap();
            let reported: Vec<(u32, Vec<(u64, u64)>)> = whole
                .statuses
                .iter()
                .filter(|s| s.0 == *cookie)
                .map(|s| (s.1, s.3.clone()))
                .collect();
            match &expect[i] {
                Expect::Err => prop_assert!(!ok, "command {} should fail", i),
                Expect::Ok => prop_assert!(ok, "command {} should succeed", i),
                Expect::Read(content) => {
                    prop_assert!(ok, "read {} should succeed", i);
                    prop_assert_eq!(buf.as_ref().unwrap(), content, "read {} content", i);
                }
                Expect::Status(want) => {
                    prop_assert!(ok, "status {} should succeed", i);
                    prop_assert_eq!(&reported, want, "status {} reports", i);
                }
            }
        }
        for s in &whole.statuses {
            let name = if s.1 == BASE_ID { BASE } else { DIRTY };
            prop_assert_eq!(s.2.as_str(), name);
        }

        for mode in [Mode::RandomSplits, Mode::ByteAtATime, Mode::ZeroCopy] {
            let other = run(&ops, &reply_bytes, &cookies, mode, feed_seed);
            prop_assert_eq!(&whole.sent, &other.sent, "{:?}: bytes sent differ", mode);
            prop_assert_eq!(&whole.completions, &other.completions, "{:?}: completions differ", mode);
            prop_assert_eq!(&whole.statuses, &other.statuses, "{:?}: statuses differ", mode);
            prop_assert_eq!(&whole.events, &other.events, "{:?}: events differ", mode);
        }
    }
}

/// Length of the handshake part of what the client sent: client flags, then
/// the options up to and including GO.
fn handshake_len(sent: &[u8]) -> usize {
    let mut at = 4;
    loop {
        let option = u32::from_be_bytes(sent[at + 8..at + 12].try_into().unwrap());
        let len = u32::from_be_bytes(sent[at + 12..at + 16].try_into().unwrap()) as usize;
        at += 16 + len;
        if option == OPT_GO {
            return at;
        }
    }
}

#[test]
fn strict_mode_off_lets_flags_through_in_extended_requests() {
    // With flag checks off, any bits go out as given, in the 16-bit flags field.
    let mut conn = extended_conn(1 << 20);
    conn.set_strict_mode(Strict::empty());
    let cookie = conn
        .trim(512, 0, CmdFlags::from_bits_retain(0x8001))
        .unwrap();
    assert_eq!(
        sent_extended_request(&mut conn).header,
        header(CMD_TRIM, 0x8001, cookie, 0, 512)
    );
}
