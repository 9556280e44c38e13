//! `NBD_OPT_STARTTLS`: the switch, the settings of `Config::tls`, opt mode's
//! `opt_starttls`, and every way a server (or a man in the middle) can try to
//! keep the client in plaintext. The downgrade tests assert the exact bytes
//! the client put on the wire: with TLS required, nothing after the refusal.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nbd_proto::wire::consts::*;
use nbd_proto::{
    CmdFlags, Config, Connection, Errno, Error, Event, HandshakeFlags, NbdOption, TlsMode,
    TlsSession,
};
use nbd_testkit::{xor, xor_connector, FakeServer, StartTls, StartTlsServer};
use support::*;

/// What the client sends before the switch: its flags and `NBD_OPT_STARTTLS`.
const FLAGS_AND_STARTTLS: usize = 4 + 16;

/// A connection with `mode`, a toy connector taking `max_take` bytes per
/// call, and a counter of the sessions it made.
fn client(config: Config, max_take: usize) -> (Connection, Arc<AtomicUsize>) {
    let made = Arc::new(AtomicUsize::new(0));
    let mut conn = Connection::new(config);
    conn.set_tls_connector(xor_connector(max_take, made.clone()));
    (conn, made)
}

/// Moves bytes both ways until neither side has anything to say, handing the
/// server's bytes over in pieces of at most `piece`; returns the events.
fn drive(conn: &mut Connection, server: &mut StartTlsServer, piece: usize) -> Vec<String> {
    drive_pieces(conn, server, &[piece])
}

/// As [`drive`], with the server's bytes cut into pieces of the sizes in
/// `pieces`, used in turn.
fn drive_pieces(
    conn: &mut Connection,
    server: &mut StartTlsServer,
    pieces: &[usize],
) -> Vec<String> {
    let mut events = Vec::new();
    let mut next_piece = pieces.iter().copied().cycle();
    for _ in 0..100_000 {
        let mut moved = false;
        let out = conn.take_output();
        if !out.is_empty() {
            server.handle_input(&out);
            moved = true;
        }
        let back = server.take_output();
        let mut rest = &back[..];
        while !rest.is_empty() {
            let n = next_piece.next().unwrap_or(usize::MAX).clamp(1, rest.len());
            if conn.direction().is_read() {
                // A dead connection reports its error in the events.
                let _ = conn.handle_input(&rest[..n]);
            }
            rest = &rest[n..];
            moved = true;
        }
        while let Some(e) = conn.poll_event() {
            events.push(format!("{e:?}"));
        }
        if !moved {
            return events;
        }
    }
    panic!("the conversation never went quiet");
}

