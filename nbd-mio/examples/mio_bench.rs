//! Side-by-side benchmark client over nbd-mio, the counterpart of
//! shared/bench/libnbd_bench.c, with multi-conn.
//!
//! usage: mio_bench [--connections N] URI MODE [REQ_SIZE] [IN_FLIGHT]
//! MODE is read, write or qd1; IN_FLIGHT counts requests over all connections.
//! Prints one line in libnbd_bench's format.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::{Events, Poll, Token};
use nbd_mio::MultiConn;
use nbd_proto::{CmdFlags, Config};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut connections = 1;
    if args.first().map(String::as_str) == Some("--connections") {
        connections = args.get(1).ok_or("--connections needs a number")?.parse()?;
        args.drain(..2);
    }
    if args.len() < 2 {
        eprintln!("usage: mio_bench [--connections N] URI read|write|qd1 [REQ_SIZE] [IN_FLIGHT]");
        std::process::exit(2);
    }
    let mode = args[1].as_str();
    let req: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(256 * 1024);
    let inflight: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(64);

    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(64);
    let mut group = MultiConn::connect_uri(
        &args[0],
        connections,
        Config::default(),
        poll.registry(),
        Token(0),
    )?;
    while !group.is_ready()? {
        poll.poll(&mut events, Some(Duration::from_secs(10)))?;
        if events.is_empty() {
            return Err("no answer from the server for 10 s during the handshake".into());
        }
        for e in events.iter() {
            // Returns a connection's error if its handshake failed.
            group.handle_event(e)?;
        }
    }
    let size = group.clients()[0].connection().size()?;
    let (inflight, req, writing) = match mode {
        "qd1" => (1, 4096, false),
        "read" => (inflight, req, false),
        "write" => (inflight, req, true),
        other => return Err(format!("unknown mode {other}").into()),
    };
    let span = if mode == "qd1" {
        size.min(64 << 20)
    } else {
        size
    };

    let payloads: Vec<Bytes> = (0..inflight)
        .map(|i| Bytes::from(vec![i as u8 + 1; req]))
        .collect();
    let mut free: Vec<BytesMut> = (0..inflight).map(|_| BytesMut::zeroed(req)).collect();
    let mut outstanding = 0usize;
    let mut next = 0u64;
    let mut ops = 0u64;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let t0 = Instant::now();
    loop {
        // Take what finished first: the slots it frees are refilled before
        // the next wait, so the loop never waits with nothing in flight.
        while let Some(done) = group.next_completion() {
            done.result?;
            outstanding -= 1;
            ops += 1;
            if let Some(mut buf) = done.buffer {
                buf.resize(req, 0);
                free.push(buf);
            }
        }
        let more = if mode == "qd1" {
            t0.elapsed() < Duration::from_secs(3)
        } else {
            next < span
        };
        while more && outstanding < inflight && (mode == "qd1" || next < span) {
            let (offset, n) = if mode == "qd1" {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed % (span / 4096)) * 4096, 4096)
            } else {
                let n = (span - next).min(req as u64) as usize;
                let at = next;
                next += n as u64;
                (at, n)
            };
            if writing {
                group.aio_pwrite(
                    payloads[outstanding % inflight].slice(..n),
                    offset,
                    CmdFlags::empty(),
                )?;
            } else {
                let mut buf = free.pop().expect("one buffer per request in flight");
                buf.truncate(n);
                group.aio_pread(buf, offset, CmdFlags::empty())?;
            }
            outstanding += 1;
        }
        group.send()?;
        if outstanding == 0 {
            break;
        }
        if group.in_flight() == 0 {
            // Every request has completed, so waiting could only hang.
            return Err("internal error: requests outstanding but none in flight".into());
        }
        poll.poll(&mut events, None)?;
        for e in events.iter() {
            group.handle_event(e)?;
        }
    }
    let dt = t0.elapsed().as_secs_f64();
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
    // A graceful end: the connections close once the server has them.
    group.aio_disconnect()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !group.is_closed() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the server did not close the connections after NBD_CMD_DISC".into());
        }
        poll.poll(&mut events, Some(left))?;
        for e in events.iter() {
            group.handle_event(e)?;
        }
    }
    Ok(())
}
