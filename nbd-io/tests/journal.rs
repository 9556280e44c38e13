//! The reconnect journal against the in-memory fake server: a connection is
//! lost with commands in flight, a second connection to the same image takes
//! over, and the journal sends the unfinished commands again.

use bytes::{Bytes, BytesMut};
use nbd_io::{ExportIdentity, Journal, ReconnectPolicy, Request};
use nbd_proto::wire::consts::{CMD_FLUSH, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES};
use nbd_proto::{CmdFlags, Completion, Config, Errno, Error, Event};
use nbd_testkit::{FakeServer, Pair};

fn write(data: &'static [u8], offset: u64) -> Request {
    Request::Write {
        data: Bytes::from_static(data),
        offset,
        flags: CmdFlags::empty(),
    }
}

fn read(len: usize, offset: u64) -> Request {
    Request::Read {
        len,
        offset,
        flags: CmdFlags::empty(),
        structured: false,
    }
}

/// Every completion the client reported so far, through the journal.
fn through(pair: &mut Pair, journal: &mut Journal, keep_lost: bool) -> Vec<Completion> {
    pair.events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Completed(c) => journal.complete(c, keep_lost),
            _ => None,
        })
        .collect()
}

fn ready_pair(server: FakeServer) -> Pair {
    let mut pair = Pair::new(Config::default(), server);
    pair.handshake().unwrap();
    pair
}

#[test]
fn unfinished_commands_go_again_in_order_and_finished_ones_never() {
    let first = FakeServer::builder().size(1 << 16).build();
    let mut pair = ready_pair(first);
    let identity = ExportIdentity::of(&pair.client).unwrap();
    let mut journal = Journal::new();

    // One write completes on the first connection.
    let done_early = journal
        .submit(&mut pair.client, write(b"early", 0), None)
        .unwrap();
    pair.drive();
    let early = through(&mut pair, &mut journal, true);
    assert_eq!(early.len(), 1);
    assert_eq!(early[0].cookie, done_early);
    early[0].result.clone().unwrap();

    // Three more are issued, then the server hangs up before answering.
    let w = journal
        .submit(&mut pair.client, write(b"late", 100), None)
        .unwrap();
    let f = journal
        .submit(
            &mut pair.client,
            Request::Flush {
                flags: CmdFlags::empty(),
            },
            None,
        )
        .unwrap();
    let r = journal
        .submit(&mut pair.client, read(4, 100), Some(BytesMut::new()))
        .unwrap();
    pair.client.handle_input(&[]).unwrap_or(());
    let cause = pair.client.error().cloned().expect("dead");
    assert!(ReconnectPolicy::default().counts(&cause), "{cause}");
    assert!(
        through(&mut pair, &mut journal, true).is_empty(),
        "kept back"
    );
    assert_eq!(journal.len(), 3);
    assert!(journal.is_pending(w) && journal.is_pending(f) && journal.is_pending(r));

    // A new connection to the same image.
    let mut second = ready_pair(pair.server.new_connection());
    identity.check(&second.client).unwrap();
    let (sent, refused) = journal.resend(&mut second.client);
    assert!(refused.is_empty());
    // First the acknowledged but unflushed write goes again, alone.
    assert_eq!(sent, 0);
    assert_eq!(journal.held(), 3);
    second.drive();
    assert!(
        through(&mut second, &mut journal, true).is_empty(),
        "the journal's own"
    );
    assert_eq!(second.server.commands_seen(CMD_WRITE), 1);
    // The flush waits for the write before it; the read waits behind it.
    let (sent, _) = journal.send_held(&mut second.client);
    assert_eq!(sent, 1);
    assert_eq!(journal.held(), 2);
    second.drive();
    let mut done = through(&mut second, &mut journal, true);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cookie, w);
    let (sent, _) = journal.send_held(&mut second.client);
    assert_eq!(sent, 2);
    second.drive();
    done.extend(through(&mut second, &mut journal, true));
    let order: Vec<_> = done.iter().map(|c| c.cookie).collect();
    assert_eq!(order, [w, f, r]);
    for c in &done {
        c.result.clone().unwrap();
    }
    assert_eq!(&done[2].buffer.as_ref().unwrap()[..], b"late");
    assert!(journal.is_empty());
    // The write that completed on the first connection went out again
    // (it was not flushed), the unfinished one once.
    assert_eq!(second.server.commands_seen(CMD_WRITE), 2);
    assert_eq!(second.server.commands_seen(CMD_FLUSH), 1);
    assert_eq!(second.server.commands_seen(CMD_READ), 1);
    assert_eq!(&second.server.image_bytes()[..5], b"early");
}