fn tls_error(conn: &Connection) -> String {
    match conn.error() {
        Some(Error::Tls(m)) => m.clone(),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn required_tls_switches_and_negotiates_everything_again_inside() {
    for max_take in [1, 5, 1 << 20] {
        let (mut conn, made) = client(Config::default().tls(TlsMode::Require), max_take);
        let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder().size(1 << 16));
        drive(&mut conn, &mut server, usize::MAX);
        assert!(conn.is_ready(), "{:?}", conn.error());
        assert!(conn.tls_negotiated());
        assert_eq!(made.load(Ordering::SeqCst), 1);
        assert!(server.is_tls());
        // In plaintext: the client flags and STARTTLS, nothing else.
        let wire = server.wire_in();
        let (flags, rest) = split_client_flags(wire);
        assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let options = parse_options(&rest[..16]);
        assert_eq!(options.len(), 1);
        assert_eq!(options[0].option, OPT_STARTTLS);
        assert!(options[0].data.is_empty());
        // Everything after it went through the session: decoded, it is the
        // automatic handshake from its start.
        let inside = parse_options(&xor(&wire[FLAGS_AND_STARTTLS..]));
        assert_eq!(inside[0].option, OPT_EXTENDED_HEADERS);
        assert_eq!(inside.last().unwrap().option, OPT_GO);
        let inner = server.inner().unwrap();
        assert!(inner.extended_negotiated());
        assert!(conn.extended_headers_negotiated());

        // Data moves through the session both ways.
        let w = conn
            .pwrite(Bytes::from_static(b"secret"), 512, CmdFlags::FUA)
            .unwrap();
        let r = conn
            .pread(BytesMut::zeroed(6), 512, CmdFlags::empty())
            .unwrap();
        let events = drive(&mut conn, &mut server, 7);
        assert_eq!(events.iter().filter(|e| e.contains("Completed")).count(), 2);
        assert!(!conn.is_in_flight(w) && !conn.is_in_flight(r));
        assert_eq!(&server.inner().unwrap().image_bytes()[512..518], b"secret");
        // On the wire only as ciphertext.
        assert!(xor(server.wire_in()).windows(6).any(|w| w == b"secret"));
        assert!(!server.wire_in().windows(6).any(|w| w == b"secret"));
    }
}

#[test]
fn any_split_of_the_servers_stream_gives_the_same_events() {
    let run = |piece: usize| {
        let (mut conn, _) = client(Config::default().tls(TlsMode::Require), 3);
        let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder().size(8192));
        let mut events = drive(&mut conn, &mut server, piece);
        let c = conn
            .pread(BytesMut::zeroed(100), 0, CmdFlags::empty())
            .unwrap();
        events.extend(drive(&mut conn, &mut server, piece));
        assert!(!conn.is_in_flight(c));
        conn.disconnect().unwrap();
        events.extend(drive(&mut conn, &mut server, piece));
        (events, server.wire_in().to_vec())
    };
    let whole = run(usize::MAX);
    assert!(whole.0.iter().any(|e| e == "Ready"), "{:?}", whole.0);
    for piece in [1, 2, 3, 19, 20, 21, 64] {
        assert_eq!(run(piece), whole, "pieces of {piece}");
    }
}

#[test]
fn allowed_tls_goes_on_in_plaintext_when_the_server_refuses() {
    for reply in [REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID] {
        let (mut conn, made) = client(Config::default().tls(TlsMode::Allow), 64);
        let mut server =
            StartTlsServer::new(StartTls::Refuse(reply), FakeServer::builder().size(4096));
        drive(&mut conn, &mut server, usize::MAX);
        assert!(conn.is_ready(), "{reply:#x}: {:?}", conn.error());
        assert!(!conn.tls_negotiated());
        assert_eq!(made.load(Ordering::SeqCst), 0);
        // The rest of the handshake is plaintext the server understood.
        let options = parse_options(&server.wire_in()[4..]);
        assert_eq!(options[0].option, OPT_STARTTLS);
        assert_eq!(options[1].option, OPT_EXTENDED_HEADERS);
        assert_eq!(server.starttls_seen(), 1);
    }
}

#[test]
fn allowed_tls_without_a_connector_or_fixed_newstyle_is_plaintext() {
    // No connector: no STARTTLS is even asked for.
    let mut conn = Connection::new(Config::default().tls(TlsMode::Allow));
    let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder());
    drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.is_ready());
    assert!(!conn.tls_negotiated());
    assert_eq!(server.starttls_seen(), 0);

    // Oldstyle and plain newstyle cannot start TLS: used as they are.
    let (mut conn, _) = client(Config::default().tls(TlsMode::Allow), 64);
    feed(&mut conn, &Script::new().oldstyle(4096, 1).take());
    assert!(conn.is_ready());
    assert!(!conn.tls_negotiated());
    let (mut conn, _) = client(Config::default().tls(TlsMode::Allow), 64);
    feed(&mut conn, &Script::new().newstyle(0).take());
    let sent = conn.take_output();
    let (_, rest) = split_client_flags(&sent);
    assert_eq!(parse_options(rest)[0].option, OPT_EXPORT_NAME);
}

