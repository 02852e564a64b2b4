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
use std::cell::RefCell;
use std::sync::Arc;
use tollgate_rules::normalize::{Baseline, PartitionClock, PointKey, SeriesCursor};
use tollgate_rules::seen::SeenKeys;
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
/// Tag of partition log clocks (the newest minute of a partition's access logs).
pub const LOG_CLOCK: u8 = b'G';

/// The name of the record kind a data-tree key's tag stands for (the `record` label of
/// `tollgate_store_checkpoint_keys_total`).
pub fn record_kind(tag: u8) -> &'static str {
    match tag {
        SERIES => "series",
        CURSOR => "cursor",
        CLOCK => "clock",
        ROLLED_UNTIL => "rolled_until",
        BOUNDS => "bounds",
        LOG => "log",
        LOG_BATCH => "log_batch",
        ENTITY => "entity",
        LOG_CLOCK => "log_clock",
        _ if tag == Resolution::Minute.tag() => "minute",
        _ if tag == Resolution::Hour.tag() => "hour",
        _ if tag == Resolution::Day.tag() => "day",
        _ => "other",
    }
}

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

/// The series id of a series record's key ([`series_key`]).
pub fn series_key_id(key: &[u8]) -> Result<SeriesId, String> {
    let id: [u8; 16] = key
        .get(PARTITION_PREFIX_LEN..)
        .and_then(|id| id.try_into().ok())
        .ok_or_else(|| format!("series key of {} bytes, expected {}", key.len(), PARTITION_PREFIX_LEN + 16))?;
    Ok(SeriesId::from_be_bytes(id))
}

/// Length of [`vnode_prefix`]: tag, vnode.
const VNODE_PREFIX_LEN: usize = 1 + 2;

/// Length of [`partition_prefix`]: tag, vnode, partition.
pub const PARTITION_PREFIX_LEN: usize = VNODE_PREFIX_LEN + 8;

