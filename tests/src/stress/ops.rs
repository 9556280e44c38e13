//! The operations of a stress run and the seeded generator that picks them.
//!
//! The sequence of operations depends on the seed and the export's limits
//! only, never on timing, so a seed replays the same operations (their
//! interleaving on the wire still depends on the server).

use bytes::Bytes;
use nbd_proto::{CmdFlags, Connection};

use crate::testkit::Rng;

/// Which command an operation sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    Zero,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_BLOCK_STATUS` over `base:allocation`.
    BlockStatus,
}

impl Kind {
    /// Every kind, for tallies.
    pub const ALL: [Kind; 7] = [
        Kind::Read,
        Kind::Write,
        Kind::Trim,
        Kind::Zero,
        Kind::Flush,
        Kind::Cache,
        Kind::BlockStatus,
    ];

    /// Whether the command changes the export, so that nothing overlapping
    /// it may be in flight at the same time (NBD orders nothing).
    pub fn changes_data(self) -> bool {
        matches!(self, Kind::Write | Kind::Trim | Kind::Zero)
    }

    /// Whether the command covers a range of the export (all but flush).
    pub fn has_range(self) -> bool {
        self != Kind::Flush
    }
}

/// One command to send.
#[derive(Clone)]
pub struct Op {
    /// The command.
    pub kind: Kind,
    /// Export offset (0 for flush).
    pub offset: u64,
    /// Length in bytes (0 for flush).
    pub len: u64,
    /// Command flags, only ones the server advertised.
    pub flags: CmdFlags,
    /// The payload of a write.
    pub data: Option<Bytes>,
}

impl Op {
    /// Whether this operation and `other` touch a common byte.
    pub fn overlaps(&self, other: &Op) -> bool {
        self.kind.has_range()
            && other.kind.has_range()
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }

    /// Whether the two may not be in flight together: they overlap and one
    /// of them changes data.
    pub fn conflicts_with(&self, other: &Op) -> bool {
        (self.kind.changes_data() || other.kind.changes_data()) && self.overlaps(other)
    }

    /// Client memory the operation holds while in flight (read buffer or
    /// write payload).
    pub fn buffer_bytes(&self) -> u64 {
        match self.kind {
            Kind::Read | Kind::Write => self.len,
            _ => 0,
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if self.kind.has_range() {
            write!(
                f,
                " of {} bytes at {} (end {})",
                self.len,
                self.offset,
                self.offset + self.len
            )?;
        }
        if !self.flags.is_empty() {
            write!(f, " flags {:?}", self.flags)?;
        }
        Ok(())
    }
}

/// What the server allows, read from the connection after the handshake.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Export size.
    pub size: u64,
    /// Alignment the server demands of offsets and lengths (1 for none).
    pub align: u64,
    /// Largest read or write payload.
    pub max_payload: u64,
    /// `NBD_CMD_FLUSH` advertised.
    pub flush: bool,
    /// `NBD_CMD_FLAG_FUA` advertised.
    pub fua: bool,
    /// `NBD_CMD_TRIM` advertised.
    pub trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` advertised.
    pub zero: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` advertised.
    pub fast_zero: bool,
    /// `NBD_CMD_CACHE` advertised.
    pub cache: bool,
    /// `NBD_CMD_FLAG_DF` advertised.
    pub df: bool,
    /// `base:allocation` negotiated.
    pub block_status: bool,
}

/// The meta context whose claims the model checks.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The largest payload when the server states none (the protocol's advice).
const DEFAULT_MAX_PAYLOAD: u64 = 32 << 20;

impl Limits {
    /// The limits of a connection in transmission phase.
    pub fn of(conn: &Connection) -> Result<Self, nbd_proto::Error> {
        let sizes = conn.block_sizes();
        let size = conn.size()?;
        let align = sizes.map_or(1, |s| u64::from(s.minimum)).max(1);
        let max_payload = sizes
            .map_or(DEFAULT_MAX_PAYLOAD, |s| u64::from(s.maximum))
            .min(nbd_proto::MAX_REQUEST_SIZE);
        Ok(Limits {
            size,
            align,
            max_payload,
            flush: conn.can_flush()?,
            fua: conn.can_fua()?,
            trim: conn.can_trim()?,
            zero: conn.can_zero()?,
            fast_zero: conn.can_fast_zero()?,
            cache: conn.can_cache()?,
            df: conn.can_df()? && conn.structured_replies_negotiated(),
            block_status: conn.can_meta_context(BASE_ALLOCATION),
        })
    }