#[test]
fn giving_up_fails_each_kept_command_once_with_the_cause() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::new();
    let cookies: Vec<_> = (0..3)
        .map(|i| {
            journal
                .submit(&mut pair.client, read(16, i * 16), Some(BytesMut::new()))
                .unwrap()
        })
        .collect();
    pair.client.handle_input(&[]).unwrap_or(());
    assert!(through(&mut pair, &mut journal, true).is_empty());
    let cause = pair.client.error().cloned().unwrap();
    let failed = journal.give_up(&cause);
    let got: Vec<_> = failed.iter().map(|c| c.cookie).collect();
    assert_eq!(got, cookies);
    for c in &failed {
        assert!(matches!(&c.result, Err(Error::ConnectionLost(e)) if **e == cause));
        assert_eq!(c.buffer.as_ref().map(|b| b.len()), Some(16), "buffer back");
    }
    assert!(journal.is_empty());
    assert!(journal.give_up(&cause).is_empty(), "once");
}

#[test]
fn a_loss_the_policy_does_not_count_completes_at_once() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::new();
    let cookie = journal
        .submit(&mut pair.client, read(16, 0), Some(BytesMut::new()))
        .unwrap();
    pair.client.handle_input(&[]).unwrap_or(());
    let done = through(&mut pair, &mut journal, false);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cookie, cookie);
    assert_eq!(done[0].result.clone().unwrap_err().errno(), Errno::NotConn);
    assert!(journal.is_empty());
}

#[test]
fn another_export_is_not_the_same_one() {
    let pair = ready_pair(FakeServer::builder().size(8192).build());
    let identity = ExportIdentity::of(&pair.client).unwrap();
    let smaller = ready_pair(FakeServer::builder().size(4096).build());
    assert!(identity
        .check(&smaller.client)
        .unwrap_err()
        .contains("size"));
    let read_only = ready_pair(FakeServer::builder().size(8192).read_only(true).build());
    assert!(identity.check(&read_only.client).is_err());
    let same = ready_pair(FakeServer::builder().size(8192).build());
    identity.check(&same.client).unwrap();
}

#[test]
fn the_policy_counts_hang_ups_and_stalls_but_never_protocol_or_tls_errors() {
    let policy = ReconnectPolicy::new(3);
    assert!(policy.counts(&Error::NotConnected("server closed the connection".into())));
    assert!(policy.counts(&Error::TimedOut("stall".into())));
    assert!(!policy.counts(&Error::Protocol("bad magic".into())));
    assert!(!policy.counts(&Error::Tls("bad certificate".into())));
    let mut no_stall = policy.clone();
    no_stall.on_stall = false;
    assert!(!no_stall.counts(&Error::TimedOut("stall".into())));
    assert_eq!(policy.delay(1), policy.first_delay);
    assert_eq!(policy.delay(40), policy.max_delay);
}

#[test]
fn a_meta_context_no_longer_negotiated_is_another_export() {
    let config = || Config::default().meta_contexts(vec!["base:allocation".to_string()]);
    let mut before = Pair::new(config(), FakeServer::builder().size(8192).build());
    before.handshake().unwrap();
    assert!(before.client.can_meta_context("base:allocation"));
    let identity = ExportIdentity::of(&before.client).unwrap();
    // The same export, where the context is not selected this time.
    let mut without = Pair::new(Config::default(), FakeServer::builder().size(8192).build());
    without.handshake().unwrap();
    let why = identity.check(&without.client).unwrap_err();
    assert!(why.contains("base:allocation"), "{why}");
    let mut again = Pair::new(config(), FakeServer::builder().size(8192).build());
    again.handshake().unwrap();
    identity.check(&again.client).unwrap();
}

fn flush() -> Request {
    Request::Flush {
        flags: CmdFlags::empty(),
    }
}

/// Submits `request` and drives the pair until it completes successfully.
fn done_now(pair: &mut Pair, journal: &mut Journal, request: Request) {
    let cookie = journal.submit(&mut pair.client, request, None).unwrap();
    pair.drive();
    let done = through(pair, journal, true);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cookie, cookie);
    done[0].result.clone().unwrap();
}

