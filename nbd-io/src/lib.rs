//! The I/O that every adapter of the `nbd-proto` core shares.
//!
//! `nbd-proto` is a pure protocol state machine; the adapters (`nbd-blocking`,
//! `nbd-mio`) differ only in how they wait. Everything else about reaching a
//! server lives here, once:
//!
//! - [`Target`]: where a server is: TCP (every resolved address in turn),
//!   Unix sockets (paths and Linux abstract names), `AF_VSOCK`, a server
//!   program on a socket pair (libnbd's `connect_command`), or a server started
//!   by systemd-style socket activation (libnbd's
//!   `connect_systemd_socket_activation`);
//! - [`connect`]: reach a target, with errors that name it; [`Connecting`]:
//!   the same without blocking, for event-loop adapters; [`connect_within`]:
//!   a blocking connect bounded by a deadline;
//! - [`Socket`]: the connected stream, whatever reached it, including a
//!   socket the caller already holds ([`Socket::from_fd`], libnbd's
//!   `connect_socket`); it owns any server process it started and stops it
//!   when dropped;
//! - [`UriPolicy`]: which NBD URIs a program accepts (libnbd's
//!   `set_uri_allow_transports`, `set_uri_allow_tls`,
//!   `set_uri_allow_local_file`), with every query parameter of the URI
//!   specification recognised and any other diagnosed;
//! - [`pump`]: the byte pump between a socket and an `nbd_proto::Connection`;
//! - automatic reconnect, opt-in: a [`ReconnectPolicy`], the check that a
//!   new connection reaches the same export ([`ExportIdentity`]), and the
//!   [`Journal`] of unfinished commands that an adapter sends again;
//! - [`tls`]: the TLS backends (X.509 with rustls, PSK with OpenSSL) behind
//!   the core's session seam, and [`tls::connection_for`], the connection an
//!   endpoint asks for;
//! - [`Error`]: one error type.
//!
//! # One vocabulary in every adapter
//!
//! The adapters name their calls by one rule, libnbd's:
//!
//! - a plain command call (`pread`, `pwrite`, `flush`, `trim`, `zero`,
//!   `cache`, `block_status`, `opt_go`, `opt_list`, `shutdown`, ...) waits
//!   for its result and returns it; an adapter that cannot wait (mio) has none;
//! - an `aio_` call (`aio_pread`, ..., `aio_opt_go`, `aio_disconnect`) queues
//!   the request and returns at once, with a `Cookie` for a command; its
//!   result is taken later (`next_completion`, `take_completion`, or events);
//! - arguments come in libnbd's order, the same in every adapter: the buffer,
//!   data or count, then the offset, then the `CmdFlags` (`flush` and
//!   `aio_flush` take flags too);
//! - export queries (`size`, `can_trim`, `is_read_only`, ...) are those of
//!   `nbd_proto::Connection`, reached through each client's `connection()`.
//!
//! ```no_run
//! use nbd_io::{connect, UriPolicy};
//! let endpoint = UriPolicy::default().resolve("nbd+unix:///disk?socket=/run/nbd.sock")?;
//! let socket = connect(&endpoint.target)?;
//! // Hand `socket` to an adapter, or drive an `nbd_proto::Connection` over it.
//! # Ok::<(), nbd_io::Error>(())
//! ```

mod connect;
mod connect_within;
mod error;
mod nonblocking;
mod overlap;
mod policy;
pub mod pump;
mod reconnect;
mod server;
mod socket;
mod target;
pub mod tls;

pub use connect::connect;
pub use connect_within::connect_within;
pub use error::{Error, Result};
pub use nonblocking::{Connecting, Progress};
pub use policy::{Endpoint, TlsKind, TlsRequest, Transports, UriPolicy, UriTls};
pub use reconnect::{
    refuse_in_flight, ExportIdentity, Journal, Prepared, ReconnectPolicy, Reconnected, Request,
    DEFAULT_REPLAY_BUDGET, REPLAY_ENTRY_COST,
};
pub use socket::Socket;
pub use target::Target;
