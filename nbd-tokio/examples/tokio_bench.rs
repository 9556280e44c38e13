//! Side-by-side benchmark client over nbd-tokio, the counterpart of
//! shared/bench/libnbd_bench.c, with multi-conn.
//!
//! usage: tokio_bench [--connections N] URI MODE [REQ_SIZE] [IN_FLIGHT]
//! MODE is read, write or qd1; IN_FLIGHT counts requests over all connections.
//! Prints one line in libnbd_bench's format.
//!
//! IN_FLIGHT tasks share one `MultiConn` (one `Client` when N is 1), each
//! awaiting one command at a time, on a single-threaded runtime: the shape
//! of an application with many tasks on one connection, and the one
//! closest to libnbd_bench's single-threaded aio loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Config};
use nbd_tokio::MultiConn;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// How long the qd1 mode runs.
const QD1_TIME: Duration = Duration::from_secs(3);

fn main() -> Res<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut connections = 1;
    if args.first().map(String::as_str) == Some("--connections") {
        connections = args.get(1).ok_or("--connections needs a number")?.parse()?;
        args.drain(..2);
    }
    if args.len() < 2 {
        eprintln!("usage: tokio_bench [--connections N] URI read|write|qd1 [REQ_SIZE] [IN_FLIGHT]");
        std::process::exit(2);
    }
    let req: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(256 * 1024);
    let inflight: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(&args[0], &args[1], connections, req, inflight))
}

async fn bench(uri: &str, mode: &str, connections: usize, req: usize, inflight: usize) -> Res<()> {
    let group = MultiConn::connect_uri(uri, connections, Config::default()).await?;
    let size = group.size()?;
    let (inflight, req, writing) = match mode {
        "qd1" => (1, 4096, false),
        "read" => (inflight.max(1), req, false),
        "write" => (inflight.max(1), req, true),
        other => return Err(format!("unknown mode {other}").into()),
    };
    let span = if mode == "qd1" {
        size.min(64 << 20)
    } else {
        size
    };
    // The next offset to take, shared by the tasks.
    let next = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..inflight {
        let group = group.clone();
        let next = next.clone();
        let ops = ops.clone();
        let qd1 = mode == "qd1";
        tasks.spawn(async move {
            let payload = Bytes::from(vec![i as u8 + 1; req]);
            let mut buf = BytesMut::zeroed(req);
            let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
            loop {
                let (offset, n) = if qd1 {
                    if t0.elapsed() >= QD1_TIME {
                        break;
                    }
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed % (span / 4096)) * 4096, 4096)
                } else {
                    let at = next.fetch_add(req as u64, Ordering::Relaxed);
                    if at >= span {
                        break;
                    }
                    (at, (span - at).min(req as u64) as usize)
                };
                if writing {
                    group
                        .pwrite(payload.slice(..n), offset, CmdFlags::empty())
                        .await?;
                } else {
                    buf.resize(n, 0);
                    buf = group.pread(buf, offset, CmdFlags::empty()).await?;
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), nbd_tokio::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let dt = t0.elapsed().as_secs_f64();
    let ops = ops.load(Ordering::Relaxed);
    if mode == "qd1" {
        println!(
            "qd1 ops {ops} seconds {dt:.3} ops_per_s {:.0}",
            ops as f64 / dt
        );
    } else {
        println!(
            "{mode} bytes {size} seconds {dt:.3} GB_per_s {:.3}",
            size as f64 / dt / 1e9
        );
    }
    // A graceful end: every connection closes once the server has it.
    group.shutdown().await?;
    Ok(())
}
