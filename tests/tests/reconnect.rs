//! Automatic reconnect against a server that is killed and started again on
//! the same Unix socket: nbdkit's file plugin, so the data outlives the
//! process.
//!
//! - with 64 reads and writes in flight, the blocking client reconnects and
//!   sends the unfinished ones again: every command completes once and
//!   successfully, reads return the right bytes, and the file holds every
//!   write;
//! - a server that comes back with another export (size changed) is refused,
//!   and the pending commands fail once;
//! - a server that never comes back: each pending command fails once, after
//!   the policy's attempts;
//! - `nbd copy --retries` survives the source being restarted mid-copy, and
//!   the copy is byte-identical;
//! - a structured read whose reply was cut short is sent again and reports
//!   each chunk once.
//!
//! Each test runs its own nbdkit (Debian's nbdkit 1.32 aborts when a client
//! leaves with reads in flight). Time bounds here only turn hangs into
//! failures; nothing measures speed.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, ReconnectPolicy};
use nbd_proto::{CmdFlags, Cookie, Errno};
use nbd_tests::restart::{self, Restartable};
use nbd_tests::testkit::nbd_binary;

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 64;
/// Anything still running after this long is hung.
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread; panics naming `what` if it hangs.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    nbd_tests::testkit::bounded(what, HANG_LIMIT, f)
}

/// Block `i` filled with a byte of generation `generation`.
fn block(generation: u8, i: usize) -> Vec<u8> {
    vec![generation.wrapping_mul(31) ^ (i as u8) | 1; BLOCK]
}

fn image(generation: u8) -> Vec<u8> {
    (0..BLOCKS).flat_map(|i| block(generation, i)).collect()
}

fn policy() -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new(30);
    policy.first_delay = Duration::from_millis(50);
    policy.max_delay = Duration::from_millis(500);
    policy
}

#[test]
fn reconnect_resends_pending_reads_and_writes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file.clone(), "1");
    let uri = server.uri();
    let (killed_tx, killed_rx) = mpsc::channel::<()>();
    let (restart_tx, restart_rx) = mpsc::channel::<()>();
    let client_side = thread::spawn(move || {
        bounded("64 commands across a restart", move || {
            let mut client = Client::connect_uri(&uri).unwrap();
            client.set_reconnect(Some(policy())).unwrap();
            // Even blocks are rewritten (generation 2), odd blocks read.
            let mut pending: HashMap<Cookie, (bool, usize)> = HashMap::new();
            for i in 0..BLOCKS {
                let offset = (i * BLOCK) as u64;
                let cookie = if i % 2 == 0 {
                    let data = Bytes::from(block(2, i));
                    client.aio_pwrite(data, offset, CmdFlags::empty()).unwrap()
                } else {
                    client
                        .aio_pread(BytesMut::zeroed(BLOCK), offset, CmdFlags::empty())
                        .unwrap()
                };
                pending.insert(cookie, (i % 2 == 0, i));
            }
            assert_eq!(client.in_flight(), BLOCKS);
            // Everything is sent; the server sits on it. Now it dies.
            client.poll(Some(Duration::from_millis(50))).unwrap();
            killed_tx.send(()).unwrap();
            restart_rx.recv().unwrap();
            let flush = client.aio_flush(CmdFlags::empty()).unwrap();
            let mut done = 0;
            let mut flushed = false;
            while done < BLOCKS || !flushed {
                client.poll(None).unwrap();
                while let Some(c) = client.next_completion() {
                    if c.cookie == flush {
                        assert!(!flushed, "the flush completed twice");
                        c.result.unwrap();
                        flushed = true;
                        continue;
                    }
                    let (write, i) = pending.remove(&c.cookie).expect("completed once");
                    c.result.unwrap_or_else(|e| panic!("block {i}: {e}"));
                    if !write {
                        assert!(
                            c.buffer.unwrap()[..] == block(1, i)[..],
                            "read of block {i}"
                        );
                    }
                    done += 1;
                }
            }
            assert!(pending.is_empty());
            let reconnects = client.take_reconnects();
            assert!(!reconnects.is_empty(), "a reconnect happened");
            assert!(reconnects[0].resent > 0, "{reconnects:?}");
            client.shutdown().unwrap();
            reconnects
        })
    });
    killed_rx.recv().unwrap();
    server.kill();
    // The client finds the socket dead and retries meanwhile.
    thread::sleep(Duration::from_millis(300));
    server.restart();
    restart_tx.send(()).unwrap();
    let reconnects = client_side.join().unwrap();
    server.kill();
    let mut want = image(1);
    for i in (0..BLOCKS).step_by(2) {
        want[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&block(2, i));
    }
    assert!(
        fs::read(&file).unwrap() == want,
        "every write landed ({reconnects:?})"
    );
}

