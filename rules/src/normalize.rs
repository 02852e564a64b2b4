//! Per-series normalisation (SPEC §1.5): de-duplication, lateness, and cumulative → delta.
//!
//! The owner of a series keeps one [`SeriesCursor`] per series and one [`PartitionClock`] per
//! partition, and feeds every valid point through [`normalize`]. Both are plain data so that
//! the node can persist them next to the merged state in the same atomic write: after a
//! restart a retried export is recognised as a duplicate, and a cumulative series continues
//! from its last baseline.

use crate::aggregate::Bounds;
use crate::fixed::Fixed;
use crate::point::{PointKind, RejectReason, Rejection, Temporality, ValidPoint};
use crate::seen::SeenKeys;
use crate::series::NANOS_PER_MINUTE;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Time windows of normalisation. Part of the replicated rules: every owner must agree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// Points whose minute is more than this behind the newest minute of their partition are
    /// rejected as `too_late`.
    #[serde(default = "default_max_lateness_seconds")]
    pub max_lateness_seconds: u64,
    /// Points more than this ahead of the clock are rejected as `too_far_in_future`.
    #[serde(default = "default_max_future_seconds")]
    pub max_future_seconds: u64,
    /// The first cumulative point of a series counts whole only if its start is at most this far
    /// before its time; otherwise it only becomes the baseline.
    #[serde(default = "default_max_delta_gap_seconds")]
    pub max_delta_gap_seconds: u64,
    /// New series of a service beyond this many are rejected as `cardinality_limit`.
    #[serde(default = "default_max_series_per_service")]
    pub max_series_per_service: usize,
}

fn default_max_lateness_seconds() -> u64 {
    600
}
fn default_max_future_seconds() -> u64 {
    300
}
fn default_max_delta_gap_seconds() -> u64 {
    300
}
fn default_max_series_per_service() -> usize {
    20_000
}

impl Default for NormalizeConfig {
    fn default() -> Self {
        NormalizeConfig {
            max_lateness_seconds: default_max_lateness_seconds(),
            max_future_seconds: default_max_future_seconds(),
            max_delta_gap_seconds: default_max_delta_gap_seconds(),
            max_series_per_service: default_max_series_per_service(),
        }
    }
}

impl NormalizeConfig {
    /// Checks the windows are usable; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        const DAY: u64 = 86_400;
        for (field, value) in [
            ("max_lateness_seconds", self.max_lateness_seconds),
            ("max_future_seconds", self.max_future_seconds),
            ("max_delta_gap_seconds", self.max_delta_gap_seconds),
        ] {
            if value > DAY {
                return Err(format!("normalize.{field}: {value} is more than a day ({DAY})"));
            }
        }
        if self.max_series_per_service == 0 {
            return Err("normalize.max_series_per_service: must be at least 1".into());
        }
        Ok(())
    }

    /// `max_lateness_seconds` in nanoseconds.
    pub fn lateness_ns(&self) -> u64 {
        self.max_lateness_seconds * 1_000_000_000
    }
}

/// The identity of one point within its series: `(start, time)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PointKey {
    /// `time_unix_nano` (first, so keys sort by time).
    pub time_ns: u64,
    /// `start_time_unix_nano`.
    pub start_ns: u64,
}

/// The last cumulative point of a series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Its start time.
    pub start_ns: u64,
    /// Its time.
    pub time_ns: u64,
    /// Its running count.
    pub count: u64,
    /// Its running sum.
    pub sum: Fixed,
    /// Its bounds.
    pub bounds: Bounds,
    /// Its running bucket counts.
    pub buckets: Vec<u64>,
}

/// Normalisation state of one series.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesCursor {
    /// The last cumulative point, for cumulative series.
    pub baseline: Option<Baseline>,
    /// The last points of other start times that are still alive, for a cumulative series that
    /// two sources send at once (pods of one service without `service.instance.id`): each start
    /// time keeps its own running totals. Empty for a series with one source. They share the
    /// bounds of `baseline`.
    pub others: Box<[Baseline]>,
    /// Keys of the points accepted within the lateness window, sorted. Older keys are
    /// forgotten: a point that old is rejected as too late anyway.
    pub seen: SeenKeys,
}

/// The newest minute seen in a partition `(service, instance)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionClock {
    /// Start of the newest minute with an accepted point, in unix nanoseconds.
    pub newest_minute_ns: Option<u64>,
}

