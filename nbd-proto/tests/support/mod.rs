//! A scripted fake NBD server made of bytes, shared by the integration tests.
//!
//! Nothing here touches a socket: [`Script`] builds what a server would send with
//! the public `nbd_proto::wire` encoders, and the `parse_*` helpers decode what
//! the client sent with the public decoders, so a test can assert on the exact
//! requests (cookies, flags, offsets) the client put on the wire.
//!
//! Every test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use nbd_proto::wire::consts::*;
use nbd_proto::wire::{
    BlockStatusChunk, ChunkHeader, ErrorChunk, ExportNameReply, Extent, GreetingStart, HoleChunk,
    Info, InfoRequest, MetaContextReply, MetaContextRequest, OldstyleRest, OptionReplyHeader,
    OptionRequest, RequestHeader, ServerEntry, SimpleReply,
};
use nbd_proto::{Completion, Config, Connection, Cookie, Errno, Error, Event, ReadChunk, Strict};

// ---------------------------------------------------------------- server bytes

/// Bytes a server sends, built message by message.
#[derive(Debug, Default, Clone)]
pub struct Script {
    pub bytes: Vec<u8>,
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the bytes built so far, leaving the script empty.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    // ------------------------------------------------------------ handshake

    pub fn oldstyle(&mut self, size: u64, flags: u32) -> &mut Self {
        GreetingStart::Oldstyle.encode(&mut self.bytes);
        OldstyleRest { size, flags }.encode(&mut self.bytes);
        self
    }

    /// A newstyle greeting offering `handshake_flags` (`FLAG_FIXED_NEWSTYLE`, ...).
    pub fn newstyle(&mut self, handshake_flags: u16) -> &mut Self {
        GreetingStart::Newstyle.encode(&mut self.bytes);
        self.bytes.extend_from_slice(&handshake_flags.to_be_bytes());
        self
    }

    pub fn export_name_reply(&mut self, size: u64, flags: u16, zeroes: bool) -> &mut Self {
        ExportNameReply { size, flags }.encode(zeroes, &mut self.bytes);
        self
    }

    pub fn opt_reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> &mut Self {
        OptionReplyHeader::encode_with(option, reply_type, data, &mut self.bytes);
        self
    }

    pub fn ack(&mut self, option: u32) -> &mut Self {
        self.opt_reply(option, REP_ACK, &[])
    }

    pub fn opt_error(&mut self, option: u32, reply_type: u32, message: &str) -> &mut Self {
        self.opt_reply(option, reply_type, message.as_bytes())
    }

    pub fn info(&mut self, option: u32, info: &Info) -> &mut Self {
        let mut data = Vec::new();
        info.encode(&mut data);
        self.opt_reply(option, REP_INFO, &data)
    }

    pub fn info_export(&mut self, option: u32, size: u64, flags: u16) -> &mut Self {
        self.info(option, &Info::Export { size, flags })
    }

    pub fn server_entry(&mut self, name: &str, description: &str) -> &mut Self {
        let mut data = Vec::new();
        ServerEntry {
            name: name.into(),
            description: description.into(),
        }
        .encode(&mut data);
        self.opt_reply(OPT_LIST, REP_SERVER, &data)
    }

    // ------------------------------------------------------------ transmission

    /// A simple reply; `data` follows the header (read payload), if any.
    pub fn simple(&mut self, cookie: Cookie, error: u32, data: &[u8]) -> &mut Self {
        self.simple_raw(cookie.get(), error, data)
    }

    pub fn simple_raw(&mut self, cookie: u64, error: u32, data: &[u8]) -> &mut Self {
        SimpleReply { error, cookie }.encode(&mut self.bytes);
        self.bytes.extend_from_slice(data);
        self
    }

    /// A structured chunk header announcing `length` payload bytes (the payload is
    /// not added: use [`Script::raw`] or one of the typed chunk helpers).
    pub fn chunk_header(
        &mut self,
        cookie: u64,
        flags: u16,
        chunk_type: u16,
        length: u64,
    ) -> &mut Self {
        ChunkHeader {
            flags,
            chunk_type,
            cookie,
            offset: 0,
            length,
        }
        .encode_structured(&mut self.bytes);
        self
    }