/// A connection lost with commands in flight whose server never comes back:
/// each command fails once, with the cause, after the policy's attempts.
#[test]
fn a_server_that_never_returns_fails_each_pending_command_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file, "10");
    let uri = server.uri();
    let mut client = Client::connect_uri(&uri).unwrap();
    let mut policy = policy();
    policy.attempts = 2;
    client.set_reconnect(Some(policy)).unwrap();
    let cookies: Vec<Cookie> = (0..4)
        .map(|i| {
            client
                .aio_pread(BytesMut::zeroed(512), i * 512, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    client.poll(Some(Duration::from_millis(50))).unwrap();
    server.kill();
    let err = bounded("giving up", move || {
        let err = loop {
            if let Err(e) = client.poll(None) {
                break e;
            }
        };
        let mut failed = Vec::new();
        while let Some(c) = client.next_completion() {
            let cause = c.result.expect_err("no read can succeed");
            assert_eq!(cause.errno(), Errno::NotConn, "{cause}");
            assert!(c.buffer.is_some(), "the buffer comes back");
            failed.push(c.cookie);
        }
        failed.sort();
        let mut want = cookies.clone();
        want.sort();
        assert_eq!(failed, want, "each read failed exactly once");
        assert!(client.take_reconnects().is_empty());
        err
    });
    assert!(err.to_string().contains("reconnect"), "{err}");
}

/// The server comes back as a listener that accepts and never greets, and
/// the client set no handshake limit of its own: each attempt is still
/// bounded (the policy's `attempt_timeout`), so the client gives up and each
/// pending command fails once, instead of waiting forever.
#[test]
fn a_silent_server_cannot_hold_a_reconnect_forever() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file, "10");
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    assert_eq!(client.connection().stall_timeout(), None);
    let mut policy = policy();
    policy.attempts = 2;
    policy.attempt_timeout = Duration::from_millis(300);
    client.set_reconnect(Some(policy)).unwrap();
    let cookie = client
        .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
        .unwrap();
    client.poll(Some(Duration::from_millis(50))).unwrap();
    server.kill();
    let _ = fs::remove_file(&server.socket);
    // The backlog takes each attempt's connect; nothing ever answers.
    let silent = std::os::unix::net::UnixListener::bind(&server.socket).unwrap();
    let err = bounded("reconnecting to a silent server", move || {
        let err = loop {
            if let Err(e) = client.poll(None) {
                break e;
            }
        };
        let done = client.next_completion().expect("the read completed");
        assert_eq!(done.cookie, cookie);
        assert!(done.result.is_err(), "the read cannot succeed");
        assert!(client.next_completion().is_none(), "it completed once");
        err
    });
    drop(silent);
    assert!(err.to_string().contains("reconnect"), "{err}");
}

/// The server comes back with a different export: the reconnect is refused
/// and the pending commands fail once.
#[test]
fn a_changed_export_refuses_the_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file.clone(), "10");
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    client.set_reconnect(Some(policy())).unwrap();
    let cookie = client
        .aio_pwrite(Bytes::from(block(3, 0)), 0, CmdFlags::empty())
        .unwrap();
    client.poll(Some(Duration::from_millis(50))).unwrap();
    server.kill();
    fs::write(&file, [0u8; 4096]).unwrap();
    server.delay = Some("0");
    server.restart();
    let err = bounded("a refused reconnect", move || {
        let err = loop {
            if let Err(e) = client.poll(None) {
                break e;
            }
        };
        let done = client.next_completion().expect("the write completed");
        assert_eq!(done.cookie, cookie);
        assert!(done.result.is_err(), "the write was never done");
        assert!(client.next_completion().is_none(), "once");
        err
    });
    assert!(err.to_string().contains("size changed"), "{err}");
    assert_eq!(
        fs::read(&file).unwrap(),
        vec![0u8; 4096],
        "nothing written there"
    );
}

