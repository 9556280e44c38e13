//! One copy worker: its own source and destination ends (its own NBD
//! connections under multi-conn), copying the pieces the [`Plan`] hands it
//! with many requests in flight.
//!
//! Every request is accounted for: a read that failed or a write the server
//! did not acknowledge fails the copy with the side, the offset and the
//! cause, and the worker stops only once nothing of its own is in flight.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Cookie, CookieMap};

use super::changes;
use super::local::{Local, Writeback};
use super::ordered::{Ordered, Piece};
use super::plan::Plan;
use super::progress::Counter;
use super::side::{self, Side};
use crate::extents::{self, Run, BASE_ALLOCATION, STATE_ZERO};

/// Largest single zero request.
const ZERO_CHUNK: u64 = 1 << 30;

/// With `--retries`, the destination is flushed each time this much has been
/// written since its last flush (payload bytes, plus the journal's cost of
/// each request). A reconnect writes again what the lost server acknowledged
/// since its last flush, within the journal's budget (64 MiB by default) and
/// past it fails the final flush: flushing well inside the budget keeps a
/// restarted destination recoverable at any point of a long copy.
const CHECKPOINT_BYTES: u64 = 16 << 20;

/// What each write or zero counts towards [`CHECKPOINT_BYTES`] besides its
/// payload (as the journal counts it).
const REQUEST_COST: u64 = nbd_blocking::nbd_io::REPLAY_ENTRY_COST as u64;

/// What the source's extents steer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extents {
    /// Read everything.
    Ignore,
    /// `base:allocation`: runs that read as zeroes are zeroed, not read.
    Allocation,
    /// A dirty-bitmap context: only dirty runs are copied, the rest is left
    /// alone; with `allocation`, dirty runs that read as zeroes are zeroed
    /// without being read.
    Changed {
        /// The bitmap's meta context.
        context: String,
        /// Whether `base:allocation` was negotiated too.
        allocation: bool,
    },
}

/// Settings every worker shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requests in flight per worker.
    pub requests: usize,
    /// Bytes of buffers in flight per worker.
    pub queue_size: usize,
    /// Largest read or write.
    pub request_size: usize,
    /// Block size of zero detection in what was read; 0 turns it off.
    pub sparse: usize,
    /// What the source's extents are used for.
    pub extents: Extents,
    /// Zeroes must be written allocated (no holes).
    pub allocated: bool,
    /// The destination reads as zeroes already: zero runs need no writing.
    pub destination_is_zero: bool,
}

/// The source end of one worker.
pub enum Source {
    /// An NBD connection.
    Nbd(Box<Client>),
    /// A regular file or block device, shared by the workers.
    Local(Arc<Local>),
    /// A stream read in order (only ever one worker).
    Stream(Box<dyn Read + Send>),
}

/// The destination end of one worker.
pub enum Destination {
    /// An NBD connection; whether it takes zero requests.
    Nbd {
        /// The connection.
        client: Box<Client>,
        /// Whether it takes `NBD_CMD_WRITE_ZEROES`.
        can_zero: bool,
    },
    /// A regular file or block device, shared by the workers.
    Local(Arc<Local>, Writeback),
    /// A stream written in order (only ever one worker).
    Stream(Ordered),
    /// `null:`: everything is discarded.
    Null,
}

/// What one worker moved, for `--verbose` and for tests that count bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the destination as data.
    pub written: u64,
    /// Bytes zeroed on the destination.
    pub zeroed: u64,
    /// Bytes left alone (clean in `--changed`, or zero on a zero destination).
    pub skipped: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.read += o.read;
        self.written += o.written;
        self.zeroed += o.zeroed;
        self.skipped += o.skipped;
    }
}

