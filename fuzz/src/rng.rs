//! Deterministic chunk splits for the fuzz targets, from the workspace's one
//! seeded generator (`nbd_testkit::Rng`).

/// The one seeded generator of the tests and fuzz targets.
pub use nbd_testkit::Rng;

/// Cuts a byte stream into pieces of pseudo-random sizes in `1..=max`.
#[derive(Debug, Clone)]
pub struct Splitter {
    rng: Rng,
    max: usize,
}

impl Splitter {
    /// Chunk sizes from `seed`, none larger than `max`.
    pub fn new(seed: u64, max: usize) -> Self {
        Splitter {
            rng: Rng::new(seed),
            max: max.max(1),
        }
    }

    /// The size of the next piece, at most `left` (and at least 1 if `left > 0`).
    pub fn next_size(&mut self, left: usize) -> usize {
        self.rng.size(self.max).min(left)
    }

    /// The size of the next piece with a tighter cap than usual.
    pub fn next_size_capped(&mut self, left: usize, cap: usize) -> usize {
        self.next_size(left).min(cap.max(1))
    }
}

/// Maximum chunk sizes selectable with 4 bits: from byte-at-a-time to "whole input".
pub const SPLIT_SIZES: [usize; 16] = [
    1,
    2,
    3,
    5,
    8,
    13,
    20,
    28,
    64,
    128,
    512,
    1024,
    4096,
    16 * 1024,
    64 * 1024,
    usize::MAX,
];
