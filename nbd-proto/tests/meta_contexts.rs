//! Meta contexts: their selection in the automatic handshake, the opt-mode
//! `opt_list_meta_context` / `opt_set_meta_context` calls, and the limits on
//! what a server may make the client hold.

mod support;

use nbd_proto::wire::consts::*;
use nbd_proto::wire::MetaContextRequest;
use nbd_proto::{Config, Connection, Errno, Error, Event, NbdOption, OptionReplyError};
use support::*;

const BASE: &str = "base:allocation";
const DIRTY: &str = "qemu:dirty-bitmap:bm0";

/// `MAX_OPTION_REPLIES` of the crate: most contexts or exports one option may bring.
const MAX_OPTION_REPLIES: usize = 65_536;

fn queries() -> Vec<String> {
    vec![BASE.into(), "qemu:dirty-bitmap:".into()]
}

fn meta_request(name: &str, queries: &[String]) -> MetaContextRequest {
    MetaContextRequest {
        name: name.into(),
        queries: queries.to_vec(),
    }
}

fn one_option(conn: &mut Connection) -> SentOption {
    let mut options = parse_options(&conn.take_output());
    assert_eq!(options.len(), 1, "{options:?}");
    options.pop().unwrap()
}

/// Greets a fresh automatic connection; returns it with the first option sent.
fn greeted(config: Config) -> (Connection, SentOption) {
    let mut conn = Connection::new(config);
    feed(
        &mut conn,
        &Script::new()
            .newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .take(),
    );
    let sent = conn.take_output();
    let (_, rest) = split_client_flags(&sent);
    let mut options = parse_options(rest);
    assert_eq!(options.len(), 1, "{options:?}");
    (conn, options.pop().unwrap())
}

/// Answers GO with an export and checks that transmission starts, with only a
/// `Ready` event.
fn finish_go(conn: &mut Connection) {
    let go = one_option(conn);
    assert_eq!(go.option, OPT_GO);
    feed(
        conn,
        &Script::new()
            .info_export(OPT_GO, 1 << 20, ALL_FLAGS)
            .ack(OPT_GO)
            .take(),
    );
    let events = drain(conn);
    assert!(matches!(events.as_slice(), [Event::Ready]), "{events:?}");
    assert!(conn.is_ready());
}

/// Opt mode with contexts configured, negotiating after extended headers (or
/// structured replies) were acknowledged.
fn negotiating(extended: bool) -> Connection {
    let base = if extended {
        Config::default()
    } else {
        compact()
    };
    let (mut conn, first) = greeted(
        base.opt_mode(true)
            .export_name("disk")
            .meta_contexts(queries()),
    );
    let option = if extended {
        OPT_EXTENDED_HEADERS
    } else {
        OPT_STRUCTURED_REPLY
    };
    assert_eq!(first.option, option);
    feed(&mut conn, &Script::new().ack(option).take());
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Negotiating]),
        "{events:?}"
    );
    assert!(
        conn.take_output().is_empty(),
        "opt mode waits after {}",
        option_name(option)
    );
    assert_eq!(conn.extended_headers_negotiated(), extended);
    assert!(conn.structured_replies_negotiated());
    conn
}