/// The partition of a key that starts with [`partition_prefix`] (a clock's, a series record's).
pub fn key_partition(key: &[u8]) -> Result<u64, String> {
    key.get(VNODE_PREFIX_LEN..PARTITION_PREFIX_LEN)
        .and_then(|partition| partition.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| format!("key of {} bytes has no partition", key.len()))
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

/// Key of a partition log clock.
pub fn log_clock_key(vnode: u16, partition: u64) -> Vec<u8> {
    partition_prefix(LOG_CLOCK, vnode, partition)
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

/// Length of an aggregate key's group: tag, vnode, series id (its period follows).
pub const STATE_GROUP_LEN: usize = 1 + 2 + 16;

/// The period of an aggregate key.
pub fn state_key_period(key: &[u8]) -> Option<u64> {
    (key.len() == STATE_GROUP_LEN + 8).then(|| u64::from_be_bytes(key[STATE_GROUP_LEN..].try_into().expect("8 bytes")))
}

/// Key of a kept log.
pub fn log_key(vnode: u16, partition: u64, time_ns: u64, fingerprint: u128) -> Vec<u8> {
    let mut key = partition_prefix(LOG, vnode, partition);
    key.extend_from_slice(&time_ns.to_be_bytes());
    key.extend_from_slice(&fingerprint.to_be_bytes());
    key
}

/// Length of a log key's group: tag, vnode, partition (its time and fingerprint follow).
pub const LOG_GROUP_LEN: usize = PARTITION_PREFIX_LEN;

/// The time of a log key.
pub fn log_key_time(key: &[u8]) -> Option<u64> {
    (key.len() == LOG_GROUP_LEN + 8 + 16)
        .then(|| u64::from_be_bytes(key[LOG_GROUP_LEN..LOG_GROUP_LEN + 8].try_into().expect("8 bytes")))
}

/// Key of a log-batch fingerprint.
pub fn log_batch_key(vnode: u16, fingerprint: u128) -> Vec<u8> {
    let mut key = vnode_prefix(LOG_BATCH, vnode);
    key.extend_from_slice(&fingerprint.to_be_bytes());
    key
}

/// The fingerprint of a log-batch key ([`log_batch_key`]).
pub fn log_batch_key_fingerprint(key: &[u8]) -> Result<u128, String> {
    key.get(VNODE_PREFIX_LEN..)
        .and_then(|fingerprint| fingerprint.try_into().ok())
        .map(u128::from_be_bytes)
        .ok_or_else(|| format!("log batch key of {} bytes, expected {}", key.len(), VNODE_PREFIX_LEN + 16))
}

/// Key of an entity record.
pub fn entity_key(partition: u64) -> Vec<u8> {
    let mut key = vec![ENTITY];
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// Length of [`entity_key`]: tag, partition.
const ENTITY_KEY_LEN: usize = 1 + 8;

/// The partition of an entity key ([`entity_key`]).
pub fn entity_key_partition(key: &[u8]) -> Result<u64, String> {
    key.get(1..)
        .and_then(|partition| partition.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| format!("entity key of {} bytes, expected {ENTITY_KEY_LEN}", key.len()))
}

/// Key of interned bounds.
pub fn bounds_key(hash: u64) -> Vec<u8> {
    let mut key = vec![BOUNDS];
    key.extend_from_slice(&hash.to_be_bytes());
    key
}

/// Bound lists whose hash a thread remembers. A miss replaces the oldest, so lists used in turn
/// only hit while there are no more of them than this: the gateway has four histograms, other
/// sources a few more.
const RECENT_BOUNDS_LEN: usize = 16;

thread_local! {
    /// The bound lists hashed last on this thread, by identity. Every series of a histogram shares
    /// one list (`SeriesTable` interns them, the store resolves stored hashes to its own copy), so
    /// a node writes a handful of lists, each with every state and cursor; holding the `Arc`
    /// keeps its address from being reused by another list.
    static RECENT_BOUNDS: RefCell<[Option<(Bounds, u64)>; RECENT_BOUNDS_LEN]> =
        const { RefCell::new([const { None }; RECENT_BOUNDS_LEN]) };
}

/// [`bounds_hash`] of a shared bound list, remembered for the lists this thread hashed last.
fn shared_bounds_hash(bounds: &Bounds) -> u64 {
    RECENT_BOUNDS.with(|recent| {
        let mut recent = recent.borrow_mut();
        if let Some((_, hash)) = recent.iter().flatten().find(|(known, _)| Arc::ptr_eq(known, bounds)) {
            return *hash;
        }
        let hash = bounds_hash(bounds);
        recent.rotate_right(1);
        recent[0] = Some((Arc::clone(bounds), hash));
        hash
    })
}

/// The hash bounds are interned under.
pub fn bounds_hash(bounds: &[f64]) -> u64 {
    // Every state and cursor written hashes its bounds: on the stack for the usual lengths
    // (the gateway's histograms have 14 to 20 bounds).
    const ON_STACK: usize = 32;
    let mut stack = [0u8; ON_STACK * 8];
    let mut heap = Vec::new();
    let bytes: &mut [u8] = if bounds.len() <= ON_STACK {
        &mut stack[..bounds.len() * 8]
    } else {
        heap.resize(bounds.len() * 8, 0);
        &mut heap
    };
    for (chunk, bound) in bytes.chunks_exact_mut(8).zip(bounds) {
        chunk.copy_from_slice(&bound.to_bits().to_le_bytes());
    }
    xxh3_64(bytes)
}

/// An aggregate as stored. Written by [`encode_state`] directly; serde writes it only in the
/// tests, which check that the two agree.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
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

/// Encodes an aggregate; `bounds` is `None` for an empty bound list. The bytes are postcard's
/// encoding of `StoredAggregate`, written by hand ([`Postcard`]).
pub fn encode_state(state: &Aggregate) -> (Vec<u8>, Option<u64>) {
    let bounds = (!state.bounds.is_empty()).then(|| shared_bounds_hash(&state.bounds));
    let mut out = Postcard::with_capacity(64 + 2 * state.buckets.len());
    out.u64(state.count);
    out.i128(state.sum.nanos());
    out.option(state.min, Postcard::f64);
    out.option(state.max, Postcard::f64);
    out.bool(state.extremes_exact);
    out.option(bounds, Postcard::u64);
    out.u64s(&state.buckets);
    out.i128(state.cost.nanos());
    out.i128(state.unpriced.nanos());
    (out.0, bounds)
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
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredBaseline {
    start_ns: u64,
    time_ns: u64,
    count: u64,
    sum: i128,
    bounds: Option<u64>,
    buckets: Vec<u64>,
}

/// A cursor as stored: the first point key, then each key's difference from the one before
/// (time ascending, so its difference is unsigned; start wrapping). Written by [`encode_cursor`]
/// directly; serde writes it only in the tests, which check that the two agree.
///
/// The baselines of a series' other start times ([`SeriesCursor::others`]), when it has any,
/// follow it as a postcard `Vec<StoredOtherStart>`. A version that does not know them reads the
/// cursor without them (postcard leaves trailing bytes unread): it keeps the current start.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredCursor {
    baseline: Option<StoredBaseline>,
    first: Option<(u64, u64)>,
    steps: Vec<(u64, i64)>,
}

/// The baseline of another start time of a series; its bounds are its current baseline's.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredOtherStart {
    start_ns: u64,
    time_ns: u64,
    count: u64,
    sum: i128,
    buckets: Vec<u64>,
}

/// Encodes a cursor; also returns the hash of its baseline's bounds (`None` when it has none or
/// they are empty), which must be stored with it. The bytes are postcard's encoding of
/// `StoredCursor`, written by hand ([`Postcard`]).
pub fn encode_cursor(cursor: &SeriesCursor) -> (Vec<u8>, Option<u64>) {
    let bounds = cursor.baseline.as_ref().and_then(|b| (!b.bounds.is_empty()).then(|| shared_bounds_hash(&b.bounds)));
    let buckets = cursor.baseline.as_ref().map_or(0, |b| b.buckets.len());
    let steps = cursor.seen.steps();
    let mut out = Postcard::with_capacity(64 + 2 * buckets + steps.len());
    out.option(cursor.baseline.as_ref(), |out, b| {
        out.u64(b.start_ns);
        out.u64(b.time_ns);
        out.u64(b.count);
        out.i128(b.sum.nanos());
        out.option(bounds, Postcard::u64);
        out.u64s(&b.buckets);
    });
    // A series that forgot keys begins with the key that says when (`SeenKeys::watermark`).
    let front = cursor.seen.front();
    let watermark = cursor.seen.watermark();
    out.option(watermark.or(front), |out, key| {
        out.u64(key.time_ns);
        out.u64(key.start_ns);
    });
    match (watermark, front) {
        (Some(watermark), Some(front)) => {
            out.len(cursor.seen.len());
            SeenKeys::push_step(&mut out.0, watermark, front);
        }
        (Some(_), None) => out.len(0),
        (None, _) => out.len(cursor.seen.len().saturating_sub(1)),
    }
    // The keys' steps are held in the cursor as they are stored (`SeenKeys`): copied, not encoded.
    out.0.extend_from_slice(steps);
    if !cursor.others.is_empty() {
        out.len(cursor.others.len());
        for other in cursor.others.iter() {
            out.u64(other.start_ns);
            out.u64(other.time_ns);
            out.u64(other.count);
            out.i128(other.sum.nanos());
            out.u64s(&other.buckets);
        }
    }
    (out.0, bounds)
}

/// Longest bytes written after a cursor's kept keys that [`cursor_patch`] looks past: the steps
/// of a few new keys (a step takes at most 20 bytes, usually 6).
const PATCH_MAX_TAIL: usize = 64;
/// Fewest bytes of the value before that a patch must keep to be worth it.
const PATCH_MIN_KEPT: usize = 32;

/// How a series' cursor, `new`, can be written to the write-ahead log as a patch of the value
/// written before it, `previous`: `new` is `new[..head]`, then `previous[from..from + len]`,
/// then `new[head + len..]`.
///
/// A cursor is rewritten with each batch that merges into its series: its baseline changes, it
/// forgets its oldest keys and adds the newest ones at its end, but the steps of the keys it kept
/// are the same bytes as before, and the bulk of it (about 60 keys of 6 bytes for a series
/// exported every 10 s). So they are the end of `previous`, found in `new` just before the
/// steps of the new keys: the longest common suffix of `previous` and `new` without its last
/// `t` bytes, for the smallest `t` up to [`PATCH_MAX_TAIL`] where the two share at least
/// [`PATCH_MIN_KEPT`] bytes. Whatever is found, the patch rebuilds `new` byte for byte (the
/// bytes are compared, not assumed); `None` when nothing long enough is shared (a short cursor,
/// or many keys added at once), and the cursor is logged whole.
pub fn cursor_patch(previous: &[u8], new: &[u8]) -> Option<(usize, usize, usize)> {
    const PROBE: usize = 8;
    if previous.len() < PATCH_MIN_KEPT || new.len() < PATCH_MIN_KEPT {
        return None;
    }
    let last = |bytes: &[u8]| u64::from_ne_bytes(bytes[bytes.len() - PROBE..].try_into().expect("eight bytes"));
    let probe = last(previous);
    for tail in 0..=PATCH_MAX_TAIL.min(new.len() - PATCH_MIN_KEPT) {
        let shared = &new[..new.len() - tail];
        if last(shared) != probe {
            continue;
        }
        let kept = common_suffix(previous, shared);
        if kept >= PATCH_MIN_KEPT {
            return Some((shared.len() - kept, previous.len() - kept, kept));
        }
    }
    None
}

/// The length of the longest common suffix of `a` and `b`.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let (mut a, mut b) = (a, b);
    let mut kept = 0;
    while a.len() >= 8 && b.len() >= 8 {
        let (a_head, a_last) = a.split_at(a.len() - 8);
        let (b_head, b_last) = b.split_at(b.len() - 8);
        if a_last != b_last {
            break;
        }
        (a, b, kept) = (a_head, b_head, kept + 8);
    }
    kept + a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count()
}

/// Postcard's encoding, written directly into one buffer, for the two records every batch writes
/// for every series it touches (its cursor and its aggregates): through serde, postcard copies each
/// varint with a call to `memmove`, and with the cursor's clone that was a tenth of the node's CPU
/// under ingest load (docs/benchmarks-history.md, step 21). Decoding stays with postcard and serde;
/// a test checks the bytes against postcard's.
struct Postcard(Vec<u8>);

impl Postcard {
    fn with_capacity(capacity: usize) -> Postcard {
        Postcard(Vec::with_capacity(capacity))
    }

    /// Unsigned LEB128, as postcard writes every integer wider than a byte.
    fn u64(&mut self, value: u64) {
        tollgate_rules::varint::push(&mut self.0, value);
    }

    fn u128(&mut self, mut value: u128) {
        while value >= 0x80 {
            self.0.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    /// Signed integers are zigzag-encoded first.
    fn i128(&mut self, value: i128) {
        self.u128(((value << 1) ^ (value >> 127)) as u128);
    }

    fn f64(&mut self, value: f64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn bool(&mut self, value: bool) {
        self.0.push(u8::from(value));
    }

    /// A sequence's length.
    fn len(&mut self, len: usize) {
        self.u64(len as u64);
    }

    fn u64s(&mut self, values: &[u64]) {
        self.len(values.len());
        for value in values {
            self.u64(*value);
        }
    }

    fn option<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Postcard, T)) {
        match value {
            None => self.0.push(0),
            Some(value) => {
                self.0.push(1);
                write(self, value);
            }
        }
    }
}

/// Decodes a cursor, keeping the point keys with `time >= since_ns`, resolving the baseline's
/// bounds hash with `resolve`.
pub fn decode_cursor(
    bytes: &[u8],
    since_ns: u64,
    resolve: impl FnOnce(u64) -> Option<Bounds>,
) -> Result<SeriesCursor, String> {
    let (stored, rest): (StoredCursor, _) = postcard::take_from_bytes(bytes).map_err(|e| format!("cursor: {e}"))?;
    let others: Vec<StoredOtherStart> = match rest {
        [] => Vec::new(),
        rest => postcard::from_bytes(rest).map_err(|e| format!("cursor's other start times: {e}"))?,
    };
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
    let others = match &baseline {
        None if !others.is_empty() => return Err("cursor has other start times and no baseline".into()),
        None => Box::default(),
        Some(current) => others
            .into_iter()
            .map(|other| {
                if other.buckets.len() != current.buckets.len() {
                    return Err(format!(
                        "other start time has {} buckets for {} bounds",
                        other.buckets.len(),
                        current.bounds.len()
                    ));
                }
                Ok(Baseline {
                    start_ns: other.start_ns,
                    time_ns: other.time_ns,
                    count: other.count,
                    sum: Fixed::from_nanos(other.sum),
                    bounds: Arc::clone(&current.bounds),
                    buckets: other.buckets,
                })
            })
            .collect::<Result<_, String>>()?,
    };
    let mut seen = SeenKeys::new();
    if let Some((time_ns, start_ns)) = stored.first {
        let mut key = PointKey { time_ns, start_ns };
        // Keys left out as older than `since_ns` are forgotten, as the series would have.
        let mut forgotten_before = 0;
        let mut push = |key: PointKey| {
            if key.time_ns >= since_ns {
                seen.insert(key);
            } else {
                forgotten_before = since_ns;
            }
        };
        let watermark = SeenKeys::watermark_of(key);
        if watermark.is_none() {
            push(key);
        }
        for (time_step, start_step) in stored.steps {
            key = PointKey {
                time_ns: key.time_ns.checked_add(time_step).ok_or("cursor: point time overflows")?,
                start_ns: key.start_ns.wrapping_add(start_step as u64),
            };
            push(key);
        }
        seen.set_forgotten_before(forgotten_before.max(watermark.unwrap_or(0)));
    }
    Ok(SeriesCursor { baseline, others, seen })
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
    use tollgate_rules::fleet::Xorshift;

    /// Postcard's encoding of an aggregate through serde: what `encode_state` must write.
    fn postcard_state(state: &Aggregate) -> Vec<u8> {
        postcard::to_stdvec(&StoredAggregate {
            count: state.count,
            sum: state.sum.nanos(),
            min: state.min,
            max: state.max,
            extremes_exact: state.extremes_exact,
            bounds: (!state.bounds.is_empty()).then(|| bounds_hash(&state.bounds)),
            buckets: state.buckets.clone(),
            cost: state.cost.nanos(),
            unpriced: state.unpriced.nanos(),
        })
        .unwrap()
    }

    /// Postcard's encoding of a cursor through serde: what `encode_cursor` must write.
    fn postcard_cursor(cursor: &SeriesCursor) -> Vec<u8> {
        let baseline = cursor.baseline.as_ref().map(|b| StoredBaseline {
            start_ns: b.start_ns,
            time_ns: b.time_ns,
            count: b.count,
            sum: b.sum.nanos(),
            bounds: (!b.bounds.is_empty()).then(|| bounds_hash(&b.bounds)),
            buckets: b.buckets.clone(),
        });
        let keys: Vec<PointKey> = cursor.seen.watermark().into_iter().chain(cursor.seen.iter()).collect();
        let first = keys.first().map(|k| (k.time_ns, k.start_ns));
        let steps = keys
            .iter()
            .zip(keys.iter().skip(1))
            .map(|(previous, key)| {
                (key.time_ns - previous.time_ns, key.start_ns.wrapping_sub(previous.start_ns) as i64)
            })
            .collect();
        let mut bytes = postcard::to_stdvec(&StoredCursor { baseline, first, steps }).unwrap();
        if !cursor.others.is_empty() {
            let others: Vec<StoredOtherStart> = cursor
                .others
                .iter()
                .map(|b| StoredOtherStart {
                    start_ns: b.start_ns,
                    time_ns: b.time_ns,
                    count: b.count,
                    sum: b.sum.nanos(),
                    buckets: b.buckets.clone(),
                })
                .collect();
            bytes.extend(postcard::to_stdvec(&others).unwrap());
        }
        bytes
    }

    /// Integers of every width, the edges of each varint length among them.
    fn any_u64(random: &mut Xorshift) -> u64 {
        const EDGES: [u64; 9] = [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX / 2 + 1, u64::MAX];
        if random.below(4) == 0 {
            EDGES[random.below(EDGES.len() as u64) as usize]
        } else {
            random.next_u64() >> random.below(64)
        }
    }

    fn any_nanos(random: &mut Xorshift) -> Fixed {
        let magnitude =
            ((u128::from(random.next_u64()) << 64 | u128::from(random.next_u64())) >> (random.below(127) + 1)) as i128;
        Fixed::from_nanos(if random.below(2) == 0 { magnitude } else { -magnitude })
    }

    fn any_f64(random: &mut Xorshift) -> Option<f64> {
        (random.below(3) > 0).then(|| f64::from_bits(random.next_u64()))
    }

    #[test]
    fn test_hand_written_encoding_is_postcards() {
        let mut random = Xorshift::new(20261203);
        let bound_lists: Vec<Bounds> =
            vec![Arc::from(Vec::new()), Arc::from(vec![0.5]), Arc::from((0..20).map(f64::from).collect::<Vec<_>>())];
        for _ in 0..3_000 {
            let bounds = bound_lists[random.below(3) as usize].clone();
            let buckets: Vec<u64> = (0..=bounds.len()).map(|_| any_u64(&mut random)).collect();
            let state = Aggregate {
                count: any_u64(&mut random),
                sum: any_nanos(&mut random),
                min: any_f64(&mut random),
                max: any_f64(&mut random),
                extremes_exact: random.below(2) == 0,
                bounds: bounds.clone(),
                buckets: buckets.clone(),
                cost: any_nanos(&mut random),
                unpriced: any_nanos(&mut random),
            };
            let (bytes, hash) = encode_state(&state);
            assert_eq!(bytes, postcard_state(&state), "{state:?}");
            let back = decode_state(&bytes, |h| (Some(h) == hash).then(|| bounds.clone())).unwrap();
            assert_eq!(back.count, state.count);
            assert_eq!((back.sum, back.cost, back.unpriced), (state.sum, state.cost, state.unpriced));
            assert_eq!(back.buckets, state.buckets);

            let baseline = (random.below(3) > 0).then(|| Baseline {
                start_ns: any_u64(&mut random),
                time_ns: any_u64(&mut random),
                count: any_u64(&mut random),
                sum: any_nanos(&mut random),
                bounds: bounds.clone(),
                buckets,
            });
            let mut time_ns = random.next_u64() >> 2;
            // Points' keys (a start after the time is rejected: only a watermark has one), and
            // some of the time a watermark before them, or at the edge after the first.
            let mut seen: SeenKeys = (0..random.below(70))
                .map(|_| {
                    time_ns += random.next_u64() >> (random.below(64 - 24) + 24);
                    PointKey { time_ns, start_ns: any_u64(&mut random) % (time_ns + 1) }
                })
                .collect();
            match (random.below(3), seen.front()) {
                (0, Some(first)) => seen.set_forgotten_before(1 + random.below(first.time_ns + 1)),
                (1, first) => seen.set_forgotten_before(first.map_or(1 + random.below(1 << 40), |k| k.time_ns + 1)),
                _ => {}
            }
            // Some of the time, other start times of the series beside its baseline.
            let others = match &baseline {
                Some(current) if random.below(3) == 0 => (0..1 + random.below(7))
                    .map(|_| Baseline {
                        start_ns: any_u64(&mut random),
                        time_ns: any_u64(&mut random),
                        count: any_u64(&mut random),
                        sum: any_nanos(&mut random),
                        bounds: bounds.clone(),
                        buckets: current.buckets.iter().map(|_| any_u64(&mut random)).collect(),
                    })
                    .collect(),
                _ => Box::default(),
            };
            let cursor = SeriesCursor { baseline, others, seen };
            let (bytes, hash) = encode_cursor(&cursor);
            assert_eq!(bytes, postcard_cursor(&cursor), "{cursor:?}");
            let back = decode_cursor(&bytes, 0, |h| (Some(h) == hash).then(|| bounds.clone())).unwrap();
            assert_eq!(back, cursor);
        }
    }

    /// `new` rebuilt from `previous` as a write-ahead patch would be.
    fn patched(previous: &[u8], new: &[u8], (head, from, len): (usize, usize, usize)) -> Vec<u8> {
        [&new[..head], &previous[from..from + len], &new[head + len..]].concat()
    }

    #[test]
    fn test_cursor_patches_rebuild_each_rewrite_of_a_series_cursor() {
        let mut random = Xorshift::new(20261206);
        let bounds: Bounds = Arc::from((0..20).map(f64::from).collect::<Vec<_>>());
        let mut cursor = SeriesCursor::default();
        let mut time_ns = 1_700_000_000_000_000_000u64;
        let mut previous = encode_cursor(&cursor).0;
        let (mut rewrites, mut patches, mut in_order_unpatched) = (0, 0, 0);
        for round in 0..3_000u64 {
            // A point every 10 s (give or take the exporter's jitter), sometimes a late one, and
            // the keys older than the 10-minute window forgotten.
            let late = random.below(20) == 0;
            let key = if late && !cursor.seen.is_empty() {
                PointKey { time_ns: time_ns - 1 - random.below(300_000_000_000), start_ns: 5 }
            } else {
                time_ns += 10_000_000_000 + random.below(50_000_000);
                PointKey { time_ns, start_ns: if random.below(100) == 0 { time_ns } else { 5 } }
            };
            cursor.seen.insert(key);
            cursor.seen.forget_before(time_ns.saturating_sub(600_000_000_000));
            cursor.baseline = Some(Baseline {
                start_ns: 5,
                time_ns,
                count: round * 7,
                sum: Fixed::from_int(round as i64 * 3),
                bounds: Arc::clone(&bounds),
                buckets: (0..=20).map(|i| round * i).collect(),
            });
            let new = encode_cursor(&cursor).0;
            rewrites += 1;
            match cursor_patch(&previous, &new) {
                Some(patch) => {
                    patches += 1;
                    assert_eq!(patched(&previous, &new, patch), new, "round {round}");
                    assert!(patch.2 >= 32, "round {round}: a patch keeps at least 32 bytes");
                }
                None if !late && cursor.seen.len() > 10 => in_order_unpatched += 1,
                None => {}
            }
            previous = new;
        }
        // Every rewrite after a point in order, once the cursor holds more than a few keys, is a
        // patch; late points (one in 20) and the first rounds are written whole.
        assert_eq!(in_order_unpatched, 0);
        assert!(patches * 100 >= rewrites * 85, "{patches} patches of {rewrites} rewrites");
    }

    #[test]
    fn test_cursor_patch_keeps_the_steps_of_the_kept_keys() {
        // Steps that differ from key to key, as an exporter's jitter makes them.
        let keys = |times: std::ops::Range<u64>| -> SeenKeys {
            times.map(|t| PointKey { time_ns: t * 10_000_000_000 + t * t * 1_000, start_ns: 0 }).collect()
        };
        let cursor = |seen: SeenKeys| encode_cursor(&SeriesCursor { baseline: None, seen, ..Default::default() }).0;
        let previous = cursor(keys(0..60));
        // Any number of keys forgotten, one to eight added: a patch that keeps every step of the
        // keys kept (all but the first key's, which is written whole at the head).
        for forgotten in 0..30 {
            for added in 1..=8 {
                let new = cursor(keys(forgotten..60 + added));
                let patch = cursor_patch(&previous, &new).unwrap_or_else(|| panic!("{forgotten} forgotten"));
                assert_eq!(patched(&previous, &new, patch), new);
                let kept_steps = cursor(keys(forgotten..60)).len() - cursor(keys(forgotten..forgotten + 1)).len();
                assert!(patch.2 >= kept_steps, "{forgotten} forgotten, {added} added: {patch:?}");
            }
        }
        // A key added among the kept ones: the steps after it are still kept.
        let mut seen = keys(0..60);
        seen.insert(PointKey { time_ns: 400_000_000_123, start_ns: 0 });
        let new = cursor(seen);
        let patch = cursor_patch(&previous, &new).expect("the steps after the late key");
        assert_eq!(patched(&previous, &new, patch), new);
        // Too short to be worth it, or too much added at once: written whole.
        assert_eq!(cursor_patch(&cursor(keys(0..4)), &cursor(keys(0..5))), None);
        assert_eq!(cursor_patch(&previous, &cursor(keys(0..80))), None);
        assert_eq!(cursor_patch(&previous, &[1; 8]), None);
        assert_eq!(cursor_patch(&[], &previous), None);
    }

    #[test]
    fn test_series_keys_are_stored_as_before_attribute_sets_were_shared() {
        // The stored form of a series key as written while `AttributeSet` held a `Vec` of pairs.
        #[derive(Serialize)]
        struct KeyAsWritten {
            entity: tollgate_rules::Entity,
            metric: String,
            attributes: Vec<(String, String)>,
        }
        let pairs = vec![("gen_ai.provider.name".to_string(), "openai".to_string()), ("le".into(), "0.5".into())];
        let key = tollgate_rules::SeriesKey {
            entity: tollgate_rules::Entity::new("gw", Some("pod")),
            metric: "gen_ai.server.request.duration".into(),
            attributes: tollgate_rules::attributes::AttributeSet::from_pairs(pairs.clone()),
        };
        let as_written = KeyAsWritten { entity: key.entity.clone(), metric: key.metric.clone(), attributes: pairs };
        let bytes = encode(&as_written);
        assert_eq!(encode(&key), bytes);
        assert_eq!(decode_series(&bytes).unwrap(), key);
    }

    #[test]
    fn test_bounds_hash_is_xxh3_of_the_bounds_bytes() {
        // Stored bounds are keyed by this hash: it must not change, whatever the length.
        for len in [0, 1, 14, 32, 33, 100] {
            let bounds: Vec<f64> = (0..len).map(|i| 0.5 * i as f64 - 3.0).collect();
            let bytes: Vec<u8> = bounds.iter().flat_map(|b| b.to_bits().to_le_bytes()).collect();
            assert_eq!(bounds_hash(&bounds), xxh3_64(&bytes), "{len} bounds");
        }
    }

    #[test]
    fn test_shared_bounds_hash_is_the_hash_of_each_list() {
        // More lists than the thread remembers, in a pattern that reuses and evicts them, and lists
        // made and dropped in between (their addresses free for the next ones).
        let lists: Vec<Bounds> = (0..RECENT_BOUNDS_LEN + 3)
            .map(|n| Arc::from((0..n + 2).map(|i| i as f64 * 1.5).collect::<Vec<_>>()))
            .collect();
        let mut random = Xorshift::new(5);
        for _ in 0..500 {
            let bounds = &lists[random.below(lists.len() as u64) as usize];
            assert_eq!(shared_bounds_hash(bounds), bounds_hash(bounds));
            let fresh: Bounds = Arc::from(vec![random.below(1000) as f64, 2000.0]);
            assert_eq!(shared_bounds_hash(&fresh), bounds_hash(&fresh));
        }
    }

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
        let id = SeriesId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        assert_eq!(series_key_id(&series_key(3, 9, id)), Ok(id));
        assert!(series_key_id(&series_key(3, 9, id)[..26]).is_err());
        assert_eq!(key_partition(&clock_key(3, 0x0a0b_0c0d_0e0f_1011)), Ok(0x0a0b_0c0d_0e0f_1011));
        assert!(key_partition(&clock_key(3, 9)[..10]).is_err());
        // Keys too short for their parts (a corrupt store) are errors that say which key.
        assert_eq!(entity_key_partition(&entity_key(u64::MAX - 3)), Ok(u64::MAX - 3));
        for cut in 0..ENTITY_KEY_LEN {
            let error = entity_key_partition(&entity_key(5)[..cut]).unwrap_err();
            assert!(error.starts_with("entity key of"), "{error}");
        }
        assert!(entity_key_partition(&[&entity_key(5)[..], &[0]].concat()).is_err(), "a longer key is no entity key");
        assert_eq!(log_batch_key_fingerprint(&log_batch_key(9, u128::MAX - 5)), Ok(u128::MAX - 5));
        for cut in 0..VNODE_PREFIX_LEN + 16 {
            let error = log_batch_key_fingerprint(&log_batch_key(9, 1)[..cut]).unwrap_err();
            assert!(error.starts_with("log batch key of"), "{error}");
        }
        let log = log_key(3, 9, 1234, 77);
        assert_eq!(log_key_time(&log), Some(1234));
        assert!(log_key(3, 9, 1234, 78) > log && log_key(3, 9, 1235, 0) > log);
    }

    #[test]
    fn test_cursor_keeps_other_start_times_where_older_versions_ignore_them() {
        let bounds: Bounds = Arc::from(vec![1.0, 5.0]);
        let baseline = |start_ns, time_ns, count: u64| Baseline {
            start_ns,
            time_ns,
            count,
            sum: Fixed::from_int(count as i64),
            bounds: Arc::clone(&bounds),
            buckets: vec![count, 0, 0],
        };
        let single = SeriesCursor {
            baseline: Some(baseline(7, 130, 9)),
            others: Box::default(),
            seen: [PointKey { time_ns: 130, start_ns: 7 }].into_iter().collect(),
        };
        let mut two = single.clone();
        two.others = vec![baseline(3, 125, 4), baseline(5, 120, 2)].into_boxed_slice();
        let (bytes, hash) = encode_cursor(&two);
        let resolve = |h: u64| (Some(h) == hash).then(|| Arc::clone(&bounds));
        assert_eq!(decode_cursor(&bytes, 0, resolve).unwrap(), two);
        // A version that does not know other start times decodes `StoredCursor` and leaves the
        // bytes after it: it reads the cursor with its current start only.
        let (single_bytes, _) = encode_cursor(&single);
        assert!(bytes.len() > single_bytes.len() && bytes.starts_with(&single_bytes));
        let older: StoredCursor = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(postcard::to_stdvec(&older).unwrap(), single_bytes);
        let mut bad = two.clone();
        bad.others[1].buckets.push(1);
        let error = decode_cursor(&encode_cursor(&bad).0, 0, resolve).unwrap_err();
        assert!(error.contains("other start time has 4 buckets for 2 bounds"), "{error}");
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
            others: Box::default(),
            seen: keys.iter().map(|&(time_ns, start_ns)| PointKey { time_ns, start_ns }).collect(),
        };
        let (bytes, hash) = encode_cursor(&cursor);
        assert_eq!(hash, Some(bounds_hash(&bounds)));
        let resolve = |h: u64| (Some(h) == hash).then(|| Arc::clone(&bounds));
        assert_eq!(decode_cursor(&bytes, 0, resolve).unwrap(), cursor);
        let recent = decode_cursor(&bytes, 120, resolve).unwrap();
        assert_eq!(recent.seen.iter().map(|k| k.time_ns).collect::<Vec<_>>(), vec![120, 120, 130, u64::MAX - 1]);
        assert_eq!(recent.seen.forgotten_before(), 120, "the keys left out are forgotten");
        assert_eq!(cursor.seen.forgotten_before(), 0);
        // The time before which a series forgot keys is stored with it, and read back.
        let mut forgot = cursor.clone();
        forgot.seen.set_forgotten_before(95);
        let (bytes, _) = encode_cursor(&forgot);
        assert_eq!(decode_cursor(&bytes, 0, resolve).unwrap(), forgot);
        assert_eq!(decode_cursor(&bytes, 0, resolve).unwrap().seen.forgotten_before(), 95);
        assert_eq!(decode_cursor(&bytes, 120, resolve).unwrap().seen.forgotten_before(), 120);
        assert_eq!(decode_cursor(&bytes, 120, resolve).unwrap().seen.len(), 4);
        let error = decode_cursor(&bytes, 0, |_| None).unwrap_err();
        assert!(error.contains("unknown bounds"), "{error}");
        let empty = SeriesCursor::default();
        assert_eq!(decode_cursor(&encode_cursor(&empty).0, 0, |_| None).unwrap(), empty);
    }
}
