//! Opt mode: the caller drives the options one by one (libnbd's `set_opt_mode`).

mod support;

use nbd_proto::wire::consts::*;
use nbd_proto::wire::Info;
use nbd_proto::{Config, Connection, Direction, Errno, Error, Event, NbdOption, Phase};
use support::*;

fn opt_config() -> Config {
    compact().opt_mode(true).export_name("a")
}

/// A connection in opt mode, negotiating, with structured replies acknowledged.
fn negotiating() -> Connection {
    let mut conn = Connection::new(opt_config());
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let sent = conn.take_output();
    let (_, rest) = split_client_flags(&sent);
    // Opt mode still asks for structured replies on its own, then hands over.
    assert_eq!(parse_options(rest)[0].option, OPT_STRUCTURED_REPLY);
    assert!(drain(&mut conn).is_empty());
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Negotiating]),
        "{events:?}"
    );
    assert!(conn.is_negotiating());
    assert_eq!(conn.phase(), Phase::Negotiating);
    assert!(conn.take_output().is_empty());
    assert!(conn.structured_replies_negotiated());
    conn
}

fn sent_option(conn: &mut Connection) -> SentOption {
    let mut options = parse_options(&conn.take_output());
    assert_eq!(options.len(), 1, "{options:?}");
    options.pop().unwrap()
}

#[test]
fn opt_mode_stops_at_negotiating_after_the_greeting() {
    let conn = negotiating();
    assert_eq!(conn.direction(), Direction::Read);
    assert!(!conn.is_ready());
}

#[test]
fn opt_mode_without_structured_request_hands_over_right_after_the_flags() {
    let mut conn = Connection::new(opt_config().request_structured_replies(false));
    feed(
        &mut conn,
        &Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take(),
    );
    let sent = conn.take_output();
    assert_eq!(sent.len(), 4, "only the client flags");
    assert!(matches!(drain(&mut conn).as_slice(), [Event::Negotiating]));
}

#[test]
fn opt_list_reports_each_export_then_option_done() {
    let mut conn = negotiating();
    conn.opt_list().unwrap();
    assert_eq!(conn.phase(), Phase::Handshake, "an option is in flight");
    let opt = sent_option(&mut conn);
    assert_eq!(opt.option, OPT_LIST);
    assert!(opt.data.is_empty());
    feed(
        &mut conn,
        &Script::new()
            .server_entry("disk0", "the first disk")
            .server_entry("", "")
            .server_entry("naïve", "")
            .ack(OPT_LIST)
            .take(),
    );
    let events = drain(&mut conn);
    let summary: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
    assert_eq!(events.len(), 4, "{summary:?}");
    let exports: Vec<(String, String)> = events[..3]
        .iter()
        .map(|e| match e {
            Event::Export { name, description } => (name.clone(), description.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        exports,
        vec![
            ("disk0".into(), "the first disk".into()),
            (String::new(), String::new()),
            ("naïve".into(), String::new()),
        ]
    );
    assert!(matches!(
        events[3],
        Event::OptionDone {
            option: NbdOption::List,
            result: Ok(())
        }
    ));
    assert!(conn.is_negotiating());
}

#[test]
fn opt_list_with_a_malformed_entry_kills_the_connection() {
    let mut conn = negotiating();
    conn.opt_list().unwrap();
    let _ = conn.take_output();
    // Name length 10 with 2 bytes after it.
    feed(
        &mut conn,
        &Script::new()
            .opt_reply(OPT_LIST, REP_SERVER, &[0, 0, 0, 10, b'a', b'b'])
            .take(),
    );
    let events = drain(&mut conn);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(
        &events[0],
        Event::OptionDone { option: NbdOption::List, result: Err(e) } if e.errno() == Errno::Proto
    ));
    assert_dead(&conn, &events, Errno::Proto);
}

#[test]
fn opt_list_refused_is_option_done_with_the_error() {
    let mut conn = negotiating();
    conn.opt_list().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_LIST, REP_ERR_POLICY, "no listing")
            .take(),
    );
    match drain(&mut conn).as_slice() {
        [Event::OptionDone {
            option: NbdOption::List,
            result: Err(e),
        }] => {
            assert_eq!(e.errno(), Errno::Perm);
            assert!(e.to_string().contains("no listing"));
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.is_negotiating());
}

