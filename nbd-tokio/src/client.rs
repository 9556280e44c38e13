//! [`Client`]: one NBD connection, shared by every task that holds a clone.

use std::ops::{Deref, DerefMut};
use std::pin::pin;
use std::sync::{Arc, MutexGuard};

use bytes::{Bytes, BytesMut};
use nbd_io::{Connecting, Endpoint, Error, Request, Result, Socket, Target, UriPolicy};
use nbd_proto::{BlockSizes, BlockStatus, CmdFlags, Config, Connection, ExportInfo, ReadChunk};

use crate::command::Command;
use crate::shared::{ExportEntry, Shared, State};
use crate::{connect, driver};

/// A connected NBD client: commands as futures, from any number of tasks.
///
/// `Client` is a handle: clone it into as many tasks as you like (clones
/// share one connection). Every call takes `&self`. Calls are named by the
/// workspace's rule (see `nbd_io`'s "One vocabulary in every adapter"):
///
/// - a plain command (`pread`, `pwrite`, `flush`, `trim`, `zero`, `cache`,
///   `block_status`, `pread_structured`) is an `async fn` that waits for the
///   reply; it issues nothing until first polled;
/// - an `aio_` call queues the command at once and returns a [`Command`]
///   future (with its [`Cookie`](nbd_proto::Cookie)) that resolves to the same result;
/// - arguments come in libnbd's order: buffer or count, offset, flags.
///
/// Many commands can be in flight at once; replies complete them in
/// whatever order the server sends them. Dropping a command's future is
/// safe at any point (see [`Command`]). A background task, spawned on the
/// current tokio runtime when the client connects, drives the socket.
///
/// ```no_run
/// # async fn demo() -> nbd_tokio::Result<()> {
/// use bytes::{Bytes, BytesMut};
/// use nbd_proto::CmdFlags;
/// let client = nbd_tokio::Client::connect_uri("nbd+unix:///?socket=/tmp/nbd.sock").await?;
/// client.pwrite(Bytes::from_static(b"hello"), 4096, CmdFlags::empty()).await?;
/// let head = client.pread(BytesMut::zeroed(512), 0, CmdFlags::empty()).await?;
/// // Two reads in flight at once, from one task:
/// let (a, b) = tokio::join!(
///     client.pread(BytesMut::zeroed(4096), 0, CmdFlags::empty()),
///     client.pread(BytesMut::zeroed(4096), 4096, CmdFlags::empty()),
/// );
/// client.shutdown().await?;
/// # let _ = (head, a, b); Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Lives as long as some [`Client`] clone does; its drop says goodbye.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    /// The last clone went away without [`Client::shutdown`]: the driver
    /// ends the connection as politely as it can without anyone waiting.
    /// Commands whose futures are still alive complete first (the core holds
    /// `NBD_CMD_DISC` back until nothing is in flight); in opt mode the
    /// negotiation is aborted. Never blocks.
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            if state.conn.is_negotiating() {
                state.closing = true;
                let _ = state.conn.opt_abort();
            } else if state.conn.is_ready() || state.reconnect.is_some() {
                let _ = state.ask_disconnect();
            } else if !state.is_over() {
                // Mid-handshake: nobody will ever use this connection.
                let _ = state.conn.notify_read(0);
            }
        }
        self.shared.wake_driver.notify_one();
    }
}

/// The protocol state, locked: phase, export queries, settings.
///
/// Hold it briefly and never across an `.await`: the connection's driver
/// and every other task wait for it meanwhile.
pub struct ConnectionGuard<'a> {
    state: MutexGuard<'a, State>,
}

impl Deref for ConnectionGuard<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.state.conn
    }
}

impl DerefMut for ConnectionGuard<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.state.conn
    }
}

/// Export queries answered from the handshake, one method each.
macro_rules! queries {
    ($($(#[$doc:meta])* $name:ident -> $ty:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> Result<$ty> {
            Ok(self.lock().conn.$name()?)
        }
    )*};
}

impl Client {
    // ------------------------------------------------------------ connecting

    /// Connects to an NBD URI accepted by the default [`UriPolicy`] and
    /// negotiates with the default [`Config`].
    ///
    /// ```no_run
    /// # async fn demo() -> nbd_tokio::Result<()> {
    /// let client = nbd_tokio::Client::connect_uri("nbd://localhost/disk").await?;
    /// println!("{} bytes", client.size()?);
    /// # Ok(()) }
    /// ```
    pub async fn connect_uri(uri: &str) -> Result<Client> {
        Self::connect_uri_with(uri, Config::default()).await
    }