    /// A structured chunk with its payload.
    pub fn chunk(
        &mut self,
        cookie: Cookie,
        done: bool,
        chunk_type: u16,
        payload: &[u8],
    ) -> &mut Self {
        self.chunk_header(
            cookie.get(),
            done_flag(done),
            chunk_type,
            payload.len() as u64,
        );
        self.raw(payload)
    }

    pub fn none(&mut self, cookie: Cookie) -> &mut Self {
        self.chunk(cookie, true, REPLY_TYPE_NONE, &[])
    }

    pub fn data(&mut self, cookie: Cookie, offset: u64, data: &[u8], done: bool) -> &mut Self {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        self.chunk(cookie, done, REPLY_TYPE_OFFSET_DATA, &payload)
    }

    pub fn hole(&mut self, cookie: Cookie, offset: u64, length: u32, done: bool) -> &mut Self {
        let mut payload = Vec::new();
        HoleChunk { offset, length }.encode(&mut payload);
        self.chunk(cookie, done, REPLY_TYPE_OFFSET_HOLE, &payload)
    }

    /// An `ERROR` chunk, or an `ERROR_OFFSET` chunk when `offset` is given.
    pub fn error_chunk(
        &mut self,
        cookie: Cookie,
        error: u32,
        message: &str,
        offset: Option<u64>,
        done: bool,
    ) -> &mut Self {
        let mut payload = Vec::new();
        ErrorChunk {
            error,
            message: message.into(),
            offset,
        }
        .encode(&mut payload);
        let chunk_type = if offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        };
        self.chunk(cookie, done, chunk_type, &payload)
    }
}

pub fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

// ---------------------------------------------------------------- client bytes

/// One option the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentOption {
    pub option: u32,
    pub data: Vec<u8>,
}

impl SentOption {
    /// The data of an `OPT_INFO` / `OPT_GO`, decoded.
    pub fn info_request(&self) -> InfoRequest {
        InfoRequest::decode(&self.data).expect("client sent a valid info request")
    }
}

/// Splits the 4 client flags bytes off the front of what the client sent.
pub fn split_client_flags(sent: &[u8]) -> (u32, &[u8]) {
    assert!(sent.len() >= 4, "client flags missing: {sent:?}");
    let flags = u32::from_be_bytes(sent[..4].try_into().unwrap());
    (flags, &sent[4..])
}

/// Decodes a run of option requests; every byte must belong to one.
pub fn parse_options(mut sent: &[u8]) -> Vec<SentOption> {
    let mut out = Vec::new();
    while !sent.is_empty() {
        assert!(
            sent.len() >= OptionRequest::LEN,
            "truncated option: {sent:?}"
        );
        let header = OptionRequest::decode(&sent[..OptionRequest::LEN]).expect("option magic");
        let end = OptionRequest::LEN + header.length as usize;
        assert!(sent.len() >= end, "truncated option data");
        out.push(SentOption {
            option: header.option,
            data: sent[OptionRequest::LEN..end].to_vec(),
        });
        sent = &sent[end..];
    }
    out
}

/// One request the client sent, with its write payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRequest {
    pub header: RequestHeader,
    pub payload: Vec<u8>,
}

impl SentRequest {
    pub fn cookie(&self) -> Cookie {
        Cookie::from_raw(self.header.cookie)
    }
}

/// Decodes a run of compact requests; every byte must belong to one.
pub fn parse_requests(sent: &[u8]) -> Vec<SentRequest> {
    parse_requests_in(sent, false)
}

/// Decodes requests of one header form. A payload follows a write, and (with
/// extended headers) any request flagged `PAYLOAD_LEN`.
fn parse_requests_in(mut sent: &[u8], extended: bool) -> Vec<SentRequest> {
    let len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut out = Vec::new();
    while !sent.is_empty() {
        assert!(sent.len() >= len, "truncated request: {sent:?}");
        let header = RequestHeader::decode(&sent[..len]).expect("request magic");
        let has_payload =
            header.command == CMD_WRITE || (extended && header.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let end = len
            + if has_payload {
                header.length as usize
            } else {
                0
            };
        assert!(sent.len() >= end, "truncated request payload");
        out.push(SentRequest {
            header,
            payload: sent[len..end].to_vec(),
        });
        sent = &sent[end..];
    }
    out
}

/// Takes everything the client has queued and decodes it as requests.
pub fn sent_requests(conn: &mut Connection) -> Vec<SentRequest> {
    parse_requests(&conn.take_output())
}

/// Takes the client's single queued request.
pub fn sent_request(conn: &mut Connection) -> SentRequest {
    let mut all = sent_requests(conn);
    assert_eq!(all.len(), 1, "expected exactly one request: {all:?}");
    all.pop().unwrap()
}

// ---------------------------------------------------------------- driving

/// What the fake server says about its export during [`handshake`].
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Sent as `NBD_INFO_BLOCK_SIZE` when the client asks for it.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Whether the server acknowledges `NBD_OPT_STRUCTURED_REPLY`.
    pub structured: bool,
    /// Whether the server acknowledges `NBD_OPT_EXTENDED_HEADERS`.
    pub extended: bool,
}

