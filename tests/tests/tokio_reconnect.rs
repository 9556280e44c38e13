//! Automatic reconnect of the tokio client against nbdkit's file plugin,
//! killed and started again on the same Unix socket (so the data outlives
//! the process):
//!
//! - 64 reads and writes in flight from eight tasks, and one write whose
//!   future was dropped: every command completes once and successfully,
//!   reads return the right bytes, the file holds every write (the dropped
//!   one too: it was sent again and its reply consumed);
//! - a server that never comes back: each pending command fails once after
//!   the policy's attempts, and later commands fail too;
//! - an acknowledged write, then a restart: the flush after it succeeds;
//!   past the replay budget, that flush fails once with EIO instead;
//! - a shutdown asked for while the server is away waits for the commands
//!   sent again, refuses new ones, and ends cleanly;
//! - a structured read whose reply was cut short (a scripted fake server)
//!   is sent again and reports each chunk once.
//!
//! Each test runs its own nbdkit (Debian's nbdkit 1.32 aborts when a client
//! leaves with reads in flight) on a runtime of its own, bounded by
//! `WAIT_LIMIT` only to turn a hang into a failure; nothing measures speed.

use std::fs;
use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Errno, ReadChunk};
use nbd_tests::restart::{self, Restartable};
use nbd_tokio::{Client, ReconnectPolicy};

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 64;
const TASKS: usize = 8;
/// The longest any test waits for anything.
const WAIT_LIMIT: Duration = Duration::from_secs(90);

/// Runs `test` on a two-thread runtime, failing it if it outlasts [`WAIT_LIMIT`].
fn run<F: Future<Output = ()>>(test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        tokio::time::timeout(WAIT_LIMIT, test)
            .await
            .expect("the test finished within its limit");
    });
}

/// Block `i` filled with a byte of generation `generation`.
fn block(generation: u8, i: usize) -> Vec<u8> {
    vec![generation.wrapping_mul(31) ^ (i as u8) | 1; BLOCK]
}

fn image(generation: u8) -> Vec<u8> {
    (0..BLOCKS).flat_map(|i| block(generation, i)).collect()
}

fn policy(attempts: u32) -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new(attempts);
    policy.first_delay = Duration::from_millis(50);
    policy.max_delay = Duration::from_millis(500);
    policy
}

/// Waits (polling, without blocking the runtime) until `client` has `n`
/// commands in flight.
async fn until_in_flight(client: &Client, n: usize) {
    while client.in_flight() < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills the server, waits a little (the client retries meanwhile), and
/// starts it again, off the runtime's threads.
async fn restart_later(mut server: Restartable) -> Restartable {
    tokio::task::spawn_blocking(move || {
        server.kill();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
        server
    })
    .await
    .expect("the restart ran")
}

#[test]
fn commands_from_many_tasks_survive_a_restart_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let server = Restartable::start(dir.path(), file.clone(), "1");
    let uri = server.uri();
    run(async move {
        let client = Client::connect_uri(&uri).await.unwrap();
        client.set_reconnect(Some(policy(30))).unwrap();
        // A write whose future is dropped at once: it must still land.
        drop(
            client
                .aio_pwrite(Bytes::from(block(3, 0)), 0, CmdFlags::empty())
                .unwrap(),
        );
        // Each task issues its eight commands at once, then awaits them:
        // blocks 1..=64 of the image's 64, modulo, so block 0 is written by
        // the dropped write alone. Even blocks are rewritten, odd ones read.
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut commands = Vec::new();
                for k in 0..BLOCKS / TASKS {
                    let i = 1 + t * (BLOCKS / TASKS) + k;
                    if i >= BLOCKS {
                        continue;
                    }
                    let offset = (i * BLOCK) as u64;
                    let command = if i % 2 == 0 {
                        let data = Bytes::from(block(2, i));
                        client
                            .aio_pwrite(data, offset, CmdFlags::empty())
                            .unwrap()
                            .reply()
                    } else {
                        client
                            .aio_pread(BytesMut::zeroed(BLOCK), offset, CmdFlags::empty())
                            .unwrap()
                            .reply()
                    };
                    commands.push((i, command));
                }
                let mut done = Vec::new();
                for (i, command) in commands {
                    let reply = command.await.expect("a reply, once");
                    reply
                        .completion
                        .result
                        .unwrap_or_else(|e| panic!("block {i}: {e}"));
                    if i % 2 == 1 {
                        let buffer = reply.completion.buffer.expect("the buffer");
                        assert!(buffer[..] == block(1, i)[..], "read of block {i}");
                    }
                    done.push(i);
                }
                done
            }));
        }
        // 63 from the tasks and the dropped write: 64 in flight, all sent;
        // the server sits on them (a second each). Now it dies.
        until_in_flight(&client, BLOCKS).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let server = restart_later(server).await;
        let mut completed = Vec::new();
        for task in tasks {
            completed.extend(task.await.expect("the task ran"));
        }
        completed.sort_unstable();
        assert_eq!(completed, (1..BLOCKS).collect::<Vec<_>>(), "each once");
        client.flush(CmdFlags::empty()).await.unwrap();
        let reconnects = client.take_reconnects();
        assert!(!reconnects.is_empty(), "a reconnect happened");
        assert!(reconnects[0].resent > 0, "{reconnects:?}");
        client.shutdown().await.unwrap();
        drop(server);
    });
    let mut want = image(1);
    want[..BLOCK].copy_from_slice(&block(3, 0));
    for i in (2..BLOCKS).step_by(2) {
        want[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&block(2, i));
    }
    assert!(fs::read(&file).unwrap() == want, "every write landed");
}

