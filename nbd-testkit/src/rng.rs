//! One small seeded generator for every test: splitmix64.
//!
//! Tests that draw random workloads or byte-stream splits take a seed, print it
//! when they fail, and can be replayed exactly with that seed. Nothing here is
//! meant for cryptography.
//!
//! Two older generators (`XorShift` in `fuzz/src/rng.rs` and in
//! `tests/src/testkit.rs`) predate this one; new tests use [`Rng`], and those
//! move to it.

use std::ops::Range;

/// The environment variable that overrides a test's default seed.
pub const SEED_VAR: &str = "NBD_TEST_SEED";

/// A seeded pseudo-random generator (splitmix64): every seed, 0 included,
/// gives its own full-period stream.
///
/// ```
/// use nbd_testkit::Rng;
/// let (mut a, mut b) = (Rng::new(7), Rng::new(7));
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// assert!((5..9).contains(&a.range(5..9)));
/// ```
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The seed from [`SEED_VAR`] if it is set to a number, else `default`.
    ///
    /// A test prints the seed it used when it fails, so a failing run found
    /// in CI can be replayed with `NBD_TEST_SEED=<seed> cargo test ...`.
    pub fn seed_from_env(default: u64) -> u64 {
        std::env::var(SEED_VAR)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(default)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n`; 0 when `n` is 0 (an empty range has no other answer).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift keeps the bias negligible without a loop.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A value in `range`; `range.start` when the range is empty.
    pub fn range(&mut self, range: Range<u64>) -> u64 {
        range.start + self.below(range.end.saturating_sub(range.start))
    }

    /// A value in `low..=high` (both ends included); `low` when `high < low`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below((high.saturating_sub(low)).saturating_add(1))
    }

    /// A length in `1..=max` (a `max` of 0 counts as 1).
    pub fn size(&mut self, max: usize) -> usize {
        self.between(1, max.max(1) as u64) as usize
    }

    /// A `usize` in `range`; `range.start` when the range is empty.
    pub fn range_usize(&mut self, range: Range<usize>) -> usize {
        self.range(range.start as u64..range.end as u64) as usize
    }

    /// True with probability `p` (clamped to `0.0..=1.0`).
    pub fn chance(&mut self, p: f64) -> bool {
        let p = p.clamp(0.0, 1.0);
        // 53 bits: the precision of an f64 in [0, 1).
        ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.fill_bytes(&mut out);
        out
    }

    /// Picks one element of `items`, or `None` if it is empty.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len() as u64) as usize)
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(1);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(1);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(2);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn bounds_hold_and_every_value_appears() {
        let mut r = Rng::new(0);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = r.below(7);
            assert!(v < 7);
            seen[v as usize] = true;
            let w = r.range(10..13);
            assert!((10..13).contains(&w));
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
        assert_eq!(r.below(0), 0);
        assert_eq!(r.range(5..5), 5);
        let (high, low) = (9, 3);
        assert_eq!(r.range(high..low), 9);
    }

    #[test]
    fn chance_extremes_and_middle() {
        let mut r = Rng::new(3);
        assert!((0..100).all(|_| !r.chance(0.0)));
        assert!((0..100).all(|_| r.chance(1.0)));
        let hits = (0..10_000).filter(|_| r.chance(0.5)).count();
        assert!((4000..6000).contains(&hits), "{hits}");
    }

    #[test]
    fn fill_bytes_covers_odd_lengths() {
        let mut r = Rng::new(4);
        let mut buf = [0u8; 13];
        r.fill_bytes(&mut buf);
        assert!(buf.iter().any(|b| *b != 0));
        let mut v = [1, 2, 3, 4, 5];
        r.shuffle(&mut v);
        v.sort();
        assert_eq!(v, [1, 2, 3, 4, 5]);
    }
}
