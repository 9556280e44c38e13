//! Model-based stress test ("never hang, never panic"): a seeded random mix
//! of every data command at random offsets and lengths, 1 to 256 in flight,
//! completions taken in any order, each read checked byte for byte against a
//! model of the export (see `nbd_tests::stress`).
//!
//! One test per adapter and server, so a failure names both:
//! `blocking_*` drives `nbd_blocking::Client`'s aio calls with `poll`,
//! `mio_*` drives `nbd_mio::Client` in a mio `Poll` loop; the servers are
//! nbdkit's memory plugin (also behind a policy demanding 4 KiB alignment),
//! qemu-nbd on a raw and on a qcow2 image, and nbd-server. Between them they
//! cover the three reply framings: simple replies (nbd-server 3.24),
//! structured replies with compact headers (nbdkit 1.32) and extended headers
//! (qemu-nbd 10).
//!
//! Two more conditions per adapter: nbdkit failing 2% of commands with
//! `EIO` on purpose (those failures are expected; everything else is still
//! checked), and the server killed halfway with commands in flight (they
//! must fail exactly once, new ones be refused, and nothing hang). With
//! automatic reconnect on, the server (nbdkit's file plugin, qemu-nbd on a
//! raw file) is killed and started again twice mid-run: every operation must
//! still pass and read back right. A self-test flips one bit of one read and expects the run to fail.
//!
//! qemu-nbd on qcow2 runs with discards ignored (its default); with
//! `--discard=unmap` it corrupts data under this load, which the ignored
//! `*_qemu_nbd_qcow2_discard_unmap` tests show on demand.
//!
//! `NBD_STRESS_OPS=N` sets the operations per test (default
//! `nbd_tests::stress::DEFAULT_OPS`), `NBD_STRESS_SEED=S` replays a seed;
//! each test prints its seed and, at the end, how many operations passed.
//! Long runs: `NBD_STRESS_OPS=1000000 cargo test --release -p nbd-tests
//! --test stress blocking_nbdkit_memory -- --nocapture`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use nbd_proto::{BlockStatus, Completion, Config, Connection, Cookie, Errno};
use nbd_tests::stress::ops::Op;
use nbd_tests::stress::{
    stress, stress_checked, stress_killed, stress_restarted, Blocking, Driver, Mio, Settings,
    Target,
};
use nbd_tests::{
    ImageFormat, NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder, Restartable,
    ServerHandle,
};

/// Some MiB (room for 256 small commands in flight without overlaps), with an odd tail so requests also end at an unaligned export end.
const SIZE: u64 = (16 << 20) + 1234;
/// qemu images are whole sectors.
const QEMU_SIZE: u64 = (16 << 20) + 4608;

fn nbdkit_memory() -> ServerHandle {
    NbdkitBuilder::memory(SIZE).start()
}

/// nbdkit's memory plugin behind a policy that demands 4 KiB alignment and
/// caps payloads at 256 KiB, refusing (not fixing up) anything else: every
/// request the generator makes must respect the advertised block sizes.
fn nbdkit_memory_aligned() -> ServerHandle {
    NbdkitBuilder::memory(16 << 20)
        .filter("blocksize-policy")
        .param("blocksize-minimum", "4096")
        .param("blocksize-preferred", "65536")
        .param("blocksize-maximum", "262144")
        .param("blocksize-error-policy", "error")
        .start()
}

/// nbdkit's memory plugin failing one command in fifty with `EIO`.
fn nbdkit_memory_failing() -> ServerHandle {
    NbdkitBuilder::memory(SIZE)
        .filter("error")
        .param("error", "EIO")
        .param("error-rate", "2%")
        .start()
}

/// How qemu-nbd handles trims.
#[derive(Clone, Copy)]
enum Discard {
    /// Trims succeed and change nothing (qemu-nbd's default).
    Ignore,
    /// Trims reach the image: punched holes, freed qcow2 clusters.
    Unmap,
}

