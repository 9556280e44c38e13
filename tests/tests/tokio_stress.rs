//! The model-based stress test (`nbd_tests::stress`) over `nbd_tokio`, and
//! cancellation under the same model.
//!
//! The stress runs drive `nbd_tokio::Client` through the `aio_` vocabulary
//! of `tokio/aio.rs` (each command's future kept and polled on a runtime
//! of the test's own) against the servers of `tests/stress.rs`: nbdkit's
//! memory plugin (plain, behind a 4 KiB alignment policy, failing 2% of
//! commands with EIO), qemu-nbd on raw and qcow2 images, nbd-server, and
//! nbdkit killed halfway.
//!
//! The cancellation test keeps 64 commands in flight from many tasks on a
//! multi-threaded runtime and drops a quarter of the futures at random
//! points (before their first poll, after some polls, or after the reply
//! arrived); every read that completes is still checked byte for byte
//! against the model, so a reply handed to the wrong command fails it; a
//! self-test flips one bit of one read and expects the run to fail.
//!
//! A failure prints the seed; `NBD_STRESS_SEED` and `NBD_STRESS_OPS` replay
//! it (the replay line printed by the runner names `--test stress`; use
//! `--test tokio_stress` here).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use nbd_proto::{BlockStatus, CmdFlags, Completion, Config, Connection, Cookie, Errno};
use nbd_tests::stress::model::Model;
use nbd_tests::stress::ops::{mix_seed, Generator, Op, BASE_ALLOCATION};
use nbd_tests::stress::{stress_checked, stress_killed, Driver, Kind, Limits, Settings, Target};
use nbd_tests::testkit::Rng;
use nbd_tests::{ImageFormat, NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder};
use nbd_tokio::{Client, Command, Reply};
use tokio::task::JoinSet;

#[path = "tokio/aio.rs"]
#[allow(dead_code, reason = "each test crate uses a part of it")]
mod aio;

use aio::AioClient;

/// Some MiB, with an odd tail, as in `tests/stress.rs`.
const SIZE: u64 = (16 << 20) + 1234;
/// qemu images are whole sectors.
const QEMU_SIZE: u64 = (16 << 20) + 4608;

/// `nbd_tokio::Client` as a stress driver.
struct Tokio(AioClient);

impl Driver for Tokio {
    const NAME: &'static str = "tokio";

    fn connect(uri: &str, config: Config) -> Result<Self, String> {
        AioClient::connect(uri, config)
            .map(Tokio)
            .map_err(|e| e.to_string())
    }

    fn connection(&self) -> &Connection {
        self.0.connection()
    }

    fn issue(&mut self, op: &Op) -> Result<Cookie, String> {
        let c = &mut self.0;
        match op.kind {
            Kind::Read => c.aio_pread(BytesMut::zeroed(op.len as usize), op.offset, op.flags),
            Kind::Write => c.aio_pwrite(
                op.data.clone().expect("a write carries its payload"),
                op.offset,
                op.flags,
            ),
            Kind::Trim => c.aio_trim(op.len, op.offset, op.flags),
            Kind::Zero => c.aio_zero(op.len, op.offset, op.flags),
            Kind::Flush => c.aio_flush(op.flags),
            Kind::Cache => c.aio_cache(op.len, op.offset, op.flags),
            Kind::BlockStatus => c.aio_block_status(op.len, op.offset, op.flags),
        }
        .map_err(|e| e.to_string())
    }

    fn send(&mut self) -> Result<(), String> {
        // One turn of the runtime: the driver task writes what is queued.
        self.0.step(Duration::ZERO).map_err(|e| e.to_string())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        self.0.step(timeout).map_err(|e| e.to_string())
    }

    fn next_completion(&mut self, preferred: Option<Cookie>) -> Option<Completion> {
        preferred
            .and_then(|cookie| self.0.take_completion(cookie))
            .or_else(|| self.0.next_completion())
    }

    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.0.take_block_status(cookie)
    }

    fn finish(self) -> Result<(), String> {
        self.0.shutdown().map_err(|e| e.to_string())
    }
}

#[test]
fn tokio_nbdkit_memory() {
    let server = NbdkitBuilder::memory(SIZE).start();
    stress_checked::<Tokio>(
        Target::new("tokio_nbdkit_memory", "nbdkit memory", &server.uri()).trim_reads_zero(),
    );
}

#[test]
fn tokio_nbdkit_memory_aligned() {
    let server = NbdkitBuilder::memory(16 << 20)
        .filter("blocksize-policy")
        .param("blocksize-minimum", "4096")
        .param("blocksize-preferred", "65536")
        .param("blocksize-maximum", "262144")
        .param("blocksize-error-policy", "error")
        .start();
    stress_checked::<Tokio>(
        Target::new(
            "tokio_nbdkit_memory_aligned",
            "nbdkit memory, 4 KiB blocks",
            &server.uri(),
        )
        .trim_reads_zero(),
    );
}

