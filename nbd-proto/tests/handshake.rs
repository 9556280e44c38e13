//! The automatic handshake: greeting styles, client flags, option haggling, and
//! every way a server can refuse or break it.

mod support;

use nbd_proto::wire::consts::*;
use nbd_proto::wire::Info;
use nbd_proto::{
    BlockSizes, Config, Connection, Direction, Errno, Error, Event, HandshakeFlags, NbdOption,
    OptionReplyError, Phase, ServerText, TransmissionFlags,
};
use support::*;

fn events_are_ready(events: &[Event]) -> bool {
    matches!(events, [Event::Ready])
}

/// Sends a fixed newstyle greeting and answers the structured reply option;
/// returns the connection waiting for the GO reply and the GO request it sent.
fn up_to_go(config: Config) -> (Connection, SentOption) {
    let mut conn = Connection::new(config);
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let sent = conn.take_output();
    let (_, rest) = split_client_flags(&sent);
    let options = parse_options(rest);
    assert_eq!(options[0].option, OPT_STRUCTURED_REPLY);
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    let mut options = parse_options(&conn.take_output());
    assert_eq!(options.len(), 1);
    let go = options.pop().unwrap();
    assert_eq!(go.option, OPT_GO);
    (conn, go)
}

#[test]
fn oldstyle_greeting_needs_no_client_bytes_and_gives_size_and_flags() {
    let mut conn = Connection::new(compact());
    assert_eq!(conn.phase(), Phase::Handshake);
    assert_eq!(conn.direction(), Direction::Read);
    let flags = u32::from(FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH) | 0xabcd_0000;
    let bytes = Script::new().oldstyle(4 << 30, flags).take();
    // Everything but the last padding byte: not ready yet.
    feed(&mut conn, &bytes[..bytes.len() - 1]);
    assert!(!conn.is_ready());
    assert!(drain(&mut conn).is_empty());
    feed(&mut conn, &bytes[bytes.len() - 1..]);
    assert!(events_are_ready(&drain(&mut conn)));
    assert!(
        conn.take_output().is_empty(),
        "oldstyle clients send nothing"
    );
    assert_eq!(conn.protocol(), Some("oldstyle"));
    assert_eq!(conn.size().unwrap(), 4 << 30);
    assert_eq!(conn.handshake_flags_sent(), None);
    // The high 16 bits of the oldstyle flags are not transmission flags.
    assert_eq!(
        conn.export_info().flags.unwrap().bits(),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH
    );
    assert!(conn.is_read_only().unwrap());
    assert!(conn.can_flush().unwrap());
    assert!(!conn.can_trim().unwrap());
    assert!(!conn.structured_replies_negotiated());
    assert_eq!(conn.direction(), Direction::Read);
}

#[test]
fn plain_newstyle_sends_only_export_name_with_zero_client_flags_and_skips_124_zeroes() {
    let config = compact().export_name("disk0");
    let mut conn = Connection::new(config);
    let mut s = Script::new();
    feed(&mut conn, &s.newstyle(0).take());
    let sent = conn.take_output();
    let (flags, rest) = split_client_flags(&sent);
    assert_eq!(flags, 0);
    assert_eq!(conn.handshake_flags_sent(), Some(0));
    let options = parse_options(rest);
    assert_eq!(
        options,
        vec![SentOption {
            option: OPT_EXPORT_NAME,
            data: b"disk0".to_vec()
        }]
    );
    assert_eq!(conn.protocol(), Some("newstyle"));

    let reply = s
        .export_name_reply(12345, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, true)
        .take();
    assert_eq!(reply.len(), 10 + 124);
    feed(&mut conn, &reply[..10 + 123]);
    assert!(!conn.is_ready(), "the padding is not consumed yet");
    assert!(drain(&mut conn).is_empty());
    feed(&mut conn, &reply[10 + 123..]);
    assert!(events_are_ready(&drain(&mut conn)));
    assert_eq!(conn.size().unwrap(), 12345);
    assert!(conn.can_flush().unwrap());

    // The very next bytes are parsed as a reply: the padding was consumed exactly.
    let cookie = conn.flush(Default::default()).unwrap();
    let req = sent_request(&mut conn);
    assert_eq!(req.header.command, CMD_FLUSH);
    feed(&mut conn, &s.simple(cookie, 0, &[]).take());
    let c = one_completion(&mut conn);
    assert_eq!(c.cookie, cookie);
    assert!(c.result.is_ok());
}

