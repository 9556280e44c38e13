//! Misuse of the byte calls, and configuration values the protocol cannot
//! carry: each is an error value (EINVAL), never a panic, and never a silent
//! change of state. After each misuse the connection is shown to work on.

mod support;

use std::io::{self, IoSlice, Read};

use bytes::Bytes;
use nbd_proto::wire::consts::*;
use nbd_proto::{CmdFlags, Config, Connection, Cookie, Direction, Errno, Error, Event};
use support::Rng;
use support::*;

/// A structured connection with one 512-byte read at 0 in flight.
fn with_read() -> (Connection, Cookie) {
    let mut conn = ready(Export::default());
    let cookie = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    (conn, cookie)
}

/// The reply to `with_read`'s read, and the data it carries.
fn read_reply(cookie: Cookie) -> (Vec<u8>, Vec<u8>) {
    let data = pattern(512, 11);
    (Script::new().data(cookie, 0, &data, true).take(), data)
}

/// The read completes once, correctly.
fn read_completes(conn: &mut Connection, cookie: Cookie, data: &[u8]) {
    let c = one_completion(conn);
    assert_eq!(c.cookie, cookie);
    assert!(c.result.is_ok(), "{:?}", c.result);
    assert_eq!(&c.buffer.unwrap()[..], data);
    assert!(conn.is_ready());
    assert_eq!(conn.in_flight(), 0);
}

fn assert_einval(e: &Error) {
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_eq!(e.errno(), Errno::Inval);
}

/// The `nbd_proto::Error` inside an `io::Error` from `read_from` / `write_to`.
fn inner(e: &io::Error) -> &Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .unwrap_or_else(|| panic!("no nbd_proto::Error inside {e:?}"))
}

// ---------------------------------------------------------------- notify_read

#[test]
fn notify_read_beyond_the_recv_buf_is_einval_and_changes_nothing() {
    let (mut conn, cookie) = with_read();
    let (reply, data) = read_reply(cookie);
    let offered = conn.recv_buf().len();
    assert!(offered > 0);
    assert_einval(&conn.notify_read(offered + 1).unwrap_err());
    assert_einval(&conn.notify_read(usize::MAX).unwrap_err());
    assert!(drain(&mut conn).is_empty());
    assert!(conn.is_ready());
    assert_eq!(conn.in_flight(), 1);
    feed(&mut conn, &reply);
    read_completes(&mut conn, cookie, &data);
}