impl PartitionClock {
    /// The earliest `time_unix_nano` still accepted.
    pub fn oldest_accepted_ns(&self, config: &NormalizeConfig) -> u64 {
        self.newest_minute_ns.map(|newest| newest.saturating_sub(config.lateness_ns())).unwrap_or(0)
    }

    fn advance(&mut self, time_ns: u64) {
        let minute_ns = time_ns - time_ns % NANOS_PER_MINUTE;
        if self.newest_minute_ns.is_none_or(|newest| minute_ns > newest) {
            self.newest_minute_ns = Some(minute_ns);
        }
    }
}

/// What [`normalize`] decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Normalized {
    /// Merge the point: it now holds the delta to merge (count, sum, buckets; min and max only
    /// when they describe the delta).
    Merge,
    /// Already merged earlier (a retried export): accept, do not merge.
    Duplicate,
    /// The first point of a cumulative series that started long ago: it became the baseline.
    Baseline,
    /// Not merged.
    Rejected(Rejection),
}

/// Normalises one valid point of a series whose cursor is `cursor` and whose partition clock
/// is `clock`, given the current time `now_ns`. On [`Normalized::Merge`], `point` has been
/// rewritten in place into the delta to merge (no allocation). `bounds` is the series'
/// interned bound list equal to `point.bounds`.
pub fn normalize(
    cursor: &mut SeriesCursor,
    clock: &mut PartitionClock,
    point: &mut ValidPoint,
    bounds: &Bounds,
    now_ns: u64,
    config: &NormalizeConfig,
) -> Normalized {
    let future_limit = now_ns.saturating_add(config.max_future_seconds * 1_000_000_000);
    if point.time_ns > future_limit {
        return Normalized::Rejected(Rejection::new(
            RejectReason::TooFarInFuture,
            format!(
                "time {} is {} s ahead of the clock (limit {} s)",
                point.time_ns,
                (point.time_ns - now_ns) / 1_000_000_000,
                config.max_future_seconds
            ),
        ));
    }
    let oldest = clock.oldest_accepted_ns(config);
    let point_minute_ns = point.time_ns - point.time_ns % NANOS_PER_MINUTE;
    if point_minute_ns < oldest {
        return Normalized::Rejected(Rejection::new(
            RejectReason::TooLate,
            format!(
                "minute of time {} is more than {} s behind the newest minute of its partition",
                point.time_ns, config.max_lateness_seconds
            ),
        ));
    }
    // Lateness is checked first so that the answer does not depend on when old keys were
    // forgotten: a point that is too late is rejected whether or not it was merged before.
    // And a point older than keys the series forgot, which a longer window (a rules change) lets
    // through: it may be one of them, and a retried export must not be merged twice.
    if point.time_ns < cursor.seen.forgotten_before() {
        return Normalized::Rejected(Rejection::new(
            RejectReason::TooLate,
            format!(
                "time {} is before {}, when its series forgot the points it had merged (the lateness window was \
                 shorter then): it cannot be told from one of them",
                point.time_ns,
                cursor.seen.forgotten_before()
            ),
        ));
    }
    let key = PointKey { time_ns: point.time_ns, start_ns: point.start_ns };
    // Points usually arrive newest last: only an older key needs the search.
    let newest_seen = cursor.seen.back().is_some_and(|newest| key <= newest);
    if newest_seen && cursor.seen.contains(&key) {
        return Normalized::Duplicate;
    }
    let outcome = match point.temporality {
        Temporality::Delta => Normalized::Merge,
        Temporality::Cumulative => match cumulative_to_delta(cursor, point, bounds, oldest, config) {
            Ok(outcome) => outcome,
            Err(rejection) => return Normalized::Rejected(rejection),
        },
    };
    clock.advance(point.time_ns);
    remember(cursor, key, clock.oldest_accepted_ns(config));
    outcome
}

fn remember(cursor: &mut SeriesCursor, key: PointKey, oldest_ns: u64) {
    cursor.seen.insert(key);
    // Keys are sorted by time: the expired ones are the oldest, usually none or one.
    cursor.seen.forget_before(oldest_ns);
}