#[test]
fn fixed_newstyle_without_no_zeroes_expects_padding_after_export_name_fallback() {
    let mut conn = Connection::new(compact());
    let mut s = Script::new();
    feed(&mut conn, &s.newstyle(FLAG_FIXED_NEWSTYLE).take());
    let sent = conn.take_output();
    let (flags, rest) = split_client_flags(&sent);
    assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(parse_options(rest)[0].option, OPT_STRUCTURED_REPLY);
    assert_eq!(conn.protocol(), Some("newstyle-fixed"));
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    assert_eq!(parse_options(&conn.take_output())[0].option, OPT_GO);
    feed(&mut conn, &s.opt_error(OPT_GO, REP_ERR_UNSUP, "").take());
    let options = parse_options(&conn.take_output());
    assert_eq!(options.len(), 1);
    assert_eq!(options[0].option, OPT_EXPORT_NAME);
    let reply = s.export_name_reply(4096, FLAG_HAS_FLAGS, true).take();
    feed(&mut conn, &reply[..10]);
    assert!(!conn.is_ready());
    feed(&mut conn, &reply[10..]);
    assert!(events_are_ready(&drain(&mut conn)));
    assert!(conn.structured_replies_negotiated());
}

#[test]
fn fixed_newstyle_with_no_zeroes_gets_no_padding_after_export_name() {
    let mut conn = Connection::new(compact());
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let sent = conn.take_output();
    assert_eq!(
        split_client_flags(&sent).0,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    let _ = conn.take_output();
    feed(&mut conn, &s.opt_error(OPT_GO, REP_ERR_UNSUP, "").take());
    assert_eq!(
        parse_options(&conn.take_output())[0].option,
        OPT_EXPORT_NAME
    );
    // The 10 bytes alone complete the handshake; a reply may follow at once.
    feed(
        &mut conn,
        &s.export_name_reply(8192, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, false)
            .take(),
    );
    assert!(events_are_ready(&drain(&mut conn)));
    assert_eq!(conn.size().unwrap(), 8192);
    let cookie = conn.flush(Default::default()).unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &s.simple(cookie, 0, &[]).take());
    assert!(one_completion(&mut conn).result.is_ok());
}

#[test]
fn client_flags_are_sent_only_when_the_server_offers_them() {
    // The server offers NO_ZEROES only: no fixed newstyle, so plain newstyle.
    let mut conn = Connection::new(compact());
    feed(&mut conn, &Script::new().newstyle(FLAG_NO_ZEROES).take());
    let sent = conn.take_output();
    let (flags, rest) = split_client_flags(&sent);
    assert_eq!(flags, FLAG_C_NO_ZEROES);
    assert_eq!(parse_options(rest)[0].option, OPT_EXPORT_NAME);
    assert_eq!(conn.protocol(), Some("newstyle"));
    // Unknown server bits are ignored.
    let mut conn = Connection::new(compact());
    feed(
        &mut conn,
        &Script::new().newstyle(FLAG_FIXED_NEWSTYLE | 0x8000).take(),
    );
    assert_eq!(
        split_client_flags(&conn.take_output()).0,
        FLAG_C_FIXED_NEWSTYLE
    );
}