#[test]
fn required_tls_refused_in_any_way_ends_the_connection_with_nothing_more_sent() {
    let refusals = [
        REP_ERR_UNSUP,
        REP_ERR_POLICY,
        REP_ERR_INVALID,
        REP_ERR_PLATFORM,
        REP_ERR_TLS_REQD,
        REP_ERR_SHUTDOWN,
    ];
    for reply in refusals {
        let (mut conn, made) = client(Config::default().tls(TlsMode::Require), 64);
        let mut server = StartTlsServer::new(StartTls::Refuse(reply), FakeServer::builder());
        let events = drive(&mut conn, &mut server, usize::MAX);
        assert!(conn.is_dead(), "{reply:#x}");
        let message = tls_error(&conn);
        assert!(message.contains("TLS is required"), "{message}");
        assert!(message.contains("NBD_OPT_STARTTLS"), "{message}");
        assert_eq!(made.load(Ordering::SeqCst), 0);
        // Not even NBD_OPT_ABORT after the refusal.
        assert_eq!(server.wire_in().len(), FLAGS_AND_STARTTLS, "{reply:#x}");
        assert!(events
            .last()
            .unwrap()
            .starts_with("Closed { error: Some(Tls"));
        assert!(conn.take_output().is_empty());
    }
}

#[test]
fn replies_only_a_man_in_the_middle_sends_end_a_required_connection() {
    let cases = [
        (
            StartTls::AckThenPlaintext(b"\0\0\0\0 injected".to_vec()),
            "plaintext",
        ),
        (StartTls::AckWithPayload, "exceeds"),
        (StartTls::WrongReplyType, "unexpected"),
    ];
    for (behaviour, says) in cases {
        for mode in [TlsMode::Require, TlsMode::Allow] {
            let (mut conn, made) = client(Config::default().tls(mode), 64);
            let mut server = StartTlsServer::new(behaviour.clone(), FakeServer::builder());
            drive(&mut conn, &mut server, usize::MAX);
            assert!(conn.is_dead(), "{behaviour:?} {mode:?}");
            let error = conn.error().unwrap().to_string();
            assert!(error.contains(says), "{behaviour:?}: {error}");
            assert_eq!(conn.error().unwrap().errno(), Errno::Proto);
            assert_eq!(server.wire_in().len(), FLAGS_AND_STARTTLS, "{behaviour:?}");
            assert!(!conn.tls_negotiated());
            assert_eq!(
                made.load(Ordering::SeqCst),
                0,
                "no session for a forged switch"
            );
        }
    }
}

#[test]
fn injected_bytes_are_refused_the_same_way_however_they_are_read() {
    let injected = b"\0\0\0\x03 forged option reply".to_vec();
    let mut errors = Vec::new();
    for piece in [1, 7, 19, 20, 21, usize::MAX] {
        let (mut conn, _) = client(Config::default().tls(TlsMode::Require), 64);
        let behaviour = StartTls::AckThenPlaintext(injected.clone());
        let mut server = StartTlsServer::new(behaviour, FakeServer::builder());
        drive(&mut conn, &mut server, piece);
        assert!(conn.is_dead(), "pieces of {piece}");
        assert_eq!(
            server.wire_in().len(),
            FLAGS_AND_STARTTLS,
            "pieces of {piece}"
        );
        errors.push(tls_error(&conn));
    }
    assert!(errors[0].contains("injection"), "{}", errors[0]);
    assert!(errors.iter().all(|e| *e == errors[0]), "{errors:?}");
}

#[test]
fn an_early_acknowledgement_is_refused() {
    // The acknowledgement arrives before the client sent STARTTLS at all: only
    // a party that guessed the client's next move sends that.
    let (mut conn, made) = client(Config::default().tls(TlsMode::Require), 64);
    let mut s = Script::new();
    s.newstyle(FLAG_FIXED_NEWSTYLE);
    feed(&mut conn, &s.take());
    feed(&mut conn, &s.ack(OPT_STARTTLS).take());
    assert!(conn.is_dead());
    assert!(conn
        .error()
        .unwrap()
        .to_string()
        .contains("before the request was sent"));
    assert!(conn.take_output().is_empty());
    assert_eq!(made.load(Ordering::SeqCst), 0);
}

