//! Sorted, coalesced sets of half-open `u64` ranges (file offsets of dirty
//! pages).

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    pub const fn new() -> RangeSet {
        RangeSet { ranges: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Total length covered.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }

    /// Adds `[start, end)`, merging with overlapping or adjacent ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range whose end reaches `start`.
        let i = self.ranges.partition_point(|&(_, e)| e < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < self.ranges.len() && self.ranges[j].0 <= end {
            s = s.min(self.ranges[j].0);
            e = e.max(self.ranges[j].1);
            j += 1;
        }
        self.ranges.splice(i..j, std::iter::once((s, e)));
    }

    pub fn extend(&mut self, other: &RangeSet) {
        for (a, b) in other.iter() {
            self.insert(a, b);
        }
    }

    /// The part of the set inside `[start, end)`.
    pub fn clip(&self, start: u64, end: u64) -> RangeSet {
        let mut out = RangeSet::new();
        for (a, b) in self.iter() {
            out.insert(a.max(start), b.min(end));
        }
        out
    }

    /// Removes `[start, end)` from the set.
    pub fn remove(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b <= start || a >= end {
                out.push((a, b));
                continue;
            }
            if a < start {
                out.push((a, start));
            }
            if b > end {
                out.push((end, b));
            }
        }
        self.ranges = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &RangeSet) -> Vec<(u64, u64)> {
        s.iter().collect()
    }

    #[test]
    fn insert_merges_overlap_and_adjacency() {
        let mut s = RangeSet::new();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(v(&s), vec![(10, 20), (30, 40)]);
        s.insert(20, 30);
        assert_eq!(v(&s), vec![(10, 40)]);
        s.insert(0, 5);
        s.insert(50, 60);
        s.insert(3, 55);
        assert_eq!(v(&s), vec![(0, 60)]);
        s.insert(7, 7);
        assert_eq!(s.len(), 60);
    }

    #[test]
    fn insert_out_of_order() {
        let mut s = RangeSet::new();
        for (a, b) in [(50, 60), (10, 20), (30, 35), (34, 36), (0, 1)] {
            s.insert(a, b);
        }
        assert_eq!(v(&s), vec![(0, 1), (10, 20), (30, 36), (50, 60)]);
    }

    #[test]
    fn clip_and_remove() {
        let mut s = RangeSet::new();
        s.insert(0, 100);
        s.insert(200, 300);
        assert_eq!(v(&s.clip(50, 250)), vec![(50, 100), (200, 250)]);
        s.remove(50, 250);
        assert_eq!(v(&s), vec![(0, 50), (250, 300)]);
        s.remove(0, 1000);
        assert!(s.is_empty());
    }
}
