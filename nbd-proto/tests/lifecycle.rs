//! How a connection ends, and the exactly-once promise of completions: every
//! command issued completes exactly once, however the connection goes.

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use nbd_proto::wire::consts::*;
use nbd_proto::{CmdFlags, Connection, Cookie, Direction, Errno, Error, Event};
use support::*;

/// Every cookie of `issued` has exactly one `Completed` event, and no other does.
fn assert_exactly_once(issued: &[Cookie], events: &[Event]) {
    let mut count: HashMap<Cookie, usize> = HashMap::new();
    for e in events {
        if let Event::Completed(c) = e {
            *count.entry(c.cookie).or_default() += 1;
        }
    }
    for cookie in issued {
        assert_eq!(count.remove(cookie), Some(1), "{cookie:?} in {events:?}");
    }
    assert!(
        count.is_empty(),
        "completions for cookies never issued: {count:?}"
    );
}

/// Issues a mix of commands on a structured connection.
fn issue_mix(conn: &mut Connection) -> Vec<Cookie> {
    let mut issued = vec![
        conn.pread(buffer(1024, 0), 0, CmdFlags::empty()).unwrap(),
        conn.pread_structured(buffer(1024, 0), 1024, CmdFlags::empty())
            .unwrap(),
        conn.pwrite(Bytes::from_static(&[1; 512]), 4096, CmdFlags::FUA)
            .unwrap(),
        conn.flush(CmdFlags::empty()).unwrap(),
        conn.trim(512, 0, CmdFlags::empty()).unwrap(),
        conn.zero(512, 512, CmdFlags::empty()).unwrap(),
        conn.cache(512, 0, CmdFlags::empty()).unwrap(),
    ];
    for i in 0..8 {
        issued.push(
            conn.pread(buffer(512, 0), 8192 + i * 512, CmdFlags::empty())
                .unwrap(),
        );
    }
    assert_eq!(sent_requests(conn).len(), issued.len());
    issued
}

#[test]
fn exactly_once_when_every_command_is_answered_with_successes_errors_and_violations() {
    let mut conn = ready(Export::default());
    let issued = issue_mix(&mut conn);
    let mut s = Script::new();
    // Answer in reverse, mixing outcomes.
    for (i, cookie) in issued.iter().enumerate().rev() {
        match i {
            0 => s
                .data(*cookie, 512, &[1; 512], false)
                .hole(*cookie, 0, 512, true),
            1 => s
                .error_chunk(*cookie, EIO, "x", Some(1024), false)
                .data(*cookie, 1024, &[2; 1024], true),
            2 => s.simple(*cookie, ENOSPC, &[]),
            3 => s.none(*cookie),
            4 => s.chunk(*cookie, false, REPLY_TYPE_NONE, &[]), // violation, retires
            5 => s.chunk(*cookie, true, 999, &[0; 10]),         // violation, skipped
            6 => s.error_chunk(*cookie, ENOTSUP, "", None, true),
            _ => s
                .data(*cookie, 8192 + (i as u64 - 7) * 512, &[3; 256], false)
                .data(*cookie, 8192 + (i as u64 - 7) * 512 + 256, &[3; 256], true),
        };
    }
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert_exactly_once(&issued, &events);
    let done = completions_by_cookie(events);
    assert!(done[&issued[0]].result.is_ok());
    assert_eq!(
        done[&issued[1]].result.as_ref().unwrap_err().errno(),
        Errno::Io
    );
    assert_eq!(
        done[&issued[2]].result.as_ref().unwrap_err().errno(),
        Errno::NoSpc
    );
    assert!(done[&issued[3]].result.is_ok());
    assert_eq!(
        done[&issued[4]].result.as_ref().unwrap_err().errno(),
        Errno::Proto
    );
    assert_eq!(
        done[&issued[5]].result.as_ref().unwrap_err().errno(),
        Errno::Proto
    );
    assert_eq!(
        done[&issued[6]].result.as_ref().unwrap_err().errno(),
        Errno::NotSup
    );
    for c in &issued[7..] {
        assert!(done[c].result.is_ok());
    }
    assert!(conn.is_ready());
}

#[test]
fn exactly_once_when_the_connection_dies_half_way() {
    let mut conn = ready(Export::default());
    let issued = issue_mix(&mut conn);
    let mut s = Script::new();
    // Some finish, one is half-way through a multi-chunk reply, then garbage.
    s.none(issued[3])
        .simple(issued[4], 0, &[])
        .data(issued[0], 0, &[1; 512], false)
        .raw(&[0xba; 20]);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert_exactly_once(&issued, &events);
    assert_dead(&conn, &events, Errno::Proto);
    let done = completions_by_cookie(events);
    assert!(done[&issued[3]].result.is_ok());
    assert!(done[&issued[4]].result.is_ok());
    for c in issued
        .iter()
        .filter(|c| **c != issued[3] && **c != issued[4])
    {
        assert_eq!(done[c].result.as_ref().unwrap_err().errno(), Errno::NotConn);
    }
    // Nothing more ever completes.
    assert!(conn.handle_input(&[0; 100]).is_err());
    assert!(drain(&mut conn).is_empty());
}

