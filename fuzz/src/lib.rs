//! Fuzz harnesses for nbd-proto, shared by the libFuzzer targets and the corpus replay tests.
//!
//! Two targets, each a plain function of the fuzzer's bytes that panics when an
//! invariant breaks:
//!
//! - [`server_bytes()`]: arbitrary bytes are the server's stream, after a short
//!   header that picks the client's configuration, a script of calls, and how
//!   the stream is cut (see [`server_bytes`](mod@server_bytes)).
//! - [`structured()`]: a scripted server built from `arbitrary`-derived actions
//!   with the `nbd_proto::wire` encoders, which also checks the content of
//!   every successful read (see [`structured`](mod@structured)).
//!
//! Both drive two connections, one through `handle_input` and one through
//! `recv_buf` / `notify_read`, and compare them step by step; [`Driver`] lists
//! every invariant checked. [`seeds`] writes the seed corpus.

pub mod driver;
pub mod encode;
pub mod rng;
pub mod seeds;
pub mod server_bytes;
pub mod structured;

pub use driver::{Driver, Op, OpKind, Report};

/// The `server_bytes` target: runs one input, panicking if an invariant breaks.
pub fn server_bytes(data: &[u8]) -> Report {
    server_bytes::run(data)
}

/// The `structured` target: runs one input, panicking if an invariant breaks.
/// `None` when the bytes do not decode (they always do with `arbitrary` 1.x).
pub fn structured(data: &[u8]) -> Option<Report> {
    structured::run_bytes(data)
}