#[test]
fn client_flags_are_masked_by_config_handshake_flags() {
    let config = compact().handshake_flags(HandshakeFlags::FIXED_NEWSTYLE);
    let mut conn = Connection::new(config);
    feed(
        &mut conn,
        &Script::new()
            .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .take(),
    );
    let sent = conn.take_output();
    assert_eq!(split_client_flags(&sent).0, FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(conn.handshake_flags_sent(), Some(FLAG_C_FIXED_NEWSTYLE));

    // Without FIXED_NEWSTYLE the client speaks plain newstyle even to a fixed server.
    let config = compact()
        .handshake_flags(HandshakeFlags::empty())
        .export_name("x");
    let mut conn = Connection::new(config);
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let sent = conn.take_output();
    let (flags, rest) = split_client_flags(&sent);
    assert_eq!(flags, 0);
    assert_eq!(
        parse_options(rest),
        vec![SentOption {
            option: OPT_EXPORT_NAME,
            data: b"x".to_vec()
        }]
    );
    assert_eq!(conn.protocol(), Some("newstyle"));
    // NO_ZEROES was not sent, so the padding is expected.
    let reply = s.export_name_reply(1, FLAG_HAS_FLAGS, true).take();
    feed(&mut conn, &reply[..10]);
    assert!(!conn.is_ready());
    feed(&mut conn, &reply[10..]);
    assert!(conn.is_ready());
}

#[test]
fn structured_reply_ack_enables_structured_replies() {
    let conn = ready(Export::default());
    assert!(conn.structured_replies_negotiated());
    assert_eq!(conn.protocol(), Some("newstyle-fixed"));
}

#[test]
fn structured_reply_refusal_continues_with_go_and_simple_replies() {
    let conn = ready(Export::simple());
    assert!(!conn.structured_replies_negotiated());
    assert!(conn.is_ready());
    // DF needs structured replies even when the server advertises it.
    assert!(!conn.can_df().unwrap());
}

#[test]
fn structured_replies_are_not_requested_when_disabled() {
    let config = compact().request_structured_replies(false);
    // `handshake` checks that GO is the first option.
    let conn = handshake(config, Export::default());
    assert!(!conn.structured_replies_negotiated());
}

#[test]
fn go_with_info_replies_sets_export_name_description_and_block_sizes() {
    let config = compact().export_name("vm-disk").full_info(true);
    let (mut conn, go) = up_to_go(config);
    let request = go.info_request();
    assert_eq!(request.name, "vm-disk");
    assert_eq!(
        request.requests,
        vec![INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
    );
    let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_ROTATIONAL | FLAG_CAN_MULTI_CONN;
    let mut s = Script::new();
    s.info_export(OPT_GO, 1 << 40, flags)
        .info(OPT_GO, &Info::Name("canonical".into()))
        .info(OPT_GO, &Info::Description("a test disk".into()))
        .info(
            OPT_GO,
            &Info::BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20,
            },
        )
        .info(OPT_GO, &Info::Unknown(0x7777))
        .ack(OPT_GO);
    let bytes = s.take();
    feed(&mut conn, &bytes[..bytes.len() - 1]);
    assert!(!conn.is_ready());
    feed(&mut conn, &bytes[bytes.len() - 1..]);
    assert!(events_are_ready(&drain(&mut conn)));
    assert_eq!(conn.size().unwrap(), 1 << 40);
    assert_eq!(conn.canonical_name(), Some("canonical"));
    assert_eq!(conn.description(), Some("a test disk"));
    assert_eq!(
        conn.block_sizes(),
        Some(BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20
        })
    );
    assert_eq!(
        conn.export_info().flags,
        Some(TransmissionFlags::from_bits_retain(flags))
    );
    assert!(conn.is_rotational().unwrap());
    assert!(conn.can_multi_conn().unwrap());
    assert!(!conn.can_fua().unwrap());
    assert!(!conn.is_read_only().unwrap());
    assert!(!conn.can_cache().unwrap());
    assert!(!conn.can_zero().unwrap());
    assert!(!conn.can_fast_zero().unwrap());
}

