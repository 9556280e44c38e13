//! In-flight command storage keyed by generation-guarded cookies.
//!
//! A cookie is `generation << 32 | slot`. A slot's generation changes every time
//! it is freed, so a stale or repeated reply naming an old cookie never matches
//! the newer command that reuses the slot.

use std::fmt;

/// Identifies one command on one connection, as libnbd's 64-bit cookies do.
///
/// Cookies are never 0, and are not reused while a reply with the old value could
/// still arrive and be mistaken for the new command.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(u64);

impl Cookie {
    /// The value sent on the wire.
    pub fn get(self) -> u64 {
        self.0
    }

    /// A cookie from its wire value, for matching replies in tests and fake servers.
    pub fn from_raw(value: u64) -> Self {
        Cookie(value)
    }

    fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cookie({}:{})", self.generation(), self.slot())
    }
}

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// A slab whose keys are [`Cookie`]s.
pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn insert(&mut self, value: T) -> Cookie {
        let slot = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                self.slots.len() - 1
            }
        };
        let entry = &mut self.slots[slot];
        entry.value = Some(value);
        self.len += 1;
        Cookie(u64::from(entry.generation) << 32 | slot as u64)
    }

    pub(crate) fn get(&self, cookie: Cookie) -> Option<&T> {
        let entry = self.slots.get(cookie.slot())?;
        if entry.generation != cookie.generation() {
            return None;
        }
        entry.value.as_ref()
    }

    pub(crate) fn get_mut(&mut self, cookie: Cookie) -> Option<&mut T> {
        let entry = self.slots.get_mut(cookie.slot())?;
        if entry.generation != cookie.generation() {
            return None;
        }
        entry.value.as_mut()
    }

    pub(crate) fn remove(&mut self, cookie: Cookie) -> Option<T> {
        let entry = self.slots.get_mut(cookie.slot())?;
        if entry.generation != cookie.generation() {
            return None;
        }
        let value = entry.value.take()?;
        // Never 0, so no cookie is ever 0.
        entry.generation = entry.generation.checked_add(1).unwrap_or(1);
        self.free.push(cookie.slot() as u32);
        self.len -= 1;
        Some(value)
    }

    /// Every live value with its cookie, in slot order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (Cookie, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| {
            let cookie = Cookie(u64::from(s.generation) << 32 | i as u64);
            s.value.as_mut().map(|v| (cookie, v))
        })
    }

    /// Every live value, in slot order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|s| s.value.as_ref())
    }

    /// Every live cookie, in slot order.
    pub(crate) fn cookies(&self) -> Vec<Cookie> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| Cookie(u64::from(s.generation) << 32 | i as u64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_cookie_never_matches_reused_slot() {
        let mut slab = Slab::new();
        let a = slab.insert("a");
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_eq!(a.slot(), b.slot());
        assert_ne!(a, b);
        assert!(slab.get(a).is_none());
        assert!(slab.remove(a).is_none());
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn cookies_are_never_zero_and_unknown_slots_miss() {
        let mut slab: Slab<u8> = Slab::new();
        let c = slab.insert(1);
        assert_ne!(c.get(), 0);
        assert!(slab.get(Cookie(0)).is_none());
        assert!(slab.get(Cookie(u64::MAX)).is_none());
        assert_eq!(slab.cookies(), vec![c]);
    }
}
