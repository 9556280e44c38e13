//! Model-based stress test ("never hang, never panic"): a seeded random mix
//! of every data command at random offsets and lengths, 1 to 256 in flight,
//! completions taken in any order, each read checked byte for byte against a
//! model of the export (see `nbd_tests::stress`).
//!
//! One test per adapter and server, so a failure names both:
//! `blocking_*` drives `nbd_blocking::Client`'s aio calls with `poll`,
//! `mio_*` drives `nbd_mio::Client` in a mio `Poll` loop; the servers are
//! nbdkit's memory plugin, qemu-nbd on a raw and on a qcow2 image, and
//! nbd-server.
//!
//! `NBD_STRESS_OPS=N` sets the operations per test (default
//! `nbd_tests::stress::DEFAULT_OPS`), `NBD_STRESS_SEED=S` replays a seed;
//! each test prints its seed and, at the end, how many operations passed.
//! Long runs: `NBD_STRESS_OPS=1000000 cargo test --release -p nbd-tests
//! --test stress blocking_nbdkit_memory -- --nocapture`.

use nbd_tests::stress::{stress, Blocking, Driver, Kind, Mio, Settings, Summary};
use nbd_tests::{
    ImageFormat, NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder, ServerHandle,
};

/// Some MiB (room for 256 small commands in flight without overlaps), with an odd tail so requests also end at an unaligned export end.
const SIZE: u64 = (16 << 20) + 1234;
/// qemu images are whole sectors.
const QEMU_SIZE: u64 = (16 << 20) + 4608;

fn nbdkit_memory() -> ServerHandle {
    NbdkitBuilder::memory(SIZE).start()
}

fn qemu_nbd(format: ImageFormat) -> ServerHandle {
    // Discards reach the image (punched holes, freed clusters) instead of
    // being ignored, the default; trimmed bytes are still never relied on.
    QemuNbdBuilder::new(format, QEMU_SIZE)
        .arg("--discard=unmap")
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

/// Runs the stress test and checks that it did what it claims: every
/// operation passed, and with enough of them, reads and writes were both
/// exercised with more than one command in flight.
fn check<D: Driver>(test: &str, server: &ServerHandle, what: &str, trim_reads_zero: bool) {
    let summary: Summary = stress::<D>(test, what, &server.uri(), trim_reads_zero);
    let ops = Settings::from_env().ops;
    assert_eq!(summary.operations, ops, "{test}: operations run");
    assert!(summary.sweep_reads > 0, "{test}: the export was read back");
    if ops >= 1000 {
        let mut kinds = vec![Kind::Read, Kind::Write];
        if summary.limits.block_status {
            kinds.push(Kind::BlockStatus);
        }
        for kind in kinds {
            assert!(
                summary.tally.get(&kind).copied().unwrap_or(0) > 0,
                "{test}: no {kind:?} in {ops} operations: {:?}",
                summary.tally
            );
        }
        assert!(
            summary.max_depth > 1,
            "{test}: never more than one in flight"
        );
    }
}

// ------------------------------------------------------------------ blocking

#[test]
fn blocking_nbdkit_memory() {
    let server = nbdkit_memory();
    // The memory plugin frees trimmed pages: they read back as zeroes.
    check::<Blocking>("blocking_nbdkit_memory", &server, "nbdkit memory", true);
}

#[test]
fn blocking_qemu_nbd_raw() {
    let server = qemu_nbd(ImageFormat::Raw);
    check::<Blocking>("blocking_qemu_nbd_raw", &server, "qemu-nbd raw", false);
}

#[test]
fn blocking_qemu_nbd_qcow2() {
    let server = qemu_nbd(ImageFormat::Qcow2);
    check::<Blocking>("blocking_qemu_nbd_qcow2", &server, "qemu-nbd qcow2", false);
}

#[test]
fn blocking_nbd_server() {
    let server = nbd_server();
    check::<Blocking>("blocking_nbd_server", &server, "nbd-server", false);
}

// ------------------------------------------------------------------ mio

#[test]
fn mio_nbdkit_memory() {
    let server = nbdkit_memory();
    check::<Mio>("mio_nbdkit_memory", &server, "nbdkit memory", true);
}

#[test]
fn mio_qemu_nbd_raw() {
    let server = qemu_nbd(ImageFormat::Raw);
    check::<Mio>("mio_qemu_nbd_raw", &server, "qemu-nbd raw", false);
}

#[test]
fn mio_qemu_nbd_qcow2() {
    let server = qemu_nbd(ImageFormat::Qcow2);
    check::<Mio>("mio_qemu_nbd_qcow2", &server, "qemu-nbd qcow2", false);
}

#[test]
fn mio_nbd_server() {
    let server = nbd_server();
    check::<Mio>("mio_nbd_server", &server, "nbd-server", false);
}