fn cumulative_to_delta(
    cursor: &mut SeriesCursor,
    point: &mut ValidPoint,
    bounds: &Bounds,
    oldest_ns: u64,
    config: &NormalizeConfig,
) -> Result<Normalized, Rejection> {
    // Extremes of a cumulative point cover the series' whole life, not the delta.
    point.min = None;
    point.max = None;
    let Some(baseline) = cursor.baseline.as_mut() else {
        cursor.baseline = Some(baseline_of(point, bounds));
        return Ok(first_point(point, config));
    };
    if point.start_ns != baseline.start_ns || !cursor.others.is_empty() {
        if let Some(outcome) = switch_stream(cursor, point, bounds, oldest_ns, config)? {
            return Ok(outcome);
        }
    }
    let baseline = cursor.baseline.as_mut().expect("switch_stream leaves a baseline");
    if point.time_ns < baseline.time_ns {
        return Err(out_of_order(point, baseline.time_ns));
    }
    if is_reset(baseline, point, bounds) {
        *baseline = baseline_of(point, bounds);
        return Ok(Normalized::Merge);
    }
    // Counts that did not go down with a sum that did: a negative increase, which OTLP does not
    // allow a histogram's sum to carry (it made token rates, costs and latencies negative). A
    // drop within a billionth of the sum is floating-point rounding (a Collector that adds
    // cumulative histograms in another order at each export), taken as no change.
    if matches!(point.kind, PointKind::Histogram) && point.sum < baseline.sum {
        let drop = baseline.sum.nanos() - point.sum.nanos();
        if drop.saturating_mul(1_000_000_000) > baseline.sum.nanos() {
            return Err(Rejection::new(
                RejectReason::ValueOutOfRange,
                format!(
                    "sum went down from {} to {} while the counts did not: a histogram's sum only grows (OTLP \
                     leaves it out of a histogram that recorded negative values)",
                    baseline.sum, point.sum
                ),
            ));
        }
        point.sum = baseline.sum;
    }
    // delta = point − baseline; baseline = point, swapped in place without allocating.
    let (count, sum) = (point.count, point.sum);
    point.count -= baseline.count;
    point.sum = point.sum - baseline.sum;
    for (current, previous) in point.buckets.iter_mut().zip(baseline.buckets.iter_mut()) {
        let running = *current;
        *current = running - *previous;
        *previous = running;
    }
    baseline.count = count;
    baseline.sum = sum;
    baseline.time_ns = point.time_ns;
    Ok(Normalized::Merge)
}

/// The first point of a cumulative series (or of a source of it) counts whole only if its start
/// is at most `max_delta_gap` before it; otherwise it only becomes the baseline.
fn first_point(point: &ValidPoint, config: &NormalizeConfig) -> Normalized {
    let gap_ns = point.time_ns - point.start_ns;
    if point.start_ns > 0 && gap_ns <= config.max_delta_gap_seconds * 1_000_000_000 {
        Normalized::Merge
    } else {
        Normalized::Baseline
    }
}

/// Most start times a cumulative series keeps at once (see [`SeriesCursor::others`]).
pub const MAX_STARTS_PER_SERIES: usize = 32;

fn out_of_order(point: &ValidPoint, last_ns: u64) -> Rejection {
    Rejection::new(
        RejectReason::OutOfOrder,
        format!("cumulative point at {} is older than the last one merged at {last_ns}", point.time_ns),
    )
}

