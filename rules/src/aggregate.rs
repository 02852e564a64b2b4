//! The mergeable per-(series, minute) state (SPEC §2).
//!
//! An [`Aggregate`] is a histogram summary (count, sum, min, max, bucket counts) plus the
//! estimated cost and unpriced tokens computed when its points were merged (SPEC §4: history
//! keeps the price of its time). Merging is associative and commutative, exactly: sums are
//! [`Fixed`] integers, counts are integers, min/max are order-free, and buckets with different
//! bounds merge by upper bound (see [`Aggregate::merge`]). Minute, hour and day values and
//! cross-node query results are all merges of this one type.

use crate::fixed::Fixed;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Explicit histogram bucket bounds, shared between all states of a series.
pub type Bounds = Arc<[f64]>;

/// One normalised delta, ready to merge. Borrowed, so merging allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct Delta<'a> {
    /// Number of recorded values (0 for counter series).
    pub count: u64,
    /// Sum of recorded values (the increment for counter series).
    pub sum: Fixed,
    /// Smallest recorded value, when the point carried it and it describes this delta.
    pub min: Option<f64>,
    /// Largest recorded value, when the point carried it and it describes this delta.
    pub max: Option<f64>,
    /// Bucket bounds (empty for counter series).
    pub bounds: &'a Bounds,
    /// Per-bucket counts, `bounds.len() + 1` of them (empty for counter series).
    pub buckets: &'a [u64],
    /// Estimated cost of these tokens at the price in force now (micro-units).
    pub cost: Fixed,
    /// Input and output tokens of a model without a price.
    pub unpriced: Fixed,
}

/// Mergeable histogram state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Number of recorded values.
    pub count: u64,
    /// Sum of recorded values.
    pub sum: Fixed,
    /// Smallest value among the contributions that reported one.
    pub min: Option<f64>,
    /// Largest value among the contributions that reported one.
    pub max: Option<f64>,
    /// True while every contribution with values reported its min and max, i.e. `min`/`max`
    /// are the true extremes. Cumulative points do not (their extremes cover the series' life).
    pub extremes_exact: bool,
    /// Bucket bounds; empty for counter series.
    pub bounds: Bounds,
    /// Per-bucket counts (`bounds.len() + 1`, the last one the overflow bucket).
    pub buckets: Vec<u64>,
    /// Estimated cost, micro-units of the pricing currency.
    pub cost: Fixed,
    /// Input and output tokens of models that had no price when merged.
    pub unpriced: Fixed,
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate::empty()
    }
}

impl Aggregate {
    /// The identity of [`Aggregate::merge`].
    pub fn empty() -> Aggregate {
        Aggregate {
            count: 0,
            sum: Fixed::ZERO,
            min: None,
            max: None,
            extremes_exact: true,
            bounds: empty_bounds(),
            buckets: Vec::new(),
            cost: Fixed::ZERO,
            unpriced: Fixed::ZERO,
        }
    }

    /// A state holding exactly one delta.
    pub fn from_delta(delta: &Delta<'_>) -> Aggregate {
        let mut state = Aggregate::empty();
        state.merge_delta(delta);
        state
    }

    /// True for the identity (nothing merged).
    pub fn is_empty(&self) -> bool {
        self.count == 0
            && self.sum.is_zero()
            && self.cost.is_zero()
            && self.unpriced.is_zero()
            && self.min.is_none()
            && self.max.is_none()
            && self.extremes_exact
            && self.buckets.iter().all(|c| *c == 0)
    }

    /// Merges one delta. No allocation when the bounds equal the state's (the hot path).
    pub fn merge_delta(&mut self, delta: &Delta<'_>) {
        self.count = self.count.saturating_add(delta.count);
        self.sum += delta.sum;
        self.cost += delta.cost;
        self.unpriced += delta.unpriced;
        self.merge_extremes(
            delta.count,
            delta.min,
            delta.max,
            delta.count == 0 || (delta.min.is_some() && delta.max.is_some()),
        );
        self.merge_buckets(delta.bounds, delta.buckets);
    }

    /// Merges another state into this one.
    pub fn merge(&mut self, other: &Aggregate) {
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.cost += other.cost;
        self.unpriced += other.unpriced;
        self.merge_extremes(other.count, other.min, other.max, other.extremes_exact);
        self.merge_buckets(&other.bounds, &other.buckets);
    }

