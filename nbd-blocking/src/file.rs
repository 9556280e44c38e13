//! An export used like a file: `Read + Write + Seek` over a [`Client`].

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::client::Client;

/// Largest single request the file adapter sends.
const FILE_CHUNK: usize = 4 * 1024 * 1024;

/// An export with a cursor, usable with `std::io::copy` and friends.
///
/// Reads stop at the end of the export (returning 0); writes past the end fail,
/// since an export cannot grow. Each `write` returns once the server has
/// acknowledged it. `flush` first waits for anything still in flight (a command
/// left behind by a call that timed out) and fails if any of it failed, then
/// sends `NBD_CMD_FLUSH` if the server supports it.
///
/// Dropping it closes the connection without flushing or waiting; use
/// [`ExportFile::shutdown`] to end it gracefully and learn the outcome.
///
/// ```no_run
/// use nbd_blocking::{Client, ExportFile};
/// let client = Client::connect_uri("nbd+unix:///?socket=/tmp/nbd.sock")?;
/// let mut export = ExportFile::new(client)?;
/// let mut out = std::fs::File::create("/tmp/copy.img")?;
/// std::io::copy(&mut export, &mut out)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ExportFile {
    client: Client,
    pos: u64,
    size: u64,
}

impl ExportFile {
    /// Wraps a connected client, cursor at 0.
    pub fn new(client: Client) -> crate::Result<Self> {
        let size = client.size()?;
        Ok(ExportFile {
            client,
            pos: 0,
            size,
        })
    }

    /// The export size.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the export is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Gives the client back.
    pub fn into_inner(self) -> Client {
        self.client
    }

    /// Ends the connection gracefully ([`Client::shutdown`]): waits for what
    /// is in flight and reports any of it that failed. It does not flush;
    /// call `flush` first for durability.
    pub fn shutdown(self) -> crate::Result<()> {
        self.client.shutdown()
    }
}

impl Read for ExportFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left).min(FILE_CHUNK as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.client.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for ExportFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left).min(FILE_CHUNK as u64) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the export",
            ));
        }
        self.client.write_all_at(&buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // A flush covers only writes the server has completed, so nothing may
        // still be in flight, and nothing that failed may pass as flushed.
        self.client.settle()?;
        if self.client.connection().can_flush().unwrap_or(false) {
            self.client.flush(nbd_proto::CmdFlags::empty())?;
        }
        Ok(())
    }
}

impl Seek for ExportFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.pos = target;
        Ok(target)
    }
}
