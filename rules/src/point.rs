//! Validation of single OTLP points (SPEC §1.5), and the reasons a point is not merged.

use crate::fixed::{Fixed, FIXED_MAX_UNITS};
use opentelemetry_proto::tonic::metrics::v1::{number_data_point, HistogramDataPoint, NumberDataPoint};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The OTLP `DataPointFlags.FLAG_NO_RECORDED_VALUE` bit.
pub const FLAG_NO_RECORDED_VALUE: u32 = 1;

/// Whether a point carries a delta or a running total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Temporality {
    /// The point covers (start, time] only.
    Delta,
    /// The point covers everything since `start`.
    Cumulative,
}

impl Temporality {
    /// From the OTLP enum value (`UNSPECIFIED` has no meaning for sums and histograms).
    pub fn from_otlp(value: i32) -> Option<Temporality> {
        match value {
            1 => Some(Temporality::Delta),
            2 => Some(Temporality::Cumulative),
            _ => None,
        }
    }
}

/// A point that passed validation. Histogram vectors are moved out of the request, not copied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidPoint {
    /// `start_time_unix_nano` (0 when the sender does not know it).
    pub start_ns: u64,
    /// `time_unix_nano`.
    pub time_ns: u64,
    /// Delta or cumulative.
    pub temporality: Temporality,
    /// Recorded values.
    pub count: u64,
    /// Sum of values (for counters: the value).
    pub sum: Fixed,
    /// Smallest value, if sent.
    pub min: Option<f64>,
    /// Largest value, if sent.
    pub max: Option<f64>,
    /// Explicit bounds (empty for counters and for histograms without buckets).
    pub bounds: Vec<f64>,
    /// Bucket counts, `bounds.len() + 1` of them, or empty.
    pub buckets: Vec<u64>,
    /// Histogram or counter.
    pub kind: PointKind,
}

/// The OTLP type a point came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointKind {
    /// A histogram point.
    Histogram,
    /// A sum point; a decrease is a reset only when the sum is monotonic.
    Counter {
        /// `Sum.is_monotonic`.
        monotonic: bool,
    },
}

/// Why a point (or a log record) was rejected. The names are stable: they are self-metric
/// label values and appear in `partial_success.error_message`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// A gateway resource without a service attribute.
    MissingService,
    /// A catalogue metric of a type Tollgate cannot merge (gauge, summary, exponential histogram).
    UnsupportedType,
    /// Temporality `UNSPECIFIED`.
    UnspecifiedTemporality,
    /// `time_unix_nano` is zero, or the start lies after the time.
    InvalidTime,
    /// `bucket_counts` does not have `explicit_bounds + 1` entries.
    BucketCountMismatch,
    /// The bucket counts do not add up to `count`.
    BucketSumMismatch,
    /// Explicit bounds that are not finite and strictly increasing.
    InvalidBounds,
    /// Sum, min, max or value that is NaN or infinite.
    NonFiniteValue,
    /// A histogram point without a sum.
    MissingSum,
    /// A number point without a value.
    MissingValue,
    /// A value too large to be a measurement (over 10^17).
    ValueOutOfRange,
    /// Older than `max_lateness` behind the newest minute of its partition.
    TooLate,
    /// More than `max_future` ahead of the clock.
    TooFarInFuture,
    /// A cumulative point older than one already merged for its series.
    OutOfOrder,
    /// The service already has `max_series_per_service` series.
    CardinalityLimit,
    /// A service or instance name longer than [`crate::entity::MAX_NAME_BYTES`]. Last: reports
    /// between nodes are postcard, which writes a variant by its position, so a new reason goes
    /// after the others (a node of the previous version reads the ones it knows the same).
    NameTooLong,
}