/// One worker's state.
pub struct Worker<'a> {
    src: Source,
    dst: Destination,
    settings: &'a Settings,
    plan: &'a Plan,
    progress: &'a Counter,
    /// Source size; `None` for a stream read to its end.
    size: Option<u64>,
    /// The piece being copied: its end, and the offset of the next read.
    piece_end: u64,
    next: u64,
    exhausted: bool,
    /// Upcoming source runs of the current piece.
    runs: VecDeque<Run>,
    /// Reads in flight: offset and length.
    reads: CookieMap<Cookie, (u64, usize)>,
    /// Writes and zeroes in flight: offset, length, and the data to reuse.
    writes: CookieMap<Cookie, (u64, u64, Bytes)>,
    /// Bytes of buffers in flight.
    queued: usize,
    spare: Vec<BytesMut>,
    /// One request of zeroes, for destinations that cannot zero cheaply.
    zeroes: Bytes,
    stats: Stats,
    /// The checkpoint flush in flight (`--retries` only).
    checkpoint: Option<Cookie>,
    /// Bytes written to the destination since the last checkpoint flush.
    unflushed: u64,
}

/// What a worker hands back when it is done: its connections, to flush and
/// close, and its byte counts.
pub struct Done {
    /// The source end.
    pub src: Source,
    /// The destination end.
    pub dst: Destination,
    /// What it moved.
    pub stats: Stats,
}

