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
//! checks of every command before it is sent; a zero-copy data path; TLS
//! through `NBD_OPT_STARTTLS` ([`Config::tls`], [`Connection::opt_starttls`])
//! with a [`TlsSession`] from a [`TlsConnector`] the caller gives, and no way
//! to downgrade a connection that requires it.
//!
//! A minimal driving loop, with `sock` any `Read + Write`:
//!
//! ```no_run
//! # use std::io::{Read, Write};
//! # fn drive(sock: &mut (impl Read + Write)) -> Result<(), Box<dyn std::error::Error>> {
//! use nbd_proto::{Config, Connection, Event};
//! let mut conn = Connection::new(Config::default());
//! while !conn.is_ready() {
//!     if conn.direction().is_write() {
//!         conn.write_to(|iov| sock.write_vectored(iov))?;
//!     } else if conn.read_from(|buf| sock.read(buf))? == 0 {
//!         // End of stream: the connection reports why below.
//!     }
//!     while let Some(event) = conn.poll_event() {
//!         if let Event::Closed { error } = event {
//!             return Err(error.map_or("closed".into(), Into::into));
//!         }
//!     }
//! }
//! println!("export size {}", conn.size()?);
//! # Ok(()) }
//! ```
//!
//! Settings are a [`Config`], built from its default with one chained call
//! per setting (`Config::default().export_name("disk").opt_mode(true)`).
//! Option results name the option as an [`NbdOption`], and a server's refusal
//! its reason as an [`OptionReplyError`]; [`Event`], [`ReadChunk`] and the
//! structs only the connection builds are `#[non_exhaustive]`, so new
//! kinds can be added without breaking a caller's `match`.
//!
//! The byte calls can also be made separately (`recv_buf` then `notify_read`,
//! `output` then `notify_write`) for adapters that need the regions
//! themselves; a report that does not match what was offered is an
//! [`Error::InvalidArgument`] (EINVAL) that changes nothing.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buffer;
mod config;
mod connection;
pub mod context;
mod cookie_hash;
mod core;
mod coverage;
mod deadline;
mod error;
mod event;
mod flags;
mod info;
mod negotiate;
mod opt;
mod output;
mod slab;
mod stage;
mod stats;
mod tls;
mod trace;
mod transmit;
pub mod uri;
pub mod wire;

pub use buffer::{aligned_zeroed, BUFFER_ALIGN};
pub use config::Config;
pub use connection::{Connection, Direction, Phase};
pub use cookie_hash::{CookieHasher, CookieMap, CookieSet};
pub use error::{Errno, Error, Result, ServerText};
pub use event::{BlockStatus, Completion, Event, ReadChunk};
pub use flags::{CmdFlags, HandshakeFlags, Strict, TransmissionFlags};
pub use info::{BlockSizes, ExportInfo, HandshakeStyle};
pub use opt::{NbdOption, OptionReplyError};
pub use slab::Cookie;
pub use stats::Stats;
pub use tls::{TlsConnector, TlsMode, TlsSession};
pub use transmit::{MAX_ERROR_PAYLOAD, MAX_REQUEST_SIZE, MAX_STATUS_PAYLOAD};
pub use wire::Extent;
