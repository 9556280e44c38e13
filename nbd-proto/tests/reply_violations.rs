//! One test per way a server can break a reply. Each checks the error kind of
//! the affected command, what happened to the other commands in flight, and
//! whether the connection survived: violations confined to one reply fail that
//! command only; violations that lose framing or trust kill the connection.

mod support;

use bytes::Bytes;
use nbd_proto::wire::consts::*;
use nbd_proto::{CmdFlags, Connection, Cookie, Errno, Error, Event, MAX_ERROR_PAYLOAD};
use support::*;

/// Two commands that should be unaffected by a confined violation.
struct Bystanders {
    read: Cookie,
    flush: Cookie,
}

const VICTIM_OFFSET: u64 = 4096;
const VICTIM_LEN: usize = 512;

/// A ready connection with a victim read (512 bytes at 4096) and two bystanders.
fn setup_read(structured: bool) -> (Connection, Cookie, Bystanders) {
    setup(structured, |c| {
        c.pread(buffer(VICTIM_LEN, 0xff), VICTIM_OFFSET, CmdFlags::empty())
            .unwrap()
    })
}

fn setup(
    structured: bool,
    victim: impl FnOnce(&mut Connection) -> Cookie,
) -> (Connection, Cookie, Bystanders) {
    let mut conn = ready(if structured {
        Export::default()
    } else {
        Export::simple()
    });
    let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let victim = victim(&mut conn);
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    assert_eq!(sent_requests(&mut conn).len(), 3);
    (conn, victim, Bystanders { read, flush })
}

