//! [`MultiConn`]: several connections to one multi-conn export, used as one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nbd_io::{Endpoint, Error, Result, UriPolicy};
use nbd_proto::{BlockStatus, CmdFlags, Config, ReadChunk};

use crate::client::Client;
use crate::command::Command;

/// N connections to one export whose server advertises multi-conn, used
/// as one client: each command goes to the next connection in turn.
///
/// A cheap handle, like [`Client`]: clones share the connections. With
/// multi-conn the server promises that the connections see one another's
/// writes, and that a flush on any connection covers every write completed
/// (on any connection) before it; so, as on one connection, await the
/// writes a flush must cover before issuing it.
///
/// ```no_run
/// # async fn demo() -> nbd_tokio::Result<()> {
/// use bytes::BytesMut;
/// use nbd_proto::{CmdFlags, Config};
/// let multi = nbd_tokio::MultiConn::connect_uri("nbd://localhost/disk", 4, Config::default()).await?;
/// let block = multi.pread(BytesMut::zeroed(4096), 0, CmdFlags::empty()).await?;
/// multi.shutdown().await?;
/// # let _ = block; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MultiConn {
    clients: Arc<[Client]>,
    next: Arc<AtomicUsize>,
}

impl MultiConn {
    /// Opens `count` connections to `uri` (accepted by the default
    /// [`UriPolicy`]; its export name replaces `config.export_name`).
    pub async fn connect_uri(uri: &str, count: usize, config: Config) -> Result<Self> {
        let endpoint = UriPolicy::default().resolve(uri)?;
        Self::connect_endpoint(&endpoint, count, config).await
    }

    /// Opens `count` connections to `endpoint`. More than one needs a
    /// server that advertises multi-conn for the export
    /// ([`Error::Unsupported`] otherwise, before the others are opened).
    pub async fn connect_endpoint(
        endpoint: &Endpoint,
        count: usize,
        config: Config,
    ) -> Result<Self> {
        if count == 0 {
            return Err(no_connection());
        }
        let first = Client::connect_endpoint(endpoint, config.clone()).await?;
        if count > 1 && !first.can_multi_conn()? {
            let _ = first.shutdown().await;
            return Err(Error::Unsupported(format!(
                "{}: the export does not advertise multi-conn",
                endpoint.target
            )));
        }
        let mut clients = vec![first];
        for _ in 1..count {
            clients.push(Client::connect_endpoint(endpoint, config.clone()).await?);
        }
        Self::from_clients(clients)
    }

    /// Uses connections the caller opened (to one multi-conn export); an
    /// empty list is an error (EINVAL).
    pub fn from_clients(clients: Vec<Client>) -> Result<Self> {
        if clients.is_empty() {
            return Err(no_connection());
        }
        Ok(MultiConn {
            clients: clients.into(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The connections, in the order commands go round them.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// The connection the next command goes to.
    fn pick(&self) -> &Client {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[at]
    }

    /// The export's size (from the first connection's handshake).
    pub fn size(&self) -> Result<u64> {
        self.clients[0].size()
    }

    /// Commands in flight over all the connections.
    pub fn in_flight(&self) -> usize {
        self.clients.iter().map(Client::in_flight).sum()
    }

    /// [`Client::aio_pread`] on the next connection.
    pub fn aio_pread(
        &self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Command<BytesMut>> {
        self.pick().aio_pread(buf, offset, flags)
    }

    /// [`Client::aio_pwrite`] on the next connection.
    pub fn aio_pwrite(&self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Command<()>> {
        self.pick().aio_pwrite(data, offset, flags)
    }

    /// [`Client::pread`] on the next connection.
    pub async fn pread(&self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<BytesMut> {
        self.pick().pread(buf, offset, flags).await
    }

    /// [`Client::pread_structured`] on the next connection.
    pub async fn pread_structured(
        &self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<(BytesMut, Vec<ReadChunk>)> {
        self.pick().pread_structured(buf, offset, flags).await
    }

    /// [`Client::pwrite`] on the next connection.
    pub async fn pwrite(&self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<()> {
        self.pick().pwrite(data, offset, flags).await
    }

    /// [`Client::flush`] on the next connection: with multi-conn it covers
    /// the writes every connection completed before it.
    pub async fn flush(&self, flags: CmdFlags) -> Result<()> {
        self.pick().flush(flags).await
    }

    /// [`Client::trim`] on the next connection.
    pub async fn trim(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        self.pick().trim(count, offset, flags).await
    }

    /// [`Client::zero`] on the next connection.
    pub async fn zero(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        self.pick().zero(count, offset, flags).await
    }

    /// [`Client::cache`] on the next connection.
    pub async fn cache(&self, count: u64, offset: u64, flags: CmdFlags) -> Result<()> {
        self.pick().cache(count, offset, flags).await
    }

    /// [`Client::block_status`] on the next connection.
    pub async fn block_status(
        &self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Vec<BlockStatus>> {
        self.pick().block_status(count, offset, flags).await
    }

    /// Disconnects every connection gracefully (see [`Client::shutdown`]);
    /// the first failure, after all of them have ended.
    pub async fn shutdown(&self) -> Result<()> {
        for client in self.clients.iter() {
            // Every connection starts ending before any is waited for.
            let _ = client.aio_disconnect();
        }
        let mut first = Ok(());
        for client in self.clients.iter() {
            let ended = client.shutdown().await;
            if first.is_ok() {
                first = ended;
            }
        }
        first
    }
}

fn no_connection() -> Error {
    nbd_proto::Error::InvalidArgument("a MultiConn needs at least one connection".into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_connections_is_an_error_not_a_panic() {
        let err = MultiConn::from_clients(Vec::new()).unwrap_err();
        assert_eq!(err.errno(), Some(nbd_proto::Errno::Inval), "{err}");
    }
}