#[test]
fn go_without_full_info_or_block_size_requests_nothing_extra() {
    let config = compact().request_block_size(false);
    let (_, go) = up_to_go(config);
    assert_eq!(go.info_request().requests, Vec::<u16>::new());
    assert_eq!(go.info_request().name, "");
    let (_, go) = up_to_go(compact());
    assert_eq!(go.info_request().requests, vec![INFO_BLOCK_SIZE]);
}

#[test]
fn an_invalid_block_size_reply_does_not_erase_a_valid_one() {
    let (mut conn, _go) = up_to_go(compact());
    let mut s = Script::new();
    let valid = Info::BlockSize {
        minimum: 512,
        preferred: 4096,
        maximum: 32 << 20,
    };
    let invalid = Info::BlockSize {
        minimum: 3,
        preferred: 4096,
        maximum: 32 << 20,
    };
    s.info_export(OPT_GO, 1 << 20, FLAG_HAS_FLAGS)
        .info(OPT_GO, &valid)
        .info(OPT_GO, &invalid)
        .ack(OPT_GO);
    feed(&mut conn, &s.take());
    assert!(conn.is_ready());
    assert_eq!(
        conn.block_sizes(),
        Some(BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20
        })
    );
}

#[test]
fn invalid_block_sizes_are_ignored() {
    let invalid = [
        (3, 4096, 1 << 20),              // minimum not a power of 2
        (128 << 10, 128 << 10, 1 << 20), // minimum above 64 KiB
        (512, 256, 1 << 20),             // preferred below 512
        (4096, 2048, 1 << 20),           // preferred below minimum
        (512, 4096, 1000),               // maximum not a multiple of minimum
        (512, 4096, 2048),               // maximum below preferred
    ];
    for (minimum, preferred, maximum) in invalid {
        let export = Export {
            block_sizes: Some((minimum, preferred, maximum)),
            ..Export::default()
        };
        let mut conn = ready(export);
        assert_eq!(
            conn.block_sizes(),
            None,
            "{minimum}/{preferred}/{maximum} should be ignored"
        );
        // Ignored constraints do not restrict requests.
        conn.pread(buffer(3, 0), 1, Default::default())
            .expect("no alignment check without valid block sizes");
    }
    // u32::MAX as maximum is allowed.
    let conn = ready(Export {
        block_sizes: Some((1, 512, u32::MAX)),
        ..Export::default()
    });
    assert_eq!(
        conn.block_sizes(),
        Some(BlockSizes {
            minimum: 1,
            preferred: 512,
            maximum: u32::MAX
        })
    );
}

#[test]
fn go_refused_unsup_falls_back_to_export_name() {
    let config = compact().export_name("old");
    let (mut conn, _) = up_to_go(config);
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.opt_error(OPT_GO, REP_ERR_UNSUP, "what is GO?").take(),
    );
    assert!(drain(&mut conn).is_empty(), "the fallback is silent");
    assert_eq!(
        parse_options(&conn.take_output()),
        vec![SentOption {
            option: OPT_EXPORT_NAME,
            data: b"old".to_vec()
        }]
    );
    feed(
        &mut conn,
        &s.export_name_reply(777, FLAG_HAS_FLAGS, false).take(),
    );
    assert!(events_are_ready(&drain(&mut conn)));
    assert_eq!(conn.size().unwrap(), 777);
}

#[test]
fn go_refused_unknown_kills_the_connection_with_the_escaped_server_message() {
    let (mut conn, _) = up_to_go(compact());
    let message = "no \"such\" export\n\x1b[31mred";
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_GO, REP_ERR_UNKNOWN, message)
            .take(),
    );
    let events = drain(&mut conn);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_dead(&conn, &events, Errno::NoEnt);
    let error = conn.error().unwrap().clone();
    assert_eq!(
        error,
        Error::OptionRefused {
            option: NbdOption::Go,
            reply: OptionReplyError::Unknown,
            message: ServerText(message.into()),
        }
    );
    let shown = error.to_string();
    assert!(shown.contains("NBD_OPT_GO"), "{shown}");
    assert!(shown.contains("NBD_REP_ERR_UNKNOWN"), "{shown}");
    assert!(
        shown.contains(r#""no \"such\" export\n\u{1b}[31mred""#),
        "{shown}"
    );
    assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown}");
    // Sticky: every later call says the same.
    assert_eq!(
        conn.pread(buffer(1, 0), 0, Default::default()).unwrap_err(),
        error
    );
    assert_eq!(conn.handle_input(b"more").unwrap_err(), error);
}