/// The victim's completion, which must be the only event so far.
fn victim_failed(conn: &mut Connection, victim: Cookie) -> Error {
    let events = drain(conn);
    assert_eq!(events.len(), 1, "only the victim completes: {events:?}");
    let c = match events.into_iter().next().unwrap() {
        Event::Completed(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(c.cookie, victim);
    assert!(!conn.is_in_flight(victim));
    assert!(conn.is_ready(), "a confined violation keeps the connection");
    c.result.expect_err("the victim fails")
}

/// Answers the bystanders correctly; both must succeed.
fn bystanders_succeed(conn: &mut Connection, b: &Bystanders, structured: bool) {
    let data = pattern(512, 42);
    let mut s = Script::new();
    if structured {
        s.data(b.read, 0, &data, true);
    } else {
        s.simple(b.read, 0, &data);
    }
    s.simple(b.flush, 0, &[]);
    feed(conn, &s.take());
    let done = completions_by_cookie(drain(conn));
    assert_eq!(done.len(), 2);
    assert!(done[&b.read].result.is_ok(), "{:?}", done[&b.read].result);
    assert_eq!(&done[&b.read].buffer.as_ref().unwrap()[..], &data[..]);
    assert!(done[&b.flush].result.is_ok());
    assert!(conn.is_ready());
    assert_eq!(conn.in_flight(), 0);
}

/// The connection died with `errno`; every command in `pending` completed once
/// with NotConn, and later calls return the sticky error.
fn killed(conn: &mut Connection, errno: Errno, pending: &[Cookie]) {
    let events = drain(conn);
    assert_dead(conn, &events, errno);
    let done = completions_by_cookie(events);
    assert_eq!(done.len(), pending.len(), "{done:?}");
    for cookie in pending {
        let c = &done[cookie];
        assert_eq!(c.result.as_ref().unwrap_err().errno(), Errno::NotConn);
    }
    assert_eq!(conn.in_flight(), 0);
    let sticky = conn.error().unwrap().clone();
    assert_eq!(
        conn.pread(buffer(512, 0), 0, CmdFlags::empty())
            .unwrap_err(),
        sticky
    );
    assert_eq!(conn.flush(CmdFlags::empty()).unwrap_err(), sticky);
    assert_eq!(conn.disconnect().unwrap_err(), sticky);
    assert_eq!(conn.notify_read(0).unwrap_err(), sticky);
    assert_eq!(conn.handle_input(b"late").unwrap_err(), sticky);
    assert!(conn.take_output().is_empty());
    assert!(drain(conn).is_empty(), "nothing completes twice");
}

// ---------------------------------------------------------------- fatal

#[test]
fn reply_with_an_unknown_cookie_kills_the_connection() {
    for structured_chunk in [false, true] {
        let (mut conn, victim, b) = setup_read(true);
        let mut s = Script::new();
        if structured_chunk {
            s.chunk_header(0xdead_beef, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        } else {
            s.simple_raw(0xdead_beef, 0, &[]);
        }
        feed(&mut conn, &s.take());
        killed(&mut conn, Errno::Proto, &[victim, b.read, b.flush]);
        assert!(conn.error().unwrap().to_string().contains("0xdeadbeef"));
    }
}

#[test]
fn chunk_for_a_finished_cookie_kills_the_connection() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .data(victim, VICTIM_OFFSET, &[1; VICTIM_LEN], true)
            .take(),
    );
    let c = one_completion(&mut conn);
    assert_eq!(c.cookie, victim);
    assert!(c.result.is_ok());
    // A chunk after DONE.
    feed(&mut conn, &Script::new().none(victim).take());
    killed(&mut conn, Errno::Proto, &[b.read, b.flush]);
}

#[test]
fn bad_reply_magic_loses_framing_and_fails_every_pending_command_once() {
    let (mut conn, victim, b) = setup_read(true);
    let mut bytes = Script::new().simple(victim, 0, &[]).take();
    bytes[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    feed(&mut conn, &bytes[..4]);
    killed(&mut conn, Errno::Proto, &[victim, b.read, b.flush]);
    assert!(conn.error().unwrap().to_string().contains("0x12345678"));
}

#[test]
fn structured_chunk_without_structured_replies_kills_the_connection() {
    let (mut conn, victim, b) = setup_read(false);
    feed(&mut conn, &Script::new().none(victim).take());
    killed(&mut conn, Errno::Proto, &[victim, b.read, b.flush]);
    assert!(conn.error().unwrap().to_string().contains("not negotiated"));
}

#[test]
fn server_eof_mid_reply_fails_every_pending_command_with_not_connected() {
    for cut in [1, 10, 16, 16 + 100] {
        let (mut conn, victim, b) = setup_read(false);
        let bytes = Script::new().simple(victim, 0, &[7; VICTIM_LEN]).take();
        feed(&mut conn, &bytes[..cut]);
        assert!(conn.is_ready());
        conn.handle_input(&[]).unwrap();
        killed(&mut conn, Errno::NotConn, &[victim, b.read, b.flush]);
    }
    // Mid structured chunk too.
    let (mut conn, victim, b) = setup_read(true);
    let bytes = Script::new()
        .data(victim, VICTIM_OFFSET, &[7; VICTIM_LEN], true)
        .take();
    feed(&mut conn, &bytes[..24]);
    conn.notify_read(0).unwrap();
    killed(&mut conn, Errno::NotConn, &[victim, b.read, b.flush]);
}

// ---------------------------------------------------------------- confined

#[test]
fn data_chunk_outside_its_request_fails_only_that_read() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .data(victim, VICTIM_OFFSET + 512, &[1; 16], false)
            .data(victim, VICTIM_OFFSET - 1, &[1; 16], false)
            .data(victim, VICTIM_OFFSET, &[1; VICTIM_LEN], false)
            .none(victim)
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("outside the request"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn hole_chunk_outside_its_request_fails_only_that_read() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .hole(victim, VICTIM_OFFSET + 256, 512, false)
            .hole(victim, VICTIM_OFFSET, 512, true)
            .take(),
    );
    assert_eq!(victim_failed(&mut conn, victim).errno(), Errno::Proto);
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn chunk_whose_offset_plus_length_overflows_u64_fails_only_that_read() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .data(victim, u64::MAX - 4, &[1; 16], false)
            .hole(victim, u64::MAX, 4096, false)
            .hole(victim, VICTIM_OFFSET, VICTIM_LEN as u32, true)
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("overflows"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn overlapping_chunks_fail_only_that_read() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .data(victim, VICTIM_OFFSET, &[1; 256], false)
            .hole(victim, VICTIM_OFFSET + 128, 256, false)
            .data(victim, VICTIM_OFFSET + 256, &[2; 256], true)
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("overlaps"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn read_finished_without_full_coverage_fails_only_that_read() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .data(victim, VICTIM_OFFSET, &[1; 256], false)
            .hole(victim, VICTIM_OFFSET + 384, 128, false)
            .none(victim)
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("without covering"), "{e}");
    bystanders_succeed(&mut conn, &b, true);

    // A bare NONE is no read reply at all.
    let (mut conn, victim, b) = setup_read(true);
    feed(&mut conn, &Script::new().none(victim).take());
    assert_eq!(victim_failed(&mut conn, victim).errno(), Errno::Proto);
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn simple_reply_to_a_read_after_structured_replies_fails_only_that_read() {
    // With data: the data is consumed so framing holds.
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new().simple(victim, 0, &[3; VICTIM_LEN]).take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("simple reply"), "{e}");
    bystanders_succeed(&mut conn, &b, true);

    // An error simple reply: still a protocol error for a read.
    let (mut conn, victim, b) = setup_read(true);
    feed(&mut conn, &Script::new().simple(victim, EIO, &[]).take());
    assert_eq!(victim_failed(&mut conn, victim).errno(), Errno::Proto);
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn error_chunk_with_error_zero_fails_only_that_command() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .error_chunk(victim, 0, "no error?", None, true)
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("error value 0"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn error_chunk_whose_message_exceeds_the_chunk_fails_only_that_command() {
    let (mut conn, victim, b) = setup_read(true);
    let mut payload = Vec::new();
    payload.extend_from_slice(&EIO.to_be_bytes());
    payload.extend_from_slice(&100u16.to_be_bytes());
    payload.extend_from_slice(b"only ten b");
    feed(
        &mut conn,
        &Script::new()
            .chunk(victim, true, REPLY_TYPE_ERROR, &payload)
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("message length 100"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn error_chunks_of_the_wrong_shape_fail_only_that_command() {
    // Too short for an error and message length; ERROR with trailing bytes;
    // ERROR_OFFSET without its offset.
    let mut trailing = Vec::new();
    trailing.extend_from_slice(&EIO.to_be_bytes());
    trailing.extend_from_slice(&0u16.to_be_bytes());
    trailing.extend_from_slice(&[0; 3]);
    let mut no_offset = Vec::new();
    no_offset.extend_from_slice(&EIO.to_be_bytes());
    no_offset.extend_from_slice(&0u16.to_be_bytes());
    let cases = [
        (REPLY_TYPE_ERROR, vec![0, 0, 0, 5]),
        (REPLY_TYPE_ERROR, trailing),
        (REPLY_TYPE_ERROR_OFFSET, no_offset),
    ];
    for (chunk_type, payload) in cases {
        let (mut conn, victim, b) = setup_read(true);
        feed(
            &mut conn,
            &Script::new()
                .chunk(victim, true, chunk_type, &payload)
                .take(),
        );
        assert_eq!(victim_failed(&mut conn, victim).errno(), Errno::Proto);
        bystanders_succeed(&mut conn, &b, true);
    }
}

#[test]
fn error_offset_outside_the_request_fails_only_that_command() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .error_chunk(
                victim,
                EIO,
                "",
                Some(VICTIM_OFFSET + VICTIM_LEN as u64),
                true,
            )
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("outside the request"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn none_chunk_without_done_fails_and_retires_the_command() {
    let (mut conn, victim, b) = setup_read(true);
    feed(
        &mut conn,
        &Script::new()
            .chunk(victim, false, REPLY_TYPE_NONE, &[])
            .take(),
    );
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("DONE"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
    // Retired: a later chunk for it names a finished cookie.
    feed(&mut conn, &Script::new().none(victim).take());
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn none_chunk_with_a_payload_kills_the_connection() {
    // NONE never has a payload: its length cannot be trusted to frame anything.
    let (mut conn, victim, b) = setup(true, |c| c.flush(CmdFlags::empty()).unwrap());
    feed(
        &mut conn,
        &Script::new()
            .chunk(victim, true, REPLY_TYPE_NONE, &[1, 2, 3, 4, 5])
            .take(),
    );
    killed(&mut conn, Errno::Proto, &[victim, b.read, b.flush]);
    assert!(conn
        .error()
        .unwrap()
        .to_string()
        .contains("NONE chunk of 5 bytes"));
}

#[test]
fn offset_data_or_hole_for_a_non_read_fails_only_that_command() {
    for hole in [false, true] {
        let (mut conn, victim, b) = setup(true, |c| {
            c.pwrite(Bytes::from_static(&[0; 512]), 0, CmdFlags::empty())
                .unwrap()
        });
        let mut s = Script::new();
        if hole {
            s.hole(victim, 0, 512, true);
        } else {
            s.data(victim, 0, &[9; 512], true);
        }
        feed(&mut conn, &s.take());
        let e = victim_failed(&mut conn, victim);
        assert_eq!(e.errno(), Errno::Proto);
        assert!(e.to_string().contains("NBD_CMD_WRITE"), "{e}");
        bystanders_succeed(&mut conn, &b, true);
    }
}

#[test]
fn malformed_data_and_hole_chunks_fail_only_that_read() {
    // OFFSET_DATA needs more than its 8-byte offset; OFFSET_HOLE is exactly 12
    // bytes. Shorter than that keeps framing (longer is refused by the length
    // rule; see `chunk_lengths_no_legal_reply_allows_kill_from_the_header`).
    let cases: [(u16, Vec<u8>); 3] = [
        (REPLY_TYPE_OFFSET_DATA, VICTIM_OFFSET.to_be_bytes().to_vec()),
        (REPLY_TYPE_OFFSET_DATA, vec![0; 5]),
        (REPLY_TYPE_OFFSET_HOLE, vec![0; 11]),
    ];
    for (chunk_type, payload) in cases {
        let (mut conn, victim, b) = setup_read(true);
        feed(
            &mut conn,
            &Script::new()
                .chunk(victim, true, chunk_type, &payload)
                .take(),
        );
        assert_eq!(victim_failed(&mut conn, victim).errno(), Errno::Proto);
        bystanders_succeed(&mut conn, &b, true);
    }
}

#[test]
fn unknown_non_error_chunk_type_is_skipped_and_fails_only_that_command() {
    // A known type out of place (block status for a read) is refused the same way.
    for (chunk_type, why) in [
        (
            REPLY_TYPE_BLOCK_STATUS,
            "block status chunk in a reply to NBD_CMD_READ",
        ),
        (77, "unexpected chunk type"),
        (0x7fff, "unexpected chunk type"),
    ] {
        let (mut conn, victim, b) = setup_read(true);
        feed(
            &mut conn,
            &Script::new()
                .chunk(victim, false, chunk_type, &pattern(300, 1))
                .data(victim, VICTIM_OFFSET, &[1; VICTIM_LEN], true)
                .take(),
        );
        let e = victim_failed(&mut conn, victim);
        assert_eq!(e.errno(), Errno::Proto);
        assert!(e.to_string().contains(why), "{e}");
        bystanders_succeed(&mut conn, &b, true);
    }
}

#[test]
fn large_error_chunk_within_the_wire_limit_is_skipped_without_buffering_it() {
    // 64 KiB of error payload: legal in form (a 16-bit message length), far
    // above what is ever buffered whole. It is skipped as it streams in.
    let (mut conn, victim, b) = setup_read(true);
    let len = MAX_ERROR_PAYLOAD;
    let mut s = Script::new();
    s.chunk_header(victim.get(), REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len);
    feed(&mut conn, &s.take());
    let mut left = len as usize;
    while left > 1 {
        assert!(
            conn.is_in_flight(victim),
            "in flight until the payload is skipped"
        );
        let n = (left - 1).min(4096);
        feed(&mut conn, &vec![0xee; n]);
        left -= n;
        assert!(conn.is_ready());
    }
    feed(&mut conn, &[0xee]);
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("buffered limit"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}

#[test]
fn many_out_of_order_runs_beyond_the_limit_fail_only_that_read() {
    // Every other 1-byte run, never touching the start: the run list is bounded.
    let len = 2 * 4096 + 4;
    let (mut conn, victim, b) = setup(true, |c| {
        c.pread(buffer(len, 0), 0, CmdFlags::empty()).unwrap()
    });
    let mut s = Script::new();
    for i in 0..4097u64 {
        s.data(victim, 2 + 2 * i, &[1], false);
    }
    s.data(victim, 0, &[1, 1], true);
    feed(&mut conn, &s.take());
    let e = victim_failed(&mut conn, victim);
    assert_eq!(e.errno(), Errno::Proto);
    assert!(e.to_string().contains("runs"), "{e}");
    bystanders_succeed(&mut conn, &b, true);
}
