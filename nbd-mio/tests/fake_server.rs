//! nbd-mio's own test, with no server process: the client in a mio loop
//! against `nbd_testkit`'s in-memory server over a socket pair, replies out
//! of order and split into chunks, checked byte for byte against the image.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::{Events, Poll, Token};
use nbd_io::Socket;
use nbd_mio::Client;
use nbd_proto::{CmdFlags, Completion, Config};
use nbd_testkit::{spawn_unix, FakeServer, Rng};

const SIZE: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(30);

/// Runs the loop until `done` holds; panics if that takes longer than [`LIMIT`].
fn run(
    poll: &mut Poll,
    client: &mut Client,
    what: &str,
    mut done: impl FnMut(&mut Client) -> bool,
) {
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + LIMIT;
    while !done(client) {
        assert!(Instant::now() < deadline, "{what}: no end within {LIMIT:?}");
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for event in events.iter() {
            client.handle_event(event).unwrap();
        }
    }
}

#[test]
fn writes_then_reads_in_flight_together_match_the_image() {
    let server = FakeServer::builder()
        .size(SIZE)
        .extended(true)
        .chaotic()
        .seed(11)
        .build();
    let (client_end, thread) = spawn_unix(server).unwrap();
    let mut poll = Poll::new().unwrap();
    let socket = Socket::from_fd(client_end.into(), "fake server");
    let mut client =
        Client::connect_socket(socket, Config::default(), poll.registry(), Token(0)).unwrap();
    run(&mut poll, &mut client, "handshake", |c| {
        c.connection().is_ready()
    });

    let mut rng = Rng::new(Rng::seed_from_env(0x6d10));
    let mut model = vec![0u8; SIZE as usize];
    for slot in 0..64u64 {
        let offset = slot * 16384 + rng.below(4096);
        let len = rng.size(8192);
        let data = rng.bytes(len);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        client
            .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
            .unwrap();
    }
    client.send().unwrap();
    let mut done: Vec<Completion> = Vec::new();
    run(&mut poll, &mut client, "64 writes", |c| {
        while let Some(d) = c.next_completion() {
            done.push(d);
        }
        done.len() == 64
    });
    assert!(done.iter().all(|d| d.result.is_ok()));

    let mut reads = Vec::new();
    for _ in 0..64 {
        let offset = rng.below(SIZE - 16384);
        let len = 1 + rng.below(16384) as usize;
        let cookie = client
            .aio_pread(BytesMut::zeroed(len), offset, CmdFlags::empty())
            .unwrap();
        reads.push((cookie, offset, len));
    }
    client.send().unwrap();
    let mut got = Vec::new();
    run(&mut poll, &mut client, "64 reads", |c| {
        while let Some(d) = c.next_completion() {
            got.push(d);
        }
        got.len() == 64
    });
    for d in got {
        let (_, offset, len) = *reads.iter().find(|r| r.0 == d.cookie).unwrap();
        d.result.unwrap();
        let buf = d.buffer.unwrap();
        assert!(
            buf[..] == model[offset as usize..offset as usize + len],
            "read of {len} at {offset} differs"
        );
    }
    client.aio_disconnect().unwrap();
    run(&mut poll, &mut client, "close", |c| c.is_closed());
    let server = thread.join().unwrap().unwrap();
    assert!(server.closed_cleanly(), "{:?}", server.close_reason());
    assert!(server.image_bytes() == model, "the image differs");
}