/// Every transmission flag this client knows about.
pub const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_DF
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

impl Default for Export {
    fn default() -> Self {
        Export {
            size: 1 << 20,
            flags: ALL_FLAGS,
            block_sizes: None,
            structured: true,
            extended: false,
        }
    }
}

impl Export {
    pub fn simple() -> Self {
        Export {
            structured: false,
            ..Export::default()
        }
    }
}

/// Feeds server bytes. `handle_input` fails only when the bytes killed the
/// connection; the tests then assert how it died.
pub fn feed(conn: &mut Connection, bytes: &[u8]) {
    if let Err(e) = conn.handle_input(bytes) {
        assert!(
            conn.is_dead(),
            "handle_input failed ({e}) but the connection is not dead"
        );
        assert_eq!(
            conn.error(),
            Some(&e),
            "the error returned is the sticky one"
        );
    }
}

/// Every event queued so far.
pub fn drain(conn: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| conn.poll_event()).collect()
}

/// The `Completed` events of a list, in order.
pub fn completions(events: Vec<Event>) -> Vec<Completion> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Completed(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// Completions keyed by cookie; panics if a cookie completed twice.
pub fn completions_by_cookie(events: Vec<Event>) -> HashMap<Cookie, Completion> {
    let mut map = HashMap::new();
    for c in completions(events) {
        let cookie = c.cookie;
        assert!(
            map.insert(cookie, c).is_none(),
            "{cookie:?} completed twice"
        );
    }
    map
}

/// The single event queued, which must be a completion.
pub fn one_completion(conn: &mut Connection) -> Completion {
    let mut events = drain(conn);
    assert_eq!(events.len(), 1, "expected one event: {events:?}");
    match events.pop().unwrap() {
        Event::Completed(c) => c,
        other => panic!("expected a completion, got {other:?}"),
    }
}

/// The errno of a failed result.
pub fn errno_of(result: &Result<(), Error>) -> Errno {
    result.as_ref().expect_err("expected an error").errno()
}

/// Drives a fixed newstyle handshake (NO_ZEROES offered) to `Ready`, checking
/// what the client sends along the way. The client must be in automatic mode.
/// The default configuration without extended headers: the handshake of a
/// server that does not know them (nbdkit 1.32, nbd-server), which most
/// scripted tests speak.
pub fn compact() -> Config {
    Config::default().request_extended_headers(false)
}

pub fn handshake(config: Config, export: Export) -> Connection {
    let request_eh = config.request_extended_headers;
    let mut request_sr = config.request_structured_replies;
    let name = config.export_name.clone();
    let mut conn = Connection::new(config);
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let sent = conn.take_output();
    let (flags, rest) = split_client_flags(&sent);
    assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let mut options = parse_options(rest);
    if request_eh {
        assert_eq!(options.len(), 1);
        assert_eq!(options[0].option, OPT_EXTENDED_HEADERS);
        if export.extended {
            s.ack(OPT_EXTENDED_HEADERS);
            // Extended headers bring structured replies with them.
            request_sr = false;
        } else {
            s.opt_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "");
        }
        feed(&mut conn, &s.take());
        options = parse_options(&conn.take_output());
    }
    if request_sr {
        assert_eq!(options.len(), 1);
        assert_eq!(options[0].option, OPT_STRUCTURED_REPLY);
        assert!(options[0].data.is_empty());
        if export.structured {
            s.ack(OPT_STRUCTURED_REPLY);
        } else {
            s.opt_error(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, "");
        }
        feed(&mut conn, &s.take());
        options = parse_options(&conn.take_output());
    }
    assert_eq!(options.len(), 1, "{options:?}");
    assert_eq!(options[0].option, OPT_GO);
    let request = options[0].info_request();
    assert_eq!(request.name, name);
    s.info_export(OPT_GO, export.size, export.flags);
    if let Some((minimum, preferred, maximum)) = export.block_sizes {
        if request.requests.contains(&INFO_BLOCK_SIZE) {
            s.info(
                OPT_GO,
                &Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                },
            );
        }
    }
    s.ack(OPT_GO);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Ready]),
        "expected Ready: {events:?}"
    );
    assert!(conn.is_ready());
    assert!(!conn.wants_write());
    conn
}