#[test]
fn nbd_copy_retries_survives_a_restart_of_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let data = image(7);
    fs::write(&file, &data).unwrap();
    let mut server = Restartable::start(dir.path(), file, "100ms");
    let out = dir.path().join("copy.img");
    let mut copy = Command::new(nbd_binary())
        .args([
            "copy",
            "--retries",
            "30",
            "--requests",
            "2",
            "--request-size",
            "64K",
        ])
        .arg(server.uri())
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 64 reads, two at a time, 100 ms each: the restart falls mid-copy.
    thread::sleep(Duration::from_millis(800));
    server.kill();
    thread::sleep(Duration::from_millis(300));
    server.restart();
    let deadline = Instant::now() + HANG_LIMIT;
    let status = loop {
        if let Some(status) = copy.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "nbd copy hangs");
        thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(copy.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "nbd copy failed: {stderr}");
    assert!(
        stderr.contains("reconnected"),
        "the reconnect is reported: {stderr}"
    );
    assert!(
        fs::read(&out).unwrap() == data,
        "the copy is byte-identical"
    );
}

/// The mio adapter reconnects without blocking: the pause between attempts
/// is a deadline of its loop, and the unfinished commands go out again.
#[test]
fn mio_reconnects_within_the_callers_loop() {
    use mio::{Events, Poll, Token};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file.clone(), "1");
    let uri = server.uri();
    let (killed_tx, killed_rx) = mpsc::channel::<()>();
    let (restart_tx, restart_rx) = mpsc::channel::<()>();
    let client_side = thread::spawn(move || {
        bounded("a mio loop across a restart", move || {
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(16);
            let config = nbd_proto::Config::default();
            let mut client =
                nbd_mio::Client::connect_uri(&uri, config, poll.registry(), Token(3)).unwrap();
            while !client.connection().is_ready() {
                poll.poll(&mut events, client.poll_timeout()).unwrap();
                for e in events.iter() {
                    client.handle_event(e).unwrap();
                }
                client.handle_timeout(Instant::now()).unwrap();
            }
            client.set_reconnect(Some(policy())).unwrap();
            let mut pending = HashMap::new();
            for i in 0..16 {
                let offset = (i * BLOCK) as u64;
                let cookie = if i % 2 == 0 {
                    let data = Bytes::from(block(4, i));
                    client.aio_pwrite(data, offset, CmdFlags::empty()).unwrap()
                } else {
                    client
                        .aio_pread(BytesMut::zeroed(BLOCK), offset, CmdFlags::empty())
                        .unwrap()
                };
                pending.insert(cookie, (i % 2 == 0, i));
            }
            client.send().unwrap();
            killed_tx.send(()).unwrap();
            restart_rx.recv().unwrap();
            while !pending.is_empty() {
                poll.poll(&mut events, client.poll_timeout()).unwrap();
                for e in events.iter() {
                    client.handle_event(e).unwrap();
                }
                client.handle_timeout(Instant::now()).unwrap();
                while let Some(c) = client.next_completion() {
                    let (write, i) = pending.remove(&c.cookie).expect("completed once");
                    c.result.unwrap_or_else(|e| panic!("block {i}: {e}"));
                    if !write {
                        assert!(
                            c.buffer.unwrap()[..] == block(1, i)[..],
                            "read of block {i}"
                        );
                    }
                }
            }
            let reconnects = client.take_reconnects();
            assert!(!reconnects.is_empty(), "a reconnect happened");
            client.aio_disconnect().unwrap();
            while !client.is_closed() {
                poll.poll(&mut events, client.poll_timeout()).unwrap();
                for e in events.iter() {
                    client.handle_event(e).unwrap();
                }
                client.handle_timeout(Instant::now()).unwrap();
            }
        })
    });
    killed_rx.recv().unwrap();
    server.kill();
    thread::sleep(Duration::from_millis(300));
    server.restart();
    restart_tx.send(()).unwrap();
    client_side.join().unwrap();
    server.kill();
    let image = fs::read(&file).unwrap();
    for i in (0..16).step_by(2) {
        assert!(
            image[i * BLOCK..(i + 1) * BLOCK] == block(4, i)[..],
            "write {i} landed"
        );
    }
}

/// How one connection of the scripted server behaves.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Negotiates, takes the first commands, and hangs up without answering.
    HangUpOnCommands,
    /// Greets, then hangs up in the middle of the handshake.
    HangUpInHandshake,
    /// Negotiates, then reads every command and answers none (a stall).
    Stall,
    /// Serves properly.
    Serve,
}