fn qemu_nbd(format: ImageFormat, discard: Discard) -> ServerHandle {
    let builder = QemuNbdBuilder::new(format, QEMU_SIZE);
    match discard {
        Discard::Ignore => builder,
        Discard::Unmap => builder.arg("--discard=unmap"),
    }
    .start()
}

fn nbd_server() -> ServerHandle {
    NbdServerBuilder::new()
        .export_with(
            NbdServerExport::new("stress", SIZE)
                .option("trim", "true")
                .option("flush", "true")
                .option("fua", "true"),
        )
        .start()
}

// ------------------------------------------------------------------ blocking

#[test]
fn blocking_nbdkit_memory() {
    let server = nbdkit_memory();
    // The memory plugin frees trimmed pages: they read back as zeroes.
    stress_checked::<Blocking>(
        Target::new("blocking_nbdkit_memory", "nbdkit memory", &server.uri()).trim_reads_zero(),
    );
}

#[test]
fn blocking_nbdkit_memory_aligned() {
    let server = nbdkit_memory_aligned();
    stress_checked::<Blocking>(
        Target::new(
            "blocking_nbdkit_memory_aligned",
            "nbdkit memory, 4 KiB blocks",
            &server.uri(),
        )
        .trim_reads_zero(),
    );
}

#[test]
fn blocking_nbdkit_memory_failing() {
    let server = nbdkit_memory_failing();
    stress_checked::<Blocking>(
        Target::new(
            "blocking_nbdkit_memory_failing",
            "nbdkit memory, 2% EIO",
            &server.uri(),
        )
        .trim_reads_zero()
        .injected_error(Errno::Io),
    );
}

#[test]
fn blocking_qemu_nbd_raw() {
    let server = qemu_nbd(ImageFormat::Raw, Discard::Unmap);
    stress_checked::<Blocking>(Target::new(
        "blocking_qemu_nbd_raw",
        "qemu-nbd raw, --discard=unmap",
        &server.uri(),
    ));
}

#[test]
fn blocking_qemu_nbd_qcow2() {
    let server = qemu_nbd(ImageFormat::Qcow2, Discard::Ignore);
    stress_checked::<Blocking>(Target::new(
        "blocking_qemu_nbd_qcow2",
        "qemu-nbd qcow2",
        &server.uri(),
    ));
}

/// qemu-nbd 10.0 on qcow2 with `--discard=unmap` loses data under this
/// load: after some 20 000 to 140 000 operations a read returns a whole 64
/// KiB cluster (or part of one) of stale bytes or zeroes, and reading it
/// again alone, with nothing else in flight, gives the same wrong bytes, so
/// the image itself holds them. The same load passes on qcow2 with discards
/// ignored, on raw with `--discard=unmap`, and on every other server, through
/// both adapters. Run with `NBD_STRESS_OPS=200000 cargo test --release -p
/// nbd-tests --test stress blocking_qemu_nbd_qcow2_discard_unmap -- --ignored
/// --nocapture` (fails in about half the runs).
#[test]
#[ignore = "qemu-nbd 10.0 qcow2 with --discard=unmap corrupts data under concurrent commands"]
fn blocking_qemu_nbd_qcow2_discard_unmap() {
    let server = qemu_nbd(ImageFormat::Qcow2, Discard::Unmap);
    stress_checked::<Blocking>(Target::new(
        "blocking_qemu_nbd_qcow2_discard_unmap",
        "qemu-nbd qcow2, --discard=unmap",
        &server.uri(),
    ));
}

#[test]
fn blocking_nbd_server() {
    let server = nbd_server();
    stress_checked::<Blocking>(Target::new(
        "blocking_nbd_server",
        "nbd-server",
        &server.uri(),
    ));
}

// ------------------------------------------------------------------ mio

