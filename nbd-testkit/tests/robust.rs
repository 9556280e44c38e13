//! The fake server against clients that misbehave: it must answer with an NBD
//! error or end the conversation, never panic, and never buffer without bound.

use nbd_proto::wire::consts::*;
use nbd_proto::wire::{OptionReplyHeader, OptionRequest, RequestHeader, SimpleReply};
use nbd_proto::{CmdFlags, Config, Connection};
use nbd_testkit::{FakeServer, Rng, Style, MAX_OPTION_DATA};

/// The greeting plus client flags: the server now waits for options.
fn negotiating(builder: nbd_testkit::Builder) -> FakeServer {
    let mut server = builder.build();
    let _ = server.take_output();
    server.handle_input(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    assert!(!server.is_closed());
    server
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    OptionRequest::encode_with(option, data, &mut out);
    out
}

fn reply_types(mut out: &[u8]) -> Vec<u32> {
    let mut types = Vec::new();
    while out.len() >= OptionReplyHeader::LEN {
        let h = OptionReplyHeader::decode(&out[..OptionReplyHeader::LEN]).unwrap();
        types.push(h.reply_type);
        out = &out[OptionReplyHeader::LEN + h.length as usize..];
    }
    types
}

/// A server in transmission with simple replies (no structured replies).
fn transmitting_simple() -> FakeServer {
    let mut server = negotiating(
        FakeServer::builder()
            .size(8192)
            .block_sizes(512, 4096, 4096),
    );
    server.handle_input(&option(OPT_EXPORT_NAME, b""));
    let _ = server.take_output();
    assert!(server.in_transmission());
    server
}

fn request(command: u16, flags: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode_compact(&mut out);
    out
}

#[test]
fn unknown_and_malformed_options_get_error_replies_and_negotiation_goes_on() {
    let mut server = negotiating(FakeServer::builder());
    server.handle_input(&option(OPT_STARTTLS, &[]));
    server.handle_input(&option(0xdead, b"whatever"));
    server.handle_input(&option(OPT_LIST, b"unexpected data"));
    server.handle_input(&option(OPT_INFO, &[0, 0, 0, 9]));
    server.handle_input(&option(OPT_STRUCTURED_REPLY, b"x"));
    let mut info = Vec::new();
    nbd_proto::wire::InfoRequest::encode("no such export", &[], &mut info);
    server.handle_input(&option(OPT_GO, &info));
    let types = reply_types(&server.take_output());
    assert_eq!(
        types,
        [
            REP_ERR_UNSUP,
            REP_ERR_UNSUP,
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ERR_UNKNOWN
        ]
    );
    assert!(!server.is_closed());
    // Meta contexts before structured replies are refused too.
    let mut meta = Vec::new();
    nbd_proto::wire::MetaContextRequest::encode("", &["base:allocation".into()], &mut meta);
    server.handle_input(&option(OPT_SET_META_CONTEXT, &meta));
    assert_eq!(reply_types(&server.take_output()), [REP_ERR_INVALID]);
}

#[test]
fn an_option_longer_than_the_limit_is_skipped_without_buffering_it() {
    let mut server = negotiating(FakeServer::builder());
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_LIST.to_be_bytes());
    header.extend_from_slice(&((MAX_OPTION_DATA as u32) * 4).to_be_bytes());
    server.handle_input(&header);
    for _ in 0..4 {
        server.handle_input(&vec![0u8; MAX_OPTION_DATA as usize]);
    }
    assert_eq!(reply_types(&server.take_output()), [REP_ERR_TOO_BIG]);
    server.handle_input(&option(OPT_LIST, &[]));
    assert_eq!(reply_types(&server.take_output()), [REP_SERVER, REP_ACK]);
}

#[test]
fn options_on_a_server_without_fixed_newstyle_end_the_conversation() {
    let mut server = FakeServer::builder().style(Style::Newstyle).build();
    let _ = server.take_output();
    server.handle_input(&FLAG_C_NO_ZEROES.to_be_bytes());
    server.handle_input(&option(OPT_LIST, &[]));
    assert!(server.is_closed());
    assert!(!server.closed_cleanly());
    assert!(server.take_output().is_empty());
}

