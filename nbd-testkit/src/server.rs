//! [`FakeServer`]: a well-behaved sans-IO NBD server over an in-memory image.
//!
//! It answers by itself (no script): bytes in with
//! [`FakeServer::handle_input`], bytes out with [`FakeServer::take_output`].
//! Every message is built and parsed with the public `nbd_proto::wire`
//! encoders and decoders. Whatever a client sends, the server never panics and
//! never allocates without bound: a message it cannot frame ends the
//! connection (with the reason kept in [`FakeServer::close_reason`]); a bad
//! request that keeps framing gets an NBD error reply.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbd_proto::context::BASE_ALLOCATION;
use nbd_proto::wire::consts::*;
use nbd_proto::wire::{
    BlockStatusChunk, ChunkHeader, ErrorChunk, ExportNameReply, GreetingStart, HoleChunk, Info,
    InfoRequest, MetaContextReply, MetaContextRequest, OldstyleRest, OptionReplyHeader,
    OptionRequest, RequestHeader, ServerEntry, SimpleReply,
};

use crate::image::{lock, Image, SharedImage};
use crate::rng::Rng;

/// Largest option data read into memory; longer options get `ERR_TOO_BIG`
/// and their data is discarded unread.
pub const MAX_OPTION_DATA: u64 = 64 * 1024;
/// Largest read or write payload ever accepted; a write announcing more ends
/// the connection (its payload could not be skipped in reasonable time).
pub const MAX_PAYLOAD: u64 = 64 * 1024 * 1024;
/// Most extents in one block status chunk; a longer answer is cut short,
/// as the protocol allows.
pub const MAX_EXTENTS: usize = 4096;
/// Id of `base:allocation` once selected.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Which greeting the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Oldstyle: size and flags at once, no options.
    Oldstyle,
    /// Newstyle without the fixed flag: only `NBD_OPT_EXPORT_NAME`.
    Newstyle,
    /// Fixed newstyle: every option this server knows.
    FixedNewstyle,
}

/// One export a server offers; all of a server's exports show the same image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name.
    pub name: String,
    /// Description sent with `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
}

impl From<&str> for ExportSpec {
    fn from(name: &str) -> Self {
        ExportSpec {
            name: name.into(),
            description: String::new(),
        }
    }
}

impl From<(&str, &str)> for ExportSpec {
    fn from((name, description): (&str, &str)) -> Self {
        ExportSpec {
            name: name.into(),
            description: description.into(),
        }
    }
}

/// How a [`FakeServer`] behaves, set with [`FakeServer::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    style: Style,
    size: u64,
    image: Option<SharedImage>,
    read_only: bool,
    structured: bool,
    extended: bool,
    multi_conn: bool,
    block_sizes: Option<(u32, u32, u32)>,
    exports: Vec<ExportSpec>,
    seed: u64,
    split_reads: bool,
    holes: bool,
    reorder: bool,
    no_zeroes: bool,
    bad: Vec<(Range<u64>, u32)>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            style: Style::FixedNewstyle,
            size: 1 << 20,
            image: None,
            read_only: false,
            structured: true,
            extended: true,
            multi_conn: false,
            block_sizes: None,
            exports: vec![ExportSpec::from("")],
            seed: 0,
            split_reads: false,
            holes: false,
            reorder: false,
            no_zeroes: true,
            bad: Vec::new(),
        }
    }
}

impl Builder {
    /// The greeting (default: fixed newstyle).
    pub fn style(mut self, style: Style) -> Self {
        self.style = style;
        self
    }

    /// Size of a fresh empty image (default 1 MiB); ignored with [`Builder::image`].
    pub fn size(mut self, size: u64) -> Self {
        self.size = size;
        self
    }

    /// Serves `image` (shared: the test keeps a handle to inspect or seed it).
    pub fn image(mut self, image: SharedImage) -> Self {
        self.image = Some(image);
        self
    }

    /// Serves a copy of `bytes`, all allocated.
    pub fn contents(self, bytes: &[u8]) -> Self {
        self.image(Image::from_bytes(bytes).shared())
    }

    /// Marks the export read-only: writes, trims and zeroes fail with `EPERM`.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Offers structured replies (default on).
    pub fn structured(mut self, structured: bool) -> Self {
        self.structured = structured;
        self
    }

    /// Offers extended headers (default on); also advertises block status
    /// payloads (context filters) once negotiated.
    pub fn extended(mut self, extended: bool) -> Self {
        self.extended = extended;
        self
    }

