//! One mio loop serving three things at once: an NBD connection copying an export
//! in the background, a TCP echo listener on loopback, and a once-a-second timer
//! (the poll timeout). Shows that the NBD client is just another source.
//!
//! usage: side_by_side URI
//! Then, while it runs: `nc 127.0.0.1 PORT` (the port is printed) and type.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use nbd_mio::Client;
use nbd_proto::{CmdFlags, Config};

const NBD: Token = Token(0);
const LISTENER: Token = Token(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let uri = std::env::args().nth(1).ok_or("usage: side_by_side URI")?;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(64);
    let mut nbd = Client::connect_uri(&uri, Config::default(), poll.registry(), NBD)?;
    let mut listener = TcpListener::bind("127.0.0.1:0".parse()?)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("echo server on {}", listener.local_addr()?);

    let mut peers: HashMap<Token, TcpStream> = HashMap::new();
    let mut next_token = 2;
    let mut tick = Instant::now();
    let (mut next, mut read_bytes) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if nbd.connection().is_ready() {
            let size = nbd.connection().size()?;
            while next < size && nbd.in_flight() < 8 {
                let n = (size - next).min(256 * 1024);
                nbd.aio_pread(BytesMut::zeroed(n as usize), next, CmdFlags::empty())?;
                next += n;
            }
            nbd.send()?;
        }
        poll.poll(
            &mut events,
            Some(Duration::from_millis(1000).saturating_sub(tick.elapsed())),
        )?;
        for e in events.iter() {
            match e.token() {
                NBD => nbd.handle_event(e)?,
                LISTENER => loop {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let t = Token(next_token);
                            next_token += 1;
                            poll.registry().register(&mut s, t, Interest::READABLE)?;
                            peers.insert(t, s);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                },
                t => {
                    let mut closed = false;
                    if let Some(s) = peers.get_mut(&t) {
                        let mut buf = [0u8; 4096];
                        loop {
                            match s.read(&mut buf) {
                                Ok(0) => {
                                    closed = true;
                                    break;
                                }
                                Ok(n) => s.write_all(&buf[..n])?,
                                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                Err(e) => return Err(e.into()),
                            }
                        }
                    }
                    if closed {
                        peers.remove(&t);
                    }
                }
            }
        }
        while let Some(done) = nbd.next_completion() {
            done.result?;
            read_bytes += done.buffer.map_or(0, |b| b.len() as u64);
        }
        if tick.elapsed() >= Duration::from_secs(1) {
            tick = Instant::now();
            println!(
                "tick: {read_bytes} bytes read from NBD, {} echo peers",
                peers.len()
            );
        }
    }
    println!("done: {read_bytes} bytes read from NBD");
    Ok(())
}