#[test]
fn every_rep_err_maps_to_its_errno() {
    let table = [
        (REP_ERR_UNSUP, Errno::NotSup),
        (REP_ERR_POLICY, Errno::Perm),
        (REP_ERR_INVALID, Errno::Inval),
        (REP_ERR_PLATFORM, Errno::NotSup),
        (REP_ERR_TLS_REQD, Errno::NotSup),
        (REP_ERR_UNKNOWN, Errno::NoEnt),
        (REP_ERR_SHUTDOWN, Errno::Shutdown),
        (REP_ERR_BLOCK_SIZE_REQD, Errno::Inval),
        (REP_ERR_TOO_BIG, Errno::Range),
        (REP_ERR_EXT_HEADER_REQD, Errno::NotSup),
        (REP_FLAG_ERROR | 0x55, Errno::Inval),
    ];
    for (reply, errno) in table {
        let error = Error::OptionRefused {
            option: NbdOption::Go,
            reply: OptionReplyError::from_code(reply),
            message: ServerText::default(),
        };
        assert_eq!(error.errno(), errno, "{}", reply_type_name(reply));
        // And through a real connection: opt_info refused in opt mode.
        if reply == REP_ERR_SHUTDOWN {
            continue; // has its own tests
        }
        let mut conn = Connection::new(compact().opt_mode(true));
        let mut s = Script::new();
        feed(&mut conn, &s.newstyle(FLAG_FIXED_NEWSTYLE).take());
        feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
        drain(&mut conn);
        conn.opt_info().unwrap();
        let _ = conn.take_output();
        feed(&mut conn, &s.opt_error(OPT_INFO, reply, "refused").take());
        let events = drain(&mut conn);
        match events.as_slice() {
            [Event::OptionDone {
                option: NbdOption::Info,
                result: Err(e),
            }] => {
                assert_eq!(e.errno(), errno);
                assert!(
                    matches!(e, Error::OptionRefused { reply: r, .. } if *r == OptionReplyError::from_code(reply))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(conn.is_negotiating());
    }
}

#[test]
fn rep_err_shutdown_sends_abort_and_ends_the_connection() {
    let (mut conn, _) = up_to_go(compact());
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.opt_error(OPT_GO, REP_ERR_SHUTDOWN, "going down").take(),
    );
    assert!(
        drain(&mut conn).is_empty(),
        "not over until the abort is written"
    );
    assert_eq!(
        parse_options(&conn.take_output()),
        vec![SentOption {
            option: OPT_ABORT,
            data: vec![]
        }]
    );
    // Written: over, without waiting for the server's acknowledgement.
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Shutdown);
    assert!(matches!(
        conn.error(),
        Some(Error::OptionRefused {
            reply: OptionReplyError::Shutdown,
            ..
        })
    ));
    // An acknowledgement arriving later changes nothing.
    assert!(conn.handle_input(&s.ack(OPT_ABORT).take()).is_err());
    assert!(drain(&mut conn).is_empty());

    // An acknowledgement arriving before the abort is written ends it the same way.
    let (mut conn, _) = up_to_go(compact());
    feed(
        &mut conn,
        &s.opt_error(OPT_GO, REP_ERR_SHUTDOWN, "")
            .ack(OPT_ABORT)
            .take(),
    );
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Shutdown);
    assert!(conn.take_output().is_empty());
}

