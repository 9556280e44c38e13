//! A cheap hasher for maps keyed by cookies (and by the adapters' own ids
//! built from them).
//!
//! SipHash, std's default, guards a map against keys chosen to collide. Cookies
//! are made by the core, unique while in flight, never chosen by the server, so
//! that guard buys nothing here, and with a few lookups per command it was a
//! tenth of an adapter's instructions per 4 KiB read. One multiplication per
//! word spreads the low bits, which is all a counter-like key needs.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes each word of the key with one multiplication (Fibonacci hashing).
///
/// ```
/// use nbd_proto::CookieMap;
/// let mut in_flight: CookieMap<u64, &str> = CookieMap::default();
/// in_flight.insert(7, "read");
/// assert_eq!(in_flight.get(&7), Some(&"read"));
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }
}

/// A `HashMap` with [`CookieHasher`], for keys the core or the caller made.
pub type CookieMap<K, V> = HashMap<K, V, BuildHasherDefault<CookieHasher>>;

/// A `HashSet` with [`CookieHasher`].
pub type CookieSet<K> = HashSet<K, BuildHasherDefault<CookieHasher>>;