#[test]
fn opt_info_answers_the_export_queries_without_entering_transmission() {
    let mut conn = negotiating();
    conn.set_full_info(true);
    conn.set_export_name("b").unwrap();
    conn.opt_info().unwrap();
    let opt = sent_option(&mut conn);
    assert_eq!(opt.option, OPT_INFO);
    let request = opt.info_request();
    assert_eq!(request.name, "b");
    assert_eq!(
        request.requests,
        vec![INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
    );
    feed(
        &mut conn,
        &Script::new()
            .info_export(OPT_INFO, 65536, FLAG_HAS_FLAGS | FLAG_READ_ONLY)
            .info(OPT_INFO, &Info::Name("b-canonical".into()))
            .info(OPT_INFO, &Info::Description("bee".into()))
            .ack(OPT_INFO)
            .take(),
    );
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::OptionDone {
            option: NbdOption::Info,
            result: Ok(())
        }]
    ));
    assert!(conn.is_negotiating());
    assert_eq!(conn.size().unwrap(), 65536);
    assert!(conn.is_read_only().unwrap());
    assert_eq!(conn.canonical_name(), Some("b-canonical"));
    assert_eq!(conn.description(), Some("bee"));
    // Still negotiating: commands are refused.
    assert!(matches!(
        conn.pread(buffer(1, 0), 0, Default::default()),
        Err(Error::InvalidState(_))
    ));
}

#[test]
fn opt_info_refused_forgets_partial_information() {
    let mut conn = negotiating();
    conn.opt_info().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .info_export(OPT_INFO, 65536, FLAG_HAS_FLAGS)
            .opt_error(OPT_INFO, REP_ERR_UNKNOWN, "")
            .take(),
    );
    match drain(&mut conn).as_slice() {
        [Event::OptionDone {
            option: NbdOption::Info,
            result: Err(e),
        }] => assert_eq!(e.errno(), Errno::NoEnt),
        other => panic!("{other:?}"),
    }
    assert!(conn.is_negotiating());
    assert!(matches!(conn.size(), Err(Error::InvalidState(_))));
}

#[test]
fn opt_go_refused_stays_negotiating_then_opt_go_succeeds() {
    let mut conn = negotiating();
    conn.opt_go().unwrap();
    assert_eq!(sent_option(&mut conn).info_request().name, "a");
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.opt_error(OPT_GO, REP_ERR_UNKNOWN, "no a").take(),
    );
    match drain(&mut conn).as_slice() {
        [Event::OptionDone {
            option: NbdOption::Go,
            result: Err(e),
        }] => {
            assert_eq!(e.errno(), Errno::NoEnt);
            assert!(matches!(
                e,
                Error::OptionRefused {
                    option: NbdOption::Go,
                    ..
                }
            ));
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.is_negotiating());
    assert!(!conn.is_dead());

    conn.set_export_name("b").unwrap();
    conn.opt_go().unwrap();
    assert_eq!(sent_option(&mut conn).info_request().name, "b");
    feed(
        &mut conn,
        &s.info_export(OPT_GO, 1 << 20, ALL_FLAGS).ack(OPT_GO).take(),
    );
    assert!(matches!(drain(&mut conn).as_slice(), [Event::Ready]));
    assert!(conn.is_ready());
    assert_eq!(conn.size().unwrap(), 1 << 20);

    // Transmission works.
    let cookie = conn.flush(Default::default()).unwrap();
    assert_eq!(sent_request(&mut conn).header.command, CMD_FLUSH);
    feed(&mut conn, &s.simple(cookie, 0, &[]).take());
    assert!(one_completion(&mut conn).result.is_ok());
}