/// Hangs the connection up; the journal keeps what was in flight.
fn hang_up(pair: &mut Pair, journal: &mut Journal) {
    pair.client.handle_input(&[]).unwrap_or(());
    assert!(through(pair, journal, true).is_empty(), "kept back");
}

/// A server that restarted without the cache of the one before: a fresh
/// image, all zeroes.
fn restarted(size: u64) -> Pair {
    ready_pair(FakeServer::builder().size(size).build())
}

#[test]
fn an_acknowledged_unflushed_write_is_written_again_before_the_resent_flush() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::new();
    done_now(&mut pair, &mut journal, write(b"one", 0));
    // A later overlapping write: where they overlap, only its bytes go again.
    done_now(&mut pair, &mut journal, write(b"TW", 1));
    assert_eq!(journal.unflushed(), 2);
    let f = journal.submit(&mut pair.client, flush(), None).unwrap();
    hang_up(&mut pair, &mut journal);

    // The new server lost the old one's cache.
    let mut second = restarted(4096);
    let (sent, refused) = journal.resend(&mut second.client);
    assert!(refused.is_empty());
    assert_eq!(sent, 0, "the flush waits for the kept writes");
    second.drive();
    assert!(through(&mut second, &mut journal, true).is_empty());
    assert_eq!(second.server.commands_seen(CMD_WRITE), 2);
    assert_eq!(second.server.commands_seen(CMD_FLUSH), 0);
    assert_eq!(
        &second.server.image_bytes()[..3],
        b"oTW",
        "in submission order"
    );
    let (sent, _) = journal.send_held(&mut second.client);
    assert_eq!(sent, 1);
    second.drive();
    let done = through(&mut second, &mut journal, true);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cookie, f);
    done[0].result.clone().unwrap();
    assert_eq!(journal.unflushed(), 0, "the flush covered them");
}

/// Kept writes go out together, and a server may carry out commands in
/// flight in any order: where they overlap, only what no later one covers
/// is written again, so the order cannot matter.
#[test]
fn overlapping_kept_writes_go_again_as_disjoint_pieces() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::new();
    done_now(&mut pair, &mut journal, write(b"older", 100));
    done_now(&mut pair, &mut journal, write(b"abcdefgh", 0));
    done_now(
        &mut pair,
        &mut journal,
        Request::Zero {
            count: 2,
            offset: 2,
            flags: CmdFlags::empty(),
        },
    );
    done_now(&mut pair, &mut journal, write(b"XY", 6));
    // Covers the first write entirely: it is not written again.
    done_now(&mut pair, &mut journal, write(b"newer", 100));
    assert_eq!(journal.unflushed(), 5);
    hang_up(&mut pair, &mut journal);

    let mut second = restarted(4096);
    let (_, refused) = journal.resend(&mut second.client);
    assert!(refused.is_empty());
    second.drive();
    assert!(through(&mut second, &mut journal, true).is_empty());
    // "ab" and "ef" of the second write, "XY", "newer"; and the zero.
    assert_eq!(second.server.commands_seen(CMD_WRITE), 4);
    assert_eq!(second.server.commands_seen(CMD_WRITE_ZEROES), 1);
    let image = second.server.image_bytes();
    assert_eq!(&image[..8], b"ab\0\0efXY");
    assert_eq!(&image[100..105], b"newer");
    // They all stay kept until a flush covers them.
    assert_eq!(journal.unflushed(), 5);
    done_now(&mut second, &mut journal, flush());
    assert_eq!(journal.unflushed(), 0);
}

#[test]
fn a_flush_clears_only_the_writes_acknowledged_before_it() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::new();
    done_now(&mut pair, &mut journal, write(b"covered", 0));
    // The flush is submitted before the second write is acknowledged.
    let f = journal.submit(&mut pair.client, flush(), None).unwrap();
    let w = journal
        .submit(&mut pair.client, write(b"later", 100), None)
        .unwrap();
    pair.drive();
    let done = through(&mut pair, &mut journal, true);
    let cookies: Vec<_> = done.iter().map(|c| c.cookie).collect();
    assert!(cookies.contains(&f) && cookies.contains(&w), "{cookies:?}");
    assert_eq!(journal.unflushed(), 1, "only the later write is kept");
    hang_up(&mut pair, &mut journal);

    let mut second = restarted(4096);
    journal.resend(&mut second.client);
    second.drive();
    assert!(through(&mut second, &mut journal, true).is_empty());
    assert_eq!(second.server.commands_seen(CMD_WRITE), 1);
    let image = second.server.image_bytes();
    assert_eq!(&image[100..105], b"later");
    assert_eq!(
        &image[..7],
        &[0; 7],
        "the flushed write is not written again"
    );

    // A flush on the new connection clears the rest.
    done_now(&mut second, &mut journal, flush());
    assert_eq!(journal.unflushed(), 0);
}

