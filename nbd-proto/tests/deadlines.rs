//! Deadlines in virtual time: the handshake's, a command's and the stall's.
//!
//! The core owns no clock, so every instant here is made up from one base
//! `Instant` plus offsets; no test sleeps, and each deadline is checked one
//! nanosecond before it and exactly at it.

mod support;

use std::time::{Duration, Instant};

use nbd_proto::wire::consts::*;
use nbd_proto::{CmdFlags, Connection, Cookie, Errno, Error, Phase};
use support::*;

const NS: Duration = Duration::from_nanos(1);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A ready connection with the given command and stall timeouts, whose clock
/// has been told `t0`.
fn timed(
    export: Export,
    command: Option<Duration>,
    stall: Option<Duration>,
    t0: Instant,
) -> Connection {
    let config = compact().command_timeout(command).stall_timeout(stall);
    let mut conn = handshake(config, export);
    conn.handle_timeout(t0);
    conn
}

fn is_timed_out(result: &Result<(), Error>) -> bool {
    matches!(result, Err(Error::TimedOut(_))) && errno_of(result) == Errno::TimedOut
}

// ---------------------------------------------------------------- handshake

#[test]
fn handshake_deadline_fires_exactly_when_reached() {
    let t0 = Instant::now();
    let mut conn = Connection::new(compact().handshake_timeout(Some(secs(10))));
    // Before the time was ever passed in, there is nothing to wait for.
    assert_eq!(conn.poll_timeout(), None);
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(10)));

    // Server bytes do not move the handshake deadline: it covers the whole handshake.
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let _ = conn.take_output();
    conn.handle_timeout(t0 + secs(5));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(10)));

    conn.handle_timeout(t0 + secs(10) - NS);
    assert_eq!(conn.phase(), Phase::Handshake);
    assert!(drain(&mut conn).is_empty());

    conn.handle_timeout(t0 + secs(10));
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::TimedOut);
    assert!(matches!(conn.error(), Some(Error::TimedOut(_))));
    assert_eq!(conn.poll_timeout(), None);
    // Later times change nothing.
    conn.handle_timeout(t0 + secs(100));
    assert!(drain(&mut conn).is_empty());
}

#[test]
fn handshake_finished_in_time_is_not_killed_later() {
    let t0 = Instant::now();
    let config = compact()
        .handshake_timeout(Some(secs(10)))
        .command_timeout(None);
    let mut conn = handshake(config, Export::default());
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), None);
    conn.handle_timeout(t0 + secs(3600));
    assert!(conn.is_ready());
    assert!(drain(&mut conn).is_empty());
}

#[test]
fn handshake_deadline_starts_at_the_first_time_passed_in() {
    let t0 = Instant::now();
    let mut conn = Connection::new(compact().handshake_timeout(Some(secs(2))));
    conn.handle_timeout(t0 + secs(7));
    conn.handle_timeout(t0 + secs(9) - NS);
    assert_eq!(conn.phase(), Phase::Handshake);
    // A time earlier than one seen counts as the one seen.
    conn.handle_timeout(t0);
    assert_eq!(conn.phase(), Phase::Handshake);
    conn.handle_timeout(t0 + secs(9));
    assert!(conn.is_dead());
}

// ---------------------------------------------------------------- commands