#[test]
fn opt_go_refused_unsup_does_not_fall_back_in_opt_mode() {
    let mut conn = negotiating();
    conn.opt_go().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new().opt_error(OPT_GO, REP_ERR_UNSUP, "").take(),
    );
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::OptionDone { option: NbdOption::Go, result: Err(e) }] if e.errno() == Errno::NotSup
    ));
    assert!(
        conn.take_output().is_empty(),
        "no EXPORT_NAME behind the caller's back"
    );
    assert!(conn.is_negotiating());
}

#[test]
fn opt_structured_reply_ack_and_refusal() {
    let mut conn = Connection::new(opt_config().request_structured_replies(false));
    let mut s = Script::new();
    feed(&mut conn, &s.newstyle(FLAG_FIXED_NEWSTYLE).take());
    let _ = conn.take_output();
    drain(&mut conn);
    assert!(!conn.structured_replies_negotiated());

    conn.opt_structured_reply().unwrap();
    let opt = sent_option(&mut conn);
    assert_eq!(opt.option, OPT_STRUCTURED_REPLY);
    assert!(opt.data.is_empty());
    feed(
        &mut conn,
        &s.opt_error(OPT_STRUCTURED_REPLY, REP_ERR_POLICY, "").take(),
    );
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::OptionDone { option: NbdOption::StructuredReply, result: Err(e) }] if e.errno() == Errno::Perm
    ));
    assert!(!conn.structured_replies_negotiated());

    conn.opt_structured_reply().unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &s.ack(OPT_STRUCTURED_REPLY).take());
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::OptionDone {
            option: NbdOption::StructuredReply,
            result: Ok(())
        }]
    ));
    assert!(conn.structured_replies_negotiated());
    assert!(conn.is_negotiating());
}

#[test]
fn opt_abort_closes_without_error_on_ack_or_eof() {
    for hang_up in [false, true] {
        let mut conn = negotiating();
        conn.opt_abort().unwrap();
        let opt = sent_option(&mut conn);
        assert_eq!(opt.option, OPT_ABORT);
        assert!(opt.data.is_empty());
        if hang_up {
            conn.handle_input(&[]).unwrap();
        } else {
            feed(&mut conn, &Script::new().ack(OPT_ABORT).take());
        }
        let events = drain(&mut conn);
        assert!(
            matches!(events.as_slice(), [Event::Closed { error: None }]),
            "{events:?}"
        );
        assert!(conn.is_closed());
        assert!(!conn.is_dead());
        assert_eq!(conn.error(), None);
        assert_eq!(conn.direction(), Direction::None);
        assert_eq!(conn.opt_list().unwrap_err().errno(), Errno::NotConn);
    }
}

#[test]
fn a_second_option_while_one_is_in_flight_is_invalid_state() {
    let mut conn = negotiating();
    conn.opt_list().unwrap();
    let before = conn.take_output();
    for result in [
        conn.opt_list(),
        conn.opt_info(),
        conn.opt_go(),
        conn.opt_structured_reply(),
        conn.opt_abort(),
    ] {
        let e = result.unwrap_err();
        assert!(matches!(e, Error::InvalidState(_)), "{e:?}");
        assert_eq!(e.errno(), Errno::Inval);
    }
    assert!(conn.take_output().is_empty(), "nothing more was sent");
    assert_eq!(parse_options(&before).len(), 1);
    // The first one still completes.
    feed(&mut conn, &Script::new().ack(OPT_LIST).take());
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::OptionDone {
            option: NbdOption::List,
            result: Ok(())
        }]
    ));
}