    /// Advertises `NBD_FLAG_CAN_MULTI_CONN` (every connection made with
    /// [`FakeServer::new_connection`] shares the image).
    pub fn multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }

    /// Advertises block size constraints and enforces them: misaligned
    /// requests and payloads above `maximum` fail with `EINVAL`.
    pub fn block_sizes(mut self, minimum: u32, preferred: u32, maximum: u32) -> Self {
        self.block_sizes = Some((minimum, preferred, maximum));
        self
    }

    /// The exports offered (default: one export named ""). Each is a name, or
    /// a `(name, description)` pair.
    pub fn exports<I, E>(mut self, exports: I) -> Self
    where
        I: IntoIterator<Item = E>,
        E: Into<ExportSpec>,
    {
        self.exports = exports.into_iter().map(Into::into).collect();
        self
    }

    /// Seed of the choices the server makes (read splits, reply order, simple
    /// or structured replies where both are legal).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Splits structured read replies into several data chunks at random places.
    pub fn split_reads(mut self, split: bool) -> Self {
        self.split_reads = split;
        self
    }

    /// Sends unallocated parts of a structured read as `OFFSET_HOLE` chunks.
    pub fn holes(mut self, holes: bool) -> Self {
        self.holes = holes;
        self
    }

    /// Answers the commands of one batch of input in a random order, with the
    /// chunks of their replies interleaved (chunks of one read shuffled too).
    pub fn reorder(mut self, reorder: bool) -> Self {
        self.reorder = reorder;
        self
    }

    /// Offers `NBD_FLAG_NO_ZEROES` in a newstyle greeting (default on).
    pub fn no_zeroes(mut self, no_zeroes: bool) -> Self {
        self.no_zeroes = no_zeroes;
        self
    }

    /// Makes `range` a bad region: a command touching it fails with the NBD
    /// error `errno` (such as `EIO`) and changes nothing. A structured read
    /// gets the data before the first bad byte, then an `ERROR_OFFSET` chunk
    /// naming that byte; a simple read gets the error alone.
    pub fn fail(mut self, range: Range<u64>, errno: u32) -> Self {
        self.bad.push((range, errno));
        self
    }

    /// Every chaos option at once: split reads, holes, reordering.
    pub fn chaotic(self) -> Self {
        self.split_reads(true).holes(true).reorder(true)
    }

    /// The server, its greeting already queued.
    pub fn build(self) -> FakeServer {
        let image = self
            .image
            .clone()
            .unwrap_or_else(|| Image::new(self.size).shared());
        FakeServer::start(self, image, Arc::new(AtomicU64::new(0)))
    }
}

/// Where the server is in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    ClientFlags,
    OptionHeader,
    OptionData(OptionRequest),
    SkipOption { option: u32, left: u64 },
    RequestHeader,
    Payload(RequestHeader),
    SkipPayload { header: RequestHeader, left: u64 },
    Closed,
}

/// A sans-IO NBD server over an image, answering by itself.
///
/// ```
/// use nbd_testkit::FakeServer;
/// let mut server = FakeServer::builder().size(4096).build();
/// let greeting = server.take_output();
/// assert_eq!(&greeting[..8], b"NBDMAGIC");
/// server.handle_input(b"garbage that is no client flags");
/// assert!(server.is_closed());
/// assert!(server.close_reason().is_some());
/// ```
#[derive(Debug)]
pub struct FakeServer {
    settings: Builder,
    image: SharedImage,
    /// How many connections were made from the first one (shared by all).
    connections: Arc<AtomicU64>,
    rng: Rng,
    rx: Rx,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Replies of this batch, as frames, when reordering.
    pending: Vec<VecDeque<Vec<u8>>>,
    /// The client asked for no zero padding.
    client_no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name of the last `SET_META_CONTEXT`, and what it selected.
    meta_export: Option<String>,
    contexts: Vec<(u32, String)>,
    close_reason: Option<String>,
    clean_close: bool,
    options_seen: Vec<u32>,
    commands_seen: HashMap<u16, u64>,
    export: Option<ExportSpec>,
}

impl FakeServer {
    /// The builder, with the defaults: fixed newstyle, a 1 MiB empty image,
    /// writable, structured replies and extended headers offered.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A server with every default.
    pub fn new() -> Self {
        Builder::default().build()
    }

