//! `nbd copy SRC DST`: NBD exports, local files, stdin/stdout and `null:`.
//!
//! Reads from an NBD source run with many requests in flight; writes to an NBD
//! destination likewise. The number of requests in use is bounded by
//! `--requests`: a new read starts only when one is free. Any failed read or
//! write fails the copy: nothing is reported done that the server did not
//! acknowledge.
//!
//! Where the source is an NBD export with `base:allocation`, runs it reports as
//! zero are not read at all; and with `--sparse N`, all-zero blocks of N bytes in
//! what was read are not written either. Either way the destination gets zeroes
//! the cheap way: a zero request on an NBD export, nothing on a fresh local file
//! (created sparse), plain zero bytes on standard output.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Config, Cookie};

use crate::extents::{self, Run, BASE_ALLOCATION, STATE_ZERO};
use crate::operand::{self, Operand};
use crate::size::parse_size;

/// Options of `nbd copy`.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// Source, then destination. The source is an NBD URI, a local file, or
    /// `-` for standard input; the destination an NBD URI, a local file, `-`
    /// for standard output, or `null:`. Either may be, after `--`,
    /// `[ CMD ARGS ... ]`: a server program started by socket activation and
    /// stopped at the end.
    #[arg(value_name = "SRC DST", required = true)]
    pub operands: Vec<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub requests: u32,
    /// Size of each request (suffixes K, M allowed).
    #[arg(long, default_value = "256K", value_parser = parse_request_size)]
    pub request_size: u64,
    /// Flush the destination before finishing.
    #[arg(long)]
    pub flush: bool,
    /// Read every byte of the source, ignoring its extents.
    #[arg(long)]
    pub no_extents: bool,
    /// Write all-zero blocks of this size as zeroes the cheap way; 0 turns it off.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub sparse: u64,
    #[command(flatten)]
    pub timeout: crate::deadline::TimeoutArg,
    #[command(flatten)]
    pub retries: crate::retries::RetriesArg,
}

fn parse_request_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 || n > 32 << 20 {
        return Err(format!("request size must be between 1 and 32M, not {s}"));
    }
    Ok(n)
}

fn fail(msg: String) -> Error {
    Error::Io(io::Error::other(msg))
}

/// Largest single zero request.
const ZERO_CHUNK: u64 = 1 << 30;
/// How far ahead of the copy the source's extents are read.
const EXTENT_WINDOW: u64 = 1 << 30;

enum Source {
    Nbd {
        client: Box<Client>,
        /// Upcoming runs of the source, when its extents are used.
        runs: Option<VecDeque<Run>>,
    },
    Stream(Box<dyn Read>),
}

/// A piece of standard output waiting for the pieces before it.
enum Piece {
    Data(Bytes),
    Zero(u64),
}

enum Dest {
    Nbd {
        client: Box<Client>,
        can_zero: bool,
    },
    File(File),
    Stdout {
        out: io::Stdout,
        next: u64,
        waiting: BTreeMap<u64, Piece>,
    },
    Null,
}

impl CopyArgs {
    /// The two operands: source and destination.
    pub fn operands(&self) -> Result<[Operand; 2], String> {
        operand::exactly(&self.operands, ["SRC", "DST"])
    }
}

/// Runs `nbd copy` from `src` to `dst`.
pub fn run(args: &CopyArgs, src: &Operand, dst: &Operand) -> Result<ExitCode, Error> {
    let (src, size) = open_source(src, !args.no_extents)?;
    let dst = open_dest(dst, size)?;
    // No request may exceed either server's maximum block size.
    let mut request_size = args.request_size as usize;
    if let Source::Nbd { client, .. } = &src {
        request_size = request_size.min(client.max_request());
    }
    if let Dest::Nbd { client, .. } = &dst {
        request_size = request_size.min(client.max_request());
    }
    let mut job = Copy {
        src,
        dst,
        size,
        requests: args.requests as usize,
        request_size,
        sparse: args.sparse as usize,
        next: 0,
        reads: HashMap::new(),
        writes: HashMap::new(),
        spare: Vec::new(),
        zeroes: Bytes::from(vec![0u8; request_size]),
    };
    job.run().map_err(|e| job.explain_stall(e))?;
    job.finish(args.flush)?;
    Ok(ExitCode::SUCCESS)
}

