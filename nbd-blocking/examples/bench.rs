//! Side-by-side benchmark client, the counterpart of shared/bench/libnbd_bench.c.
//!
//! usage: bench URI MODE [REQ_SIZE] [IN_FLIGHT]
//! - read / write: the whole export sequentially, IN_FLIGHT requests of REQ_SIZE at once;
//! - qd1: 4 KiB reads one at a time over the first 64 MiB for 3 s.
//!
//! Prints one line in libnbd_bench's format.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use nbd_blocking::Client;
use nbd_proto::CmdFlags;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: bench URI read|write|qd1 [REQ_SIZE] [IN_FLIGHT]");
        std::process::exit(2);
    }
    let mode = args[2].as_str();
    let req: usize = args
        .get(3)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(256 * 1024);
    let inflight: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let mut client = Client::connect_uri(&args[1])?;
    let size = client.size()?;
    match mode {
        "qd1" => qd1(&mut client, size)?,
        "read" | "write" => stream(&mut client, size, mode == "write", req, inflight)?,
        other => return Err(format!("unknown mode {other}").into()),
    }
    client.shutdown()?;
    Ok(())
}

fn qd1(client: &mut Client, size: u64) -> Result<(), Box<dyn std::error::Error>> {
    let span = size.min(64 << 20) / 4096;
    let mut buf = BytesMut::zeroed(4096);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut ops = 0u64;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < 3.0 {
        for _ in 0..100 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let offset = (seed % span) * 4096;
            buf = client.pread(buf, offset, CmdFlags::empty())?;
            ops += 1;
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "qd1 ops {ops} seconds {dt:.3} ops_per_s {:.0}",
        ops as f64 / dt
    );
    Ok(())
}

fn stream(
    client: &mut Client,
    size: u64,
    writing: bool,
    req: usize,
    inflight: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    // Each slot's buffer is reused: reads get theirs back in the completion,
    // writes share one refcounted payload per slot.
    let payloads: Vec<Bytes> = (0..inflight)
        .map(|i| Bytes::from(vec![i as u8 + 1; req]))
        .collect();
    let mut free_bufs: Vec<BytesMut> = (0..inflight).map(|_| BytesMut::zeroed(req)).collect();
    let mut next = 0u64;
    let mut slot = 0usize;
    // Counted here rather than with in_flight(): a finished command still holds
    // its buffer until its completion is taken.
    let mut outstanding = 0usize;
    let t0 = Instant::now();
    loop {
        // Take what finished before deciding anything: one poll can complete
        // every command in flight, and the slots it frees must be refilled
        // before the next poll, or that poll would wait with nothing in flight.
        while let Some(done) = client.next_completion() {
            done.result?;
            outstanding -= 1;
            if let Some(mut buf) = done.buffer {
                buf.resize(req, 0);
                free_bufs.push(buf);
            }
        }
        while next < size && outstanding < inflight {
            let n = (size - next).min(req as u64) as usize;
            if writing {
                let data = payloads[slot % inflight].slice(..n);
                client.aio_pwrite(data, next, CmdFlags::empty())?;
            } else {
                let mut buf = free_bufs.pop().expect("one buffer per slot");
                buf.truncate(n);
                client.aio_pread(buf, next, CmdFlags::empty())?;
            }
            slot += 1;
            outstanding += 1;
            next += n as u64;
        }
        if outstanding == 0 {
            break;
        }
        client.poll(None)?;
    }
    let dt = t0.elapsed().as_secs_f64();
    let mode = if writing { "write" } else { "read" };
    println!(
        "{mode} bytes {size} seconds {dt:.3} GB_per_s {:.3}",
        size as f64 / dt / 1e9
    );
    Ok(())
}