    fn start(settings: Builder, image: SharedImage, connections: Arc<AtomicU64>) -> Self {
        // Each connection makes its own random choices.
        let serial = connections.fetch_add(1, Ordering::Relaxed);
        let rng = Rng::new(settings.seed ^ serial.wrapping_mul(0xa076_1d64_78bd_642f));
        let mut server = FakeServer {
            settings,
            image,
            connections,
            rng,
            rx: Rx::ClientFlags,
            input: Vec::new(),
            output: Vec::new(),
            pending: Vec::new(),
            client_no_zeroes: false,
            structured: false,
            extended: false,
            meta_export: None,
            contexts: Vec::new(),
            close_reason: None,
            clean_close: false,
            options_seen: Vec::new(),
            commands_seen: HashMap::new(),
            export: None,
        };
        server.greet();
        server
    }

    /// Another connection to the same image with the same settings (its
    /// random choices differ): what a second client of a multi-conn export sees.
    pub fn new_connection(&self) -> FakeServer {
        FakeServer::start(
            self.settings.clone(),
            self.image.clone(),
            self.connections.clone(),
        )
    }

    /// The image (shared with every connection made from this one).
    pub fn image(&self) -> SharedImage {
        self.image.clone()
    }

    /// A copy of the whole image (for small test images).
    pub fn image_bytes(&self) -> Vec<u8> {
        lock(&self.image).to_vec()
    }

    /// Whether the conversation is over (nothing more is read; the output
    /// may still hold the last replies).
    pub fn is_closed(&self) -> bool {
        self.rx == Rx::Closed
    }

    /// Why the conversation ended, once it has: the client's protocol
    /// violation, a hang-up, or a clean `NBD_CMD_DISC` / `NBD_OPT_ABORT`.
    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    /// Whether it ended the way a well-behaved client ends it (`NBD_CMD_DISC`
    /// or `NBD_OPT_ABORT`), rather than by a violation or a hang-up.
    pub fn closed_cleanly(&self) -> bool {
        self.clean_close
    }

    /// Whether the transmission phase was reached.
    pub fn in_transmission(&self) -> bool {
        self.export.is_some()
    }

    /// Whether structured replies are in use.
    pub fn structured_negotiated(&self) -> bool {
        self.structured
    }

    /// Whether extended headers are in use.
    pub fn extended_negotiated(&self) -> bool {
        self.extended
    }

    /// The export chosen for transmission.
    pub fn export(&self) -> Option<&ExportSpec> {
        self.export.as_ref()
    }

    /// The meta contexts selected, with their ids.
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    /// Every option received, in order (`OPT_*`).
    pub fn options_seen(&self) -> &[u32] {
        &self.options_seen
    }

    /// How many commands of type `command` (`CMD_*`) were received.
    pub fn commands_seen(&self, command: u16) -> u64 {
        self.commands_seen.get(&command).copied().unwrap_or(0)
    }