#[test]
fn mio_nbdkit_memory() {
    let server = nbdkit_memory();
    stress_checked::<Mio>(
        Target::new("mio_nbdkit_memory", "nbdkit memory", &server.uri()).trim_reads_zero(),
    );
}

#[test]
fn mio_nbdkit_memory_aligned() {
    let server = nbdkit_memory_aligned();
    stress_checked::<Mio>(
        Target::new(
            "mio_nbdkit_memory_aligned",
            "nbdkit memory, 4 KiB blocks",
            &server.uri(),
        )
        .trim_reads_zero(),
    );
}

#[test]
fn mio_nbdkit_memory_failing() {
    let server = nbdkit_memory_failing();
    stress_checked::<Mio>(
        Target::new(
            "mio_nbdkit_memory_failing",
            "nbdkit memory, 2% EIO",
            &server.uri(),
        )
        .trim_reads_zero()
        .injected_error(Errno::Io),
    );
}

#[test]
fn mio_qemu_nbd_raw() {
    let server = qemu_nbd(ImageFormat::Raw, Discard::Unmap);
    stress_checked::<Mio>(Target::new(
        "mio_qemu_nbd_raw",
        "qemu-nbd raw, --discard=unmap",
        &server.uri(),
    ));
}

#[test]
fn mio_qemu_nbd_qcow2() {
    let server = qemu_nbd(ImageFormat::Qcow2, Discard::Ignore);
    stress_checked::<Mio>(Target::new(
        "mio_qemu_nbd_qcow2",
        "qemu-nbd qcow2",
        &server.uri(),
    ));
}

/// qemu-nbd 10.0 on qcow2 with `--discard=unmap` loses data under this
/// load: after some 20 000 to 140 000 operations a read returns a whole 64
/// KiB cluster (or part of one) of stale bytes or zeroes, and reading it
/// again alone, with nothing else in flight, gives the same wrong bytes, so
/// the image itself holds them. The same load passes on qcow2 with discards
/// ignored, on raw with `--discard=unmap`, and on every other server, through
/// both adapters. Run with `NBD_STRESS_OPS=200000 cargo test --release -p
/// nbd-tests --test stress mio_qemu_nbd_qcow2_discard_unmap -- --ignored
/// --nocapture` (fails in about half the runs).
#[test]
#[ignore = "qemu-nbd 10.0 qcow2 with --discard=unmap corrupts data under concurrent commands"]
fn mio_qemu_nbd_qcow2_discard_unmap() {
    let server = qemu_nbd(ImageFormat::Qcow2, Discard::Unmap);
    stress_checked::<Mio>(Target::new(
        "mio_qemu_nbd_qcow2_discard_unmap",
        "qemu-nbd qcow2, --discard=unmap",
        &server.uri(),
    ));
}

#[test]
fn mio_nbd_server() {
    let server = nbd_server();
    stress_checked::<Mio>(Target::new("mio_nbd_server", "nbd-server", &server.uri()));
}

// ------------------------------------------------------------------ server death

/// Kills the server halfway through a stress run: the commands in flight
/// fail exactly once, the client refuses new ones, and nothing hangs.
fn check_killed<D: Driver>(test: &str) {
    // A server of its own: it dies with reads in flight.
    let mut server = nbdkit_memory();
    let target = Target::new(test, "nbdkit memory, killed", &server.uri()).trim_reads_zero();
    let killed = stress_killed::<D>(target, || server.kill());
    assert!(
        killed.refused_at >= killed.killed_at,
        "{test}: refused before the kill: {killed:?}"
    );
    assert!(
        killed.issued >= killed.killed_at,
        "{test}: issued too few: {killed:?}"
    );
}

#[test]
fn blocking_nbdkit_memory_killed() {
    check_killed::<Blocking>("blocking_nbdkit_memory_killed");
}

#[test]
fn mio_nbdkit_memory_killed() {
    check_killed::<Mio>("mio_nbdkit_memory_killed");
}

// ------------------------------------------------------------------ server restarts

