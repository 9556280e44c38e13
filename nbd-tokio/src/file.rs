//! [`ExportFile`]: an export as `AsyncRead + AsyncWrite + AsyncSeek`.

use std::future::Future;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use nbd_proto::CmdFlags;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::client::Client;
use crate::command::Command;

/// Largest single request the file sends.
const FILE_CHUNK: usize = 4 * 1024 * 1024;

/// An export with a cursor, for `tokio::io::copy` and the rest of
/// tokio's I/O toolbox.
///
/// Reads stop at the end of the export (returning 0 bytes); writes past the
/// end fail, since an export cannot grow. As with `tokio::fs::File`, a
/// write returns once its request is queued; its acknowledgement is awaited
/// by the next call (which reports its failure) and by `flush`, which also
/// sends `NBD_CMD_FLUSH` when the server supports it. So `Ok` from `flush`
/// or `shutdown` means every write made through this file was
/// acknowledged. `shutdown` flushes; the connection stays open (other
/// clones of the client may use it).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::AsyncWriteExt;
/// let client = nbd_tokio::Client::connect_uri("nbd+unix:///?socket=/tmp/nbd.sock").await?;
/// let mut export = nbd_tokio::ExportFile::new(client.clone())?;
/// let image = vec![0x55u8; 1 << 20];
/// tokio::io::copy(&mut &image[..], &mut export).await?;
/// export.flush().await?;
/// client.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ExportFile {
    client: Client,
    pos: u64,
    size: u64,
    /// A read under way, and the offset it reads from.
    read: Option<(u64, Command<BytesMut>)>,
    /// A write queued and not yet acknowledged.
    write: Option<Command<()>>,
    /// A flush under way.
    flush: Option<Command<()>>,
}

impl ExportFile {
    /// Wraps a connected client, cursor at 0.
    pub fn new(client: Client) -> crate::Result<Self> {
        let size = client.size()?;
        Ok(ExportFile {
            client,
            pos: 0,
            size,
            read: None,
            write: None,
            flush: None,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The largest request to send: [`FILE_CHUNK`], or less if the server's
    /// maximum block size says so.
    fn max_request(&self) -> usize {
        self.client
            .block_sizes()
            .map_or(FILE_CHUNK, |sizes| FILE_CHUNK.min(sizes.maximum as usize))
            .max(1)
    }

    /// Waits for the queued write's acknowledgement, if any.
    fn poll_write_done(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(write) = self.write.as_mut() {
            let result = ready!(Pin::new(write).poll(cx));
            self.write = None;
            result.map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ExportFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // NBD orders nothing between commands in flight: a read must not
        // overtake the write before it.
        ready!(this.poll_write_done(cx))?;
        if this.read.as_ref().is_some_and(|(at, _)| *at != this.pos) {
            // For an old position: dropped (see `Command` on dropping).
            this.read = None;
        }
        if this.read.is_none() {
            let left = this.size.saturating_sub(this.pos);
            let len = (buf.remaining() as u64)
                .min(left)
                .min(this.max_request() as u64) as usize;
            if len == 0 {
                return Poll::Ready(Ok(()));
            }
            let read = this
                .client
                .aio_pread(BytesMut::zeroed(len), this.pos, CmdFlags::empty())
                .map_err(io::Error::other)?;
            this.read = Some((this.pos, read));
        }
        let (_, read) = this.read.as_mut().expect("issued above");
        let result = ready!(Pin::new(read).poll(cx));
        this.read = None;
        let data = result.map_err(io::Error::other)?;
        // A caller may poll again with a smaller buffer; what does not fit
        // is read again next time.
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        this.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ExportFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_write_done(cx))?;
        // A read under way was issued before this write and may not see
        // it: never hand out its bytes, even after a seek back.
        this.read = None;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let left = this.size.saturating_sub(this.pos);
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write at {} is past the end of the export ({} bytes)",
                    this.pos, this.size
                ),
            )));
        }
        let n = (data.len() as u64).min(left).min(this.max_request() as u64) as usize;
        let write = this
            .client
            .aio_pwrite(
                Bytes::copy_from_slice(&data[..n]),
                this.pos,
                CmdFlags::empty(),
            )
            .map_err(io::Error::other)?;
        this.write = Some(write);
        this.pos += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_done(cx))?;
        if this.flush.is_none() {
            if !this.client.can_flush().map_err(io::Error::other)? {
                return Poll::Ready(Ok(()));
            }
            let flush = this
                .client
                .aio_flush(CmdFlags::empty())
                .map_err(io::Error::other)?;
            this.flush = Some(flush);
        }
        let flush = this.flush.as_mut().expect("issued above");
        let result = ready!(Pin::new(flush).poll(cx));
        this.flush = None;
        Poll::Ready(result.map_err(io::Error::other))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl AsyncSeek for ExportFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = match position {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => this.size.checked_add_signed(delta),
            SeekFrom::Current(delta) => this.pos.checked_add_signed(delta),
        };
        let Some(target) = target else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the export",
            ));
        };
        this.pos = target;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}
