//! `nbd copy SRC DST`: NBD exports, server programs, local files, block
//! devices, stdin/stdout and `null:`, with nbdcopy's options.
//!
//! The export is split into pieces ([`plan`]) that several workers copy at
//! once ([`worker`]), each over its own connections where both ends allow
//! (multi-conn, local files), each with many requests in flight. Streams
//! (stdin, stdout, pipes), server programs, exports without multi-conn and
//! `--synchronous` get one worker.
//!
//! Where the source is an NBD export with `base:allocation`, runs it reports as
//! zero are not read at all; and with `--sparse N`, all-zero blocks of N bytes in
//! what was read are not written either. Either way the destination gets zeroes
//! the cheap way: a zero request on an NBD export, a punched hole in a file,
//! `BLKZEROOUT` on a block device, nothing on a file just created. With
//! `--changed=CONTEXT` only the runs a dirty bitmap marks are copied, into
//! a destination that keeps the rest: an incremental backup.
//!
//! Any failed read or write fails the copy, naming the side, the offset and
//! the cause: nothing is reported done that was not.

mod changes;
mod close;
mod crew;
mod local;
mod open;
mod ordered;
mod plan;
mod progress;
mod side;
mod window;
mod worker;

use std::io;
use std::process::ExitCode;
use std::thread;

use nbd_blocking::{Client, Error};

use crate::operand::{self, Operand};
use crate::size::parse_size;
use plan::Plan;
use worker::Settings;

/// Options of `nbd copy`, as nbdcopy's.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// Source, then destination. The source is an NBD URI, a local file or
    /// block device, or `-` for standard input; the destination an NBD URI,
    /// a local file or block device, `-` for standard output, or `null:`.
    /// Either may be, after `--`, `[ CMD ARGS ... ]`: a server program started
    /// by socket activation and stopped at the end.
    #[arg(value_name = "SRC DST", required = true)]
    pub operands: Vec<String>,
    /// Most NBD connections per side (multi-conn); default 4 where both ends
    /// allow it, else 1.
    #[arg(short = 'C', long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: Option<u32>,
    /// Most worker threads; 0 (the default) is one per processor, and never
    /// more than the connections.
    #[arg(short = 'T', long, default_value_t = 0)]
    pub threads: u32,
    /// Requests in flight at once, per connection.
    #[arg(short = 'R', long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub requests: u32,
    /// Size of each request (suffixes K, M allowed). Larger than
    /// nbdcopy's 256K: a server spends a quarter less CPU answering 1M
    /// requests, and the copy waits on the server when both are local.
    #[arg(long, default_value = "1M", value_parser = parse_request_size)]
    pub request_size: u64,
    /// Most bytes of requests in flight per connection. Default: two
    /// requests (2M) where both ends are near (Unix sockets, loopback),
    /// growing with the round trip the kernel measured, up to 16M for
    /// distant servers.
    #[arg(long, value_parser = parse_queue_size)]
    pub queue_size: Option<u64>,
    /// Write all-zero blocks of this size as zeroes the cheap way; 0 turns it
    /// off. Default: 4096, or the destination's preferred block size if larger.
    #[arg(short = 'S', long, value_parser = parse_size)]
    pub sparse: Option<u64>,
    /// The destination reads as zeroes already: zero runs are not written.
    #[arg(long, visible_alias = "target-is-zero")]
    pub destination_is_zero: bool,
    /// Leave no holes: zeroes are written allocated.
    #[arg(long)]
    pub allocated: bool,
    /// One request at a time over one connection, in order.
    #[arg(long)]
    pub synchronous: bool,
    /// Flush the destination before finishing.
    #[arg(long)]
    pub flush: bool,
    /// Read every byte of the source, ignoring its extents.
    #[arg(long)]
    pub no_extents: bool,
    /// Copy only the runs that this dirty-bitmap meta context of the source
    /// marks (for example `qemu:dirty-bitmap:backup-0`), into an existing
    /// destination whose other bytes are kept: an incremental backup.
    #[arg(long, value_name = "CONTEXT", conflicts_with = "no_extents")]
    pub changed: Option<String>,
    /// Show progress: `-p` a bar on standard error (when it is a terminal),
    /// `--progress=FD` lines `N/100` on file descriptor FD.
    #[arg(short = 'p', long, value_name = "FD", num_args = 0..=1, require_equals = true,
          default_missing_value = "")]
    pub progress: Option<String>,
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

fn parse_queue_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 || n > 1 << 30 {
        return Err(format!("queue size must be between 1 and 1G, not {s}"));
    }
    Ok(n)
}

impl CopyArgs {
    /// The two operands: source and destination.
    pub fn operands(&self) -> Result<[Operand; 2], String> {
        operand::exactly(&self.operands, ["SRC", "DST"])
    }

