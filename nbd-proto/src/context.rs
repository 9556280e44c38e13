//! Names of the common meta contexts and the meaning of their status bits,
//! for [`Config::meta_contexts`](crate::Config::meta_contexts),
//! [`Connection::add_meta_context`](crate::Connection::add_meta_context) and
//! reading [`Extent`](crate::Extent) flags.
//!
//! ```
//! use nbd_proto::{context, Config};
//! let config = Config::default().meta_context(context::BASE_ALLOCATION);
//! # let _ = config;
//! let flags = 3; // as a block status extent reports it
//! assert!(flags & context::STATE_HOLE != 0 && flags & context::STATE_ZERO != 0);
//! ```

/// `base:allocation`, the protocol's own context: which ranges are holes and
/// which read as zeroes ([`STATE_HOLE`], [`STATE_ZERO`]).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// `base:allocation`: the range is not allocated (a hole).
pub const STATE_HOLE: u64 = 1 << 0;

/// `base:allocation`: the range reads as zeroes.
pub const STATE_ZERO: u64 = 1 << 1;

/// `qemu:allocation-depth` (qemu-nbd): 0 for unallocated, otherwise the depth
/// in the backing chain where the range is allocated.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// The prefix of qemu's dirty bitmap contexts: `qemu:dirty-bitmap:NAME`
/// reports [`STATE_DIRTY`] for ranges written since the bitmap was started.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// `qemu:dirty-bitmap:NAME`: the range is dirty.
pub const STATE_DIRTY: u64 = 1 << 0;
