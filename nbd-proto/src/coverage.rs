//! Which parts of a read request the server's chunks have covered.
//!
//! Chunks must stay inside the request and must not overlap; the read succeeds
//! only if they cover all of it. Chunks in order cost no allocation; chunks out
//! of order are kept as a sorted list of runs, bounded so a hostile server cannot
//! make it grow without limit.

/// Most separate runs kept before a read is failed as too fragmented.
pub(crate) const MAX_RUNS: usize = 4096;

#[derive(Debug)]
pub(crate) struct Coverage {
    start: u64,
    end: u64,
    /// `start..filled` is covered.
    filled: u64,
    /// Covered runs after `filled`, sorted, disjoint, none touching `filled`.
    runs: Vec<(u64, u64)>,
}

impl Coverage {
    pub(crate) fn new(offset: u64, length: u64) -> Self {
        Coverage {
            start: offset,
            end: offset + length,
            filled: offset,
            runs: Vec::new(),
        }
    }

    /// Records `offset..offset + length`, or says why it is not allowed.
    pub(crate) fn add(&mut self, offset: u64, length: u64) -> Result<(), String> {
        let Some(stop) = offset.checked_add(length) else {
            return Err(format!("chunk at {offset} of length {length} overflows"));
        };
        if offset < self.start || stop > self.end {
            return Err(format!(
                "chunk {offset}..{stop} is outside the request {}..{}",
                self.start, self.end
            ));
        }
        if length == 0 {
            return Err(format!("empty chunk at {offset}"));
        }
        if offset < self.filled {
            return Err(format!(
                "chunk {offset}..{stop} overlaps data already received"
            ));
        }
        let at = self.runs.partition_point(|r| r.1 <= offset);
        if let Some(next) = self.runs.get(at) {
            if next.0 < stop {
                return Err(format!(
                    "chunk {offset}..{stop} overlaps data already received"
                ));
            }
        }
        if offset == self.filled {
            self.filled = stop;
            // Absorb runs that now touch the filled prefix.
            while let Some(&(s, e)) = self.runs.first() {
                if s != self.filled {
                    break;
                }
                self.filled = e;
                self.runs.remove(0);
            }
            return Ok(());
        }
        if self.runs.len() >= MAX_RUNS {
            return Err(format!(
                "read reply split into more than {MAX_RUNS} separate runs"
            ));
        }
        self.runs.insert(at, (offset, stop));
        Ok(())
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.filled == self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_out_of_order_and_overlap() {
        let mut c = Coverage::new(100, 30);
        c.add(120, 10).unwrap();
        c.add(100, 10).unwrap();
        assert!(!c.is_complete());
        assert!(c.add(105, 10).is_err(), "overlaps the prefix");
        assert!(c.add(115, 10).is_err(), "overlaps a later run");
        c.add(110, 10).unwrap();
        assert!(c.is_complete());
        assert!(c.add(129, 1).is_err());
    }

    #[test]
    fn bounds_and_overflow() {
        let mut c = Coverage::new(u64::MAX - 10, 10);
        assert!(c.add(u64::MAX - 2, 5).is_err());
        assert!(c.add(0, 1).is_err());
        assert!(c.add(u64::MAX - 10, 0).is_err());
        c.add(u64::MAX - 10, 10).unwrap();
        assert!(c.is_complete());
    }
}
