//! The traffic counters against byte counts known from the protocol's
//! framing: every byte the fake server and the client exchanged is counted
//! once, a request and its replies are chunks, and a 4 KiB read adds its
//! data plus the headers the negotiated reply form has.

use bytes::BytesMut;
use nbd_proto::{CmdFlags, Config, Stats};
use nbd_testkit::{FakeServer, Pair, Style};

/// Request header sizes: compact (magic, flags, type, cookie, offset,
/// 32-bit length) and extended (64-bit length).
const COMPACT_REQUEST: u64 = 28;
const EXTENDED_REQUEST: u64 = 32;
const SIMPLE_REPLY: u64 = 16;
const STRUCTURED_CHUNK: u64 = 20;
const EXTENDED_CHUNK: u64 = 32;
/// The offset that starts an `OFFSET_DATA` payload.
const DATA_OFFSET: u64 = 8;

fn server(style: Style, structured: bool, extended: bool) -> FakeServer {
    FakeServer::builder()
        .style(style)
        .size(1 << 20)
        .structured(structured)
        .extended(extended)
        .no_zeroes(false)
        .build()
}

/// The counters must agree with what the pair actually moved.
fn assert_bytes_match(pair: &Pair, what: &str) -> Stats {
    let stats = pair.client.stats();
    let (to_server, to_client) = pair.bytes_moved();
    assert_eq!(stats.bytes_sent, to_server, "{what}: bytes sent");
    assert_eq!(stats.bytes_received, to_client, "{what}: bytes received");
    assert_eq!(stats.bytes_sent, pair.client.stats_bytes_sent(), "{what}");
    assert_eq!(
        stats.bytes_received,
        pair.client.stats_bytes_received(),
        "{what}"
    );
    assert_eq!(stats.chunks_sent, pair.client.stats_chunks_sent(), "{what}");
    assert_eq!(
        stats.chunks_received,
        pair.client.stats_chunks_received(),
        "{what}"
    );
    stats
}

/// One 4 KiB read; returns the counters before and after.
fn read_4k(pair: &mut Pair) -> (Stats, Stats) {
    let before = pair.client.stats();
    let cookie = pair
        .client
        .pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
        .expect("pread queued");
    let done = pair.wait(cookie).expect("read completes");
    assert!(done.result.is_ok(), "{:?}", done.result);
    (before, pair.client.stats())
}

#[test]
fn a_plain_newstyle_handshake_counts_every_byte_and_chunk() {
    let mut pair = Pair::new(Config::default(), server(Style::Newstyle, false, false));
    pair.handshake().expect("handshake");
    let stats = assert_bytes_match(&pair, "newstyle");
    // Client flags (4), then NBD_OPT_EXPORT_NAME: its 16-byte header, and
    // the default export's empty name.
    assert_eq!(stats.bytes_sent, 4 + 16);
    // Greeting (16), handshake flags (2), size and flags (10), 124 zeroes.
    assert_eq!(stats.bytes_received, 16 + 2 + 10 + 124);
    // One option sent; the greeting received (the export-name answer
    // has no magic of its own, so it is no chunk, as in libnbd).
    assert_eq!(stats.chunks_sent, 1);
    assert_eq!(stats.chunks_received, 1);
}

#[test]
fn a_read_with_simple_replies_adds_its_header_and_data() {
    let mut pair = Pair::new(
        Config::default(),
        server(Style::FixedNewstyle, false, false),
    );
    pair.handshake().expect("handshake");
    let handshake = assert_bytes_match(&pair, "handshake");
    assert!(handshake.chunks_sent >= 2, "{handshake:?}");
    let (before, after) = read_4k(&mut pair);
    assert_bytes_match(&pair, "simple read");
    assert_eq!(after.bytes_sent - before.bytes_sent, COMPACT_REQUEST);
    assert_eq!(
        after.bytes_received - before.bytes_received,
        SIMPLE_REPLY + 4096
    );
    assert_eq!(after.chunks_sent - before.chunks_sent, 1);
    assert_eq!(after.chunks_received - before.chunks_received, 1);
}

#[test]
fn a_read_with_structured_replies_counts_each_chunk() {
    for extended in [false, true] {
        let what = if extended { "extended" } else { "structured" };
        let mut pair = Pair::new(
            Config::default(),
            server(Style::FixedNewstyle, true, extended),
        );
        pair.handshake().expect("handshake");
        assert_eq!(pair.client.extended_headers_negotiated(), extended);
        let (before, after) = read_4k(&mut pair);
        assert_bytes_match(&pair, what);
        let (request, chunk) = if extended {
            (EXTENDED_REQUEST, EXTENDED_CHUNK)
        } else {
            (COMPACT_REQUEST, STRUCTURED_CHUNK)
        };
        assert_eq!(after.bytes_sent - before.bytes_sent, request, "{what}");
        assert_eq!(after.chunks_sent - before.chunks_sent, 1, "{what}");
        // However the server splits the reply, each chunk brings one header
        // and every data chunk one offset on top of the 4096 bytes.
        let chunks = after.chunks_received - before.chunks_received;
        assert!(chunks >= 1, "{what}");
        let received = after.bytes_received - before.bytes_received;
        assert!(received >= 4096 + chunk + DATA_OFFSET, "{what}: {received}");
        assert!(
            received <= 4096 + chunks * (chunk + DATA_OFFSET),
            "{what}: {received}"
        );
    }
}
