//! Series identity (SPEC §1.5): (service, instance, metric name, full sorted point attribute set).

use crate::attributes::{AttributeSet, PointAttributes};
use crate::entity::Entity;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use xxhash_rust::xxh3::xxh3_128;

/// A hash map for keys that are (or contain) [`SeriesId`]s and other small integers:
/// foldhash, randomly seeded per process, so crafted series names cannot force collisions.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The set counterpart of [`FastMap`].
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// Gives back the memory of a map that holds at most about a quarter of what its table can hold
/// (hash maps never shrink on their own): after a burst or an eviction, a table sized for the
/// peak would otherwise stay that size for the life of the process. Room for twice the entries
/// is kept, so a map that refills grows again at most once. (`capacity()` is no measure of the
/// table after removals, which leave tombstones; `shrink_to` compares table sizes itself, and
/// does nothing when a table for twice the entries would be no smaller.)
pub fn shrink_if_sparse<K: Eq + Hash, V>(map: &mut FastMap<K, V>) {
    map.shrink_to(map.len().saturating_mul(2).max(64));
}

/// A series' identity in full.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesKey {
    /// The service and instance the series belongs to (its partition key).
    pub entity: Entity,
    /// OTLP metric name, dots kept (`gen_ai.server.request.duration`).
    pub metric: String,
    /// The point attributes, sorted.
    pub attributes: AttributeSet,
}

impl SeriesKey {
    /// The key's stable identifier.
    pub fn id(&self) -> SeriesId {
        let mut encoder = IdEncoder::default();
        encoder.start(&self.entity, &self.metric);
        for (key, value) in self.attributes.iter() {
            encoder.push_str(key);
            encoder.push_str(value);
        }
        encoder.finish()
    }
}

impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{", self.metric)?;
        for (index, (key, value)) in self.attributes.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value:?}")?;
        }
        write!(f, "}} of {}", self.entity)
    }
}

/// A 128-bit hash of a [`SeriesKey`]: the key series state is stored and looked up under.
///
/// xxh3-128 is a fixed, documented algorithm, so ids are the same on every node and release;
/// with 2^-128 collision odds per pair, a billion series collide with probability ~10^-21.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesId(pub u128);

impl SeriesId {
    /// Big-endian bytes, so byte order equals numeric order in ordered stores.
    pub fn to_be_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The id from [`SeriesId::to_be_bytes`].
    pub fn from_be_bytes(bytes: [u8; 16]) -> SeriesId {
        SeriesId(u128::from_be_bytes(bytes))
    }

    /// The id of a series given its OTLP attributes, without building the owned key. Equal to
    /// `SeriesKey::id` of the same series.
    pub fn of(entity: &Entity, metric: &str, point_attributes: &[KeyValue]) -> SeriesId {
        IdEncoder::default().series(entity, metric, &PointAttributes::from_key_values(point_attributes))
    }
}

/// Encodes series identities for hashing. Reusing one encoder keeps its buffer, so computing
/// ids on the hot path does not allocate.
#[derive(Debug, Default)]
pub struct IdEncoder {
    buffer: Vec<u8>,
}

impl IdEncoder {
    /// The id of a series given its point's attributes (see [`SeriesId::of`]).
    pub fn series(&mut self, entity: &Entity, metric: &str, point_attributes: &PointAttributes) -> SeriesId {
        self.start(entity, metric);
        // Gateway points carry 5 to 8 attributes: sorting their (key, value) slices on the stack
        // is cheaper than building the sorted owned set.
        let mut heap: Vec<(&str, &str)> = Vec::new();
        let mut stack = [("", ""); 16];
        let pairs: &mut [(&str, &str)] = if point_attributes.len() <= stack.len() {
            for (slot, pair) in stack.iter_mut().zip(point_attributes.iter()) {
                *slot = pair;
            }
            &mut stack[..point_attributes.len()]
        } else {
            heap.extend(point_attributes.iter());
            &mut heap
        };
        // A stable sort keeps the first of repeated keys first, as `AttributeSet` does.
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        let mut previous: Option<&str> = None;
        for (key, value) in pairs.iter() {
            if previous == Some(*key) {
                continue;
            }
            previous = Some(key);
            self.push_str(key);
            self.push_str(value);
        }
        self.finish()
    }

    fn start(&mut self, entity: &Entity, metric: &str) {
        self.buffer.clear();
        self.push_str(&entity.service);
        match &entity.instance {
            Some(instance) => {
                self.buffer.push(1);
                self.push_str(instance);
            }
            None => self.buffer.push(0),
        }
        self.push_str(metric);
    }

