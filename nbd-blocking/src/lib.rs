//! Blocking adapter for the `nbd-proto` NBD client.
//!
//! [`Client`] reaches a server through `nbd-io` (TCP, Unix sockets, vsock,
//! an NBD URI, a socket the caller holds, a server program it starts),
//! negotiates, and offers blocking calls for every command, an aio-style API
//! for many commands in flight, and the opt-mode calls. [`ExportFile`] makes
//! an export a `Read + Write + Seek` object. Connecting, the byte pump and
//! the [`Error`] type are `nbd-io`'s; this crate only decides how to wait
//! (poll(2)).
//!
//! Calls follow `nbd-io`'s one vocabulary: a plain call waits for its
//! result, an `aio_` call queues and returns at once, and arguments come in
//! libnbd's order (buffer or count, offset, flags).
//!
//! ```no_run
//! use bytes::BytesMut;
//! use nbd_blocking::Client;
//! use nbd_proto::CmdFlags;
//!
//! let mut client = Client::connect_uri("nbd://127.0.0.1:10809/disk")?;
//! println!("{} bytes", client.size()?);
//! // Zero-copy: the reply lands in this buffer, which comes back.
//! let buf = client.pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())?;
//! assert_eq!(buf.len(), 4096);
//!
//! // Many in flight: queue, then collect completions.
//! let cookies: Vec<_> = (0..8)
//!     .map(|i| client.aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty()))
//!     .collect::<Result<_, _>>()?;
//! for cookie in cookies {
//!     client.wait_for(cookie)?.result?;
//! }
//! client.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod file;
mod reconnect;
mod wait;

pub use client::{Client, ExportEntry};
pub use file::ExportFile;
pub use nbd_io::{self, Error, ReconnectPolicy, Reconnected, Result, Socket, Target, UriPolicy};
pub use nbd_proto;

/// The README's example, compiled as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExample;