/// The `MetaContext` events of a list, then its `OptionDone`.
fn contexts_then_done(events: Vec<Event>, option: u32) -> (Vec<(u32, String)>, Result<(), Error>) {
    let mut contexts = Vec::new();
    let mut done = None;
    for e in events {
        match e {
            Event::MetaContext { id, name } => {
                assert!(done.is_none(), "context after OptionDone");
                contexts.push((id, name));
            }
            Event::OptionDone { option: o, result } => {
                assert_eq!(o.code(), option, "OptionDone for {o}");
                assert!(done.is_none(), "second OptionDone");
                done = Some(result);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (contexts, done.expect("OptionDone"))
}

fn owned(list: &[(u32, &str)]) -> Vec<(u32, String)> {
    list.iter().map(|&(id, n)| (id, n.to_string())).collect()
}

// ---------------------------------------------------------------- automatic handshake

#[test]
fn auto_handshake_selects_the_contexts_right_after_extended_headers() {
    let config = Config::default()
        .export_name("disk")
        .meta_contexts(queries());
    let (mut conn, first) = greeted(config);
    assert_eq!(first.option, OPT_EXTENDED_HEADERS);
    assert!(first.data.is_empty());
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    // No STRUCTURED_REPLY: extended headers bring structured replies.
    let set = one_option(&mut conn);
    assert_eq!(set.option, OPT_SET_META_CONTEXT);
    assert_eq!(set.meta_request(), meta_request("disk", &queries()));
    feed(
        &mut conn,
        &Script::new()
            .meta_context(OPT_SET_META_CONTEXT, 3, BASE)
            .meta_context(OPT_SET_META_CONTEXT, 9, DIRTY)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    // Automatic mode reports no MetaContext events.
    assert!(drain(&mut conn).is_empty());
    assert!(!conn.is_ready());
    finish_go(&mut conn);
    assert_eq!(
        conn.meta_contexts(),
        owned(&[(3, BASE), (9, DIRTY)]).as_slice()
    );
    assert!(conn.can_meta_context(BASE));
    assert!(conn.can_meta_context(DIRTY));
    assert!(!conn.can_meta_context("qemu:dirty-bitmap:"));
    assert!(!conn.can_meta_context("base:allocation "));
    assert!(conn.extended_headers_negotiated());
    assert!(conn.structured_replies_negotiated());
}

#[test]
fn any_refusal_of_extended_headers_falls_back_to_structured_replies() {
    let refusals = [
        REP_ERR_UNSUP,
        REP_ERR_POLICY,
        REP_ERR_INVALID,
        REP_ERR_PLATFORM,
        REP_ERR_TLS_REQD,
        REP_ERR_UNKNOWN,
        REP_ERR_BLOCK_SIZE_REQD,
        REP_ERR_TOO_BIG,
        REP_ERR_EXT_HEADER_REQD,
        REP_FLAG_ERROR | 0x77,
    ];
    for refusal in refusals {
        let config = Config::default().export_name("disk").meta_context(BASE);
        let (mut conn, first) = greeted(config);
        assert_eq!(first.option, OPT_EXTENDED_HEADERS);
        feed(
            &mut conn,
            &Script::new()
                .opt_error(OPT_EXTENDED_HEADERS, refusal, "no")
                .take(),
        );
        assert!(drain(&mut conn).is_empty(), "{}", reply_type_name(refusal));
        let sr = one_option(&mut conn);
        assert_eq!(
            sr.option,
            OPT_STRUCTURED_REPLY,
            "{}",
            reply_type_name(refusal)
        );
        feed(&mut conn, &Script::new().ack(OPT_STRUCTURED_REPLY).take());
        let set = one_option(&mut conn);
        assert_eq!(set.option, OPT_SET_META_CONTEXT);
        assert_eq!(set.meta_request(), meta_request("disk", &[BASE.into()]));
        feed(
            &mut conn,
            &Script::new()
                .meta_context(OPT_SET_META_CONTEXT, 1, BASE)
                .ack(OPT_SET_META_CONTEXT)
                .take(),
        );
        finish_go(&mut conn);
        assert!(!conn.extended_headers_negotiated());
        assert!(conn.structured_replies_negotiated());
        assert_eq!(conn.meta_contexts(), owned(&[(1, BASE)]).as_slice());
    }
}

#[test]
fn a_refused_selection_still_goes_with_no_contexts() {
    for refusal in [
        REP_ERR_UNSUP,
        REP_ERR_POLICY,
        REP_ERR_INVALID,
        REP_ERR_UNKNOWN,
    ] {
        let config = compact().meta_contexts(queries());
        let (mut conn, first) = greeted(config);
        assert_eq!(first.option, OPT_STRUCTURED_REPLY);
        feed(&mut conn, &Script::new().ack(OPT_STRUCTURED_REPLY).take());
        assert_eq!(one_option(&mut conn).option, OPT_SET_META_CONTEXT);
        // A context, then the refusal: the context is not kept.
        feed(
            &mut conn,
            &Script::new()
                .meta_context(OPT_SET_META_CONTEXT, 1, BASE)
                .opt_error(OPT_SET_META_CONTEXT, refusal, "no bitmaps here")
                .take(),
        );
        assert!(
            drain(&mut conn).is_empty(),
            "no OptionDone in automatic mode"
        );
        finish_go(&mut conn);
        assert!(conn.meta_contexts().is_empty());
        assert!(!conn.can_meta_context(BASE));
    }
}

#[test]
fn no_selection_without_contexts_request_or_structured_replies() {
    // No contexts configured: GO right after extended headers.
    let (mut conn, _) = greeted(Config::default());
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    finish_go(&mut conn);
    assert!(conn.meta_contexts().is_empty());

    // Contexts configured, but request_meta_context off.
    let (mut conn, _) = greeted(
        Config::default()
            .meta_contexts(queries())
            .request_meta_context(false),
    );
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    finish_go(&mut conn);
    assert!(conn.meta_contexts().is_empty());

    // Contexts configured, but neither extended headers nor structured replies.
    let (mut conn, first) = greeted(Config::default().meta_contexts(queries()));
    assert_eq!(first.option, OPT_EXTENDED_HEADERS);
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "")
            .take(),
    );
    assert_eq!(one_option(&mut conn).option, OPT_STRUCTURED_REPLY);
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, "")
            .take(),
    );
    finish_go(&mut conn);
    assert!(!conn.structured_replies_negotiated());
    assert!(conn.meta_contexts().is_empty());
}