#[test]
fn required_tls_with_a_server_that_cannot_start_it_sends_nothing() {
    let greetings = [
        (Script::new().oldstyle(1 << 20, 1).take(), "oldstyle"),
        (
            Script::new().newstyle(FLAG_NO_ZEROES).take(),
            "fixed newstyle",
        ),
    ];
    for (greeting, says) in greetings {
        let (mut conn, made) = client(Config::default().tls(TlsMode::Require), 64);
        let _ = conn.handle_input(&greeting);
        assert!(conn.is_dead(), "{says}");
        let message = tls_error(&conn);
        assert!(message.contains(says), "{message}");
        assert!(
            conn.take_output().is_empty(),
            "{says}: not even client flags"
        );
        assert_eq!(made.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn required_tls_without_a_way_to_start_it_sends_nothing() {
    // No connector.
    let mut conn = Connection::new(Config::default().tls(TlsMode::Require));
    let _ = conn.handle_input(&Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take());
    assert!(tls_error(&conn).contains("connector"));
    assert!(conn.take_output().is_empty());
    // The client's own flags leave out fixed newstyle.
    let config = Config::default()
        .tls(TlsMode::Require)
        .handshake_flags(HandshakeFlags::NO_ZEROES);
    let (mut conn, _) = client(config, 64);
    let _ = conn.handle_input(&Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take());
    assert!(tls_error(&conn).contains("handshake flags"));
    assert!(conn.take_output().is_empty());
}

#[test]
fn a_connector_that_fails_ends_the_connection_with_its_error() {
    let mut conn = Connection::new(Config::default().tls(TlsMode::Require));
    conn.set_tls_connector(Box::new(|| -> nbd_proto::Result<Box<dyn TlsSession>> {
        Err(Error::Tls("cannot read ca-cert.pem".into()))
    }));
    let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder());
    drive(&mut conn, &mut server, usize::MAX);
    assert_eq!(tls_error(&conn), "cannot read ca-cert.pem");
    assert_eq!(server.wire_in().len(), FLAGS_AND_STARTTLS);
}

#[test]
fn opt_mode_with_tls_switches_before_handing_over() {
    let config = Config::default().tls(TlsMode::Require).opt_mode(true);
    let (mut conn, _) = client(config, 64);
    let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder());
    let events = drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.is_negotiating());
    assert!(conn.tls_negotiated());
    assert_eq!(events.last().unwrap(), "Negotiating");
    // Asking again is refused locally: the protocol calls it a client error.
    assert_eq!(conn.opt_starttls().unwrap_err().errno(), Errno::Inval);
    conn.opt_go().unwrap();
    drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.is_ready());
}

#[test]
fn opt_starttls_by_the_caller_then_options_inside() {
    // TLS disabled: the automatic options go out in plaintext, no STARTTLS.
    let (mut conn, _) = client(Config::default().opt_mode(true), 64);
    let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder());
    drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.is_negotiating());
    assert!(!conn.tls_negotiated());
    assert!(conn.extended_headers_negotiated());
    assert_eq!(server.starttls_seen(), 0);

    // With no automatic options, the caller's STARTTLS is the first one.
    let config = Config::default()
        .opt_mode(true)
        .request_extended_headers(false)
        .request_structured_replies(false);
    let (mut conn, made) = client(config, 64);
    let mut server = StartTlsServer::new(StartTls::Ack, FakeServer::builder().size(4096));
    drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.is_negotiating());
    conn.opt_starttls().unwrap();
    let events = drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.tls_negotiated());
    assert_eq!(made.load(Ordering::SeqCst), 1);
    assert!(
        events
            .iter()
            .any(|e| e.contains("OptionDone { option: StartTls, result: Ok")),
        "{events:?}"
    );
    conn.opt_structured_reply().unwrap();
    drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.structured_replies_negotiated());
    conn.opt_go().unwrap();
    drive(&mut conn, &mut server, usize::MAX);
    assert!(conn.is_ready());
    assert_eq!(conn.size().unwrap(), 4096);
    assert!(server.inner().unwrap().structured_negotiated());
}