/// A Unix socket whose connections act out `script` in turn, over one
/// shared image (the last act repeats).
fn scripted_server(path: PathBuf, template: nbd_testkit::FakeServer, script: Vec<Act>) {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let act = script[n.min(script.len() - 1)];
            let mut server = template.new_connection();
            thread::spawn(move || {
                if let Act::Serve = act {
                    let _ = nbd_testkit::serve_socket(stream, server);
                    return;
                }
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let out = server.take_output();
                    if let Act::HangUpInHandshake = act {
                        let _ = stream.write_all(&out[..out.len().min(8)]);
                        return;
                    }
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) if server.in_transmission() => match act {
                            // The commands are in; the answers never go out.
                            Act::HangUpOnCommands => return,
                            // Read and ignore everything from now on.
                            _ => {
                                let _ = n;
                                while matches!(stream.read(&mut buf), Ok(k) if k > 0) {}
                                return;
                            }
                        },
                        Ok(n) => server.handle_input(&buf[..n]),
                    }
                }
            });
        }
    });
}

/// A scripted run: the connection is lost with commands in flight; the
/// first reconnect attempt dies in the handshake, the second negotiates and
/// then stalls (the stall deadline ends it), and the next serves. Every
/// command completes once, successfully, and each loss is reported.
#[test]
fn reconnect_survives_a_failed_handshake_and_a_server_that_stalls_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scripted.sock");
    let template = nbd_testkit::FakeServer::builder().size(1 << 20).build();
    scripted_server(
        path.clone(),
        template,
        vec![
            Act::Serve,
            Act::HangUpOnCommands,
            Act::HangUpInHandshake,
            Act::Stall,
            Act::Serve,
        ],
    );
    let uri = format!("nbd+unix:///?socket={}", path.display());
    bounded("a scripted reconnect", move || {
        // The first connection only writes the data to read later.
        let mut setup = Client::connect_uri(&uri).unwrap();
        setup.write_all_at(&block(5, 0), 0).unwrap();
        setup.shutdown().unwrap();

        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_timeout(Some(Duration::from_millis(300)));
        client.set_reconnect(Some(policy())).unwrap();
        let read = client
            .aio_pread(BytesMut::zeroed(BLOCK), 0, CmdFlags::empty())
            .unwrap();
        let write = client
            .aio_pwrite(Bytes::from(block(6, 1)), BLOCK as u64, CmdFlags::FUA)
            .unwrap();
        let flush = client.aio_flush(CmdFlags::empty()).unwrap();
        let mut done = HashMap::new();
        while done.len() < 3 {
            client.poll(None).unwrap();
            while let Some(c) = client.next_completion() {
                assert!(done.insert(c.cookie, c).is_none(), "completed once");
            }
        }
        for cookie in [read, write, flush] {
            done[&cookie].result.clone().unwrap();
        }
        assert!(done[&read].buffer.as_ref().unwrap()[..] == block(5, 0)[..]);
        let reconnects = client.take_reconnects();
        assert_eq!(reconnects.len(), 2, "{reconnects:?}");
        assert_eq!(reconnects[0].cause.errno(), Errno::NotConn);
        assert_eq!(
            reconnects[0].attempt, 2,
            "the first attempt died in the handshake"
        );
        assert_eq!(reconnects[0].resent, 3);
        assert_eq!(reconnects[1].cause.errno(), Errno::TimedOut, "the stall");
        assert_eq!(reconnects[1].attempt, 1);
        let back = client
            .pread(BytesMut::zeroed(BLOCK), BLOCK as u64, CmdFlags::empty())
            .unwrap();
        assert!(
            back[..] == block(6, 1)[..],
            "the write landed once the server served"
        );
        client.shutdown().unwrap();
    });
}

