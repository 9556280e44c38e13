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
//!
//! # Ownership
//!
//! All of this phase's state is [`Transmission`], which exists only once
//! negotiation is over: commands cannot reach option state, and the
//! handshake cannot reach commands. What it shares with the connection (bytes
//! in and out, events, export info, negotiated facts) it borrows as a [`Core`].

use bytes::{Bytes, BytesMut};

use std::collections::VecDeque;
use std::time::Instant;

use crate::core::{Core, Step};
use crate::coverage::Coverage;
use crate::deadline::{earliest, Deadline};
use crate::error::{Errno, Error, Result, ServerText};
use crate::event::{BlockStatus, Completion, Event, ReadChunk};
use crate::flags::{CmdFlags, Strict, TransmissionFlags};
use crate::slab::{Cookie, Slab};
use crate::stage::MAX_BUFFERED_PAYLOAD;
use crate::trace;
use crate::wire::consts::*;
use crate::wire::{
    BlockStatusChunk, ChunkHeader, ErrorChunk, HoleChunk, RequestHeader, SimpleReply,
};

/// Largest read or write payload, whatever the strict mode (as libnbd).
pub const MAX_REQUEST_SIZE: u64 = 64 * 1024 * 1024;

/// A command in flight.
#[derive(Debug)]
struct Command {
    command: u16,
    offset: u64,
    length: u64,
    /// The caller's read buffer.
    buf: Option<BytesMut>,
    /// Report each chunk as an event.
    chunk_events: bool,
    /// The first error seen; the command fails with it when done.
    error: Option<Error>,
    /// What a structured read reply has covered.
    coverage: Option<Coverage>,
    /// Block status: the contexts asked about (all negotiated ones, or a filter).
    contexts: Vec<u32>,
    /// Block status: the contexts already reported.
    contexts_seen: Vec<u32>,
    /// Block status: `REQ_ONE` was set.
    req_one: bool,
    /// When the command times out (`Config::command_timeout`).
    deadline: Deadline,
    /// Counted in `Transmission::timed`.
    counted_timed: bool,
    /// The command timed out and was completed: this is a tombstone that keeps
    /// its cookie reserved so the late reply is framed, consumed and dropped.
    timed_out: bool,
}

impl Command {
    fn fail(&mut self, error: Error) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }
}

