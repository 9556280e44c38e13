//! How the export is split between workers: pieces of [`PIECE`] bytes handed
//! out in order from a shared cursor, so that every worker keeps busy until
//! the end and a slow worker holds up at most one piece.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes a worker takes at a time. Small enough that the last pieces spread
/// over every worker, large enough that each costs at most one extent query.
pub const PIECE: u64 = 32 << 20;

/// The shared cursor over `0..size`, and the flag that stops every worker
/// once one has failed.
#[derive(Debug)]
pub struct Plan {
    size: u64,
    next: AtomicU64,
    failed: AtomicBool,
}

impl Plan {
    /// A plan over `size` bytes.
    pub fn new(size: u64) -> Plan {
        Plan {
            size,
            next: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// The next range to copy, start and end; `None` when all are handed out
    /// or the copy has failed.
    pub fn take(&self) -> Option<(u64, u64)> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let start = self.next.fetch_add(PIECE, Ordering::Relaxed);
        (start < self.size).then(|| (start, (start + PIECE).min(self.size)))
    }

    /// Stops the other workers from starting new pieces.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_export_once_and_stop_after_a_failure() {
        let size = 3 * PIECE + 5;
        let plan = Plan::new(size);
        let mut covered = 0;
        let mut pieces = Vec::new();
        while let Some((start, end)) = plan.take() {
            assert_eq!(start, covered);
            covered = end;
            pieces.push((start, end));
        }
        assert_eq!(covered, size);
        assert_eq!(pieces.len(), 4);
        assert_eq!(plan.take(), None, "exhausted stays exhausted");
        let plan = Plan::new(size);
        assert!(plan.take().is_some());
        plan.fail();
        assert_eq!(plan.take(), None);
        assert_eq!(Plan::new(0).take(), None);
    }
}
