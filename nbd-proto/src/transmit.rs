//! The transmission phase: issuing commands, checking and applying replies.
//!
//! Every reply is checked against its request before a byte lands in the
//! caller's buffer. A violation that loses framing kills the connection; one
//! confined to a reply fails that command and the others go on.
//!
//! # The length rule
//!
//! A chunk header's length field is the only thing that says where the next
//! reply starts, so it is judged before any byte of its payload is read,
//! buffered or skipped, in one place (`payload_limit`). The limit is the
//! largest payload that a chunk of that type could carry in a legal reply to
//! the command it names:
//!
//! | chunk type                            | limit                                     |
//! |---------------------------------------|-------------------------------------------|
//! | `NONE`                                | 0                                         |
//! | `OFFSET_DATA`, to a read              | 8 + the read's length                     |
//! | `OFFSET_HOLE`, to a read              | 12                                        |
//! | `BLOCK_STATUS(_EXT)`, to block status | header + one descriptor per byte asked about, plus one; at most `MAX_STATUS_PAYLOAD` |
//! | any error type, to any command        | `MAX_ERROR_PAYLOAD` (all a 16-bit message length allows) |
//! | any other (unknown, or not legal for the command) | the largest limit of the types legal for the command |
//!
//! (A block status descriptor covers at least one byte, and only the last may
//! reach past the request or start at its end, so a request of `n` bytes has at
//! most `n + 1` of them.)
//!
//! A length above the limit means no legal reply to that request could have
//! sent it: the server's framing cannot be trusted, and skipping the payload
//! could mean waiting forever for bytes that never come. The connection is
//! killed at once, right after the header: the error is sticky, every pending
//! command fails exactly once, and `Event::Closed` carries the error.
//!
//! A length within the limit keeps framing: the payload is consumed, and
//! whatever else is wrong with the chunk (too short, wrong type for the
//! command, outside the request, malformed) fails only its command. Skipping
//! such a payload costs no more than a legal reply to that request would.

use bytes::{Bytes, BytesMut};

use crate::connection::{
    AfterDiscard, Connection, ReadData, Rx, State, LARGE_PAYLOAD, READ_AHEAD_LARGE,
};
use crate::coverage::Coverage;
use crate::error::{Errno, Error, Result, ServerText};
use crate::event::{BlockStatus, Completion, Event, ReadChunk};
use crate::flags::{CmdFlags, Strict, TransmissionFlags};
use crate::slab::Cookie;
use crate::stage::MAX_BUFFERED_PAYLOAD;
use crate::wire::consts::*;
use crate::wire::{
    BlockStatusChunk, ChunkHeader, ErrorChunk, HoleChunk, RequestHeader, SimpleReply,
};

/// Largest read or write payload, whatever the strict mode (as libnbd).
pub const MAX_REQUEST_SIZE: u64 = 64 * 1024 * 1024;

/// A command in flight.
#[derive(Debug)]
pub(crate) struct Command {
    pub(crate) command: u16,
    pub(crate) offset: u64,
    pub(crate) length: u64,
    /// The caller's read buffer.
    pub(crate) buf: Option<BytesMut>,
    /// Report each chunk as an event.
    pub(crate) chunk_events: bool,
    /// The first error seen; the command fails with it when done.
    pub(crate) error: Option<Error>,
    /// What a structured read reply has covered.
    pub(crate) coverage: Option<Coverage>,
    /// Block status: the contexts asked about (all negotiated ones, or a filter).
    pub(crate) contexts: Vec<u32>,
    /// Block status: the contexts already reported.
    pub(crate) contexts_seen: Vec<u32>,
    /// Block status: `REQ_ONE` was set.
    pub(crate) req_one: bool,
}

impl Command {
    fn fail(&mut self, error: Error) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }
}

impl Connection {
    // ------------------------------------------------------------ issuing