impl RejectReason {
    /// Every reason, for exhaustive self-metric registration.
    pub const ALL: [RejectReason; 16] = [
        RejectReason::MissingService,
        RejectReason::NameTooLong,
        RejectReason::UnsupportedType,
        RejectReason::UnspecifiedTemporality,
        RejectReason::InvalidTime,
        RejectReason::BucketCountMismatch,
        RejectReason::BucketSumMismatch,
        RejectReason::InvalidBounds,
        RejectReason::NonFiniteValue,
        RejectReason::MissingSum,
        RejectReason::MissingValue,
        RejectReason::ValueOutOfRange,
        RejectReason::TooLate,
        RejectReason::TooFarInFuture,
        RejectReason::OutOfOrder,
        RejectReason::CardinalityLimit,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingService => "missing_service",
            RejectReason::NameTooLong => "name_too_long",
            RejectReason::UnsupportedType => "unsupported_type",
            RejectReason::UnspecifiedTemporality => "unspecified_temporality",
            RejectReason::InvalidTime => "invalid_time",
            RejectReason::BucketCountMismatch => "bucket_count_mismatch",
            RejectReason::BucketSumMismatch => "bucket_sum_mismatch",
            RejectReason::InvalidBounds => "invalid_bounds",
            RejectReason::NonFiniteValue => "non_finite_value",
            RejectReason::MissingSum => "missing_sum",
            RejectReason::MissingValue => "missing_value",
            RejectReason::ValueOutOfRange => "value_out_of_range",
            RejectReason::TooLate => "too_late",
            RejectReason::TooFarInFuture => "too_far_in_future",
            RejectReason::OutOfOrder => "out_of_order",
            RejectReason::CardinalityLimit => "cardinality_limit",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected point: the reason and what exactly was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The category.
    pub reason: RejectReason,
    /// The specifics, for `error_message` (`"bucket_counts has 14 entries, explicit_bounds 14: expected 15"`).
    pub detail: String,
}

impl Rejection {
    /// A rejection.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Rejection {
        Rejection { reason, detail: detail.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// What validation decided about one point.
#[derive(Clone, Debug, PartialEq)]
pub enum Checked {
    /// Valid.
    Valid(ValidPoint),
    /// Flagged `NO_RECORDED_VALUE`: skipped, neither merged nor rejected.
    NoRecordedValue,
    /// Invalid.
    Rejected(Rejection),
}

fn check_times(start_ns: u64, time_ns: u64) -> Result<(), Rejection> {
    if time_ns == 0 {
        return Err(Rejection::new(RejectReason::InvalidTime, "time_unix_nano is 0"));
    }
    if start_ns > time_ns {
        return Err(Rejection::new(
            RejectReason::InvalidTime,
            format!("start_time_unix_nano {start_ns} is after time_unix_nano {time_ns}"),
        ));
    }
    Ok(())
}

fn fixed(field: &str, value: f64) -> Result<Fixed, Rejection> {
    if !value.is_finite() {
        return Err(Rejection::new(RejectReason::NonFiniteValue, format!("{field} is {value}")));
    }
    Fixed::from_f64(value)
        .ok_or_else(|| Rejection::new(RejectReason::ValueOutOfRange, format!("{field} {value} is beyond ±1e17")))
}

fn finite(field: &str, value: Option<f64>) -> Result<Option<f64>, Rejection> {
    match value {
        Some(v) if !v.is_finite() => Err(Rejection::new(RejectReason::NonFiniteValue, format!("{field} is {v}"))),
        other => Ok(other),
    }
}

/// Validates a histogram point, moving its bucket vectors out.
pub fn check_histogram(point: &mut HistogramDataPoint, temporality: Temporality) -> Checked {
    if point.flags & FLAG_NO_RECORDED_VALUE != 0 {
        return Checked::NoRecordedValue;
    }
    match histogram(point, temporality) {
        Ok(valid) => Checked::Valid(valid),
        Err(rejection) => Checked::Rejected(rejection),
    }
}

fn histogram(point: &mut HistogramDataPoint, temporality: Temporality) -> Result<ValidPoint, Rejection> {
    check_times(point.start_time_unix_nano, point.time_unix_nano)?;
    let Some(sum) = point.sum else {
        return Err(Rejection::new(RejectReason::MissingSum, "histogram point has no sum"));
    };
    let sum = fixed("sum", sum)?;
    // OTLP leaves the sum out of a histogram that recorded negative values, and a histogram
    // without observations sums to 0: either made means, rates and costs negative, or a mean of
    // a sum over no calls.
    if sum < Fixed::ZERO {
        return Err(Rejection::new(
            RejectReason::ValueOutOfRange,
            format!("sum {sum} is negative (OTLP leaves the sum out of a histogram that recorded negative values)"),
        ));
    }
    if point.count == 0 && sum != Fixed::ZERO {
        return Err(Rejection::new(
            RejectReason::ValueOutOfRange,
            format!("sum {sum} with count 0: no observation sums to 0"),
        ));
    }
    let min = finite("min", point.min)?;
    let max = finite("max", point.max)?;
    let bounds = &point.explicit_bounds;
    if let Some(index) = bounds.iter().position(|b| !b.is_finite()) {
        return Err(Rejection::new(
            RejectReason::InvalidBounds,
            format!("explicit_bounds[{index}] is {}", bounds[index]),
        ));
    }
    if let Some(index) = bounds.windows(2).position(|pair| pair[0] >= pair[1]) {
        return Err(Rejection::new(
            RejectReason::InvalidBounds,
            format!(
                "explicit_bounds are not strictly increasing at index {}: {} then {}",
                index + 1,
                bounds[index],
                bounds[index + 1]
            ),
        ));
    }
    let buckets = &point.bucket_counts;
    // A histogram without buckets (no bounds, no counts) is valid OTLP: count and sum only.
    if !(buckets.is_empty() && bounds.is_empty()) {
        if buckets.len() != bounds.len() + 1 {
            return Err(Rejection::new(
                RejectReason::BucketCountMismatch,
                format!(
                    "bucket_counts has {} entries and explicit_bounds {}: expected {}",
                    buckets.len(),
                    bounds.len(),
                    bounds.len() + 1
                ),
            ));
        }
        let total = buckets.iter().try_fold(0u64, |acc, c| acc.checked_add(*c));
        if total != Some(point.count) {
            let shown = total.map(|t| t.to_string()).unwrap_or_else(|| "more than 2^64".to_string());
            return Err(Rejection::new(
                RejectReason::BucketSumMismatch,
                format!("bucket_counts add up to {shown} but count is {}", point.count),
            ));
        }
    }
    Ok(ValidPoint {
        start_ns: point.start_time_unix_nano,
        time_ns: point.time_unix_nano,
        temporality,
        count: point.count,
        sum,
        min,
        max,
        bounds: std::mem::take(&mut point.explicit_bounds),
        buckets: std::mem::take(&mut point.bucket_counts),
        kind: PointKind::Histogram,
    })
}

/// Validates a sum (counter) point.
pub fn check_number(point: &NumberDataPoint, temporality: Temporality, monotonic: bool) -> Checked {
    if point.flags & FLAG_NO_RECORDED_VALUE != 0 {
        return Checked::NoRecordedValue;
    }
    match number(point, temporality, monotonic) {
        Ok(valid) => Checked::Valid(valid),
        Err(rejection) => Checked::Rejected(rejection),
    }
}

fn number(point: &NumberDataPoint, temporality: Temporality, monotonic: bool) -> Result<ValidPoint, Rejection> {
    check_times(point.start_time_unix_nano, point.time_unix_nano)?;
    let value = match point.value {
        Some(number_data_point::Value::AsDouble(v)) => fixed("value", v)?,
        // The same bound as a double's: an integer value beyond it was taken whole (up to ±9.2e18).
        Some(number_data_point::Value::AsInt(v)) if v.unsigned_abs() > FIXED_MAX_UNITS as u64 => {
            return Err(Rejection::new(RejectReason::ValueOutOfRange, format!("value {v} is beyond ±1e17")))
        }
        Some(number_data_point::Value::AsInt(v)) => Fixed::from_int(v),
        None => return Err(Rejection::new(RejectReason::MissingValue, "number point has no value")),
    };
    // A monotonic sum only counts up: a negative total or increment (a broken exporter) would make
    // a count per minute negative.
    if monotonic && value < Fixed::ZERO {
        return Err(Rejection::new(
            RejectReason::ValueOutOfRange,
            format!("value {value} of a monotonic sum is negative (a monotonic sum only counts up)"),
        ));
    }
    Ok(ValidPoint {
        start_ns: point.start_time_unix_nano,
        time_ns: point.time_unix_nano,
        temporality,
        count: 0,
        sum: value,
        min: None,
        max: None,
        bounds: Vec::new(),
        buckets: Vec::new(),
        kind: PointKind::Counter { monotonic },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports between nodes carry reasons by position (postcard): each keeps its number, so
    /// that nodes of two versions read each other's reports alike during a rolling upgrade.
    #[test]
    fn test_reject_reasons_keep_their_wire_numbers() {
        let numbered = [
            (RejectReason::MissingService, 0u8),
            (RejectReason::UnsupportedType, 1),
            (RejectReason::UnspecifiedTemporality, 2),
            (RejectReason::InvalidTime, 3),
            (RejectReason::BucketCountMismatch, 4),
            (RejectReason::BucketSumMismatch, 5),
            (RejectReason::InvalidBounds, 6),
            (RejectReason::NonFiniteValue, 7),
            (RejectReason::MissingSum, 8),
            (RejectReason::MissingValue, 9),
            (RejectReason::ValueOutOfRange, 10),
            (RejectReason::TooLate, 11),
            (RejectReason::TooFarInFuture, 12),
            (RejectReason::OutOfOrder, 13),
            (RejectReason::CardinalityLimit, 14),
            (RejectReason::NameTooLong, 15),
        ];
        assert_eq!(numbered.len(), RejectReason::ALL.len());
        for (reason, number) in numbered {
            assert_eq!(postcard::to_allocvec(&reason).unwrap(), vec![number], "{reason:?}");
        }
    }

    fn histogram_point() -> HistogramDataPoint {
        HistogramDataPoint {
            start_time_unix_nano: 1_000,
            time_unix_nano: 2_000,
            count: 3,
            sum: Some(3.5),
            bucket_counts: vec![1, 2, 0],
            explicit_bounds: vec![1.0, 2.0],
            min: Some(0.5),
            max: Some(1.5),
            ..Default::default()
        }
    }

    fn reason(checked: Checked) -> RejectReason {
        match checked {
            Checked::Rejected(rejection) => rejection.reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn test_check_histogram_accepts_and_moves_vectors() {
        let mut point = histogram_point();
        let Checked::Valid(valid) = check_histogram(&mut point, Temporality::Delta) else { panic!() };
        assert_eq!(valid.buckets, vec![1, 2, 0]);
        assert_eq!(valid.bounds, vec![1.0, 2.0]);
        assert_eq!(valid.sum, Fixed::from_f64(3.5).unwrap());
        assert!(point.bucket_counts.is_empty());
    }

    #[test]
    fn test_check_histogram_rejects_bucket_count_mismatch() {
        let mut point = histogram_point();
        point.bucket_counts = vec![1, 2];
        let Checked::Rejected(rejection) = check_histogram(&mut point, Temporality::Delta) else { panic!() };
        assert_eq!(rejection.reason, RejectReason::BucketCountMismatch);
        assert_eq!(rejection.detail, "bucket_counts has 2 entries and explicit_bounds 2: expected 3");
    }

    #[test]
    fn test_check_histogram_rejects_counts_not_adding_up() {
        let mut point = histogram_point();
        point.count = 4;
        let Checked::Rejected(rejection) = check_histogram(&mut point, Temporality::Delta) else { panic!() };
        assert_eq!(rejection.reason, RejectReason::BucketSumMismatch);
        assert_eq!(rejection.detail, "bucket_counts add up to 3 but count is 4");
        let mut overflow = histogram_point();
        overflow.bucket_counts = vec![u64::MAX, 1, 0];
        assert_eq!(reason(check_histogram(&mut overflow, Temporality::Delta)), RejectReason::BucketSumMismatch);
    }

    #[test]
    fn test_check_histogram_rejects_non_finite_values() {
        for mutate in [
            (|p: &mut HistogramDataPoint| p.sum = Some(f64::NAN)) as fn(&mut HistogramDataPoint),
            |p| p.sum = Some(f64::INFINITY),
            |p| p.min = Some(f64::NEG_INFINITY),
            |p| p.max = Some(f64::NAN),
        ] {
            let mut point = histogram_point();
            mutate(&mut point);
            assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::NonFiniteValue);
        }
    }

    #[test]
    fn test_check_histogram_rejects_bad_bounds() {
        let mut point = histogram_point();
        point.explicit_bounds = vec![2.0, 1.0];
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::InvalidBounds);
        let mut point = histogram_point();
        point.explicit_bounds = vec![1.0, f64::INFINITY];
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::InvalidBounds);
        let mut point = histogram_point();
        point.explicit_bounds = vec![1.0, 1.0];
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::InvalidBounds);
    }

    #[test]
    fn test_check_histogram_rejects_missing_sum_time_and_huge_values() {
        let mut point = histogram_point();
        point.sum = None;
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::MissingSum);
        let mut point = histogram_point();
        point.time_unix_nano = 0;
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::InvalidTime);
        let mut point = histogram_point();
        point.start_time_unix_nano = 3_000;
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::InvalidTime);
        let mut point = histogram_point();
        point.sum = Some(1e30);
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::ValueOutOfRange);
        // OTLP: no sum for negative values, and no observation sums to 0 (they corrupted means).
        let mut point = histogram_point();
        point.sum = Some(-1.0);
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::ValueOutOfRange);
        let mut point = histogram_point();
        (point.count, point.bucket_counts, point.sum) = (0, vec![0; point.bucket_counts.len()], Some(5.0));
        assert_eq!(reason(check_histogram(&mut point, Temporality::Delta)), RejectReason::ValueOutOfRange);
        point.sum = Some(0.0);
        assert!(matches!(check_histogram(&mut point, Temporality::Delta), Checked::Valid(_)));
    }

    #[test]
    fn test_check_histogram_accepts_bucketless_point_and_skips_no_recorded_value() {
        let mut point = histogram_point();
        point.bucket_counts.clear();
        point.explicit_bounds.clear();
        assert!(matches!(check_histogram(&mut point, Temporality::Cumulative), Checked::Valid(_)));
        let mut point = histogram_point();
        point.flags = FLAG_NO_RECORDED_VALUE;
        point.sum = Some(f64::NAN);
        assert_eq!(check_histogram(&mut point, Temporality::Delta), Checked::NoRecordedValue);
    }

    #[test]
    fn test_check_number_reads_int_and_double() {
        let mut point = NumberDataPoint {
            time_unix_nano: 5,
            value: Some(number_data_point::Value::AsInt(7)),
            ..Default::default()
        };
        let Checked::Valid(valid) = check_number(&point, Temporality::Cumulative, true) else { panic!() };
        assert_eq!(valid.sum, Fixed::from_int(7));
        assert_eq!(valid.kind, PointKind::Counter { monotonic: true });
        point.value = Some(number_data_point::Value::AsDouble(2.5));
        let Checked::Valid(valid) = check_number(&point, Temporality::Delta, false) else { panic!() };
        assert_eq!(valid.sum, Fixed::from_f64(2.5).unwrap());
        // Integers have the doubles' bound (±1e17), and the bound itself is accepted.
        for (value, accepted) in [(100_000_000_000_000_000, true), (100_000_000_000_000_001, false), (i64::MIN, false)]
        {
            for value in [value, -value.max(-i64::MAX)] {
                point.value = Some(number_data_point::Value::AsInt(value));
                let checked = check_number(&point, Temporality::Delta, false);
                match accepted {
                    true => assert!(matches!(checked, Checked::Valid(_)), "{value}"),
                    false => assert_eq!(reason(checked), RejectReason::ValueOutOfRange, "{value}"),
                }
            }
        }
        // A monotonic sum cannot be negative, in either temporality; a non-monotonic one can.
        for value in [number_data_point::Value::AsInt(-25), number_data_point::Value::AsDouble(-0.5)] {
            point.value = Some(value);
            for temporality in [Temporality::Delta, Temporality::Cumulative] {
                let Checked::Rejected(rejection) = check_number(&point, temporality, true) else { panic!("{value:?}") };
                assert_eq!(rejection.reason, RejectReason::ValueOutOfRange);
                assert!(rejection.detail.contains("monotonic sum is negative"), "{}", rejection.detail);
                assert!(matches!(check_number(&point, temporality, false), Checked::Valid(_)));
            }
        }
        point.value = Some(number_data_point::Value::AsInt(0));
        assert!(matches!(check_number(&point, Temporality::Delta, true), Checked::Valid(_)));
        point.value = None;
        assert_eq!(reason(check_number(&point, Temporality::Delta, true)), RejectReason::MissingValue);
        point.value = Some(number_data_point::Value::AsDouble(f64::NAN));
        assert_eq!(reason(check_number(&point, Temporality::Delta, true)), RejectReason::NonFiniteValue);
    }

    #[test]
    fn test_reject_reason_names_are_unique() {
        let mut names: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
    }
}
