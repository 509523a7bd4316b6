//! Inclusive seq ranges: what a device acknowledged, kept merged so pages can walk the holes.

/// An inclusive range of seqs, `lo <= hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// First seq, at least 1.
    pub lo: u64,
    /// Last seq.
    pub hi: u64,
}

impl SeqRange {
    /// A range, or `None` if it is empty or starts at 0.
    pub fn new(lo: u64, hi: u64) -> Option<Self> {
        (lo >= 1 && lo <= hi).then_some(Self { lo, hi })
    }
}

/// Adds `new` to sorted, merged `ranges`, merging neighbours (`[1,3]` + `[4,5]` = `[1,5]`).
pub(crate) fn insert(ranges: &[SeqRange], new: SeqRange) -> Vec<SeqRange> {
    let mut out: Vec<SeqRange> = Vec::with_capacity(ranges.len() + 1);
    let mut all: Vec<SeqRange> = ranges.to_vec();
    all.push(new);
    all.sort_by_key(|r| r.lo);
    for range in all {
        match out.last_mut() {
            Some(last) if range.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(range.hi),
            _ => out.push(range),
        }
    }
    out
}

/// Merges `(conversation, range)` rows sorted by conversation into one merged range list per
/// conversation: what a new device inherits from its user's other devices.
pub(crate) fn union_by_conversation(
    rows: impl IntoIterator<Item = (i64, SeqRange)>,
) -> Vec<(i64, Vec<SeqRange>)> {
    let mut union: Vec<(i64, Vec<SeqRange>)> = Vec::new();
    for (conversation, range) in rows {
        match union.last_mut() {
            Some((id, ranges)) if *id == conversation => *ranges = insert(ranges, range),
            _ => union.push((conversation, vec![range])),
        }
    }
    union
}

/// The unacknowledged gaps of `1..=max`, newest first.
pub(crate) fn gaps_newest_first(ranges: &[SeqRange], max: u64) -> Vec<SeqRange> {
    let mut gaps = Vec::new();
    let mut next = 1;
    for range in ranges {
        if range.lo > max {
            break;
        }
        if range.lo > next {
            gaps.push(SeqRange {
                lo: next,
                hi: range.lo - 1,
            });
        }
        next = next.max(range.hi.saturating_add(1));
    }
    if next <= max {
        gaps.push(SeqRange { lo: next, hi: max });
    }
    gaps.reverse();
    gaps
}

/// Highest `s` such that `1..=s` is covered.
pub(crate) fn watermark(ranges: &[SeqRange]) -> u64 {
    match ranges.first() {
        Some(first) if first.lo == 1 => first.hi,
        _ => 0,
    }
}

/// Ranges in any order, possibly overlapping, as sorted disjoint ranges.
pub(crate) fn normalized(ranges: impl IntoIterator<Item = SeqRange>) -> Vec<SeqRange> {
    ranges
        .into_iter()
        .fold(Vec::new(), |merged, range| insert(&merged, range))
}

/// How many seqs the ranges hold. Acknowledged ranges only grow, so an equal total means
/// the same acknowledgements.
pub(crate) fn total(ranges: &[SeqRange]) -> u64 {
    ranges.iter().map(|r| r.hi - r.lo + 1).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(lo: u64, hi: u64) -> SeqRange {
        SeqRange { lo, hi }
    }

    #[test]
    fn insert_merges_adjacent_and_overlapping() {
        let ranges = insert(&[r(1, 3), r(10, 12)], r(4, 5));
        assert_eq!(ranges, vec![r(1, 5), r(10, 12)]);
        let ranges = insert(&ranges, r(5, 11));
        assert_eq!(ranges, vec![r(1, 12)]);
    }

    #[test]
    fn gaps_are_the_holes_newest_first() {
        assert_eq!(gaps_newest_first(&[], 5), vec![r(1, 5)]);
        assert_eq!(
            gaps_newest_first(&[r(81, 100)], 105),
            vec![r(101, 105), r(1, 80)]
        );
        assert_eq!(gaps_newest_first(&[r(1, 5)], 5), vec![]);
    }

    #[test]
    fn watermark_needs_the_first_seq() {
        assert_eq!(watermark(&[r(2, 9)]), 0);
        assert_eq!(watermark(&[r(1, 9), r(11, 12)]), 9);
    }

    #[test]
    fn total_counts_every_seq() {
        assert_eq!(total(&[]), 0);
        assert_eq!(total(&[r(1, 9), r(11, 12)]), 11);
    }

    #[test]
    fn empty_range_is_rejected() {
        assert_eq!(SeqRange::new(0, 3), None);
        assert_eq!(SeqRange::new(4, 3), None);
        assert_eq!(SeqRange::new(2, 3), Some(r(2, 3)));
    }
}
