//! Typed flag sets: transmission flags, command flags, handshake flags, strict mode.

use crate::wire::consts::*;

bitflags::bitflags! {
    /// Transmission flags the server advertises for an export.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`.
        const HAS_FLAGS = FLAG_HAS_FLAGS;
        /// `NBD_FLAG_READ_ONLY`.
        const READ_ONLY = FLAG_READ_ONLY;
        /// `NBD_FLAG_SEND_FLUSH`.
        const SEND_FLUSH = FLAG_SEND_FLUSH;
        /// `NBD_FLAG_SEND_FUA`.
        const SEND_FUA = FLAG_SEND_FUA;
        /// `NBD_FLAG_ROTATIONAL`.
        const ROTATIONAL = FLAG_ROTATIONAL;
        /// `NBD_FLAG_SEND_TRIM`.
        const SEND_TRIM = FLAG_SEND_TRIM;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`.
        const SEND_WRITE_ZEROES = FLAG_SEND_WRITE_ZEROES;
        /// `NBD_FLAG_SEND_DF`.
        const SEND_DF = FLAG_SEND_DF;
        /// `NBD_FLAG_CAN_MULTI_CONN`.
        const CAN_MULTI_CONN = FLAG_CAN_MULTI_CONN;
        /// `NBD_FLAG_SEND_RESIZE`.
        const SEND_RESIZE = FLAG_SEND_RESIZE;
        /// `NBD_FLAG_SEND_CACHE`.
        const SEND_CACHE = FLAG_SEND_CACHE;
        /// `NBD_FLAG_SEND_FAST_ZERO`.
        const SEND_FAST_ZERO = FLAG_SEND_FAST_ZERO;
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
        const BLOCK_STATUS_PAYLOAD = FLAG_BLOCK_STATUS_PAYLOAD;
        // Unknown bits from the server are kept, so queries see what was sent.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Flags of one command, as libnbd's `LIBNBD_CMD_FLAG_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CmdFlags: u16 {
        /// Force unit access: the data is on stable storage when the command completes.
        const FUA = CMD_FLAG_FUA;
        /// Write zeroes without punching a hole.
        const NO_HOLE = CMD_FLAG_NO_HOLE;
        /// Read without fragmenting the reply.
        const DF = CMD_FLAG_DF;
        /// Block status: one extent suffices.
        const REQ_ONE = CMD_FLAG_REQ_ONE;
        /// Write zeroes only if fast, else fail with `ENOTSUP`.
        const FAST_ZERO = CMD_FLAG_FAST_ZERO;
        /// The length is the payload length (extended headers).
        const PAYLOAD_LEN = CMD_FLAG_PAYLOAD_LEN;
        // With strict flag checking off, any bits may be sent.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Client handshake flags the client may send, as libnbd's `set_handshake_flags`.
    ///
    /// A flag is sent only when the server offers the matching server flag.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HandshakeFlags: u32 {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
        const FIXED_NEWSTYLE = FLAG_C_FIXED_NEWSTYLE;
        /// `NBD_FLAG_C_NO_ZEROES`.
        const NO_ZEROES = FLAG_C_NO_ZEROES;
    }
}

impl Default for HandshakeFlags {
    fn default() -> Self {
        Self::all()
    }
}

bitflags::bitflags! {
    /// Client-side checks made before a command is sent, as libnbd's `set_strict_mode`.
    ///
    /// All are on by default. A violation is an error returned at once with nothing sent.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Strict: u32 {
        /// Only commands the server advertised.
        const COMMANDS = 1 << 0;
        /// Only flags valid for the command and advertised by the server.
        const FLAGS = 1 << 1;
        /// Requests within the export size.
        const BOUNDS = 1 << 2;
        /// No zero-length requests.
        const ZERO_SIZE = 1 << 3;
        /// Offsets and lengths aligned to the server's minimum block size.
        const ALIGN = 1 << 4;
        /// Payloads no larger than the server's maximum block size.
        const PAYLOAD = 1 << 5;
    }
}

impl Default for Strict {
    fn default() -> Self {
        Self::all()
    }
}