#[test]
fn export_size_above_i64_max_is_an_overflow_error() {
    for size in [i64::MAX as u64 + 1, u64::MAX] {
        let conn = ready(Export {
            size,
            ..Export::default()
        });
        let e = conn.size().unwrap_err();
        assert_eq!(e.errno(), Errno::Overflow);
        assert!(matches!(e, Error::Overflow(_)));
        assert_eq!(conn.export_info().size, Some(size));
    }
    let conn = ready(Export {
        size: i64::MAX as u64,
        ..Export::default()
    });
    assert_eq!(conn.size().unwrap(), i64::MAX as u64);
}

#[test]
fn strings_over_4096_bytes_are_rejected() {
    // 4096 bytes is the limit and is fine.
    let (mut conn, _) = up_to_go(compact());
    let ok = "n".repeat(MAX_STRING_LEN);
    feed(
        &mut conn,
        &Script::new()
            .info_export(OPT_GO, 1, FLAG_HAS_FLAGS)
            .info(OPT_GO, &Info::Name(ok.clone()))
            .ack(OPT_GO)
            .take(),
    );
    assert!(conn.is_ready());
    assert_eq!(conn.canonical_name(), Some(ok.as_str()));

    // One more byte, in a name, a description or an error message, is fatal.
    let long = "n".repeat(MAX_STRING_LEN + 1);
    let mut scripts = Vec::new();
    scripts.push(Script::new().info(OPT_GO, &Info::Name(long.clone())).take());
    scripts.push(
        Script::new()
            .info(OPT_GO, &Info::Description(long.clone()))
            .take(),
    );
    scripts.push(
        Script::new()
            .opt_error(OPT_GO, REP_ERR_UNKNOWN, &long)
            .take(),
    );
    for bytes in scripts {
        let (mut conn, _) = up_to_go(compact());
        feed(&mut conn, &bytes);
        let events = drain(&mut conn);
        assert_dead(&conn, &events, Errno::Proto);
        assert!(conn.error().unwrap().to_string().contains("4096"));
    }
}

#[test]
fn export_name_over_4096_bytes_is_refused_locally() {
    let mut conn = Connection::new(compact());
    let e = conn
        .set_export_name(&"x".repeat(MAX_STRING_LEN + 1))
        .unwrap_err();
    assert_eq!(e.errno(), Errno::Inval);
    assert_eq!(conn.export_name(), "");
    conn.set_export_name("fine").unwrap();
    assert_eq!(conn.export_name(), "fine");
    // Not once in transmission.
    let mut conn = ready(Export::default());
    assert!(matches!(
        conn.set_export_name("late"),
        Err(Error::InvalidState(_))
    ));
}

#[test]
fn option_reply_over_the_length_limit_is_rejected_from_the_header_alone() {
    let (mut conn, _) = up_to_go(compact());
    let mut header = Vec::new();
    nbd_proto::wire::OptionReplyHeader {
        option: OPT_GO,
        reply_type: REP_INFO,
        length: u32::MAX,
    }
    .encode(&mut header);
    // Only the header: the client must not wait for (or allocate) 4 GiB.
    feed(&mut conn, &header);
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn.error().unwrap().to_string().contains("exceeds"));

    // Just above the 16 KiB buffering limit is rejected too; 16 KiB itself is fine.
    let (mut conn, _) = up_to_go(compact());
    let mut header = Vec::new();
    nbd_proto::wire::OptionReplyHeader {
        option: OPT_GO,
        reply_type: REP_INFO,
        length: 16 * 1024 + 1,
    }
    .encode(&mut header);
    feed(&mut conn, &header);
    assert!(conn.is_dead());

    let (mut conn, _) = up_to_go(compact());
    let mut unknown = vec![0x12, 0x34];
    unknown.resize(16 * 1024, 0xee);
    let mut s = Script::new();
    s.opt_reply(OPT_GO, REP_INFO, &unknown)
        .info_export(OPT_GO, 5, FLAG_HAS_FLAGS)
        .ack(OPT_GO);
    feed(&mut conn, &s.take());
    assert!(conn.is_ready(), "{:?}", conn.error());
    assert_eq!(conn.size().unwrap(), 5);
}

