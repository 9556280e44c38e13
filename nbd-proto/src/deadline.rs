//! Deadlines without a clock.
//!
//! The core never reads the time. A deadline is armed with its length only;
//! the first time the caller passes the time in (`handle_timeout(now)`) after
//! that, it starts and becomes an instant. So "from the moment it began"
//! means "from the first time the caller told the connection the time after
//! it began": exact in virtual time, and within one loop turn in an adapter
//! that passes the time in on every turn.

use std::time::{Duration, Instant};

/// One deadline: off, armed but not started, or due at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// No limit.
    Off,
    /// Armed for this long; starts at the next `now` passed in.
    Armed(Duration),
    /// Due at this instant.
    At(Instant),
}

impl Deadline {
    /// Armed for `timeout`, or off when there is none.
    pub(crate) fn arm(timeout: Option<Duration>) -> Self {
        timeout.map_or(Deadline::Off, Deadline::Armed)
    }

    /// Starts an armed deadline at `now`. A length too long to add to `now`
    /// never passes.
    pub(crate) fn start(&mut self, now: Instant) {
        if let Deadline::Armed(d) = *self {
            *self = now.checked_add(d).map_or(Deadline::Off, Deadline::At);
        }
    }

    /// Whether the deadline has passed at `now`: it fires exactly when `now`
    /// reaches it.
    pub(crate) fn passed(&self, now: Instant) -> bool {
        matches!(*self, Deadline::At(t) if now >= t)
    }

    /// When the caller must pass the time in next for this deadline: its
    /// instant, or `last_now` (already due) while it waits to start.
    pub(crate) fn wake(&self, last_now: Option<Instant>) -> Option<Instant> {
        match *self {
            Deadline::Off => None,
            Deadline::Armed(_) => last_now,
            Deadline::At(t) => Some(t),
        }
    }
}

/// The earlier of two optional instants.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}