#[test]
fn over_the_replay_budget_a_pending_flush_fails_once_and_is_never_done() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::with_replay_budget(200);
    done_now(&mut pair, &mut journal, write(b"fits", 0));
    assert!(!journal.over_budget());
    done_now(&mut pair, &mut journal, write(&[7; 300], 512));
    assert!(journal.over_budget());
    assert_eq!(journal.unflushed(), 0, "nothing kept past the budget");
    let f = journal.submit(&mut pair.client, flush(), None).unwrap();
    let fua = journal
        .submit(
            &mut pair.client,
            Request::Write {
                data: Bytes::from_static(b"fua"),
                offset: 1024,
                flags: CmdFlags::FUA,
            },
            None,
        )
        .unwrap();
    hang_up(&mut pair, &mut journal);

    let mut second = restarted(4096);
    journal.resend(&mut second.client);
    let mut done = Vec::new();
    for _ in 0..4 {
        journal.send_held(&mut second.client);
        second.drive();
        done.extend(through(&mut second, &mut journal, true));
    }
    assert_eq!(done.len(), 2);
    for c in &done {
        assert!([f, fua].contains(&c.cookie));
        let e = c.result.clone().unwrap_err();
        assert_eq!(e.errno(), Errno::Io, "{e}");
        assert!(
            matches!(e, Error::WritesLost(ref why) if why.contains("budget")),
            "{e}"
        );
    }
    // Once told, the caller starts afresh: the next flush is done.
    assert!(!journal.over_budget());
    done_now(&mut second, &mut journal, flush());
}

#[test]
fn over_the_replay_budget_without_a_pending_flush_the_next_one_fails() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::with_replay_budget(100);
    done_now(&mut pair, &mut journal, write(&[1; 200], 0));
    hang_up(&mut pair, &mut journal);
    let mut second = restarted(4096);
    let (sent, refused) = journal.resend(&mut second.client);
    assert_eq!((sent, refused.len()), (0, 0));
    // Reads and writes carry on; the first flush reports the loss.
    done_now(&mut second, &mut journal, write(b"x", 0));
    let f = journal.submit(&mut second.client, flush(), None).unwrap();
    second.drive();
    let done = through(&mut second, &mut journal, true);
    assert_eq!(done[0].cookie, f);
    assert_eq!(done[0].result.clone().unwrap_err().errno(), Errno::Io);
    done_now(&mut second, &mut journal, flush());
}

#[test]
fn a_flush_within_the_budget_clears_an_overflow_it_covers() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::with_replay_budget(100);
    done_now(&mut pair, &mut journal, write(&[1; 200], 0));
    assert!(journal.over_budget());
    done_now(&mut pair, &mut journal, flush());
    assert!(!journal.over_budget());
    hang_up(&mut pair, &mut journal);
    let mut second = restarted(4096);
    journal.resend(&mut second.client);
    done_now(&mut second, &mut journal, flush());
}

#[test]
fn a_kept_write_the_new_server_refuses_fails_the_flush_after_it() {
    let mut pair = ready_pair(FakeServer::builder().size(4096).build());
    let mut journal = Journal::new();
    done_now(&mut pair, &mut journal, write(b"bad", 0));
    let f = journal.submit(&mut pair.client, flush(), None).unwrap();
    hang_up(&mut pair, &mut journal);
    // EIO (5) where the kept write lands.
    let mut second = ready_pair(FakeServer::builder().size(4096).fail(0..8, 5).build());
    journal.resend(&mut second.client);
    let mut done = Vec::new();
    for _ in 0..3 {
        second.drive();
        done.extend(through(&mut second, &mut journal, true));
        journal.send_held(&mut second.client);
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cookie, f);
    let e = done[0].result.clone().unwrap_err();
    assert!(
        matches!(e, Error::WritesLost(ref why) if why.contains("written again")),
        "{e}"
    );
}