#[test]
fn the_handshake_helper_negotiates_both_header_styles() {
    let config = Config::default().meta_context(BASE);
    let conn = handshake_meta(
        config.clone(),
        Export {
            extended: true,
            ..Export::default()
        },
        &[(5, BASE)],
    );
    assert!(conn.extended_headers_negotiated());
    let conn = handshake_meta(config, Export::default(), &[(5, BASE)]);
    assert!(!conn.extended_headers_negotiated());
    assert!(conn.can_meta_context(BASE));
}

#[test]
fn shutdown_refusals_in_the_automatic_handshake_report_only_the_end() {
    // Extended headers refused with SHUTDOWN: abort, then dead, and no
    // OptionDone in between (the caller never issued an option).
    let (mut conn, _) = greeted(Config::default());
    feed(
        &mut conn,
        &Script::new()
            .opt_error(OPT_EXTENDED_HEADERS, REP_ERR_SHUTDOWN, "bye")
            .take(),
    );
    assert!(
        drain(&mut conn).is_empty(),
        "not over until the abort is written"
    );
    assert_eq!(one_option(&mut conn).option, OPT_ABORT);
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Shutdown);

    // The selection refused with SHUTDOWN: the same.
    let (mut conn, _) = greeted(Config::default().meta_contexts(queries()));
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    assert_eq!(one_option(&mut conn).option, OPT_SET_META_CONTEXT);
    feed(
        &mut conn,
        &Script::new()
            .meta_context(OPT_SET_META_CONTEXT, 1, BASE)
            .opt_error(OPT_SET_META_CONTEXT, REP_ERR_SHUTDOWN, "")
            .take(),
    );
    assert!(
        drain(&mut conn).is_empty(),
        "not over until the abort is written"
    );
    assert_eq!(one_option(&mut conn).option, OPT_ABORT);
    assert!(conn.meta_contexts().is_empty());
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Shutdown);
}

#[test]
fn a_malformed_meta_context_reply_kills_the_connection() {
    // Shorter than its id.
    let mut conn = negotiating(true);
    conn.opt_list_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .opt_reply(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, &[0, 0, 1])
            .take(),
    );
    let events = drain(&mut conn);
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::MetaContext { .. })));
    assert_dead(&conn, &events, Errno::Proto);

    // A name over the protocol's string limit.
    let mut conn = negotiating(false);
    conn.opt_set_meta_context().unwrap();
    let _ = conn.take_output();
    let long = "x".repeat(MAX_STRING_LEN + 1);
    feed(
        &mut conn,
        &Script::new()
            .meta_context(OPT_SET_META_CONTEXT, 1, &long)
            .take(),
    );
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn.meta_contexts().is_empty());

    // A context reply to GO.
    let (mut conn, _) = greeted(Config::default());
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    assert_eq!(one_option(&mut conn).option, OPT_GO);
    feed(
        &mut conn,
        &Script::new().meta_context(OPT_GO, 1, BASE).take(),
    );
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
}