#[test]
fn tokio_nbdkit_memory_failing() {
    let server = NbdkitBuilder::memory(SIZE)
        .filter("error")
        .param("error", "EIO")
        .param("error-rate", "2%")
        .start();
    stress_checked::<Tokio>(
        Target::new(
            "tokio_nbdkit_memory_failing",
            "nbdkit memory, 2% EIO",
            &server.uri(),
        )
        .trim_reads_zero()
        .injected_error(Errno::Io),
    );
}

#[test]
fn tokio_qemu_nbd_raw() {
    let server = QemuNbdBuilder::new(ImageFormat::Raw, QEMU_SIZE)
        .arg("--discard=unmap")
        .start();
    stress_checked::<Tokio>(Target::new(
        "tokio_qemu_nbd_raw",
        "qemu-nbd raw, --discard=unmap",
        &server.uri(),
    ));
}

#[test]
fn tokio_qemu_nbd_qcow2() {
    let server = QemuNbdBuilder::new(ImageFormat::Qcow2, QEMU_SIZE).start();
    stress_checked::<Tokio>(Target::new(
        "tokio_qemu_nbd_qcow2",
        "qemu-nbd qcow2",
        &server.uri(),
    ));
}

#[test]
fn tokio_nbd_server() {
    let server = NbdServerBuilder::new()
        .export_with(
            NbdServerExport::new("stress", SIZE)
                .option("trim", "true")
                .option("flush", "true")
                .option("fua", "true"),
        )
        .start();
    stress_checked::<Tokio>(Target::new("tokio_nbd_server", "nbd-server", &server.uri()));
}

/// The server killed halfway: commands in flight fail exactly once, new
/// ones are refused, nothing hangs.
#[test]
fn tokio_nbdkit_memory_killed() {
    // A server of its own: it dies with reads in flight.
    let mut server = NbdkitBuilder::memory(SIZE).start();
    let test = "tokio_nbdkit_memory_killed";
    let target = Target::new(test, "nbdkit memory, killed", &server.uri()).trim_reads_zero();
    let killed = stress_killed::<Tokio>(target, || server.kill());
    assert!(
        killed.refused_at >= killed.killed_at,
        "{test}: refused before the kill: {killed:?}"
    );
    assert!(
        killed.issued >= killed.killed_at,
        "{test}: issued too few: {killed:?}"
    );
}

// ------------------------------------------------------------------ cancellation

/// Commands in flight (live and abandoned) during the cancellation test.
const DEPTH: usize = 64;
/// Client memory (read buffers, write payloads) allowed in flight at once.
const MAX_BUFFERED: u64 = 64 << 20;

/// When a command's future is dropped, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    /// Awaited to the end and checked.
    Awaited,
    /// Dropped before it was ever polled.
    DroppedUnpolled,
    /// Dropped after `n` polls (it may have completed on one: then checked).
    DroppedAfterPolls(u32),
    /// Polled for a random short while, then dropped.
    DroppedAfterWaiting(Duration),
    /// Left unpolled for a while (its reply has likely arrived), then dropped.
    DroppedAfterSleeping(Duration),
}

impl Fate {
    fn pick(rng: &mut Rng) -> Fate {
        match rng.below(16) {
            0 => Fate::DroppedUnpolled,
            1 => Fate::DroppedAfterPolls(1 + rng.below(3) as u32),
            2 => Fate::DroppedAfterWaiting(Duration::from_micros(rng.below(500))),
            3 => Fate::DroppedAfterSleeping(Duration::from_micros(rng.below(2000))),
            _ => Fate::Awaited,
        }
    }

    fn kind(self) -> usize {
        match self {
            Fate::Awaited => 0,
            Fate::DroppedUnpolled => 1,
            Fate::DroppedAfterPolls(_) => 2,
            Fate::DroppedAfterWaiting(_) => 3,
            Fate::DroppedAfterSleeping(_) => 4,
        }
    }
}

/// Carries out `fate` on `command`: its reply, unless it was dropped first.
async fn meet(fate: Fate, mut command: Command<Reply>) -> Option<Reply> {
    match fate {
        Fate::Awaited => Some(command.await.expect("a reply is taken once")),
        Fate::DroppedUnpolled => None,
        Fate::DroppedAfterPolls(n) => {
            for _ in 0..n {
                let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut command).poll(cx))).await;
                if let Poll::Ready(reply) = polled {
                    return Some(reply.expect("a reply is taken once"));
                }
                tokio::task::yield_now().await;
            }
            None
        }
        Fate::DroppedAfterWaiting(d) => tokio::time::timeout(d, command)
            .await
            .ok()
            .map(|reply| reply.expect("a reply is taken once")),
        Fate::DroppedAfterSleeping(d) => {
            tokio::time::sleep(d).await;
            None
        }
    }
}