#[test]
fn plaintext_state_is_forgotten_at_the_switch() {
    // Scripted: structured replies negotiated in plaintext, then the caller
    // starts TLS; afterwards nothing of the plaintext negotiation remains.
    let config = Config::default()
        .opt_mode(true)
        .request_extended_headers(false);
    let (mut conn, _) = client(config, 64);
    let mut s = Script::new();
    feed(&mut conn, &s.newstyle(FLAG_FIXED_NEWSTYLE).take());
    let _ = conn.take_output();
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    assert!(conn.is_negotiating());
    assert!(conn.structured_replies_negotiated());
    conn.opt_info().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.info_export(OPT_INFO, 4096, FLAG_HAS_FLAGS)
            .ack(OPT_INFO)
            .take(),
    );
    assert_eq!(conn.size().unwrap(), 4096);
    let _ = drain(&mut conn);
    conn.opt_starttls().unwrap();
    let sent = conn.take_output();
    assert_eq!(parse_options(&sent)[0].option, OPT_STARTTLS);
    feed(&mut conn, &s.ack(OPT_STARTTLS).take());
    assert!(conn.tls_negotiated());
    assert!(!conn.structured_replies_negotiated());
    assert!(conn.size().is_err(), "export information is forgotten");
    let done = drain(&mut conn);
    assert!(matches!(
        &done[..],
        [Event::OptionDone {
            option: NbdOption::StartTls,
            result: Ok(())
        }]
    ));
    // A refusal in opt mode is an ordinary option result.
    let (mut conn, _) = client(Config::default().opt_mode(true), 64);
    let mut s = Script::new();
    feed(&mut conn, &s.newstyle(FLAG_FIXED_NEWSTYLE).take());
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.opt_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "").take(),
    );
    let _ = conn.take_output();
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    let _ = drain(&mut conn);
    conn.opt_starttls().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.opt_error(OPT_STARTTLS, REP_ERR_POLICY, "no").take(),
    );
    assert!(conn.is_negotiating());
    assert!(!conn.tls_negotiated());
    assert!(
        conn.structured_replies_negotiated(),
        "a refusal changes nothing"
    );
    let done = drain(&mut conn);
    assert!(matches!(
        &done[..],
        [Event::OptionDone {
            option: NbdOption::StartTls,
            result: Err(Error::OptionRefused { .. })
        }]
    ));
}

#[test]
fn opt_starttls_needs_a_connector() {
    let mut conn = Connection::new(Config::default().opt_mode(true));
    let mut s = Script::new();
    feed(&mut conn, &s.newstyle(FLAG_FIXED_NEWSTYLE).take());
    let _ = conn.take_output();
    feed(&mut conn, &s.ack(OPT_EXTENDED_HEADERS).take());
    assert!(conn.is_negotiating());
    assert_eq!(conn.opt_starttls().unwrap_err().errno(), Errno::NotSup);
    assert!(conn.take_output().is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Through STARTTLS, the switch and a few commands, random cuts of the
    /// server's stream and random session granularity change nothing: the
    /// same events, and the same bytes on the wire.
    #[test]
    fn random_splits_through_the_switch_change_nothing(
        pieces in proptest::collection::vec(1usize..40, 1..12),
        max_take in 1usize..64,
        reads in proptest::collection::vec((0u64..60_000, 1usize..4096), 1..6),
    ) {
        let image: Vec<u8> = (0..1u32 << 16).map(|i| (i % 251) as u8).collect();
        let run = |pieces: &[usize], max_take: usize| {
            let (mut conn, _) = client(Config::default().tls(TlsMode::Require), max_take);
            let mut server =
                StartTlsServer::new(StartTls::Ack, FakeServer::builder().contents(&image).split_reads(true));
            let mut events = drive_pieces(&mut conn, &mut server, pieces);
            for &(offset, len) in &reads {
                conn.pread(BytesMut::zeroed(len), offset, CmdFlags::empty()).unwrap();
            }
            conn.flush(CmdFlags::empty()).unwrap();
            events.extend(drive_pieces(&mut conn, &mut server, pieces));
            // Completion events carry the read buffers, contents included.
            let completed = events.iter().filter(|e| e.contains("Completed")).count();
            conn.disconnect().unwrap();
            events.extend(drive_pieces(&mut conn, &mut server, pieces));
            (events, completed, xor(&server.wire_in()[FLAGS_AND_STARTTLS..]))
        };
        let whole = run(&[usize::MAX], 1 << 20);
        proptest::prop_assert_eq!(whole.1, reads.len() + 1);
        let closed_cleanly = whole.0.last().unwrap().starts_with("Closed { error: None");
        proptest::prop_assert!(closed_cleanly);
        let cut = run(&pieces, max_take);
        proptest::prop_assert_eq!(cut, whole);
    }
}