// ---------------------------------------------------------------- opt mode

#[test]
fn opt_list_meta_context_reports_each_context_then_done() {
    for extended in [false, true] {
        let mut conn = negotiating(extended);
        conn.opt_list_meta_context().unwrap();
        let list = one_option(&mut conn);
        assert_eq!(list.option, OPT_LIST_META_CONTEXT);
        assert_eq!(list.meta_request(), meta_request("disk", &queries()));
        let mut s = Script::new();
        s.meta_context(OPT_LIST_META_CONTEXT, 0, BASE).meta_context(
            OPT_LIST_META_CONTEXT,
            0,
            DIRTY,
        );
        feed(&mut conn, &s.take());
        assert!(drain(&mut conn).is_empty(), "buffered until the ACK");
        feed(&mut conn, &s.ack(OPT_LIST_META_CONTEXT).take());
        let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_LIST_META_CONTEXT);
        assert_eq!(contexts, owned(&[(0, BASE), (0, DIRTY)]));
        assert!(result.is_ok());
        assert!(conn.is_negotiating());
        // Listing selects nothing.
        assert!(conn.meta_contexts().is_empty());

        // Explicit queries, or none at all (every context).
        conn.opt_list_meta_context_queries(&[]).unwrap();
        assert_eq!(
            one_option(&mut conn).meta_request(),
            meta_request("disk", &[])
        );
        feed(&mut conn, &s.ack(OPT_LIST_META_CONTEXT).take());
        let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_LIST_META_CONTEXT);
        assert!(contexts.is_empty());
        assert!(result.is_ok());
    }
}

#[test]
fn a_list_ending_in_an_error_reports_no_context() {
    let mut conn = negotiating(true);
    conn.opt_list_meta_context_queries(&[DIRTY.into()]).unwrap();
    assert_eq!(
        one_option(&mut conn).meta_request(),
        meta_request("disk", &[DIRTY.into()])
    );
    feed(
        &mut conn,
        &Script::new()
            .meta_context(OPT_LIST_META_CONTEXT, 0, DIRTY)
            .opt_error(OPT_LIST_META_CONTEXT, REP_ERR_INVALID, "bad query")
            .take(),
    );
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_LIST_META_CONTEXT);
    assert!(contexts.is_empty());
    let err = result.unwrap_err();
    assert!(matches!(
        &err,
        Error::OptionRefused { option: NbdOption::ListMetaContext, reply: OptionReplyError::Invalid, message }
            if message.0 == "bad query"
    ));
    assert_eq!(err.errno(), Errno::Inval);
    assert!(conn.is_negotiating());

    // The next list starts from nothing.
    conn.opt_list_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .meta_context(OPT_LIST_META_CONTEXT, 0, BASE)
            .ack(OPT_LIST_META_CONTEXT)
            .take(),
    );
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_LIST_META_CONTEXT);
    assert_eq!(contexts, owned(&[(0, BASE)]));
    assert!(result.is_ok());
}