    /// Reads `buf.len()` bytes at `offset` into `buf` (libnbd's `aio_pread`).
    ///
    /// The buffer comes back in the [`Completion`]. Server bytes land straight in
    /// it; holes are zero-filled. Allowed flag: `DF`.
    pub fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.submit_read(buf, offset, flags, false)
    }

    /// Like [`pread`](Self::pread), and also reports each reply chunk as an
    /// [`Event::ReadChunk`] before the completion (libnbd's `pread_structured`).
    pub fn pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        self.submit_read(buf, offset, flags, true)
    }

    fn submit_read(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
        chunk_events: bool,
    ) -> Result<Cookie> {
        let length = buf.len() as u64;
        self.check_request(CMD_READ, offset, length, flags)?;
        Ok(self.submit(
            CMD_READ,
            flags,
            offset,
            length,
            Some(buf),
            None,
            chunk_events,
        ))
    }

    /// Writes `data` at `offset` (libnbd's `aio_pwrite`). The payload goes out as
    /// a slice of `data`, never copied. Allowed flag: `FUA`.
    pub fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let length = data.len() as u64;
        self.check_request(CMD_WRITE, offset, length, flags)?;
        Ok(self.submit(CMD_WRITE, flags, offset, length, None, Some(data), false))
    }

    /// Flushes written data to stable storage (libnbd's `aio_flush`).
    pub fn flush(&mut self, flags: CmdFlags) -> Result<Cookie> {
        self.check_request(CMD_FLUSH, 0, 0, flags)?;
        Ok(self.submit(CMD_FLUSH, flags, 0, 0, None, None, false))
    }

    /// Discards `count` bytes at `offset` (libnbd's `aio_trim`). Allowed flag: `FUA`.
    pub fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.check_request(CMD_TRIM, offset, count, flags)?;
        Ok(self.submit(CMD_TRIM, flags, offset, count, None, None, false))
    }

    /// Asks the server to prefetch `count` bytes at `offset` (libnbd's `aio_cache`).
    pub fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.check_request(CMD_CACHE, offset, count, flags)?;
        Ok(self.submit(CMD_CACHE, flags, offset, count, None, None, false))
    }

    /// Writes `count` zero bytes at `offset` (libnbd's `aio_zero`).
    /// Allowed flags: `FUA`, `NO_HOLE`, `FAST_ZERO`.
    pub fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.check_request(CMD_WRITE_ZEROES, offset, count, flags)?;
        Ok(self.submit(CMD_WRITE_ZEROES, flags, offset, count, None, None, false))
    }

    /// Asks the server to end the connection gracefully (`NBD_CMD_DISC`,
    /// libnbd's `aio_disconnect`).
    ///
    /// New commands are refused at once (with [`Error::Shutdown`]). The
    /// commands in flight are not cut short: `NBD_CMD_DISC` is queued only once
    /// every one of them has completed (a server may fail or drop commands that
    /// are still running when it sees the request), so no write is lost to the
    /// shutdown. Once the request is written the connection closes with
    /// [`Event::Closed`] without error. If the server hangs up first, the
    /// connection still closes cleanly and any command left unanswered fails
    /// with `ENOTCONN`, each exactly once. A server's `ESHUTDOWN` starts the
    /// same sequence by itself. Calling it again is harmless.
    pub fn disconnect(&mut self) -> Result<()> {
        self.check_alive()?;
        if !matches!(self.state, State::Ready) {
            return Err(Error::InvalidState(
                "disconnect needs the transmission phase; use opt_abort while negotiating".into(),
            ));
        }
        self.disconnecting = true;
        self.maybe_queue_disconnect();
        Ok(())
    }

    /// Queues `NBD_CMD_DISC` once a disconnect is wanted (asked by the caller,
    /// or after the server's `ESHUTDOWN`) and nothing is in flight.
    fn maybe_queue_disconnect(&mut self) {
        let wanted = self.disconnecting || self.soft_shutdown;
        if !wanted || self.disc_queued || self.commands.len() != 0 {
            return;
        }
        if !matches!(self.state, State::Ready) {
            return;
        }
        self.disc_queued = true;
        let header = RequestHeader {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        self.push_request(&header);
    }

    /// Queues a request header in the negotiated form.
    fn push_request(&mut self, header: &RequestHeader) {
        if self.extended {
            self.output.push_with(|b| header.encode_extended(b));
        } else {
            self.output.push_with(|b| header.encode_compact(b));
        }
    }

    /// Asks for the status of `count` bytes at `offset` in every negotiated meta
    /// context (`NBD_CMD_BLOCK_STATUS`, libnbd's `aio_block_status_64`). Each
    /// context's extents arrive as an [`Event::BlockStatus`] before the
    /// completion. Allowed flag: `REQ_ONE`. With extended headers `count` may
    /// exceed 4 GiB.
    pub fn block_status(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.check_request(CMD_BLOCK_STATUS, offset, count, flags)?;
        Ok(self.submit(CMD_BLOCK_STATUS, flags, offset, count, None, None, false))
    }

    /// Like [`block_status`](Self::block_status), asking only about the named
    /// contexts (libnbd's `aio_block_status_filter`). Needs extended headers and
    /// a server advertising `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
    pub fn block_status_filter(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
        contexts: &[&str],
    ) -> Result<Cookie> {
        self.check_request(CMD_BLOCK_STATUS, offset, count, flags)?;
        if !self.extended || !self.info.has(TransmissionFlags::BLOCK_STATUS_PAYLOAD) {
            return Err(Error::NotSupported(
                "a block status filter needs extended headers and NBD_FLAG_BLOCK_STATUS_PAYLOAD"
                    .into(),
            ));
        }
        if contexts.is_empty() {
            return Err(Error::InvalidArgument(
                "a block status filter names no context".into(),
            ));
        }
        let mut ids = Vec::with_capacity(contexts.len());
        for name in contexts {
            match self.meta.iter().find(|(_, n)| n == name) {
                Some((id, _)) => ids.push(*id),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "meta context {name:?} was not negotiated"
                    )))
                }
            }
        }
        // The payload: effect length, then the context ids.
        let mut payload = BytesMut::with_capacity(8 + 4 * ids.len());
        payload.extend_from_slice(&count.to_be_bytes());
        for id in &ids {
            payload.extend_from_slice(&id.to_be_bytes());
        }
        let payload = payload.freeze();
        let cookie = self.commands.insert(Command {
            command: CMD_BLOCK_STATUS,
            offset,
            length: count,
            buf: None,
            chunk_events: false,
            error: None,
            coverage: None,
            contexts: ids,
            contexts_seen: Vec::new(),
            req_one: flags.contains(CmdFlags::REQ_ONE),
        });
        let header = RequestHeader {
            flags: (flags | CmdFlags::PAYLOAD_LEN).bits(),
            command: CMD_BLOCK_STATUS,
            cookie: cookie.get(),
            offset,
            length: payload.len() as u64,
        };
        self.push_request(&header);
        self.output.push_payload(payload);
        Ok(cookie)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        command: u16,
        flags: CmdFlags,
        offset: u64,
        length: u64,
        buf: Option<BytesMut>,
        payload: Option<Bytes>,
        chunk_events: bool,
    ) -> Cookie {
        let coverage = (command == CMD_READ).then(|| Coverage::new(offset, length));
        let contexts = if command == CMD_BLOCK_STATUS {
            self.meta.iter().map(|(id, _)| *id).collect()
        } else {
            Vec::new()
        };
        let cookie = self.commands.insert(Command {
            command,
            offset,
            length,
            buf,
            chunk_events,
            error: None,
            coverage,
            contexts,
            contexts_seen: Vec::new(),
            req_one: flags.contains(CmdFlags::REQ_ONE),
        });
        let header = RequestHeader {
            flags: flags.bits(),
            command,
            cookie: cookie.get(),
            offset,
            length,
        };
        self.push_request(&header);
        if let Some(data) = payload {
            self.output.push_payload(data);
        }
        cookie
    }

    /// Every check made before a command is sent; nothing is sent on error.
    fn check_request(&self, command: u16, offset: u64, length: u64, flags: CmdFlags) -> Result<()> {
        self.check_alive()?;
        if self.disconnecting || self.soft_shutdown {
            return Err(Error::Shutdown(
                "the connection is disconnecting; no new commands".into(),
            ));
        }
        if !matches!(self.state, State::Ready) {
            return Err(Error::InvalidState(
                "commands need the transmission phase".into(),
            ));
        }
        let name = command_name(command);
        let has_payload_limit = matches!(command, CMD_READ | CMD_WRITE);
        if has_payload_limit && length > MAX_REQUEST_SIZE {
            return Err(Error::TooLarge(format!(
                "{name} of {length} bytes exceeds {MAX_REQUEST_SIZE}"
            )));
        }
        if !self.extended && length > u64::from(u32::MAX) {
            return Err(Error::TooLarge(format!(
                "{name} of {length} bytes does not fit in 32 bits without extended headers"
            )));
        }
        if offset.checked_add(length).is_none() {
            // No export reaches past 2^64, whatever the strict mode.
            return Err(Error::InvalidArgument(format!(
                "{name} of {length} bytes at {offset} overflows the offset space"
            )));
        }
        let strict = self.config.strict;
        let has = |f: TransmissionFlags| self.info.has(f);

        if strict.contains(Strict::COMMANDS) {
            let writes = matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
            if writes && has(TransmissionFlags::READ_ONLY) {
                return Err(Error::ReadOnly(format!(
                    "{name} refused: the server marked the export read-only"
                )));
            }
            let needed = match command {
                CMD_FLUSH => Some(TransmissionFlags::SEND_FLUSH),
                CMD_TRIM => Some(TransmissionFlags::SEND_TRIM),
                CMD_WRITE_ZEROES => Some(TransmissionFlags::SEND_WRITE_ZEROES),
                CMD_CACHE => Some(TransmissionFlags::SEND_CACHE),
                _ => None,
            };
            if let Some(flag) = needed {
                if !has(flag) {
                    return Err(Error::NotSupported(format!(
                        "the server does not advertise {name}"
                    )));
                }
            }
            if command == CMD_BLOCK_STATUS && self.meta.is_empty() {
                return Err(Error::NotSupported(format!(
                    "block status needs a negotiated meta context: request one before \
                     connecting, such as {:?} (nbd_proto::context::BASE_ALLOCATION), in \
                     Config::meta_contexts or with add_meta_context",
                    crate::context::BASE_ALLOCATION
                )));
            }
        }

        if strict.contains(Strict::FLAGS) {
            let allowed = match command {
                CMD_READ => CmdFlags::DF,
                CMD_WRITE | CMD_TRIM => CmdFlags::FUA,
                CMD_WRITE_ZEROES => CmdFlags::FUA | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
                CMD_BLOCK_STATUS => CmdFlags::REQ_ONE,
                _ => CmdFlags::empty(),
            };
            let bad = flags.difference(allowed);
            if !bad.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "flags {:#x} are not valid for {name}",
                    bad.bits()
                )));
            }
            if flags.contains(CmdFlags::FUA) && !has(TransmissionFlags::SEND_FUA) {
                return Err(Error::NotSupported(
                    "the server does not advertise FUA".into(),
                ));
            }
            if flags.contains(CmdFlags::DF) && !(has(TransmissionFlags::SEND_DF) && self.structured)
            {
                return Err(Error::NotSupported(
                    "DF needs structured replies and the server's SEND_DF".into(),
                ));
            }
            if flags.contains(CmdFlags::FAST_ZERO) && !has(TransmissionFlags::SEND_FAST_ZERO) {
                return Err(Error::NotSupported(
                    "the server does not advertise FAST_ZERO".into(),
                ));
            }
        }

        if command == CMD_FLUSH {
            return Ok(());
        }
        if strict.contains(Strict::ZERO_SIZE) && length == 0 {
            return Err(Error::InvalidArgument(format!("{name} of length 0")));
        }
        if strict.contains(Strict::BOUNDS) {
            let size = self.info.size.unwrap_or(0);
            if offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(Error::InvalidArgument(format!(
                    "{name} of {length} bytes at {offset} is beyond the export size {size}"
                )));
            }
        }
        if let Some(sizes) = self.info.block_sizes {
            let min = u64::from(sizes.minimum);
            if strict.contains(Strict::ALIGN) && (offset % min != 0 || length % min != 0) {
                return Err(Error::InvalidArgument(format!(
                    "{name} of {length} bytes at {offset} is not aligned to the minimum block size {min}"
                )));
            }
            if strict.contains(Strict::PAYLOAD)
                && has_payload_limit
                && length > u64::from(sizes.maximum)
            {
                return Err(Error::TooLarge(format!(
                    "{name} of {length} bytes exceeds the server's maximum payload {}",
                    sizes.maximum
                )));
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ replies

    pub(crate) fn rx_reply_header(&mut self) -> bool {
        if self.stage.len() < 4 {
            return false;
        }
        let data = self.stage.data();
        let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if self.extended {
            // With extended headers every reply is an extended chunk.
            if magic != EXTENDED_REPLY_MAGIC {
                self.kill(Error::Protocol(format!(
                    "reply magic {magic:#x} where extended headers were negotiated: framing lost"
                )));
                return true;
            }
            let Some(bytes) = self.take::<EXTENDED_REPLY_LEN>() else {
                return false;
            };
            // The magic and length are checked, so decoding cannot fail; if it
            // did, framing would be lost.
            match ChunkHeader::decode_extended(&bytes) {
                Ok(header) => self.on_chunk_header(header),
                Err(e) => self.kill(e.into()),
            }
            return true;
        }
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let Some(bytes) = self.take::<SIMPLE_REPLY_LEN>() else {
                    return false;
                };
                match SimpleReply::decode(&bytes) {
                    Ok(reply) => self.on_simple_reply(reply),
                    Err(e) => self.kill(e.into()),
                }
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let Some(bytes) = self.take::<STRUCTURED_REPLY_LEN>() else {
                    return false;
                };
                match ChunkHeader::decode_structured(&bytes) {
                    Ok(header) => self.on_chunk_header(header),
                    Err(e) => self.kill(e.into()),
                }
            }
            STRUCTURED_REPLY_MAGIC => self.kill(Error::Protocol(
                "structured reply chunk, but structured replies were not negotiated".into(),
            )),
            other => self.kill(Error::Protocol(format!(
                "bad reply magic {other:#x}: framing lost"
            ))),
        }
        true
    }

    fn unknown_cookie(&mut self, cookie: u64) {
        // The reply cannot be attributed: a server that confuses cookies cannot be
        // trusted with any command's data, and a simple reply's framing is unknown.
        self.kill(Error::Protocol(format!(
            "reply for unknown or finished cookie {cookie:#x}"
        )));
    }

    fn on_simple_reply(&mut self, reply: SimpleReply) {
        let cookie = Cookie::from_raw(reply.cookie);
        let structured = self.structured;
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return self.unknown_cookie(reply.cookie);
        };
        let is_read = cmd.command == CMD_READ;
        if is_read && structured {
            cmd.fail(Error::Protocol(
                "simple reply to a read after structured replies were negotiated".into(),
            ));
        }
        if reply.error != 0 {
            cmd.fail(Error::Server {
                errno: Errno::from_nbd(reply.error),
                message: None,
            });
            return self.finish_command(cookie);
        }
        if is_read {
            let end = cmd.length as usize;
            if let Some(c) = cmd.coverage.as_mut() {
                let _ = c.add(cmd.offset, cmd.length);
            }
            let rd = ReadData {
                cookie,
                start: 0,
                pos: 0,
                end,
                structured_done: None,
            };
            self.rx = Rx::ReadData(rd);
            if end == 0 {
                self.read_data_done(rd);
            }
            return;
        }
        self.finish_command(cookie)
    }

    fn on_chunk_header(&mut self, header: ChunkHeader) {
        let cookie = Cookie::from_raw(header.cookie);
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return self.unknown_cookie(header.cookie);
        };
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let is_read = cmd.command == CMD_READ;
        let command = cmd.command;
        let request_offset = cmd.offset;
        let limit = payload_limit(cmd, header.chunk_type);
        if header.length > limit {
            let name = command_name(command);
            let chunk = chunk_type_name(header.chunk_type);
            return self.kill(Error::Protocol(format!(
                "{chunk} chunk of {} bytes in a reply to {name} that allows at most {limit}: \
                 framing cannot be trusted",
                header.length
            )));
        }
        let skip = |conn: &mut Connection, error: Error| {
            if let Some(cmd) = conn.commands.get_mut(cookie) {
                cmd.fail(error);
            }
            conn.skip_payload(header.length, cookie, done);
        };
        if self.extended && header.offset != request_offset {
            return skip(
                self,
                Error::Protocol(format!(
                    "reply offset {} differs from the request offset {request_offset}",
                    header.offset
                )),
            );
        }
        match header.chunk_type {
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                let ext = header.chunk_type == REPLY_TYPE_BLOCK_STATUS_EXT;
                if command != CMD_BLOCK_STATUS {
                    let name = command_name(command);
                    return skip(
                        self,
                        Error::Protocol(format!("block status chunk in a reply to {name}")),
                    );
                }
                if ext != self.extended {
                    let why = if ext {
                        "64-bit block status without extended headers"
                    } else {
                        "32-bit block status where extended headers were negotiated"
                    };
                    return skip(self, Error::Protocol(why.into()));
                }
                self.status_buf.clear();
                self.rx = Rx::StatusPayload(header);
            }
            REPLY_TYPE_NONE => {
                // The length rule left only an empty payload.
                if !done {
                    // NONE is only valid as the last chunk: end the command here.
                    cmd.fail(Error::Protocol("NONE chunk without the DONE flag".into()));
                    return self.finish_command(cookie);
                }
                self.finish_command(cookie)
            }
            REPLY_TYPE_OFFSET_DATA => {
                if !is_read {
                    let name = command_name(cmd.command);
                    return skip(
                        self,
                        Error::Protocol(format!("OFFSET_DATA chunk in a reply to {name}")),
                    );
                }
                if header.length <= 8 {
                    return skip(
                        self,
                        Error::Protocol(format!("OFFSET_DATA chunk of length {}", header.length)),
                    );
                }
                self.rx = Rx::DataOffset(header);
            }
            REPLY_TYPE_OFFSET_HOLE if !is_read => {
                let name = command_name(cmd.command);
                skip(
                    self,
                    Error::Protocol(format!("OFFSET_HOLE chunk in a reply to {name}")),
                )
            }
            // Longer holes were refused by the length rule; this one is short.
            REPLY_TYPE_OFFSET_HOLE if header.length != HoleChunk::LEN as u64 => skip(
                self,
                Error::Protocol(format!("OFFSET_HOLE chunk of length {}", header.length)),
            ),
            t if t & REPLY_TYPE_FLAG_ERROR != 0 || t == REPLY_TYPE_OFFSET_HOLE => {
                if header.length > MAX_BUFFERED_PAYLOAD as u64 {
                    // Legal in form (the message length field allows it) but far
                    // beyond any message worth showing: skipped, not buffered.
                    return skip(
                        self,
                        Error::Protocol(format!(
                            "error chunk of {} bytes exceeds the buffered limit of {MAX_BUFFERED_PAYLOAD}",
                            header.length
                        )),
                    );
                }
                self.rx = Rx::ChunkPayload(header);
            }
            other => skip(
                self,
                Error::Protocol(format!("unexpected chunk type {other} in a reply")),
            ),
        }
    }

    /// Gathers a block status payload, then checks and reports it.
    pub(crate) fn rx_status_payload(&mut self, header: ChunkHeader) -> bool {
        let want = header.length as usize - self.status_buf.len();
        // An empty payload is complete at once: waiting for input would stall it.
        if want > 0 && self.stage.is_empty() {
            return false;
        }
        let n = want.min(self.stage.len());
        self.status_buf.extend_from_slice(&self.stage.data()[..n]);
        self.stage.consume(n);
        if n < want {
            return true;
        }
        self.rx = Rx::ReplyHeader;
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let decoded = BlockStatusChunk::decode(self.extended, &self.status_buf);
        let Some(cmd) = self.commands.get_mut(cookie) else {
            self.unknown_cookie(header.cookie);
            return true;
        };
        let checked = decoded
            .map_err(|e| e.to_string())
            .and_then(|chunk| check_status(cmd, &self.meta, chunk));
        match checked {
            Ok((chunk, context)) => {
                cmd.contexts_seen.push(chunk.context_id);
                self.events.push_back(Event::BlockStatus(BlockStatus {
                    cookie,
                    context_id: chunk.context_id,
                    context,
                    extents: chunk.extents,
                }));
            }
            Err(why) => cmd.fail(Error::Protocol(why)),
        }
        if done {
            self.finish_command(cookie);
        }
        true
    }

    fn skip_payload(&mut self, length: u64, cookie: Cookie, done: bool) {
        if length == 0 {
            self.rx = Rx::ReplyHeader;
            if done {
                self.finish_command(cookie);
            }
        } else {
            self.rx = Rx::Discard {
                left: length,
                then: AfterDiscard::Chunk { cookie, done },
            };
        }
    }

    pub(crate) fn rx_data_offset(&mut self, header: ChunkHeader) -> bool {
        let Some(bytes) = self.take::<8>() else {
            return false;
        };
        let offset = u64::from_be_bytes(bytes);
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let length = header.length - 8;
        let Some(cmd) = self.commands.get_mut(cookie) else {
            self.unknown_cookie(header.cookie);
            return true;
        };
        let checked = cmd
            .coverage
            .as_mut()
            .map(|c| c.add(offset, length))
            .unwrap_or(Ok(()));
        match checked {
            Ok(()) => {
                let pos = (offset - cmd.offset) as usize;
                let end = pos + length as usize;
                let rd = ReadData {
                    cookie,
                    start: pos,
                    pos,
                    end,
                    structured_done: Some(done),
                };
                self.rx = Rx::ReadData(rd);
            }
            Err(why) => {
                cmd.fail(Error::Protocol(why));
                self.skip_payload(length, cookie, done);
            }
        }
        true
    }

    /// A read payload is complete in the caller's buffer.
    pub(crate) fn read_data_done(&mut self, rd: ReadData) {
        self.rx = Rx::ReplyHeader;
        self.read_ahead = if rd.end - rd.start >= LARGE_PAYLOAD {
            READ_AHEAD_LARGE
        } else {
            usize::MAX
        };
        if let Some(cmd) = self.commands.get(rd.cookie) {
            // Every chunk is reported, as holes and errors are, even once the
            // read has failed: the caller sees what the server sent.
            if cmd.chunk_events {
                let offset = cmd.offset + rd.start as u64;
                let length = (rd.end - rd.start) as u64;
                let chunk = ReadChunk::Data {
                    cookie: rd.cookie,
                    offset,
                    length,
                };
                self.events.push_back(Event::ReadChunk(chunk));
            }
        }
        // A simple reply is always the last; a chunk is if it carried DONE.
        if rd.structured_done.unwrap_or(true) {
            self.finish_command(rd.cookie);
        }
    }

    pub(crate) fn rx_chunk_payload(&mut self, header: ChunkHeader) -> bool {
        let Some(data) = self.take_vec(header.length as usize) else {
            return false;
        };
        self.rx = Rx::ReplyHeader;
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let Some(cmd) = self.commands.get_mut(cookie) else {
            self.unknown_cookie(header.cookie);
            return true;
        };
        if header.chunk_type == REPLY_TYPE_OFFSET_HOLE {
            // The length was checked to be exactly a hole's, so this decodes.
            let checked = HoleChunk::decode(&data)
                .map_err(|e| e.to_string())
                .and_then(|hole| {
                    let length = u64::from(hole.length);
                    cmd.coverage
                        .as_mut()
                        .map(|c| c.add(hole.offset, length))
                        .unwrap_or(Ok(()))
                        .map(|()| (hole.offset, length))
                });
            match checked {
                Ok((offset, length)) => {
                    // Inside the request (coverage checked it), and the buffer
                    // is exactly the request.
                    let pos = (offset - cmd.offset) as usize;
                    if let Some(region) = cmd
                        .buf
                        .as_mut()
                        .and_then(|b| b.get_mut(pos..pos + length as usize))
                    {
                        region.fill(0);
                    }
                    if cmd.chunk_events {
                        let chunk = ReadChunk::Hole {
                            cookie,
                            offset,
                            length,
                        };
                        self.events.push_back(Event::ReadChunk(chunk));
                    }
                }
                Err(why) => cmd.fail(Error::Protocol(why)),
            }
        } else {
            match ErrorChunk::decode(header.chunk_type, &data) {
                Ok(chunk) => {
                    // A zero-length request still accepts an error at its offset.
                    let outside = chunk
                        .offset
                        .is_some_and(|o| o < cmd.offset || o - cmd.offset >= cmd.length.max(1));
                    if outside {
                        cmd.fail(Error::Protocol(format!(
                            "error offset {} outside the request",
                            chunk.offset.unwrap_or_default()
                        )));
                    } else {
                        let message =
                            (!chunk.message.is_empty()).then_some(ServerText(chunk.message));
                        let error = Error::Server {
                            errno: Errno::from_nbd(chunk.error),
                            message,
                        };
                        if cmd.chunk_events {
                            let event = ReadChunk::Error {
                                cookie,
                                offset: chunk.offset,
                                error: error.clone(),
                            };
                            self.events.push_back(Event::ReadChunk(event));
                        }
                        if let Some(cmd) = self.commands.get_mut(cookie) {
                            cmd.fail(error);
                        }
                    }
                }
                Err(e) => cmd.fail(e.into()),
            }
        }
        if done {
            self.finish_command(cookie);
        }
        true
    }

    /// The last reply of a command arrived: complete it exactly once.
    pub(crate) fn finish_command(&mut self, cookie: Cookie) {
        let Some(mut cmd) = self.commands.remove(cookie) else {
            return;
        };
        if cmd.error.is_none() {
            if let Some(missing) = cmd
                .contexts
                .iter()
                .find(|id| !cmd.contexts_seen.contains(id))
            {
                cmd.error = Some(Error::Protocol(format!(
                    "block status reply ended without extents for context id {missing}"
                )));
            }
            if let Some(c) = &cmd.coverage {
                if !c.is_complete() {
                    cmd.error = Some(Error::Protocol(
                        "read reply ended without covering the whole request".into(),
                    ));
                }
            }
        }
        let result = match cmd.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Err(Error::Server {
            errno: Errno::Shutdown,
            ..
        }) = &result
        {
            // The server is going away: finish what is in flight, then disconnect.
            self.soft_shutdown = true;
        }
        self.events.push_back(Event::Completed(Completion {
            cookie,
            result,
            buffer: cmd.buf,
        }));
        self.maybe_queue_disconnect();
        self.maybe_close_after_disconnect();
    }
}