fn open_source(spec: &Operand, use_extents: bool) -> Result<(Source, Option<u64>), Error> {
    if let Some(local) = spec.local() {
        if local == "-" {
            return Ok((Source::Stream(Box::new(io::stdin())), None));
        }
        let file = File::open(local).map_err(|e| fail(format!("{local}: {e}")))?;
        let size = file.metadata()?.len();
        return Ok((Source::Stream(Box::new(file)), Some(size)));
    }
    let mut config = Config::default();
    if use_extents {
        config.meta_contexts.push(BASE_ALLOCATION.into());
    }
    let mut client = spec.connect(config).map_err(|e| on_side("source", e))?;
    crate::retries::enable(&mut client)?;
    let size = client.size()?;
    let runs = client
        .connection()
        .can_meta_context(BASE_ALLOCATION)
        .then(VecDeque::new);
    let source = Source::Nbd {
        client: Box::new(client),
        runs,
    };
    Ok((source, Some(size)))
}

fn open_dest(spec: &Operand, size: Option<u64>) -> Result<Dest, Error> {
    match spec.local() {
        Some("null:") => return Ok(Dest::Null),
        Some("-") => {
            return Ok(Dest::Stdout {
                out: io::stdout(),
                next: 0,
                waiting: BTreeMap::new(),
            })
        }
        // A new, sparse file: every byte not written reads as zero.
        Some(local) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(local)
                .map_err(|e| fail(format!("{local}: {e}")))?;
            if let Some(size) = size {
                file.set_len(size)?;
            }
            return Ok(Dest::File(file));
        }
        None => {}
    }
    let mut client = spec
        .connect(Config::default())
        .map_err(|e| on_side("destination", e))?;
    crate::retries::enable(&mut client)?;
    if client.connection().is_read_only()? {
        return Err(nbd_proto::Error::ReadOnly(format!("destination {spec} is read-only")).into());
    }
    let dst_size = client.size()?;
    if let Some(size) = size {
        if size > dst_size {
            return Err(fail(format!(
                "destination size {dst_size} is smaller than the source size {size}"
            )));
        }
    }
    let can_zero = client.connection().can_zero()?;
    Ok(Dest::Nbd {
        client: Box::new(client),
        can_zero,
    })
}

struct Copy {
    src: Source,
    dst: Dest,
    size: Option<u64>,
    requests: usize,
    request_size: usize,
    sparse: usize,
    /// Offset of the next read.
    next: u64,
    /// Reads in flight on an NBD source.
    reads: HashMap<Cookie, u64>,
    /// Writes and zeroes in flight on an NBD destination, with the data kept to reuse its buffer.
    writes: HashMap<Cookie, (u64, Bytes)>,
    spare: Vec<BytesMut>,
    /// One request of zeroes, for destinations that cannot zero cheaply.
    zeroes: Bytes,
}

impl Copy {
    fn requests_in_use(&self) -> usize {
        self.reads.len() + self.writes.len()
    }

