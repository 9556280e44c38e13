//! nbd-blocking's own test, with no server process: the client against
//! `nbd_testkit`'s in-memory server over a socket pair, in each reply style,
//! checked byte for byte against the server's image.

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Socket};
use nbd_proto::{CmdFlags, Config};
use nbd_testkit::{spawn_unix, FakeServer, Rng, Style};

const SIZE: u64 = 1 << 20;

fn servers() -> Vec<(&'static str, FakeServer)> {
    let base = || FakeServer::builder().size(SIZE).seed(7);
    vec![
        ("simple replies", base().structured(false).build()),
        ("structured, chaotic", base().chaotic().build()),
        ("extended, chaotic", base().extended(true).chaotic().build()),
        ("oldstyle", base().style(Style::Oldstyle).build()),
    ]
}

#[test]
fn a_mixed_workload_matches_the_image_in_every_reply_style() {
    for (name, server) in servers() {
        let (client_end, thread) = spawn_unix(server).unwrap();
        let socket = Socket::from_fd(client_end.into(), name);
        let mut client = Client::connect_socket(socket, Config::default())
            .unwrap_or_else(|e| panic!("{name}: handshake: {e}"));
        let mut rng = Rng::new(Rng::seed_from_env(0x5eed));
        let mut model = vec![0u8; SIZE as usize];
        for round in 0..20 {
            // A batch of writes to disjoint 4 KiB slots, in flight together.
            let slots: Vec<u64> = (0..16).map(|i| (round * 16 + i) % 256 * 4096).collect();
            let mut cookies = Vec::new();
            for &offset in &slots {
                let len = rng.size(4096);
                let data = rng.bytes(len);
                model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                cookies.push(
                    client
                        .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
                        .unwrap(),
                );
            }
            for cookie in cookies {
                client.wait_for(cookie).unwrap().result.unwrap();
            }
            // Reads of random spans, each compared with the model.
            for _ in 0..8 {
                let offset = rng.below(SIZE - 8192);
                let len = 1 + rng.below(8192) as usize;
                let got = client
                    .pread(BytesMut::zeroed(len), offset, CmdFlags::empty())
                    .unwrap();
                let want = &model[offset as usize..offset as usize + len];
                assert!(
                    got[..] == *want,
                    "{name}: read of {len} at {offset} differs"
                );
            }
        }
        client.flush(CmdFlags::empty()).unwrap();
        client.shutdown().unwrap();
        let server = thread.join().unwrap().unwrap();
        assert!(
            server.closed_cleanly(),
            "{name}: {:?}",
            server.close_reason()
        );
        assert!(server.image_bytes() == model, "{name}: the image differs");
    }
}

#[test]
fn stats_count_a_4k_read_over_a_socket() {
    let server = FakeServer::builder()
        .size(SIZE)
        .structured(false)
        .extended(false)
        .build();
    let (client_end, thread) = spawn_unix(server).unwrap();
    let socket = Socket::from_fd(client_end.into(), "stats");
    let mut client = Client::connect_socket(socket, Config::default()).unwrap();
    let before = client.stats();
    assert!(
        before.chunks_sent >= 1 && before.chunks_received >= 2,
        "{before:?}"
    );
    client
        .pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
        .unwrap();
    let after = client.stats();
    // A compact request header out; a simple reply header and the data in.
    assert_eq!(after.bytes_sent - before.bytes_sent, 28);
    assert_eq!(after.bytes_received - before.bytes_received, 16 + 4096);
    assert_eq!(after.chunks_sent - before.chunks_sent, 1);
    assert_eq!(after.chunks_received - before.chunks_received, 1);
    assert_eq!(client.stats(), client.connection().stats());
    client.shutdown().unwrap();
    thread.join().unwrap().unwrap();
}