/// Makes the baseline of `point`'s start time the current one, for a point whose start differs
/// from the current baseline's or a series that keeps other start times. A start time is one
/// life of one source. Two sources that send one series (pods of a service without
/// `service.instance.id`) alternate between their start times: keeping each start's totals apart
/// keeps them exact, where a reset at each change would count each source's whole total again
/// at every export.
///
/// - A start time the series keeps becomes the current baseline again, and the point is a delta
///   from it as usual (or out of order).
/// - A new start at or after the series' newest point is a new life (a restart, or a source
///   that just started): the point is the delta, as SPEC §1.5's reset says.
/// - A new start before it is another source alive at the same time: its first point counts as
///   a series' first point does (whole only within `max_delta_gap`).
///
/// The other start times are kept beside the current one, except those whose last point is older
/// than `oldest_ns` (the lateness window: a source that restarted stops sending its earlier
/// start). A new start beyond [`MAX_STARTS_PER_SERIES`] is refused (`cardinality_limit`): the
/// starts kept stay exact, and a start frees its place once it expires. Other starts keep the
/// bounds of the current one: a point with other bounds forgets them (it is a reset). A point
/// refused leaves the cursor as it was (the owner does not store it). Returns the outcome when
/// the point needs no delta (a new start), `None` to go on with the current baseline.
fn switch_stream(
    cursor: &mut SeriesCursor,
    point: &ValidPoint,
    bounds: &Bounds,
    oldest_ns: u64,
    config: &NormalizeConfig,
) -> Result<Option<Normalized>, Rejection> {
    let baseline = cursor.baseline.as_mut().expect("a cursor with starts to switch has a baseline");
    let kept = cursor.others.iter().position(|other| other.start_ns == point.start_ns);
    let own_last_ns = match kept {
        Some(i) => Some(cursor.others[i].time_ns),
        None => (point.start_ns == baseline.start_ns).then_some(baseline.time_ns),
    };
    if let Some(last_ns) = own_last_ns.filter(|&last_ns| point.time_ns < last_ns) {
        return Err(out_of_order(point, last_ns));
    }
    let same_bounds = Arc::ptr_eq(bounds, &baseline.bounds) || **bounds == *baseline.bounds;
    let alive = |other: &Baseline| other.time_ns >= oldest_ns;
    if own_last_ns.is_none() && same_bounds {
        let starts = 1 + usize::from(alive(baseline)) + cursor.others.iter().filter(|other| alive(other)).count();
        if starts > MAX_STARTS_PER_SERIES {
            return Err(Rejection::new(
                RejectReason::CardinalityLimit,
                format!(
                    "start time {} would make {starts} start times of the series at once (at most \
                     {MAX_STARTS_PER_SERIES}): more sources send it than Tollgate keeps apart (pods without \
                     service.instance.id?)",
                    point.start_ns
                ),
            ));
        }
    }
    let newest_ns = cursor.others.iter().map(|other| other.time_ns).max().unwrap_or(0).max(baseline.time_ns);
    let mut others = std::mem::take(&mut cursor.others).into_vec();
    let outcome = match kept {
        Some(i) => {
            std::mem::swap(baseline, &mut others[i]);
            None
        }
        None if own_last_ns.is_some() => None,
        None => {
            let outcome = if point.start_ns >= newest_ns { Normalized::Merge } else { first_point(point, config) };
            others.push(std::mem::replace(baseline, baseline_of(point, bounds)));
            Some(outcome)
        }
    };
    if !same_bounds {
        // Other bounds (a new gateway version): the other starts cannot go on with them.
        others.clear();
    }
    others.retain(alive);
    cursor.others = others.into_boxed_slice();
    Ok(outcome)
}

/// A reset: a new start time, other bounds, or any running total that went down (for sums
/// that are not monotonic, a lower value is a legitimate decrease, not a reset).
fn is_reset(baseline: &Baseline, point: &ValidPoint, bounds: &Bounds) -> bool {
    if point.start_ns != baseline.start_ns || !Arc::ptr_eq(bounds, &baseline.bounds) && **bounds != *baseline.bounds {
        return true;
    }
    match point.kind {
        PointKind::Counter { monotonic: false } => false,
        PointKind::Counter { monotonic: true } => point.sum < baseline.sum,
        PointKind::Histogram => {
            point.count < baseline.count
                || point.buckets.len() != baseline.buckets.len()
                || point.buckets.iter().zip(&baseline.buckets).any(|(now, before)| now < before)
        }
    }
}