    fn buffer(&mut self, len: usize) -> BytesMut {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn run(&mut self) -> Result<(), Error> {
        let mut source_done = false;
        loop {
            // Collect first: finished requests free room for new ones, and the
            // wait below must never start with room left unused.
            self.collect()?;
            while !source_done && self.requests_in_use() < self.requests {
                source_done = !self.start_read()?;
                self.collect()?;
            }
            if source_done && self.requests_in_use() == 0 {
                return Ok(());
            }
            self.wait()?;
        }
    }

    /// Starts (or, for a stream, does) one read, or skips one zero run; false
    /// when the source is exhausted.
    fn start_read(&mut self) -> Result<bool, Error> {
        if self.size.is_some_and(|s| self.next >= s) {
            return Ok(false);
        }
        let mut len = match self.size {
            Some(s) => (s - self.next).min(self.request_size as u64) as usize,
            None => self.request_size,
        };
        let offset = self.next;
        if let Some(run) = self.current_run()? {
            let run_end = run.offset + run.length;
            if run.flags & STATE_ZERO != 0 {
                // Nothing to read: the destination gets zeroes directly.
                self.next = run_end;
                self.zero(offset, run_end - offset)?;
                return Ok(true);
            }
            len = len.min((run_end - offset) as usize);
        }
        let mut buf = self.buffer(len);
        match &mut self.src {
            Source::Nbd { client, .. } => {
                let cookie = client.aio_pread(buf, offset, CmdFlags::empty())?;
                self.reads.insert(cookie, offset);
                self.next += len as u64;
                Ok(true)
            }
            Source::Stream(reader) => {
                let got = read_full(reader, &mut buf)?;
                if got == 0 {
                    if self.size.is_some_and(|s| self.next < s) {
                        return Err(fail(format!(
                            "source ended at {} before its size",
                            self.next
                        )));
                    }
                    return Ok(false);
                }
                buf.truncate(got);
                self.next += got as u64;
                self.write(offset, buf.freeze())?;
                Ok(got == len)
            }
        }
    }

    /// The source run containing `self.next`, reading more extents when needed;
    /// `None` when extents are not used.
    fn current_run(&mut self) -> Result<Option<Run>, Error> {
        let size = self.size.unwrap_or(0);
        let next = self.next;
        let Source::Nbd {
            client,
            runs: Some(runs),
        } = &mut self.src
        else {
            return Ok(None);
        };
        while runs.front().is_some_and(|r| r.offset + r.length <= next) {
            runs.pop_front();
        }
        if runs.is_empty() {
            let window = (size - next).min(EXTENT_WINDOW);
            runs.extend(extents::query(client, BASE_ALLOCATION, next, window)?);
        }
        Ok(runs.front().copied())
    }

    /// Takes finished reads and writes, checking each result.
    fn collect(&mut self) -> Result<(), Error> {
        if let Source::Nbd { client, .. } = &mut self.src {
            let mut done = Vec::new();
            while let Some(c) = client.next_completion() {
                done.push(c);
            }
            for c in done {
                let offset = self
                    .reads
                    .remove(&c.cookie)
                    .expect("a read this copy started");
                c.result
                    .map_err(|e| fail(format!("read at offset {offset} failed: {e}")))?;
                let data = c.buffer.expect("reads return their buffer").freeze();
                self.write(offset, data)?;
            }
        }
        if let Dest::Nbd { client, .. } = &mut self.dst {
            while let Some(c) = client.next_completion() {
                let (offset, data) = self
                    .writes
                    .remove(&c.cookie)
                    .expect("a write this copy started");
                c.result
                    .map_err(|e| fail(format!("write at offset {offset} failed: {e}")))?;
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
        let sparse_target = matches!(self.dst, Dest::Nbd { .. } | Dest::File(_));
        if self.sparse == 0 || !sparse_target {
            return self.write_data(offset, data);
        }
        let mut at = 0;
        while at < data.len() {
            let zero = is_zero(&data[at..(at + self.sparse).min(data.len())]);
            let mut end = at;
            while end < data.len()
                && is_zero(&data[end..(end + self.sparse).min(data.len())]) == zero
            {
                end = (end + self.sparse).min(data.len());
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
        match &mut self.dst {
            Dest::Nbd { client, .. } => {
                let size = client.size()?;
                if offset + data.len() as u64 > size {
                    return Err(fail(format!(
                        "source is larger than the destination size {size}"
                    )));
                }
                let cookie = client.aio_pwrite(data.clone(), offset, CmdFlags::empty())?;
                self.writes.insert(cookie, (offset, data));
            }
            Dest::File(file) => {
                file.write_all_at(&data, offset)?;
                self.recycle(data);
            }
            Dest::Stdout { .. } => self.emit(offset, Piece::Data(data))?,
            Dest::Null => self.recycle(data),
        }
        Ok(())
    }

    /// Makes `length` bytes at `offset` zero on the destination the cheapest way.
    fn zero(&mut self, offset: u64, length: u64) -> Result<(), Error> {
        match &mut self.dst {
            Dest::Nbd {
                client,
                can_zero: true,
            } => {
                let mut at = offset;
                while at < offset + length {
                    let n = (offset + length - at).min(ZERO_CHUNK);
                    let cookie = client.aio_zero(n, at, CmdFlags::empty())?;
                    self.writes.insert(cookie, (at, Bytes::new()));
                    at += n;
                }
            }
            Dest::Nbd {
                can_zero: false, ..
            } => {
                let mut at = offset;
                while at < offset + length {
                    let n = (offset + length - at).min(self.zeroes.len() as u64) as usize;
                    let piece = self.zeroes.slice(..n);
                    self.write_data(at, piece)?;
                    at += n as u64;
                }
            }
            // A new local file is sparse: unwritten bytes already read as zero.
            Dest::File(_) | Dest::Null => {}
            Dest::Stdout { .. } => self.emit(offset, Piece::Zero(length))?,
        }
        Ok(())
    }

    /// Standard output must stay in order while replies arrive in any order.
    fn emit(&mut self, offset: u64, piece: Piece) -> Result<(), Error> {
        let zeroes = self.zeroes.clone();
        let Dest::Stdout { out, next, waiting } = &mut self.dst else {
            unreachable!("only for standard output")
        };
        waiting.insert(offset, piece);
        while let Some(piece) = waiting.remove(next) {
            match piece {
                Piece::Data(data) => {
                    out.write_all(&data)?;
                    *next += data.len() as u64;
                }
                Piece::Zero(mut left) => {
                    while left > 0 {
                        let n = left.min(zeroes.len() as u64) as usize;
                        out.write_all(&zeroes[..n])?;
                        left -= n as u64;
                        *next += n as u64;
                    }
                }
            }
        }
        Ok(())
    }

    fn recycle(&mut self, data: Bytes) {
        if let Ok(buf) = data.try_into_mut() {
            self.spare.push(buf);
        }
    }

    /// Waits until some socket can move, or a deadline passes: with no
    /// `--timeout` as long as the servers take (there is no built-in limit);
    /// with it, a server silent for that long with requests pending ends the
    /// copy with a message naming its side.
    fn wait(&mut self) -> Result<(), Error> {
        let mut clients: Vec<&mut Client> = Vec::with_capacity(2);
        if let Source::Nbd { client, .. } = &mut self.src {
            clients.push(client);
        }
        if let Dest::Nbd { client, .. } = &mut self.dst {
            clients.push(client);
        }
        if clients.is_empty() {
            return Ok(());
        }
        let result = Client::poll_many(&mut clients, None);
        if let Source::Nbd { client, .. } = &mut self.src {
            crate::retries::report("source", client);
        }
        if let Dest::Nbd { client, .. } = &mut self.dst {
            crate::retries::report("destination", client);
        }
        result.map(drop)
    }

    /// A `--timeout` that ended a connection, named by its side (the copy's
    /// errors pass here on their way out).
    fn explain_stall(&self, e: Error) -> Error {
        let stalled = |c: &Client| c.connection().error().is_some();
        match (&self.src, &self.dst) {
            (Source::Nbd { client, .. }, _) if stalled(client) => {
                crate::deadline::explain(e, "source", "replies to reads and extent queries")
            }
            (_, Dest::Nbd { client, .. }) if stalled(client) => {
                crate::deadline::explain(e, "destination", "replies to writes")
            }
            _ => e,
        }
    }

    fn finish(self, flush: bool) -> Result<(), Error> {
        if let Source::Nbd { client, .. } = self.src {
            client.shutdown()?;
        }
        match self.dst {
            Dest::Nbd { mut client, .. } => {
                if flush && client.connection().can_flush()? {
                    client
                        .flush(CmdFlags::empty())
                        .map_err(|e| crate::deadline::explain(e, "destination", "the flush"))?;
                }
                client.shutdown()?;
            }
            Dest::File(file) => {
                if flush {
                    file.sync_all()?;
                }
            }
            Dest::Stdout {
                mut out, waiting, ..
            } => {
                if !waiting.is_empty() {
                    return Err(fail("internal error: data left unwritten".into()));
                }
                out.flush()?;
            }
            Dest::Null => {}
        }
        Ok(())
    }
}

/// An error of connecting to one side: a `--timeout` that passed names the side.
fn on_side(side: &str, e: Error) -> Error {
    match e {
        Error::Io(io) if io.kind() == io::ErrorKind::TimedOut => {
            Error::Io(io::Error::new(io.kind(), format!("{side} {io}")))
        }
        other => other,
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut Box<dyn Read>, buf: &mut [u8]) -> io::Result<usize> {
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