    fn merge_extremes(&mut self, count: u64, min: Option<f64>, max: Option<f64>, exact: bool) {
        self.min = match (self.min, min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if count > 0 || !exact {
            self.extremes_exact &= exact;
        }
    }

    fn merge_buckets(&mut self, bounds: &Bounds, buckets: &[u64]) {
        if buckets.is_empty() {
            return;
        }
        if self.buckets.is_empty() {
            self.bounds = Arc::clone(bounds);
            self.buckets.extend_from_slice(buckets);
            return;
        }
        if Arc::ptr_eq(&self.bounds, bounds) || *self.bounds == **bounds {
            for (mine, theirs) in self.buckets.iter_mut().zip(buckets) {
                *mine = mine.saturating_add(*theirs);
            }
            return;
        }
        self.merge_foreign_buckets(bounds, buckets);
    }

    /// Merges buckets with other bounds (an upgraded gateway, a custom SDK view) over the union
    /// of both bound lists: every count stays under its own upper bound, which is all a
    /// percentile reports (SPEC §3.1). The result does not depend on merge order.
    #[cold]
    fn merge_foreign_buckets(&mut self, bounds: &Bounds, buckets: &[u64]) {
        let mut union: Vec<f64> = self.bounds.iter().chain(bounds.iter()).copied().collect();
        union.sort_by(f64::total_cmp);
        union.dedup();
        let mut merged = vec![0u64; union.len() + 1];
        for (own_bounds, own_buckets) in [(&self.bounds, self.buckets.as_slice()), (bounds, buckets)] {
            for (index, count) in own_buckets.iter().enumerate() {
                let target = match own_bounds.get(index) {
                    Some(upper) => union.partition_point(|b| b < upper),
                    None => union.len(),
                };
                merged[target] = merged[target].saturating_add(*count);
            }
        }
        self.bounds = union.into();
        self.buckets = merged;
    }

    /// Mean of recorded values times `scale`, absent when nothing was recorded.
    pub fn mean(&self, scale: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        Some(self.sum.to_f64() * scale / self.count as f64)
    }

    /// Percentile `rank` (1..=100) times `scale` (SPEC §3.1): the upper bound of the first bucket
    /// whose cumulative count reaches `ceil(rank/100 · total)`, never above the observed max
    /// when it is known; the overflow bucket reports the max. Absent when there are no values,
    /// or when the rank falls into the overflow bucket and the max is not known.
    pub fn percentile(&self, rank: u32, scale: f64) -> Option<f64> {
        // Counts stop at 2^64 - 1 rather than wrap (a total that wrapped to 0 answered no value).
        let total = self.buckets.iter().fold(0u64, |total, count| total.saturating_add(*count));
        if total == 0 {
            return None;
        }
        let target = (u128::from(rank) * u128::from(total)).div_ceil(100);
        let mut cumulative: u128 = 0;
        let mut index = self.buckets.len() - 1;
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += u128::from(*count);
            if cumulative >= target {
                index = i;
                break;
            }
        }
        let exact_max = if self.extremes_exact { self.max } else { None };
        match (self.bounds.get(index), exact_max) {
            (Some(upper), Some(max)) if max < *upper => Some(max * scale),
            (Some(upper), _) => Some(upper * scale),
            (None, Some(max)) => Some(max * scale),
            (None, None) => None,
        }
    }
}