#[test]
fn opt_set_meta_context_selects_and_reports_each_context() {
    let mut conn = negotiating(true);
    conn.opt_set_meta_context().unwrap();
    let set = one_option(&mut conn);
    assert_eq!(set.option, OPT_SET_META_CONTEXT);
    assert_eq!(set.meta_request(), meta_request("disk", &queries()));
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 4, BASE)
            .meta_context(OPT_SET_META_CONTEXT, 2, DIRTY)
            .take(),
    );
    assert!(drain(&mut conn).is_empty());
    assert!(
        conn.meta_contexts().is_empty(),
        "not selected before the ACK"
    );
    feed(&mut conn, &s.ack(OPT_SET_META_CONTEXT).take());
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_SET_META_CONTEXT);
    assert_eq!(contexts, owned(&[(4, BASE), (2, DIRTY)]));
    assert!(result.is_ok());
    assert_eq!(conn.meta_contexts(), contexts.as_slice());
    assert!(conn.can_meta_context(DIRTY));

    // A list afterwards leaves the selection alone, even when it fails.
    conn.opt_list_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.meta_context(OPT_LIST_META_CONTEXT, 0, "other:ctx")
            .opt_error(OPT_LIST_META_CONTEXT, REP_ERR_UNSUP, "")
            .take(),
    );
    let (listed, result) = contexts_then_done(drain(&mut conn), OPT_LIST_META_CONTEXT);
    assert!(listed.is_empty());
    assert_eq!(result.unwrap_err().errno(), Errno::NotSup);
    assert_eq!(conn.meta_contexts(), contexts.as_slice());

    // A new selection replaces the old one; an empty one clears it.
    conn.opt_set_meta_context_queries(&[BASE.into()]).unwrap();
    assert_eq!(
        one_option(&mut conn).meta_request(),
        meta_request("disk", &[BASE.into()])
    );
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 11, BASE)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_SET_META_CONTEXT);
    assert_eq!(contexts, owned(&[(11, BASE)]));
    assert!(result.is_ok());
    assert_eq!(conn.meta_contexts(), owned(&[(11, BASE)]).as_slice());
    assert!(!conn.can_meta_context(DIRTY));
    conn.opt_set_meta_context_queries(&["nothing:".into()])
        .unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &s.ack(OPT_SET_META_CONTEXT).take());
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_SET_META_CONTEXT);
    assert!(contexts.is_empty());
    assert!(result.is_ok());
    assert!(conn.meta_contexts().is_empty());
}

#[test]
fn a_selection_ending_in_an_error_keeps_nothing() {
    let mut conn = negotiating(false);
    let mut s = Script::new();
    conn.opt_set_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 1, BASE)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    drain(&mut conn);
    assert_eq!(conn.meta_contexts(), owned(&[(1, BASE)]).as_slice());

    conn.opt_set_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 2, BASE)
            .meta_context(OPT_SET_META_CONTEXT, 3, DIRTY)
            .opt_error(OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN, "no such export")
            .take(),
    );
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_SET_META_CONTEXT);
    assert!(contexts.is_empty());
    let err = result.unwrap_err();
    assert!(matches!(
        err,
        Error::OptionRefused {
            option: NbdOption::SetMetaContext,
            reply: OptionReplyError::Unknown,
            ..
        }
    ));
    assert_eq!(err.errno(), Errno::NoEnt);
    assert!(conn.meta_contexts().is_empty());
    assert!(!conn.can_meta_context(BASE));
    assert!(conn.is_negotiating());
}

#[test]
fn meta_context_calls_need_structured_replies() {
    let mut conn = Connection::new(
        Config::default()
            .opt_mode(true)
            .meta_contexts(queries())
            .request_extended_headers(false)
            .request_structured_replies(false),
    );
    feed(
        &mut conn,
        &Script::new().newstyle(FLAG_FIXED_NEWSTYLE).take(),
    );
    // Only the client flags: the connection hands over at once.
    assert_eq!(conn.take_output().len(), 4);
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Negotiating]),
        "{events:?}"
    );
    for result in [
        conn.opt_list_meta_context(),
        conn.opt_list_meta_context_queries(&[]),
        conn.opt_set_meta_context(),
        conn.opt_set_meta_context_queries(&[BASE.into()]),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
        assert_eq!(err.errno(), Errno::Inval);
    }
    assert!(conn.take_output().is_empty());
    assert!(conn.is_negotiating());

    // opt_go goes straight to GO: there is nothing to select contexts with.
    conn.opt_go().unwrap();
    finish_go(&mut conn);
    assert!(conn.meta_contexts().is_empty());
}

