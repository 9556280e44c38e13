//! A tiny deterministic generator (xorshift64*), so that chunk splits and the
//! replay tests' pseudo-random inputs need no extra dependency.

/// xorshift64* pseudo-random generator. Never yields the same stream for two
/// different seeds; a seed of 0 is replaced by a fixed non-zero value.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        if state == 0 {
            state = 0x2545_f491_4f6c_dd1d;
        }
        XorShift(state)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A length in `1..=max` (`max` of 0 counts as 1).
    pub fn size(&mut self, max: usize) -> usize {
        1 + self.below(max.max(1) as u64) as usize
    }
}

/// Cuts a byte stream into pieces of pseudo-random sizes in `1..=max`.
#[derive(Debug, Clone)]
pub struct Splitter {
    rng: XorShift,
    max: usize,
}

impl Splitter {
    /// Chunk sizes from `seed`, none larger than `max`.
    pub fn new(seed: u64, max: usize) -> Self {
        Splitter {
            rng: XorShift::new(seed),
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