/// A command whose future was dropped: on the wire until the core says its
/// reply came, so nothing that conflicts with it may be issued meanwhile.
struct Ghost {
    cookie: Cookie,
    op: Op,
}

/// Issues `op` on `client`: its future, resolving to the raw reply.
fn issue(client: &Client, op: &Op) -> nbd_tokio::Result<Command<Reply>> {
    Ok(match op.kind {
        Kind::Read => client
            .aio_pread(BytesMut::zeroed(op.len as usize), op.offset, op.flags)?
            .reply(),
        Kind::Write => client
            .aio_pwrite(op.data.clone().expect("a payload"), op.offset, op.flags)?
            .reply(),
        Kind::Trim => client.aio_trim(op.len, op.offset, op.flags)?.reply(),
        Kind::Zero => client.aio_zero(op.len, op.offset, op.flags)?.reply(),
        Kind::Flush => client.aio_flush(op.flags)?.reply(),
        Kind::Cache => client.aio_cache(op.len, op.offset, op.flags)?.reply(),
        Kind::BlockStatus => client
            .aio_block_status(op.len, op.offset, op.flags)?
            .reply(),
    })
}

/// The cancellation run: what it did, for its assertions.
#[derive(Debug, Default)]
struct Cancelled {
    /// Operations by fate kind (see [`Fate::kind`]).
    fates: [u64; 5],
    /// Commands that were dropped before their reply was taken.
    dropped: u64,
    /// Reads checked against the model.
    reads_checked: u64,
    /// Bytes of the final sweep checked against the model.
    swept_known: u64,
}

/// Applies a taken reply of `op` to the model, or panics saying why.
fn apply(model: &mut Model, op: &Op, reply: Reply, seed: u64, index: u64) -> bool {
    let done = reply.completion;
    match done.result {
        Ok(()) => {}
        Err(e) if op.flags.contains(CmdFlags::FAST_ZERO) && e.errno() == Errno::NotSup => {
            model.forget(op.offset, op.len);
            return false;
        }
        Err(e) => panic!("cancellation seed {seed}, operation {index}: {op:?} failed: {e}"),
    }
    match op.kind {
        Kind::Read => {
            let buf = done.buffer.expect("a read hands its buffer back");
            if let Err(m) = model.check_read(op.offset, &buf) {
                panic!(
                    "cancellation seed {seed}, operation {index}: {op:?} read wrong data: {m} \
                     (replay: NBD_STRESS_SEED={seed} cargo test -p nbd-tests --test tokio_stress \
                     tokio_cancellation)"
                );
            }
            return true;
        }
        Kind::Write => model.write(op.offset, op.data.as_ref().expect("a payload")),
        // nbdkit's memory plugin reads trimmed bytes back as zeroes.
        Kind::Zero | Kind::Trim => model.zero(op.offset, op.len),
        Kind::Flush | Kind::Cache | Kind::BlockStatus => {}
    }
    false
}

