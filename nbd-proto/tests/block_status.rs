//! `NBD_CMD_BLOCK_STATUS`: the request, the checks made on every status chunk,
//! and the filter of extended headers.
//!
//! A bad chunk fails only its command (`EPROTO`); the connection and the other
//! commands go on. Every valid chunk is reported as an [`Event::BlockStatus`]
//! before its command's completion.

mod support;

use nbd_proto::wire::consts::*;
use nbd_proto::wire::{Extent, RequestHeader};
use nbd_proto::{
    BlockStatus, CmdFlags, Completion, Config, Connection, Cookie, Errno, Error, Event, Strict,
    MAX_STATUS_PAYLOAD,
};
use support::*;

const BASE: &str = "base:allocation";
const DIRTY: &str = "qemu:dirty-bitmap:bm0";
/// Ids chosen so that they are not list positions.
const BASE_ID: u32 = 7;
const DIRTY_ID: u32 = 12;

const BIG_EXPORT: u64 = 1 << 40;

fn meta_config(base: Config) -> Config {
    base.meta_context(BASE).meta_context(DIRTY)
}

/// Structured replies, compact headers, both contexts negotiated.
fn compact_conn() -> Connection {
    handshake_meta(
        meta_config(compact()),
        Export::default(),
        &[(BASE_ID, BASE), (DIRTY_ID, DIRTY)],
    )
}

/// Extended headers on a 1 TiB export, both contexts negotiated.
fn extended_conn(flags: u16) -> Connection {
    handshake_meta(
        meta_config(Config::default()),
        Export {
            size: BIG_EXPORT,
            flags,
            extended: true,
            ..Export::default()
        },
        &[(BASE_ID, BASE), (DIRTY_ID, DIRTY)],
    )
}

/// A block status report as these tests compare it: every field of
/// [`BlockStatus`], which only the connection can build.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    cookie: Cookie,
    context_id: u32,
    context: String,
    extents: Vec<Extent>,
}

/// The fields of a reported status, for comparing with [`status`].
fn seen(b: &BlockStatus) -> Status {
    Status {
        cookie: b.cookie,
        context_id: b.context_id,
        context: b.context.clone(),
        extents: b.extents.clone(),
    }
}

/// The status expected for `cookie` in context `context_id`.
fn status(cookie: Cookie, context_id: u32, pairs: &[(u64, u64)]) -> Status {
    let context = match context_id {
        BASE_ID => BASE,
        DIRTY_ID => DIRTY,
        other => panic!("no context {other}"),
    };
    Status {
        cookie,
        context_id,
        context: context.into(),
        extents: extents(pairs),
    }
}

