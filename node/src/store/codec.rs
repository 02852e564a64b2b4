//! Key layout and value encoding of the data tree.
//!
//! Keys are big-endian so byte order is numeric order, and start with a one-byte tag and the
//! vnode, so that everything of a vnode forms ranges:
//!
//! | tag | key | value |
//! |---|---|---|
//! | `S` | vnode, partition, series id | `SeriesKey` |
//! | `A` | vnode, series id | cumulative `Baseline` |
//! | `K` | vnode, partition, series id, time, start | (empty): a merged point |
//! | `C` | vnode, partition | `PartitionClock` |
//! | `R` | vnode, partition | roll-up frontier (minute) |
//! | `M`/`H`/`D` | vnode, series id, period (first minute) | aggregate, bounds by reference |
//! | `B` | bounds hash | bounds |
//! | `L` | vnode, partition, time, fingerprint | [`StoredLog`] |
//! | `F` | vnode, batch fingerprint | time |
//! | `E` | partition | [`EntityRecord`] |
//!
//! Values are postcard (varint integers). Aggregates refer to their bucket bounds by a 64-bit
//! hash instead of repeating 14-22 floats in every minute of every series.

use super::{EntityRecord, Resolution, StoredLog};
use serde::{Deserialize, Serialize};
use tollgate_rules::normalize::PartitionClock;
use tollgate_rules::{Aggregate, Bounds, Fixed, SeriesId};
use xxhash_rust::xxh3::xxh3_64;

/// Tag of series records.
pub const SERIES: u8 = b'S';
/// Tag of partition clocks.
pub const CLOCK: u8 = b'C';
/// Tag of cumulative baselines.
pub const BASELINE: u8 = b'A';
/// Tag of merged point keys.
pub const POINT_KEY: u8 = b'K';
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

/// Key of a series' baseline.
pub fn baseline_key(vnode: u16, id: SeriesId) -> Vec<u8> {
    let mut key = vnode_prefix(BASELINE, vnode);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// `K, vnode, partition, series`.
pub fn point_key_prefix(vnode: u16, partition: u64, id: SeriesId) -> Vec<u8> {
    let mut key = partition_prefix(POINT_KEY, vnode, partition);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Key of a merged point.
pub fn point_key(vnode: u16, partition: u64, id: SeriesId, time_ns: u64, start_ns: u64) -> Vec<u8> {
    let mut key = point_key_prefix(vnode, partition, id);
    key.extend_from_slice(&time_ns.to_be_bytes());
    key.extend_from_slice(&start_ns.to_be_bytes());
    key
}

/// The parts of a point key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointKeyParts {
    /// Vnode.
    pub vnode: u16,
    /// Partition.
    pub partition: u64,
    /// Point time.
    pub time_ns: u64,
    /// Point start.
    pub start_ns: u64,
}

/// The parts of a point key.
pub fn point_key_parts(key: &[u8]) -> Option<PointKeyParts> {
    if key.len() != 1 + 2 + 8 + 16 + 16 {
        return None;
    }
    Some(PointKeyParts {
        vnode: u16::from_be_bytes(key[1..3].try_into().ok()?),
        partition: u64::from_be_bytes(key[3..11].try_into().ok()?),
        time_ns: u64::from_be_bytes(key[27..35].try_into().ok()?),
        start_ns: u64::from_be_bytes(key[35..43].try_into().ok()?),
    })
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
}
