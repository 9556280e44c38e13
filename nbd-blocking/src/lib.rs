//! Blocking adapter for the `nbd-proto` NBD client.
//!
//! [`Client`] connects over TCP, a Unix socket or an NBD URI, negotiates, and
//! offers blocking calls for every command, an aio-style API for many commands
//! in flight, and the opt-mode calls. [`ExportFile`] makes an export a
//! `Read + Write + Seek` object.
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
//! // Many in flight: submit, then collect completions.
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
mod error;
mod file;
mod stream;

pub use client::{Client, ExportEntry};
pub use error::{Error, Result};
pub use file::ExportFile;
pub use nbd_proto;
pub use stream::Stream;