/// The events of one command: its status reports, then its completion, and
/// nothing else.
fn statuses_then_completion(events: Vec<Event>) -> (Vec<Status>, Completion) {
    let mut statuses = Vec::new();
    let mut completion = None;
    for e in events {
        match e {
            Event::BlockStatus(b) => {
                assert!(completion.is_none(), "status after the completion: {b:?}");
                statuses.push(seen(&b));
            }
            Event::Completed(c) => {
                assert!(completion.is_none(), "second completion: {c:?}");
                completion = Some(c);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    (statuses, completion.expect("the command completed"))
}

fn assert_proto(c: &Completion) {
    match &c.result {
        Err(e @ Error::Protocol(_)) => assert_eq!(e.errno(), Errno::Proto),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert!(c.buffer.is_none());
}

/// A flush answered at once: proof that the connection still works.
fn still_works(conn: &mut Connection) {
    assert!(conn.is_ready(), "{:?}", conn.error());
    let extended = conn.extended_headers_negotiated();
    let cookie = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    if extended {
        s.ext_none(cookie, 0);
    } else {
        s.simple(cookie, 0, &[]);
    }
    feed(conn, &s.take());
    let c = one_completion(conn);
    assert_eq!(c.cookie, cookie);
    assert!(c.result.is_ok());
    assert_eq!(conn.in_flight(), 0);
}

// ---------------------------------------------------------------- requests and events

#[test]
fn compact_block_status_reports_each_context_before_completing() {
    let mut conn = compact_conn();
    let cookie = conn.block_status(65536, 4096, CmdFlags::empty()).unwrap();
    let sent = sent_request(&mut conn);
    assert_eq!(
        sent.header,
        RequestHeader {
            flags: 0,
            command: CMD_BLOCK_STATUS,
            cookie: cookie.get(),
            offset: 4096,
            length: 65536,
        }
    );
    assert!(sent.payload.is_empty());
    assert!(conn.is_in_flight(cookie));

    let mut s = Script::new();
    s.block_status(cookie, false, DIRTY_ID, &[(65536, 1)]);
    feed(&mut conn, &s.take());
    // The first context is reported as soon as its chunk is in.
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::BlockStatus(b)] if seen(b) == status(cookie, DIRTY_ID, &[(65536, 1)])),
        "{events:?}"
    );
    assert!(conn.is_in_flight(cookie));
    // The last extent may run past the request.
    s.block_status(cookie, true, BASE_ID, &[(8192, 0), (1 << 20, 3)]);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(
        statuses,
        vec![status(cookie, BASE_ID, &[(8192, 0), (1 << 20, 3)])]
    );
    assert_eq!(c.cookie, cookie);
    assert!(c.result.is_ok(), "{:?}", c.result);
    assert!(c.buffer.is_none());
    assert!(!conn.is_in_flight(cookie));
}

#[test]
fn extended_block_status_carries_64_bit_extents() {
    let mut conn = extended_conn(ALL_FLAGS);
    let (count, offset) = (3 << 32, 1 << 33);
    let cookie = conn.block_status(count, offset, CmdFlags::empty()).unwrap();
    let sent = sent_extended_request(&mut conn);
    assert_eq!(
        sent.header,
        RequestHeader {
            flags: 0,
            command: CMD_BLOCK_STATUS,
            cookie: cookie.get(),
            offset,
            length: count,
        }
    );
    let base = [(1 << 32, 0), (1 << 34, 3)];
    let dirty = [(5 << 32, 1 << 40)];
    let mut s = Script::new();
    s.block_status_ext(cookie, offset, false, BASE_ID, &base)
        .block_status_ext(cookie, offset, true, DIRTY_ID, &dirty);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(
        statuses,
        vec![
            status(cookie, BASE_ID, &base),
            status(cookie, DIRTY_ID, &dirty)
        ]
    );
    assert!(c.result.is_ok(), "{:?}", c.result);
    // The 32-bit view refuses what does not fit instead of truncating it.
    for e in statuses.iter().flat_map(|b| &b.extents) {
        assert_eq!(e.to_u32().unwrap_err().errno(), Errno::Overflow, "{e:?}");
    }
}

#[test]
fn extent_to_u32_reports_overflow_instead_of_truncating() {
    let max = u64::from(u32::MAX);
    assert_eq!(
        Extent {
            length: max,
            flags: max
        }
        .to_u32(),
        Ok((u32::MAX, u32::MAX))
    );
    assert_eq!(
        Extent {
            length: 4096,
            flags: 3
        }
        .to_u32(),
        Ok((4096, 3))
    );
    for (length, flags) in [
        (max + 1, 0),
        (1, max + 1),
        (u64::MAX, u64::MAX),
        (1 << 32, 1),
    ] {
        let err = Extent { length, flags }.to_u32().unwrap_err();
        assert!(matches!(err, Error::Overflow(_)), "{err:?}");
        assert_eq!(err.errno(), Errno::Overflow);
    }
}

#[test]
fn strict_commands_needs_a_negotiated_context() {
    let mut conn = handshake(compact(), Export::default());
    assert!(conn.meta_contexts().is_empty());
    let err = conn
        .block_status(4096, 0, CmdFlags::empty())
        .expect_err("no context");
    assert!(matches!(err, Error::NotSupported(_)), "{err:?}");
    assert_eq!(err.errno(), Errno::NotSup);
    assert!(conn.take_output().is_empty(), "nothing sent");
    assert_eq!(conn.in_flight(), 0);

    // Without the check the command goes out; a reply with no chunk is fine,
    // as no context was asked about.
    conn.set_strict_mode(Strict::all() - Strict::COMMANDS);
    let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    assert_eq!(sent_request(&mut conn).header.command, CMD_BLOCK_STATUS);
    feed(&mut conn, &Script::new().none(cookie).take());
    let c = one_completion(&mut conn);
    assert!(c.result.is_ok(), "{:?}", c.result);

    // But a status chunk cannot name a context that was never negotiated.
    let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .block_status(cookie, true, BASE_ID, &[(4096, 0)])
            .take(),
    );
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert!(statuses.is_empty());
    assert_proto(&c);
    still_works(&mut conn);
}