#[test]
fn queries_and_names_over_the_string_limit_are_refused_before_sending() {
    let mut conn = negotiating(true);
    let long = "q".repeat(MAX_STRING_LEN + 1);
    for result in [
        conn.opt_list_meta_context_queries(&[BASE.into(), long.clone()]),
        conn.opt_set_meta_context_queries(std::slice::from_ref(&long)),
    ] {
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{result:?}"
        );
    }
    assert!(conn.take_output().is_empty());
    assert!(conn.is_negotiating());
    // The limit itself is fine.
    let max = "q".repeat(MAX_STRING_LEN);
    conn.opt_list_meta_context_queries(std::slice::from_ref(&max))
        .unwrap();
    assert_eq!(
        one_option(&mut conn).meta_request(),
        meta_request("disk", &[max])
    );

    let mut conn = Connection::new(compact());
    assert!(matches!(
        conn.add_meta_context(&long),
        Err(Error::InvalidArgument(_))
    ));
    assert!(conn.requested_meta_contexts().is_empty());
    conn.add_meta_context(BASE).unwrap();
    conn.add_meta_context(DIRTY).unwrap();
    assert_eq!(conn.requested_meta_contexts(), [BASE, DIRTY]);
    conn.clear_meta_contexts();
    assert!(conn.requested_meta_contexts().is_empty());
}

#[test]
fn added_contexts_are_requested_by_opt_set_meta_context() {
    let mut conn = negotiating(true);
    conn.clear_meta_contexts();
    conn.add_meta_context(DIRTY).unwrap();
    conn.opt_set_meta_context().unwrap();
    assert_eq!(
        one_option(&mut conn).meta_request(),
        meta_request("disk", &[DIRTY.into()])
    );
}

#[test]
fn opt_go_and_opt_info_select_the_contexts_first() {
    let mut conn = negotiating(true);
    let mut s = Script::new();

    conn.opt_info().unwrap();
    let set = one_option(&mut conn);
    assert_eq!(set.option, OPT_SET_META_CONTEXT);
    assert_eq!(set.meta_request(), meta_request("disk", &queries()));
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 5, BASE)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    // The selection is part of the INFO call: no event of its own.
    assert!(drain(&mut conn).is_empty());
    let info = one_option(&mut conn);
    assert_eq!(info.option, OPT_INFO);
    assert_eq!(info.info_request().name, "disk");
    feed(
        &mut conn,
        &s.info_export(OPT_INFO, 1 << 20, ALL_FLAGS)
            .ack(OPT_INFO)
            .take(),
    );
    let events = drain(&mut conn);
    assert!(
        matches!(
            events.as_slice(),
            [Event::OptionDone {
                option: NbdOption::Info,
                result: Ok(())
            }]
        ),
        "{events:?}"
    );
    assert_eq!(conn.meta_contexts(), owned(&[(5, BASE)]).as_slice());

    conn.opt_go().unwrap();
    assert_eq!(one_option(&mut conn).option, OPT_SET_META_CONTEXT);
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 6, BASE)
            .meta_context(OPT_SET_META_CONTEXT, 8, DIRTY)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    assert!(drain(&mut conn).is_empty());
    finish_go(&mut conn);
    assert_eq!(
        conn.meta_contexts(),
        owned(&[(6, BASE), (8, DIRTY)]).as_slice()
    );
}

#[test]
fn opt_go_goes_on_when_the_selection_is_refused() {
    let mut conn = negotiating(false);
    conn.opt_go().unwrap();
    assert_eq!(one_option(&mut conn).option, OPT_SET_META_CONTEXT);
    feed(
        &mut conn,
        &Script::new()
            .meta_context(OPT_SET_META_CONTEXT, 1, BASE)
            .opt_error(OPT_SET_META_CONTEXT, REP_ERR_POLICY, "")
            .take(),
    );
    assert!(drain(&mut conn).is_empty());
    finish_go(&mut conn);
    assert!(conn.meta_contexts().is_empty());
}

#[test]
fn changing_the_export_name_drops_the_selected_contexts() {
    let mut conn = negotiating(true);
    let mut s = Script::new();
    conn.opt_set_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 1, BASE)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    drain(&mut conn);
    // The same name keeps them.
    conn.set_export_name("disk").unwrap();
    assert_eq!(conn.meta_contexts(), owned(&[(1, BASE)]).as_slice());
    // Another name drops them, and the next selection names the new export.
    conn.set_export_name("other").unwrap();
    assert!(conn.meta_contexts().is_empty());
    assert!(!conn.can_meta_context(BASE));
    conn.opt_set_meta_context().unwrap();
    assert_eq!(
        one_option(&mut conn).meta_request(),
        meta_request("other", &queries())
    );
    feed(
        &mut conn,
        &s.meta_context(OPT_SET_META_CONTEXT, 2, DIRTY)
            .ack(OPT_SET_META_CONTEXT)
            .take(),
    );
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_SET_META_CONTEXT);
    assert!(result.is_ok());
    assert_eq!(conn.meta_contexts(), contexts.as_slice());
    assert_eq!(contexts, owned(&[(2, DIRTY)]));
}