#[test]
fn command_deadline_completes_once_with_its_buffer() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), Some(secs(5)), None, t0);
    assert_eq!(conn.poll_timeout(), None, "nothing in flight");

    let a = conn.pread(buffer(512, 0xaa), 0, CmdFlags::empty()).unwrap();
    let b = conn.flush(CmdFlags::empty()).unwrap();
    // Issued but not started: the connection asks for the time at once.
    assert_eq!(conn.poll_timeout(), Some(t0));
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(5)));

    conn.handle_timeout(t0 + secs(2));
    let c = conn.pread(buffer(16, 0), 4096, CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0 + secs(2));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(5)));
    let _ = conn.take_output();

    conn.handle_timeout(t0 + secs(5) - NS);
    assert!(drain(&mut conn).is_empty());
    assert_eq!(conn.in_flight(), 3);

    conn.handle_timeout(t0 + secs(5));
    let events = drain(&mut conn);
    assert_completed_once(&events, &[a, b]);
    let done = completions_by_cookie(events);
    assert!(is_timed_out(&done[&a].result));
    assert!(is_timed_out(&done[&b].result));
    let back = done[&a]
        .buffer
        .as_ref()
        .expect("the read buffer comes back");
    assert_eq!(back.len(), 512);
    assert!(done[&b].buffer.is_none());

    // Only `c` is in flight for the caller; the others are completed.
    assert!(conn.is_ready());
    assert_eq!(conn.in_flight(), 1);
    assert!(!conn.is_in_flight(a) && !conn.is_in_flight(b) && conn.is_in_flight(c));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(7)));

    // Completed once: later times add nothing for them.
    conn.handle_timeout(t0 + secs(6));
    assert!(drain(&mut conn).is_empty());

    // `c` is unaffected by the others and answered in time.
    let mut s = Script::new();
    let data_c = pattern(16, 3);
    feed(&mut conn, &s.data(c, 4096, &data_c, true).take());
    let got = one_completion(&mut conn);
    assert_eq!(got.cookie, c);
    assert_eq!(got.result, Ok(()));
    assert_eq!(&got.buffer.unwrap()[..], &data_c[..]);
    assert_eq!(conn.poll_timeout(), None, "only tombstones are left");
}

/// Times out a read and a flush, then lets their late replies arrive (and
/// returns the connection with no tombstone left).
fn late_replies_are_dropped(export: Export, late: impl Fn(&mut Script, Cookie, Cookie)) {
    let t0 = Instant::now();
    let mut conn = timed(export, Some(secs(1)), None, t0);
    let a = conn.pread(buffer(512, 0xaa), 0, CmdFlags::empty()).unwrap();
    let b = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    conn.handle_timeout(t0);
    conn.handle_timeout(t0 + secs(1));
    assert_completed_once(&drain(&mut conn), &[a, b]);

    // Commands issued while the tombstones wait never reuse their cookies.
    let d = conn.pread(buffer(512, 0), 512, CmdFlags::empty()).unwrap();
    assert!(d != a && d != b);
    let _ = conn.take_output();

    let mut s = Script::new();
    late(&mut s, a, b);
    feed(&mut conn, &s.take());
    assert!(conn.is_ready(), "{:?}", conn.error());
    assert!(drain(&mut conn).is_empty(), "late replies are dropped");
    assert_eq!(conn.in_flight(), 1);

    // The next command works and gets its own reply only.
    let data_d = pattern(512, 9);
    if export.structured {
        s.data(d, 512, &data_d, true);
    } else {
        s.simple(d, 0, &data_d);
    }
    feed(&mut conn, &s.take());
    let got = one_completion(&mut conn);
    assert_eq!(got.cookie, d);
    assert_eq!(got.result, Ok(()));
    assert_eq!(&got.buffer.unwrap()[..], &data_d[..]);

    // With the tombstones gone their slots are reused, under new cookies.
    let e = conn.flush(CmdFlags::empty()).unwrap();
    assert!(e != a && e != b && e != d);
    // A second reply naming an old cookie is a reply for a finished command.
    feed(&mut conn, &s.simple(b, 0, &[]).take());
    assert!(conn.is_dead());
    let events = drain(&mut conn);
    assert_completed_once(&events, &[e]);
}

#[test]
fn late_structured_replies_with_payload_are_consumed_and_dropped() {
    late_replies_are_dropped(Export::default(), |s, a, b| {
        s.data(a, 0, &pattern(256, 1), false)
            .hole(a, 256, 128, false)
            .error_chunk(a, EIO, "late", Some(384), false)
            .data(a, 384, &pattern(128, 2), true)
            .none(b);
    });
}

#[test]
fn late_simple_replies_with_payload_are_consumed_and_dropped() {
    late_replies_are_dropped(Export::simple(), |s, a, b| {
        s.simple(a, 0, &pattern(512, 1)).simple(b, EIO, &[]);
    });
}

#[test]
fn late_chunks_of_a_timed_out_structured_read_raise_no_events() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), Some(secs(1)), None, t0);
    let a = conn
        .pread_structured(buffer(64, 0), 0, CmdFlags::empty())
        .unwrap();
    conn.handle_timeout(t0);
    conn.handle_timeout(t0 + secs(1));
    let got = one_completion(&mut conn);
    assert!(is_timed_out(&got.result));
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.data(a, 0, &pattern(32, 1), false)
            .hole(a, 32, 32, true)
            .take(),
    );
    assert!(conn.is_ready());
    assert!(drain(&mut conn).is_empty());
}

