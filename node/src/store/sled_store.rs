//! [`Storage`] on sled 0.34, with one group-commit writer thread.
//!
//! sled is durable only after `flush()`, and concurrent `flush_async()` calls can deadlock on
//! 0.34.7, so exactly one thread applies batches and flushes: it takes every batch waiting, applies
//! them in order (each atomically), flushes once, and then completes all their tickets. Under load
//! one flush covers many requests; alone, a request waits for one flush.

use super::codec::{self, ENTITY, LOG, LOG_BATCH, POINT_KEY, SERIES};
use super::{
    CommitTicket, EntityRecord, LogPosition, Op, Resolution, RetentionCutoffs, Storage, StoreBatch, StoredLog,
    SweepReport,
};
use crate::error::Error;
use crate::metrics as m;
use sled::Transactional;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tollgate_rules::normalize::{Baseline, PartitionClock, PointKey, SeriesCursor};
use tollgate_rules::series::FastMap;
use tollgate_rules::{Aggregate, Bounds, SeriesId, SeriesKey};
use tracing::{error, info};

/// Keys deleted per retention batch.
const SWEEP_CHUNK: usize = 10_000;

struct WriteRequest {
    /// The tree `data` goes to, when not the node's own data tree (data held for a departed node).
    tree: Option<sled::Tree>,
    data: sled::Batch,
    meta: sled::Batch,
    has_meta: bool,
    bytes: usize,
    done: oneshot::Sender<Result<(), Error>>,
}

/// Name prefix of the trees holding departed nodes' data.
const HELD_PREFIX: &str = "held-";

/// sled-backed storage: the node's own data, or (a view sharing the writer) the data it holds
/// for a departed node.
pub struct SledStorage {
    db: sled::Db,
    data: sled::Tree,
    /// For a view on a departed node's data: that node.
    holder: Option<u64>,
    meta: sled::Tree,
    /// Bounds known to be in the data tree (or in a batch ahead of any batch using them).
    bounds: RwLock<FastMap<u64, Bounds>>,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<WriteRequest>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<AtomicBool>,
}

impl Drop for SledStorage {
    /// Closes the writer's queue and waits for it to finish what was queued, so that the data
    /// directory is released (and everything queued is flushed) when the store is gone.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStorage").field("failed", &self.failed.load(Ordering::Relaxed)).finish()
    }
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Internal(format!("corrupt store: {what}"))
}

fn storage_error(context: &str, error: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("storage: {context}: {error}"))
}

impl SledStorage {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    pub fn open(
        dir: &Path,
        cache_capacity_bytes: u64,
        max_batches_per_flush: usize,
        writer_queue_capacity: usize,
    ) -> Result<SledStorage, Error> {
        std::fs::create_dir_all(dir).map_err(|e| storage_error(&format!("creating {}", dir.display()), e))?;
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(cache_capacity_bytes)
            // Only the writer thread flushes (see the module comment).
            .flush_every_ms(None)
            .open()
            .map_err(|e| storage_error(&format!("opening {}", dir.display()), e))?;
        let data = db.open_tree("data").map_err(|e| storage_error("opening tree data", e))?;
        let meta = db.open_tree("meta").map_err(|e| storage_error("opening tree meta", e))?;
        let (writer, queue) = mpsc::channel(writer_queue_capacity);
        let failed = Arc::new(AtomicBool::new(false));
        let thread_db = db.clone();
        let thread_data = data.clone();
        let thread_meta = meta.clone();
        let thread_failed = Arc::clone(&failed);
        let writer_thread = std::thread::Builder::new()
            .name("tollgate-writer".into())
            .spawn(move || {
                writer_loop(thread_db, thread_data, thread_meta, queue, max_batches_per_flush, thread_failed)
            })
            .map_err(|e| storage_error("starting the writer thread", e))?;
        info!(dir = %dir.display(), "store opened");
        Ok(SledStorage {
            db,
            data,
            holder: None,
            meta,
            bounds: RwLock::new(FastMap::default()),
            writer: Some(writer),
            writer_thread: Some(writer_thread),
            failed,
        })
    }