#[test]
fn a_server_that_never_returns_fails_each_pending_command_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file, "10");
    let uri = server.uri();
    run(async move {
        let client = Client::connect_uri(&uri).await.unwrap();
        client.set_reconnect(Some(policy(2))).unwrap();
        let commands: Vec<_> = (0..4u64)
            .map(|i| {
                client
                    .aio_pread(BytesMut::zeroed(512), i * 512, CmdFlags::empty())
                    .unwrap()
                    .reply()
            })
            .collect();
        until_in_flight(&client, 4).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::task::spawn_blocking(move || server.kill())
            .await
            .unwrap();
        for command in commands {
            let reply = command.await.expect("a reply, once");
            let cause = reply.completion.result.expect_err("no read can succeed");
            assert_eq!(cause.errno(), Errno::NotConn, "{cause}");
            assert!(reply.completion.buffer.is_some(), "the buffer comes back");
        }
        let later = client
            .pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .await;
        let err = later.expect_err("the client gave up");
        assert!(err.to_string().contains("reconnect"), "{err}");
        assert!(client.take_reconnects().is_empty());
        assert_eq!(client.in_flight(), 0);
        assert!(client.closed().await.is_err());
    });
}

/// Kills the server and starts it again at once, off the runtime's threads.
async fn restart_now(mut server: Restartable) -> Restartable {
    tokio::task::spawn_blocking(move || {
        server.kill();
        server.restart();
        server
    })
    .await
    .expect("the restart ran")
}