/// A connection in transmission with the default config and `export`.
pub fn ready(export: Export) -> Connection {
    handshake(Config::default(), export)
}

/// A connection in transmission with the given strict mode.
pub fn ready_strict(export: Export, strict: Strict) -> Connection {
    handshake(Config::default().strict(strict), export)
}

/// A read buffer of `len` bytes filled with `fill`.
pub fn buffer(len: usize, fill: u8) -> BytesMut {
    let mut b = BytesMut::with_capacity(len);
    b.resize(len, fill);
    b
}

/// Deterministic non-trivial data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn bytes_of(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

/// A read chunk event's cookie.
pub fn chunk_cookie(chunk: &ReadChunk) -> Cookie {
    chunk.cookie()
}

/// Asserts the connection died with an error of kind `errno`, reported by exactly
/// one `Closed` event at the end of `events`.
pub fn assert_dead(conn: &Connection, events: &[Event], errno: Errno) {
    assert!(
        conn.is_dead(),
        "connection should be dead: {:?}",
        conn.phase()
    );
    assert_eq!(
        conn.error().map(Error::errno),
        Some(errno),
        "{:?}",
        conn.error()
    );
    let closed: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Closed { .. }))
        .collect();
    assert_eq!(closed.len(), 1, "one Closed event: {events:?}");
    match events.last() {
        Some(Event::Closed { error: Some(e) }) => assert_eq!(Some(e), conn.error()),
        other => panic!("last event should be Closed with the error, got {other:?}"),
    }
    assert_eq!(conn.direction(), nbd_proto::Direction::None);
}

// ---------------------------------------------------------------- meta contexts,
// block status and extended headers

impl Script {
    /// An `NBD_REP_META_CONTEXT` reply to `option` (LIST or SET).
    pub fn meta_context(&mut self, option: u32, id: u32, name: &str) -> &mut Self {
        let mut data = Vec::new();
        MetaContextReply {
            id,
            name: name.into(),
        }
        .encode(&mut data);
        self.opt_reply(option, REP_META_CONTEXT, &data)
    }

    /// An extended (32-byte) chunk header announcing `length` payload bytes; the
    /// payload is not added.
    pub fn ext_chunk_header(
        &mut self,
        cookie: u64,
        flags: u16,
        chunk_type: u16,
        offset: u64,
        length: u64,
    ) -> &mut Self {
        ChunkHeader {
            flags,
            chunk_type,
            cookie,
            offset,
            length,
        }
        .encode_extended(&mut self.bytes);
        self
    }

    /// An extended chunk with its payload; `offset` is the header's offset field
    /// (the request's offset, for a well-behaved server).
    pub fn ext_chunk(
        &mut self,
        cookie: Cookie,
        done: bool,
        chunk_type: u16,
        offset: u64,
        payload: &[u8],
    ) -> &mut Self {
        self.ext_chunk_header(
            cookie.get(),
            done_flag(done),
            chunk_type,
            offset,
            payload.len() as u64,
        );
        self.raw(payload)
    }

    /// An extended `NONE` chunk with the DONE flag.
    pub fn ext_none(&mut self, cookie: Cookie, request_offset: u64) -> &mut Self {
        self.ext_chunk(cookie, true, REPLY_TYPE_NONE, request_offset, &[])
    }

    /// An extended `OFFSET_DATA` chunk for data at `offset`.
    pub fn ext_data(
        &mut self,
        cookie: Cookie,
        request_offset: u64,
        offset: u64,
        data: &[u8],
        done: bool,
    ) -> &mut Self {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        self.ext_chunk(
            cookie,
            done,
            REPLY_TYPE_OFFSET_DATA,
            request_offset,
            &payload,
        )
    }