    /// Where progress goes, if anywhere.
    fn progress_target(&self) -> Result<Option<progress::Target>, Error> {
        match self.progress.as_deref() {
            None => Ok(None),
            Some("") => Ok(Some(progress::Target::Terminal)),
            Some(fd) => progress::parse_descriptor(fd)
                .map(|fd| Some(progress::Target::Descriptor(fd)))
                .map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e))),
        }
    }
}

/// The trace target of the copy's own lines.
const TRACE: &str = "nbd copy";

/// Nbdcopy's default block size of zero detection.
const DEFAULT_SPARSE: u64 = 4096;

/// Nbdcopy's default connection count where multi-conn is allowed.
const DEFAULT_CONNECTIONS: usize = 4;

/// Runs `nbd copy` from `src` to `dst`.
pub fn run(args: &CopyArgs, src: &Operand, dst: &Operand) -> Result<ExitCode, Error> {
    let progress_target = args.progress_target()?;
    // Take the descriptor before anything else can open files onto its number.
    let lines = match progress_target {
        Some(progress::Target::Descriptor(fd)) => Some(progress::Lines::open(fd)?),
        _ => None,
    };
    let changed = args.changed.as_deref();
    let (source, src_info) = open::source(src, changed, !args.no_extents)?;
    let (destination, dst_info) = open::destination(dst, src_info.size, changed.is_some())?;

    let workers = worker_count(args, source.max_workers.min(destination.max_workers));
    let settings = settings(args, &src_info, &dst_info);
    // With `nbd -v` (the protocol trace), how the copy runs and, at the end,
    // what it moved.
    log::debug!(
        target: TRACE,
        "{src} -> {dst}: size {}, multi-conn {} -> {}, {workers} worker(s), \
             {} request(s) of {} bytes, queue {} bytes, sparse {}, extents {:?}, \
             destination is zero: {}",
            src_info.size.map_or("unknown".into(), |s| s.to_string()),
            yes_no(src_info.multi_conn),
            yes_no(dst_info.multi_conn),
            settings.requests,
            settings.request_size,
            settings.queue_size,
            settings.sparse,
            settings.extents,
        settings.destination_is_zero,
    );

    let plan = Plan::new(src_info.size.unwrap_or(u64::MAX));
    let reporter = progress_target.map(|target| (target, lines));
    let results = crew::run(
        source,
        destination,
        &settings,
        &plan,
        src_info.size,
        reporter,
        workers,
    );

    let mut done = Vec::with_capacity(results.len());
    for result in results {
        done.push(result?);
    }
    let ran = done.len();
    let stats = close::finish(done, args.flush, src_info.size)?;
    log::debug!(
        target: TRACE,
        "{ran} worker(s) ran; read {} bytes from the source; wrote {}, \
         zeroed {}, left alone {} on the destination",
        stats.read, stats.written, stats.zeroed, stats.skipped
    );
    Ok(ExitCode::SUCCESS)
}

/// How many workers copy: one per connection pair, at most `-C` and `-T`
/// and what both ends allow; one under `--synchronous`.
fn worker_count(args: &CopyArgs, ends_allow: usize) -> usize {
    if args.synchronous {
        return 1;
    }
    let connections = args.connections.map_or(DEFAULT_CONNECTIONS, |c| c as usize);
    let threads = match args.threads {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    connections.min(threads).min(ends_allow).max(1)
}

/// The workers' settings, from the options and what the ends said.
fn settings(args: &CopyArgs, src: &open::SourceInfo, dst: &open::DestinationInfo) -> Settings {
    let request_size = (args.request_size as usize)
        .min(src.max_request)
        .min(dst.max_request);
    Settings {
        requests: if args.synchronous {
            1
        } else {
            args.requests as usize
        },
        queue_size: args.queue_size.unwrap_or_else(|| {
            window::default_window(&[src.round_trip, dst.round_trip], request_size as u64)
        }) as usize,
        request_size,
        sparse: args
            .sparse
            .unwrap_or(DEFAULT_SPARSE.max(dst.preferred_block)) as usize,
        extents: src.extents.clone(),
        allocated: args.allocated,
        destination_is_zero: args.destination_is_zero || dst.is_zero,
    }
}

fn yes_no(flag: Option<bool>) -> &'static str {
    match flag {
        Some(true) => "yes",
        Some(false) => "no",
        None => "n/a",
    }
}

/// Waits until some socket can move, or a deadline passes: with no
/// `--timeout` as long as the servers take (there is no built-in limit); with
/// it, a server silent for that long with requests pending ends its
/// connection, and the caller names the side.
fn wait(clients: &mut [&mut Client]) -> Result<(), Error> {
    Client::poll_many(clients, None).map(drop)
}
