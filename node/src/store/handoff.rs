//! What a vnode hand-over carries and how the receiving side reads it.
//!
//! A planned move (a node joined) hands over only the normalisation state — series keys,
//! cumulative baselines, recent point keys, partition clocks, log-batch fingerprints — so that
//! the new owner continues every series exactly; the old owner keeps its older minutes, which
//! queries still reach. A full hand-over (the old owner is leaving) also carries every aggregate,
//! roll-up frontier, kept log, entity record and the interned bounds they refer to.

use super::codec::{self, BASELINE, BOUNDS, CLOCK, ENTITY, LOG, LOG_BATCH, POINT_KEY, ROLLED_UNTIL, SERIES};
use super::Resolution;
use crate::error::Error;
use std::collections::BTreeMap;
use std::sync::Arc;
use tollgate_rules::normalize::PartitionClock;
use tollgate_rules::series::FastMap;
use tollgate_rules::{Bounds, SeriesId};

/// Per-vnode tags of a state hand-over.
pub const STATE_TAGS: [u8; 5] = [SERIES, BASELINE, POINT_KEY, CLOCK, LOG_BATCH];

/// Per-vnode tags of a full hand-over (entities and bounds are added separately).
pub const FULL_TAGS: [u8; 10] = [SERIES, BASELINE, POINT_KEY, CLOCK, LOG_BATCH, ROLLED_UNTIL, b'M', b'H', b'D', LOG];

/// A hand-over, sorted by how it is merged.
#[derive(Debug, Default)]
pub struct Imported {
    /// Entries copied as they are.
    pub raw: Vec<(Vec<u8>, Vec<u8>)>,
    /// Partition clocks (the newer one wins).
    pub clocks: Vec<(u64, PartitionClock)>,
    /// Roll-up frontiers of the sender, by partition.
    pub rolled_until: BTreeMap<u64, u64>,
    /// Aggregates to merge, still encoded.
    pub states: Vec<((SeriesId, Resolution, u64), Vec<u8>)>,
    /// Bounds the aggregates refer to.
    pub bounds: FastMap<u64, Bounds>,
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("malformed hand-over entry: {what}"))
}

impl Imported {
    /// Sorts raw entries; aggregates and frontiers only count in a full hand-over.
    pub fn parse(entries: Vec<(Vec<u8>, Vec<u8>)>, full: bool) -> Result<Imported, Error> {
        let mut imported = Imported::default();
        for (key, value) in entries {
            let Some(tag) = key.first().copied() else { return Err(corrupt("empty key")) };
            match tag {
                SERIES | BASELINE | POINT_KEY | LOG_BATCH => imported.raw.push((key, value)),
                LOG | ENTITY if full => imported.raw.push((key, value)),
                BOUNDS if full => {
                    let hash = u64::from_be_bytes(
                        key.get(1..9).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt("bounds key"))?,
                    );
                    let bounds: Vec<f64> = codec::decode("bounds", &value).map_err(|e| corrupt(&e))?;
                    imported.bounds.insert(hash, Arc::from(bounds));
                    imported.raw.push((key, value));
                }
                CLOCK => {
                    let partition = partition_of(&key)?;
                    imported.clocks.push((partition, codec::decode_clock(&value).map_err(|e| corrupt(&e))?));
                }
                ROLLED_UNTIL if full => {
                    let minute = u64::from_be_bytes(value.as_slice().try_into().map_err(|_| corrupt("frontier"))?);
                    imported.rolled_until.insert(partition_of(&key)?, minute);
                }
                b'M' | b'H' | b'D' if full => {
                    let resolution = match tag {
                        b'M' => Resolution::Minute,
                        b'H' => Resolution::Hour,
                        _ => Resolution::Day,
                    };
                    if key.len() != 27 {
                        return Err(corrupt("aggregate key"));
                    }
                    let id = SeriesId::from_be_bytes(key[3..19].try_into().map_err(|_| corrupt("series id"))?);
                    let period = codec::state_key_period(&key).ok_or_else(|| corrupt("period"))?;
                    imported.states.push(((id, resolution, period), value));
                }
                _ => {}
            }
        }
        Ok(imported)
    }
}

fn partition_of(key: &[u8]) -> Result<u64, Error> {
    key.get(3..11).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(|| corrupt("partition key"))
}