// ---------------------------------------------------------------- limits

fn many_contexts(option: u32, n: usize) -> Vec<u8> {
    let mut s = Script::new();
    for i in 0..n {
        s.meta_context(option, i as u32 + 1, "c");
    }
    s.take()
}

#[test]
fn as_many_contexts_as_the_limit_are_accepted() {
    let mut conn = negotiating(true);
    conn.opt_list_meta_context().unwrap();
    let _ = conn.take_output();
    let mut bytes = many_contexts(OPT_LIST_META_CONTEXT, MAX_OPTION_REPLIES);
    bytes.extend(Script::new().ack(OPT_LIST_META_CONTEXT).take());
    feed(&mut conn, &bytes);
    let (contexts, result) = contexts_then_done(drain(&mut conn), OPT_LIST_META_CONTEXT);
    assert!(result.is_ok());
    assert_eq!(contexts.len(), MAX_OPTION_REPLIES);
    assert_eq!(
        contexts.last().unwrap(),
        &(MAX_OPTION_REPLIES as u32, "c".into())
    );
}

#[test]
fn one_context_over_the_limit_kills_the_connection() {
    // An opt-mode list.
    let mut conn = negotiating(true);
    conn.opt_list_meta_context().unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &many_contexts(OPT_LIST_META_CONTEXT, MAX_OPTION_REPLIES + 1),
    );
    let events = drain(&mut conn);
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::MetaContext { .. })));
    assert_dead(&conn, &events, Errno::Proto);
    assert!(matches!(conn.error(), Some(Error::Protocol(_))));

    // The automatic selection.
    let (mut conn, _) = greeted(Config::default().meta_contexts(queries()));
    feed(&mut conn, &Script::new().ack(OPT_EXTENDED_HEADERS).take());
    let _ = conn.take_output();
    feed(
        &mut conn,
        &many_contexts(OPT_SET_META_CONTEXT, MAX_OPTION_REPLIES + 1),
    );
    let events = drain(&mut conn);
    assert_dead(&conn, &events, Errno::Proto);
    assert!(conn.meta_contexts().is_empty());
    assert!(conn.take_output().is_empty(), "no GO after the failure");
}

fn many_exports(n: usize) -> Vec<u8> {
    let mut s = Script::new();
    for _ in 0..n {
        s.server_entry("e", "");
    }
    s.take()
}

#[test]
fn the_export_list_is_limited_per_option() {
    let mut conn = negotiating(false);
    // Twice the limit in total, in two lists: fine.
    for _ in 0..2 {
        conn.opt_list().unwrap();
        let _ = conn.take_output();
        let mut bytes = many_exports(MAX_OPTION_REPLIES);
        bytes.extend(Script::new().ack(OPT_LIST).take());
        feed(&mut conn, &bytes);
        let events = drain(&mut conn);
        assert_eq!(events.len(), MAX_OPTION_REPLIES + 1);
        assert!(matches!(
            events.last(),
            Some(Event::OptionDone {
                option: NbdOption::List,
                result: Ok(())
            })
        ));
        assert!(events[..MAX_OPTION_REPLIES]
            .iter()
            .all(|e| matches!(e, Event::Export { name, .. } if name == "e")));
    }
    // One more in a single list: dead.
    conn.opt_list().unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &many_exports(MAX_OPTION_REPLIES + 1));
    let events = drain(&mut conn);
    let exports = events
        .iter()
        .filter(|e| matches!(e, Event::Export { .. }))
        .count();
    assert_eq!(
        exports, MAX_OPTION_REPLIES,
        "each export is reported as it comes"
    );
    assert_dead(&conn, &events, Errno::Proto);
}