    /// Connects to an NBD URI accepted by the default [`UriPolicy`]; its
    /// export name replaces `config.export_name`.
    pub async fn connect_uri_with(uri: &str, config: Config) -> Result<Client> {
        let endpoint = UriPolicy::default().resolve(uri)?;
        Self::connect_endpoint(&endpoint, config).await
    }

    /// Connects to what a URI resolved to (by a [`UriPolicy`] of the
    /// caller's): its target, with its export name replacing
    /// `config.export_name`. An `nbds` endpoint requires TLS, set up from
    /// its `tls-*` parameters (see [`nbd_io::tls`]); the files they name are
    /// read before connecting.
    pub async fn connect_endpoint(endpoint: &Endpoint, config: Config) -> Result<Client> {
        let conn = nbd_io::tls::connection_for(endpoint, config.clone())?;
        let socket = connect::finish(connect::start(&endpoint.target).await?).await?;
        let client = Self::connect_socket_with(socket, conn).await?;
        // What a reconnect needs (see `set_reconnect`), TLS settings included.
        client.lock().origin = Some((endpoint.clone(), config));
        Ok(client)
    }

    /// Reaches `target` without blocking the runtime (TCP tries every
    /// address in turn; a server program is started) and negotiates as
    /// `config` says. Returns once the export is ready, or, in opt mode,
    /// once the server waits for options.
    ///
    /// ```no_run
    /// # async fn demo() -> nbd_tokio::Result<()> {
    /// use nbd_tokio::{Client, Target};
    /// let target = Target::activation(["nbdkit", "memory", "1G"]);
    /// let client = Client::connect(&target, nbd_proto::Config::default()).await?;
    /// assert_eq!(client.size()?, 1 << 30);
    /// # Ok(()) }
    /// ```
    pub async fn connect(target: &Target, config: Config) -> Result<Client> {
        let client = Self::connect_with(connect::start(target).await?, config.clone()).await?;
        // What a reconnect needs (see `set_reconnect`).
        let endpoint = Endpoint {
            target: target.clone(),
            export_name: config.export_name.clone(),
            tls: None,
        };
        client.lock().origin = Some((endpoint, config));
        Ok(client)
    }

    /// Finishes a connect the caller started (for example
    /// [`Connecting::tcp`] over addresses it resolved itself), then
    /// negotiates.
    pub async fn connect_with(connecting: Connecting, config: Config) -> Result<Client> {
        let socket = connect::finish(connecting).await?;
        Self::connect_socket(socket, config).await
    }

    /// Negotiates over a socket that is already connected (libnbd's
    /// `connect_socket`), such as one made with [`Socket::from_fd`]. It is
    /// switched to non-blocking mode and owned by the client from now on.
    ///
    /// Must be called within a tokio runtime with I/O enabled (and the
    /// timer too if `config` sets a timeout): the connection's driver task
    /// is spawned on it.
    pub async fn connect_socket(socket: Socket, config: Config) -> Result<Client> {
        Self::connect_socket_with(socket, Connection::new(config)).await
    }

    /// Drives `conn`, a connection not yet started (for example one with a
    /// TLS connector, as [`nbd_io::tls::connection_for`] makes), over a
    /// socket that is already connected, until it is ready or negotiating.
    /// The same runtime needs as [`Client::connect_socket`].
    pub async fn connect_socket_with(socket: Socket, conn: Connection) -> Result<Client> {
        socket.set_nonblocking(true)?;
        let shared = Arc::new(Shared::new(conn));
        tokio::spawn(driver::run(shared.clone(), socket));
        let client = Client {
            handle: Arc::new(Handle { shared }),
        };
        client
            .wait_until(|state| state.conn.is_ready() || state.conn.is_negotiating())
            .await?;
        Ok(client)
    }

