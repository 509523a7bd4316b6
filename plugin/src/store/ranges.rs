//! Inclusive seq ranges: what a device acknowledged, kept merged so pages can walk the holes.

use super::{Skipped, StoreError};

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

/// How many seqs of `1..=upto` the ranges leave out.
pub(crate) fn uncovered(ranges: &[SeqRange], upto: u64) -> u64 {
    let covered: u64 = ranges
        .iter()
        .filter(|r| r.lo <= upto)
        .map(|r| r.hi.min(upto) - r.lo + 1)
        .sum();
    upto - covered
}

/// Where a backlog cap of `keep` cuts the unacknowledged seqs of `1..=max`: the oldest are
/// skipped so that the newest `keep` remain. `None` when no more than `keep` are left or
/// there is no cap (`keep == 0`).
pub(crate) fn backlog_cut(ranges: &[SeqRange], max: u64, keep: u64) -> Option<Skipped> {
    let gaps = gaps_newest_first(ranges, max);
    let backlog: u64 = gaps.iter().map(|g| g.hi - g.lo + 1).sum();
    if keep == 0 || backlog <= keep {
        return None;
    }
    let mut left = keep;
    for gap in gaps {
        let len = gap.hi - gap.lo + 1;
        if len > left {
            return Some(Skipped {
                upto: gap.hi - left,
                count: backlog - keep,
            });
        }
        left -= len;
    }
    None
}

/// Adds the seqs every device counts as acknowledged, `1..=gone_seq` (deleted by
/// retention), to a device's ranges.
pub(crate) fn with_gone(ranges: &[SeqRange], gone_seq: u64) -> Vec<SeqRange> {
    match SeqRange::new(1, gone_seq) {
        Some(gone) => insert(ranges, gone),
        None => ranges.to_vec(),
    }
}

/// A requested acknowledgement clamped to the conversation's last seq.
///
/// # Errors
/// [`StoreError::Invalid`] if it starts past the last seq.
pub(crate) fn clamped_ack(range: SeqRange, max_seq: u64) -> Result<SeqRange, StoreError> {
    if range.lo > max_seq {
        return Err(StoreError::past_end(range.lo, max_seq));
    }
    Ok(SeqRange {
        lo: range.lo,
        hi: range.hi.min(max_seq),
    })
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
    fn uncovered_counts_the_holes_up_to_a_seq() {
        assert_eq!(uncovered(&[], 7), 7);
        assert_eq!(uncovered(&[r(2, 3), r(6, 20)], 7), 3);
        assert_eq!(uncovered(&[r(1, 9)], 0), 0);
    }

    #[test]
    fn a_backlog_cut_keeps_the_newest_unacknowledged() {
        // Unacked: 1..=4, 8..=10 (7 seqs); keeping 5 skips 1 and 2.
        let cut = backlog_cut(&[r(5, 7)], 10, 5).unwrap();
        assert_eq!((cut.upto, cut.count), (2, 2));
        // Keeping 3 skips the whole older gap.
        let cut = backlog_cut(&[r(5, 7)], 10, 3).unwrap();
        assert_eq!((cut.upto, cut.count), (4, 4));
        assert_eq!(backlog_cut(&[r(5, 7)], 10, 7), None);
        assert_eq!(backlog_cut(&[], 10, 0), None);
    }

    #[test]
    fn clamped_acks_stop_at_the_last_seq() {
        assert_eq!(clamped_ack(r(3, 90), 10).unwrap(), r(3, 10));
        assert!(matches!(
            clamped_ack(r(11, 12), 10),
            Err(StoreError::Invalid(_))
        ));
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
