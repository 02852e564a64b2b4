//! Durable state behind a storage trait of our own (sled 0.34 is effectively unmaintained; the
//! rest of the node does not know it exists).
//!
//! What is stored, per vnode so that a partition's data forms key ranges: series keys, series
//! cursors (cumulative baseline and recent point keys), partition clocks and
//! roll-up frontiers, per-(series, minute/hour/day) aggregates, kept access logs and recent
//! log-batch fingerprints; plus an entity index (services and instances with their last-seen
//! time), interned histogram bounds and metadata.
//!
//! Writes are [`StoreBatch`]es applied atomically and acknowledged only once flushed to disk
//! ([`Storage::commit`]); one writer thread groups many batches per flush.

pub mod codec;
pub mod format;
pub mod handoff;
pub mod memtable;
pub mod sled_store;
pub mod wal;

use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tollgate_rules::normalize::{PartitionClock, SeriesCursor};
use tollgate_rules::{Aggregate, Bounds, Fixed, LogKind, SeriesId, SeriesKey};

pub use sled_store::SledStorage;

/// The time resolution of a stored aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Resolution {
    /// One minute.
    Minute,
    /// One UTC hour (roll-up of its minutes).
    Hour,
    /// One UTC day (roll-up of its minutes).
    Day,
}

impl Resolution {
    /// All resolutions, finest first.
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::Hour, Resolution::Day];

    /// Minutes in one period.
    pub fn minutes(self) -> u64 {
        match self {
            Resolution::Minute => 1,
            Resolution::Hour => 60,
            Resolution::Day => 1440,
        }
    }

    /// The period (its first minute since the epoch) containing `minute`.
    pub fn period_of(self, minute: u64) -> u64 {
        minute - minute % self.minutes()
    }

    fn tag(self) -> u8 {
        match self {
            Resolution::Minute => b'M',
            Resolution::Hour => b'H',
            Resolution::Day => b'D',
        }
    }
}

/// A service instance (or a service without instance) and when it last sent data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRecord {
    /// Service.
    pub service: String,
    /// Instance.
    pub instance: Option<String>,
    /// Newest data time seen, unix nanoseconds.
    pub last_seen_ns: u64,
}

/// A kept access-log record (SPEC §5, §7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredLog {
    /// Record time, unix nanoseconds.
    pub time_ns: u64,
    /// Identity within the same time: a hash of the record.
    pub fingerprint: u128,
    /// Service.
    pub service: String,
    /// Instance.
    pub instance: Option<String>,
    /// LLM or MCP.
    pub kind: LogKind,
    /// Keep reasons (`error`, `slow`, ...).
    pub reasons: Vec<String>,
    /// Model (LLM).
    pub model: Option<String>,
    /// Provider or MCP backend.
    pub provider: Option<String>,
    /// Input tokens.
    pub input_tokens: Option<u64>,
    /// Output tokens.
    pub output_tokens: Option<u64>,
    /// Input + output tokens.
    pub total_tokens: Option<u64>,
    /// Request cost, micro-units.
    pub cost: Option<Fixed>,
    /// HTTP status.
    pub response_code: Option<i64>,
    /// Duration, ms.
    pub duration_ms: Option<u64>,
    /// Session id.
    pub session_id: Option<String>,
    /// Every original attribute, value as text.
    pub attributes: Vec<(String, String)>,
    /// The body as text.
    pub body: Option<String>,
}

impl StoredLog {
    /// Roughly the bytes this record takes in a page of logs: its texts, and a little for the
    /// numbers. Pages are bounded by it ([`crate::query::MAX_LOG_PAGE_BYTES`]).
    pub fn approximate_bytes(&self) -> usize {
        let texts = [Some(&self.service), self.instance.as_ref(), self.model.as_ref(), self.provider.as_ref()]
            .into_iter()
            .chain([self.session_id.as_ref(), self.body.as_ref()])
            .flatten()
            .map(String::len)
            .sum::<usize>();
        let reasons = self.reasons.iter().map(String::len).sum::<usize>();
        let attributes = self.attributes.iter().map(|(key, value)| key.len() + value.len() + 8).sum::<usize>();
        256 + texts + reasons + attributes
    }
}

/// Where a log sits in the log order of one partition: newest first by time, then fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogPosition {
    /// Record time, unix nanoseconds.
    pub time_ns: u64,
    /// Record fingerprint.
    pub fingerprint: u128,
}

