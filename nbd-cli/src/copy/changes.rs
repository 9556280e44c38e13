//! `--changed`: what an incremental copy must do with each run of the
//! source, from its dirty bitmap and, where the source offers it,
//! `base:allocation` (a dirty run that reads as zeroes is zeroed on the
//! destination without being read).

use crate::extents::{Run, STATE_ZERO};

/// Merged flag: the run changed since the bitmap started.
pub const DIRTY: u64 = 1;
/// Merged flag: the run reads as zeroes.
pub const ZERO: u64 = 2;

/// `qemu:dirty-bitmap:*` flag: the extent changed since the bitmap started.
const BITMAP_DIRTY: u64 = 1;

/// Runs carrying [`DIRTY`] and [`ZERO`], from the bitmap's runs and the
/// allocation runs, both starting at the same offset. Where the two lists
/// cover different lengths, the result covers the shorter.
pub fn merge(bitmap: &[Run], allocation: Option<&[Run]>) -> Vec<Run> {
    let dirty = |r: &Run| {
        if r.flags & BITMAP_DIRTY != 0 {
            DIRTY
        } else {
            0
        }
    };
    let Some(allocation) = allocation else {
        return bitmap
            .iter()
            .map(|r| Run {
                flags: dirty(r),
                ..*r
            })
            .collect();
    };
    let (Some(first_a), Some(first_b)) = (bitmap.first(), allocation.first()) else {
        return Vec::new();
    };
    let mut at = first_a.offset.max(first_b.offset);
    let mut merged = Vec::with_capacity(bitmap.len() + allocation.len());
    let (mut i, mut j) = (0, 0);
    while i < bitmap.len() && j < allocation.len() {
        let (a, b) = (&bitmap[i], &allocation[j]);
        let (a_end, b_end) = (a.offset + a.length, b.offset + b.length);
        let end = a_end.min(b_end);
        if end > at {
            let zero = if b.flags & STATE_ZERO != 0 { ZERO } else { 0 };
            merged.push(Run {
                offset: at,
                length: end - at,
                flags: dirty(a) | zero,
            });
            at = end;
        }
        if a_end == end {
            i += 1;
        }
        if b_end == end {
            j += 1;
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offset: u64, length: u64, flags: u64) -> Run {
        Run {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn dirty_and_zero_runs_intersect_and_cover_the_shorter_list() {
        let bitmap = [run(0, 100, 0), run(100, 50, 1), run(150, 100, 0)];
        let allocation = [run(0, 120, 0), run(120, 100, 3)];
        assert_eq!(
            merge(&bitmap, Some(&allocation)),
            [
                run(0, 100, 0),
                run(100, 20, DIRTY),
                run(120, 30, DIRTY | ZERO),
                run(150, 70, ZERO),
            ]
        );
    }

    #[test]
    fn without_allocation_only_the_dirty_bit_counts() {
        let bitmap = [run(0, 10, 1), run(10, 10, 0), run(20, 5, 7)];
        assert_eq!(
            merge(&bitmap, None),
            [run(0, 10, DIRTY), run(10, 10, 0), run(20, 5, DIRTY)]
        );
        assert_eq!(merge(&[], Some(&[run(0, 5, 0)])), []);
    }
}