fn baseline_of(point: &ValidPoint, bounds: &Bounds) -> Baseline {
    Baseline {
        start_ns: point.start_ns,
        time_ns: point.time_ns,
        count: point.count,
        sum: point.sum,
        bounds: Arc::clone(bounds),
        buckets: point.buckets.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::PointKind;

    const MINUTE: u64 = NANOS_PER_MINUTE;
    const T0: u64 = 1_764_151_200 * 1_000_000_000;

    fn bounds() -> Bounds {
        Arc::from(vec![1.0, 2.0])
    }

    fn point(temporality: Temporality, start: u64, time: u64, buckets: [u64; 3], sum: f64) -> ValidPoint {
        ValidPoint {
            start_ns: start,
            time_ns: time,
            temporality,
            count: buckets.iter().sum(),
            sum: Fixed::from_f64(sum).unwrap(),
            min: Some(0.1),
            max: Some(5.0),
            bounds: vec![1.0, 2.0],
            buckets: buckets.to_vec(),
            kind: PointKind::Histogram,
        }
    }

    struct Harness {
        cursor: SeriesCursor,
        clock: PartitionClock,
        bounds: Bounds,
        config: NormalizeConfig,
        now: u64,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                cursor: SeriesCursor::default(),
                clock: PartitionClock::default(),
                bounds: bounds(),
                config: NormalizeConfig::default(),
                now: T0 + 10 * MINUTE,
            }
        }

        fn feed(&mut self, mut p: ValidPoint) -> (Normalized, ValidPoint) {
            let outcome = normalize(&mut self.cursor, &mut self.clock, &mut p, &self.bounds, self.now, &self.config);
            (outcome, p)
        }
    }

    fn rejected(outcome: Normalized) -> RejectReason {
        match outcome {
            Normalized::Rejected(r) => r.reason,
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    #[test]
    fn test_normalize_delta_points_pass_through_with_extremes() {
        let mut h = Harness::new();
        let (outcome, p) = h.feed(point(Temporality::Delta, T0, T0 + 10, [1, 1, 0], 1.5));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!((p.count, p.min, p.max), (2, Some(0.1), Some(5.0)));
    }

    #[test]
    fn test_normalize_duplicate_key_is_not_merged_twice() {
        let mut h = Harness::new();
        assert_eq!(h.feed(point(Temporality::Delta, T0, T0 + 10, [1, 0, 0], 0.5)).0, Normalized::Merge);
        assert_eq!(h.feed(point(Temporality::Delta, T0, T0 + 10, [1, 0, 0], 0.5)).0, Normalized::Duplicate);
        // Same time, other start: another point (e.g. another exporter).
        assert_eq!(h.feed(point(Temporality::Delta, T0 + 1, T0 + 10, [1, 0, 0], 0.5)).0, Normalized::Merge);
    }

    #[test]
    fn test_normalize_cumulative_first_point_within_gap_counts_whole() {
        let mut h = Harness::new();
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0, T0 + 40_000_000_000, [2, 1, 0], 2.5));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!((p.count, p.buckets.clone(), p.min, p.max), (3, vec![2, 1, 0], None, None));
    }

    #[test]
    fn test_normalize_cumulative_first_point_of_old_series_is_baseline_only() {
        let mut h = Harness::new();
        let start = T0 - 6 * MINUTE;
        assert_eq!(h.feed(point(Temporality::Cumulative, start, T0, [5, 5, 0], 9.0)).0, Normalized::Baseline);
        let (outcome, p) = h.feed(point(Temporality::Cumulative, start, T0 + 30, [6, 7, 1], 13.25));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!((p.count, p.buckets.clone(), p.sum), (4, vec![1, 2, 1], Fixed::from_f64(4.25).unwrap()));
        assert_eq!(h.cursor.baseline.as_ref().unwrap().buckets, vec![6, 7, 1]);
    }

    #[test]
    fn test_normalize_cumulative_unknown_start_is_baseline_only() {
        let mut h = Harness::new();
        assert_eq!(h.feed(point(Temporality::Cumulative, 0, T0, [1, 0, 0], 0.5)).0, Normalized::Baseline);
    }

    #[test]
    fn test_normalize_cumulative_reset_on_new_start_or_decrease() {
        let mut h = Harness::new();
        h.feed(point(Temporality::Cumulative, T0, T0 + 10, [5, 0, 0], 2.5));
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0 + 20, T0 + 30, [1, 0, 0], 0.5));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!(p.count, 1, "a new start: the point itself is the delta");
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0 + 20, T0 + 40, [0, 1, 0], 1.5));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!((p.count, p.buckets), (1, vec![0, 1, 0]), "a bucket went down: reset");
    }

    /// A sum that went down while no count did is a negative increase, which a histogram cannot
    /// carry: refused, and the next point is a delta from the last one merged (token rates and
    /// costs went negative).
    #[test]
    fn test_normalize_cumulative_sum_going_down_without_a_reset_is_refused() {
        let mut h = Harness::new();
        h.feed(point(Temporality::Cumulative, T0, T0 + 10, [2, 0, 0], 500.0));
        let (outcome, _) = h.feed(point(Temporality::Cumulative, T0, T0 + 20, [3, 0, 0], 400.0));
        assert_eq!(rejected(outcome), RejectReason::ValueOutOfRange);
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0, T0 + 30, [4, 0, 0], 900.0));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!((p.count, p.sum), (2, Fixed::from_f64(400.0).unwrap()));
        // Rounding: a billionth of the sum lower is no change (a sum of 9e8 ms, one ulp apart).
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0, T0 + 40, [5, 0, 0], 899.999_999_1));
        assert_eq!(outcome, Normalized::Merge);
        assert_eq!((p.count, p.sum), (1, Fixed::ZERO));
        let (_, p) = h.feed(point(Temporality::Cumulative, T0, T0 + 50, [6, 0, 0], 901.0));
        assert_eq!((p.count, p.sum), (1, Fixed::from_f64(1.0).unwrap()), "the next delta is from the sum merged");
    }

    /// Two pods of one service without `service.instance.id` send the same series, each with its
    /// own start time, their exports interleaved: each start keeps its own running totals, so
    /// every delta is what that pod counted since its previous export.
    #[test]
    fn test_normalize_two_sources_of_one_series_are_each_counted_once() {
        let mut h = Harness::new();
        let (a, b) = (T0 - 2 * MINUTE, T0 - MINUTE);
        let sent = [
            (a, T0 + 10, [10, 0, 0]),
            (b, T0 + 11, [3, 0, 0]),
            (a, T0 + 20, [12, 1, 0]),
            (b, T0 + 19, [4, 0, 0]),
            (a, T0 + 30, [12, 2, 0]),
            (b, T0 + 31, [7, 0, 1]),
        ];
        let deltas: Vec<(Normalized, Vec<u64>)> = sent
            .iter()
            .map(|&(start, time, buckets)| {
                let (outcome, p) = h.feed(point(Temporality::Cumulative, start, time, buckets, 0.0));
                (outcome, p.buckets)
            })
            .collect();
        assert_eq!(
            deltas,
            vec![
                (Normalized::Merge, vec![10, 0, 0]),
                (Normalized::Merge, vec![3, 0, 0]),
                (Normalized::Merge, vec![2, 1, 0]),
                (Normalized::Merge, vec![1, 0, 0]),
                (Normalized::Merge, vec![0, 1, 0]),
                (Normalized::Merge, vec![3, 0, 1]),
            ],
            "a reset at each change of start would merge 10+3+13+4+14+8 = 52 requests, not 20"
        );
        assert_eq!(h.cursor.others.len(), 1);
        // A retried export of either is a duplicate; an older point of either is out of order.
        assert_eq!(h.feed(point(Temporality::Cumulative, a, T0 + 20, [12, 1, 0], 0.0)).0, Normalized::Duplicate);
        assert_eq!(
            rejected(h.feed(point(Temporality::Cumulative, b, T0 + 25, [5, 0, 0], 0.0)).0),
            RejectReason::OutOfOrder
        );
    }

    /// A new start after the series' last point is a new life (SPEC §1.5's reset): the point is
    /// the delta. A new start before it is another source: its first point counts whole only
    /// within `max_delta_gap`, as a series' first point does. Either way the earlier start is
    /// kept: after a new pod started, the one already there goes on with its own totals.
    #[test]
    fn test_normalize_a_new_life_counts_whole_and_an_old_source_is_a_baseline() {
        let mut h = Harness::new();
        h.feed(point(Temporality::Cumulative, T0, T0 + 10, [5, 0, 0], 0.0));
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0 + 15, T0 + 20, [1, 0, 0], 0.0));
        assert_eq!((outcome, p.count), (Normalized::Merge, 1));
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0, T0 + 25, [7, 0, 0], 0.0));
        assert_eq!((outcome, p.count), (Normalized::Merge, 2), "the first pod still sends: a delta of its own");
        let long_ago = T0 - 6 * MINUTE;
        assert_eq!(h.feed(point(Temporality::Cumulative, long_ago, T0 + 21, [40, 0, 0], 0.0)).0, Normalized::Baseline);
        let (outcome, p) = h.feed(point(Temporality::Cumulative, long_ago, T0 + 31, [42, 0, 0], 0.0));
        assert_eq!((outcome, p.count), (Normalized::Merge, 2));
        let (outcome, p) = h.feed(point(Temporality::Cumulative, T0 + 15, T0 + 30, [4, 0, 0], 0.0));
        assert_eq!((outcome, p.count), (Normalized::Merge, 3));
    }

    /// Beyond `MAX_STARTS_PER_SERIES` start times at once, a new start is refused (the ones kept
    /// stay exact, where forgetting the least recent would forget the source that sends next);
    /// starts are forgotten once their last point is out of the lateness window, which makes room.
    #[test]
    fn test_normalize_other_starts_are_bounded_and_expire() {
        let mut h = Harness::new();
        let source = |n: u64, time: u64, count: u64| {
            point(Temporality::Cumulative, T0 - n * 1_000_000, T0 + 10 * MINUTE + time, [count, 0, 0], 0.0)
        };
        for n in 0..MAX_STARTS_PER_SERIES as u64 {
            let outcome = h.feed(source(n, n, 1)).0;
            assert!(!matches!(outcome, Normalized::Rejected(_)), "source {n}: {outcome:?}");
        }
        assert_eq!(h.cursor.others.len(), MAX_STARTS_PER_SERIES - 1);
        let before = h.cursor.clone();
        let outcome = h.feed(source(99, 100, 1)).0;
        let Normalized::Rejected(rejection) = outcome else { panic!("{outcome:?}") };
        assert_eq!(rejection.reason, RejectReason::CardinalityLimit);
        assert!(rejection.detail.contains("would make 33 start times of the series"), "{}", rejection.detail);
        assert_eq!(h.cursor, before, "a refused start changes nothing");
        // Each source kept goes on exactly.
        for n in 0..MAX_STARTS_PER_SERIES as u64 {
            let (outcome, p) = h.feed(source(n, 200 + n, 1 + n));
            assert_eq!((outcome, p.count), (Normalized::Merge, n), "source {n}");
        }
        // Source 0 goes on alone for more than the lateness window: the others expire.
        h.now = T0 + 30 * MINUTE;
        for step in 1..=12 {
            h.feed(source(0, step * MINUTE, 1 + step));
        }
        assert!(h.cursor.others.is_empty(), "{:?}", h.cursor.others);
        assert_eq!(h.feed(source(99, 13 * MINUTE, 1)).0, Normalized::Baseline, "room again, an old start");
    }

    /// Other starts share the current bounds: a point with other bounds forgets them (it is a
    /// reset). An out-of-order point of a kept start is refused and changes nothing.
    #[test]
    fn test_normalize_other_bounds_forget_the_other_starts_and_out_of_order_changes_nothing() {
        let mut h = Harness::new();
        let (a, b) = (T0 - 2 * MINUTE, T0 - MINUTE);
        h.feed(point(Temporality::Cumulative, a, T0 + 10, [1, 0, 0], 0.0));
        h.feed(point(Temporality::Cumulative, b, T0 + 11, [2, 0, 0], 0.0));
        h.feed(point(Temporality::Cumulative, a, T0 + 20, [3, 0, 0], 0.0));
        let before = h.cursor.clone();
        assert_eq!(
            rejected(h.feed(point(Temporality::Cumulative, b, T0 + 5, [2, 0, 0], 0.0)).0),
            RejectReason::OutOfOrder
        );
        assert_eq!(h.cursor, before);
        let mut wider = point(Temporality::Cumulative, a, T0 + 30, [3, 0, 0], 0.0);
        (wider.bounds, wider.buckets, wider.count) = (vec![1.0, 2.0, 3.0], vec![3, 0, 0, 1], 4);
        let wider_bounds: Bounds = Arc::from(vec![1.0, 2.0, 3.0]);
        let outcome = normalize(&mut h.cursor, &mut h.clock, &mut wider, &wider_bounds, h.now, &h.config);
        assert_eq!((outcome, wider.count), (Normalized::Merge, 4), "other bounds: a reset");
        assert!(h.cursor.others.is_empty(), "the starts of the old bounds are forgotten");
        assert_eq!(h.cursor.baseline.as_ref().unwrap().bounds, wider_bounds);
    }

    #[test]
    fn test_normalize_cumulative_out_of_order_is_rejected_and_retry_is_duplicate() {
        let mut h = Harness::new();
        h.feed(point(Temporality::Cumulative, T0, T0 + 10, [1, 0, 0], 0.5));
        h.feed(point(Temporality::Cumulative, T0, T0 + 30, [2, 0, 0], 1.0));
        let (outcome, _) = h.feed(point(Temporality::Cumulative, T0, T0 + 20, [1, 1, 0], 0.7));
        assert_eq!(rejected(outcome), RejectReason::OutOfOrder);
        assert_eq!(h.feed(point(Temporality::Cumulative, T0, T0 + 10, [1, 0, 0], 0.5)).0, Normalized::Duplicate);
        assert_eq!(h.feed(point(Temporality::Cumulative, T0, T0 + 30, [2, 0, 0], 1.0)).0, Normalized::Duplicate);
        assert_eq!(h.cursor.baseline.as_ref().unwrap().time_ns, T0 + 30);
    }

    #[test]
    fn test_normalize_rejects_late_and_future_points() {
        let mut h = Harness::new();
        h.feed(point(Temporality::Delta, T0 + 9 * MINUTE, T0 + 10 * MINUTE, [1, 0, 0], 0.5));
        // Newest minute is T0+10m; lateness 10 min: T0 itself is still accepted, T0-1ns is not.
        assert_eq!(h.feed(point(Temporality::Delta, T0 - MINUTE, T0, [1, 0, 0], 0.5)).0, Normalized::Merge);
        assert_eq!(
            rejected(h.feed(point(Temporality::Delta, T0 - MINUTE, T0 - 1, [1, 0, 0], 0.5)).0),
            RejectReason::TooLate
        );
        let future = h.now + 5 * MINUTE + 1;
        assert_eq!(
            rejected(h.feed(point(Temporality::Delta, future - 1, future, [1, 0, 0], 0.5)).0),
            RejectReason::TooFarInFuture
        );
        let edge = h.now + 5 * MINUTE;
        assert_eq!(h.feed(point(Temporality::Delta, edge - 1, edge, [1, 0, 0], 0.5)).0, Normalized::Merge);
    }

    #[test]
    fn test_normalize_forgets_keys_outside_the_window() {
        let mut h = Harness::new();
        for minute in 0..30 {
            h.now = T0 + minute * MINUTE + 1;
            h.feed(point(Temporality::Delta, T0 + minute * MINUTE, T0 + minute * MINUTE + 1, [1, 0, 0], 0.5));
        }
        assert_eq!(h.cursor.seen.len(), 11, "keys of minutes 19..=29");
        assert_eq!(h.cursor.seen.forgotten_before(), T0 + 19 * MINUTE);
    }

    /// A longer window does not let a retried point through whose key was forgotten under the
    /// shorter one (it was merged twice): it is too late for its series, while points of the new
    /// window the series still remembers stay duplicates, and a series that forgot nothing takes
    /// the whole new window.
    #[test]
    fn test_a_longer_window_does_not_readmit_forgotten_points() {
        let mut h = Harness::new();
        h.now = T0 + 20 * MINUTE;
        let old = point(Temporality::Delta, T0 + 13 * MINUTE, T0 + 13 * MINUTE + 1, [1, 0, 0], 0.5);
        let kept = point(Temporality::Delta, T0 + 16 * MINUTE, T0 + 16 * MINUTE + 1, [1, 0, 0], 0.5);
        assert_eq!(h.feed(old.clone()).0, Normalized::Merge);
        assert_eq!(h.feed(kept.clone()).0, Normalized::Merge);
        h.config.max_lateness_seconds = 300;
        assert_eq!(
            h.feed(point(Temporality::Delta, T0 + 19 * MINUTE, T0 + 20 * MINUTE, [1, 0, 0], 0.5)).0,
            Normalized::Merge
        );
        assert_eq!(h.cursor.seen.forgotten_before(), T0 + 15 * MINUTE, "the key of minute 13 is forgotten");
        h.config.max_lateness_seconds = 3600;
        assert_eq!(rejected(h.feed(old.clone()).0), RejectReason::TooLate);
        assert_eq!(h.feed(kept).0, Normalized::Duplicate);
        let mut fresh = Harness::new();
        fresh.now = h.now;
        fresh.config.max_lateness_seconds = 3600;
        assert_eq!(
            fresh.feed(point(Temporality::Delta, T0 + 19 * MINUTE, T0 + 20 * MINUTE, [1, 0, 0], 0.5)).0,
            Normalized::Merge
        );
        assert_eq!(fresh.feed(old).0, Normalized::Merge);
    }

    #[test]
    fn test_normalize_counter_decrease_is_reset_only_when_monotonic() {
        let counter = |time: u64, value: i64, monotonic: bool| ValidPoint {
            start_ns: T0,
            time_ns: time,
            temporality: Temporality::Cumulative,
            count: 0,
            sum: Fixed::from_int(value),
            min: None,
            max: None,
            bounds: Vec::new(),
            buckets: Vec::new(),
            kind: PointKind::Counter { monotonic },
        };
        let mut h = Harness::new();
        h.bounds = Arc::from(Vec::new());
        h.feed(counter(T0 + 10, 10, true));
        let (_, p) = h.feed(counter(T0 + 20, 4, true));
        assert_eq!(p.sum, Fixed::from_int(4));
        let mut h = Harness::new();
        h.bounds = Arc::from(Vec::new());
        h.feed(counter(T0 + 10, 10, false));
        let (_, p) = h.feed(counter(T0 + 20, 4, false));
        assert_eq!(p.sum, Fixed::from_int(-6));
    }
}