    fn held_view(&self, holder: u64) -> Result<SledStorage, Error> {
        let name = format!("{HELD_PREFIX}{holder}");
        let data = self.db.open_tree(&name).map_err(|e| storage_error(&format!("opening tree {name}"), e))?;
        Ok(SledStorage {
            db: self.db.clone(),
            data,
            holder: Some(holder),
            meta: self.meta.clone(),
            bounds: RwLock::new(FastMap::default()),
            writer: self.writer.clone(),
            writer_thread: None,
            failed: Arc::clone(&self.failed),
        })
    }

    /// True once a write or flush failed: the node must stop (its memory is ahead of its disk).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn resolve_bounds(&self, hash: u64) -> Option<Bounds> {
        if let Some(bounds) = self.bounds.read().expect("bounds lock").get(&hash) {
            return Some(Arc::clone(bounds));
        }
        let bytes = self.data.get(codec::bounds_key(hash)).ok()??;
        let values: Vec<f64> = codec::decode("bounds", &bytes).ok()?;
        let bounds: Bounds = Arc::from(values);
        self.bounds.write().expect("bounds lock").insert(hash, Arc::clone(&bounds));
        Some(bounds)
    }

    fn encode(&self, batch: StoreBatch) -> (sled::Batch, sled::Batch, bool, usize) {
        let mut data = sled::Batch::default();
        let mut meta = sled::Batch::default();
        let mut has_meta = false;
        let mut bytes = 0usize;
        let put = |batch: &mut sled::Batch, key: Vec<u8>, value: Vec<u8>, bytes: &mut usize| {
            *bytes += key.len() + value.len();
            batch.insert(key, value);
        };
        for op in batch.ops {
            match op {
                Op::Series { vnode, partition, id, key } => {
                    put(&mut data, codec::series_key(vnode, partition, id), codec::encode(&key), &mut bytes)
                }
                Op::Baseline { vnode, id, baseline } => {
                    put(&mut data, codec::baseline_key(vnode, id), codec::encode(&baseline), &mut bytes)
                }
                Op::PointKey { vnode, partition, id, key } => put(
                    &mut data,
                    codec::point_key(vnode, partition, id, key.time_ns, key.start_ns),
                    Vec::new(),
                    &mut bytes,
                ),
                Op::RolledUntil { vnode, partition, minute } => {
                    put(&mut data, codec::rolled_until_key(vnode, partition), minute.to_be_bytes().to_vec(), &mut bytes)
                }
                Op::Clock { vnode, partition, clock } => {
                    put(&mut data, codec::clock_key(vnode, partition), codec::encode(&clock), &mut bytes)
                }
                Op::State { vnode, id, resolution, period, state } => {
                    let (value, hash) = codec::encode_state(&state);
                    if let Some(hash) = hash {
                        let known = self.bounds.read().expect("bounds lock").contains_key(&hash);
                        if !known {
                            // Written in the same atomic batch as its first user.
                            put(&mut data, codec::bounds_key(hash), codec::encode(&state.bounds.to_vec()), &mut bytes);
                            self.bounds.write().expect("bounds lock").insert(hash, Arc::clone(&state.bounds));
                        }
                    }
                    put(&mut data, codec::state_key(vnode, id, resolution, period), value, &mut bytes)
                }
                Op::Entity { partition, record } => {
                    put(&mut data, codec::entity_key(partition), codec::encode(&record), &mut bytes)
                }
                Op::Log { vnode, partition, log } => put(
                    &mut data,
                    codec::log_key(vnode, partition, log.time_ns, log.fingerprint),
                    codec::encode(&log),
                    &mut bytes,
                ),
                Op::LogBatch { vnode, fingerprint, time_ns } => {
                    put(&mut data, codec::log_batch_key(vnode, fingerprint), time_ns.to_be_bytes().to_vec(), &mut bytes)
                }
                Op::Meta { key, value } => {
                    has_meta = true;
                    put(&mut meta, key.into_bytes(), value, &mut bytes)
                }
                Op::DeleteRaw { key } => {
                    bytes += key.len();
                    data.remove(key);
                }
                Op::PutRaw { key, value } => put(&mut data, key, value, &mut bytes),
                Op::DeleteMeta { key } => {
                    has_meta = true;
                    meta.remove(key.into_bytes());
                }
            }
        }
        (data, meta, has_meta, bytes)
    }

    fn get(&self, key: Vec<u8>) -> Result<Option<sled::IVec>, Error> {
        self.data.get(key).map_err(|e| storage_error("get", e))
    }

    fn scan<T>(
        &self,
        prefix: Vec<u8>,
        mut decode: impl FnMut(&[u8], &[u8]) -> Result<T, String>,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for entry in self.data.scan_prefix(prefix) {
            let (key, value) = entry.map_err(|e| storage_error("scan", e))?;
            out.push(decode(&key, &value).map_err(corrupt)?);
        }
        Ok(out)
    }
}