#[test]
fn opt_calls_in_ready_or_outside_opt_mode_are_refused() {
    let mut conn = ready(Export::default());
    for result in [
        conn.opt_list(),
        conn.opt_info(),
        conn.opt_go(),
        conn.opt_structured_reply(),
        conn.opt_abort(),
    ] {
        assert!(matches!(result, Err(Error::InvalidState(_))), "{result:?}");
    }
    assert!(conn.take_output().is_empty());

    // Before the greeting, and in automatic mode during the handshake.
    let mut conn = Connection::new(opt_config());
    assert!(matches!(conn.opt_list(), Err(Error::InvalidState(_))));
    let mut conn = Connection::new(compact());
    feed(
        &mut conn,
        &Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take(),
    );
    let _ = conn.take_output();
    assert!(matches!(conn.opt_go(), Err(Error::InvalidState(_))));
}

#[test]
fn opt_mode_rep_err_shutdown_reports_option_done_then_aborts() {
    let mut conn = negotiating();
    conn.opt_info().unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.opt_error(OPT_INFO, REP_ERR_SHUTDOWN, "bye").take(),
    );
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::OptionDone { option: NbdOption::Info, result: Err(e) }] if e.errno() == Errno::Shutdown),
        "{events:?}"
    );
    // No new option while the abort waits to be written.
    assert!(conn.opt_list().is_err());
    assert_eq!(sent_option(&mut conn).option, OPT_ABORT);
    // Written: over, without waiting for the server's acknowledgement.
    let events = drain(&mut conn);
    // The abort was the client's own doing: only the end is reported.
    assert!(
        matches!(events.as_slice(), [Event::Closed { error: Some(e) }] if e.errno() == Errno::Shutdown),
        "{events:?}"
    );
    assert_dead(&conn, &events, Errno::Shutdown);
}

#[test]
fn opt_go_failing_while_it_selects_contexts_is_reported_as_go() {
    let mut conn = negotiating();
    conn.add_meta_context("base:allocation").unwrap();
    conn.opt_go().unwrap();
    // opt_go selects the configured contexts first.
    assert_eq!(sent_option(&mut conn).option, OPT_SET_META_CONTEXT);
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.opt_error(OPT_SET_META_CONTEXT, REP_ERR_SHUTDOWN, "bye")
            .take(),
    );
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::OptionDone { option: NbdOption::Go, result: Err(e) }] if e.errno() == Errno::Shutdown),
        "{events:?}"
    );
    assert_eq!(sent_option(&mut conn).option, OPT_ABORT);
    feed(&mut conn, &s.ack(OPT_ABORT).take());
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::Closed { error: Some(_) }]
    ));

    // A connection dying under the same opt_go reports GO too.
    let mut conn = negotiating();
    conn.add_meta_context("base:allocation").unwrap();
    conn.opt_go().unwrap();
    let _ = conn.take_output();
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert!(
        matches!(&events[0], Event::OptionDone { option: NbdOption::Go, result: Err(e) } if e.errno() == Errno::NotConn),
        "{events:?}"
    );
}

#[test]
fn unsolicited_option_reply_while_negotiating_kills_the_connection() {
    let mut conn = negotiating();
    feed(&mut conn, &Script::new().ack(OPT_LIST).take());
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn
        .error()
        .unwrap()
        .to_string()
        .contains("no option was sent"));
}

#[test]
fn connection_death_fails_the_pending_option_once() {
    let mut conn = negotiating();
    conn.opt_list().unwrap();
    let _ = conn.take_output();
    conn.handle_input(&[]).unwrap();
    let events = drain(&mut conn);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(
        &events[0],
        Event::OptionDone { option: NbdOption::List, result: Err(e) } if e.errno() == Errno::NotConn
    ));
    assert_dead(&conn, &events, Errno::NotConn);
}

#[test]
fn listing_exports_outside_opt_mode_says_how() {
    let mut conn = ready(Export::default());
    let err = conn.opt_list().unwrap_err();
    assert_eq!(err.errno(), Errno::Inval);
    let text = err.to_string();
    assert!(
        text.contains("opt mode") && text.contains("opt_mode"),
        "the error should say how to list exports: {text}"
    );
}
