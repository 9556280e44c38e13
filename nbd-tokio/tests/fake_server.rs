//! nbd-tokio's own test, with no server process: the client on a
//! two-thread runtime against `nbd_testkit`'s in-memory server over a
//! socket pair, replies out of order and split into chunks, commands from
//! many tasks with some of their futures dropped, every read checked byte
//! for byte against the image.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_io::Socket;
use nbd_proto::{CmdFlags, Config};
use nbd_testkit::{spawn_unix, FakeServer, Rng};
use nbd_tokio::Client;

const SIZE: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_with_dropped_futures_read_what_was_written() {
    let server = FakeServer::builder()
        .size(SIZE)
        .extended(true)
        .chaotic()
        .seed(13)
        .build();
    let (client_end, thread) = spawn_unix(server).unwrap();
    let socket = Socket::from_fd(client_end.into(), "fake server");
    let client = Client::connect_socket(socket, Config::default())
        .await
        .unwrap();
    let mut rng = Rng::new(Rng::seed_from_env(0x70c1));
    let mut model = vec![0u8; SIZE as usize];

    // 64 writes to disjoint slots, one task each.
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..64u64 {
        let offset = slot * 16384 + rng.below(4096);
        let len = rng.size(8192);
        let data = rng.bytes(len);
        model[offset as usize..][..data.len()].copy_from_slice(&data);
        let client = client.clone();
        tasks.spawn(async move {
            client
                .pwrite(Bytes::from(data), offset, CmdFlags::empty())
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }

    // 64 reads; every fourth future is dropped before or after its first poll.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let offset = rng.below(SIZE - 16384);
        let len = 1 + rng.below(16384) as usize;
        let read = client
            .aio_pread(BytesMut::zeroed(len), offset, CmdFlags::empty())
            .unwrap();
        match i % 4 {
            0 => drop(read),
            1 => {
                tasks.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_micros(50), read).await;
                    None
                });
            }
            _ => {
                tasks.spawn(async move { Some((offset, len, read.await)) });
            }
        }
    }
    let mut checked = 0;
    while let Some(done) = tokio::time::timeout(LIMIT, tasks.join_next())
        .await
        .unwrap()
    {
        if let Some((offset, len, result)) = done.unwrap() {
            let buf = result.unwrap();
            assert!(
                buf[..] == model[offset as usize..][..len],
                "read of {len} at {offset} differs"
            );
            checked += 1;
        }
    }
    assert!(checked >= 32, "{checked} reads checked");
    tokio::time::timeout(LIMIT, client.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.in_flight(), 0);
    let server = thread.join().unwrap().unwrap();
    assert!(server.closed_cleanly(), "{:?}", server.close_reason());
    assert!(server.image_bytes() == model, "the image differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_a_4k_read() {
    let server = FakeServer::builder()
        .size(SIZE)
        .structured(false)
        .extended(false)
        .build();
    let (client_end, thread) = spawn_unix(server).unwrap();
    let socket = Socket::from_fd(client_end.into(), "stats");
    let client = Client::connect_socket(socket, Config::default())
        .await
        .unwrap();
    let before = client.stats();
    client
        .pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
        .await
        .unwrap();
    let after = client.stats();
    // A compact request header out; a simple reply header and the data in.
    assert_eq!(after.bytes_sent - before.bytes_sent, 28);
    assert_eq!(after.bytes_received - before.bytes_received, 16 + 4096);
    assert_eq!(after.chunks_sent - before.chunks_sent, 1);
    assert_eq!(after.chunks_received - before.chunks_received, 1);
    tokio::time::timeout(LIMIT, client.shutdown())
        .await
        .unwrap()
        .unwrap();
    thread.join().unwrap().unwrap();
}