/// Rounds of 64 commands in flight (reads checked against a model, writes
/// of new data, some with FUA, a flush to end each round) while the server
/// is killed and started again twice; the client reconnects each time.
/// Every read returns what the model says, and the file ends equal to it.
fn survives_restarts_under_load(delay: Option<&'static str>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const ROUNDS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start_as(dir.path(), file.clone(), delay);
    let uri = server.uri();
    let round = Arc::new(AtomicUsize::new(0));
    let seed = nbd_testkit::Rng::seed_from_env(11);
    let client_side = {
        let round = round.clone();
        thread::spawn(move || {
            bounded("rounds across restarts", move || {
                let mut rng = nbd_testkit::Rng::new(seed);
                let mut model = image(1);
                let mut client = Client::connect_uri(&uri).unwrap();
                client.set_timeout(Some(Duration::from_secs(5)));
                client.set_reconnect(Some(policy())).unwrap();
                for r in 0..ROUNDS {
                    round.store(r, Ordering::SeqCst);
                    let generation = (r + 10) as u8;
                    let mut blocks: Vec<usize> = (0..BLOCKS).collect();
                    rng.shuffle(&mut blocks);
                    let mut pending = HashMap::new();
                    for &i in &blocks {
                        let offset = (i * BLOCK) as u64;
                        let cookie = if rng.chance(0.5) {
                            let data = block(generation, i);
                            let flags = if rng.chance(0.1) {
                                CmdFlags::FUA
                            } else {
                                CmdFlags::empty()
                            };
                            let c = client
                                .aio_pwrite(Bytes::from(data.clone()), offset, flags)
                                .unwrap();
                            model[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&data);
                            c
                        } else {
                            client
                                .aio_pread(BytesMut::zeroed(BLOCK), offset, CmdFlags::empty())
                                .unwrap()
                        };
                        pending.insert(cookie, (i, model[i * BLOCK..(i + 1) * BLOCK].to_vec()));
                    }
                    while !pending.is_empty() {
                        client.poll(None).unwrap();
                        while let Some(c) = client.next_completion() {
                            let (i, want) = pending.remove(&c.cookie).expect("completed once");
                            c.result
                                .unwrap_or_else(|e| panic!("round {r} block {i}: {e}"));
                            if let Some(buf) = c.buffer {
                                assert!(buf[..] == want[..], "round {r}: read of block {i}");
                            }
                        }
                    }
                    client.flush(CmdFlags::empty()).unwrap();
                }
                round.store(ROUNDS, Ordering::SeqCst);
                let reconnects = client.take_reconnects();
                client.shutdown().unwrap();
                (model, reconnects)
            })
        })
    };
    for kill_at in [10, 25] {
        let deadline = Instant::now() + HANG_LIMIT;
        while round.load(Ordering::SeqCst) < kill_at {
            assert!(Instant::now() < deadline, "the client makes no progress");
            thread::sleep(Duration::from_millis(5));
        }
        server.kill();
        thread::sleep(Duration::from_millis(200));
        server.restart();
    }
    let (model, reconnects) = client_side.join().unwrap();
    assert!(!reconnects.is_empty(), "the restarts were noticed");
    server.kill();
    assert!(
        fs::read(&file).unwrap() == model,
        "the file matches the model ({reconnects:?})"
    );
}

#[test]
fn nbdkit_restarted_twice_under_load_loses_nothing() {
    survives_restarts_under_load(Some("0"));
}

#[test]
fn qemu_nbd_restarted_twice_under_load_loses_nothing() {
    survives_restarts_under_load(None);
}

#[test]
fn nbd_copy_retries_survives_a_restart_of_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let data = image(9);
    fs::write(&source, &data).unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), disk.clone(), "100ms");
    let mut copy = Command::new(nbd_binary())
        .args(["copy", "--retries", "30", "--flush", "--requests", "2"])
        .args(["--request-size", "64K", "--sparse", "0"])
        .arg(&source)
        .arg(server.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 64 writes, two at a time, 100 ms each: the restart falls mid-copy.
    thread::sleep(Duration::from_millis(800));
    server.kill();
    thread::sleep(Duration::from_millis(300));
    server.restart();
    let deadline = Instant::now() + HANG_LIMIT;
    let status = loop {
        if let Some(status) = copy.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "nbd copy hangs");
        thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(copy.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "nbd copy failed: {stderr}");
    assert!(
        stderr.contains("reconnected"),
        "the reconnect is reported: {stderr}"
    );
    server.kill();
    assert!(
        fs::read(&disk).unwrap() == data,
        "the copy is byte-identical"
    );
}

/// A structured read whose reply was cut short is sent again; the chunks
/// the lost connection delivered are not reported with the new ones.
#[test]
fn a_structured_read_sent_again_reports_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.sock");
    let mut contents = vec![0u8; 1 << 20];
    nbd_testkit::Rng::new(3).fill_bytes(&mut contents);
    let template = nbd_testkit::FakeServer::builder()
        .contents(&contents)
        .split_reads(true)
        .seed(5)
        .build();
    restart::cut_short_then_serve(path.clone(), template);
    let uri = format!("nbd+unix:///?socket={}", path.display());
    bounded("a structured read across a reconnect", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_reconnect(Some(policy())).unwrap();
        let (buf, chunks) = client
            .pread_structured(BytesMut::zeroed(BLOCK), 0, CmdFlags::empty())
            .unwrap();
        assert!(buf[..] == contents[..BLOCK], "the data");
        assert_eq!(client.take_reconnects().len(), 1, "the first reply was cut");
        let mut covered = vec![0u8; BLOCK];
        for chunk in &chunks {
            let (offset, length) = match chunk {
                nbd_proto::ReadChunk::Data { offset, length, .. }
                | nbd_proto::ReadChunk::Hole { offset, length, .. } => (*offset, *length),
                other => panic!("unexpected chunk {other:?}"),
            };
            for c in &mut covered[offset as usize..(offset + length) as usize] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{} chunks", chunks.len());
        client.shutdown().unwrap();
    });
}