/// What the reply parser expects next from the server.
#[derive(Debug, Clone, Copy)]
enum Expect {
    ReplyHeader,
    /// The 8-byte offset at the start of an `OFFSET_DATA` payload.
    DataOffset(ChunkHeader),
    /// A non-data chunk payload, buffered whole.
    ChunkPayload(ChunkHeader),
    /// A block status payload, gathered in `status_buf`.
    StatusPayload(ChunkHeader),
    /// Read data landing in a command's buffer at `pos..end`.
    ReadData(ReadData),
    /// A chunk payload to skip; then the command finishes if `done`.
    Skip {
        left: u64,
        cookie: Cookie,
        done: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct ReadData {
    cookie: Cookie,
    /// Where this payload starts in the buffer (for the chunk event).
    start: usize,
    pos: usize,
    end: usize,
    /// Structured chunk: finish the command when done if its DONE flag was set.
    structured_done: Option<bool>,
}

/// Read-ahead into the stage while read payloads are large. Bytes read ahead
/// are copied to the caller's buffer; with large payloads it is cheaper to read
/// little past a header and let the payload land in place. Small payloads keep
/// the whole stage, so one read can take many replies.
const READ_AHEAD_LARGE: usize = 4096;
/// Payload size from which reads count as large.
const LARGE_PAYLOAD: usize = 64 * 1024;

/// The transmission phase's own state: commands in flight, the reply parser,
/// and the way to a graceful end.
pub(crate) struct Transmission {
    expect: Expect,
    commands: Slab<Command>,
    /// Block status payload being gathered.
    status_buf: Vec<u8>,
    /// The caller asked to disconnect: no new commands; `NBD_CMD_DISC` goes out
    /// once nothing is in flight.
    disconnecting: bool,
    /// The server sent `ESHUTDOWN`: no new commands; disconnect once nothing
    /// is in flight.
    soft_shutdown: bool,
    /// `NBD_CMD_DISC` is queued: the connection closes once it is written.
    disc_queued: bool,
    /// Most bytes one read into the stage may take (see `READ_AHEAD_LARGE`).
    read_ahead: usize,
    /// Commands that timed out and still wait for their late reply.
    tombstones: usize,
    /// Commands in flight with a deadline (tombstones excluded): while there
    /// are none, time costs nothing per command.
    timed: usize,
    /// When the server has been silent too long with commands in flight;
    /// re-armed by every server byte and whenever the first command starts.
    stall: Deadline,
}

impl Transmission {
    /// Nothing in flight, waiting for commands.
    pub(crate) fn new() -> Self {
        Transmission {
            expect: Expect::ReplyHeader,
            commands: Slab::new(),
            status_buf: Vec::new(),
            disconnecting: false,
            soft_shutdown: false,
            disc_queued: false,
            read_ahead: usize::MAX,
            tombstones: 0,
            timed: 0,
            stall: Deadline::Off,
        }
    }

    // ------------------------------------------------------------ queries

    /// Commands issued and not yet completed.
    /// Tombstones of timed-out commands are not counted: they were completed.
    pub(crate) fn in_flight(&self) -> usize {
        self.commands.len() - self.tombstones
    }

    /// Whether `cookie` names a command still in flight (not a tombstone).
    pub(crate) fn is_in_flight(&self, cookie: Cookie) -> bool {
        self.commands.get(cookie).is_some_and(|c| !c.timed_out)
    }

    // ------------------------------------------------------------ time

    /// Server bytes arrived: the stall deadline starts over.
    pub(crate) fn note_input(&mut self, core: &Core) {
        if core.config.stall_timeout.is_some() {
            self.stall = Deadline::arm(core.config.stall_timeout);
        }
    }

    /// The stall timeout changed: its clock starts over with the new length
    /// (or stops, when there is none).
    pub(crate) fn restart_stall(&mut self, core: &Core) {
        self.stall = Deadline::arm(core.config.stall_timeout);
    }

    /// When the caller must next pass the time in; `None` when nothing is
    /// timed. O(1) while no command in flight has a deadline; otherwise one
    /// pass over the commands in flight.
    pub(crate) fn poll_timeout(&self, last_now: Option<Instant>) -> Option<Instant> {
        if self.commands.len() == 0 {
            return None;
        }
        let mut next = self.stall.wake(last_now);
        if self.timed > 0 {
            for cmd in self.commands.values() {
                if !cmd.timed_out {
                    next = earliest(next, cmd.deadline.wake(last_now));
                }
            }
        }
        next
    }

    /// Starts armed deadlines at `now` and carries out those that passed:
    /// each timed-out command completes once with `ETIMEDOUT` and its buffer
    /// and leaves a tombstone. Returns the error that ends the connection
    /// when the stall deadline passed.
    pub(crate) fn handle_timeout(&mut self, core: &mut Core, now: Instant) -> Option<Error> {
        if self.commands.len() == 0 {
            return None;
        }
        self.stall.start(now);
        if self.stall.passed(now) {
            return Some(Error::TimedOut(
                "no byte from the server while commands were in flight for the stall timeout"
                    .into(),
            ));
        }
        if self.timed > 0 {
            self.expire_commands(core, now);
        }
        None
    }

    /// Starts the command deadlines that wait for `now` and turns each
    /// command whose deadline passed into a completed tombstone.
    fn expire_commands(&mut self, core: &mut Core, now: Instant) {
        for (cookie, cmd) in self.commands.iter_mut() {
            if cmd.timed_out {
                continue;
            }
            cmd.deadline.start(now);
            if !cmd.deadline.passed(now) {
                continue;
            }
            cmd.timed_out = true;
            cmd.counted_timed = false;
            self.timed -= 1;
            // The late reply may still come: it is framed by the command's
            // kind and length, as before, but reaches neither events nor buffer.
            cmd.chunk_events = false;
            self.tombstones += 1;
            core.events.push_back(Event::Completed(Completion {
                cookie,
                result: Err(Error::TimedOut(format!(
                    "{} got no reply within the command timeout",
                    command_name(cmd.command)
                ))),
                buffer: cmd.buf.take(),
            }));
        }
    }

    /// Whether the caller asked to disconnect.
    pub(crate) fn is_disconnecting(&self) -> bool {
        self.disconnecting
    }

    /// Whether `NBD_CMD_DISC` is queued with nothing in flight: the connection
    /// closes once it is written.
    pub(crate) fn is_disconnect_queued(&self) -> bool {
        self.disc_queued && self.commands.len() == 0
    }

    // ------------------------------------------------------------ bytes in

    /// The unfilled region of the caller's buffer the current read payload
    /// lands in, when the next bytes can go straight there (nothing staged).
    pub(crate) fn caller_region(&mut self, stage_empty: bool) -> Option<&mut [u8]> {
        match self.expect {
            Expect::ReadData(rd) if stage_empty => self
                .commands
                .get_mut(rd.cookie)
                .and_then(|c| c.buf.as_mut())
                // `rd.pos..rd.end` lies inside the buffer: the reply was
                // checked against the request, whose length is the buffer's.
                .and_then(|buf| buf.get_mut(rd.pos..rd.end)),
            _ => None,
        }
    }

    /// Most bytes one read into the stage may take.
    pub(crate) fn read_ahead(&self) -> usize {
        self.read_ahead
    }

    /// `n` bytes were read into the region [`caller_region`](Self::caller_region) offered.
    pub(crate) fn caller_read(&mut self, core: &mut Core, n: usize) {
        // Nothing but input changes `expect`, and no input came since the
        // offer, so the read payload it pointed into is still current.
        if let Expect::ReadData(mut rd) = self.expect {
            rd.pos += n;
            self.expect = Expect::ReadData(rd);
            if rd.pos == rd.end {
                self.read_data_done(core, rd);
            }
        }
    }

    /// One parsing step over the staged bytes.
    pub(crate) fn step(&mut self, core: &mut Core) -> Step {
        match self.expect {
            Expect::ReplyHeader => self.rx_reply_header(core),
            Expect::DataOffset(h) => self.rx_data_offset(core, h),
            Expect::ChunkPayload(h) => self.rx_chunk_payload(core, h),
            Expect::StatusPayload(h) => self.rx_status_payload(core, h),
            Expect::ReadData(rd) => self.rx_read_data(core, rd),
            Expect::Skip { left, cookie, done } => {
                if core.stage.is_empty() {
                    return Step::Blocked;
                }
                let n = (core.stage.len() as u64).min(left);
                core.stage.consume(n as usize);
                if n < left {
                    self.expect = Expect::Skip {
                        left: left - n,
                        cookie,
                        done,
                    };
                    return Step::Progressed;
                }
                self.expect = Expect::ReplyHeader;
                if done {
                    self.finish_command(core, cookie);
                }
                Step::Progressed
            }
        }
    }

    fn rx_read_data(&mut self, core: &mut Core, mut rd: ReadData) -> Step {
        if core.stage.is_empty() {
            return Step::Blocked;
        }
        let n = core.stage.len().min(rd.end - rd.pos);
        if let Some(buf) = self
            .commands
            .get_mut(rd.cookie)
            .and_then(|c| c.buf.as_mut())
        {
            buf[rd.pos..rd.pos + n].copy_from_slice(&core.stage.data()[..n]);
        }
        core.stage.consume(n);
        rd.pos += n;
        self.expect = Expect::ReadData(rd);
        if rd.pos == rd.end {
            self.read_data_done(core, rd);
        }
        Step::Progressed
    }

    // ------------------------------------------------------------ the end

    /// Why the server closing its end now ends the connection in error, or
    /// `None` when a disconnect was asked for.
    pub(crate) fn eof_error(&self) -> Option<Error> {
        // Asked to end: the close itself is what the caller wanted;
        // commands still unanswered fail with NotConn, each once.
        if self.disconnecting || self.disc_queued {
            None
        } else {
            Some(Error::NotConnected("server closed the connection".into()))
        }
    }

    /// Completes every command in flight with `error`, each exactly once.
    /// Tombstones go silently: their commands were completed when they timed out.
    pub(crate) fn fail_all(&mut self, error: &Error, events: &mut VecDeque<Event>) {
        self.tombstones = 0;
        self.timed = 0;
        for cookie in self.commands.cookies() {
            if let Some(cmd) = self.commands.remove(cookie) {
                if cmd.timed_out {
                    continue;
                }
                events.push_back(Event::Completed(Completion {
                    cookie,
                    result: Err(error.clone()),
                    buffer: cmd.buf,
                }));
            }
        }
    }

    // ------------------------------------------------------------ issuing

    /// A read into `buf` (`NBD_CMD_READ`), reporting each chunk if `chunk_events`.
    pub(crate) fn read(
        &mut self,
        core: &mut Core,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
        chunk_events: bool,
    ) -> Result<Cookie> {
        let length = buf.len() as u64;
        self.check_request(core, CMD_READ, offset, length, flags)?;
        Ok(self.submit(
            core,
            CMD_READ,
            flags,
            offset,
            length,
            Some(buf),
            None,
            chunk_events,
        ))
    }

    /// A write of `data` (`NBD_CMD_WRITE`), sent as a slice of it.
    pub(crate) fn write(
        &mut self,
        core: &mut Core,
        data: Bytes,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        let length = data.len() as u64;
        self.check_request(core, CMD_WRITE, offset, length, flags)?;
        Ok(self.submit(
            core,
            CMD_WRITE,
            flags,
            offset,
            length,
            None,
            Some(data),
            false,
        ))
    }

    /// A command without payload in either direction (flush, trim, cache,
    /// write zeroes, block status over every negotiated context).
    pub(crate) fn command(
        &mut self,
        core: &mut Core,
        command: u16,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        self.check_request(core, command, offset, count, flags)?;
        Ok(self.submit(core, command, flags, offset, count, None, None, false))
    }

    /// The caller asks to end the connection gracefully.
    pub(crate) fn disconnect(&mut self, core: &mut Core) {
        self.disconnecting = true;
        self.maybe_queue_disconnect(core);
    }

    /// Queues `NBD_CMD_DISC` once a disconnect is wanted (asked by the caller,
    /// or after the server's `ESHUTDOWN`) and nothing is in flight.
    fn maybe_queue_disconnect(&mut self, core: &mut Core) {
        let wanted = self.disconnecting || self.soft_shutdown;
        if !wanted || self.disc_queued || self.commands.len() != 0 {
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
        push_request(core, &header);
    }

    /// Block status for the named contexts only, with the filter as payload.
    pub(crate) fn block_status_filter(
        &mut self,
        core: &mut Core,
        count: u64,
        offset: u64,
        flags: CmdFlags,
        contexts: &[&str],
    ) -> Result<Cookie> {
        self.check_request(core, CMD_BLOCK_STATUS, offset, count, flags)?;
        if !core.extended || !core.info.has(TransmissionFlags::BLOCK_STATUS_PAYLOAD) {
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
            match core.meta.iter().find(|(_, n)| n == name) {
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
            deadline: Deadline::arm(core.config.command_timeout),
            counted_timed: core.config.command_timeout.is_some(),
            timed_out: false,
        });
        self.note_first_command(core);
        let header = RequestHeader {
            flags: (flags | CmdFlags::PAYLOAD_LEN).bits(),
            command: CMD_BLOCK_STATUS,
            cookie: cookie.get(),
            offset,
            length: payload.len() as u64,
        };
        push_request(core, &header);
        core.output.push_payload(payload);
        Ok(cookie)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        core: &mut Core,
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
            core.meta.iter().map(|(id, _)| *id).collect()
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
            deadline: Deadline::arm(core.config.command_timeout),
            counted_timed: core.config.command_timeout.is_some(),
            timed_out: false,
        });
        self.note_first_command(core);
        let header = RequestHeader {
            flags: flags.bits(),
            command,
            cookie: cookie.get(),
            offset,
            length,
        };
        push_request(core, &header);
        if let Some(data) = payload {
            core.output.push_payload(data);
        }
        cookie
    }

    /// A command was just added: if it is the only one, the server had
    /// nothing to answer until now, so the stall deadline starts over.
    fn note_first_command(&mut self, core: &Core) {
        if self.commands.len() == 1 {
            self.note_input(core);
        }
        if core.config.command_timeout.is_some() {
            self.timed += 1;
        }
    }

    /// Every check made before a command is sent; nothing is sent on error.
    /// (The connection checked that it is alive and in transmission.)
    fn check_request(
        &self,
        core: &Core,
        command: u16,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<()> {
        if self.disconnecting || self.soft_shutdown {
            return Err(Error::Shutdown(
                "the connection is disconnecting; no new commands".into(),
            ));
        }
        let name = command_name(command);
        let has_payload_limit = matches!(command, CMD_READ | CMD_WRITE);
        if has_payload_limit && length > MAX_REQUEST_SIZE {
            return Err(Error::TooLarge(format!(
                "{name} of {length} bytes exceeds {MAX_REQUEST_SIZE}"
            )));
        }
        if !core.extended && length > u64::from(u32::MAX) {
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
        let strict = core.config.strict;
        let has = |f: TransmissionFlags| core.info.has(f);
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
            if command == CMD_BLOCK_STATUS && core.meta.is_empty() {
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
            if flags.contains(CmdFlags::DF) && !(has(TransmissionFlags::SEND_DF) && core.structured)
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
            let size = core.info.size.unwrap_or(0);
            if offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(Error::InvalidArgument(format!(
                    "{name} of {length} bytes at {offset} is beyond the export size {size}"
                )));
            }
        }
        if let Some(sizes) = core.info.block_sizes {
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

    fn rx_reply_header(&mut self, core: &mut Core) -> Step {
        if core.stage.len() < 4 {
            return Step::Blocked;
        }
        let data = core.stage.data();
        let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if core.extended {
            // With extended headers every reply is an extended chunk.
            if magic != EXTENDED_REPLY_MAGIC {
                return Step::Kill(Error::Protocol(format!(
                    "reply magic {magic:#x} where extended headers were negotiated: framing lost"
                )));
            }
            let Some(bytes) = core.stage.take::<EXTENDED_REPLY_LEN>() else {
                return Step::Blocked;
            };
            // The magic and length are checked, so decoding cannot fail; if it
            // did, framing would be lost.
            return match ChunkHeader::decode_extended(&bytes) {
                Ok(header) => self.on_chunk_header(core, header),
                Err(e) => Step::Kill(e.into()),
            };
        }
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let Some(bytes) = core.stage.take::<SIMPLE_REPLY_LEN>() else {
                    return Step::Blocked;
                };
                match SimpleReply::decode(&bytes) {
                    Ok(reply) => self.on_simple_reply(core, reply),
                    Err(e) => Step::Kill(e.into()),
                }
            }
            STRUCTURED_REPLY_MAGIC if core.structured => {
                let Some(bytes) = core.stage.take::<STRUCTURED_REPLY_LEN>() else {
                    return Step::Blocked;
                };
                match ChunkHeader::decode_structured(&bytes) {
                    Ok(header) => self.on_chunk_header(core, header),
                    Err(e) => Step::Kill(e.into()),
                }
            }
            STRUCTURED_REPLY_MAGIC => Step::Kill(Error::Protocol(
                "structured reply chunk, but structured replies were not negotiated".into(),
            )),
            other => Step::Kill(Error::Protocol(format!(
                "bad reply magic {other:#x}: framing lost"
            ))),
        }
    }

    fn on_simple_reply(&mut self, core: &mut Core, reply: SimpleReply) -> Step {
        trace::simple_reply(&reply);
        core.stats.chunks_received += 1;
        let cookie = Cookie::from_raw(reply.cookie);
        let structured = core.structured;
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return unknown_cookie(reply.cookie);
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
            self.finish_command(core, cookie);
            return Step::Progressed;
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
            self.expect = Expect::ReadData(rd);
            if end == 0 {
                self.read_data_done(core, rd);
            }
            return Step::Progressed;
        }
        self.finish_command(core, cookie);
        Step::Progressed
    }

    /// Fails the command `cookie` with `error` and skips the chunk's payload.
    fn skip_chunk(&mut self, core: &mut Core, header: &ChunkHeader, error: Error) -> Step {
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        if let Some(cmd) = self.commands.get_mut(cookie) {
            cmd.fail(error);
        }
        self.skip_payload(core, header.length, cookie, done);
        Step::Progressed
    }

    fn on_chunk_header(&mut self, core: &mut Core, header: ChunkHeader) -> Step {
        trace::chunk(&header);
        core.stats.chunks_received += 1;
        let cookie = Cookie::from_raw(header.cookie);
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return unknown_cookie(header.cookie);
        };
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let is_read = cmd.command == CMD_READ;
        let command = cmd.command;
        let request_offset = cmd.offset;
        let limit = payload_limit(cmd, header.chunk_type);
        if header.length > limit {
            let name = command_name(command);
            let chunk = chunk_type_name(header.chunk_type);
            return Step::Kill(Error::Protocol(format!(
                "{chunk} chunk of {} bytes in a reply to {name} that allows at most {limit}: \
                 framing cannot be trusted",
                header.length
            )));
        }
        if core.extended && header.offset != request_offset {
            return self.skip_chunk(
                core,
                &header,
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
                    return self.skip_chunk(
                        core,
                        &header,
                        Error::Protocol(format!("block status chunk in a reply to {name}")),
                    );
                }
                if ext != core.extended {
                    let why = if ext {
                        "64-bit block status without extended headers"
                    } else {
                        "32-bit block status where extended headers were negotiated"
                    };
                    return self.skip_chunk(core, &header, Error::Protocol(why.into()));
                }
                self.status_buf.clear();
                self.expect = Expect::StatusPayload(header);
            }
            REPLY_TYPE_NONE => {
                // The length rule left only an empty payload.
                if !done {
                    // NONE is only valid as the last chunk: end the command here.
                    cmd.fail(Error::Protocol("NONE chunk without the DONE flag".into()));
                }
                self.finish_command(core, cookie);
            }
            REPLY_TYPE_OFFSET_DATA => {
                if !is_read {
                    let name = command_name(command);
                    return self.skip_chunk(
                        core,
                        &header,
                        Error::Protocol(format!("OFFSET_DATA chunk in a reply to {name}")),
                    );
                }
                if header.length <= 8 {
                    return self.skip_chunk(
                        core,
                        &header,
                        Error::Protocol(format!("OFFSET_DATA chunk of length {}", header.length)),
                    );
                }
                self.expect = Expect::DataOffset(header);
            }
            REPLY_TYPE_OFFSET_HOLE if !is_read => {
                let name = command_name(command);
                return self.skip_chunk(
                    core,
                    &header,
                    Error::Protocol(format!("OFFSET_HOLE chunk in a reply to {name}")),
                );
            }
            // Longer holes were refused by the length rule; this one is short.
            REPLY_TYPE_OFFSET_HOLE if header.length != HoleChunk::LEN as u64 => {
                return self.skip_chunk(
                    core,
                    &header,
                    Error::Protocol(format!("OFFSET_HOLE chunk of length {}", header.length)),
                );
            }
            t if t & REPLY_TYPE_FLAG_ERROR != 0 || t == REPLY_TYPE_OFFSET_HOLE => {
                if header.length > MAX_BUFFERED_PAYLOAD as u64 {
                    // Legal in form (the message length field allows it) but far
                    // beyond any message worth showing: skipped, not buffered.
                    return self.skip_chunk(
                        core,
                        &header,
                        Error::Protocol(format!(
                            "error chunk of {} bytes exceeds the buffered limit of {MAX_BUFFERED_PAYLOAD}",
                            header.length
                        )),
                    );
                }
                self.expect = Expect::ChunkPayload(header);
            }
            other => {
                return self.skip_chunk(
                    core,
                    &header,
                    Error::Protocol(format!("unexpected chunk type {other} in a reply")),
                );
            }
        }
        Step::Progressed
    }

    /// Gathers a block status payload, then checks and reports it.
    fn rx_status_payload(&mut self, core: &mut Core, header: ChunkHeader) -> Step {
        let want = header.length as usize - self.status_buf.len();
        // An empty payload is complete at once: waiting for input would stall it.
        if want > 0 && core.stage.is_empty() {
            return Step::Blocked;
        }
        let n = want.min(core.stage.len());
        self.status_buf.extend_from_slice(&core.stage.data()[..n]);
        core.stage.consume(n);
        if n < want {
            return Step::Progressed;
        }
        self.expect = Expect::ReplyHeader;
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let decoded = BlockStatusChunk::decode(core.extended, &self.status_buf);
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return unknown_cookie(header.cookie);
        };
        let checked = decoded
            .map_err(|e| e.to_string())
            .and_then(|chunk| check_status(cmd, &core.meta, chunk));
        match checked {
            Ok((chunk, context)) if !cmd.timed_out => {
                cmd.contexts_seen.push(chunk.context_id);
                core.events.push_back(Event::BlockStatus(BlockStatus {
                    cookie,
                    context_id: chunk.context_id,
                    context,
                    extents: chunk.extents,
                }));
            }
            Ok(_) => {}
            Err(why) => cmd.fail(Error::Protocol(why)),
        }
        if done {
            self.finish_command(core, cookie);
        }
        Step::Progressed
    }

    fn skip_payload(&mut self, core: &mut Core, length: u64, cookie: Cookie, done: bool) {
        if length == 0 {
            self.expect = Expect::ReplyHeader;
            if done {
                self.finish_command(core, cookie);
            }
        } else {
            self.expect = Expect::Skip {
                left: length,
                cookie,
                done,
            };
        }
    }

    fn rx_data_offset(&mut self, core: &mut Core, header: ChunkHeader) -> Step {
        let Some(bytes) = core.stage.take::<8>() else {
            return Step::Blocked;
        };
        let offset = u64::from_be_bytes(bytes);
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let length = header.length - 8;
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return unknown_cookie(header.cookie);
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
                self.expect = Expect::ReadData(rd);
            }
            Err(why) => {
                cmd.fail(Error::Protocol(why));
                self.skip_payload(core, length, cookie, done);
            }
        }
        Step::Progressed
    }

    /// A read payload is complete in the caller's buffer.
    fn read_data_done(&mut self, core: &mut Core, rd: ReadData) {
        self.expect = Expect::ReplyHeader;
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
                core.events.push_back(Event::ReadChunk(chunk));
            }
        }
        // A simple reply is always the last; a chunk is if it carried DONE.
        if rd.structured_done.unwrap_or(true) {
            self.finish_command(core, rd.cookie);
        }
    }

    fn rx_chunk_payload(&mut self, core: &mut Core, header: ChunkHeader) -> Step {
        let Some(data) = core.stage.take_vec(header.length as usize) else {
            return Step::Blocked;
        };
        self.expect = Expect::ReplyHeader;
        let cookie = Cookie::from_raw(header.cookie);
        let done = header.flags & REPLY_FLAG_DONE != 0;
        let Some(cmd) = self.commands.get_mut(cookie) else {
            return unknown_cookie(header.cookie);
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
                        core.events.push_back(Event::ReadChunk(chunk));
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
                            core.events.push_back(Event::ReadChunk(event));
                        }
                        cmd.fail(error);
                    }
                }
                Err(e) => cmd.fail(e.into()),
            }
        }
        if done {
            self.finish_command(core, cookie);
        }
        Step::Progressed
    }

    /// The last reply of a command arrived: complete it exactly once.
    ///
    /// This never ends the connection: a disconnect it queues is still to be
    /// written, and once one is queued no command is left to finish.
    fn finish_command(&mut self, core: &mut Core, cookie: Cookie) {
        let Some(mut cmd) = self.commands.remove(cookie) else {
            return;
        };
        if cmd.timed_out {
            // Its late reply is fully consumed; it was completed long ago.
            self.tombstones -= 1;
            self.maybe_queue_disconnect(core);
            return;
        }
        if cmd.counted_timed {
            self.timed -= 1;
        }
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
        core.events.push_back(Event::Completed(Completion {
            cookie,
            result,
            buffer: cmd.buf,
        }));
        self.maybe_queue_disconnect(core);
    }
}

/// Queues a request header in the negotiated form.
fn push_request(core: &mut Core, header: &RequestHeader) {
    trace::request(header);
    core.stats.chunks_sent += 1;
    if core.extended {
        core.output.push_with(|b| header.encode_extended(b));
    } else {
        core.output.push_with(|b| header.encode_compact(b));
    }
}

/// A reply that cannot be attributed: a server that confuses cookies cannot
/// be trusted with any command's data, and a simple reply's framing is unknown.
fn unknown_cookie(cookie: u64) -> Step {
    Step::Kill(Error::Protocol(format!(
        "reply for unknown or finished cookie {cookie:#x}"
    )))
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
pub(crate) fn chunk_type_name(chunk_type: u16) -> String {
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
