//! The commands: thin checks of the phase, then [`Transmission`] does the work.

use bytes::{Bytes, BytesMut};

use super::{Connection, State};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::flags::CmdFlags;
use crate::slab::Cookie;
use crate::transmit::Transmission;
use crate::wire::consts::{CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES};

/// Why a command is refused outside transmission.
const COMMANDS_NEED_TRANSMISSION: &str = "commands need the transmission phase";

impl Connection {
    /// Transmission's state and the core, if the connection is in transmission;
    /// otherwise the sticky error, or `not_ready` as an invalid state.
    fn transmission(&mut self, not_ready: &str) -> Result<(&mut Transmission, &mut Core)> {
        self.check_alive()?;
        match &mut self.state {
            State::Ready(tx) => Ok((tx, &mut self.core)),
            _ => Err(Error::InvalidState(not_ready.into())),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (libnbd's `aio_pread`).
    ///
    /// The buffer comes back in the [`Completion`](crate::Completion). Server
    /// bytes land straight in it; holes are zero-filled. Allowed flag: `DF`.
    pub fn pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.read(core, buf, offset, flags, false)
    }

    /// Like [`pread`](Self::pread), and also reports each reply chunk as an
    /// [`Event::ReadChunk`](crate::Event::ReadChunk) before the completion
    /// (libnbd's `pread_structured`).
    pub fn pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.read(core, buf, offset, flags, true)
    }

    /// Writes `data` at `offset` (libnbd's `aio_pwrite`). The payload goes out as
    /// a slice of `data`, never copied. Allowed flag: `FUA`.
    pub fn pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.write(core, data, offset, flags)
    }

    /// Flushes written data to stable storage (libnbd's `aio_flush`).
    pub fn flush(&mut self, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.command(core, CMD_FLUSH, 0, 0, flags)
    }

    /// Discards `count` bytes at `offset` (libnbd's `aio_trim`). Allowed flag: `FUA`.
    pub fn trim(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.command(core, CMD_TRIM, count, offset, flags)
    }

    /// Asks the server to prefetch `count` bytes at `offset` (libnbd's `aio_cache`).
    pub fn cache(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.command(core, CMD_CACHE, count, offset, flags)
    }

    /// Writes `count` zero bytes at `offset` (libnbd's `aio_zero`).
    /// Allowed flags: `FUA`, `NO_HOLE`, `FAST_ZERO`.
    pub fn zero(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.command(core, CMD_WRITE_ZEROES, count, offset, flags)
    }

    /// Asks the server to end the connection gracefully (`NBD_CMD_DISC`,
    /// libnbd's `aio_disconnect`).
    ///
    /// New commands are refused at once (with [`Error::Shutdown`]). The
    /// commands in flight are not cut short: `NBD_CMD_DISC` is queued only once
    /// every one of them has completed (a server may fail or drop commands that
    /// are still running when it sees the request), so no write is lost to the
    /// shutdown. Once the request is written the connection closes with
    /// [`Event::Closed`](crate::Event::Closed) without error. If the server
    /// hangs up first, the connection still closes cleanly and any command
    /// left unanswered fails with `ENOTCONN`, each exactly once. A server's
    /// `ESHUTDOWN` starts the same sequence by itself. Calling it again is
    /// harmless.
    pub fn disconnect(&mut self) -> Result<()> {
        let (tx, core) = self.transmission(
            "disconnect needs the transmission phase; use opt_abort while negotiating",
        )?;
        tx.disconnect(core);
        Ok(())
    }

    /// Asks for the status of `count` bytes at `offset` in every negotiated meta
    /// context (`NBD_CMD_BLOCK_STATUS`, libnbd's `aio_block_status_64`). Each
    /// context's extents arrive as an [`Event::BlockStatus`](crate::Event::BlockStatus)
    /// before the completion. Allowed flag: `REQ_ONE`. With extended headers
    /// `count` may exceed 4 GiB.
    pub fn block_status(&mut self, count: u64, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.command(core, CMD_BLOCK_STATUS, count, offset, flags)
    }

    /// Like [`block_status`](Self::block_status), asking only about the named
    /// contexts (libnbd's `aio_block_status_filter`). Needs extended headers and
    /// a server advertising `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
    pub fn block_status_filter(
        &mut self,
        count: u64,
        offset: u64,
        flags: CmdFlags,
        contexts: &[&str],
    ) -> Result<Cookie> {
        let (tx, core) = self.transmission(COMMANDS_NEED_TRANSMISSION)?;
        tx.block_status_filter(core, count, offset, flags, contexts)
    }
}