#[test]
fn exactly_once_when_a_retired_command_gets_another_chunk() {
    let mut conn = ready(Export::default());
    let issued = issue_mix(&mut conn);
    // NONE without DONE retires issued[3]; its next chunk names a finished cookie.
    feed(
        &mut conn,
        &Script::new()
            .chunk(issued[3], false, REPLY_TYPE_NONE, &[])
            .none(issued[3])
            .take(),
    );
    let events = drain(&mut conn);
    assert_exactly_once(&issued, &events);
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn exactly_once_on_eof_and_after_a_split_reply() {
    let mut conn = ready(Export::default());
    let issued = issue_mix(&mut conn);
    let bytes = Script::new().data(issued[0], 0, &[1; 1024], true).take();
    for b in &bytes[..bytes.len() - 1] {
        feed(&mut conn, std::slice::from_ref(b));
    }
    assert!(drain(&mut conn).is_empty());
    feed(&mut conn, &bytes[bytes.len() - 1..]);
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_exactly_once(&issued, &events);
    assert_dead(&conn, &events, Errno::NotConn);
}

#[test]
fn exactly_once_through_a_disconnect() {
    let mut conn = ready(Export::default());
    let issued = issue_mix(&mut conn);
    conn.disconnect().unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    for c in &issued[..5] {
        s.simple(*c, EIO, &[]);
    }
    feed(&mut conn, &s.take());
    // The server hangs up with commands still unanswered.
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_exactly_once(&issued, &events);
    assert!(matches!(events.last(), Some(Event::Closed { error: None })));
}

#[test]
fn server_eshutdown_starts_a_soft_disconnect() {
    let mut conn = ready(Export::default());
    let a = conn.flush(CmdFlags::empty()).unwrap();
    let b = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let c = conn.trim(512, 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &Script::new().simple(a, ESHUTDOWN, &[]).take());
    let done = one_completion(&mut conn);
    assert_eq!(done.cookie, a);
    assert_eq!(
        done.result,
        Err(Error::Server {
            errno: Errno::Shutdown,
            message: None
        })
    );
    assert!(conn.is_ready());
    // No new commands.
    let e = conn
        .pread(buffer(512, 0), 0, CmdFlags::empty())
        .unwrap_err();
    assert!(matches!(e, Error::Shutdown(_)));
    assert_eq!(e.errno(), Errno::Shutdown);
    assert_eq!(
        conn.flush(CmdFlags::empty()).unwrap_err().errno(),
        Errno::Shutdown
    );
    // Nothing is sent while commands are in flight.
    assert!(conn.take_output().is_empty());

    feed(&mut conn, &Script::new().data(b, 0, &[1; 512], true).take());
    assert!(one_completion(&mut conn).result.is_ok());
    assert!(conn.take_output().is_empty(), "c is still in flight");

    feed(&mut conn, &Script::new().none(c).take());
    assert!(one_completion(&mut conn).result.is_ok());
    // Now nothing is in flight: NBD_CMD_DISC, once.
    assert_eq!(conn.direction(), Direction::Both);
    let reqs = sent_requests(&mut conn);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header.command, CMD_DISC);
    assert_eq!(reqs[0].header.cookie, 0);
    // Written: the connection closes as asked.
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::Closed { error: None }]
    ));
    assert!(conn.is_closed());
    assert_eq!(conn.direction(), Direction::None);
}

#[test]
fn eshutdown_error_chunk_on_the_last_command_disconnects_at_once() {
    let mut conn = ready(Export::default());
    let a = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .error_chunk(a, ESHUTDOWN, "maintenance", None, true)
            .take(),
    );
    let done = one_completion(&mut conn);
    assert_eq!(done.result.unwrap_err().errno(), Errno::Shutdown);
    let reqs = sent_requests(&mut conn);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header.command, CMD_DISC);
    assert!(conn.is_closed());
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::Closed { error: None }]
    ));
}