/// Largest block status payload accepted: 512 Ki extended or 1 Mi compact extents.
pub const MAX_STATUS_PAYLOAD: u64 = 8 * 1024 * 1024;

/// Largest error chunk payload any server can send: error value, 16-bit message
/// length, the longest message that length allows, and an offset.
pub const MAX_ERROR_PAYLOAD: u64 = 4 + 2 + u16::MAX as u64 + 8;

/// The length rule of this module (see its documentation): the largest payload a
/// chunk of `chunk_type` could carry in a legal reply to `cmd`.
fn payload_limit(cmd: &Command, chunk_type: u16) -> u64 {
    let is_read = cmd.command == CMD_READ;
    let is_status = cmd.command == CMD_BLOCK_STATUS;
    // Saturating: a trim's length may be near u64::MAX (extended headers).
    let data_limit = cmd.length.saturating_add(8);
    match chunk_type {
        REPLY_TYPE_NONE => 0,
        REPLY_TYPE_OFFSET_DATA if is_read => data_limit,
        REPLY_TYPE_OFFSET_HOLE if is_read => HoleChunk::LEN as u64,
        REPLY_TYPE_BLOCK_STATUS if is_status => status_limit(false, cmd.length),
        REPLY_TYPE_BLOCK_STATUS_EXT if is_status => status_limit(true, cmd.length),
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => MAX_ERROR_PAYLOAD,
        // Unknown, or not legal for this command: judged by the command's
        // largest legal chunk, so skipping it costs no more than a legal reply.
        _ if is_read => data_limit.max(MAX_ERROR_PAYLOAD),
        _ if is_status => status_limit(true, cmd.length).max(MAX_ERROR_PAYLOAD),
        _ => MAX_ERROR_PAYLOAD,
    }
}