#[test]
fn req_one_is_sent_and_more_than_one_extent_fails_the_command() {
    let mut conn = compact_conn();
    // Only REQ_ONE is a valid block status flag.
    for bad in [
        CmdFlags::FUA,
        CmdFlags::DF,
        CmdFlags::NO_HOLE,
        CmdFlags::PAYLOAD_LEN,
    ] {
        let err = conn
            .block_status(4096, 0, CmdFlags::REQ_ONE | bad)
            .unwrap_err();
        assert_eq!(err.errno(), Errno::Inval, "{bad:?}: {err:?}");
    }
    assert!(conn.take_output().is_empty());

    let cookie = conn.block_status(4096, 0, CmdFlags::REQ_ONE).unwrap();
    let sent = sent_request(&mut conn);
    assert_eq!(sent.header.flags, CMD_FLAG_REQ_ONE);
    let mut s = Script::new();
    s.block_status(cookie, false, BASE_ID, &[(4096, 0)])
        .block_status(cookie, true, DIRTY_ID, &[(4096, 0)]);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses.len(), 2);
    assert!(c.result.is_ok(), "{:?}", c.result);

    let cookie = conn.block_status(8192, 0, CmdFlags::REQ_ONE).unwrap();
    let _ = conn.take_output();
    s.block_status(cookie, false, BASE_ID, &[(4096, 0)])
        .block_status(cookie, true, DIRTY_ID, &[(4096, 0), (4096, 1)]);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, BASE_ID, &[(4096, 0)])]);
    assert_proto(&c);
    still_works(&mut conn);
}

// ---------------------------------------------------------------- malformed chunks

#[test]
fn compact_status_payload_must_be_4_plus_8n_with_n_at_least_1() {
    let mut conn = compact_conn();
    let good = status_payload(false, BASE_ID, &[(4096, 0)]);
    assert_eq!(good.len(), 12);
    let bad: Vec<Vec<u8>> = vec![
        Vec::new(),
        BASE_ID.to_be_bytes().to_vec(), // no extent
        good[..11].to_vec(),
        [&good[..], &[0; 4]].concat(),
        [&good[..], &[0; 7]].concat(),
    ];
    for payload in bad {
        let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let mut s = Script::new();
        s.chunk(cookie, true, REPLY_TYPE_BLOCK_STATUS, &payload);
        feed(&mut conn, &s.take());
        let (statuses, c) = statuses_then_completion(drain(&mut conn));
        assert!(statuses.is_empty(), "{payload:?}");
        assert_eq!(c.cookie, cookie);
        assert_proto(&c);
        still_works(&mut conn);
    }
}

#[test]
fn extended_status_payload_must_be_8_plus_16n_with_a_matching_count() {
    let mut conn = extended_conn(ALL_FLAGS);
    let good = status_payload(true, BASE_ID, &[(4096, 0)]);
    assert_eq!(good.len(), 24);
    let mut wrong_count = status_payload(true, BASE_ID, &[(4096, 0), (4096, 1)]);
    wrong_count[4..8].copy_from_slice(&3u32.to_be_bytes());
    let mut zero_count = good.clone();
    zero_count[4..8].copy_from_slice(&0u32.to_be_bytes());
    let bad: Vec<Vec<u8>> = vec![
        good[..8].to_vec(), // no descriptor
        good[..23].to_vec(),
        [&good[..], &[0; 8]].concat(),
        wrong_count,
        zero_count,
        // A compact payload where the extended form is due.
        status_payload(false, BASE_ID, &[(4096, 0), (4096, 0)]),
    ];
    for payload in bad {
        let cookie = conn.block_status(4096, 512, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let mut s = Script::new();
        s.ext_chunk(cookie, true, REPLY_TYPE_BLOCK_STATUS_EXT, 512, &payload);
        feed(&mut conn, &s.take());
        let (statuses, c) = statuses_then_completion(drain(&mut conn));
        assert!(statuses.is_empty(), "{payload:?}");
        assert_proto(&c);
        still_works(&mut conn);
    }
}

#[test]
fn a_zero_length_status_chunk_fails_its_command_at_once() {
    for extended in [false, true] {
        let mut conn = if extended {
            extended_conn(ALL_FLAGS)
        } else {
            compact_conn()
        };
        let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let mut s = Script::new();
        if extended {
            s.ext_chunk_header(
                cookie.get(),
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                0,
                0,
            );
        } else {
            s.chunk_header(cookie.get(), REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 0);
        }
        // Nothing follows: the reply is complete and must not wait for more bytes.
        feed(&mut conn, &s.take());
        let (statuses, c) = statuses_then_completion(drain(&mut conn));
        assert!(statuses.is_empty());
        assert_eq!(c.cookie, cookie);
        assert_proto(&c);
        still_works(&mut conn);
    }
}

#[test]
fn status_chunk_type_must_match_the_header_style() {
    // Compact headers: a BLOCK_STATUS_EXT chunk (even a well-formed one) fails.
    let mut conn = compact_conn();
    let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    s.chunk(
        cookie,
        false,
        REPLY_TYPE_BLOCK_STATUS_EXT,
        &status_payload(true, BASE_ID, &[(4096, 0)]),
    )
    .block_status(cookie, true, DIRTY_ID, &[(4096, 0)]);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, DIRTY_ID, &[(4096, 0)])]);
    assert_proto(&c);
    still_works(&mut conn);

    // Extended headers: a compact BLOCK_STATUS chunk fails.
    let mut conn = extended_conn(ALL_FLAGS);
    let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    s.ext_chunk(
        cookie,
        false,
        REPLY_TYPE_BLOCK_STATUS,
        0,
        &status_payload(false, BASE_ID, &[(4096, 0)]),
    )
    .block_status_ext(cookie, 0, true, DIRTY_ID, &[(4096, 0)]);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, DIRTY_ID, &[(4096, 0)])]);
    assert_proto(&c);
    still_works(&mut conn);
}

