//! What a vnode hand-over carries and how the receiving side reads it.
//!
//! A move hands over only the normalisation state — series keys, series cursors (cumulative
//! baselines and recent point keys), partition clocks, log-batch fingerprints, and the interned
//! bucket bounds the baselines refer to — so that the new owner continues every series exactly;
//! the old owner keeps the minutes it merged, and queries still reach them. (A leaving node's
//! data moves whole, in a drain, into a tree of its own on another member.)

use super::codec::{self, BOUNDS, CLOCK, CURSOR, LOG_BATCH, SERIES};
use crate::error::Error;
use tollgate_rules::normalize::PartitionClock;

/// Per-vnode tags of a hand-over.
pub const STATE_TAGS: [u8; 4] = [SERIES, CURSOR, CLOCK, LOG_BATCH];

/// A hand-over, sorted by how it is merged.
#[derive(Debug, Default)]
pub struct Imported {
    /// Entries copied as they are.
    pub raw: Vec<(Vec<u8>, Vec<u8>)>,
    /// Partition clocks (the newer one wins).
    pub clocks: Vec<(u64, PartitionClock)>,
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("malformed hand-over entry: {what}"))
}

impl Imported {
    /// Sorts the entries of a hand-over; anything but normalisation state is refused.
    pub fn parse(entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Imported, Error> {
        let mut imported = Imported::default();
        for (key, value) in entries {
            match key.first().copied() {
                Some(SERIES | CURSOR | LOG_BATCH | BOUNDS) => imported.raw.push((key, value)),
                Some(CLOCK) => {
                    let partition = codec::key_partition(&key).map_err(|_| corrupt("partition key"))?;
                    imported.clocks.push((partition, codec::decode_clock(&value).map_err(|e| corrupt(&e))?));
                }
                Some(tag) => return Err(corrupt(&format!("tag {:?} is not normalisation state", tag as char))),
                None => return Err(corrupt("empty key")),
            }
        }
        Ok(imported)
    }
}
