//! `nbd copy SRC DST`: NBD exports, local files, stdin/stdout and `null:`.
//!
//! Reads from an NBD source run with many requests in flight; writes to an NBD
//! destination likewise. The number of buffers in use is bounded by
//! `--requests`: a new read starts only when a buffer is free. Any failed read
//! or write fails the copy: nothing is reported done that the server did not
//! acknowledge.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Cookie};

use crate::size::parse_size;

/// Options of `nbd copy`.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// Source: an NBD URI, a local file, or `-` for standard input.
    pub src: String,
    /// Destination: an NBD URI, a local file, `-` for standard output, or `null:`.
    pub dst: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub requests: u32,
    /// Size of each request (suffixes K, M allowed).
    #[arg(long, default_value = "256K", value_parser = parse_request_size)]
    pub request_size: u64,
    /// Flush the destination before finishing.
    #[arg(long)]
    pub flush: bool,
}

fn parse_request_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 || n > 32 << 20 {
        return Err(format!("request size must be between 1 and 32M, not {s}"));
    }
    Ok(n)
}

fn is_uri(s: &str) -> bool {
    s.starts_with("nbd") && s.contains("://")
}

enum Source {
    Nbd(Box<Client>),
    Stream(Box<dyn Read>),
}

enum Dest {
    Nbd(Box<Client>),
    File(File),
    Stdout {
        out: io::Stdout,
        next: u64,
        waiting: BTreeMap<u64, Bytes>,
    },
    Null,
}

fn fail(msg: String) -> Error {
    Error::Io(io::Error::other(msg))
}

/// Runs `nbd copy`.
pub fn run(args: &CopyArgs) -> Result<ExitCode, Error> {
    let (src, size) = open_source(&args.src)?;
    let dst = open_dest(&args.dst, size)?;
    let mut job = Copy {
        src,
        dst,
        size,
        requests: args.requests as usize,
        request_size: args.request_size as usize,
        next: 0,
        reads: HashMap::new(),
        writes: HashMap::new(),
        spare: Vec::new(),
    };
    job.run()?;
    job.finish(args.flush)?;
    Ok(ExitCode::SUCCESS)
}

fn open_source(spec: &str) -> Result<(Source, Option<u64>), Error> {
    if is_uri(spec) {
        let client = Client::connect_uri(spec)?;
        let size = client.size()?;
        return Ok((Source::Nbd(Box::new(client)), Some(size)));
    }
    if spec == "-" {
        return Ok((Source::Stream(Box::new(io::stdin())), None));
    }
    let file = File::open(spec).map_err(|e| fail(format!("{spec}: {e}")))?;
    let size = file.metadata()?.len();
    Ok((Source::Stream(Box::new(file)), Some(size)))
}

fn open_dest(spec: &str, size: Option<u64>) -> Result<Dest, Error> {
    if spec == "null:" {
        return Ok(Dest::Null);
    }
    if spec == "-" {
        return Ok(Dest::Stdout {
            out: io::stdout(),
            next: 0,
            waiting: BTreeMap::new(),
        });
    }
    if is_uri(spec) {
        let client = Client::connect_uri(spec)?;
        if client.connection().is_read_only()? {
            return Err(
                nbd_proto::Error::ReadOnly(format!("destination {spec} is read-only")).into(),
            );
        }
        let dst_size = client.size()?;
        if let Some(size) = size {
            if size > dst_size {
                return Err(fail(format!(
                    "destination size {dst_size} is smaller than the source size {size}"
                )));
            }
        }
        return Ok(Dest::Nbd(Box::new(client)));
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(spec)
        .map_err(|e| fail(format!("{spec}: {e}")))?;
    if let Some(size) = size {
        file.set_len(size)?;
    }
    Ok(Dest::File(file))
}

struct Copy {
    src: Source,
    dst: Dest,
    size: Option<u64>,
    requests: usize,
    request_size: usize,
    /// Offset of the next read.
    next: u64,
    /// Reads in flight on an NBD source.
    reads: HashMap<Cookie, u64>,
    /// Writes in flight on an NBD destination, with their data kept to reuse its buffer.
    writes: HashMap<Cookie, (u64, Bytes)>,
    spare: Vec<BytesMut>,
}

impl Copy {
    fn buffers_in_use(&self) -> usize {
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
            while !source_done && self.buffers_in_use() < self.requests {
                source_done = !self.start_read()?;
            }
            self.collect()?;
            if source_done && self.buffers_in_use() == 0 {
                return Ok(());
            }
            self.wait()?;
        }
    }

    /// Starts (or, for a stream, does) one read; false when the source is exhausted.
    fn start_read(&mut self) -> Result<bool, Error> {
        if self.size.is_some_and(|s| self.next >= s) {
            return Ok(false);
        }
        let len = match self.size {
            Some(s) => (s - self.next).min(self.request_size as u64) as usize,
            None => self.request_size,
        };
        let mut buf = self.buffer(len);
        let offset = self.next;
        match &mut self.src {
            Source::Nbd(client) => {
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

    /// Takes finished reads and writes, checking each result.
    fn collect(&mut self) -> Result<(), Error> {
        if let Source::Nbd(client) = &mut self.src {
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
                self.write(
                    offset,
                    c.buffer.expect("reads return their buffer").freeze(),
                )?;
            }
        }
        if let Dest::Nbd(client) = &mut self.dst {
            while let Some(c) = client.next_completion() {
                let (offset, data) = self
                    .writes
                    .remove(&c.cookie)
                    .expect("a write this copy started");
                c.result
                    .map_err(|e| fail(format!("write at offset {offset} failed: {e}")))?;
                if let Ok(buf) = data.try_into_mut() {
                    self.spare.push(buf);
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: Bytes) -> Result<(), Error> {
        match &mut self.dst {
            Dest::Nbd(client) => {
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
            Dest::Stdout { out, next, waiting } => {
                // Replies arrive in any order; standard output must stay in order.
                waiting.insert(offset, data);
                while let Some(piece) = waiting.remove(next) {
                    out.write_all(&piece)?;
                    *next += piece.len() as u64;
                }
            }
            Dest::Null => self.recycle(data),
        }
        Ok(())
    }

    fn recycle(&mut self, data: Bytes) {
        if let Ok(buf) = data.try_into_mut() {
            self.spare.push(buf);
        }
    }

    /// Waits until some socket can move.
    fn wait(&mut self) -> Result<(), Error> {
        let timeout = Some(Duration::from_secs(60));
        let mut clients: Vec<&mut Client> = Vec::with_capacity(2);
        if let Source::Nbd(c) = &mut self.src {
            clients.push(c);
        }
        if let Dest::Nbd(c) = &mut self.dst {
            clients.push(c);
        }
        if clients.is_empty() {
            return Ok(());
        }
        if !Client::poll_many(&mut clients, timeout)? {
            return Err(Error::TimedOut);
        }
        Ok(())
    }

    fn finish(self, flush: bool) -> Result<(), Error> {
        if let Source::Nbd(client) = self.src {
            client.shutdown()?;
        }
        match self.dst {
            Dest::Nbd(mut client) => {
                if flush && client.connection().can_flush()? {
                    client.flush()?;
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