/// Restarts the server twice during a stress run with automatic reconnect
/// on: nbdkit's file plugin, or qemu-nbd on a raw file, so the data outlives
/// each process. Every operation must pass and every byte the model knows
/// must read back: nothing lost, nothing doubled.
fn check_restarted<D: Driver>(test: &str, qemu: bool) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let size = if qemu { QEMU_SIZE } else { SIZE };
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    // A server of its own: it dies with commands in flight.
    let (server_name, delay) = match qemu {
        true => ("qemu-nbd raw, restarted", None),
        false => ("nbdkit file, restarted", Some("0")),
    };
    let mut server = Restartable::start_as(dir.path(), file, delay);
    let target = Target::new(test, server_name, &server.uri());
    let ops = Settings::from_env().ops;
    let (summary, reconnects) = stress_restarted::<D>(target, |_| {
        server.kill();
        std::thread::sleep(std::time::Duration::from_millis(100));
        server.restart();
    });
    assert_eq!(summary.operations, ops, "{test}: operations run");
    assert!(summary.sweep_reads > 0, "{test}: the export was read back");
    if ops >= 30 {
        // Both restarts fell inside the run, with commands in flight
        // most of the time: the client must have seen at least one.
        assert!(reconnects >= 1, "{test}: no reconnect was reported");
    }
}

#[test]
fn blocking_nbdkit_file_restarted() {
    check_restarted::<Blocking>("blocking_nbdkit_file_restarted", false);
}

#[test]
fn mio_nbdkit_file_restarted() {
    check_restarted::<Mio>("mio_nbdkit_file_restarted", false);
}

#[test]
fn blocking_qemu_nbd_raw_restarted() {
    check_restarted::<Blocking>("blocking_qemu_nbd_raw_restarted", true);
}

// ------------------------------------------------------------------ self-test

/// A driver that flips one bit of the 20th read buffer it hands back: the
/// stress test must notice, and say how to replay.
struct FlipsABit<D> {
    inner: D,
    reads: u64,
}

impl<D: Driver> Driver for FlipsABit<D> {
    const NAME: &'static str = D::NAME;

    fn connect(uri: &str, config: Config) -> Result<Self, String> {
        Ok(FlipsABit {
            inner: D::connect(uri, config)?,
            reads: 0,
        })
    }

    fn connection(&self) -> &Connection {
        self.inner.connection()
    }

    fn issue(&mut self, op: &Op) -> Result<Cookie, String> {
        self.inner.issue(op)
    }

    fn send(&mut self) -> Result<(), String> {
        self.inner.send()
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        self.inner.wait(timeout)
    }

    fn next_completion(&mut self, preferred: Option<Cookie>) -> Option<Completion> {
        let mut done = self.inner.next_completion(preferred)?;
        if let Some(buf) = done.buffer.as_mut().filter(|b| !b.is_empty()) {
            self.reads += 1;
            if self.reads == 20 {
                let last = buf.len() - 1;
                buf[last] ^= 0x10;
            }
        }
        Some(done)
    }

    fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.inner.take_block_status(cookie)
    }

    fn finish(self) -> Result<(), String> {
        self.inner.finish()
    }
}

/// The checks can fail: a flipped bit in one read fails the run with the
/// seed, the operation and the replay command in the message.
#[test]
fn a_corrupted_read_fails_with_its_seed() {
    // A server of its own: the failed run drops its client mid-flight.
    let server = nbdkit_memory();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        stress::<FlipsABit<Blocking>>(
            Target::new(
                "a_corrupted_read_fails_with_its_seed",
                "nbdkit memory",
                &server.uri(),
            )
            .trim_reads_zero(),
        )
    }));
    let payload = outcome.expect_err("a flipped bit went unnoticed");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| format!("{payload:?}"));
    for needle in [
        "read wrong data",
        "of seed ",
        "NBD_STRESS_SEED=",
        "at operation ",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from the failure: {message}"
        );
    }
}