#[test]
fn notify_read_beyond_a_zero_copy_region_is_einval_and_changes_nothing() {
    // A large read: once the chunk header and offset are in, recv_buf is the
    // exact unfilled region of the caller's buffer.
    let mut conn = ready(Export::default());
    let len = 100_000;
    let cookie = conn.pread(buffer(len, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let data = pattern(len, 5);
    let reply = Script::new().data(cookie, 0, &data, true).take();
    let head = STRUCTURED_REPLY_LEN + 8;
    feed(&mut conn, &reply[..head]);
    let region = conn.recv_buf().len();
    assert_eq!(region, len, "the caller's buffer is offered");
    assert_einval(&conn.notify_read(region + 1).unwrap_err());
    // The rest, through the zero-copy path, lands where it belongs.
    let mut rest = &reply[head..];
    while !rest.is_empty() {
        let buf = conn.recv_buf();
        let n = buf.len().min(rest.len()).min(30_000);
        buf[..n].copy_from_slice(&rest[..n]);
        conn.notify_read(n).unwrap();
        rest = &rest[n..];
    }
    read_completes(&mut conn, cookie, &data);
}

#[test]
fn notify_read_without_a_fresh_recv_buf_is_einval_and_reparses_nothing() {
    let (mut conn, cookie) = with_read();
    let (reply, data) = read_reply(cookie);
    // Never offered.
    assert_einval(&conn.notify_read(1).unwrap_err());
    // The first half, reported once; a second report of the same read is refused.
    let half = reply.len() / 2;
    let buf = conn.recv_buf();
    assert!(buf.len() >= half);
    buf[..half].copy_from_slice(&reply[..half]);
    conn.notify_read(half).unwrap();
    assert_einval(&conn.notify_read(half).unwrap_err());
    assert!(drain(&mut conn).is_empty());
    // After handle_input, too: it leaves no offer behind.
    feed(&mut conn, &reply[half..]);
    assert_einval(&conn.notify_read(1).unwrap_err());
    read_completes(&mut conn, cookie, &data);
    // Another read works as well: nothing stale was parsed.
    let next = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let (reply, data) = read_reply(next);
    feed(&mut conn, &reply);
    read_completes(&mut conn, next, &data);
}

#[test]
fn notify_read_of_zero_is_end_of_stream_without_a_recv_buf() {
    let (mut conn, cookie) = with_read();
    conn.notify_read(0).unwrap();
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::NotConn);
    assert_completed_once(&events, &[cookie]);
}

// ---------------------------------------------------------------- notify_write

#[test]
fn notify_write_beyond_what_output_listed_is_einval_and_changes_nothing() {
    let mut conn = ready(Export::default());
    let payload = Bytes::from(pattern(1000, 2));
    let cookie = conn.pwrite(payload.clone(), 0, CmdFlags::empty()).unwrap();
    // Nothing listed yet.
    assert_einval(&conn.notify_write(1).unwrap_err());
    let listed = {
        let mut iov = [IoSlice::new(&[]); 8];
        let n = conn.output(&mut iov);
        iov[..n].iter().map(|s| s.len()).sum::<usize>()
    };
    assert_eq!(listed, REQUEST_LEN + payload.len());
    assert_einval(&conn.notify_write(listed + 1).unwrap_err());
    // Two reports sharing one listing are fine up to its total, not beyond.
    conn.notify_write(10).unwrap();
    conn.notify_write(listed - 20).unwrap();
    assert_einval(&conn.notify_write(11).unwrap_err());
    conn.notify_write(10).unwrap();
    assert_einval(&conn.notify_write(1).unwrap_err());
    assert!(!conn.wants_write());
    // Exactly the request went out, once.
    let mut again = ready(Export::default());
    let _ = again.pwrite(payload, 0, CmdFlags::empty()).unwrap();
    let whole = again.take_output();
    assert_eq!(parse_requests(&whole)[0].header.cookie, cookie.get());
    assert!(conn.take_output().is_empty());
    // And the write completes.
    feed(&mut conn, &Script::new().simple(cookie, 0, &[]).take());
    let c = one_completion(&mut conn);
    assert!(c.result.is_ok());
}

#[test]
fn a_refused_notify_write_leaves_the_output_in_place() {
    let mut conn = ready(Export::default());
    let cookie = conn.flush(CmdFlags::empty()).unwrap();
    let listed = {
        let mut iov = [IoSlice::new(&[]); 2];
        let n = conn.output(&mut iov);
        iov[..n].iter().map(|s| s.len()).sum::<usize>()
    };
    assert_einval(&conn.notify_write(listed * 2).unwrap_err());
    let sent = sent_request(&mut conn);
    assert_eq!(sent.header.command, CMD_FLUSH);
    assert_eq!(sent.cookie(), cookie);
}

#[test]
fn notify_write_on_a_dead_connection_is_the_sticky_error() {
    let mut conn = ready(Export::default());
    let _ = conn.flush(CmdFlags::empty()).unwrap();
    conn.notify_read(0).unwrap();
    assert!(conn.is_dead());
    assert_eq!(conn.notify_write(5).unwrap_err().errno(), Errno::NotConn);
    conn.notify_write(0).unwrap();
}

// ---------------------------------------------------------------- read_from

#[test]
fn read_from_drives_a_whole_reply_and_reports_end_of_stream() {
    let (mut conn, cookie) = with_read();
    let (reply, data) = read_reply(cookie);
    let mut server = io::Cursor::new(reply);
    // Small reads, as a slow socket gives them.
    while conn.in_flight() > 0 {
        let n = conn
            .read_from(|buf| {
                let k = buf.len().min(7);
                server.read(&mut buf[..k])
            })
            .unwrap();
        assert!(n > 0);
    }
    read_completes(&mut conn, cookie, &data);
    // The socket's end of stream: read_from returns 0 and the core saw it.
    assert_eq!(conn.read_from(|buf| server.read(buf)).unwrap(), 0);
    assert!(conn.is_dead());
    // Over: the reader is not called again.
    let e = conn
        .read_from(|_| -> io::Result<usize> { panic!("read on a dead connection") })
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    assert_eq!(inner(&e).errno(), Errno::NotConn);
}

#[test]
fn read_from_with_a_reader_claiming_too_much_is_einval_and_changes_nothing() {
    let (mut conn, cookie) = with_read();
    let (reply, data) = read_reply(cookie);
    let e = conn.read_from(|buf| Ok(buf.len() + 1)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_einval(inner(&e));
    // No offer is left behind for a stray notify_read.
    assert_einval(&conn.notify_read(1).unwrap_err());
    assert!(drain(&mut conn).is_empty());
    feed(&mut conn, &reply);
    read_completes(&mut conn, cookie, &data);
}

#[test]
fn read_from_passes_the_readers_error_through_and_changes_nothing() {
    let (mut conn, cookie) = with_read();
    let (reply, data) = read_reply(cookie);
    let e = conn
        .read_from(|_| Err(io::ErrorKind::WouldBlock.into()))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert_einval(&conn.notify_read(1).unwrap_err());
    assert!(conn.is_ready());
    feed(&mut conn, &reply);
    read_completes(&mut conn, cookie, &data);
}

// ---------------------------------------------------------------- write_to

#[test]
fn write_to_sends_everything_in_partial_writes() {
    let mut conn = ready(Export::default());
    let mut twin = ready(Export::default());
    let payload = Bytes::from(pattern(3000, 8));
    for c in [&mut conn, &mut twin] {
        c.pwrite(payload.clone(), 0, CmdFlags::empty()).unwrap();
        c.flush(CmdFlags::empty()).unwrap();
    }
    let want = twin.take_output();
    let mut wire = Vec::new();
    while conn.wants_write() {
        let n = conn
            .write_to(|iov| {
                // A socket taking at most 100 bytes at a time.
                let mut left = 100;
                for s in iov {
                    let k = s.len().min(left);
                    wire.extend_from_slice(&s[..k]);
                    left -= k;
                }
                Ok(100 - left)
            })
            .unwrap();
        assert!(n > 0);
    }
    assert_eq!(wire, want);
    // Nothing pending: the writer is not called.
    let n = conn
        .write_to(|_| -> io::Result<usize> { panic!("nothing to write") })
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn write_to_with_a_writer_claiming_too_much_is_einval_and_changes_nothing() {
    let mut conn = ready(Export::default());
    let cookie = conn.flush(CmdFlags::empty()).unwrap();
    let e = conn
        .write_to(|iov| Ok(iov.iter().map(|s| s.len()).sum::<usize>() + 1))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_einval(inner(&e));
    // A writer taking nothing: WriteZero, nothing changed.
    let e = conn.write_to(|_| Ok(0)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    // The writer's own error too: passed through, nothing changed.
    let e = conn
        .write_to(|_| Err(io::ErrorKind::WouldBlock.into()))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    let sent = sent_request(&mut conn);
    assert_eq!(sent.cookie(), cookie);
    feed(&mut conn, &Script::new().simple(cookie, 0, &[]).take());
    assert!(one_completion(&mut conn).result.is_ok());
}

// ---------------------------------------------------------------- configuration

/// A connection built from `config` is dead from the start with EINVAL, sends
/// nothing, and stays so when the server greets it.
fn refused_at_birth(config: Config) {
    assert_eq!(config.validate().unwrap_err().errno(), Errno::Inval);
    let mut conn = Connection::new(config);
    assert!(conn.is_dead());
    assert_eq!(conn.error().unwrap().errno(), Errno::Inval);
    assert_eq!(conn.direction(), Direction::None);
    assert!(!conn.wants_write());
    assert!(conn.take_output().is_empty());
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Inval);
    let greeting = Script::new()
        .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .take();
    assert_eq!(
        conn.handle_input(&greeting).unwrap_err().errno(),
        Errno::Inval
    );
    assert!(conn.take_output().is_empty(), "nothing is sent");
    assert!(drain(&mut conn).is_empty());
}

#[test]
fn an_export_name_the_protocol_cannot_carry_is_refused_before_any_byte() {
    // 16 MiB, just over the limit, and a NUL.
    for name in [
        "x".repeat(16 << 20),
        "x".repeat(MAX_STRING_LEN + 1),
        "a\0b".to_string(),
    ] {
        refused_at_birth(Config::default().export_name(name));
    }
    // Opt mode too: the name would go out with opt_go.
    refused_at_birth(
        Config::default()
            .export_name("x".repeat(MAX_STRING_LEN + 1))
            .opt_mode(true),
    );
    // The limit itself is fine.
    let ok = Config::default().export_name("x".repeat(MAX_STRING_LEN));
    ok.validate().unwrap();
    assert!(!Connection::new(ok).is_dead());
}

#[test]
fn a_meta_context_name_the_protocol_cannot_carry_is_refused_before_any_byte() {
    for name in ["m".repeat(MAX_STRING_LEN + 1), "base\0allocation".into()] {
        refused_at_birth(
            Config::default()
                .meta_context("base:allocation")
                .meta_context(name),
        );
    }
}

#[test]
fn the_setters_apply_the_same_limits() {
    let mut conn = Connection::new(compact());
    assert_einval(&conn.set_export_name("a\0b").unwrap_err());
    assert_einval(
        &conn
            .set_export_name(&"x".repeat(MAX_STRING_LEN + 1))
            .unwrap_err(),
    );
    assert_eq!(conn.export_name(), "");
    assert_einval(
        &conn
            .add_meta_context(&"m".repeat(MAX_STRING_LEN + 1))
            .unwrap_err(),
    );
    assert_einval(&conn.add_meta_context("a\0b").unwrap_err());
    assert!(conn.requested_meta_contexts().is_empty());
    conn.add_meta_context("base:allocation").unwrap();
    assert_eq!(conn.requested_meta_contexts(), ["base:allocation"]);
    // The URI parser's limit is the same number.
    assert_eq!(nbd_proto::uri::MAX_EXPORT_NAME_LEN, MAX_STRING_LEN);
    assert!(nbd_proto::uri::parse(&format!("nbd://h/{}", "x".repeat(MAX_STRING_LEN + 1))).is_err());
}

#[test]
fn every_event_path_still_reports_the_config_error() {
    let mut conn = Connection::new(Config::default().export_name("x".repeat(MAX_STRING_LEN + 1)));
    match conn.poll_event() {
        Some(Event::Closed { error: Some(e) }) => assert_einval(&e),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        conn.pread(buffer(1, 0), 0, CmdFlags::empty())
            .unwrap_err()
            .errno(),
        Errno::Inval
    );
}

// ---------------------------------------------------------------- misuse anywhere

/// Commands whose requests and replies exercise every byte path: a large read
/// (zero-copy region), a small one in two chunks, a write and a flush.
fn issue(conn: &mut Connection) -> Vec<Cookie> {
    vec![
        conn.pread(buffer(100_000, 0), 0, CmdFlags::empty())
            .unwrap(),
        conn.pread(buffer(600, 0), 4096, CmdFlags::empty()).unwrap(),
        conn.pwrite(Bytes::from(pattern(3000, 1)), 8192, CmdFlags::empty())
            .unwrap(),
        conn.flush(CmdFlags::empty()).unwrap(),
    ]
}

fn replies(c: &[Cookie]) -> Vec<u8> {
    Script::new()
        .data(c[1], 4096, &pattern(300, 2), false)
        .simple(c[2], 0, &[])
        .data(c[0], 0, &pattern(100_000, 3), true)
        .hole(c[1], 4396, 300, true)
        .simple(c[3], 0, &[])
        .take()
}

/// What a run leaves: the bytes sent and every event, as text.
fn transcript(conn: &mut Connection, sent: Vec<u8>) -> (Vec<u8>, Vec<String>) {
    let events = drain(conn).iter().map(|e| format!("{e:?}")).collect();
    (sent, events)
}

/// The run without misuse.
fn clean_run() -> (Vec<u8>, Vec<String>) {
    let mut conn = ready(Export::default());
    let cookies = issue(&mut conn);
    let sent = conn.take_output();
    feed(&mut conn, &replies(&cookies));
    transcript(&mut conn, sent)
}

/// The same run through the zero-copy calls in random pieces, with a misuse
/// of some kind before many of the calls. Every misuse must be refused with
/// EINVAL, and the run must end exactly as the clean one.
fn run_with_misuse(seed: u64) -> (Vec<u8>, Vec<String>) {
    let mut rng = Rng::new(seed);
    let mut conn = ready(Export::default());
    let cookies = issue(&mut conn);
    let mut refused = 0;
    let misuse = |conn: &mut Connection, rng: &mut Rng, offered: Option<usize>| -> usize {
        if !rng.chance(0.4) {
            return 0;
        }
        let e = match (rng.below(2), offered) {
            (0, Some(len)) => conn.notify_read(len + 1 + rng.below(1000) as usize),
            _ => conn.notify_write(usize::MAX - rng.below(10) as usize),
        };
        assert_einval(&e.unwrap_err());
        1
    };
    // Out: partial writes, misuse in between.
    let mut sent = Vec::new();
    while conn.wants_write() {
        refused += misuse(&mut conn, &mut rng, None);
        let listed = {
            let mut iov = [IoSlice::new(&[]); 3];
            let n = conn.output(&mut iov);
            let flat: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
            let take = (rng.between(1, 2000) as usize).min(flat.len());
            sent.extend_from_slice(&flat[..take]);
            (take, flat.len())
        };
        assert_einval(&conn.notify_write(listed.1 + 1).unwrap_err());
        conn.notify_write(listed.0).unwrap();
    }
    // In: random reads, misuse before and after each report.
    let bytes = replies(&cookies);
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let buf = conn.recv_buf();
        let len = buf.len();
        let n = (rng.between(1, 40_000) as usize).min(len).min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        refused += misuse(&mut conn, &mut rng, Some(len));
        conn.notify_read(n).unwrap();
        rest = &rest[n..];
        // No offer is left now: any report is refused. At least one misuse
        // is made in every run, whatever the seed draws.
        if rng.chance(0.3) || refused == 0 {
            assert_einval(&conn.notify_read(1 + rng.below(50) as usize).unwrap_err());
            refused += 1;
        }
    }
    transcript(&mut conn, sent)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn misuse_anywhere_changes_nothing(seed in proptest::prelude::any::<u64>()) {
        let clean = clean_run();
        let misused = run_with_misuse(seed);
        proptest::prop_assert_eq!(&misused.0, &clean.0, "bytes sent differ");
        proptest::prop_assert_eq!(&misused.1, &clean.1, "events differ");
    }
}
