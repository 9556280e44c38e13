//! How many bytes each worker keeps in flight when `--queue-size` is not
//! given: enough to keep the link busy, and no more.
//!
//! Why not always nbdcopy's 16 MiB: every byte in flight is a buffer the
//! kernel copies into or out of, and a copy whose buffers fit the CPU's
//! caches costs much less than one whose buffers stream through memory.
//! Measured with `copy-side-by-side.sh` (2 GiB over Unix sockets), going from
//! 64 requests of 256 KiB in flight per worker to 4 cut the copy's CPU by a
//! quarter and its wall time by 5 to 15% in every case; the server stays as
//! busy as before. A distant server needs more in flight (bandwidth times
//! round trip), so the window grows with the round trip the kernel measured
//! on the connection, up to nbdcopy's 16 MiB.

use std::time::Duration;

/// The window on a local link (Unix socket, loopback, vsock), before the
/// floor of two requests: with the default 1 MiB requests, 2 MiB.
pub const LOCAL_WINDOW: u64 = 1 << 20;

/// The largest default window: nbdcopy's queue size.
pub const MAX_WINDOW: u64 = 16 << 20;

/// The rate a default window is sized to keep busy, in bytes per second
/// (10 Gbit/s).
const LINK_RATE: f64 = 1.25e9;

/// The default bytes in flight per worker, given the round trips of the
/// copy's NBD ends (`None`: not measurable, so assumed far) and the size of
/// one request: bandwidth times the longest round trip, within
/// [`LOCAL_WINDOW`]..=[`MAX_WINDOW`], and never less than two requests.
pub fn default_window(round_trips: &[Option<Duration>], request_size: u64) -> u64 {
    let longest = round_trips
        .iter()
        .map(|rtt| rtt.map_or(MAX_WINDOW as f64, |rtt| rtt.as_secs_f64() * LINK_RATE))
        .fold(0.0, f64::max);
    (longest as u64)
        .clamp(LOCAL_WINDOW, MAX_WINDOW)
        .max(request_size.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: u64 = 256 << 10;

    #[test]
    fn local_links_get_the_small_window_and_far_ones_grow_to_the_cap() {
        assert_eq!(default_window(&[], REQUEST), LOCAL_WINDOW);
        let local = Some(Duration::ZERO);
        assert_eq!(default_window(&[local, local], REQUEST), LOCAL_WINDOW);
        // Loopback TCP: tens of microseconds.
        let loopback = Some(Duration::from_micros(40));
        assert_eq!(default_window(&[local, loopback], REQUEST), LOCAL_WINDOW);
        // A 4 ms link needs 5 MB in flight at 10 Gbit/s.
        let lan = Some(Duration::from_millis(4));
        assert_eq!(default_window(&[local, lan], REQUEST), 5_000_000);
        let wan = Some(Duration::from_millis(40));
        assert_eq!(default_window(&[wan, local], REQUEST), MAX_WINDOW);
        assert_eq!(default_window(&[None], REQUEST), MAX_WINDOW);
    }

    #[test]
    fn the_window_holds_at_least_two_requests() {
        assert_eq!(default_window(&[Some(Duration::ZERO)], 4 << 20), 8 << 20);
        assert_eq!(default_window(&[None], 32 << 20), 64 << 20);
    }
}