    /// An extended `OFFSET_HOLE` chunk.
    pub fn ext_hole(
        &mut self,
        cookie: Cookie,
        request_offset: u64,
        offset: u64,
        length: u32,
        done: bool,
    ) -> &mut Self {
        let mut payload = Vec::new();
        HoleChunk { offset, length }.encode(&mut payload);
        self.ext_chunk(
            cookie,
            done,
            REPLY_TYPE_OFFSET_HOLE,
            request_offset,
            &payload,
        )
    }

    /// An extended `ERROR` chunk.
    pub fn ext_error_chunk(
        &mut self,
        cookie: Cookie,
        request_offset: u64,
        error: u32,
        message: &str,
        done: bool,
    ) -> &mut Self {
        let mut payload = Vec::new();
        ErrorChunk {
            error,
            message: message.into(),
            offset: None,
        }
        .encode(&mut payload);
        self.ext_chunk(cookie, done, REPLY_TYPE_ERROR, request_offset, &payload)
    }

    /// A compact `BLOCK_STATUS` chunk (structured header, 32-bit extents).
    pub fn block_status(
        &mut self,
        cookie: Cookie,
        done: bool,
        context_id: u32,
        pairs: &[(u64, u64)],
    ) -> &mut Self {
        let payload = status_payload(false, context_id, pairs);
        self.chunk(cookie, done, REPLY_TYPE_BLOCK_STATUS, &payload)
    }

    /// A `BLOCK_STATUS_EXT` chunk (extended header, 64-bit extents).
    pub fn block_status_ext(
        &mut self,
        cookie: Cookie,
        request_offset: u64,
        done: bool,
        context_id: u32,
        pairs: &[(u64, u64)],
    ) -> &mut Self {
        let payload = status_payload(true, context_id, pairs);
        self.ext_chunk(
            cookie,
            done,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            request_offset,
            &payload,
        )
    }
}

/// Extents from `(length, flags)` pairs.
pub fn extents(pairs: &[(u64, u64)]) -> Vec<Extent> {
    pairs
        .iter()
        .map(|&(length, flags)| Extent { length, flags })
        .collect()
}

/// A block status chunk payload, compact or extended.
pub fn status_payload(extended: bool, context_id: u32, pairs: &[(u64, u64)]) -> Vec<u8> {
    let mut payload = Vec::new();
    BlockStatusChunk {
        context_id,
        extents: extents(pairs),
    }
    .encode(extended, &mut payload);
    payload
}

impl SentOption {
    /// The data of an `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT`, decoded.
    pub fn meta_request(&self) -> MetaContextRequest {
        MetaContextRequest::decode(&self.data).expect("client sent a valid meta context request")
    }
}

/// Decodes a run of extended (32-byte) requests; every byte must belong to one.
/// A write carries `length` payload bytes, as does any request with
/// `CMD_FLAG_PAYLOAD_LEN` (the block status filter).
pub fn parse_extended_requests(sent: &[u8]) -> Vec<SentRequest> {
    parse_requests_in(sent, true)
}

/// Takes everything the client has queued and decodes it as extended requests.
pub fn sent_extended_requests(conn: &mut Connection) -> Vec<SentRequest> {
    parse_extended_requests(&conn.take_output())
}

/// Takes the client's single queued extended request.
pub fn sent_extended_request(conn: &mut Connection) -> SentRequest {
    let mut all = sent_extended_requests(conn);
    assert_eq!(all.len(), 1, "expected exactly one request: {all:?}");
    all.pop().unwrap()
}