/// Runs `ops` operations with [`DEPTH`] in flight from many tasks,
/// dropping about a quarter of the futures at random points. With
/// `flip_read`, the last byte of that (1-based) completed read whose last
/// byte the model knows is flipped before it is checked: the self-test's
/// corruption.
async fn cancellation_run(uri: &str, ops: u64, seed: u64, flip_read: Option<u64>) -> Cancelled {
    let config = Config::default().meta_context(BASE_ALLOCATION);
    let client = Client::connect_uri_with(uri, config)
        .await
        .expect("connect");
    let limits = Limits::of(&client.connection()).expect("export facts");
    let mut model = Model::zeroed(limits.size);
    let mut gen = Generator::new(seed, limits);
    let mut fates = Rng::new(mix_seed(seed ^ 0xcafe));
    let mut tasks: JoinSet<(u64, Op, Cookie, Option<Reply>)> = JoinSet::new();
    let mut live: Vec<(u64, Op)> = Vec::new();
    let mut ghosts: Vec<Ghost> = Vec::new();
    let mut buffered = 0u64;
    let mut result = Cancelled::default();

    let mut next = gen.next_op();
    let mut index = 0u64;
    let mut reads_seen = 0u64;
    while index < ops || !tasks.is_empty() || !ghosts.is_empty() {
        // Ghosts whose replies came (consumed and dropped by the driver).
        {
            let conn = client.connection();
            ghosts.retain(|g| conn.is_in_flight(g.cookie));
        }
        let blocked = index >= ops
            || live.len() + ghosts.len() >= DEPTH
            || buffered + next.buffer_bytes() > MAX_BUFFERED
            || live
                .iter()
                .map(|(_, op)| op)
                .chain(ghosts.iter().map(|g| &g.op))
                .any(|op| op.conflicts_with(&next));
        if !blocked {
            let op = std::mem::replace(&mut next, gen.next_op());
            let command = issue(&client, &op)
                .unwrap_or_else(|e| panic!("cancellation seed {seed}: issue {op:?}: {e}"));
            let cookie = command.cookie();
            let fate = Fate::pick(&mut fates);
            result.fates[fate.kind()] += 1;
            buffered += op.buffer_bytes();
            live.push((index, op.clone()));
            let at = index;
            tasks.spawn(async move { (at, op, cookie, meet(fate, command).await) });
            index += 1;
            continue;
        }
        // Blocked: wait for a task, or (only ghosts left) for the driver.
        if tasks.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let (at, op, cookie, reply) = tasks
            .join_next()
            .await
            .expect("a task is running")
            .expect("the task did not panic");
        live.retain(|(i, _)| *i != at);
        buffered -= op.buffer_bytes();
        match reply {
            Some(mut reply) => {
                if let Some(buf) = reply.completion.buffer.as_mut().filter(|b| !b.is_empty()) {
                    let last = buf.len() - 1;
                    // Only a byte the model knows can be noticed.
                    if model.known_bytes(op.offset + last as u64, 1) == 1 {
                        reads_seen += 1;
                        if flip_read == Some(reads_seen) {
                            buf[last] ^= 0x10;
                        }
                    }
                }
                assert_eq!(
                    reply.completion.cookie, cookie,
                    "seed {seed}: a reply for another command"
                );
                result.reads_checked += u64::from(apply(&mut model, &op, reply, seed, at));
            }
            None => {
                result.dropped += 1;
                // What a dropped change did is unknown until rewritten.
                if op.kind.changes_data() {
                    model.forget(op.offset, op.len);
                }
                ghosts.push(Ghost { cookie, op });
            }
        }
    }
    assert_eq!(
        client.in_flight(),
        0,
        "seed {seed}: commands left in flight"
    );

    // Everything the model knows must be on the export.
    for op in gen.sweep() {
        let buf = client
            .pread(
                BytesMut::zeroed(op.len as usize),
                op.offset,
                CmdFlags::empty(),
            )
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: sweep read {op:?}: {e}"));
        model
            .check_read(op.offset, &buf)
            .unwrap_or_else(|m| panic!("seed {seed}: sweep read {op:?}: {m}"));
    }
    result.swept_known = model.known_bytes(0, model.size());
    client.shutdown().await.expect("a clean disconnect");
    result
}

/// Futures dropped at random points of a 64-in-flight mix from many tasks:
/// every read that completes still matches the model, nothing is left in
/// flight, and the connection disconnects cleanly afterwards.
#[test]
fn tokio_cancellation() {
    let settings = Settings::from_env();
    let seed = settings.seed();
    let ops = settings.ops;
    eprintln!("tokio_cancellation: {ops} operations, seed {seed} (replay: NBD_STRESS_SEED={seed} NBD_STRESS_OPS={ops})");
    let server = NbdkitBuilder::memory(SIZE).start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let uri = server.uri();
    let result = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(300),
            cancellation_run(&uri, ops, seed, None),
        )
        .await
    });
    let result = result.unwrap_or_else(|_| panic!("seed {seed}: no end within 300 s"));
    eprintln!("tokio_cancellation: {result:?}");
    if ops >= 1000 {
        for (kind, count) in result.fates.iter().enumerate() {
            assert!(
                *count > 0,
                "seed {seed}: fate {kind} never chosen: {result:?}"
            );
        }
        assert!(
            result.dropped > 0,
            "seed {seed}: nothing was dropped: {result:?}"
        );
        assert!(
            result.reads_checked > 0,
            "seed {seed}: no read checked: {result:?}"
        );
    }
}

/// The cancellation run's checks can fail: one flipped bit in one read
/// fails it, naming the seed.
#[test]
fn tokio_cancellation_notices_a_corrupted_read() {
    let server = NbdkitBuilder::memory(SIZE).start();
    let uri = server.uri();
    let outcome = std::panic::catch_unwind(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(300),
                cancellation_run(&uri, 2000, 7, Some(20)),
            )
            .await
        })
    });
    let payload = outcome.expect_err("a flipped bit went unnoticed");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| format!("{payload:?}"));
    assert!(message.contains("read wrong data"), "{message}");
    assert!(message.contains("seed 7"), "{message}");
}
