//! A set of disjoint half-open `u64` ranges, kept merged, in a `BTreeMap` (start -> end).
//!
//! Used for received packet numbers (ACK generation), acknowledged stream offsets and stream
//! ranges waiting for retransmission.

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Adds `range`; returns true if any value in it was new.
    pub fn insert(&mut self, range: Range<u64>) -> bool {
        if range.is_empty() {
            return false;
        }
        let (mut start, mut end) = (range.start, range.end);
        // Fully contained in an existing range?
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= end {
                return false;
            }
            if e >= start {
                start = s;
                self.map.remove(&s);
            }
        }
        // Absorb ranges that start inside [start, end].
        while let Some((&s, &e)) = self.map.range(start..=end).next() {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        true
    }

    /// Removes `range` from the set.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (start, end) = (range.start, range.end);
        if let Some((&s, &e)) = self.map.range(..start).next_back()
            && e > start
        {
            self.map.insert(s, start);
            if e > end {
                self.map.insert(end, e);
                return;
            }
        }
        while let Some((&s, &e)) = self.map.range(start..end).next() {
            self.map.remove(&s);
            if e > end {
                self.map.insert(end, e);
                break;
            }
        }
    }

    pub fn contains(&self, v: u64) -> bool {
        self.map
            .range(..=v)
            .next_back()
            .is_some_and(|(_, &e)| e > v)
    }

    /// True if every value of `range` is in the set.
    pub fn contains_range(&self, range: Range<u64>) -> bool {
        range.is_empty()
            || self
                .map
                .range(..=range.start)
                .next_back()
                .is_some_and(|(_, &e)| e >= range.end)
    }

    pub fn min(&self) -> Option<u64> {
        self.map.keys().next().copied()
    }

    pub fn max(&self) -> Option<u64> {
        self.map.values().next_back().copied()
    }

    /// The lowest range.
    pub fn first(&self) -> Option<Range<u64>> {
        self.map.iter().next().map(|(&s, &e)| s..e)
    }

    /// Removes and returns up to `max_len` values from the lowest range.
    pub fn pop_front(&mut self, max_len: u64) -> Option<Range<u64>> {
        let (&s, &e) = self.map.iter().next()?;
        self.map.remove(&s);
        let take_end = e.min(s.saturating_add(max_len));
        if take_end < e {
            self.map.insert(take_end, e);
        }
        Some(s..take_end)
    }

    /// Ranges from highest to lowest.
    pub fn iter_rev(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().rev().map(|(&s, &e)| s..e)
    }

    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Drops the lowest ranges until at most `max_ranges` remain.
    pub fn keep_highest(&mut self, max_ranges: usize) {
        while self.map.len() > max_ranges {
            self.map.pop_first();
        }
    }

    /// Drops every value below `floor`.
    pub fn remove_below(&mut self, floor: u64) {
        self.remove(0..floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut s = RangeSet::new();
        assert!(s.insert(10..20));
        assert!(s.insert(30..40));
        assert!(!s.insert(12..18));
        assert!(s.insert(20..30));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..40]);
        s.remove(15..25);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..15, 25..40]);
        assert!(s.contains(14) && !s.contains(15) && s.contains(25));
        assert_eq!(s.pop_front(3), Some(10..13));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![13..15, 25..40]);
        s.remove_below(30);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![30..40]);
    }

    #[test]
    fn matches_a_bitmap_under_random_operations() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut s = RangeSet::new();
        let mut bits = [false; 300];
        for _ in 0..5000 {
            let a = next() % 300;
            let b = (a + next() % 40).min(300);
            if next() % 3 == 0 {
                s.remove(a..b);
                bits[a as usize..b as usize].fill(false);
            } else {
                s.insert(a..b);
                bits[a as usize..b as usize].fill(true);
            }
            for (i, &bit) in bits.iter().enumerate() {
                assert_eq!(s.contains(i as u64), bit, "value {i}");
            }
            // Stays merged: no two ranges touch.
            let v: Vec<_> = s.iter().collect();
            for w in v.windows(2) {
                assert!(w[0].end < w[1].start);
            }
        }
    }
}
