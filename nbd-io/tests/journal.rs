//! The reconnect journal against the in-memory fake server: a connection is
//! lost with commands in flight, a second connection to the same image takes
//! over, and the journal sends the unfinished commands again.

use bytes::{Bytes, BytesMut};
use nbd_io::{ExportIdentity, Journal, ReconnectPolicy, Request};
use nbd_proto::wire::consts::{CMD_FLUSH, CMD_READ, CMD_WRITE};
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
    // The flush waits for the write before it; the read waits behind it.
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
    // The write that completed on the first connection went out once.
    assert_eq!(second.server.commands_seen(CMD_WRITE), 1);
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