/// A series' cursor in its stored form, with the bounds its baseline refers to.
#[derive(Clone, Debug)]
pub struct EncodedCursor {
    /// The stored value.
    pub bytes: Vec<u8>,
    /// The hash and bounds of the baseline, which must be stored with it.
    pub bounds: Option<(u64, Bounds)>,
}

impl EncodedCursor {
    /// Encodes `cursor`.
    pub fn new(cursor: &SeriesCursor) -> EncodedCursor {
        let (bytes, hash) = codec::encode_cursor(cursor);
        let bounds = hash.zip(cursor.baseline.as_ref().map(|baseline| Arc::clone(&baseline.bounds)));
        EncodedCursor { bytes, bounds }
    }
}

/// One write.
#[derive(Clone, Debug)]
pub enum Op {
    /// Insert a series key (once, when the series is created).
    Series { vnode: u16, partition: u64, id: SeriesId, key: SeriesKey },
    /// Insert or replace a series' normalisation cursor: its cumulative baseline and the keys of
    /// the points it merged within the lateness window (de-duplication across restarts).
    /// Encoded where the batch is made ([`EncodedCursor::new`]), so that the cursor is not copied.
    Cursor { vnode: u16, partition: u64, id: SeriesId, cursor: EncodedCursor },
    /// Set a partition's roll-up frontier: minutes before it are in the hour and day states.
    RolledUntil { vnode: u16, partition: u64, minute: u64 },
    /// Insert or replace a partition clock.
    Clock { vnode: u16, partition: u64, clock: PartitionClock },
    /// Insert or replace a partition's log clock: the newest minute of its access logs, which
    /// roll-ups close minutes by, and which the lateness of points does not follow.
    LogClock { vnode: u16, partition: u64, clock: PartitionClock },
    /// Insert or replace an aggregate.
    State { vnode: u16, id: SeriesId, resolution: Resolution, period: u64, state: Aggregate },
    /// Insert or replace an entity's record.
    Entity { partition: u64, record: EntityRecord },
    /// Store a kept log (idempotent: same record, same key).
    Log { vnode: u16, partition: u64, log: StoredLog },
    /// Remember a processed log batch.
    LogBatch { vnode: u16, fingerprint: u128, time_ns: u64 },
    /// Set a metadata value.
    Meta { key: String, value: Vec<u8> },
    /// Remove a metadata value.
    DeleteMeta { key: String },
    /// Delete a raw key of the data tree (retention).
    DeleteRaw { key: Vec<u8> },
    /// Put a raw entry of the data tree (a hand-over copying entries as they are).
    PutRaw { key: Vec<u8>, value: Vec<u8> },
}

/// Writes applied atomically together.
#[derive(Clone, Debug, Default)]
pub struct StoreBatch {
    /// The writes, in order.
    pub ops: Vec<Op>,
}

impl StoreBatch {
    /// Adds a write.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// True without writes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Resolves when a committed batch is durable (or failed).
pub type CommitTicket = tokio::sync::oneshot::Receiver<Result<(), Error>>;

/// Waits for a ticket: `Ok` once the batch is on disk.
pub async fn durable(ticket: CommitTicket) -> Result<(), Error> {
    ticket.await.map_err(|_| Error::Unavailable("storage writer stopped before the write was durable".into()))?
}

/// What a retention sweep found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Keys examined.
    pub examined: u64,
    /// Keys deleted.
    pub deleted: u64,
}

/// Cut-offs of a retention sweep: everything strictly older is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionCutoffs {
    /// First minute kept at minute resolution, once rolled up into its hour and day.
    pub minute: u64,
    /// First minute kept at minute resolution while not rolled up yet (the roll-up frontier of
    /// a partition keeps its minutes past `minute` until then, but not past this).
    pub minute_unrolled: u64,
    /// First minute kept at hour resolution.
    pub hour: u64,
    /// First minute kept at day resolution.
    pub day: u64,
    /// First log time kept, unix nanoseconds.
    pub logs_ns: u64,
    /// First log-batch time kept, unix nanoseconds.
    pub log_batches_ns: u64,
}

/// Receives a hand-over's entries (raw key, raw value), a chunk at a time.
pub type ChunkSink<'a> = dyn FnMut(Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), Error> + 'a;