#[test]
fn client_flags_the_server_did_not_offer_end_the_conversation() {
    let mut server = FakeServer::builder().no_zeroes(false).build();
    let _ = server.take_output();
    server.handle_input(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    assert!(server.is_closed());
    assert!(server.close_reason().unwrap().contains("client flags"));
}

#[test]
fn bad_requests_get_nbd_errors_and_the_connection_survives() {
    let mut server = transmitting_simple();
    let cases: [(Vec<u8>, u32); 4] = [
        (request(CMD_READ, 0, 1, 8192, 512), EINVAL),
        (request(CMD_READ, 0, 2, 1, 512), EINVAL),
        (request(99, 0, 3, 0, 0), EINVAL),
        // Writes past the end; payload still consumed to keep framing.
        (
            [request(CMD_WRITE, 0, 4, 8192, 512), vec![0; 512]].concat(),
            ENOSPC,
        ),
    ];
    for (bytes, errno) in cases {
        server.handle_input(&bytes);
        let out = server.take_output();
        let reply = SimpleReply::decode(&out[..16]).unwrap();
        assert_eq!(reply.error, errno, "{reply:?}");
        assert_eq!(out.len(), 16);
    }
    // A write above the maximum block size is skipped, then refused.
    server.handle_input(&request(CMD_WRITE, 0, 5, 0, 8192));
    server.handle_input(&[0; 8000]);
    assert!(server.take_output().is_empty());
    server.handle_input(&[0; 192]);
    let reply = SimpleReply::decode(&server.take_output()).unwrap();
    assert_eq!((reply.cookie, reply.error), (5, EINVAL));
    // Block status without a meta context.
    server.handle_input(&request(CMD_BLOCK_STATUS, 0, 6, 0, 512));
    assert_eq!(
        SimpleReply::decode(&server.take_output()).unwrap().error,
        EINVAL
    );
    assert!(!server.is_closed());
}

#[test]
fn unframeable_requests_end_the_conversation() {
    // A write announcing 4 GiB of payload.
    let mut server = transmitting_simple();
    server.handle_input(&request(CMD_WRITE, 0, 1, 0, u32::MAX.into()));
    assert!(server.is_closed());
    // A bad magic.
    let mut server = transmitting_simple();
    server.handle_input(&[0x55; 28]);
    assert!(server.is_closed());
    assert!(server.close_reason().unwrap().contains("magic"));
    // An extended header where compact ones were negotiated.
    let mut server = transmitting_simple();
    let mut bytes = Vec::new();
    RequestHeader {
        flags: 0,
        command: CMD_FLUSH,
        cookie: 1,
        offset: 0,
        length: 0,
    }
    .encode_extended(&mut bytes);
    server.handle_input(&bytes);
    assert!(server.is_closed());
    // Bytes after the end are ignored, not a panic.
    server.handle_input(&[1, 2, 3]);
    server.handle_eof();
    assert!(server.take_output().is_empty());
}

/// The bytes a real client sends in a short session, negotiated in full.
fn recorded_client_stream(seed: u64) -> Vec<u8> {
    let builder = || FakeServer::builder().size(65536).seed(seed).chaotic();
    let mut server = builder().build();
    let config = Config::default().meta_context(nbd_proto::context::BASE_ALLOCATION);
    let mut client = Connection::new(config);
    let mut log = Vec::new();
    let step = |client: &mut Connection, server: &mut FakeServer, log: &mut Vec<u8>| {
        for _ in 0..100 {
            let out = client.take_output();
            log.extend_from_slice(&out);
            server.handle_input(&out);
            let back = server.take_output();
            if out.is_empty() && back.is_empty() {
                return;
            }
            let _ = client.handle_input(&back);
        }
    };
    step(&mut client, &mut server, &mut log);
    assert!(client.is_ready());
    let mut rng = Rng::new(seed);
    for _ in 0..20 {
        let offset = rng.below(60000);
        let len = rng.range(1..4096);
        match rng.below(4) {
            0 => {
                let _ = client.pread(
                    bytes::BytesMut::zeroed(len as usize),
                    offset,
                    CmdFlags::empty(),
                );
            }
            1 => {
                let _ = client.pwrite(rng.bytes(len as usize).into(), offset, CmdFlags::empty());
            }
            2 => {
                let _ = client.zero(len, offset, CmdFlags::empty());
            }
            _ => {
                let _ = client.block_status(len, offset, CmdFlags::empty());
            }
        }
    }
    step(&mut client, &mut server, &mut log);
    client.disconnect().unwrap();
    step(&mut client, &mut server, &mut log);
    assert!(server.closed_cleanly(), "{:?}", server.close_reason());
    log
}

#[test]
fn mutated_client_streams_never_panic_the_server() {
    let base = Rng::seed_from_env(77);
    for seed in base..base + 40 {
        let stream = recorded_client_stream(seed);
        let mut rng = Rng::new(seed);
        for round in 0..25 {
            let mut bytes = stream.clone();
            for _ in 0..rng.range(1..6) {
                let at = rng.below(bytes.len() as u64) as usize;
                match rng.below(4) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = rng.below(256) as u8,
                    2 => bytes.truncate(at),
                    _ => {
                        let n = rng.range_usize(1..64);
                        let junk = rng.bytes(n);
                        bytes.splice(at..at, junk);
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let mut server = FakeServer::builder()
                .size(65536)
                .seed(seed)
                .chaotic()
                .build();
            let mut produced = 0usize;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = rng.range_usize(1..rest.len().min(300) + 1);
                server.handle_input(&rest[..n]);
                produced += server.take_output().len();
                rest = &rest[n..];
            }
            server.handle_eof();
            assert!(server.is_closed(), "seed {seed} round {round}");
            // Bounded by what a legal session of that size could get back.
            assert!(
                produced < 4 << 20,
                "seed {seed} round {round}: {produced} bytes"
            );
        }
    }
}

#[test]
fn pure_garbage_never_panics_the_server_in_any_style() {
    let base = Rng::seed_from_env(99);
    let mut rng = Rng::new(base);
    for style in [Style::Oldstyle, Style::Newstyle, Style::FixedNewstyle] {
        for _ in 0..300 {
            let mut server = FakeServer::builder().style(style).size(4096).build();
            let len = rng.range_usize(0..2048);
            let garbage = rng.bytes(len);
            server.handle_input(&garbage);
            let _ = server.take_output();
            server.handle_eof();
            assert!(server.is_closed());
        }
    }
}

#[test]
fn without_reordering_any_input_split_gives_the_same_bytes() {
    let base = Rng::seed_from_env(55);
    for seed in base..base + 10 {
        let stream = recorded_client_stream(seed);
        let build = || {
            FakeServer::builder()
                .size(65536)
                .seed(seed)
                .split_reads(true)
                .holes(true)
                .build()
        };
        let mut whole = build();
        whole.handle_input(&stream);
        let want = whole.take_output();
        assert!(whole.closed_cleanly(), "seed {seed}");
        let mut split = build();
        let mut got = Vec::new();
        let mut rng = Rng::new(seed);
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.range_usize(1..rest.len().min(40) + 1);
            split.handle_input(&rest[..n]);
            got.extend(split.take_output());
            rest = &rest[n..];
        }
        assert!(got == want, "seed {seed}: the split changed the replies");
    }
}
