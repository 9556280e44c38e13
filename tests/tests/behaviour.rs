//! One behavioural suite, run through every I/O adapter of the client: the
//! blocking `nbd_blocking::Client`, the mio `nbd_mio::Client` and the tokio
//! `nbd_tokio::Client`.
//!
//! The test bodies live once, in `behaviour/suite.rs`, and call each
//! adapter's own `aio_` calls (`h.client.aio_pread(..)`, ...): the vocabulary
//! the adapters share (see `nbd_io`'s "One vocabulary in every adapter"). No
//! trait stands between the tests and the adapters; what differs between
//! them, how they wait, is a small harness per adapter:
//!
//! - `behaviour/blocking.rs`: the client, waiting with `Client::poll`;
//! - `behaviour/mio.rs`: the client with a mio `Poll` of its own, waiting with
//!   `Poll::poll` and `Client::handle_event`, as an application's loop would;
//! - `behaviour/tokio.rs`: the client's futures, kept by the harness and
//!   polled inside `step` on a runtime of the harness's own (`tokio/aio.rs`).
//!
//! Each harness module mounts `suite.rs` as its child `suite`, so every
//! scenario is one `#[test]` per adapter (`blocking::suite::NAME`,
//! `mio::suite::NAME`, `tokio::suite::NAME`) and every adapter must pass exactly the same
//! assertions against the same servers: nbdkit (memory, pattern, eval with
//! delays, error and delay filters), qemu-nbd (raw and qcow2 images) and
//! nbd-server (simple replies only).
//!
//! A harness provides, besides its `client` field: `NAME`, `Client` (the
//! adapter's client type), `Harness::connect(uri, config)` (connected and
//! negotiated), `send()` (start writing the queued requests), `step(timeout)`
//! (wait at most `timeout` once and move what can move) and
//! `take_block_status(cookie)`. The suite builds every bounded wait on `step`.

use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;

#[path = "behaviour/blocking.rs"]
mod blocking;
#[path = "behaviour/mio.rs"]
mod mio;
#[path = "behaviour/tokio.rs"]
mod tokio;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The longest the suite waits for anything (a handshake, a command, a
/// close) before it fails saying what it waited for: a bound that turns a
/// hang into a failure, not a speed the test expects.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// A finished command of a batch: its index in the batch, result and buffer.
#[derive(Debug)]
struct Done {
    /// Position of the command's cookie in the batch.
    index: usize,
    /// The command's result.
    result: Result<(), nbd_proto::Error>,
    /// The read buffer (reads only).
    buffer: Option<BytesMut>,
}

/// Asserts that `result` failed with `errno`.
fn assert_errno<T: std::fmt::Debug>(
    result: nbd_io::Result<T>,
    errno: nbd_proto::Errno,
    what: &str,
) {
    let err = result.expect_err(what);
    assert_eq!(err.errno(), Some(errno), "{what}: {err}");
}

/// `(major, minor)` of `PROGRAM --version` (the first `N.N` in its output).
fn tool_version(program: &str) -> (u32, u32) {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{program} --version: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| {
            let mut parts = word.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
        .unwrap_or_else(|| panic!("no version in {program} --version: {text}"))
}