/// The shared empty bound list of counter series and empty states.
pub fn empty_bounds() -> Bounds {
    thread_local! {
        static EMPTY: Bounds = Arc::from(Vec::<f64>::new());
    }
    EMPTY.with(Arc::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(values: &[f64]) -> Bounds {
        Arc::from(values.to_vec())
    }

    fn delta<'a>(
        count: u64,
        sum: f64,
        bounds: &'a Bounds,
        buckets: &'a [u64],
        min: Option<f64>,
        max: Option<f64>,
    ) -> Delta<'a> {
        Delta {
            count,
            sum: Fixed::from_f64(sum).unwrap(),
            min,
            max,
            bounds,
            buckets,
            cost: Fixed::ZERO,
            unpriced: Fixed::ZERO,
        }
    }

    #[test]
    fn test_aggregate_merge_delta_adds_everything() {
        let b = bounds(&[1.0, 2.0]);
        let mut state = Aggregate::empty();
        state.merge_delta(&delta(2, 1.5, &b, &[1, 1, 0], Some(0.5), Some(1.0)));
        state.merge_delta(&delta(1, 3.0, &b, &[0, 0, 1], Some(3.0), Some(3.0)));
        assert_eq!(state.count, 3);
        assert_eq!(state.sum, Fixed::from_f64(4.5).unwrap());
        assert_eq!(state.buckets, vec![1, 1, 1]);
        assert_eq!((state.min, state.max, state.extremes_exact), (Some(0.5), Some(3.0), true));
        assert_eq!(state.mean(1000.0), Some(1500.0));
    }

    #[test]
    fn test_aggregate_missing_extremes_make_them_inexact() {
        let b = bounds(&[1.0]);
        let mut state = Aggregate::from_delta(&delta(1, 0.5, &b, &[1, 0], Some(0.5), Some(0.5)));
        state.merge_delta(&delta(1, 2.0, &b, &[0, 1], None, None));
        assert!(!state.extremes_exact);
        // The overflow bucket cannot report a max it does not know.
        assert_eq!(state.percentile(99, 1.0), None);
        assert_eq!(state.percentile(50, 1.0), Some(1.0), "no clamping to a max that is not the true max");
    }

    #[test]
    fn test_aggregate_empty_delta_keeps_extremes_exact() {
        let b = bounds(&[1.0]);
        let mut state = Aggregate::from_delta(&delta(1, 0.5, &b, &[1, 0], Some(0.5), Some(0.5)));
        state.merge_delta(&delta(0, 0.0, &b, &[0, 0], None, None));
        assert!(state.extremes_exact);
    }

    #[test]
    fn test_percentile_rank_uses_ceiling_of_share() {
        // SkyWalking case J: {10ms:3, 20ms:2, 40ms:2} → p75 = 40 (ceil(0.75·7) = 6).
        let b = bounds(&[0.01, 0.02, 0.04]);
        let state = Aggregate::from_delta(&delta(7, 0.15, &b, &[3, 2, 2, 0], None, None));
        assert_eq!(state.percentile(50, 1000.0), Some(20.0));
        assert_eq!(state.percentile(75, 1000.0), Some(40.0));
        assert_eq!(state.percentile(99, 1000.0), Some(40.0));
    }

    #[test]
    fn test_percentile_is_clamped_to_known_max_and_overflow_reports_max() {
        let b = bounds(&[1.0, 2.0]);
        let state = Aggregate::from_delta(&delta(2, 1.7, &b, &[1, 1, 0], Some(0.3), Some(1.4)));
        assert_eq!(state.percentile(50, 1000.0), Some(1000.0));
        assert_eq!(state.percentile(99, 1000.0), Some(1400.0));
        let overflow = Aggregate::from_delta(&delta(1, 7.0, &b, &[0, 0, 1], Some(7.0), Some(7.0)));
        assert_eq!(overflow.percentile(50, 1000.0), Some(7000.0));
    }

    #[test]
    fn test_percentile_absent_without_values() {
        assert_eq!(Aggregate::empty().percentile(50, 1.0), None);
        let b = bounds(&[1.0]);
        assert_eq!(Aggregate::from_delta(&delta(0, 0.0, &b, &[0, 0], None, None)).percentile(50, 1.0), None);
        assert_eq!(Aggregate::empty().mean(1.0), None);
        // Bucket counts whose total passes 2^64 (saturated counts): the total stops at 2^64 - 1
        // (it wrapped to 0, and every percentile was absent beside a saturated request count).
        let mut state = Aggregate::from_delta(&delta(0, 0.0, &b, &[1 << 63, 0], None, None));
        state.buckets = vec![1 << 63, 1 << 63];
        assert_eq!(state.percentile(50, 1.0), Some(1.0));
        assert_eq!(state.percentile(99, 1.0), None, "the overflow bucket without a known max");
    }

    #[test]
    fn test_merge_with_other_bounds_keeps_counts_under_their_upper_bounds() {
        let a = bounds(&[1.0, 4.0]);
        let b = bounds(&[2.0, 4.0]);
        let mut left = Aggregate::from_delta(&delta(3, 6.0, &a, &[1, 1, 1], None, None));
        let right = Aggregate::from_delta(&delta(3, 6.0, &b, &[1, 2, 0], None, None));
        let mut reversed = right.clone();
        reversed.merge(&left);
        left.merge(&right);
        assert_eq!(&*left.bounds, &[1.0, 2.0, 4.0]);
        assert_eq!(left.buckets, vec![1, 1, 3, 1]);
        assert_eq!(left, reversed);
    }

    #[test]
    fn test_empty_is_identity() {
        let b = bounds(&[1.0]);
        let state = Aggregate::from_delta(&delta(1, 0.5, &b, &[1, 0], Some(0.5), Some(0.5)));
        let mut left = Aggregate::empty();
        left.merge(&state);
        let mut right = state.clone();
        right.merge(&Aggregate::empty());
        assert_eq!(left, state);
        assert_eq!(right, state);
        assert!(Aggregate::empty().is_empty());
        assert!(!state.is_empty());
    }
}