#[test]
fn a_late_reply_breaking_framing_still_kills() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), Some(secs(1)), None, t0);
    let a = conn.pread(buffer(64, 0), 0, CmdFlags::empty()).unwrap();
    let b = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0);
    conn.handle_timeout(t0 + secs(1));
    assert_completed_once(&drain(&mut conn), &[a, b]);
    let c = conn.flush(CmdFlags::empty()).unwrap();
    // A data chunk longer than the timed-out read allows: the length rule holds.
    let mut s = Script::new();
    feed(&mut conn, &s.data(a, 0, &pattern(65, 1), true).take());
    let events = drain(&mut conn);
    assert_completed_once(&events, &[c]);
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn disconnect_waits_for_late_replies() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), Some(secs(1)), None, t0);
    let a = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    conn.handle_timeout(t0);
    conn.handle_timeout(t0 + secs(1));
    assert_completed_once(&drain(&mut conn), &[a]);
    conn.disconnect().unwrap();
    assert!(!conn.wants_write(), "DISC waits for the late reply");
    let mut s = Script::new();
    feed(&mut conn, &s.none(a).take());
    let sent = sent_requests(&mut conn);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header.command, CMD_DISC);
    assert!(conn.is_closed());
}

#[test]
fn each_command_keeps_the_timeout_it_was_issued_with() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), None, None, t0);
    let untimed = conn.flush(CmdFlags::empty()).unwrap();
    conn.set_command_timeout(Some(secs(2)));
    assert_eq!(conn.command_timeout(), Some(secs(2)));
    let short = conn.flush(CmdFlags::empty()).unwrap();
    conn.set_command_timeout(Some(secs(9)));
    let long = conn.flush(CmdFlags::empty()).unwrap();
    conn.set_command_timeout(None);
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(2)));
    conn.handle_timeout(t0 + secs(2));
    assert_eq!(one_completion(&mut conn).cookie, short);
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(9)));
    let mut s = Script::new();
    feed(&mut conn, &s.none(long).take());
    assert_eq!(one_completion(&mut conn).result, Ok(()));
    // Only the untimed command and a tombstone are left: nothing to wait for.
    assert_eq!(conn.poll_timeout(), None);
    conn.handle_timeout(t0 + secs(1000));
    assert!(drain(&mut conn).is_empty());
    assert!(conn.is_in_flight(untimed));
}

// ---------------------------------------------------------------- stall

#[test]
fn stall_deadline_kills_and_fails_every_pending_command_once() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), None, Some(secs(3)), t0);
    assert_eq!(conn.poll_timeout(), None, "idle: nothing to wait for");
    conn.handle_timeout(t0 + secs(100));
    assert!(conn.is_ready(), "an idle connection does not stall");

    let t1 = t0 + secs(100);
    let a = conn.pread(buffer(64, 0), 0, CmdFlags::empty()).unwrap();
    let b = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    conn.handle_timeout(t1);
    assert_eq!(conn.poll_timeout(), Some(t1 + secs(3)));

    // A byte from the server starts the stall deadline over.
    let mut s = Script::new();
    let reply = s.data(a, 0, &pattern(64, 4), true).take();
    feed(&mut conn, &reply[..5]);
    conn.handle_timeout(t1 + secs(2));
    assert_eq!(conn.poll_timeout(), Some(t1 + secs(5)));
    conn.handle_timeout(t1 + secs(5) - NS);
    assert!(conn.is_ready());
    assert!(drain(&mut conn).is_empty());

    conn.handle_timeout(t1 + secs(5));
    let events = drain(&mut conn);
    assert_completed_once(&events, &[a, b]);
    assert_dead(&conn, &events, Errno::TimedOut);
    for c in completions(events) {
        assert!(
            matches!(&c.result, Err(Error::ConnectionLost(cause)) if cause.errno() == Errno::TimedOut),
            "{:?}",
            c.result
        );
    }
    assert_eq!(conn.poll_timeout(), None);
}