    fn can(&self, kind: Kind) -> bool {
        match kind {
            Kind::Read | Kind::Write => true,
            Kind::Trim => self.trim,
            Kind::Zero => self.zero,
            Kind::Flush => self.flush,
            Kind::Cache => self.cache,
            Kind::BlockStatus => self.block_status,
        }
    }
}

/// Relative frequency of each kind (before dropping what the server lacks).
const MIX: [(Kind, u64); 7] = [
    (Kind::Read, 34),
    (Kind::Write, 30),
    (Kind::Trim, 7),
    (Kind::Zero, 8),
    (Kind::Flush, 3),
    (Kind::Cache, 5),
    (Kind::BlockStatus, 13),
];

/// A seeded source of operations and of the queue depth to run them at.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    limits: Limits,
    depth: usize,
    depth_left: u64,
}

/// Spreads a seed over all 64 bits, so nearby seeds give unrelated streams.
pub fn mix_seed(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Generator {
    /// Operations from `seed` within `limits`.
    pub fn new(seed: u64, limits: Limits) -> Self {
        assert!(
            limits.size >= limits.align,
            "an export smaller than its block size: {limits:?}"
        );
        Generator {
            rng: Rng::new(mix_seed(seed)),
            limits,
            depth: 1,
            depth_left: 0,
        }
    }

    /// How many commands may be in flight for the next operation. The
    /// depth changes every few hundred operations, from 1 to 256, skewed
    /// so that each range is well represented.
    pub fn depth(&mut self) -> usize {
        if self.depth_left == 0 {
            self.depth = match self.rng.below(10) {
                0..=1 => 1,
                2..=3 => self.rng.between(2, 8) as usize,
                4..=6 => self.rng.between(9, 64) as usize,
                _ => self.rng.between(65, 256) as usize,
            };
            // Long enough to fill the queue, and then some.
            self.depth_left = self.depth as u64 + self.rng.between(1, 400);
        }
        self.depth_left -= 1;
        self.depth
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let kind = self.kind();
        if kind == Kind::Flush {
            // No flag is valid for a flush.
            return Op {
                kind,
                offset: 0,
                len: 0,
                flags: CmdFlags::empty(),
                data: None,
            };
        }
        let max_len = match kind {
            Kind::Read | Kind::Write => self.limits.max_payload.min(self.limits.size),
            _ => self.limits.size,
        };
        let (offset, len) = self.extent(max_len);
        let l = &self.limits;
        let (fua, df, fast_zero) = (l.fua, l.df, l.fast_zero);
        let mut flags = CmdFlags::empty();
        let mut data = None;
        match kind {
            Kind::Read => flags |= self.maybe(df, CmdFlags::DF, 4),
            Kind::Write => {
                flags |= self.maybe(fua, CmdFlags::FUA, 8);
                data = Some(Bytes::from(self.rng.bytes(len as usize)));
            }
            Kind::Trim => flags |= self.maybe(fua, CmdFlags::FUA, 8),
            Kind::Zero => {
                flags |= self.maybe(fua, CmdFlags::FUA, 8);
                flags |= self.maybe(true, CmdFlags::NO_HOLE, 3);
                flags |= self.maybe(fast_zero, CmdFlags::FAST_ZERO, 4);
            }
            Kind::BlockStatus => flags |= self.maybe(true, CmdFlags::REQ_ONE, 4),
            Kind::Cache | Kind::Flush => {}
        }
        Op {
            kind,
            offset,
            len,
            flags,
            data,
        }
    }

    /// Reads covering the whole export in the largest pieces allowed, for
    /// the final comparison with the model.
    pub fn sweep(&self) -> Vec<Op> {
        let piece =
            (self.limits.max_payload.min(4 << 20) / self.limits.align).max(1) * self.limits.align;
        let mut ops = Vec::new();
        let mut offset = 0;
        while offset < self.limits.size {
            let len = piece.min(self.limits.size - offset);
            ops.push(Op {
                kind: Kind::Read,
                offset,
                len,
                flags: CmdFlags::empty(),
                data: None,
            });
            offset += len;
        }
        ops
    }

    /// `flag` one time in `one_in`, if the server allows it.
    fn maybe(&mut self, allowed: bool, flag: CmdFlags, one_in: u64) -> CmdFlags {
        if allowed && self.rng.below(one_in) == 0 {
            flag
        } else {
            CmdFlags::empty()
        }
    }

    fn kind(&mut self) -> Kind {
        let total: u64 = MIX
            .iter()
            .filter(|(k, _)| self.limits.can(*k))
            .map(|(_, w)| w)
            .sum();
        let mut pick = self.rng.below(total);
        for (kind, weight) in MIX {
            if !self.limits.can(kind) {
                continue;
            }
            if pick < weight {
                return kind;
            }
            pick -= weight;
        }
        unreachable!("the weights add up to the total")
    }

    /// A random `(offset, len)` inside the export, `len` at most `max_len`:
    /// mostly small, sometimes up to the maximum; aligned or not; now and
    /// then at the very start or end. Always aligned to the server's minimum
    /// block size.
    fn extent(&mut self, max_len: u64) -> (u64, u64) {
        let align = self.limits.align;
        let size = self.limits.size;
        // Large requests cover much of the export and so conflict with
        // nearly everything; at high depths they are rarer, or the queue
        // would never fill.
        let (small, medium) = match self.depth {
            0..=8 => (550, 900),
            9..=64 => (750, 990),
            _ => (980, 1000),
        };
        let cap = match self.rng.below(1000) {
            pick if pick < small => 4096,
            pick if pick < medium => 64 << 10,
            _ => max_len,
        }
        .min(max_len);
        let mut len = self.rng.between(1, cap);
        // Some requests aligned to a sector or a page, as real clients send.
        let unit = match self.rng.below(10) {
            0..=2 => 512,
            3..=4 => 4096,
            _ => 1,
        }
        .max(align);
        len = round_up(len, unit).min(max_len / unit * unit);
        if len == 0 {
            len = align;
        }
        let last = size - len;
        // The first and last bytes are where off-by-one errors live, but
        // requests piled there conflict; rarer when the queue is deep.
        let edges_one_in = if self.depth > 64 { 1000 } else { 20 };
        let offset = match self.rng.below(edges_one_in) {
            0 => 0,
            1 => last / align * align,
            _ => self.rng.between(0, last) / unit * unit,
        };
        (offset, len)
    }
}

fn round_up(value: u64, unit: u64) -> u64 {
    value.div_ceil(unit) * unit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size: u64, align: u64, max_payload: u64) -> Limits {
        Limits {
            size,
            align,
            max_payload,
            flush: true,
            fua: true,
            trim: true,
            zero: true,
            fast_zero: true,
            cache: true,
            df: true,
            block_status: true,
        }
    }

    #[test]
    fn operations_stay_inside_the_export_and_its_limits() {
        for (size, align, max) in [(4 << 20, 1, 32 << 20), (1 << 20, 4096, 64 << 10), (5, 1, 5)] {
            let mut gen = Generator::new(3, limits(size, align, max));
            for _ in 0..20_000 {
                let depth = gen.depth();
                assert!((1..=256).contains(&depth));
                let op = gen.next_op();
                if op.kind == Kind::Flush {
                    continue;
                }
                assert!(op.len >= 1 && op.offset + op.len <= size, "{op:?}");
                assert_eq!(op.offset % align, 0, "{op:?}");
                assert_eq!(op.len % align, 0, "{op:?}");
                if matches!(op.kind, Kind::Read | Kind::Write) {
                    assert!(op.len <= max, "{op:?}");
                }
                if let Some(data) = &op.data {
                    assert_eq!(data.len() as u64, op.len);
                }
            }
        }
    }

    #[test]
    fn a_seed_gives_the_same_operations() {
        let ops = |seed| {
            let mut gen = Generator::new(seed, limits(1 << 20, 1, 1 << 20));
            (0..100)
                .map(|_| format!("{:?} {:?}", gen.depth(), gen.next_op()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ops(11), ops(11));
        assert_ne!(ops(11), ops(12));
    }

    #[test]
    fn only_data_changes_conflict() {
        let op = |kind, offset, len| Op {
            kind,
            offset,
            len,
            flags: CmdFlags::empty(),
            data: None,
        };
        let read = op(Kind::Read, 0, 10);
        assert!(!read.conflicts_with(&op(Kind::BlockStatus, 5, 10)));
        assert!(read.conflicts_with(&op(Kind::Trim, 9, 1)));
        assert!(!read.conflicts_with(&op(Kind::Write, 10, 1)));
        assert!(!op(Kind::Flush, 0, 0).conflicts_with(&op(Kind::Write, 0, 10)));
    }

    #[test]
    fn the_sweep_covers_the_export_once() {
        let gen = Generator::new(1, limits((9 << 20) + 3, 1, 32 << 20));
        let sweep = gen.sweep();
        let mut at = 0;
        for op in &sweep {
            assert_eq!(op.offset, at);
            at += op.len;
        }
        assert_eq!(at, (9 << 20) + 3);
    }
}