/// Waits until the client has reconnected once.
async fn until_reconnected(client: &Client) -> Vec<nbd_tokio::Reconnected> {
    loop {
        let reconnects = client.take_reconnects();
        if !reconnects.is_empty() {
            return reconnects;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn an_acknowledged_write_survives_a_restart_and_the_flush_after_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let server = Restartable::start(dir.path(), file.clone(), "0");
    let uri = server.uri();
    run(async move {
        let client = Client::connect_uri(&uri).await.unwrap();
        client.set_reconnect(Some(policy(30))).unwrap();
        client
            .pwrite(
                Bytes::from(block(2, 5)),
                5 * BLOCK as u64,
                CmdFlags::empty(),
            )
            .await
            .unwrap();
        let server = restart_now(server).await;
        let reconnects = until_reconnected(&client).await;
        assert_eq!(reconnects[0].resent, 0, "nothing was unfinished");
        client.flush(CmdFlags::empty()).await.unwrap();
        client.shutdown().await.unwrap();
        drop(server);
    });
    let mut want = image(1);
    want[5 * BLOCK..6 * BLOCK].copy_from_slice(&block(2, 5));
    assert!(fs::read(&file).unwrap() == want, "the write landed");
}

#[test]
fn past_the_replay_budget_the_flush_after_a_reconnect_fails_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let server = Restartable::start(dir.path(), file, "0");
    let uri = server.uri();
    run(async move {
        let client = Client::connect_uri(&uri).await.unwrap();
        let mut policy = policy(30);
        policy.replay_budget = BLOCK / 2;
        client.set_reconnect(Some(policy)).unwrap();
        client
            .pwrite(Bytes::from(block(2, 0)), 0, CmdFlags::empty())
            .await
            .unwrap();
        let server = restart_now(server).await;
        until_reconnected(&client).await;
        let err = client
            .flush(CmdFlags::empty())
            .await
            .expect_err("the unflushed write may be lost");
        assert_eq!(err.errno(), Some(Errno::Io), "{err}");
        assert!(err.to_string().contains("budget"), "{err}");
        // Told once; the next flush covers only what this connection holds.
        client.flush(CmdFlags::empty()).await.unwrap();
        client.shutdown().await.unwrap();
        drop(server);
    });
}

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
    run(async move {
        let client = Client::connect_uri(&uri).await.unwrap();
        client.set_reconnect(Some(policy(5))).unwrap();
        let (buf, chunks) = client
            .pread_structured(BytesMut::zeroed(BLOCK), 0, CmdFlags::empty())
            .await
            .unwrap();
        assert!(buf[..] == contents[..BLOCK], "the data");
        assert_eq!(client.take_reconnects().len(), 1, "the first reply was cut");
        // Each byte of the request is covered by exactly one chunk.
        let mut covered = vec![0u8; BLOCK];
        for chunk in &chunks {
            let (offset, len) = match chunk {
                ReadChunk::Data { offset, length, .. } | ReadChunk::Hole { offset, length, .. } => {
                    (*offset as usize, *length as usize)
                }
                other => panic!("unexpected chunk {other:?}"),
            };
            for c in &mut covered[offset..offset + len] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{} chunks", chunks.len());
        client.shutdown().await.unwrap();
    });
}

/// A shutdown asked for while the connection is being replaced waits for
/// the commands sent again, then ends the new connection cleanly.
#[test]
fn a_shutdown_during_a_reconnect_waits_for_the_commands_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, image(1)).unwrap();
    let mut server = Restartable::start(dir.path(), file.clone(), "1");
    let uri = server.uri();
    run(async move {
        let client = Client::connect_uri(&uri).await.unwrap();
        client.set_reconnect(Some(policy(30))).unwrap();
        let writes: Vec<_> = (0..4)
            .map(|i| {
                let offset = (i * BLOCK) as u64;
                client
                    .aio_pwrite(Bytes::from(block(2, i)), offset, CmdFlags::empty())
                    .unwrap()
            })
            .collect();
        until_in_flight(&client, 4).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        server = tokio::task::spawn_blocking(move || {
            server.kill();
            server
        })
        .await
        .unwrap();
        // The loss is seen; the shutdown comes while the server is away.
        while !client.connection().is_dead() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let shutdown = tokio::spawn({
            let client = client.clone();
            async move { client.shutdown().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = client.pwrite(Bytes::from_static(b"late"), 0, CmdFlags::empty());
        assert_eq!(refused.await.unwrap_err().errno(), Some(Errno::Shutdown));
        let server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await
        .unwrap();
        for write in writes {
            write.await.expect("the write was sent again and done");
        }
        shutdown.await.unwrap().expect("a clean end");
        assert_eq!(client.take_reconnects().len(), 1);
        drop(server);
    });
    let mut want = image(1);
    for i in 0..4 {
        want[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&block(2, i));
    }
    assert!(fs::read(&file).unwrap() == want, "every write landed");
}
