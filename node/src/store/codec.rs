//! Key layout and value encoding of the data tree.
//!
//! Keys are big-endian so byte order is numeric order, and start with a one-byte tag and the
//! vnode, so that everything of a vnode forms ranges:
//!
//! | tag | key | value |
//! |---|---|---|
//! | `S` | vnode, partition, series id | `SeriesKey` |
//! | `U` | vnode, partition, series id | the series' normalisation cursor: cumulative baseline and the keys of the points merged within the lateness window |
//! | `C` | vnode, partition | `PartitionClock` |
//! | `R` | vnode, partition | roll-up frontier (minute) |
//! | `M`/`H`/`D` | vnode, series id, period (first minute) | aggregate, bounds by reference |
//! | `B` | bounds hash | bounds |
//! | `L` | vnode, partition, time, fingerprint | [`StoredLog`] |
//! | `F` | vnode, batch fingerprint | time |
//! | `E` | partition | [`EntityRecord`] |
//!
//! Values are postcard (varint integers). Aggregates and baselines refer to their bucket bounds by
//! a 64-bit hash instead of repeating 14-22 floats in every record. A cursor stores its point keys
//! as differences from the previous key (a few bytes each for regular exports), and is rewritten
//! whole with each batch that merges into the series: one record per series instead of one key
//! per point, so that a checkpoint writes a series once however many points it merged.

use super::{EntityRecord, Resolution, StoredLog};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use tollgate_rules::normalize::{Baseline, PartitionClock, PointKey, SeriesCursor};
use tollgate_rules::{Aggregate, Bounds, Fixed, SeriesId};
use xxhash_rust::xxh3::xxh3_64;

/// Tag of series records.
pub const SERIES: u8 = b'S';
/// Tag of partition clocks.
pub const CLOCK: u8 = b'C';
/// Tag of series cursors (baseline and recent point keys).
pub const CURSOR: u8 = b'U';
/// Tag of roll-up frontiers.
pub const ROLLED_UNTIL: u8 = b'R';
/// Tag of interned bounds.
pub const BOUNDS: u8 = b'B';
/// Tag of kept logs.
pub const LOG: u8 = b'L';
/// Tag of log-batch fingerprints.
pub const LOG_BATCH: u8 = b'F';
/// Tag of entity records.
pub const ENTITY: u8 = b'E';

/// `tag, vnode`.
pub fn vnode_prefix(tag: u8, vnode: u16) -> Vec<u8> {
    let mut key = Vec::with_capacity(48);
    key.push(tag);
    key.extend_from_slice(&vnode.to_be_bytes());
    key
}