#[test]
fn disconnect_waits_for_commands_in_flight_before_sending_disc() {
    let mut conn = ready(Export::default());
    let a = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let w = conn
        .pwrite(Bytes::from(pattern(512, 3)), 512, CmdFlags::empty())
        .unwrap();
    let b = conn.flush(CmdFlags::empty()).unwrap();
    conn.disconnect().unwrap();
    // No new command once disconnecting; a second disconnect is harmless.
    assert_eq!(
        conn.flush(CmdFlags::empty()).unwrap_err().errno(),
        Errno::Shutdown
    );
    conn.disconnect().unwrap();
    // The commands go out; NBD_CMD_DISC does not, while they are in flight.
    let reqs = sent_requests(&mut conn);
    let commands: Vec<_> = reqs.iter().map(|r| r.header.command).collect();
    assert_eq!(commands, vec![CMD_READ, CMD_WRITE, CMD_FLUSH]);
    assert!(!conn.is_closed());
    assert_eq!(conn.direction(), Direction::Read);

    let data = pattern(512, 5);
    feed(&mut conn, &Script::new().data(a, 0, &data, true).take());
    let done = one_completion(&mut conn);
    assert!(done.result.is_ok());
    assert_eq!(&done.buffer.unwrap()[..], &data[..]);
    assert!(
        conn.take_output().is_empty(),
        "the write is still in flight"
    );
    feed(&mut conn, &Script::new().none(w).take());
    assert!(one_completion(&mut conn).result.is_ok());
    assert!(
        conn.take_output().is_empty(),
        "the flush is still in flight"
    );

    // The last reply: DISC is queued, and Closed waits until it is written.
    feed(&mut conn, &Script::new().simple(b, 0, &[]).take());
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Completed(c)] if c.cookie == b && c.result.is_ok()),
        "{events:?}"
    );
    assert!(!conn.is_closed());
    assert_eq!(conn.direction(), Direction::Both);
    let reqs = sent_requests(&mut conn);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header.command, CMD_DISC);
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::Closed { error: None }]
    ));
    assert!(conn.is_closed());
    assert!(!conn.is_dead());
    assert_eq!(conn.error(), None);
    assert_eq!(conn.direction(), Direction::None);
    assert_eq!(
        conn.pread(buffer(1, 0), 0, CmdFlags::empty())
            .unwrap_err()
            .errno(),
        Errno::NotConn
    );
    // The server hanging up afterwards is expected: no error, no new event.
    conn.notify_read(0).unwrap();
    assert!(drain(&mut conn).is_empty());
    assert!(conn.is_closed());
}

#[test]
fn disconnect_waits_for_failed_commands_too() {
    // A command the server fails still counts as done: DISC follows it.
    let mut conn = ready(Export::default());
    let a = conn.flush(CmdFlags::empty()).unwrap();
    conn.disconnect().unwrap();
    assert_eq!(sent_request(&mut conn).header.command, CMD_FLUSH);
    feed(&mut conn, &Script::new().simple(a, EIO, &[]).take());
    let done = one_completion(&mut conn);
    assert_eq!(errno_of(&done.result), Errno::Io);
    assert_eq!(sent_request(&mut conn).header.command, CMD_DISC);
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::Closed { error: None }]
    ));
}

#[test]
fn disconnect_then_server_eof_closes_without_error() {
    // The server answers and hangs up before the client's DISC was even written.
    let mut conn = ready(Export::default());
    let a = conn.flush(CmdFlags::empty()).unwrap();
    conn.disconnect().unwrap();
    feed(&mut conn, &Script::new().simple(a, 0, &[]).take());
    assert!(one_completion(&mut conn).result.is_ok());
    assert!(!conn.is_closed(), "the DISC request is not written yet");
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Closed { error: None }]),
        "{events:?}"
    );
    assert!(conn.is_closed());
    assert!(!conn.wants_write(), "nothing left to write after close");

    // With commands unanswered, they fail with NotConn but the close is clean.
    let mut conn = ready(Export::default());
    let a = conn.flush(CmdFlags::empty()).unwrap();
    conn.disconnect().unwrap();
    let _ = conn.take_output();
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        matches!(&events[0], Event::Completed(c) if c.cookie == a && c.result.as_ref().unwrap_err().errno() == Errno::NotConn)
    );
    assert!(matches!(&events[1], Event::Closed { error: None }));
}

#[test]
fn eof_in_transmission_without_disconnect_is_an_error() {
    let mut conn = ready(Export::default());
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::NotConn);
}

#[test]
fn disconnect_is_refused_before_transmission() {
    let mut conn = Connection::new(compact().opt_mode(true));
    assert!(matches!(conn.disconnect(), Err(Error::InvalidState(_))));
    feed(
        &mut conn,
        &Script::new()
            .newstyle(FLAG_FIXED_NEWSTYLE)
            .ack(OPT_STRUCTURED_REPLY)
            .take(),
    );
    let _ = conn.take_output();
    assert!(conn.is_negotiating());
    assert!(matches!(conn.disconnect(), Err(Error::InvalidState(_))));
    assert!(conn.take_output().is_empty());
}

#[test]
fn commands_lost_to_a_dead_connection_keep_its_typed_cause() {
    let mut conn = ready(Export::default());
    let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    // A reply magic no server may send: framing is lost, the connection dies.
    let _ = conn.handle_input(&[0xde, 0xad, 0xbe, 0xef]);
    let events = drain(&mut conn);
    let cause = conn.error().cloned().expect("the connection is dead");
    assert!(matches!(cause, Error::Protocol(_)), "{cause:?}");
    let done = completions(events)
        .into_iter()
        .find(|c| c.cookie == read)
        .expect("the read completed");
    let err = done.result.unwrap_err();
    assert_eq!(err.errno(), Errno::NotConn);
    assert!(
        matches!(&err, Error::ConnectionLost(c) if **c == cause),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("connection lost: {cause}"));
}

#[test]
fn a_server_hanging_up_is_said_once() {
    let mut conn = ready(Export::default());
    let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    conn.notify_read(0).unwrap();
    let done = completions(drain(&mut conn))
        .into_iter()
        .find(|c| c.cookie == read)
        .expect("the read completed");
    let text = done.result.unwrap_err().to_string();
    assert_eq!(text, "not connected: server closed the connection");
}