/// Like [`handshake`], for a configuration with meta contexts: the fake server
/// answers `NBD_OPT_SET_META_CONTEXT` (which must name the configured export and
/// queries) with `contexts`, then acknowledges; the connection must end up with
/// exactly those contexts negotiated.
pub fn handshake_meta(config: Config, export: Export, contexts: &[(u32, &str)]) -> Connection {
    assert!(!config.meta_contexts.is_empty(), "use handshake() instead");
    let request_eh = config.request_extended_headers;
    let mut request_sr = config.request_structured_replies;
    let name = config.export_name.clone();
    let queries = config.meta_contexts.clone();
    let mut conn = Connection::new(config);
    let mut s = Script::new();
    feed(
        &mut conn,
        &s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).take(),
    );
    let sent = conn.take_output();
    let (flags, rest) = split_client_flags(&sent);
    assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let mut options = parse_options(rest);
    if request_eh {
        assert_eq!(options.len(), 1, "{options:?}");
        assert_eq!(options[0].option, OPT_EXTENDED_HEADERS);
        assert!(options[0].data.is_empty());
        if export.extended {
            s.ack(OPT_EXTENDED_HEADERS);
            request_sr = false;
        } else {
            s.opt_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "");
        }
        feed(&mut conn, &s.take());
        options = parse_options(&conn.take_output());
    }
    if request_sr {
        assert_eq!(options.len(), 1, "{options:?}");
        assert_eq!(options[0].option, OPT_STRUCTURED_REPLY);
        assert!(export.structured, "meta contexts need structured replies");
        s.ack(OPT_STRUCTURED_REPLY);
        feed(&mut conn, &s.take());
        options = parse_options(&conn.take_output());
    }
    assert_eq!(options.len(), 1, "{options:?}");
    assert_eq!(options[0].option, OPT_SET_META_CONTEXT);
    assert_eq!(
        options[0].meta_request(),
        MetaContextRequest {
            name: name.clone(),
            queries
        }
    );
    for &(id, ctx) in contexts {
        s.meta_context(OPT_SET_META_CONTEXT, id, ctx);
    }
    s.ack(OPT_SET_META_CONTEXT);
    feed(&mut conn, &s.take());
    assert!(drain(&mut conn).is_empty(), "no events before GO ends");
    let options = parse_options(&conn.take_output());
    assert_eq!(options.len(), 1, "{options:?}");
    assert_eq!(options[0].option, OPT_GO);
    assert_eq!(options[0].info_request().name, name);
    s.info_export(OPT_GO, export.size, export.flags).ack(OPT_GO);
    feed(&mut conn, &s.take());
    let events = drain(&mut conn);
    assert!(
        matches!(events.as_slice(), [Event::Ready]),
        "expected Ready: {events:?}"
    );
    assert!(conn.is_ready());
    assert!(!conn.wants_write());
    let want: Vec<(u32, String)> = contexts
        .iter()
        .map(|&(id, n)| (id, n.to_string()))
        .collect();
    assert_eq!(conn.meta_contexts(), want.as_slice());
    conn
}

/// Every completion in `events` is for a distinct cookie, and together they are
/// exactly `cookies`: each command completed exactly once.
pub fn assert_completed_once(events: &[Event], cookies: &[Cookie]) {
    let mut seen: Vec<Cookie> = events
        .iter()
        .filter_map(|e| match e {
            Event::Completed(c) => Some(c.cookie),
            _ => None,
        })
        .collect();
    let n = seen.len();
    seen.sort_by_key(|c| c.get());
    seen.dedup();
    assert_eq!(seen.len(), n, "a cookie completed twice: {events:?}");
    let mut want = cookies.to_vec();
    want.sort_by_key(|c| c.get());
    assert_eq!(seen, want, "completions differ from the commands issued");
}

// ---------------------------------------------------------------- feeding in pieces

/// The one seeded generator of the tests, for split sizes seeded by proptest.
pub use nbd_testkit::Rng;

#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Whole,
    RandomSplits,
    ByteAtATime,
    ZeroCopy,
}

pub fn feed_with(conn: &mut Connection, bytes: &[u8], mode: Mode, rng: &mut Rng) {
    match mode {
        Mode::Whole => conn.handle_input(bytes).unwrap(),
        Mode::RandomSplits => {
            let mut rest = bytes;
            while !rest.is_empty() {
                let n = match rng.below(4) {
                    0 => rng.between(1, 8),
                    1 => rng.between(1, 64),
                    2 => rng.between(1, 4096),
                    _ => rng.between(1, 70_000),
                } as usize;
                let n = n.min(rest.len());
                conn.handle_input(&rest[..n]).unwrap();
                rest = &rest[n..];
            }
        }
        Mode::ByteAtATime => {
            for b in bytes {
                conn.handle_input(std::slice::from_ref(b)).unwrap();
            }
        }
        Mode::ZeroCopy => {
            let mut rest = bytes;
            while !rest.is_empty() {
                let want = match rng.below(3) {
                    0 => rng.between(1, 16),
                    1 => rng.between(1, 2048),
                    _ => rng.between(1, 200_000),
                } as usize;
                let buf = conn.recv_buf();
                assert!(!buf.is_empty(), "the connection expects input");
                let n = want.min(buf.len()).min(rest.len());
                buf[..n].copy_from_slice(&rest[..n]);
                conn.notify_read(n).unwrap();
                rest = &rest[n..];
            }
        }
    }
}