/// Key of a series record.
pub fn series_key(vnode: u16, partition: u64, id: SeriesId) -> Vec<u8> {
    let mut key = partition_prefix(SERIES, vnode, partition);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// `tag, vnode, partition`.
pub fn partition_prefix(tag: u8, vnode: u16, partition: u64) -> Vec<u8> {
    let mut key = vnode_prefix(tag, vnode);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// Key of a series' cursor.
pub fn cursor_key(vnode: u16, partition: u64, id: SeriesId) -> Vec<u8> {
    let mut key = partition_prefix(CURSOR, vnode, partition);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Key of a roll-up frontier.
pub fn rolled_until_key(vnode: u16, partition: u64) -> Vec<u8> {
    partition_prefix(ROLLED_UNTIL, vnode, partition)
}

/// Key of a partition clock.
pub fn clock_key(vnode: u16, partition: u64) -> Vec<u8> {
    partition_prefix(CLOCK, vnode, partition)
}

/// `tag, vnode, series` of an aggregate.
pub fn state_prefix(vnode: u16, id: SeriesId, resolution: Resolution) -> Vec<u8> {
    let mut key = vnode_prefix(resolution.tag(), vnode);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Key of an aggregate.
pub fn state_key(vnode: u16, id: SeriesId, resolution: Resolution, period: u64) -> Vec<u8> {
    let mut key = state_prefix(vnode, id, resolution);
    key.extend_from_slice(&period.to_be_bytes());
    key
}

/// The period of an aggregate key.
pub fn state_key_period(key: &[u8]) -> Option<u64> {
    (key.len() == 1 + 2 + 16 + 8).then(|| u64::from_be_bytes(key[19..27].try_into().expect("8 bytes")))
}

/// Key of a kept log.
pub fn log_key(vnode: u16, partition: u64, time_ns: u64, fingerprint: u128) -> Vec<u8> {
    let mut key = partition_prefix(LOG, vnode, partition);
    key.extend_from_slice(&time_ns.to_be_bytes());
    key.extend_from_slice(&fingerprint.to_be_bytes());
    key
}

/// The time of a log key.
pub fn log_key_time(key: &[u8]) -> Option<u64> {
    (key.len() == 1 + 2 + 8 + 8 + 16).then(|| u64::from_be_bytes(key[11..19].try_into().expect("8 bytes")))
}

/// Key of a log-batch fingerprint.
pub fn log_batch_key(vnode: u16, fingerprint: u128) -> Vec<u8> {
    let mut key = vnode_prefix(LOG_BATCH, vnode);
    key.extend_from_slice(&fingerprint.to_be_bytes());
    key
}

/// Key of an entity record.
pub fn entity_key(partition: u64) -> Vec<u8> {
    let mut key = vec![ENTITY];
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// Key of interned bounds.
pub fn bounds_key(hash: u64) -> Vec<u8> {
    let mut key = vec![BOUNDS];
    key.extend_from_slice(&hash.to_be_bytes());
    key
}

/// The hash bounds are interned under.
pub fn bounds_hash(bounds: &[f64]) -> u64 {
    let mut bytes = Vec::with_capacity(bounds.len() * 8);
    for bound in bounds {
        bytes.extend_from_slice(&bound.to_bits().to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// An aggregate as stored.
#[derive(Serialize, Deserialize)]
struct StoredAggregate {
    count: u64,
    sum: i128,
    min: Option<f64>,
    max: Option<f64>,
    extremes_exact: bool,
    bounds: Option<u64>,
    buckets: Vec<u64>,
    cost: i128,
    unpriced: i128,
}

/// Encodes an aggregate; `bounds` is `None` for an empty bound list.
pub fn encode_state(state: &Aggregate) -> (Vec<u8>, Option<u64>) {
    let bounds = (!state.bounds.is_empty()).then(|| bounds_hash(&state.bounds));
    let stored = StoredAggregate {
        count: state.count,
        sum: state.sum.nanos(),
        min: state.min,
        max: state.max,
        extremes_exact: state.extremes_exact,
        bounds,
        buckets: state.buckets.clone(),
        cost: state.cost.nanos(),
        unpriced: state.unpriced.nanos(),
    };
    (postcard::to_stdvec(&stored).expect("aggregates always encode"), bounds)
}

/// Decodes an aggregate, resolving its bounds hash with `resolve`.
pub fn decode_state(bytes: &[u8], resolve: impl FnOnce(u64) -> Option<Bounds>) -> Result<Aggregate, String> {
    let stored: StoredAggregate = postcard::from_bytes(bytes).map_err(|e| format!("aggregate: {e}"))?;
    let bounds = match stored.bounds {
        Some(hash) => resolve(hash).ok_or_else(|| format!("aggregate refers to unknown bounds {hash:016x}"))?,
        None => tollgate_rules::aggregate::empty_bounds(),
    };
    Ok(Aggregate {
        count: stored.count,
        sum: Fixed::from_nanos(stored.sum),
        min: stored.min,
        max: stored.max,
        extremes_exact: stored.extremes_exact,
        bounds,
        buckets: stored.buckets,
        cost: Fixed::from_nanos(stored.cost),
        unpriced: Fixed::from_nanos(stored.unpriced),
    })
}

/// A cumulative baseline as stored.
#[derive(Serialize, Deserialize)]
struct StoredBaseline {
    start_ns: u64,
    time_ns: u64,
    count: u64,
    sum: i128,
    bounds: Option<u64>,
    buckets: Vec<u64>,
}

/// A cursor as stored: the first point key, then each key's difference from the one before
/// (time ascending, so its difference is unsigned; start wrapping).
#[derive(Serialize, Deserialize)]
struct StoredCursor {
    baseline: Option<StoredBaseline>,
    first: Option<(u64, u64)>,
    steps: Vec<(u64, i64)>,
}

/// Encodes a cursor; also returns the hash of its baseline's bounds (`None` when it has none or
/// they are empty), which must be stored with it.
pub fn encode_cursor(cursor: &SeriesCursor) -> (Vec<u8>, Option<u64>) {
    let baseline = cursor.baseline.as_ref().map(|b| StoredBaseline {
        start_ns: b.start_ns,
        time_ns: b.time_ns,
        count: b.count,
        sum: b.sum.nanos(),
        bounds: (!b.bounds.is_empty()).then(|| bounds_hash(&b.bounds)),
        buckets: b.buckets.clone(),
    });
    let bounds = baseline.as_ref().and_then(|b| b.bounds);
    let first = cursor.seen.front().map(|k| (k.time_ns, k.start_ns));
    let steps = cursor
        .seen
        .iter()
        .zip(cursor.seen.iter().skip(1))
        .map(|(previous, key)| (key.time_ns - previous.time_ns, key.start_ns.wrapping_sub(previous.start_ns) as i64))
        .collect();
    let stored = StoredCursor { baseline, first, steps };
    (postcard::to_stdvec(&stored).expect("cursors always encode"), bounds)
}

/// Decodes a cursor, keeping the point keys with `time >= since_ns`, resolving the baseline's
/// bounds hash with `resolve`.
pub fn decode_cursor(
    bytes: &[u8],
    since_ns: u64,
    resolve: impl FnOnce(u64) -> Option<Bounds>,
) -> Result<SeriesCursor, String> {
    let stored: StoredCursor = postcard::from_bytes(bytes).map_err(|e| format!("cursor: {e}"))?;
    let baseline = match stored.baseline {
        Some(b) => {
            let bounds = match b.bounds {
                Some(hash) => resolve(hash).ok_or_else(|| format!("baseline refers to unknown bounds {hash:016x}"))?,
                None => tollgate_rules::aggregate::empty_bounds(),
            };
            if b.buckets.len() != bounds.len() + 1 {
                return Err(format!("baseline has {} buckets for {} bounds", b.buckets.len(), bounds.len()));
            }
            Some(Baseline {
                start_ns: b.start_ns,
                time_ns: b.time_ns,
                count: b.count,
                sum: Fixed::from_nanos(b.sum),
                bounds,
                buckets: b.buckets,
            })
        }
        None => None,
    };
    let mut seen = VecDeque::with_capacity(stored.steps.len() + 1);
    if let Some((time_ns, start_ns)) = stored.first {
        let mut key = PointKey { time_ns, start_ns };
        let mut push = |key: PointKey| {
            if key.time_ns >= since_ns {
                seen.push_back(key);
            }
        };
        push(key);
        for (time_step, start_step) in stored.steps {
            key = PointKey {
                time_ns: key.time_ns.checked_add(time_step).ok_or("cursor: point time overflows")?,
                start_ns: key.start_ns.wrapping_add(start_step as u64),
            };
            push(key);
        }
    }
    Ok(SeriesCursor { baseline, seen })
}

/// Encodes any stored record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("records always encode")
}

/// Decodes a stored record, naming what failed.
pub fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("{what}: {e}"))
}

/// Decodes a series key.
pub fn decode_series(bytes: &[u8]) -> Result<tollgate_rules::SeriesKey, String> {
    decode("series key", bytes)
}

/// Decodes a clock.
pub fn decode_clock(bytes: &[u8]) -> Result<PartitionClock, String> {
    decode("partition clock", bytes)
}

/// Decodes a log.
pub fn decode_log(bytes: &[u8]) -> Result<StoredLog, String> {
    decode("log record", bytes)
}

/// Decodes an entity.
pub fn decode_entity(bytes: &[u8]) -> Result<EntityRecord, String> {
    decode("entity record", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn test_state_round_trips_with_bounds_by_reference() {
        let bounds: Bounds = Arc::from(vec![0.01, 0.02, 0.04]);
        let state = Aggregate {
            count: 3,
            sum: Fixed::from_f64(1.25).unwrap(),
            min: Some(0.005),
            max: None,
            extremes_exact: false,
            bounds: bounds.clone(),
            buckets: vec![1, 0, 2, 0],
            cost: Fixed::from_f64(-2.5).unwrap(),
            unpriced: Fixed::from_int(7),
        };
        let (bytes, hash) = encode_state(&state);
        assert_eq!(hash, Some(bounds_hash(&bounds)));
        assert!(bytes.len() < 64, "{} bytes", bytes.len());
        let back = decode_state(&bytes, |h| (Some(h) == hash).then(|| bounds.clone())).unwrap();
        assert_eq!(back, state);
        assert!(decode_state(&bytes, |_| None).unwrap_err().contains("unknown bounds"));
        let (bytes, hash) = encode_state(&Aggregate::empty());
        assert_eq!(hash, None);
        assert_eq!(decode_state(&bytes, |_| None).unwrap(), Aggregate::empty());
    }

    #[test]
    fn test_keys_sort_by_vnode_then_series_then_period() {
        let id = SeriesId(5);
        let a = state_key(1, id, Resolution::Minute, 10);
        let b = state_key(1, id, Resolution::Minute, 11);
        let c = state_key(2, SeriesId(0), Resolution::Minute, 0);
        assert!(a < b && b < c);
        assert_eq!(state_key_period(&b), Some(11));
        let log = log_key(3, 9, 1234, 77);
        assert_eq!(log_key_time(&log), Some(1234));
        assert!(log_key(3, 9, 1234, 78) > log && log_key(3, 9, 1235, 0) > log);
    }

    #[test]
    fn test_cursor_round_trips_with_key_steps_and_bounds_by_reference() {
        let bounds: Bounds = Arc::from(vec![1.0, 5.0]);
        let keys = [(100, 0), (110, 0), (120, 115), (120, 118), (130, 5), (u64::MAX - 1, u64::MAX)];
        let cursor = SeriesCursor {
            baseline: Some(Baseline {
                start_ns: 7,
                time_ns: 130,
                count: 9,
                sum: Fixed::from_int(-3),
                bounds: Arc::clone(&bounds),
                buckets: vec![1, 2, 6],
            }),
            seen: keys.iter().map(|&(time_ns, start_ns)| PointKey { time_ns, start_ns }).collect(),
        };
        let (bytes, hash) = encode_cursor(&cursor);
        assert_eq!(hash, Some(bounds_hash(&bounds)));
        let resolve = |h: u64| (Some(h) == hash).then(|| Arc::clone(&bounds));
        assert_eq!(decode_cursor(&bytes, 0, resolve).unwrap(), cursor);
        let recent = decode_cursor(&bytes, 120, resolve).unwrap();
        assert_eq!(recent.seen.iter().map(|k| k.time_ns).collect::<Vec<_>>(), vec![120, 120, 130, u64::MAX - 1]);
        let error = decode_cursor(&bytes, 0, |_| None).unwrap_err();
        assert!(error.contains("unknown bounds"), "{error}");
        let empty = SeriesCursor::default();
        assert_eq!(decode_cursor(&encode_cursor(&empty).0, 0, |_| None).unwrap(), empty);
    }
}