/// One bad reply: the chunks sent (context id, extents), and which of them are
/// reported.
struct Case {
    what: &'static str,
    chunks: Vec<(u32, Vec<(u64, u64)>)>,
    reported: Vec<usize>,
    ok: bool,
}

fn case(what: &'static str, chunks: &[(u32, &[(u64, u64)])], reported: &[usize], ok: bool) -> Case {
    Case {
        what,
        chunks: chunks.iter().map(|(id, e)| (*id, e.to_vec())).collect(),
        reported: reported.to_vec(),
        ok,
    }
}

#[test]
fn each_status_chunk_is_checked_against_its_request() {
    const LEN: u64 = 8192;
    let whole: &[(u64, u64)] = &[(LEN, 0)];
    let cases = [
        case(
            "valid: extents inside, the last past the end",
            &[
                (BASE_ID, &[(8191, 0), (100, 1)]),
                (DIRTY_ID, &[(1 << 20, 0)]),
            ],
            &[0, 1],
            true,
        ),
        case(
            "unknown context id",
            &[(99, whole), (BASE_ID, whole), (DIRTY_ID, whole)],
            &[1, 2],
            false,
        ),
        case(
            "a second chunk for one context",
            &[(BASE_ID, whole), (BASE_ID, whole), (DIRTY_ID, whole)],
            &[0, 2],
            false,
        ),
        case(
            "a zero-length extent",
            &[(BASE_ID, &[(0, 0)]), (DIRTY_ID, whole)],
            &[1],
            false,
        ),
        case(
            "a zero-length last extent",
            &[(BASE_ID, whole), (DIRTY_ID, &[(4096, 0), (0, 1)])],
            &[0],
            false,
        ),
        case(
            "valid: an extent ending at the request end, the last wholly past it (nbdkit)",
            &[(BASE_ID, &[(LEN, 0), (4096, 1)]), (DIRTY_ID, whole)],
            &[0, 1],
            true,
        ),
        case(
            "valid: extents before the last adding up to the request end",
            &[
                (BASE_ID, whole),
                (DIRTY_ID, &[(4096, 0), (4096, 1), (1, 0)]),
            ],
            &[0, 1],
            true,
        ),
        case(
            "two extents wholly past the request end",
            &[(BASE_ID, &[(LEN, 0), (1, 0), (1, 1)]), (DIRTY_ID, whole)],
            &[1],
            false,
        ),
        case(
            "an extent before the last running past the request end",
            &[(BASE_ID, &[(LEN + 1, 0), (1, 0)]), (DIRTY_ID, whole)],
            &[1],
            false,
        ),
    ];
    for extended in [false, true] {
        let mut conn = if extended {
            extended_conn(ALL_FLAGS)
        } else {
            compact_conn()
        };
        for case in &cases {
            let offset = 4096;
            let cookie = conn.block_status(LEN, offset, CmdFlags::empty()).unwrap();
            let _ = conn.take_output();
            let mut s = Script::new();
            let last = case.chunks.len() - 1;
            for (i, (id, pairs)) in case.chunks.iter().enumerate() {
                if extended {
                    s.block_status_ext(cookie, offset, i == last, *id, pairs);
                } else {
                    s.block_status(cookie, i == last, *id, pairs);
                }
            }
            feed(&mut conn, &s.take());
            let (statuses, c) = statuses_then_completion(drain(&mut conn));
            let want: Vec<Status> = case
                .reported
                .iter()
                .map(|&i| status(cookie, case.chunks[i].0, &case.chunks[i].1))
                .collect();
            assert_eq!(statuses, want, "{} (extended {extended})", case.what);
            assert_eq!(c.cookie, cookie);
            if case.ok {
                assert!(c.result.is_ok(), "{}: {:?}", case.what, c.result);
            } else {
                assert_proto(&c);
            }
            assert!(conn.is_ready(), "{}: {:?}", case.what, conn.error());
        }
        still_works(&mut conn);
    }
}