#[test]
fn stall_deadline_restarts_with_the_first_command_after_idle() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), None, Some(secs(3)), t0);
    let a = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0);
    let mut s = Script::new();
    feed(&mut conn, &s.none(a).take());
    assert_eq!(one_completion(&mut conn).result, Ok(()));
    conn.handle_timeout(t0 + secs(10));
    let b = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0 + secs(10));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(13)));
    conn.handle_timeout(t0 + secs(13) - NS);
    assert!(conn.is_ready());
    conn.handle_timeout(t0 + secs(13));
    let events = drain(&mut conn);
    assert_completed_once(&events, &[b]);
    assert_dead(&conn, &events, Errno::TimedOut);
}

#[test]
fn set_stall_timeout_restarts_the_clock_with_the_new_length_or_stops_it() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), None, Some(secs(3)), t0);
    let a = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(3)));
    // Longer: counted afresh from the next time passed in, not from t0.
    conn.set_stall_timeout(Some(secs(10)));
    assert_eq!(conn.stall_timeout(), Some(secs(10)));
    conn.handle_timeout(t0 + secs(2));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(12)));
    conn.handle_timeout(t0 + secs(5));
    assert!(conn.is_ready(), "the old 3 s limit no longer applies");
    // Off: nothing is timed and nothing fires, however long.
    conn.set_stall_timeout(None);
    conn.handle_timeout(t0 + secs(1000));
    assert_eq!(conn.poll_timeout(), None);
    assert!(conn.is_ready());
    assert!(drain(&mut conn).is_empty());
    let mut s = Script::new();
    feed(&mut conn, &s.none(a).take());
    assert_eq!(one_completion(&mut conn).result, Ok(()));
}

// ---------------------------------------------------------------- poll_timeout

#[test]
fn poll_timeout_is_none_without_timeouts() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), None, None, t0);
    let _a = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), None);
    conn.handle_timeout(t0 + secs(1_000_000));
    assert_eq!(conn.in_flight(), 1);
    assert!(drain(&mut conn).is_empty());
}

#[test]
fn poll_timeout_gives_the_earliest_deadline() {
    let t0 = Instant::now();
    let mut conn = timed(Export::default(), Some(secs(4)), Some(secs(10)), t0);
    let a = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(4)));
    conn.handle_timeout(t0 + secs(1));
    let b = conn.flush(CmdFlags::empty()).unwrap();
    conn.handle_timeout(t0 + secs(1));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(4)));
    let mut s = Script::new();
    feed(&mut conn, &s.none(a).take());
    assert_eq!(one_completion(&mut conn).cookie, a);
    // `a` answered: `b`'s deadline is next, then the stall's.
    conn.handle_timeout(t0 + secs(1));
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(5)));
    conn.handle_timeout(t0 + secs(5));
    assert_eq!(one_completion(&mut conn).cookie, b);
    // Only a tombstone is left, awaited by the stall deadline that started
    // with the last server byte.
    assert_eq!(conn.poll_timeout(), Some(t0 + secs(11)));
    conn.handle_timeout(t0 + secs(11));
    assert!(conn.is_dead());
    assert_eq!(conn.error().map(Error::errno), Some(Errno::TimedOut));
}

// ---------------------------------------------------------------- splits

#[test]
fn late_replies_are_split_invariant() {
    let modes = [
        Mode::Whole,
        Mode::RandomSplits,
        Mode::ByteAtATime,
        Mode::ZeroCopy,
    ];
    let mut outcomes = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        let t0 = Instant::now();
        let mut conn = timed(Export::default(), Some(secs(1)), None, t0);
        let a = conn
            .pread(buffer(100_000, 0), 0, CmdFlags::empty())
            .unwrap();
        conn.handle_timeout(t0);
        conn.handle_timeout(t0 + secs(1));
        let _ = drain(&mut conn);
        let d = conn.pread(buffer(70_000, 0), 0, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let mut s = Script::new();
        s.data(a, 0, &pattern(60_000, 1), false)
            .data(a, 60_000, &pattern(40_000, 2), true)
            .data(d, 0, &pattern(70_000, 3), true);
        let mut rng = Rng::new(i as u64 + 1);
        feed_with(&mut conn, &s.take(), mode, &mut rng);
        let events = drain(&mut conn);
        assert_eq!(events.len(), 1, "{mode:?}: {events:?}");
        outcomes.push(format!("{events:?}").replace(&format!("{d:?}"), "D"));
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]));
}