    // ------------------------------------------------------------ state

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.shared().lock()
    }

    /// The protocol state, for everything the shortcuts below do not cover
    /// (phase, negotiated facts, strict mode, the command timeout). See
    /// [`ConnectionGuard`]: never hold it across an `.await`.
    ///
    /// ```no_run
    /// # async fn demo(client: nbd_tokio::Client) {
    /// let structured = client.connection().structured_replies_negotiated();
    /// # }
    /// ```
    pub fn connection(&self) -> ConnectionGuard<'_> {
        ConnectionGuard { state: self.lock() }
    }

    queries! {
        /// The export's size in bytes.
        size -> u64;
        /// Whether the export is read-only.
        is_read_only -> bool;
        /// Whether the server supports `flush`.
        can_flush -> bool;
        /// Whether writes take the FUA flag.
        can_fua -> bool;
        /// Whether the export is on rotational media.
        is_rotational -> bool;
        /// Whether the server supports `trim`.
        can_trim -> bool;
        /// Whether the server supports `zero`.
        can_zero -> bool;
        /// Whether `zero` takes the FAST_ZERO flag.
        can_fast_zero -> bool;
        /// Whether reads take the DF flag.
        can_df -> bool;
        /// Whether several connections to the export see one another's
        /// writes (see [`MultiConn`](crate::MultiConn)).
        can_multi_conn -> bool;
        /// Whether the server supports `cache`.
        can_cache -> bool;
    }

    /// The block sizes the server announced, if it did.
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.lock().conn.block_sizes()
    }

    /// Traffic counters of this connection (libnbd's `stats_bytes_sent`,
    /// `stats_bytes_received`, `stats_chunks_sent`, `stats_chunks_received`).
    pub fn stats(&self) -> nbd_proto::Stats {
        self.lock().conn.stats()
    }

    /// Everything the handshake said about the export.
    pub fn export_info(&self) -> ExportInfo {
        self.lock().conn.export_info().clone()
    }

    /// Whether the server supports the meta context `name` (after the
    /// handshake, or `opt_set_meta_context` in opt mode).
    pub fn can_meta_context(&self, name: &str) -> bool {
        self.lock().conn.can_meta_context(name)
    }

    /// Commands issued whose replies have not arrived (a command whose
    /// future was dropped counts until its reply arrives; with reconnect
    /// on, so does a command waiting to be sent again).
    pub fn in_flight(&self) -> usize {
        self.lock().pending()
    }

    /// Whether the connection is over: closed as asked, or dead.
    pub fn is_closed(&self) -> bool {
        self.lock().is_over()
    }

    // ------------------------------------------------------------ commands

    /// Queues `request` (a read into `buffer`) and opens its slot, under
    /// one lock so the reply cannot arrive before the slot exists.
    fn issue<T>(&self, request: Request, buffer: Option<BytesMut>) -> Result<Command<T>> {
        let structured = matches!(
            request,
            Request::Read {
                structured: true,
                ..
            }
        );
        let cookie = {
            let mut state = self.lock();
            let cookie = state.issue(request, buffer)?;
            state.open_slot(cookie, structured);
            cookie
        };
        self.shared().wake_driver.notify_one();
        Ok(Command::new(self.shared().clone(), cookie))
    }

    /// Queues a read of `buf.len()` bytes at `offset` into `buf`; the
    /// command resolves to `buf`, filled.
    pub fn aio_pread(
        &self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Command<BytesMut>> {
        let request = Request::Read {
            len: buf.len(),
            offset,
            flags,
            structured: false,
        };
        self.issue(request, Some(buf))
    }

    /// Queues a read that also collects the reply's chunks (data, holes,
    /// errors with their offsets), as libnbd's `pread_structured`.
    pub fn aio_pread_structured(
        &self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Command<(BytesMut, Vec<ReadChunk>)>> {
        let request = Request::Read {
            len: buf.len(),
            offset,
            flags,
            structured: true,
        };
        self.issue(request, Some(buf))
    }

    /// Queues a write of `data` at `offset`; the payload is sent without copying.
    pub fn aio_pwrite(&self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Command<()>> {
        self.issue(
            Request::Write {
                data,
                offset,
                flags,
            },
            None,
        )
    }

    /// Queues a flush (`NBD_CMD_FLUSH`).
    pub fn aio_flush(&self, flags: CmdFlags) -> Result<Command<()>> {
        self.issue(Request::Flush { flags }, None)
    }

    /// Queues a trim of `count` bytes at `offset`.
    pub fn aio_trim(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<Command<()>> {
        let request = Request::Trim {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Queues a write of `count` zeroes at `offset`.
    pub fn aio_zero(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<Command<()>> {
        let request = Request::Zero {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Queues a cache (prefetch) of `count` bytes at `offset`.
    pub fn aio_cache(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<Command<()>> {
        let request = Request::Cache {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Queues a block status query of `count` bytes at `offset` over every
    /// negotiated meta context; resolves to one report per context.
    pub fn aio_block_status(
        &self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Command<Vec<BlockStatus>>> {
        let request = Request::BlockStatus {
            count,
            offset,
            flags,
        };
        self.issue(request, None)
    }

    /// Reads `buf.len()` bytes at `offset` straight into `buf` and hands it back.
    pub async fn pread(&self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<BytesMut> {
        self.aio_pread(buf, offset, flags)?.await
    }

    /// Reads like [`pread`](Self::pread) and also returns the reply's
    /// chunks in order (libnbd's `pread_structured`).
    pub async fn pread_structured(
        &self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<(BytesMut, Vec<ReadChunk>)> {
        self.aio_pread_structured(buf, offset, flags)?.await
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub async fn pwrite(&self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<()> {
        self.aio_pwrite(data, offset, flags)?.await
    }

    /// Flushes to stable storage the writes the server completed before it.
    pub async fn flush(&self, flags: CmdFlags) -> Result<()> {
        self.aio_flush(flags)?.await
    }

    /// Discards `count` bytes at `offset`.
    pub async fn trim(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        self.aio_trim(count, offset, flags)?.await
    }

    /// Writes `count` zeroes at `offset`.
    pub async fn zero(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        self.aio_zero(count, offset, flags)?.await
    }

    /// Asks the server to prefetch `count` bytes at `offset`.
    pub async fn cache(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        self.aio_cache(count, offset, flags)?.await
    }

    /// The status of `count` bytes at `offset` in every negotiated meta
    /// context (libnbd's `block_status_64`): one report per context, each a
    /// run of extents from `offset` (the last may run past the request).
    pub async fn block_status(
        &self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Vec<BlockStatus>> {
        self.aio_block_status(count, offset, flags)?.await
    }

    // ------------------------------------------------------------ ending

    /// Asks the server to end the connection without waiting (libnbd's
    /// `aio_disconnect`). New commands are refused from now on (ESHUTDOWN);
    /// commands in flight complete first, as the core holds
    /// `NBD_CMD_DISC` back until nothing is in flight.
    pub fn aio_disconnect(&self) -> Result<()> {
        self.lock().ask_disconnect()?;
        self.shared().wake_driver.notify_one();
        Ok(())
    }

    /// Disconnects gracefully (libnbd's `shutdown`): every command in
    /// flight completes (its future, if still held, gets its result), then
    /// `NBD_CMD_DISC` goes out and the connection closes. In opt mode the
    /// negotiation is aborted instead. Returns once the socket is closed:
    /// `Ok` if the connection ended as asked, else why it did not.
    ///
    /// Commands whose futures were dropped are still waited for (the server
    /// may still act on them), but their outcome is not reported. A server
    /// that never answers keeps this waiting unless `Config::stall_timeout`
    /// is set (or the call is wrapped in `tokio::time::timeout`).
    pub async fn shutdown(&self) -> Result<()> {
        let asked = {
            let mut state = self.lock();
            if state.conn.is_negotiating() {
                state.closing = true;
                state.conn.opt_abort()
            } else if state.conn.is_ready() || state.reconnect.is_some() {
                state.ask_disconnect()
            } else {
                Ok(())
            }
        };
        self.shared().wake_driver.notify_one();
        let ended = self.closed().await;
        asked?;
        ended
    }

    /// Waits until the connection is over and its socket closed: `Ok` if it
    /// ended as asked (disconnect, opt abort), else the error that ended it.
    pub async fn closed(&self) -> Result<()> {
        self.wait_until(|state| state.driver_done).await?;
        let state = self.lock();
        if state.conn.is_closed() {
            Ok(())
        } else {
            Err(over_error(&state))
        }
    }

    /// Waits until `done` holds for the state; if the driver ends first
    /// (nothing will change any more), the error that ended the connection
    /// (`NotConnected` if it closed without one).
    async fn wait_until(&self, done: impl Fn(&State) -> bool) -> Result<()> {
        let shared = self.shared();
        loop {
            let mut changed = pin!(shared.changed.notified());
            // Registered before the state is read: a change after the read
            // still wakes this task.
            changed.as_mut().enable();
            {
                let state = shared.lock();
                if done(&state) {
                    return Ok(());
                }
                if state.driver_done {
                    return Err(over_error(&state));
                }
            }
            changed.await;
        }
    }

    // ------------------------------------------------------------ opt mode

    /// Sends one option with `issue` and waits for its result.
    async fn option(&self, issue: impl FnOnce(&mut State) -> nbd_proto::Result<()>) -> Result<()> {
        self.option_until(issue, |_| false).await
    }

    /// Sends one option with `issue` and waits for its result, or until
    /// `also_done` holds (`GO` succeeds with the connection ready, not with
    /// a result of its own).
    async fn option_until(
        &self,
        issue: impl FnOnce(&mut State) -> nbd_proto::Result<()>,
        also_done: impl Fn(&State) -> bool,
    ) -> Result<()> {
        {
            let mut state = self.lock();
            state.option_result = None;
            state.exports.clear();
            state.contexts.clear();
            issue(&mut state)?;
        }
        self.shared().wake_driver.notify_one();
        self.wait_until(|state| state.option_result.is_some() || also_done(state))
            .await?;
        let result = self.lock().option_result.take();
        Ok(result.unwrap_or(Ok(()))?)
    }

    /// Lists the server's exports (opt mode).
    pub async fn opt_list(&self) -> Result<Vec<ExportEntry>> {
        self.option(|s| s.conn.opt_list()).await?;
        Ok(std::mem::take(&mut self.lock().exports))
    }

    /// Asks about the current export; afterwards the export queries answer (opt mode).
    pub async fn opt_info(&self) -> Result<()> {
        self.option(|s| s.conn.opt_info()).await
    }

    /// Asks for structured replies (opt mode).
    pub async fn opt_structured_reply(&self) -> Result<()> {
        self.option(|s| s.conn.opt_structured_reply()).await
    }

    /// Asks for extended headers (opt mode).
    pub async fn opt_extended_headers(&self) -> Result<()> {
        self.option(|s| s.conn.opt_extended_headers()).await
    }

    /// Lists the meta contexts matching `queries` (all, if empty) (opt mode).
    pub async fn opt_list_meta_context(&self, queries: &[String]) -> Result<Vec<String>> {
        self.option(|s| s.conn.opt_list_meta_context_queries(queries))
            .await?;
        let contexts = std::mem::take(&mut self.lock().contexts);
        Ok(contexts.into_iter().map(|(_, name)| name).collect())
    }

    /// Selects the meta contexts matching `queries` for the current export;
    /// returns the selected ones with their ids (opt mode).
    pub async fn opt_set_meta_context(&self, queries: &[String]) -> Result<Vec<(u32, String)>> {
        self.option(|s| s.conn.opt_set_meta_context_queries(queries))
            .await?;
        Ok(std::mem::take(&mut self.lock().contexts))
    }

    /// Selects the current export and enters transmission (opt mode). On
    /// refusal the error is returned and the connection stays negotiating.
    pub async fn opt_go(&self) -> Result<()> {
        self.option_until(|s| s.conn.opt_go(), |s| s.conn.is_ready())
            .await
    }

    /// Ends the negotiation without transmission and waits for the close (opt mode).
    pub async fn opt_abort(&self) -> Result<()> {
        self.lock().conn.opt_abort()?;
        self.shared().wake_driver.notify_one();
        self.closed().await
    }

    /// Changes the export name used by `opt_info` and `opt_go` (opt mode).
    pub fn set_export_name(&self, name: &str) -> Result<()> {
        Ok(self.lock().conn.set_export_name(name)?)
    }
}

/// Why a connection that is over cannot do what was waited for.
fn over_error(state: &State) -> Error {
    match state.conn.error() {
        Some(e) => e.clone().into(),
        None => nbd_proto::Error::NotConnected("the connection is closed".into()).into(),
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Client").field(&self.lock().conn).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if every future of the client can move between
    /// threads, so that `tokio::spawn` takes them.
    #[allow(dead_code)]
    fn futures_are_send(client: &Client) {
        fn send<T: Send>(_: T) {}
        send(Client::connect_uri("nbd://localhost"));
        send(client.pread(BytesMut::new(), 0, CmdFlags::empty()));
        send(client.pread_structured(BytesMut::new(), 0, CmdFlags::empty()));
        send(client.pwrite(Bytes::new(), 0, CmdFlags::empty()));
        send(client.flush(CmdFlags::empty()));
        send(client.block_status(1, 0, CmdFlags::empty()));
        send(client.shutdown());
        send(client.closed());
        send(client.opt_list());
        send(client.opt_go());
        send(client.opt_set_meta_context(&[]));
        send(client.aio_pread(BytesMut::new(), 0, CmdFlags::empty()));
    }

    #[test]
    fn a_client_is_send_and_sync() {
        fn both<T: Send + Sync + Clone>() {}
        both::<Client>();
        both::<crate::MultiConn>();
    }
}