#[test]
fn a_reply_must_cover_every_context_asked_about() {
    let mut conn = compact_conn();
    let mut s = Script::new();

    // One of two contexts.
    let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.block_status(cookie, true, BASE_ID, &[(4096, 0)]).take(),
    );
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, BASE_ID, &[(4096, 0)])]);
    assert_proto(&c);

    // None at all: a NONE chunk, or a successful simple reply.
    let a = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let b = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &s.none(a).simple(b, 0, &[]).take());
    let by_cookie = completions_by_cookie(drain(&mut conn));
    assert_eq!(by_cookie.len(), 2);
    assert_proto(&by_cookie[&a]);
    assert_proto(&by_cookie[&b]);

    // A server error wins over the missing contexts.
    let a = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let b = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    s.block_status(a, false, BASE_ID, &[(4096, 0)])
        .error_chunk(a, EIO, "bitmap gone", None, true)
        .simple(b, ENOTSUP, &[]);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert!(
        matches!(&events[0], Event::BlockStatus(bs) if seen(bs) == status(a, BASE_ID, &[(4096, 0)])),
        "{events:?}"
    );
    let by_cookie = completions_by_cookie(events);
    assert_eq!(
        by_cookie[&a].result.as_ref().unwrap_err().errno(),
        Errno::Io
    );
    assert!(matches!(
        &by_cookie[&a].result,
        Err(Error::Server { message: Some(m), .. }) if m.0 == "bitmap gone"
    ));
    assert_eq!(
        by_cookie[&b].result.as_ref().unwrap_err().errno(),
        Errno::NotSup
    );
    still_works(&mut conn);
}

#[test]
fn a_status_chunk_in_a_reply_to_another_command_fails_that_command() {
    let mut conn = compact_conn();
    let read = conn
        .pread_structured(buffer(4096, 0xee), 0, CmdFlags::empty())
        .unwrap();
    let trim = conn.trim(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let data = pattern(4096, 3);
    let mut s = Script::new();
    s.block_status(read, false, BASE_ID, &[(4096, 0)])
        .block_status(trim, false, BASE_ID, &[(4096, 0)])
        .data(read, 0, &data, true)
        .none(trim);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert!(
        !events.iter().any(|e| matches!(e, Event::BlockStatus(_))),
        "{events:?}"
    );
    assert_completed_once(&events, &[read, trim]);
    let by_cookie = completions_by_cookie(events);
    assert_proto(&by_cookie[&trim]);
    let r = &by_cookie[&read];
    assert_eq!(r.result.as_ref().unwrap_err().errno(), Errno::Proto);
    assert_eq!(r.buffer.as_ref().map(|b| b.len()), Some(4096));
    still_works(&mut conn);
}

#[test]
fn an_oversized_status_payload_kills_the_connection_from_its_header() {
    // A chunk one descriptor beyond the limit no legal reply exceeds: the
    // header alone ends the connection, and nothing of the payload is awaited.
    let mut conn = extended_conn(ALL_FLAGS);
    let big = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let next = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let descriptors = (MAX_STATUS_PAYLOAD - 8) / 16 + 1;
    let length = 8 + 16 * descriptors;
    assert!(length > MAX_STATUS_PAYLOAD);
    let mut s = Script::new();
    s.ext_chunk_header(
        big.get(),
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS_EXT,
        0,
        length,
    );
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert_completed_once(&events, &[big, next]);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn.error().unwrap().to_string().contains("framing"));
}