/// The largest legal block status payload for a request of `count` bytes: a
/// descriptor per byte, plus one (the last may start at the end), capped.
fn status_limit(extended: bool, count: u64) -> u64 {
    let (head, each) = if extended { (8, 16) } else { (4, 8) };
    count
        .saturating_add(1)
        .saturating_mul(each)
        .saturating_add(head)
        .min(MAX_STATUS_PAYLOAD)
}

/// Name of a chunk type, for messages.
fn chunk_type_name(chunk_type: u16) -> String {
    match chunk_type {
        REPLY_TYPE_NONE => "NONE".into(),
        REPLY_TYPE_OFFSET_DATA => "OFFSET_DATA".into(),
        REPLY_TYPE_OFFSET_HOLE => "OFFSET_HOLE".into(),
        REPLY_TYPE_BLOCK_STATUS => "BLOCK_STATUS".into(),
        REPLY_TYPE_BLOCK_STATUS_EXT => "BLOCK_STATUS_EXT".into(),
        REPLY_TYPE_ERROR => "ERROR".into(),
        REPLY_TYPE_ERROR_OFFSET => "ERROR_OFFSET".into(),
        other => format!("type {other}"),
    }
}

/// Checks one block status chunk against its command; returns it with the
/// context's name, or says what is wrong.
fn check_status(
    cmd: &Command,
    meta: &[(u32, String)],
    chunk: BlockStatusChunk,
) -> std::result::Result<(BlockStatusChunk, String), String> {
    if meta.is_empty() {
        return Err("block status chunk, but no meta context was negotiated".into());
    }
    let Some((_, name)) = meta.iter().find(|(id, _)| *id == chunk.context_id) else {
        return Err(format!(
            "block status for unknown context id {}",
            chunk.context_id
        ));
    };
    if !cmd.contexts.contains(&chunk.context_id) {
        return Err(format!(
            "block status for context {name:?}, which was not asked for"
        ));
    }
    if cmd.contexts_seen.contains(&chunk.context_id) {
        return Err(format!("second block status chunk for context {name:?}"));
    }
    if cmd.req_one && chunk.extents.len() != 1 {
        return Err(format!(
            "{} extents for context {name:?} although REQ_ONE asked for one",
            chunk.extents.len()
        ));
    }
    // Only the last extent may run past the request: every other one ends
    // within it. (The last may even start at the end, as nbdkit sends when a
    // request ends on an extent boundary; libnbd accepts that too.)
    let mut covered: u64 = 0;
    let last = chunk.extents.len() - 1;
    for (i, e) in chunk.extents.iter().enumerate() {
        if e.length == 0 {
            return Err(format!("zero-length extent for context {name:?}"));
        }
        if i < last {
            covered = covered
                .checked_add(e.length)
                .filter(|&c| c <= cmd.length)
                .ok_or_else(|| format!("extents for context {name:?} run past the request"))?;
        }
    }
    Ok((chunk, name.clone()))
}
