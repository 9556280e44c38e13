//! Which parts of a sequence of overlapping changes still matter once they
//! have all happened: for the reconnect journal, which writes the kept
//! writes again all at once on a new connection.
//!
//! A server may carry out commands in flight in any order, so two
//! overlapping writes sent together can land in either order. Writing only
//! the parts of each change that no later change covers gives pieces that
//! do not overlap: sent together, they leave the export as the changes did
//! one after another, whatever order the server picks (and no byte is sent
//! twice).

use std::collections::BTreeMap;
use std::ops::Range;

/// For `changes` in the order they happened, each tagged by `K`: the
/// pieces of each change's range that no later change covers, in the
/// order of the changes (a change's pieces ascending). Empty ranges have no
/// pieces. The pieces never overlap one another and cover the union of the
/// changes' ranges.
pub(crate) fn uncovered_by_later<K>(
    changes: impl DoubleEndedIterator<Item = (K, Range<u64>)>,
) -> Vec<(K, Range<u64>)>
where
    K: Copy,
{
    // Disjoint, non-touching ranges already covered by later changes, by start.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut pieces_newest_first = Vec::new();
    let mut touching = Vec::new();
    for (key, range) in changes.rev() {
        if range.start >= range.end {
            continue;
        }
        // The covered ranges that overlap or touch this one, ascending.
        // They are disjoint and sorted, so walking down from the last one
        // starting at or before `range.end` can stop at the first that ends
        // before `range.start`.
        touching.clear();
        for (&start, &end) in covered.range(..=range.end).rev() {
            if end < range.start {
                break;
            }
            touching.push(start..end);
        }
        touching.reverse();
        let mut own = Vec::new();
        let mut at = range.start;
        for other in &touching {
            if other.start > at {
                own.push(at..other.start.min(range.end));
            }
            at = at.max(other.end);
        }
        if at < range.end {
            own.push(at..range.end);
        }
        // Newest first overall, so a change's pieces go in reversed and
        // come out ascending after the final reversal.
        pieces_newest_first.extend(own.into_iter().rev().map(|piece| (key, piece)));
        let mut merged = range.clone();
        for other in &touching {
            covered.remove(&other.start);
            merged.start = merged.start.min(other.start);
            merged.end = merged.end.max(other.end);
        }
        covered.insert(merged.start, merged.end);
    }
    pieces_newest_first.reverse();
    pieces_newest_first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(changes: &[Range<u64>]) -> Vec<(usize, Range<u64>)> {
        uncovered_by_later(changes.iter().cloned().enumerate())
    }

    #[test]
    fn a_later_change_takes_what_it_covers() {
        assert_eq!(
            pieces(&[0..8, 4..12, 2..6]),
            [(0, 0..2), (1, 6..12), (2, 2..6)]
        );
    }

    #[test]
    fn a_change_covered_entirely_has_no_pieces() {
        assert_eq!(pieces(&[4..8, 0..16]), [(1, 0..16)]);
        assert_eq!(pieces(&[0..4, 0..4]), [(1, 0..4)]);
    }

    #[test]
    fn a_change_split_by_later_ones_keeps_each_gap() {
        assert_eq!(
            pieces(&[0..20, 2..4, 8..10, 10..12]),
            [
                (0, 0..2),
                (0, 4..8),
                (0, 12..20),
                (1, 2..4),
                (2, 8..10),
                (3, 10..12)
            ]
        );
    }

    #[test]
    fn disjoint_and_empty_changes() {
        assert_eq!(
            pieces(&[0..4, 5..5, 8..12, 4..8]),
            [(0, 0..4), (2, 8..12), (3, 4..8)]
        );
    }

    /// A small deterministic generator, so that a failure replays.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Random changes applied one after another give the same bytes as
    /// their pieces applied in any order; the pieces never overlap.
    #[test]
    fn pieces_in_any_order_equal_the_changes_in_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let count = 1 + next(&mut state) % 12;
            let changes: Vec<Range<u64>> = (0..count)
                .map(|_| {
                    let start = next(&mut state) % 64;
                    start..start + next(&mut state) % 24
                })
                .collect();
            let mut in_order = [usize::MAX; 96];
            for (i, r) in changes.iter().enumerate() {
                in_order[r.start as usize..r.end as usize].fill(i);
            }
            let mut pieces = pieces(&changes);
            // Newest pieces first: the worst order for a naive replay.
            pieces.reverse();
            let mut by_pieces = [usize::MAX; 96];
            for (i, r) in &pieces {
                let span = &mut by_pieces[r.start as usize..r.end as usize];
                assert!(
                    span.iter().all(|b| *b == usize::MAX),
                    "round {round}: pieces overlap: {pieces:?} of {changes:?}"
                );
                span.fill(*i);
            }
            assert_eq!(in_order, by_pieces, "round {round}: {changes:?}");
        }
    }
}