#[test]
fn a_huge_announced_status_payload_kills_at_once() {
    // A 4 GiB announcement, then silence: the client must not wait for it.
    let mut conn = compact_conn();
    let cookie = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let other = conn.block_status(4096, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    s.chunk_header(
        cookie.get(),
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        u64::from(u32::MAX),
    );
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert_completed_once(&events, &[cookie, other]);
    assert_dead(&conn, &events, Errno::Proto);
}

// ---------------------------------------------------------------- the filter

#[test]
fn block_status_filter_needs_extended_headers_and_the_payload_flag() {
    let mut conn = compact_conn();
    let err = conn
        .block_status_filter(4096, 0, CmdFlags::empty(), &[BASE])
        .unwrap_err();
    assert!(matches!(err, Error::NotSupported(_)), "{err:?}");
    assert_eq!(err.errno(), Errno::NotSup);
    assert!(conn.take_output().is_empty());

    let mut conn = extended_conn(ALL_FLAGS);
    let err = conn
        .block_status_filter(4096, 0, CmdFlags::empty(), &[BASE])
        .unwrap_err();
    assert_eq!(err.errno(), Errno::NotSup, "{err:?}");
    assert!(conn.take_output().is_empty());
    assert_eq!(conn.in_flight(), 0);
}

#[test]
fn block_status_filter_refuses_unknown_or_no_names() {
    let mut conn = extended_conn(ALL_FLAGS | FLAG_BLOCK_STATUS_PAYLOAD);
    for names in [&["qemu:dirty-bitmap:other"][..], &[BASE, "nope"], &[]] {
        let err = conn
            .block_status_filter(4096, 0, CmdFlags::empty(), names)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{names:?}: {err:?}"
        );
        assert_eq!(err.errno(), Errno::Inval);
    }
    assert!(conn.take_output().is_empty());
    assert_eq!(conn.in_flight(), 0);
    still_works(&mut conn);
}

#[test]
fn block_status_filter_sends_the_payload_and_needs_only_the_filtered_contexts() {
    let mut conn = extended_conn(ALL_FLAGS | FLAG_BLOCK_STATUS_PAYLOAD);
    let (count, offset) = (1u64 << 33, 4096u64);
    let cookie = conn
        .block_status_filter(count, offset, CmdFlags::REQ_ONE, &[DIRTY])
        .unwrap();
    let sent = sent_extended_request(&mut conn);
    assert_eq!(
        sent.header,
        RequestHeader {
            flags: CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE,
            command: CMD_BLOCK_STATUS,
            cookie: cookie.get(),
            offset,
            length: 12,
        }
    );
    let mut want = count.to_be_bytes().to_vec();
    want.extend_from_slice(&DIRTY_ID.to_be_bytes());
    assert_eq!(sent.payload, want);

    let mut s = Script::new();
    feed(
        &mut conn,
        &s.block_status_ext(cookie, offset, true, DIRTY_ID, &[(count, 1)])
            .take(),
    );
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, DIRTY_ID, &[(count, 1)])]);
    assert!(c.result.is_ok(), "{:?}", c.result);

    // Both names: both ids in the payload, both contexts required.
    let cookie = conn
        .block_status_filter(4096, 0, CmdFlags::empty(), &[BASE, DIRTY])
        .unwrap();
    let sent = sent_extended_request(&mut conn);
    assert_eq!(sent.header.flags, CMD_FLAG_PAYLOAD_LEN);
    assert_eq!(sent.header.length, 16);
    let mut want = 4096u64.to_be_bytes().to_vec();
    want.extend_from_slice(&BASE_ID.to_be_bytes());
    want.extend_from_slice(&DIRTY_ID.to_be_bytes());
    assert_eq!(sent.payload, want);
    feed(
        &mut conn,
        &s.block_status_ext(cookie, 0, true, BASE_ID, &[(4096, 0)])
            .take(),
    );
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, BASE_ID, &[(4096, 0)])]);
    assert_proto(&c);
    still_works(&mut conn);
}

