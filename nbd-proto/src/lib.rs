//! Sans-IO client for the Network Block Device (NBD) protocol.
//!
//! [`Connection`] is a pure state machine: it consumes server bytes, produces
//! client bytes and reports [`Event`]s. It owns no socket, thread or clock, so any
//! event loop (or none) can drive it; `nbd-blocking` and `nbd-mio` are two such
//! adapters. The protocol is the one of doc/proto.md of the NBD project; names
//! follow libnbd where Rust idiom allows (`pread`, `can_trim`, `opt_go`, strict
//! mode bits).
//!
//! What it covers: oldstyle, newstyle and fixed newstyle handshakes; automatic
//! negotiation or libnbd-style opt mode (`opt_list`, `opt_info`, `opt_go`,
//! `opt_structured_reply`, `opt_abort`); simple and structured replies with
//! every reply checked before a byte lands in a caller's buffer; strict-mode
//! checks of every command before it is sent; a zero-copy data path.
//!
//! A minimal driving loop, with `sock` any `Read + Write`:
//!
//! ```no_run
//! # use std::io::{IoSlice, Read, Write};
//! # fn drive(sock: &mut (impl Read + Write)) -> Result<(), Box<dyn std::error::Error>> {
//! use nbd_proto::{Config, Connection, Event};
//! let mut conn = Connection::new(Config::default());
//! while !conn.is_ready() {
//!     if conn.direction().is_write() {
//!         let mut iov = [IoSlice::new(&[]); 16];
//!         let n = conn.output(&mut iov);
//!         let written = sock.write_vectored(&iov[..n])?;
//!         conn.notify_write(written);
//!     } else {
//!         let n = sock.read(conn.recv_buf())?;
//!         conn.notify_read(n)?;
//!     }
//!     while let Some(event) = conn.poll_event() {
//!         if let Event::Closed { error: Some(e) } = event {
//!             return Err(e.into());
//!         }
//!     }
//! }
//! println!("export size {}", conn.size()?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod connection;
mod coverage;
mod error;
mod event;
mod flags;
mod info;
mod negotiate;
mod output;
mod slab;
mod stage;
mod tls;
mod transmit;
pub mod uri;
pub mod wire;

pub use config::Config;
pub use connection::{Connection, Direction, Phase};
pub use error::{Errno, Error, Result, ServerText};
pub use event::{BlockStatus, Completion, Event, ReadChunk};
pub use flags::{CmdFlags, HandshakeFlags, Strict, TransmissionFlags};
pub use info::{BlockSizes, ExportInfo, HandshakeStyle};
pub use slab::Cookie;
pub use tls::TlsSession;
pub use transmit::{MAX_ERROR_PAYLOAD, MAX_REQUEST_SIZE, MAX_STATUS_PAYLOAD};
pub use wire::Extent;