#[test]
fn option_reply_for_the_wrong_option_kills_the_connection() {
    let (mut conn, _) = up_to_go(compact());
    feed(&mut conn, &Script::new().ack(OPT_LIST).take());
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    let text = conn.error().unwrap().to_string();
    assert!(
        text.contains("NBD_OPT_LIST") && text.contains("NBD_OPT_GO"),
        "{text}"
    );
}

#[test]
fn unexpected_option_reply_type_kills_the_connection() {
    // REP_SERVER is a reply to LIST, not to GO.
    let (mut conn, _) = up_to_go(compact());
    feed(
        &mut conn,
        &Script::new()
            .opt_reply(OPT_GO, REP_SERVER, &[0, 0, 0, 0])
            .take(),
    );
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn go_ack_without_export_info_is_a_protocol_error() {
    let (mut conn, _) = up_to_go(compact());
    feed(&mut conn, &Script::new().ack(OPT_GO).take());
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn
        .error()
        .unwrap()
        .to_string()
        .contains("NBD_INFO_EXPORT"));
}

#[test]
fn malformed_info_export_kills_the_connection() {
    let (mut conn, _) = up_to_go(compact());
    // INFO_EXPORT must be exactly 12 bytes.
    let mut data = Vec::new();
    Info::Export {
        size: 1,
        flags: FLAG_HAS_FLAGS,
    }
    .encode(&mut data);
    data.push(0);
    feed(
        &mut conn,
        &Script::new().opt_reply(OPT_GO, REP_INFO, &data).take(),
    );
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn bad_greeting_magic_kills_the_connection() {
    let mut bytes = Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take();
    bytes[0] ^= 1;
    let mut conn = Connection::new(compact());
    feed(&mut conn, &bytes[..16]);
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn.take_output().is_empty());

    let mut bytes = Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take();
    bytes[15] ^= 1; // second magic
    let mut conn = Connection::new(compact());
    feed(&mut conn, &bytes[..16]);
    assert!(conn.is_dead());
    // Later input is refused with the sticky error.
    assert_eq!(
        conn.handle_input(&bytes[16..]).unwrap_err(),
        conn.error().unwrap().clone()
    );
}

#[test]
fn bad_option_reply_magic_kills_the_connection() {
    let (mut conn, _) = up_to_go(compact());
    let mut bytes = Script::new().ack(OPT_GO).take();
    bytes[3] ^= 0xff;
    feed(&mut conn, &bytes);
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn eof_during_the_handshake_is_not_connected() {
    let (mut conn, _) = up_to_go(compact());
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::NotConn);
    assert!(conn
        .error()
        .unwrap()
        .to_string()
        .contains("during the handshake"));

    // After EXPORT_NAME the usual reason is a missing export: the error says so.
    let mut conn = Connection::new(compact());
    feed(&mut conn, &Script::new().newstyle(0).take());
    let _ = conn.take_output();
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::NotConn);
    assert!(conn.error().unwrap().to_string().contains("EXPORT_NAME"));
}

#[test]
fn queries_before_the_export_is_known_are_invalid_state() {
    let conn = Connection::new(compact());
    assert!(matches!(conn.size(), Err(Error::InvalidState(_))));
    assert!(matches!(conn.can_flush(), Err(Error::InvalidState(_))));
    assert_eq!(conn.can_df().unwrap_err().errno(), Errno::Inval);
    assert_eq!(conn.protocol(), None);
    assert_eq!(conn.block_sizes(), None);
    assert_eq!(conn.canonical_name(), None);
    assert_eq!(conn.in_flight(), 0);
}

#[test]
fn commands_during_the_handshake_are_invalid_state_and_send_nothing() {
    let (mut conn, _) = up_to_go(compact());
    let e = conn
        .pread(buffer(512, 0), 0, Default::default())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState(_)), "{e:?}");
    assert!(matches!(conn.disconnect(), Err(Error::InvalidState(_))));
    assert!(conn.take_output().is_empty());
}