impl Storage for SledStorage {
    fn commit(&self, batch: StoreBatch) -> Pin<Box<dyn Future<Output = Result<CommitTicket, Error>> + Send + '_>> {
        Box::pin(async move {
            let (done, ticket) = oneshot::channel();
            if self.has_failed() {
                return Err(Error::Unavailable("storage has failed; the node is stopping".into()));
            }
            let (data, meta, has_meta, bytes) = self.encode(batch);
            let writer = self.writer.as_ref().ok_or_else(|| Error::Unavailable("storage is closing".into()))?;
            writer
                .send(WriteRequest { tree: self.holder.map(|_| self.data.clone()), data, meta, has_meta, bytes, done })
                .await
                .map_err(|_| Error::Unavailable("storage writer stopped".into()))?;
            Ok(ticket)
        })
    }

    fn series(&self, vnode: u16, partition: u64, id: SeriesId) -> Result<Option<SeriesKey>, Error> {
        let Some(bytes) = self.get(codec::series_key(vnode, partition, id))? else { return Ok(None) };
        codec::decode_series(&bytes).map(Some).map_err(corrupt)
    }

    fn series_of_partition(&self, vnode: u16, partition: u64) -> Result<Vec<SeriesKey>, Error> {
        self.scan(codec::partition_prefix(SERIES, vnode, partition), |_, value| codec::decode_series(value))
    }

    fn cursor(&self, vnode: u16, partition: u64, id: SeriesId, since_ns: u64) -> Result<SeriesCursor, Error> {
        let baseline = match self.get(codec::baseline_key(vnode, id))? {
            Some(bytes) => Some(codec::decode::<Baseline>("baseline", &bytes).map_err(corrupt)?),
            None => None,
        };
        let prefix = codec::point_key_prefix(vnode, partition, id);
        let mut start = prefix.clone();
        start.extend_from_slice(&since_ns.to_be_bytes());
        let mut seen = std::collections::VecDeque::new();
        for entry in self.data.range(start..) {
            let (key, _) = entry.map_err(|e| storage_error("range", e))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let parts = codec::point_key_parts(&key).ok_or_else(|| corrupt("point key"))?;
            seen.push_back(PointKey { time_ns: parts.time_ns, start_ns: parts.start_ns });
        }
        Ok(SeriesCursor { baseline, seen })
    }

    fn clock(&self, vnode: u16, partition: u64) -> Result<Option<PartitionClock>, Error> {
        let Some(bytes) = self.get(codec::clock_key(vnode, partition))? else { return Ok(None) };
        codec::decode_clock(&bytes).map(Some).map_err(corrupt)
    }

    fn rolled_until(&self, vnode: u16, partition: u64) -> Result<u64, Error> {
        let Some(bytes) = self.get(codec::rolled_until_key(vnode, partition))? else { return Ok(0) };
        let array: [u8; 8] = bytes.as_ref().try_into().map_err(|_| corrupt("roll-up frontier"))?;
        Ok(u64::from_be_bytes(array))
    }

    fn clocks_of_vnode(&self, vnode: u16) -> Result<Vec<(u64, PartitionClock)>, Error> {
        self.scan(codec::vnode_prefix(codec::CLOCK, vnode), |key, value| {
            let partition = u64::from_be_bytes(key[3..11].try_into().map_err(|_| "short clock key".to_string())?);
            Ok((partition, codec::decode_clock(value)?))
        })
    }

    fn state(&self, vnode: u16, id: SeriesId, resolution: Resolution, period: u64) -> Result<Option<Aggregate>, Error> {
        let key = codec::state_key(vnode, id, resolution, period);
        let Some(bytes) = self.get(key)? else { return Ok(None) };
        codec::decode_state(&bytes, |hash| self.resolve_bounds(hash)).map(Some).map_err(corrupt)
    }

    fn states(
        &self,
        vnode: u16,
        id: SeriesId,
        resolution: Resolution,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Aggregate)>, Error> {
        if from >= to {
            return Ok(Vec::new());
        }
        let start = codec::state_key(vnode, id, resolution, from);
        let end = codec::state_key(vnode, id, resolution, to);
        let mut out = Vec::new();
        for entry in self.data.range(start..end) {
            let (key, value) = entry.map_err(|e| storage_error("range", e))?;
            let period =
                codec::state_key_period(&key).ok_or_else(|| Error::Internal("corrupt store: state key".into()))?;
            let state = codec::decode_state(&value, |hash| self.resolve_bounds(hash))
                .map_err(|e| Error::Internal(format!("corrupt store: {e}")))?;
            out.push((period, state));
        }
        Ok(out)
    }

    fn entities(&self) -> Result<Vec<(u64, EntityRecord)>, Error> {
        self.scan(vec![ENTITY], |key, value| {
            let partition = u64::from_be_bytes(key[1..9].try_into().map_err(|_| "short entity key".to_string())?);
            Ok((partition, codec::decode_entity(value)?))
        })
    }

    fn logs(
        &self,
        vnode: u16,
        partition: u64,
        from_ns: u64,
        before: Option<LogPosition>,
        limit: usize,
    ) -> Result<Vec<StoredLog>, Error> {
        let start = codec::log_key(vnode, partition, from_ns, 0);
        let end = match before {
            Some(position) => codec::log_key(vnode, partition, position.time_ns, position.fingerprint),
            None => codec::partition_prefix(LOG, vnode, partition.wrapping_add(1)),
        };
        if before.is_none() && partition == u64::MAX {
            return Err(Error::Internal("partition hash u64::MAX has no upper key".into()));
        }
        let mut out = Vec::new();
        for entry in self.data.range(start..end).rev() {
            if out.len() >= limit {
                break;
            }
            let (_, value) = entry.map_err(|e| storage_error("range", e))?;
            out.push(codec::decode_log(&value).map_err(|e| Error::Internal(format!("corrupt store: {e}")))?);
        }
        Ok(out)
    }

    fn log_batches(&self, vnode: u16) -> Result<Vec<(u128, u64)>, Error> {
        self.scan(codec::vnode_prefix(LOG_BATCH, vnode), |key, value| {
            let fingerprint =
                u128::from_be_bytes(key[3..19].try_into().map_err(|_| "short log batch key".to_string())?);
            let time = u64::from_be_bytes(value.try_into().map_err(|_| "bad log batch value".to_string())?);
            Ok((fingerprint, time))
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.meta.get(key.as_bytes()).map_err(|e| storage_error("get meta", e))?.map(|v| v.to_vec()))
    }

    fn sweep(&self, cutoffs: RetentionCutoffs) -> Result<SweepReport, Error> {
        let mut report = SweepReport::default();
        let runtime = tokio::runtime::Handle::current();
        let mut expired: Vec<Vec<u8>> = Vec::new();
        let flush = |expired: &mut Vec<Vec<u8>>, report: &mut SweepReport| -> Result<(), Error> {
            if expired.is_empty() {
                return Ok(());
            }
            report.deleted += expired.len() as u64;
            let batch = StoreBatch { ops: expired.drain(..).map(|key| Op::DeleteRaw { key }).collect() };
            runtime.block_on(async {
                let ticket = self.commit(batch).await?;
                ticket.await.map_err(|_| Error::Unavailable("storage writer stopped".into()))?
            })
        };
        // Point keys expire relative to their partition's clock, not to the wall clock.
        let mut oldest_accepted: FastMap<(u16, u64), u64> = FastMap::default();
        for entry in self.data.scan_prefix([codec::CLOCK]) {
            let (key, value) = entry.map_err(|e| storage_error("sweep scan", e))?;
            let vnode = u16::from_be_bytes(key[1..3].try_into().map_err(|_| corrupt("clock key"))?);
            let partition = u64::from_be_bytes(key[3..11].try_into().map_err(|_| corrupt("clock key"))?);
            let clock = codec::decode_clock(&value).map_err(corrupt)?;
            let oldest = clock.newest_minute_ns.map_or(0, |newest| newest.saturating_sub(cutoffs.lateness_ns));
            oldest_accepted.insert((vnode, partition), oldest);
        }
        for (tag, cutoff) in [
            (Resolution::Minute.tag(), cutoffs.minute),
            (Resolution::Hour.tag(), cutoffs.hour),
            (Resolution::Day.tag(), cutoffs.day),
            (LOG, cutoffs.logs_ns),
            (LOG_BATCH, cutoffs.log_batches_ns),
            (POINT_KEY, 0),
        ] {
            for entry in self.data.scan_prefix([tag]) {
                let (key, value) = entry.map_err(|e| storage_error("sweep scan", e))?;
                report.examined += 1;
                let is_expired = match tag {
                    LOG => codec::log_key_time(&key).is_some_and(|t| t < cutoff),
                    LOG_BATCH => value.as_ref().try_into().ok().map(u64::from_be_bytes).is_some_and(|t| t < cutoff),
                    POINT_KEY => codec::point_key_parts(&key).is_some_and(|parts| {
                        oldest_accepted
                            .get(&(parts.vnode, parts.partition))
                            .is_some_and(|oldest| parts.time_ns < *oldest)
                    }),
                    _ => codec::state_key_period(&key).is_some_and(|t| t < cutoff),
                };
                if is_expired {
                    expired.push(key.to_vec());
                    if expired.len() >= SWEEP_CHUNK {
                        flush(&mut expired, &mut report)?;
                    }
                }
            }
        }
        flush(&mut expired, &mut report)?;
        Ok(report)
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn bounds(&self, hash: u64) -> Option<Bounds> {
        self.resolve_bounds(hash)
    }

    fn export_vnode(&self, vnode: u16, sink: &mut super::ChunkSink<'_>) -> Result<(), Error> {
        let prefixes = super::handoff::STATE_TAGS.iter().map(|tag| codec::vnode_prefix(*tag, vnode));
        self.export(prefixes, sink)
    }

    fn export_all(&self, sink: &mut super::ChunkSink<'_>) -> Result<(), Error> {
        self.export(std::iter::once(Vec::new()), sink)
    }

    fn held(&self, holder: u64) -> Result<Arc<dyn Storage>, Error> {
        if self.holder.is_some() {
            return Err(Error::Internal("data held for a departed node holds no other node's data".into()));
        }
        Ok(Arc::new(self.held_view(holder)?))
    }

    fn held_holders(&self) -> Result<Vec<u64>, Error> {
        let mut holders: Vec<u64> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|name| std::str::from_utf8(name).ok()?.strip_prefix(HELD_PREFIX)?.parse().ok())
            .collect();
        holders.sort_unstable();
        Ok(holders)
    }

    fn drop_held(&self, holder: u64) -> Result<(), Error> {
        let name = format!("{HELD_PREFIX}{holder}");
        self.db.drop_tree(&name).map_err(|e| storage_error(&format!("dropping tree {name}"), e))?;
        self.db.flush().map_err(|e| storage_error("flush", e))?;
        Ok(())
    }
}