    /// Takes every byte the server wants to send.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Whether bytes wait in the output.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Feeds client bytes. Without [`Builder::reorder`], any split of the
    /// client's stream gives the same replies byte for byte; with it, the
    /// commands held back together (and so the reply order and the random
    /// choices after them) follow how the input was split. Bytes after the
    /// end of the conversation are ignored.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.input.extend_from_slice(bytes);
        let mut pos = 0;
        while self.step(&mut pos) {}
        self.input.drain(..pos);
        if self.is_closed() {
            self.input = Vec::new();
        }
        self.flush_pending();
    }

    /// The client closed its end.
    pub fn handle_eof(&mut self) {
        if !self.is_closed() {
            self.flush_pending();
            self.close("the client hung up", false);
        }
    }

    // ------------------------------------------------------------ framing

    /// Handles one message if its bytes are all there; false when it needs more.
    fn step(&mut self, pos: &mut usize) -> bool {
        let avail = self.input.len() - *pos;
        let need = match self.rx {
            Rx::Closed => return false,
            Rx::ClientFlags => 4,
            Rx::OptionHeader => OptionRequest::LEN,
            Rx::OptionData(h) => h.length as usize,
            Rx::RequestHeader if self.extended => EXTENDED_REQUEST_LEN,
            Rx::RequestHeader => REQUEST_LEN,
            Rx::Payload(h) => h.length as usize,
            Rx::SkipOption { left, .. } | Rx::SkipPayload { left, .. } => {
                let n = (avail as u64).min(left) as usize;
                *pos += n;
                self.skipped(left - n as u64);
                return n > 0 || left == n as u64;
            }
        };
        if avail < need {
            return false;
        }
        let msg = self.input[*pos..*pos + need].to_vec();
        *pos += need;
        match self.rx {
            Rx::ClientFlags => self.client_flags(&msg),
            Rx::OptionHeader => self.option_header(&msg),
            Rx::OptionData(h) => {
                self.rx = Rx::OptionHeader;
                self.option(h.option, &msg);
            }
            Rx::RequestHeader => self.request_header(&msg),
            Rx::Payload(h) => {
                self.rx = Rx::RequestHeader;
                self.command(h, &msg);
            }
            Rx::Closed | Rx::SkipOption { .. } | Rx::SkipPayload { .. } => {}
        }
        true
    }

    /// After discarding: `left` bytes still to skip.
    fn skipped(&mut self, left: u64) {
        match self.rx {
            Rx::SkipOption { option, .. } if left == 0 => {
                self.rx = Rx::OptionHeader;
                self.opt_error(option, REP_ERR_TOO_BIG, "option data too long");
            }
            Rx::SkipOption { option, .. } => self.rx = Rx::SkipOption { option, left },
            Rx::SkipPayload { header, .. } if left == 0 => {
                self.rx = Rx::RequestHeader;
                self.reply_error(
                    &header,
                    EINVAL,
                    "payload larger than the maximum block size",
                );
            }
            Rx::SkipPayload { header, .. } => self.rx = Rx::SkipPayload { header, left },
            _ => {}
        }
    }

    fn close(&mut self, why: &str, clean: bool) {
        self.rx = Rx::Closed;
        if self.close_reason.is_none() {
            self.close_reason = Some(why.to_string());
            self.clean_close = clean;
        }
    }

    // ------------------------------------------------------------ handshake

    fn greet(&mut self) {
        match self.settings.style {
            Style::Oldstyle => {
                GreetingStart::Oldstyle.encode(&mut self.output);
                let size = lock(&self.image).size();
                let flags = u32::from(self.transmission_flags());
                OldstyleRest { size, flags }.encode(&mut self.output);
                self.export = self.settings.exports.first().cloned();
                self.rx = Rx::RequestHeader;
            }
            Style::Newstyle | Style::FixedNewstyle => {
                GreetingStart::Newstyle.encode(&mut self.output);
                let mut flags = 0u16;
                if self.settings.style == Style::FixedNewstyle {
                    flags |= FLAG_FIXED_NEWSTYLE;
                }
                if self.settings.no_zeroes {
                    flags |= FLAG_NO_ZEROES;
                }
                self.output.extend_from_slice(&flags.to_be_bytes());
            }
        }
    }

    fn client_flags(&mut self, msg: &[u8]) {
        let flags = u32::from_be_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let mut known = 0;
        if self.settings.style == Style::FixedNewstyle {
            known |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.settings.no_zeroes {
            known |= FLAG_C_NO_ZEROES;
        }
        if flags & !known != 0 {
            self.close(&format!("client flags {flags:#x} not offered"), false);
            return;
        }
        self.client_no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.rx = Rx::OptionHeader;
    }

    fn option_header(&mut self, msg: &[u8]) {
        let header = match OptionRequest::decode(msg) {
            Ok(h) => h,
            Err(e) => return self.close(&format!("bad option request: {e}"), false),
        };
        self.options_seen.push(header.option);
        let fixed = self.settings.style == Style::FixedNewstyle;
        if header.option == OPT_EXPORT_NAME && u64::from(header.length) > MAX_STRING_LEN as u64 {
            // No error reply exists for EXPORT_NAME.
            return self.close("export name too long", false);
        }
        if header.option != OPT_EXPORT_NAME && !fixed {
            // A server without fixed newstyle knows nothing else.
            return self.close(
                &format!(
                    "{} on a server that is not fixed newstyle",
                    option_name(header.option)
                ),
                false,
            );
        }
        if u64::from(header.length) > MAX_OPTION_DATA {
            self.rx = Rx::SkipOption {
                option: header.option,
                left: header.length.into(),
            };
        } else {
            self.rx = Rx::OptionData(header);
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        match option {
            OPT_EXPORT_NAME => self.opt_export_name(data),
            OPT_ABORT => {
                self.opt_reply(option, REP_ACK, &[]);
                self.close("the client aborted the negotiation", true);
            }
            OPT_LIST => self.opt_list(data),
            OPT_INFO | OPT_GO => self.opt_info(option, data),
            OPT_STRUCTURED_REPLY => self.opt_structured(data),
            OPT_EXTENDED_HEADERS => self.opt_extended(data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.opt_meta(option, data),
            other => self.opt_error(
                other,
                REP_ERR_UNSUP,
                &format!("{} is not supported", option_name(other)),
            ),
        }
    }

    fn find_export(&self, name: &str) -> Option<ExportSpec> {
        self.settings
            .exports
            .iter()
            .find(|e| e.name == name)
            .cloned()
    }

    fn opt_export_name(&mut self, data: &[u8]) {
        let name = String::from_utf8_lossy(data);
        let Some(export) = self.find_export(&name) else {
            return self.close(&format!("unknown export {name:?}"), false);
        };
        if self.meta_export.as_deref() != Some(&export.name) {
            self.contexts.clear();
        }
        let size = lock(&self.image).size();
        let flags = self.transmission_flags();
        ExportNameReply { size, flags }.encode(!self.client_no_zeroes, &mut self.output);
        self.enter_transmission(export);
    }

    fn enter_transmission(&mut self, export: ExportSpec) {
        self.export = Some(export);
        self.rx = Rx::RequestHeader;
    }

    fn opt_list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            return self.opt_error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        }
        for export in self.settings.exports.clone() {
            let mut entry = Vec::new();
            ServerEntry {
                name: export.name,
                description: export.description,
            }
            .encode(&mut entry);
            self.opt_reply(OPT_LIST, REP_SERVER, &entry);
        }
        self.opt_reply(OPT_LIST, REP_ACK, &[]);
    }

    fn opt_info(&mut self, option: u32, data: &[u8]) {
        let request = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return self.opt_error(option, REP_ERR_INVALID, &e.to_string()),
        };
        let Some(export) = self.find_export(&request.name) else {
            return self.opt_error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {:?}", request.name),
            );
        };
        let size = lock(&self.image).size();
        let flags = self.transmission_flags();
        self.info(option, &Info::Export { size, flags });
        for wanted in &request.requests {
            match *wanted {
                INFO_NAME => self.info(option, &Info::Name(export.name.clone())),
                INFO_DESCRIPTION => {
                    self.info(option, &Info::Description(export.description.clone()))
                }
                INFO_BLOCK_SIZE => {
                    if let Some((minimum, preferred, maximum)) = self.settings.block_sizes {
                        self.info(
                            option,
                            &Info::BlockSize {
                                minimum,
                                preferred,
                                maximum,
                            },
                        );
                    }
                }
                // INFO_EXPORT is always sent; unknown requests are ignored.
                _ => {}
            }
        }
        self.opt_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            if self.meta_export.as_deref() != Some(&export.name) {
                self.contexts.clear();
            }
            self.enter_transmission(export);
        }
    }

    fn info(&mut self, option: u32, info: &Info) {
        let mut data = Vec::new();
        info.encode(&mut data);
        self.opt_reply(option, REP_INFO, &data);
    }

    fn opt_structured(&mut self, data: &[u8]) {
        if !data.is_empty() {
            return self.opt_error(
                OPT_STRUCTURED_REPLY,
                REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            );
        }
        if !self.settings.structured {
            return self.opt_error(
                OPT_STRUCTURED_REPLY,
                REP_ERR_UNSUP,
                "structured replies are off",
            );
        }
        self.structured = true;
        self.opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    }

    fn opt_extended(&mut self, data: &[u8]) {
        if !data.is_empty() {
            return self.opt_error(
                OPT_EXTENDED_HEADERS,
                REP_ERR_INVALID,
                "NBD_OPT_EXTENDED_HEADERS takes no data",
            );
        }
        if !self.settings.extended {
            return self.opt_error(
                OPT_EXTENDED_HEADERS,
                REP_ERR_UNSUP,
                "extended headers are off",
            );
        }
        self.extended = true;
        self.structured = true;
        self.opt_reply(OPT_EXTENDED_HEADERS, REP_ACK, &[]);
    }

    fn opt_meta(&mut self, option: u32, data: &[u8]) {
        let request = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return self.opt_error(option, REP_ERR_INVALID, &e.to_string()),
        };
        if self.find_export(&request.name).is_none() {
            return self.opt_error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {:?}", request.name),
            );
        }
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self.opt_error(
                option,
                REP_ERR_INVALID,
                "meta contexts need structured replies first",
            );
        }
        let matches = |q: &str| q == BASE_ALLOCATION || q == "base:";
        let listed = if request.queries.is_empty() {
            // An empty list lists everything, and selects nothing.
            !set
        } else {
            request.queries.iter().any(|q| matches(q))
        };
        if set {
            self.contexts.clear();
            self.meta_export = Some(request.name.clone());
        }
        if listed {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut reply = Vec::new();
            MetaContextReply {
                id,
                name: BASE_ALLOCATION.into(),
            }
            .encode(&mut reply);
            self.opt_reply(option, REP_META_CONTEXT, &reply);
            if set {
                self.contexts
                    .push((BASE_ALLOCATION_ID, BASE_ALLOCATION.into()));
            }
        }
        self.opt_reply(option, REP_ACK, &[]);
    }

    fn opt_reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        OptionReplyHeader::encode_with(option, reply_type, data, &mut self.output);
    }

    fn opt_error(&mut self, option: u32, reply_type: u32, message: &str) {
        self.opt_reply(option, reply_type, message.as_bytes());
    }

    /// The transmission flags of the export, as far as negotiated so far.
    fn transmission_flags(&self) -> u16 {
        let s = &self.settings;
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_CACHE;
        if s.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if s.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        if self.structured {
            flags |= FLAG_SEND_DF;
        }
        if self.extended {
            flags |= FLAG_BLOCK_STATUS_PAYLOAD;
        }
        flags
    }

    // ------------------------------------------------------------ transmission

    fn request_header(&mut self, msg: &[u8]) {
        let header = match RequestHeader::decode(msg) {
            Ok(h) => h,
            Err(e) => return self.close(&format!("bad request: {e}"), false),
        };
        let magic = u32::from_be_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let want = if self.extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return self.close(
                &format!("request magic {magic:#x}, expected {want:#x}"),
                false,
            );
        }
        *self.commands_seen.entry(header.command).or_default() += 1;
        let payload = if header.command == CMD_WRITE
            || (self.extended && header.flags & CMD_FLAG_PAYLOAD_LEN != 0)
        {
            header.length
        } else {
            0
        };
        if payload > MAX_PAYLOAD {
            return self.close(
                &format!(
                    "{} with a payload of {payload} bytes",
                    command_name(header.command)
                ),
                false,
            );
        }
        let limit = self.max_payload();
        if payload > limit {
            self.rx = Rx::SkipPayload {
                header,
                left: payload,
            };
        } else if payload > 0 {
            self.rx = Rx::Payload(header);
        } else {
            self.command(header, &[]);
        }
    }

    fn max_payload(&self) -> u64 {
        match self.settings.block_sizes {
            Some((_, _, max)) => u64::from(max).min(MAX_PAYLOAD),
            None => MAX_PAYLOAD,
        }
    }

    fn command(&mut self, h: RequestHeader, payload: &[u8]) {
        if h.command == CMD_DISC {
            self.flush_pending();
            return self.close("the client disconnected", true);
        }
        if let Err((errno, why)) = self.check(&h) {
            return self.reply_error(&h, errno, &why);
        }
        if let Some((at, errno)) = self.first_bad(&h) {
            return if h.command == CMD_READ && self.structured {
                self.read_until_bad(&h, at, errno)
            } else {
                self.reply_error(&h, errno, &format!("bad region at {at}"))
            };
        }
        match h.command {
            CMD_READ => self.read(&h),
            CMD_WRITE => {
                lock(&self.image).write(h.offset, payload);
                self.reply_ok(&h);
            }
            CMD_FLUSH | CMD_CACHE => self.reply_ok(&h),
            CMD_TRIM => {
                lock(&self.image).zero(h.offset, h.length, true);
                self.reply_ok(&h);
            }
            CMD_WRITE_ZEROES => {
                let punch = h.flags & CMD_FLAG_NO_HOLE == 0;
                lock(&self.image).zero(h.offset, h.length, punch);
                self.reply_ok(&h);
            }
            CMD_BLOCK_STATUS => self.block_status(&h, payload),
            _ => self.reply_error(&h, EINVAL, "unknown command"),
        }
    }

    /// The checks a careful server makes before touching the image.
    fn check(&self, h: &RequestHeader) -> Result<(), (u32, String)> {
        let name = command_name(h.command);
        let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.settings.read_only {
            return Err((EPERM, format!("{name} on a read-only export")));
        }
        if h.command == CMD_FLUSH {
            return Ok(());
        }
        let length = if h.command == CMD_WRITE || h.flags & CMD_FLAG_PAYLOAD_LEN == 0 {
            h.length
        } else {
            0
        };
        let size = lock(&self.image).size();
        if h.command == CMD_BLOCK_STATUS {
            if h.offset >= size {
                return Err((EINVAL, format!("{name} at {} beyond the end", h.offset)));
            }
        } else if h.offset.checked_add(length).is_none_or(|end| end > size) {
            let errno = if h.command == CMD_WRITE {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((
                errno,
                format!("{name} of {length} bytes at {} beyond the end", h.offset),
            ));
        }
        if let Some((min, _, max)) = self.settings.block_sizes {
            let min = u64::from(min);
            let aligned = h.offset % min == 0 && length % min == 0;
            if !aligned && h.command != CMD_BLOCK_STATUS {
                return Err((EINVAL, format!("{name} not aligned to {min}")));
            }
            if h.command == CMD_READ && length > u64::from(max) {
                return Err((EINVAL, format!("{name} larger than {max}")));
            }
        }
        if h.command == CMD_READ && length > MAX_PAYLOAD {
            return Err((EINVAL, format!("{name} of {length} bytes is too large")));
        }
        Ok(())
    }

    fn read(&mut self, h: &RequestHeader) {
        let data = lock(&self.image).read(h.offset, h.length as usize);
        if !self.structured {
            let mut frame = Vec::with_capacity(SIMPLE_REPLY_LEN + data.len());
            SimpleReply {
                error: 0,
                cookie: h.cookie,
            }
            .encode(&mut frame);
            frame.extend_from_slice(&data);
            return self.queue(vec![frame]);
        }
        let pieces = self.read_pieces(h);
        let mut frames = Vec::new();
        for (start, len, hole) in pieces {
            let offset = h.offset + start;
            let mut payload = Vec::new();
            if hole {
                HoleChunk {
                    offset,
                    length: len as u32,
                }
                .encode(&mut payload);
                frames.push(self.chunk(h, 0, REPLY_TYPE_OFFSET_HOLE, &payload));
            } else {
                payload.extend_from_slice(&offset.to_be_bytes());
                payload.extend_from_slice(&data[start as usize..(start + len) as usize]);
                frames.push(self.chunk(h, 0, REPLY_TYPE_OFFSET_DATA, &payload));
            }
        }
        if self.settings.reorder {
            self.rng.shuffle(&mut frames);
        }
        // The last chunk says DONE, or an empty chunk follows to say it.
        if frames.is_empty() || self.rng.chance(0.5) {
            frames.push(self.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]));
        } else if let Some(last) = frames.last_mut() {
            set_done(last);
        }
        self.queue(frames);
    }

    /// The first bad byte a data command touches, and its error.
    fn first_bad(&self, h: &RequestHeader) -> Option<(u64, u32)> {
        if !matches!(
            h.command,
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES
        ) {
            return None;
        }
        let end = h.offset.saturating_add(h.length);
        self.settings
            .bad
            .iter()
            .filter(|(r, _)| r.start < end && h.offset < r.end)
            .map(|(r, errno)| (r.start.max(h.offset), *errno))
            .min_by_key(|(at, _)| *at)
    }

    /// A structured read that fails at `at`: the good data first, then the error.
    fn read_until_bad(&mut self, h: &RequestHeader, at: u64, errno: u32) {
        let mut frames = Vec::new();
        if at > h.offset {
            let data = lock(&self.image).read(h.offset, (at - h.offset) as usize);
            let mut payload = h.offset.to_be_bytes().to_vec();
            payload.extend_from_slice(&data);
            frames.push(self.chunk(h, 0, REPLY_TYPE_OFFSET_DATA, &payload));
        }
        let mut body = Vec::new();
        ErrorChunk {
            error: errno,
            message: format!("bad region at {at}"),
            offset: Some(at),
        }
        .encode(&mut body);
        frames.push(self.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, &body));
        self.queue(frames);
    }

    /// The read's pieces as `(start within the request, length, is a hole)`.
    fn read_pieces(&mut self, h: &RequestHeader) -> Vec<(u64, u64, bool)> {
        if h.length == 0 {
            return Vec::new();
        }
        if h.flags & CMD_FLAG_DF != 0 {
            return vec![(0, h.length, false)];
        }
        let runs = if self.settings.holes {
            lock(&self.image).allocation_runs(h.offset, h.length, usize::MAX)
        } else {
            vec![(h.length, true)]
        };
        let mut pieces = Vec::new();
        let mut at = 0;
        for (len, allocated) in runs {
            let mut left = len;
            while left > 0 {
                let take = if self.settings.split_reads && self.rng.chance(0.5) {
                    self.rng.range(1..left + 1)
                } else {
                    left
                };
                pieces.push((at, take, !allocated));
                at += take;
                left -= take;
            }
        }
        pieces
    }

    fn block_status(&mut self, h: &RequestHeader, payload: &[u8]) {
        if !self.structured || self.contexts.is_empty() {
            return self.reply_error(h, EINVAL, "no meta context was negotiated");
        }
        let (length, ids) = if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            match parse_filter(payload) {
                Some(filter) => filter,
                None => return self.reply_error(h, EINVAL, "malformed block status payload"),
            }
        } else {
            (h.length, vec![])
        };
        if length == 0 {
            return self.reply_error(h, EINVAL, "block status of length 0");
        }
        let mut wanted: Vec<u32> = Vec::new();
        for (id, _) in &self.contexts {
            if ids.is_empty() || ids.contains(id) {
                wanted.push(*id);
            }
        }
        if ids
            .iter()
            .any(|id| !self.contexts.iter().any(|(c, _)| c == id))
        {
            return self.reply_error(h, EINVAL, "block status filter names an unknown context");
        }
        let max = if h.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let extents = lock(&self.image).extents(h.offset, length, max);
        let ty = if self.extended {
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            REPLY_TYPE_BLOCK_STATUS
        };
        let mut frames = Vec::new();
        for (i, id) in wanted.iter().enumerate() {
            let mut body = Vec::new();
            BlockStatusChunk {
                context_id: *id,
                extents: extents.clone(),
            }
            .encode(self.extended, &mut body);
            let flags = if i + 1 == wanted.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            frames.push(self.chunk(h, flags, ty, &body));
        }
        self.queue(frames);
    }

    // ------------------------------------------------------------ replies

    /// One chunk in the negotiated form (structured or extended).
    fn chunk(&self, h: &RequestHeader, flags: u16, chunk_type: u16, payload: &[u8]) -> Vec<u8> {
        let header = ChunkHeader {
            flags,
            chunk_type,
            cookie: h.cookie,
            offset: h.offset,
            length: payload.len() as u64,
        };
        let mut frame = Vec::with_capacity(EXTENDED_REPLY_LEN + payload.len());
        if self.extended {
            header.encode_extended(&mut frame);
        } else {
            header.encode_structured(&mut frame);
        }
        frame.extend_from_slice(payload);
        frame
    }

    fn reply_ok(&mut self, h: &RequestHeader) {
        // With structured replies (not extended) both forms are legal for
        // commands other than reads: use both.
        let frame = if self.extended || (self.structured && self.rng.chance(0.5)) {
            self.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
        } else {
            let mut frame = Vec::new();
            SimpleReply {
                error: 0,
                cookie: h.cookie,
            }
            .encode(&mut frame);
            frame
        };
        self.queue(vec![frame]);
    }

    fn reply_error(&mut self, h: &RequestHeader, errno: u32, message: &str) {
        let frame = if self.structured {
            let mut body = Vec::new();
            ErrorChunk {
                error: errno,
                message: message.into(),
                offset: None,
            }
            .encode(&mut body);
            self.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &body)
        } else {
            let mut frame = Vec::new();
            SimpleReply {
                error: errno,
                cookie: h.cookie,
            }
            .encode(&mut frame);
            frame
        };
        self.queue(vec![frame]);
    }

    /// Sends a reply's frames now, or holds them for reordering.
    fn queue(&mut self, frames: Vec<Vec<u8>>) {
        if self.settings.reorder {
            self.pending.push(frames.into());
        } else {
            for f in frames {
                self.output.extend_from_slice(&f);
            }
        }
    }

    /// Sends the held replies, interleaving their chunks in a random order.
    fn flush_pending(&mut self) {
        while !self.pending.is_empty() {
            let i = self.rng.below(self.pending.len() as u64) as usize;
            match self.pending[i].pop_front() {
                Some(frame) => self.output.extend_from_slice(&frame),
                None => {
                    self.pending.swap_remove(i);
                }
            }
        }
    }
}

impl Default for FakeServer {
    fn default() -> Self {
        FakeServer::new()
    }
}

/// Sets the DONE flag of an encoded chunk (structured or extended: the flags
/// follow the 4-byte magic in both).
fn set_done(frame: &mut [u8]) {
    if let Some(flags) = frame.get_mut(4..6) {
        let value = u16::from_be_bytes([flags[0], flags[1]]) | REPLY_FLAG_DONE;
        flags.copy_from_slice(&value.to_be_bytes());
    }
}

/// A block status payload: effect length, then context ids.
fn parse_filter(payload: &[u8]) -> Option<(u64, Vec<u32>)> {
    if payload.len() < 12 || (payload.len() - 8) % 4 != 0 {
        return None;
    }
    let length = u64::from_be_bytes(payload[..8].try_into().ok()?);
    let ids = payload[8..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((length, ids))
}