    fn push_str(&mut self, value: &str) {
        self.buffer.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buffer.extend_from_slice(value.as_bytes());
    }

    fn finish(&self) -> SeriesId {
        SeriesId(xxh3_128(&self.buffer))
    }
}

/// Minutes since the unix epoch (UTC): the key of per-minute state.
pub type Minute = i64;

/// Nanoseconds in one minute.
pub const NANOS_PER_MINUTE: u64 = 60_000_000_000;

/// The minute a point with this `time_unix_nano` is merged into: `floor(time / 60 s)`.
pub fn minute_of(time_unix_nano: u64) -> Minute {
    (time_unix_nano / NANOS_PER_MINUTE) as Minute
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue};

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    #[test]
    fn test_shrink_if_sparse_gives_back_a_burst_table_and_keeps_a_full_one() {
        let mut map: FastMap<u64, u64> = (0..10_000).map(|i| (i, i * 2)).collect();
        map.retain(|k, _| *k < 7_500);
        let capacity = map.capacity();
        shrink_if_sparse(&mut map);
        assert_eq!(map.capacity(), capacity, "a map about half full keeps its table");
        map.retain(|k, _| *k < 100);
        shrink_if_sparse(&mut map);
        assert!(map.capacity() >= 200 && map.capacity() <= 256, "capacity {} after shrinking", map.capacity());
        assert_eq!(map.len(), 100);
        assert!((0..100).all(|k| map.get(&k) == Some(&(k * 2))), "entries survive the shrink");
        map.clear();
        shrink_if_sparse(&mut map);
        assert!(map.capacity() >= 64 && map.capacity() < 128, "an empty map keeps a small table");
    }

    #[test]
    fn test_series_id_of_borrowed_attributes_equals_owned_key_id() {
        let entity = Entity::new("gw", Some("pod"));
        let attributes = vec![
            kv("gen_ai.token.type", Value::StringValue("input".into())),
            kv("gen_ai.provider.name", Value::StringValue("openai".into())),
            kv("count", Value::IntValue(3)),
            kv("gen_ai.token.type", Value::StringValue("shadowed".into())),
        ];
        let key = SeriesKey {
            entity: entity.clone(),
            metric: "gen_ai.client.token.usage".into(),
            attributes: AttributeSet::from_key_values(&attributes),
        };
        assert_eq!(SeriesId::of(&entity, "gen_ai.client.token.usage", &attributes), key.id());
    }

    #[test]
    fn test_series_id_ignores_attribute_order() {
        let entity = Entity::new("gw", None);
        let a = vec![kv("a", Value::StringValue("1".into())), kv("b", Value::StringValue("2".into()))];
        let b = vec![kv("b", Value::StringValue("2".into())), kv("a", Value::StringValue("1".into()))];
        assert_eq!(SeriesId::of(&entity, "m", &a), SeriesId::of(&entity, "m", &b));
    }

    #[test]
    fn test_series_id_distinguishes_entity_metric_and_values() {
        let attributes = vec![kv("a", Value::StringValue("1".into()))];
        let base = SeriesId::of(&Entity::new("gw", Some("p")), "m", &attributes);
        assert_ne!(base, SeriesId::of(&Entity::new("gw", None), "m", &attributes));
        assert_ne!(base, SeriesId::of(&Entity::new("gw", Some("q")), "m", &attributes));
        assert_ne!(base, SeriesId::of(&Entity::new("gw", Some("p")), "n", &attributes));
        assert_ne!(base, SeriesId::of(&Entity::new("gw", Some("p")), "m", &[kv("a", Value::StringValue("2".into()))]));
        assert_ne!(base, SeriesId::of(&Entity::new("gw", Some("p")), "m", &[]));
    }

    #[test]
    fn test_series_id_of_handles_many_attributes() {
        let entity = Entity::new("gw", None);
        let attributes: Vec<KeyValue> = (0..40).rev().map(|i| kv(&format!("k{i:02}"), Value::IntValue(i))).collect();
        let key = SeriesKey {
            entity: entity.clone(),
            metric: "m".into(),
            attributes: AttributeSet::from_key_values(&attributes),
        };
        assert_eq!(SeriesId::of(&entity, "m", &attributes), key.id());
    }

    #[test]
    fn test_minute_of_floors_to_utc_minute() {
        assert_eq!(minute_of(1_764_151_210_000_000_000), 1_764_151_200 / 60);
        assert_eq!(minute_of(1_764_151_199_999_999_999), 1_764_151_140 / 60);
    }
}
