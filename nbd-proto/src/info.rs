//! What the server told about the export: size, flags, block sizes, names.

use crate::flags::TransmissionFlags;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest unit of a request's offset and length (a power of 2, at most 64 KiB).
    pub minimum: u32,
    /// Preferred unit for efficient requests (a power of 2, at least 512 and `minimum`).
    pub preferred: u32,
    /// Largest payload of a read or write.
    pub maximum: u32,
}

impl BlockSizes {
    /// Checks the constraints the protocol places on the three values.
    ///
    /// Returns `None` for a set the protocol forbids; such a set is ignored, as
    /// the protocol lets a client do.
    ///
    /// ```
    /// use nbd_proto::BlockSizes;
    /// assert!(BlockSizes::validated(512, 4096, 32 << 20).is_some());
    /// assert!(BlockSizes::validated(3, 4096, 32 << 20).is_none()); // not a power of 2
    /// ```
    pub fn validated(minimum: u32, preferred: u32, maximum: u32) -> Option<Self> {
        let min_ok = minimum.is_power_of_two() && minimum <= 64 * 1024;
        let pref_ok = preferred.is_power_of_two() && preferred >= minimum.max(512);
        let max_ok = (maximum == u32::MAX || (min_ok && maximum % minimum == 0))
            && maximum >= preferred.min(32 * 1024 * 1024);
        (min_ok && pref_ok && max_ok).then_some(Self {
            minimum,
            preferred,
            maximum,
        })
    }
}

/// Which handshake the server spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStyle {
    /// Oldstyle: no option negotiation at all.
    Oldstyle,
    /// Newstyle without the fixed flag: only `NBD_OPT_EXPORT_NAME`.
    Newstyle,
    /// Fixed newstyle: full option haggling.
    FixedNewstyle,
}

impl HandshakeStyle {
    /// The name libnbd's `get_protocol` gives.
    pub fn protocol_name(self) -> &'static str {
        match self {
            HandshakeStyle::Oldstyle => "oldstyle",
            HandshakeStyle::Newstyle => "newstyle",
            HandshakeStyle::FixedNewstyle => "newstyle-fixed",
        }
    }
}

/// Everything known about the export being negotiated or in use.
///
/// Only the connection fills this in; more fields may be added, so build
/// patterns with `..` (and, for a value of your own, start from
/// `ExportInfo::default()`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportInfo {
    /// Export size in bytes, once known.
    pub size: Option<u64>,
    /// Transmission flags, once known.
    pub flags: Option<TransmissionFlags>,
    /// Valid block size constraints, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
    /// Canonical name (`NBD_INFO_NAME`), if the server sent it.
    pub canonical_name: Option<String>,
    /// Description (`NBD_INFO_DESCRIPTION`), if the server sent it.
    pub description: Option<String>,
}

impl ExportInfo {
    pub(crate) fn has(&self, flag: TransmissionFlags) -> bool {
        self.flags.is_some_and(|f| f.contains(flag))
    }
}