/// The node's durable state.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Queues a batch for the writer (waiting while the writer's queue is full: back-pressure)
    /// and returns a ticket that resolves once the batch is applied atomically and flushed.
    fn commit(&self, batch: StoreBatch) -> Pin<Box<dyn Future<Output = Result<CommitTicket, Error>> + Send + '_>>;

    /// A series' key.
    fn series(&self, vnode: u16, partition: u64, id: SeriesId) -> Result<Option<SeriesKey>, Error>;

    /// The keys of all series of a partition.
    fn series_of_partition(&self, vnode: u16, partition: u64) -> Result<Vec<SeriesKey>, Error>;

    /// The ids of all series of a partition, read from the records' keys (none is decoded).
    fn series_ids_of_partition(&self, vnode: u16, partition: u64) -> Result<Vec<SeriesId>, Error>;

    /// A series' normalisation cursor: its baseline and its point keys since `since_ns`.
    fn cursor(&self, vnode: u16, partition: u64, id: SeriesId, since_ns: u64) -> Result<SeriesCursor, Error>;

    /// A partition's clock.
    fn clock(&self, vnode: u16, partition: u64) -> Result<Option<PartitionClock>, Error>;

    /// All partition clocks of a vnode.
    fn clocks_of_vnode(&self, vnode: u16) -> Result<Vec<(u64, PartitionClock)>, Error>;

    /// A partition's log clock.
    fn log_clock(&self, vnode: u16, partition: u64) -> Result<Option<PartitionClock>, Error>;

    /// All partition log clocks of a vnode.
    fn log_clocks_of_vnode(&self, vnode: u16) -> Result<Vec<(u64, PartitionClock)>, Error>;

    /// A partition's roll-up frontier (0 when nothing was rolled up).
    fn rolled_until(&self, vnode: u16, partition: u64) -> Result<u64, Error>;

    /// One aggregate.
    fn state(&self, vnode: u16, id: SeriesId, resolution: Resolution, period: u64) -> Result<Option<Aggregate>, Error>;

    /// Aggregates of a series with `from <= period < to`, in period order.
    fn states(
        &self,
        vnode: u16,
        id: SeriesId,
        resolution: Resolution,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Aggregate)>, Error>;

    /// Every entity record with its partition.
    fn entities(&self) -> Result<Vec<(u64, EntityRecord)>, Error>;

    /// Up to `limit` kept logs of a partition with `from_ns <= time`, strictly before `before`
    /// in log order (newest first); `None` starts at the newest. Also stops after the record
    /// that brings their [`StoredLog::approximate_bytes`] to `max_bytes`.
    fn logs(
        &self,
        vnode: u16,
        partition: u64,
        from_ns: u64,
        before: Option<LogPosition>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredLog>, Error>;

    /// The time of a partition's newest stored kept log, 0 when it has none (at least that: a
    /// partition whose newest log cannot be told answers `u64::MAX`).
    fn newest_log_time(&self, vnode: u16, partition: u64) -> Result<u64, Error>;

    /// Whether a kept log of a partition with this time and fingerprint is stored.
    fn has_log(&self, vnode: u16, partition: u64, time_ns: u64, fingerprint: u128) -> Result<bool, Error>;

    /// Log-batch fingerprints of a vnode with their time.
    fn log_batches(&self, vnode: u16) -> Result<Vec<(u128, u64)>, Error>;

    /// A metadata value.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;

    /// Deletes data older than the cut-offs, in chunks, through the writer. Blocking: run it on
    /// a blocking thread.
    fn sweep(&self, cutoffs: RetentionCutoffs) -> Result<SweepReport, Error>;

    /// Bytes on disk.
    fn size_on_disk(&self) -> u64;

    /// Interned bucket bounds by hash.
    fn bounds(&self, hash: u64) -> Option<tollgate_rules::Bounds>;

    /// The normalisation state of `vnode` a hand-over carries (see [`handoff`]), in chunks
    /// given to `sink`. Blocking.
    fn export_vnode(&self, vnode: u16, sink: &mut ChunkSink<'_>) -> Result<(), Error>;

    /// Every entry, in chunks given to `sink` (a drain). Blocking.
    fn export_all(&self, sink: &mut ChunkSink<'_>) -> Result<(), Error>;

    /// The data this node holds for the departed node `holder` (opened empty when absent), as a
    /// store of its own that shares this store's writer.
    fn held(&self, holder: u64) -> Result<std::sync::Arc<dyn Storage>, Error>;

    /// Departed nodes this node has data of.
    fn held_holders(&self) -> Result<Vec<u64>, Error>;

    /// Deletes the data held for `holder` (durable with the next write's flush).
    fn drop_held(&self, holder: u64) -> Result<(), Error>;
}
