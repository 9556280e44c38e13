//! tokio adapter for the `nbd-proto` NBD client: commands as futures,
//! callable from many tasks at once on one connection.
//!
//! [`Client`] is a cloneable handle to one connection. Every command is a
//! future (`client.pread(buf, offset, flags).await`), any number of them may
//! be in flight from any number of tasks, and replies complete them in
//! whatever order the server sends them. Connecting reuses `nbd-io` (every
//! [`Target`]: TCP, Unix, vsock, a server program, socket activation, a
//! socket the caller holds) without blocking the runtime; the protocol is
//! `nbd-proto`'s [`Connection`](nbd_proto::Connection), so negotiation, reply
//! checking, strict mode and the handshake, command and stall timeouts of
//! [`Config`](nbd_proto::Config) behave as in the other adapters.
//!
//! Also here: opt mode (`opt_list`, `opt_info`, `opt_go`, meta contexts),
//! export queries (`size`, `can_trim`, ...), [`MultiConn`] over several
//! connections to one export, and [`ExportFile`], an export as
//! `AsyncRead + AsyncWrite + AsyncSeek`.
//!
//! ```no_run
//! # async fn demo() -> nbd_tokio::Result<()> {
//! use bytes::BytesMut;
//! use nbd_proto::CmdFlags;
//! let client = nbd_tokio::Client::connect_uri("nbd+unix:///?socket=/tmp/nbd.sock").await?;
//! let mut tasks = Vec::new();
//! for i in 0..8u64 {
//!     let client = client.clone();
//!     tasks.push(tokio::spawn(async move {
//!         client.pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty()).await
//!     }));
//! }
//! for task in tasks {
//!     let block = task.await.expect("the task ran")?;
//!     assert_eq!(block.len(), 4096);
//! }
//! client.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Design: a driver task, the protocol state behind a lock
//!
//! One task per connection, spawned when it connects, owns the socket
//! (registered with tokio through `AsyncFd`) and is the only code that
//! reads or writes it, with `nbd_io::pump`. The
//! [`Connection`](nbd_proto::Connection) sits behind a `std::sync::Mutex`
//! held only for non-blocking calls, never across an `.await`. An `aio_`
//! call locks, queues the command in the core (which checks it and gives
//! its cookie or an error at once), opens a slot for its reply, unlocks and
//! wakes the driver; the driver writes, reads, and on each completion puts
//! the reply in its slot and wakes that command's task. The driver holds
//! the lock across its non-blocking `read` and `sendmsg` calls (the core
//! decides where each byte lands, straight into a caller's buffer), so a
//! task on another thread may wait for one such call, never for the
//! socket to become ready.
//!
//! The other design, a driver task fed commands over a channel with a
//! oneshot per command, was not chosen, for these reasons:
//!
//! - cost per command: a channel send plus a oneshot (one allocation and
//!   its reference counting) against a lock and a hash-map slot, which
//!   allocates nothing in the steady state; the lock is uncontended almost
//!   always, as every holder only runs a few non-blocking calls;
//! - errors at the call: a command the core refuses (strict mode, a range
//!   past the end, a dead or closing connection) fails in the `aio_` call
//!   itself, and the cookie is known at once, as in the other adapters;
//! - one owner of the socket all the same: readiness, timers and
//!   end-of-connection live in one task, so no task's cancellation can stop
//!   the connection from making progress, which a lock-only design (the
//!   task that polls drives) would have to hand over between tasks.
//!
//! Measured, with callgrind's instruction counts (load-independent):
//!
//! - the bookkeeping alone (`examples/bookkeeping_cost.rs`: the life of a
//!   command without I/O, one thread, no contention): about 450
//!   instructions per command for the lock with slots, about 780 for a
//!   channel with a oneshot per command and the driver's map of senders;
//! - the whole client (`examples/tokio_bench.rs`, 64 tasks each reading
//!   4 KiB at a time over one connection, through
//!   `shared/bench/instructions.sh`): about 3 400 user-space instructions
//!   per read, of which this crate's lock, slots, wakeups and futures take
//!   about 500; the rest is the core, tokio's scheduler and the system call
//!   wrappers. At the time of writing libnbd's own bench needs about
//!   17 500 per read (with its buffer zeroing) and nbd-mio about 2 700.
//!
//! # Cancel safety
//!
//! Dropping a command's future at any point never corrupts the connection:
//! NBD cannot cancel a command, so it still goes out, its reply is still
//! consumed (into the buffer the command owns) and dropped, and no later
//! command can get that reply (cookies carry a generation and are not
//! reused while a reply may arrive). A future dropped before it is first
//! polled (a plain `async fn` call) issues nothing at all; a [`Command`]
//! from an `aio_` call is already queued. What a dropped write did on the
//! server is unknown.
//!
//! # Ending
//!
//! [`Client::shutdown`] disconnects gracefully: commands in flight
//! complete, then `NBD_CMD_DISC` goes out and the call returns once the
//! socket is closed. Dropping the last clone without it never blocks or
//! panics: the driver lets the commands still in flight complete (their
//! futures, if held, get their results), says goodbye and closes (a
//! server that never answers keeps that task waiting, unless
//! `Config::stall_timeout` is set). If the runtime itself shuts down, the
//! driver's end fails every command still waiting, once.
//!
//! # Reconnect
//!
//! Opt-in, with [`Client::set_reconnect`] and a [`ReconnectPolicy`]: the
//! driver task replaces a lost connection (sleeping between attempts on
//! tokio's timer), checks that it reaches the same export, and sends the
//! unfinished commands again through `nbd_io`'s [`Journal`](nbd_io::Journal),
//! so the futures waiting for them simply complete later.
//! [`Client::take_reconnects`] tells what happened.
//!
//! # Unsafe code
//!
//! One call: tokio's `AsyncFd::register_with_interest`, which is `unsafe`
//! because the descriptor must outlive the registration. The crate passes it
//! only values that own their descriptor (`nbd_io::Socket`, `OwnedFd`), so
//! the promise holds by construction; see `src/reactor.rs`.
//!
//! The runtime must have I/O enabled, and the timer too if a timeout is
//! configured (`Builder::enable_all` does both).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod command;
mod connect;
mod driver;
mod file;
mod multi;
mod reactor;
mod reconnect;
mod shared;

pub use client::{Client, ConnectionGuard};
pub use command::{Command, Finish};
pub use file::ExportFile;
pub use multi::MultiConn;
pub use nbd_io::{
    self, Connecting, Endpoint, Error, ReconnectPolicy, Reconnected, Result, Socket, Target,
    UriPolicy,
};
pub use nbd_proto;
pub use shared::{ExportEntry, Reply};