#[test]
fn a_context_left_out_of_the_filter_fails_the_command() {
    let mut conn = extended_conn(ALL_FLAGS | FLAG_BLOCK_STATUS_PAYLOAD);
    let cookie = conn
        .block_status_filter(4096, 0, CmdFlags::empty(), &[BASE])
        .unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    s.block_status_ext(cookie, 0, false, DIRTY_ID, &[(4096, 0)])
        .block_status_ext(cookie, 0, true, BASE_ID, &[(4096, 0)]);
    feed(&mut conn, &s.take());
    let (statuses, c) = statuses_then_completion(drain(&mut conn));
    assert_eq!(statuses, vec![status(cookie, BASE_ID, &[(4096, 0)])]);
    assert_proto(&c);
    still_works(&mut conn);
}

// ---------------------------------------------------------------- exactly once

#[test]
fn interleaved_good_and_bad_replies_complete_each_command_exactly_once() {
    let mut conn = compact_conn();
    let cookies: Vec<Cookie> = (0..6)
        .map(|i| {
            conn.block_status(8192, i * 8192, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let sent = sent_requests(&mut conn);
    assert_eq!(sent.len(), 7);
    let ok: &[(u64, u64)] = &[(8192, 0)];
    // Each command's chunks, in order; commands interleaved below.
    let mut per: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut s = Script::new();
    let msgs = |s: &mut Script, list: &mut Vec<Vec<u8>>| list.push(s.take());
    // 0: good.
    let mut l = Vec::new();
    s.block_status(cookies[0], false, BASE_ID, ok);
    msgs(&mut s, &mut l);
    s.block_status(cookies[0], true, DIRTY_ID, ok);
    msgs(&mut s, &mut l);
    per.push(l);
    // 1: duplicate context.
    let mut l = Vec::new();
    for done in [false, false, true] {
        s.block_status(cookies[1], done, if done { DIRTY_ID } else { BASE_ID }, ok);
        msgs(&mut s, &mut l);
    }
    per.push(l);
    // 2: bad length.
    let mut l = Vec::new();
    s.chunk(cookies[2], true, REPLY_TYPE_BLOCK_STATUS, &[0; 9]);
    msgs(&mut s, &mut l);
    per.push(l);
    // 3: server error.
    let mut l = Vec::new();
    s.error_chunk(cookies[3], EPERM, "", None, true);
    msgs(&mut s, &mut l);
    per.push(l);
    // 4: missing context, NONE at the end.
    let mut l = Vec::new();
    s.block_status(cookies[4], false, DIRTY_ID, ok);
    msgs(&mut s, &mut l);
    s.none(cookies[4]);
    msgs(&mut s, &mut l);
    per.push(l);
    // 5: good, reverse order.
    let mut l = Vec::new();
    s.block_status(cookies[5], false, DIRTY_ID, ok);
    msgs(&mut s, &mut l);
    s.block_status(cookies[5], true, BASE_ID, ok);
    msgs(&mut s, &mut l);
    per.push(l);
    // The read: fine.
    let mut l = Vec::new();
    s.data(read, 0, &pattern(512, 1), true);
    msgs(&mut s, &mut l);
    per.push(l);

    // Round robin.
    let mut bytes = Vec::new();
    let mut round = 0;
    while per.iter().any(|l| round < l.len()) {
        for l in &per {
            if let Some(m) = l.get(round) {
                bytes.extend_from_slice(m);
            }
        }
        round += 1;
    }
    feed(&mut conn, &bytes);
    let events = drain(&mut conn);
    let mut all = cookies.clone();
    all.push(read);
    assert_completed_once(&events, &all);
    // Each status report precedes its command's completion.
    for (i, e) in events.iter().enumerate() {
        if let Event::BlockStatus(b) = e {
            assert!(!events[..i]
                .iter()
                .any(|p| matches!(p, Event::Completed(c) if c.cookie == b.cookie)));
        }
    }
    let by_cookie = completions_by_cookie(events);
    let errnos: Vec<Option<Errno>> = all
        .iter()
        .map(|c| by_cookie[c].result.as_ref().err().map(Error::errno))
        .collect();
    assert_eq!(
        errnos,
        vec![
            None,
            Some(Errno::Proto),
            Some(Errno::Proto),
            Some(Errno::Perm),
            Some(Errno::Proto),
            None,
            None
        ]
    );
    assert_eq!(
        by_cookie[&read].buffer.as_deref(),
        Some(&pattern(512, 1)[..])
    );
    assert_eq!(conn.in_flight(), 0);
    still_works(&mut conn);
}