impl SledStorage {
    /// Entries under `prefixes`, in chunks given to `sink`.
    fn export(&self, prefixes: impl Iterator<Item = Vec<u8>>, sink: &mut super::ChunkSink<'_>) -> Result<(), Error> {
        const CHUNK: usize = 2_000;
        let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(CHUNK);
        for prefix in prefixes {
            for entry in self.data.scan_prefix(prefix) {
                let (key, value) = entry.map_err(|e| storage_error("hand-over scan", e))?;
                chunk.push((key.to_vec(), value.to_vec()));
                if chunk.len() >= CHUNK {
                    sink(std::mem::take(&mut chunk))?;
                }
            }
        }
        if !chunk.is_empty() {
            sink(chunk)?;
        }
        Ok(())
    }
}

fn writer_loop(
    db: sled::Db,
    data: sled::Tree,
    meta: sled::Tree,
    mut queue: mpsc::Receiver<WriteRequest>,
    max_batches_per_flush: usize,
    failed: Arc<AtomicBool>,
) {
    let mut group: Vec<WriteRequest> = Vec::with_capacity(max_batches_per_flush);
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < max_batches_per_flush {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut outcome: Result<(), Error> = if failed.load(Ordering::SeqCst) {
            Err(Error::Unavailable("storage has failed; the node is stopping".into()))
        } else {
            Ok(())
        };
        let mut bytes = 0usize;
        for request in group.iter_mut() {
            bytes += request.bytes;
            if outcome.is_err() {
                break;
            }
            let data = request.tree.as_ref().unwrap_or(&data);
            let data_batch = std::mem::take(&mut request.data);
            if request.has_meta {
                // Data and metadata (hand-over markers) change together or not at all.
                let meta_batch = std::mem::take(&mut request.meta);
                let applied = (data, &meta).transaction(|(data, meta)| {
                    data.apply_batch(&data_batch)?;
                    meta.apply_batch(&meta_batch)?;
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                });
                if let Err(e) = applied {
                    outcome = Err(storage_error("apply", format!("{e:?}")));
                    break;
                }
            } else if let Err(e) = data.apply_batch(data_batch) {
                outcome = Err(storage_error("apply", e));
                break;
            }
        }
        if outcome.is_ok() {
            if let Err(e) = db.flush() {
                outcome = Err(storage_error("flush", e));
            }
        }
        if let Err(e) = &outcome {
            if !failed.swap(true, Ordering::SeqCst) {
                error!(error = %e, "storage write failed: no further writes are accepted");
            }
        }
        metrics::histogram!(m::COMMIT_BATCHES_PER_FLUSH).record(group.len() as f64);
        metrics::histogram!(m::COMMIT_BYTES_PER_FLUSH).record(bytes as f64);
        metrics::histogram!(m::COMMIT_FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
        for request in group.drain(..) {
            let _ = request.done.send(outcome.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_rules::{Entity, Fixed, SeriesKey};

    fn storage(dir: &Path) -> SledStorage {
        SledStorage::open(dir, 8 * 1024 * 1024, 64, 16).unwrap()
    }

    fn state(count: u64) -> Aggregate {
        let bounds: Bounds = Arc::from(vec![1.0, 2.0]);
        Aggregate {
            count,
            sum: Fixed::from_int(count as i64),
            bounds,
            buckets: vec![count, 0, 0],
            ..Aggregate::empty()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_committed_batches_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key =
            SeriesKey { entity: Entity::new("gw", Some("pod")), metric: "m".into(), attributes: Default::default() };
        let id = key.id();
        {
            let store = storage(dir.path());
            let mut batch = StoreBatch::default();
            batch.push(Op::Series { vnode: 3, partition: 9, id, key: key.clone() });
            batch.push(Op::PointKey { vnode: 3, partition: 9, id, key: PointKey { time_ns: 50, start_ns: 40 } });
            batch.push(Op::PointKey { vnode: 3, partition: 9, id, key: PointKey { time_ns: 70, start_ns: 60 } });
            batch.push(Op::RolledUntil { vnode: 3, partition: 9, minute: 600 });
            for minute in 10..13 {
                batch.push(Op::State {
                    vnode: 3,
                    id,
                    resolution: Resolution::Minute,
                    period: minute,
                    state: state(minute),
                });
            }
            batch.push(Op::Meta { key: "k".into(), value: b"v".to_vec() });
            store.commit(batch).await.unwrap().await.unwrap().unwrap();
        }
        let store = storage(dir.path());
        assert_eq!(store.series(3, 9, id).unwrap(), Some(key));
        assert_eq!(store.series_of_partition(3, 9).unwrap().len(), 1);
        let cursor = store.cursor(3, 9, id, 60).unwrap();
        assert_eq!(cursor.seen.iter().copied().collect::<Vec<_>>(), vec![PointKey { time_ns: 70, start_ns: 60 }]);
        assert!(cursor.baseline.is_none());
        assert_eq!(store.rolled_until(3, 9).unwrap(), 600);
        assert_eq!(store.rolled_until(3, 10).unwrap(), 0);
        let states = store.states(3, id, Resolution::Minute, 11, 13).unwrap();
        assert_eq!(states.iter().map(|(p, s)| (*p, s.count)).collect::<Vec<_>>(), vec![(11, 11), (12, 12)]);
        assert_eq!(store.state(3, id, Resolution::Minute, 10).unwrap(), Some(state(10)));
        assert_eq!(store.meta("k").unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_logs_newest_first_with_cursor_and_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = storage(dir.path());
        let log = |time_ns: u64, fingerprint: u128| StoredLog {
            time_ns,
            fingerprint,
            service: "gw".into(),
            instance: None,
            kind: tollgate_rules::LogKind::Llm,
            reasons: vec!["error".into()],
            model: None,
            provider: None,
            input_tokens: None,
            output_tokens: None,
            total_tokens: None,
            cost: None,
            response_code: Some(500),
            duration_ms: None,
            session_id: None,
            attributes: vec![],
            body: None,
        };
        let mut batch = StoreBatch::default();
        for (time, fingerprint) in [(100, 1), (200, 2), (200, 3), (300, 4)] {
            batch.push(Op::Log { vnode: 0, partition: 5, log: log(time, fingerprint) });
        }
        batch.push(Op::Log { vnode: 0, partition: 6, log: log(250, 9) });
        store.commit(batch).await.unwrap().await.unwrap().unwrap();
        let page = store.logs(0, 5, 0, None, 2).unwrap();
        assert_eq!(page.iter().map(|l| l.fingerprint).collect::<Vec<_>>(), vec![4, 3]);
        let next = store.logs(0, 5, 0, Some(LogPosition { time_ns: 200, fingerprint: 3 }), 10).unwrap();
        assert_eq!(next.iter().map(|l| l.fingerprint).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(store.logs(0, 5, 150, None, 10).unwrap().len(), 3);
        let cutoffs = RetentionCutoffs { minute: 0, hour: 0, day: 0, logs_ns: 201, log_batches_ns: 0, lateness_ns: 0 };
        let report =
            tokio::task::spawn_blocking(move || store.sweep(cutoffs).map(|r| (r, store))).await.unwrap().unwrap();
        assert_eq!(report.0.deleted, 3);
        assert_eq!(report.1.logs(0, 5, 0, None, 10).unwrap().len(), 1);
    }
}
