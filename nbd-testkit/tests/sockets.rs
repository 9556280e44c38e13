//! The fake server over real sockets, driven by the bare core.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Config, Connection, Cookie, Event};
use nbd_testkit::{lock, spawn_unix, FakeServer, UnixServer};

/// Drives `conn` over a blocking socket until `done` says so.
fn run_until(
    conn: &mut Connection,
    sock: &mut UnixStream,
    mut done: impl FnMut(&mut Connection, &Event) -> bool,
) {
    for _ in 0..100_000 {
        while let Some(event) = conn.poll_event() {
            if done(conn, &event) {
                return;
            }
            if let Event::Closed { error } = event {
                panic!("closed: {error:?}");
            }
        }
        if conn.direction().is_write() {
            conn.write_to(|iov| sock.write_vectored(iov)).unwrap();
        } else {
            conn.read_from(|buf| sock.read(buf)).unwrap();
        }
    }
    panic!("no end in sight");
}

/// The result and buffer of the completion of `cookie`.
fn wait(
    conn: &mut Connection,
    sock: &mut UnixStream,
    cookie: Cookie,
) -> (nbd_proto::Result<()>, Option<BytesMut>) {
    let mut found = None;
    run_until(conn, sock, |_, e| match e {
        Event::Completed(c) if c.cookie == cookie => {
            found = Some((c.result.clone(), c.buffer.clone()));
            true
        }
        _ => false,
    });
    found.unwrap()
}

#[test]
fn the_core_talks_to_a_spawned_server_over_a_socketpair() {
    let server = FakeServer::builder()
        .size(1 << 16)
        .chaotic()
        .seed(3)
        .build();
    let image = server.image();
    let (mut sock, thread) = spawn_unix(server).unwrap();
    let mut conn = Connection::new(Config::default());
    run_until(&mut conn, &mut sock, |_, e| matches!(e, Event::Ready));
    let w = conn
        .pwrite(Bytes::from(vec![9u8; 5000]), 1000, CmdFlags::FUA)
        .unwrap();
    assert!(wait(&mut conn, &mut sock, w).0.is_ok());
    let r = conn
        .pread(BytesMut::zeroed(7000), 0, CmdFlags::empty())
        .unwrap();
    let got = wait(&mut conn, &mut sock, r).1.unwrap();
    assert!(got[..1000].iter().all(|b| *b == 0));
    assert!(got[1000..6000].iter().all(|b| *b == 9));
    assert!(got[6000..].iter().all(|b| *b == 0));
    conn.disconnect().unwrap();
    run_until(&mut conn, &mut sock, |_, e| {
        matches!(e, Event::Closed { error: None })
    });
    drop(sock);
    let server = thread.join().unwrap().unwrap();
    assert!(server.closed_cleanly(), "{:?}", server.close_reason());
    assert_eq!(lock(&image).read(1000, 5000), vec![9u8; 5000]);
}

#[test]
fn a_client_that_hangs_up_ends_the_serving_thread() {
    let (sock, thread) = spawn_unix(FakeServer::new()).unwrap();
    drop(sock);
    let server = thread.join().unwrap().unwrap();
    assert!(server.is_closed());
    assert!(!server.closed_cleanly());
}

#[test]
fn a_dropped_listener_stops_accepting_and_removes_its_socket() {
    let dir = std::env::temp_dir().join(format!("nbd-testkit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("drop.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixServer::bind(&path, FakeServer::new()).unwrap();
    let mut first = UnixStream::connect(&path).unwrap();
    let mut magic = [0u8; 8];
    first.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"NBDMAGIC");
    assert_eq!(listener.connections(), 1);
    drop(listener);
    assert!(!path.exists());
    assert!(UnixStream::connect(&path).is_err());
    let _ = std::fs::remove_dir(&dir);
}