impl<'a> Worker<'a> {
    /// A worker over these ends.
    pub fn new(
        src: Source,
        dst: Destination,
        settings: &'a Settings,
        plan: &'a Plan,
        progress: &'a Counter,
        size: Option<u64>,
    ) -> Worker<'a> {
        Worker {
            src,
            dst,
            settings,
            plan,
            progress,
            size,
            piece_end: 0,
            next: 0,
            exhausted: false,
            runs: VecDeque::new(),
            reads: CookieMap::default(),
            writes: CookieMap::default(),
            queued: 0,
            spare: Vec::new(),
            zeroes: Bytes::from(vec![0u8; settings.request_size]),
            stats: Stats::default(),
            checkpoint: None,
            unflushed: 0,
        }
    }

    /// Copies pieces until the plan has none left, then settles what it wrote.
    /// On failure the plan is told, so the other workers stop soon.
    pub fn run(mut self) -> Result<Done, Error> {
        if let Err(e) = self.copy() {
            self.plan.fail();
            return Err(e);
        }
        if let Destination::Local(local, writeback) = &mut self.dst {
            writeback.finish(local);
        }
        Ok(Done {
            src: self.src,
            dst: self.dst,
            stats: self.stats,
        })
    }

    fn in_flight(&self) -> usize {
        self.reads.len() + self.writes.len() + usize::from(self.checkpoint.is_some())
    }

    /// With `--retries`, flushes the destination once enough was written
    /// since its last flush (see [`CHECKPOINT_BYTES`]); one flush at a time.
    fn checkpoint(&mut self) -> Result<(), Error> {
        if self.checkpoint.is_some() || self.unflushed < CHECKPOINT_BYTES {
            return Ok(());
        }
        if !crate::retries::enabled() {
            return Ok(());
        }
        if let Destination::Nbd { client, .. } = &mut self.dst {
            if client.connection().can_flush()? {
                let cookie = client
                    .aio_flush(CmdFlags::empty())
                    .map_err(|e| side::named(Side::Destination, format!("flush: {e}")))?;
                self.checkpoint = Some(cookie);
            }
        }
        self.unflushed = 0;
        Ok(())
    }

    fn has_room(&self) -> bool {
        self.in_flight() < self.settings.requests && self.queued < self.settings.queue_size
    }

    fn copy(&mut self) -> Result<(), Error> {
        loop {
            // Collect first: finished requests free room for new ones, and the
            // wait below must never start with room left unused.
            self.collect()?;
            while !self.exhausted && self.has_room() {
                self.exhausted = !self.start_next()?;
                self.collect()?;
            }
            self.checkpoint()?;
            if self.exhausted && self.in_flight() == 0 {
                return Ok(());
            }
            self.wait()?;
        }
    }

    /// A buffer of `len` bytes: a spare one, or a new page-aligned one of a
    /// whole request (the kernel copies into aligned buffers several times
    /// faster; see [`nbd_proto::aligned_zeroed`]).
    fn buffer(&mut self, len: usize) -> BytesMut {
        let mut buf = match self.spare.pop() {
            Some(buf) if buf.capacity() >= len => buf,
            _ => nbd_proto::aligned_zeroed(len.max(self.settings.request_size)),
        };
        buf.resize(len, 0);
        buf
    }

    fn recycle(&mut self, data: Bytes) {
        if let Ok(buf) = data.try_into_mut() {
            if buf.capacity() > 0 {
                self.spare.push(buf);
            }
        }
    }

    /// Starts the next read (or, from a stream or local file, does it), or
    /// zeroes or skips one run; false once there is nothing left to start.
    fn start_next(&mut self) -> Result<bool, Error> {
        if self.next >= self.piece_end {
            let Some((start, end)) = self.plan.take() else {
                return Ok(false);
            };
            self.next = start;
            self.piece_end = end;
            self.runs.clear();
        }
        let offset = self.next;
        let mut len = (self.piece_end - offset).min(self.settings.request_size as u64);
        if let Some(run) = self.current_run()? {
            let run_end = (run.offset + run.length).min(self.piece_end);
            match &self.settings.extents {
                Extents::Allocation if run.flags & STATE_ZERO != 0 => {
                    self.next = run_end;
                    self.zero(offset, run_end - offset)?;
                    return Ok(true);
                }
                Extents::Changed { .. } if run.flags & changes::DIRTY == 0 => {
                    // Unchanged since the bitmap started: the destination has it.
                    self.next = run_end;
                    self.skip(run_end - offset);
                    return Ok(true);
                }
                Extents::Changed { .. } if run.flags & changes::ZERO != 0 => {
                    self.next = run_end;
                    self.zero(offset, run_end - offset)?;
                    return Ok(true);
                }
                _ => len = len.min(run_end - offset),
            }
        }
        let len = len as usize;
        let mut buf = self.buffer(len);
        match &mut self.src {
            Source::Nbd(client) => {
                let cookie = client
                    .aio_pread(buf, offset, CmdFlags::empty())
                    .map_err(|e| side::failed(Side::Source, "read", offset, e))?;
                self.reads.insert(cookie, (offset, len));
                self.queued += len;
                self.next += len as u64;
            }
            Source::Local(local) => {
                local
                    .read_at(&mut buf, offset)
                    .map_err(|e| side::failed(Side::Source, "read", offset, e))?;
                self.next += len as u64;
                self.stats.read += len as u64;
                self.write(offset, buf.freeze())?;
            }
            Source::Stream(reader) => {
                let got = read_full(reader, &mut buf)
                    .map_err(|e| side::failed(Side::Source, "read", offset, e))?;
                if got < len {
                    if let Some(size) = self.size {
                        return Err(side::failed(
                            Side::Source,
                            "read",
                            offset + got as u64,
                            format!("the input ended before its size {size}"),
                        ));
                    }
                    // The end of a stream of unknown size: no more pieces.
                    self.exhausted = true;
                    self.piece_end = offset + got as u64;
                }
                buf.truncate(got);
                self.next += got as u64;
                self.stats.read += got as u64;
                if got > 0 {
                    self.write(offset, buf.freeze())?;
                }
                return Ok(got == len);
            }
        }
        Ok(true)
    }

    /// The source run containing `self.next`, querying the extents of the
    /// rest of the piece when needed; `None` when extents are not used.
    fn current_run(&mut self) -> Result<Option<Run>, Error> {
        if self.settings.extents == Extents::Ignore {
            return Ok(None);
        }
        let Source::Nbd(client) = &mut self.src else {
            return Ok(None);
        };
        let next = self.next;
        while self
            .runs
            .front()
            .is_some_and(|r| r.offset + r.length <= next)
        {
            self.runs.pop_front();
        }
        if self.runs.is_empty() {
            let limit = self.piece_end - next;
            let got = match &self.settings.extents {
                Extents::Changed {
                    context,
                    allocation: true,
                } => extents::query_each(client, &[context, BASE_ALLOCATION], next, limit)
                    .map(|each| changes::merge(&each[0], each.get(1).map(Vec::as_slice))),
                Extents::Changed { context, .. } => {
                    extents::query(client, context, next, limit).map(|r| changes::merge(&r, None))
                }
                _ => extents::query(client, BASE_ALLOCATION, next, limit),
            }
            .map_err(|e| side::failed(Side::Source, "block status", next, e))?;
            self.runs.extend(got);
        }
        Ok(self.runs.front().copied())
    }

    /// Takes finished reads and writes, checking each result.
    fn collect(&mut self) -> Result<(), Error> {
        if let Source::Nbd(client) = &mut self.src {
            let mut done = Vec::new();
            while let Some(c) = client.next_completion() {
                done.push(c);
            }
            for c in done {
                let (offset, len) = self.reads.remove(&c.cookie).ok_or_else(|| {
                    side::failed(Side::Source, "read", 0, "a reply to no read of this copy")
                })?;
                self.queued -= len;
                c.result
                    .map_err(|e| side::reply_failed(Side::Source, "read", offset, e.into()))?;
                // Never a short copy: the buffer comes back whole or it is an error.
                let data = match c.buffer {
                    Some(buf) if buf.len() == len => buf.freeze(),
                    _ => {
                        let why = "the read's buffer did not come back whole";
                        return Err(side::failed(Side::Source, "read", offset, why));
                    }
                };
                self.stats.read += data.len() as u64;
                self.write(offset, data)?;
            }
        }
        if let Destination::Nbd { client, .. } = &mut self.dst {
            while let Some(c) = client.next_completion() {
                if self.checkpoint == Some(c.cookie) {
                    self.checkpoint = None;
                    c.result.map_err(|e| {
                        let e: Error = e.into();
                        match crate::deadline::timed_out(&e) {
                            true => crate::deadline::explain(e, "destination", "a flush"),
                            false => side::named(Side::Destination, format!("flush: {e}")),
                        }
                    })?;
                    continue;
                }
                let (offset, len, data) = self.writes.remove(&c.cookie).ok_or_else(|| {
                    side::failed(Side::Destination, "write", 0, "a reply to no write")
                })?;
                let what = if data.is_empty() { "zero" } else { "write" };
                c.result
                    .map_err(|e| side::reply_failed(Side::Destination, what, offset, e.into()))?;
                self.queued -= data.len();
                self.progress.add(len);
                // Inline recycle: `self.dst` is borrowed by the loop.
                if let Ok(buf) = data.try_into_mut() {
                    if buf.capacity() > 0 {
                        self.spare.push(buf);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes what was read, turning all-zero blocks into zeroes when `--sparse` asks.
    fn write(&mut self, offset: u64, data: Bytes) -> Result<(), Error> {
        let sparse_target = matches!(self.dst, Destination::Nbd { .. } | Destination::Local(..));
        let block = self.settings.sparse;
        if block == 0 || !sparse_target || self.settings.allocated {
            return self.write_data(offset, data);
        }
        let mut at = 0;
        while at < data.len() {
            let zero = is_zero(&data[at..(at + block).min(data.len())]);
            let mut end = at;
            while end < data.len() && is_zero(&data[end..(end + block).min(data.len())]) == zero {
                end = (end + block).min(data.len());
            }
            if zero {
                self.zero(offset + at as u64, (end - at) as u64)?;
            } else if at == 0 && end == data.len() {
                return self.write_data(offset, data);
            } else {
                self.write_data(offset + at as u64, data.slice(at..end))?;
            }
            at = end;
        }
        self.recycle(data);
        Ok(())
    }

    fn write_data(&mut self, offset: u64, data: Bytes) -> Result<(), Error> {
        let len = data.len() as u64;
        self.stats.written += len;
        match &mut self.dst {
            Destination::Nbd { client, .. } => {
                let size = client.size()?;
                if offset + len > size {
                    return Err(side::failed(
                        Side::Destination,
                        "write",
                        offset,
                        format!("the source is larger than the destination size {size}"),
                    ));
                }
                let cookie = client
                    .aio_pwrite(data.clone(), offset, CmdFlags::empty())
                    .map_err(|e| side::failed(Side::Destination, "write", offset, e))?;
                self.queued += data.len();
                self.unflushed += len + REQUEST_COST;
                self.writes.insert(cookie, (offset, len, data));
            }
            Destination::Local(local, writeback) => {
                local
                    .write_at(&data, offset)
                    .map_err(|e| side::failed(Side::Destination, "write", offset, e))?;
                writeback.wrote(local, offset, len);
                self.progress.add(len);
                self.recycle(data);
            }
            Destination::Stream(out) => {
                out.emit(offset, Piece::Data(data), &self.zeroes)
                    .map_err(|e| side::failed(Side::Destination, "write", offset, e))?;
                self.progress.add(len);
            }
            Destination::Null => {
                self.progress.add(len);
                self.recycle(data);
            }
        }
        Ok(())
    }

    /// Counts `len` bytes as done without touching the destination.
    fn skip(&mut self, len: u64) {
        self.stats.skipped += len;
        self.progress.add(len);
    }

    /// Makes `length` bytes at `offset` zero on the destination the cheapest way.
    fn zero(&mut self, offset: u64, length: u64) -> Result<(), Error> {
        let stream = matches!(self.dst, Destination::Stream(_));
        if self.settings.destination_is_zero && !self.settings.allocated && !stream {
            self.skip(length);
            return Ok(());
        }
        self.stats.zeroed += length;
        let zero_flags = if self.settings.allocated {
            CmdFlags::NO_HOLE
        } else {
            CmdFlags::empty()
        };
        match &mut self.dst {
            Destination::Nbd {
                client,
                can_zero: true,
            } => {
                let mut at = offset;
                while at < offset + length {
                    let n = (offset + length - at).min(ZERO_CHUNK);
                    let cookie = client
                        .aio_zero(n, at, zero_flags)
                        .map_err(|e| side::failed(Side::Destination, "zero", at, e))?;
                    self.unflushed += REQUEST_COST;
                    self.writes.insert(cookie, (at, n, Bytes::new()));
                    at += n;
                }
            }
            Destination::Nbd {
                can_zero: false, ..
            } => {
                self.stats.zeroed -= length;
                let mut at = offset;
                while at < offset + length {
                    let n = (offset + length - at).min(self.zeroes.len() as u64) as usize;
                    let piece = self.zeroes.slice(..n);
                    self.write_data(at, piece)?;
                    at += n as u64;
                }
            }
            Destination::Local(local, _) => {
                local
                    .zero(offset, length, self.settings.allocated, &self.zeroes)
                    .map_err(|e| side::failed(Side::Destination, "zero", offset, e))?;
                self.progress.add(length);
            }
            Destination::Stream(out) => {
                out.emit(offset, Piece::Zero(length), &self.zeroes)
                    .map_err(|e| side::failed(Side::Destination, "write", offset, e))?;
                self.progress.add(length);
            }
            Destination::Null => self.progress.add(length),
        }
        Ok(())
    }

    /// Waits until some socket can move. A connection that died fails its
    /// commands; those failures, which name the side and offset, are what
    /// the copy reports.
    fn wait(&mut self) -> Result<(), Error> {
        let mut clients: Vec<&mut Client> = Vec::with_capacity(2);
        if let Source::Nbd(client) = &mut self.src {
            clients.push(client);
        }
        if let Destination::Nbd { client, .. } = &mut self.dst {
            clients.push(client);
        }
        if clients.is_empty() {
            return Ok(());
        }
        let waited = super::wait(&mut clients);
        if let Source::Nbd(client) = &mut self.src {
            crate::retries::report("source", client);
        }
        if let Destination::Nbd { client, .. } = &mut self.dst {
            crate::retries::report("destination", client);
        }
        match waited {
            Ok(()) => Ok(()),
            Err(e) => {
                self.collect()?;
                Err(self.name_dead_side(e))
            }
        }
    }

    /// `e`, from waiting on both connections, named with the side whose
    /// connection failed and the first offset it had in flight.
    fn name_dead_side(&self, e: Error) -> Error {
        if let Source::Nbd(client) = &self.src {
            if client.connection().error().is_some() {
                if crate::deadline::timed_out(&e) {
                    let what = "replies to reads and extent queries";
                    return crate::deadline::explain(e, "source", what);
                }
                let at = self.reads.values().map(|r| r.0).min().unwrap_or(self.next);
                return side::failed(Side::Source, "read", at, e);
            }
        }
        if let Destination::Nbd { client, .. } = &self.dst {
            if client.connection().error().is_some() {
                if crate::deadline::timed_out(&e) {
                    return crate::deadline::explain(e, "destination", "replies to writes");
                }
                let at = self.writes.values().map(|w| w.0).min().unwrap_or(0);
                return side::failed(Side::Destination, "write", at, e);
            }
        }
        e
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut Box<dyn Read + Send>, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
