//! A custom event loop that reads a whole export with many requests in flight
//! and prints a checksum of its contents.
//!
//! usage: read_export URI [IN_FLIGHT] [REQ_SIZE]
//!
//! Time: the connection's deadlines (10 s for connect and handshake, 30 s of
//! silence from the server while reads are in flight) are kept by the core;
//! the loop only sleeps in `Poll::poll` until `Client::poll_timeout` at most
//! and calls `Client::handle_timeout` after every wake-up, which returns the
//! error once a deadline has ended the connection.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Poll, Token};
use nbd_mio::Client;
use nbd_proto::{CmdFlags, Config};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let uri = args
        .first()
        .ok_or("usage: read_export URI [IN_FLIGHT] [REQ_SIZE]")?;
    let in_flight: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let req: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1 << 20);

    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(16);
    let config = Config::default()
        .handshake_timeout(Some(Duration::from_secs(10)))
        .stall_timeout(Some(Duration::from_secs(30)));
    let mut client = Client::connect_uri(uri, config, poll.registry(), Token(7))?;
    while !client.connection().is_ready() {
        // Never past the handshake's deadline.
        poll.poll(&mut events, client.poll_timeout())?;
        for e in events.iter() {
            // Returns the connection's error if the handshake failed.
            client.handle_event(e)?;
        }
        // Returns the core's TimedOut error once the 10 s have passed.
        client.handle_timeout(Instant::now())?;
        if client.is_closed() {
            return Err("the connection closed before it was ready".into());
        }
    }
    let size = client.connection().size()?;

    // Fletcher-style sum over 64-bit words, folded in offset order.
    let mut sums = std::collections::BTreeMap::new();
    let mut next = 0u64;
    loop {
        // Completions first: the room they free is filled before waiting.
        while let Some(done) = client.next_completion() {
            done.result?;
            let buf = done.buffer.expect("reads return their buffer");
            let sum = buf
                .iter()
                .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
            sums.insert(done.cookie, sum);
        }
        while next < size && client.in_flight() < in_flight {
            let n = (size - next).min(req);
            client.aio_pread(BytesMut::zeroed(n as usize), next, CmdFlags::empty())?;
            next += n;
        }
        client.send()?;
        if client.in_flight() == 0 {
            // Everything was read, and nothing is left to wait for.
            break;
        }
        // Wakes for readiness, or for the stall deadline.
        poll.poll(&mut events, client.poll_timeout())?;
        for e in events.iter() {
            if e.token() == client.token() {
                // Returns the connection's error if it ended.
                client.handle_event(e)?;
            }
        }
        // A server silent for 30 s with reads in flight ends here, with its error.
        client.handle_timeout(Instant::now())?;
    }
    let total = sums.values().fold(0u64, |a, s| a ^ s);
    println!(
        "read {size} bytes in {} requests, checksum {total:016x}",
        sums.len()
    );
    client.aio_disconnect()?;
    while !client.is_closed() {
        poll.poll(&mut events, Some(Duration::from_secs(10)))?;
        if events.is_empty() {
            return Err("the server did not close the connection after NBD_CMD_DISC".into());
        }
        for e in events.iter() {
            client.handle_event(e)?;
        }
    }
    Ok(())
}