/// The same through the mio client: chunk events of the cut reply not yet
/// taken when the reconnect happens are dropped, so the events taken after
/// the read completed cover it once.
#[test]
fn mio_a_structured_read_sent_again_reports_each_chunk_once() {
    use mio::{Events, Poll, Token};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.sock");
    let mut contents = vec![0u8; 1 << 20];
    nbd_testkit::Rng::new(3).fill_bytes(&mut contents);
    let template = nbd_testkit::FakeServer::builder()
        .contents(&contents)
        .split_reads(true)
        .seed(5)
        .build();
    restart::cut_short_then_serve(path.clone(), template);
    let uri = format!("nbd+unix:///?socket={}", path.display());
    bounded("a mio structured read across a reconnect", move || {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(16);
        let config = nbd_proto::Config::default();
        let mut client =
            nbd_mio::Client::connect_uri(&uri, config, poll.registry(), Token(1)).unwrap();
        let mut turn = |client: &mut nbd_mio::Client| {
            poll.poll(&mut events, client.poll_timeout()).unwrap();
            for e in events.iter() {
                client.handle_event(e).unwrap();
            }
            client.handle_timeout(Instant::now()).unwrap();
        };
        while !client.connection().is_ready() {
            turn(&mut client);
        }
        client.set_reconnect(Some(policy())).unwrap();
        let cookie = client
            .aio_pread_structured(BytesMut::zeroed(BLOCK), 0, CmdFlags::empty())
            .unwrap();
        client.send().unwrap();
        let done = loop {
            turn(&mut client);
            if let Some(done) = client.next_completion() {
                break done;
            }
        };
        assert_eq!(done.cookie, cookie);
        done.result.unwrap();
        assert!(done.buffer.unwrap()[..] == contents[..BLOCK], "the data");
        assert_eq!(client.take_reconnects().len(), 1, "the first reply was cut");
        let mut covered = vec![0u8; BLOCK];
        while let Some(event) = client.next_event() {
            let nbd_proto::Event::ReadChunk(chunk) = event else {
                continue;
            };
            assert_eq!(chunk.cookie(), cookie);
            let (offset, length) = match chunk {
                nbd_proto::ReadChunk::Data { offset, length, .. }
                | nbd_proto::ReadChunk::Hole { offset, length, .. } => (offset, length),
                other => panic!("unexpected chunk {other:?}"),
            };
            for c in &mut covered[offset as usize..(offset + length) as usize] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "each byte once");
    });
}

/// With `--retries`, a long copy flushes the destination as it goes, so
/// that what a restarted destination must be sent again stays within the
/// reconnect journal's budget; without it, a copy sends no flush of its own.
#[test]
fn nbd_copy_retries_flushes_the_destination_as_it_goes() {
    const SIZE: usize = 48 << 20;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 | 1).collect();
    fs::write(&source, &data).unwrap();
    let flushes = |retries: &[&str]| {
        let log = dir.path().join(format!("dst{}.log", retries.len()));
        let destination = nbd_tests::NbdkitBuilder::memory(SIZE as u64)
            .filter("log")
            .param("logfile", log.to_str().unwrap())
            .start();
        let mut args = vec!["copy", "-C", "1"];
        args.extend_from_slice(retries);
        let dst_uri = destination.uri();
        args.extend([source.to_str().unwrap(), dst_uri.as_str()]);
        let out = nbd_tests::testkit::run_nbd(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let flushes = fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(" Flush "))
            .count();
        drop(destination);
        flushes
    };
    assert_eq!(flushes(&[]), 0, "a copy without --retries or --flush");
    let with = flushes(&["--retries", "3"]);
    // 48 MiB written, a flush every 16 MiB of it (the last may fall at the end).
    assert!(with >= 2, "{with} flushes");
}
