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
mod local;
mod open;
mod ordered;
mod plan;
mod progress;
mod side;
mod worker;

use std::io;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use nbd_blocking::{Client, Error};
use nbd_proto::CmdFlags;

use crate::operand::{self, Operand};
use crate::size::parse_size;
use plan::Plan;
use progress::Counter;
use side::Side;
use worker::{Destination, Done, Settings, Source, Stats, Worker};

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
    /// Size of each request (suffixes K, M allowed).
    #[arg(long, default_value = "256K", value_parser = parse_request_size)]
    pub request_size: u64,
    /// Most bytes of requests in flight per connection.
    #[arg(long, default_value = "16M", value_parser = parse_queue_size)]
    pub queue_size: u64,
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
    /// Say on standard error how the copy runs and what it moved.
    #[arg(short = 'v', long)]
    pub verbose: bool,
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

    let workers = if args.synchronous {
        1
    } else {
        let connections = args.connections.map_or(DEFAULT_CONNECTIONS, |c| c as usize);
        let threads = match args.threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        connections
            .min(threads)
            .min(source.max_workers)
            .min(destination.max_workers)
            .max(1)
    };
    let settings = Settings {
        requests: if args.synchronous {
            1
        } else {
            args.requests as usize
        },
        queue_size: args.queue_size as usize,
        request_size: (args.request_size as usize)
            .min(src_info.max_request)
            .min(dst_info.max_request),
        sparse: args
            .sparse
            .unwrap_or(DEFAULT_SPARSE.max(dst_info.preferred_block)) as usize,
        extents: src_info.extents.clone(),
        allocated: args.allocated,
        destination_is_zero: args.destination_is_zero || dst_info.is_zero,
    };
    if args.verbose {
        eprintln!(
            "nbd copy: {src} -> {dst}: size {}, multi-conn {} -> {}, {workers} worker(s), \
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
    }

    let plan = Plan::new(src_info.size.unwrap_or(u64::MAX));
    let counter = Counter::default();
    let results =
        thread::scope(|scope| {
            let reporter = match (progress_target, src_info.size) {
                (Some(target), Some(total)) => {
                    let counter = &counter;
                    Some(scope.spawn(move || progress::report(target, total, counter, lines)))
                }
                _ => None,
            };
            let (settings, plan, counter) = (&settings, &plan, &counter);
            let size = src_info.size;
            let (src_again, dst_again) = (&source.again, &destination.again);
            let helpers: Vec<_> = (1..workers)
                .map(|_| {
                    scope.spawn(move || {
                        let ends = src_again
                            .source()
                            .and_then(|s| Ok((s, dst_again.destination()?)));
                        match ends {
                            Ok((s, d)) => Worker::new(s, d, settings, plan, counter, size).run(),
                            Err(e) => {
                                plan.fail();
                                Err(e)
                            }
                        }
                    })
                })
                .collect();
            let first = Worker::new(
                source.first,
                destination.first,
                settings,
                plan,
                counter,
                size,
            );
            let mut results = vec![first.run()];
            for helper in helpers {
                results.push(helper.join().unwrap_or_else(|_| {
                    Err(Error::Io(io::Error::other("a copy worker panicked")))
                }));
            }
            counter.finish();
            if let Some(reporter) = reporter {
                reporter.thread().unpark();
                // The reporter only sleeps and prints; if it panicked the copy stands.
                let _ = reporter.join();
            }
            results
        });

    let mut done = Vec::with_capacity(results.len());
    for result in results {
        done.push(result?);
    }
    let stats = finish(done, args.flush, src_info.size)?;
    if args.verbose {
        eprintln!(
            "nbd copy: read {} bytes from the source; wrote {}, zeroed {}, left alone {} \
             on the destination",
            stats.read, stats.written, stats.zeroed, stats.skipped
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn yes_no(flag: Option<bool>) -> &'static str {
    match flag {
        Some(true) => "yes",
        Some(false) => "no",
        None => "n/a",
    }
}

/// Flushes the destination if asked, closes every connection cleanly, and
/// sums what the workers moved.
fn finish(done: Vec<Done>, flush: bool, size: Option<u64>) -> Result<Stats, Error> {
    let mut stats = Stats::default();
    let mut flushed = false;
    for worker in done {
        stats += worker.stats;
        if let Source::Nbd(client) = worker.src {
            client
                .shutdown()
                .map_err(|e| side::named(Side::Source, e))?;
        }
        match worker.dst {
            Destination::Nbd { mut client, .. } => {
                // Every worker has finished, so one flush covers all the
                // connections' writes (the multi-conn promise).
                if flush && !flushed && client.connection().can_flush()? {
                    client
                        .flush(CmdFlags::empty())
                        .map_err(|e| side::named(Side::Destination, format!("flush: {e}")))?;
                    flushed = true;
                }
                client
                    .shutdown()
                    .map_err(|e| side::named(Side::Destination, e))?;
            }
            Destination::Local(file, _) => {
                if size.is_none() {
                    // A stream of unknown length: the file is as long as it was.
                    file.set_len(stats.read)
                        .map_err(|e| side::named(Side::Destination, e))?;
                }
                if flush && !flushed {
                    file.sync()
                        .map_err(|e| side::named(Side::Destination, format!("flush: {e}")))?;
                    flushed = true;
                }
            }
            Destination::Stream(mut out) => out
                .finish()
                .map_err(|e| side::named(Side::Destination, e))?,
            Destination::Null => {}
        }
    }
    Ok(stats)
}

/// Waits until some socket can move.
fn wait(clients: &mut [&mut Client]) -> Result<(), Error> {
    let timeout = Some(Duration::from_secs(60));
    if !Client::poll_many(clients, timeout)? {
        return Err(Error::TimedOut);
    }
    Ok(())
}
