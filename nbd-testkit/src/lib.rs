//! Test support for the NBD client workspace.
//!
//! - [`FakeServer`]: a well-behaved, sans-IO NBD server over an in-memory
//!   [`Image`]. It answers by itself, in every handshake style, with simple,
//!   structured or extended replies, meta contexts (`base:allocation`) and
//!   block status, optionally splitting read replies into chunks and holes
//!   and answering out of order. Tests of misbehaving servers keep using
//!   scripted bytes; this one is for running real workloads.
//! - [`Pair`]: a client `nbd_proto::Connection` wired to a `FakeServer` in
//!   memory, with seeded random splitting of both byte streams.
//! - [`spawn_unix`], [`serve_socket`], [`UnixServer`]: the same server over
//!   real Unix sockets, for the adapters' tests and for libnbd's tools.
//! - [`Rng`]: the one seeded generator for tests (splitmix64).
//! - [`StartTlsServer`], [`XorSession`]: `NBD_OPT_STARTTLS` in memory, with a
//!   toy cipher behind `nbd_proto::TlsSession`, honest or hostile.
//!
//! ```
//! use nbd_proto::{CmdFlags, Config};
//! use nbd_testkit::{FakeServer, Pair};
//!
//! let server = FakeServer::builder().size(1 << 16).chaotic().seed(9).build();
//! let mut pair = Pair::new(Config::default(), server).with_splits(9, 7);
//! pair.handshake().unwrap();
//! assert!(pair.client.extended_headers_negotiated());
//! let cookie = pair.client.zero(4096, 0, CmdFlags::empty()).unwrap();
//! assert!(pair.wait(cookie).unwrap().result.is_ok());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod image;
mod pair;
mod rng;
mod server;
mod socket;
mod starttls;

pub use image::{lock, Image, SharedImage};
pub use pair::Pair;
pub use rng::{Rng, SEED_VAR};
pub use server::{
    Builder, ExportSpec, FakeServer, Style, BASE_ALLOCATION_ID, MAX_EXTENTS, MAX_OPTION_DATA,
    MAX_PAYLOAD,
};
pub use socket::{serve_socket, spawn_unix, UnixServer};
pub use starttls::{xor, xor_connector, StartTls, StartTlsServer, XorSession, XOR_KEY};
