//! [`Storage`] on sled 0.34: a write-ahead log and a memtable in front of the data tree (see
//! [`super::memtable`]), one group-commit writer thread and one checkpointer thread.
//!
//! The writer thread takes every batch waiting, appends them to the write-ahead log file (each
//! request one frame, see [`super::wal`]), puts them into the memtable, syncs the file once, and
//! then completes all their tickets. Under load one sync covers many requests; alone, a request
//! waits for one sync. When the previous group held more than one request, the writer first
//! waits `storage.commit_delay_us` for more, so that concurrent requests share fewer syncs
//! (each costs CPU as well as time on a virtual machine's disk).
//!
//! sled is durable only after `flush()`, and concurrent flushes can deadlock on 0.34.7, so they
//! are serialised by a lock: the checkpointer flushes after each chunk it applies from a frozen
//! layer to the data tree (then the writer removes the checkpointed generation's file); the
//! writer flushes only after writing a departed node's tree, which bypasses the log.

use super::codec::{self, ENTITY, LOG, LOG_BATCH, SERIES};
use super::memtable::{self, Entry, Frozen, Lookup, Memtable, Merged};
use super::wal::{self, WalFile};
use super::{
    CommitTicket, EntityRecord, LogPosition, Op, Resolution, RetentionCutoffs, Storage, StoreBatch, StoredLog,
    SweepReport,
};
use crate::config::StorageConfig;
use crate::error::Error;
use crate::metrics as m;
use sled::Transactional;
use std::future::Future;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tollgate_cluster::raft_store::{sled_lock_held, SLED_LOCK_WAIT};
use tollgate_rules::normalize::{PartitionClock, SeriesCursor};
use tollgate_rules::series::FastMap;
use tollgate_rules::{Aggregate, Bounds, SeriesId, SeriesKey};
use tracing::{error, info, warn};

/// Keys deleted per retention batch.
const SWEEP_CHUNK: usize = 10_000;

/// Memtable entries copied at a time by a walk over a prefix ([`SledStorage::prefixed`]). The
/// retention sweep walks every minute state: copied whole, the memtable's share of them was a
/// transient of about 100 MB in a heap profile of figure 5's load
/// (docs/benchmarks-history.md, step 33).
const SCAN_CHUNK: usize = 4_096;

/// Entries per sled batch when a checkpoint writes the data tree. The checkpointer flushes sled
/// after each: with one flush per checkpoint instead, the node's memory after figure 5's load of
/// docs/benchmarks-history.md (step 8) was 3.2–3.8 GB instead of 1.4–2.3 GB (alternating runs), at
/// the same throughput.
const CHECKPOINT_CHUNK: usize = 4_096;

struct WriteRequest {
    /// The tree `entries` go to, when not the node's own data tree (data held for a departed
    /// node: written directly, without the write-ahead log).
    tree: Option<sled::Tree>,
    entries: Vec<Entry>,
    /// Entries of the metadata tree, written together with `entries`.
    meta: Vec<Entry>,
    bytes: usize,
    done: oneshot::Sender<Result<(), Error>>,
}

/// What the writer's queue carries.
enum WriterMsg {
    Write(WriteRequest),
    /// Nothing to write: look at the checkpoint (one finished, or one is due by age).
    Wake,
}

/// Name prefix of the trees holding departed nodes' data.
const HELD_PREFIX: &str = "held-";

/// Name prefix of the sled trees an earlier version kept its write-ahead log in; read back once
/// at open.
const LEGACY_WAL_PREFIX: &str = "wal-";

/// Serialises sled flushes (concurrent flushes can deadlock on sled 0.34.7).
type FlushLock = Arc<Mutex<()>>;

fn flush(db: &sled::Db, lock: &FlushLock) -> Result<(), Error> {
    let _serialised = lock.lock().expect("flush lock");
    db.flush().map(|_| ()).map_err(|e| storage_error("flush", e))
}

/// sled-backed storage: the node's own data, or (a view sharing the writer) the data it holds
/// for a departed node.
pub struct SledStorage {
    db: sled::Db,
    data: sled::Tree,
    /// Writes not yet checkpointed into `data`; `None` for a departed node's data.
    memtable: Option<Arc<Memtable>>,
    /// For a view on a departed node's data: that node.
    holder: Option<u64>,
    meta: sled::Tree,
    /// Bounds known to be stored (or in a batch ahead of any batch using them).
    bounds: RwLock<FastMap<u64, Bounds>>,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<WriterMsg>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    checkpointer_thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<AtomicBool>,
}

impl Drop for SledStorage {
    /// Closes the writer's queue and waits for it to finish what was queued, so that the data
    /// directory is released (and everything queued is flushed) when the store is gone. A
    /// checkpoint in progress is left to the next open, which reads its generation back.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.checkpointer_thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStorage").field("failed", &self.failed.load(Ordering::Relaxed)).finish()
    }
}

/// Opens sled in `<dir>/sled`, waiting up to [`SLED_LOCK_WAIT`] for its lock.
fn open_sled(dir: &Path, settings: &StorageConfig) -> Result<sled::Db, Error> {
    let started = Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(settings.cache_capacity_bytes)
            // Only the writer thread flushes (see the module comment).
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(e) if sled_lock_held(&e) => {
                if started.elapsed() >= SLED_LOCK_WAIT {
                    return Err(Error::Unavailable(format!(
                        "storage: the data directory {} is in use by another process (its lock is held): {e}",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(storage_error(&format!("opening {}", dir.display()), e)),
        }
    }
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Internal(format!("corrupt store: {what}"))
}

fn storage_error(context: &str, error: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("storage: {context}: {error}"))
}

/// A frozen memtable on its way into the data tree, with the write-ahead generations it covers.
struct Checkpoint {
    frozen: Arc<Frozen>,
    generations: Vec<u64>,
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`, reads back the write-ahead generations a previous
    /// run left (and starts checkpointing them), and starts the writer and checkpointer threads.
    pub fn open(dir: &Path, settings: &StorageConfig) -> Result<SledStorage, Error> {
        std::fs::create_dir_all(dir).map_err(|e| storage_error(&format!("creating {}", dir.display()), e))?;
        let db = open_sled(dir, settings)?;
        let data = db.open_tree("data").map_err(|e| storage_error("opening tree data", e))?;
        let meta = db.open_tree("meta").map_err(|e| storage_error("opening tree meta", e))?;
        let flush_lock = FlushLock::default();
        read_legacy_wal(&db, &data, &flush_lock)?;
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(|e| storage_error(&format!("creating {}", wal_dir.display()), e))?;
        let memtable = Arc::new(Memtable::default());
        let started = Instant::now();
        let (replayed, generation) = replay(&wal_dir, &meta)?;
        if let Some(checkpoint) = &replayed {
            memtable.push_frozen(Arc::clone(&checkpoint.frozen));
            info!(
                generations = checkpoint.generations.len(),
                entries = checkpoint.frozen.entries.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "write-ahead log read back"
            );
        }
        let wal =
            WalFile::create(&wal_dir, generation).map_err(|e| storage_error("creating a write-ahead generation", e))?;
        let (writer, queue) = mpsc::channel(settings.writer_queue_capacity);
        let (jobs, job_queue) = std::sync::mpsc::sync_channel::<Arc<Frozen>>(1);
        let (done, done_queue) = std::sync::mpsc::channel::<Result<(), Error>>();
        let failed = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_millis(settings.checkpoint_interval_ms);
        let checkpointer_thread = {
            let (db, data, flush_lock) = (db.clone(), data.clone(), Arc::clone(&flush_lock));
            let wake = writer.downgrade();
            let tick = (interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
            std::thread::Builder::new()
                .name("tollgate-checkpoint".into())
                .spawn(move || checkpointer_loop(&db, &data, &flush_lock, job_queue, done, wake, tick))
                .map_err(|e| storage_error("starting the checkpointer thread", e))?
        };
        let mut state = WriterState {
            db: db.clone(),
            meta: meta.clone(),
            flush_lock,
            memtable: Arc::clone(&memtable),
            wal_dir,
            wal,
            wal_started: Instant::now(),
            in_flight: None,
            jobs,
            done: done_queue,
            checkpoint_bytes: settings.checkpoint_bytes as usize,
            interval,
            failed: Arc::clone(&failed),
        };
        if let Some(checkpoint) = replayed {
            state.start(checkpoint);
        }
        let max_batches_per_flush = settings.max_batches_per_flush;
        let commit_delay = Duration::from_micros(settings.commit_delay_us);
        let writer_thread = std::thread::Builder::new()
            .name("tollgate-writer".into())
            .spawn(move || writer_loop(state, queue, max_batches_per_flush, commit_delay))
            .map_err(|e| storage_error("starting the writer thread", e))?;
        info!(dir = %dir.display(), "store opened");
        Ok(SledStorage {
            db,
            data,
            memtable: Some(memtable),
            holder: None,
            meta,
            bounds: RwLock::new(FastMap::default()),
            writer: Some(writer),
            writer_thread: Some(writer_thread),
            checkpointer_thread: Some(checkpointer_thread),
            failed,
        })
    }

    fn held_view(&self, holder: u64) -> Result<SledStorage, Error> {
        let name = format!("{HELD_PREFIX}{holder}");
        let data = self.db.open_tree(&name).map_err(|e| storage_error(&format!("opening tree {name}"), e))?;
        Ok(SledStorage {
            db: self.db.clone(),
            data,
            memtable: None,
            holder: Some(holder),
            meta: self.meta.clone(),
            bounds: RwLock::new(FastMap::default()),
            writer: self.writer.clone(),
            writer_thread: None,
            checkpointer_thread: None,
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
        let bytes = self.get(&codec::bounds_key(hash)).ok()??;
        let values: Vec<f64> = codec::decode("bounds", &bytes).ok()?;
        let bounds: Bounds = Arc::from(values);
        self.bounds.write().expect("bounds lock").insert(hash, Arc::clone(&bounds));
        Some(bounds)
    }

    fn encode(&self, batch: StoreBatch) -> (Vec<Entry>, Vec<Entry>, usize) {
        let mut data: Vec<Entry> = Vec::with_capacity(batch.ops.len());
        let mut meta: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let put = |entries: &mut Vec<Entry>, key: Vec<u8>, value: Vec<u8>, bytes: &mut usize| {
            *bytes += key.len() + value.len();
            entries.push((key, Some(value)));
        };
        for op in batch.ops {
            match op {
                Op::Series { vnode, partition, id, key } => {
                    put(&mut data, codec::series_key(vnode, partition, id), codec::encode(&key), &mut bytes)
                }
                Op::Cursor { vnode, partition, id, cursor } => {
                    if let Some((hash, bounds)) = &cursor.bounds {
                        self.intern_bounds(*hash, bounds, &mut data, &mut bytes);
                    }
                    put(&mut data, codec::cursor_key(vnode, partition, id), cursor.bytes, &mut bytes)
                }
                Op::RolledUntil { vnode, partition, minute } => {
                    put(&mut data, codec::rolled_until_key(vnode, partition), minute.to_be_bytes().to_vec(), &mut bytes)
                }
                Op::Clock { vnode, partition, clock } => {
                    put(&mut data, codec::clock_key(vnode, partition), codec::encode(&clock), &mut bytes)
                }
                Op::LogClock { vnode, partition, clock } => {
                    put(&mut data, codec::log_clock_key(vnode, partition), codec::encode(&clock), &mut bytes)
                }
                Op::State { vnode, id, resolution, period, state } => {
                    let (value, hash) = codec::encode_state(&state);
                    if let Some(hash) = hash {
                        self.intern_bounds(hash, &state.bounds, &mut data, &mut bytes);
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
                    bytes += key.len() + value.len();
                    meta.push((key.into_bytes(), Some(value)));
                }
                Op::DeleteRaw { key } => {
                    bytes += key.len();
                    data.push((key, None));
                }
                Op::PutRaw { key, value } => put(&mut data, key, value, &mut bytes),
                Op::DeleteMeta { key } => {
                    bytes += key.len();
                    meta.push((key.into_bytes(), None));
                }
            }
        }
        (data, meta, bytes)
    }

    /// Stores `bounds` under `hash` in the same atomic batch as its first user.
    fn intern_bounds(&self, hash: u64, bounds: &Bounds, data: &mut Vec<Entry>, bytes: &mut usize) {
        if self.bounds.read().expect("bounds lock").contains_key(&hash) {
            return;
        }
        let value = codec::encode(&bounds.to_vec());
        let key = codec::bounds_key(hash);
        *bytes += key.len() + value.len();
        data.push((key, Some(value)));
        self.bounds.write().expect("bounds lock").insert(hash, Arc::clone(bounds));
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if let Some(memtable) = &self.memtable {
            match memtable.get(key) {
                Lookup::Value(value) => return Ok(Some(value)),
                Lookup::Deleted => return Ok(None),
                Lookup::Absent => {}
            }
        }
        Ok(self.data.get(key).map_err(|e| storage_error("get", e))?.map(|value| value.to_vec()))
    }

    /// Entries with `from <= key < to` (`to = None`: to the end), the memtable's over the data
    /// tree's, ascending or (`reverse`) descending.
    fn entries(
        &self,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), Error>> + '_ {
        // An end before the start is an empty range (a log cursor from before a query's start),
        // where the trees' ranges would panic.
        let to = to.map(|to| to.max(from.clone()));
        let overlay = self.overlay(&from, to.as_deref(), usize::MAX);
        let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
        let tree = self.data.range::<Vec<u8>, _>((Bound::Included(from), upper));
        let tree: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if reverse { Box::new(tree.rev()) } else { Box::new(tree) };
        Merged::new(tree, overlay, reverse).map(|entry| entry.map_err(|e| storage_error("range", e)))
    }

    /// The memtable's first `limit` entries with `from <= key < to` (`to = None`: to the end).
    fn overlay(&self, from: &[u8], to: Option<&[u8]>, limit: usize) -> Vec<memtable::Entry> {
        match &self.memtable {
            Some(memtable) => {
                memtable.range(Bound::Included(from), to.map_or(Bound::Unbounded, Bound::Excluded), limit)
            }
            None => Vec::new(),
        }
    }

    /// Entries whose key starts with `prefix`, ascending.
    fn prefixed(&self, prefix: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), Error>> + '_ {
        self.walk(prefix.to_vec(), memtable::prefix_end(prefix), SCAN_CHUNK)
    }

    /// Entries with `from <= key < to` (`to = None`: to the end), ascending, as
    /// [`SledStorage::entries`] gives them, but with the memtable copied at most `chunk` keys
    /// at a time: each piece of the walk merges the memtable's next `chunk` keys with the data
    /// tree's keys up to the last of them (or to `to`, when fewer are left).
    fn walk(
        &self,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        chunk: usize,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), Error>> + '_ {
        let chunk = chunk.max(1);
        let mut next = Some(from);
        std::iter::from_fn(move || {
            let start = next.take()?;
            let overlay = self.overlay(&start, to.as_deref(), chunk);
            let upper = match overlay.last() {
                Some((last, _)) if overlay.len() == chunk => {
                    next = Some(memtable::key_after(last));
                    Bound::Included(last.clone())
                }
                _ => to.clone().map_or(Bound::Unbounded, Bound::Excluded),
            };
            Some(Merged::new(self.data.range::<Vec<u8>, _>((Bound::Included(start), upper)), overlay, false))
        })
        .flatten()
        .map(|entry| entry.map_err(|e| storage_error("range", e)))
    }

    /// Deletes the keys of `tag` older than their group's cut-off (`cutoff_of` the group; their
    /// time read by `time_of`), for keys made of a group (their first `group_len` bytes: a
    /// series, a partition) and a big-endian time: per group, one read of its oldest key, and
    /// the expired keys after it if it is one.
    fn sweep_groups(
        &self,
        tag: u8,
        group_len: usize,
        cutoff_of: &dyn Fn(&[u8]) -> u64,
        time_of: fn(&[u8]) -> Option<u64>,
        deleter: &mut Deleter<'_>,
    ) -> Result<(), Error> {
        let end = memtable::prefix_end(&[tag]);
        let mut from = vec![tag];
        loop {
            let Some(oldest) = self.walk(from, end.clone(), 1).next() else { return Ok(()) };
            let (oldest, _) = oldest?;
            let cutoff = oldest.get(..group_len).map_or(0, cutoff_of);
            let next = match time_of(&oldest) {
                // A key of another shape (none is written): skipped alone.
                None => {
                    deleter.report.examined += 1;
                    Some(memtable::key_after(&oldest))
                }
                // Nothing of this group has expired.
                Some(time) if time >= cutoff => {
                    deleter.report.examined += 1;
                    memtable::prefix_end(&oldest[..group_len])
                }
                Some(_) => {
                    let group = oldest[..group_len].to_vec();
                    let upto = [group.as_slice(), &cutoff.to_be_bytes()].concat();
                    for entry in self.walk(oldest, Some(upto), SCAN_CHUNK) {
                        let (key, _) = entry?;
                        deleter.report.examined += 1;
                        if time_of(&key).is_some_and(|time| time < cutoff) {
                            deleter.delete(key)?;
                        }
                    }
                    memtable::prefix_end(&group)
                }
            };
            match next {
                Some(next) => from = next,
                None => return Ok(()),
            }
        }
    }

    /// The roll-up frontier (the first minute not rolled up) of each series' partition, by the
    /// series' aggregate group without its tag (vnode, series id).
    fn minute_frontiers(&self) -> Result<FastMap<[u8; 18], u64>, Error> {
        let partition_of =
            |key: &[u8]| -> Option<[u8; 10]> { key.get(1..codec::PARTITION_PREFIX_LEN)?.try_into().ok() };
        let mut partitions: FastMap<[u8; 10], u64> = FastMap::default();
        for entry in self.prefixed(&[codec::ROLLED_UNTIL]) {
            let (key, value) = entry?;
            if let (Some(partition), Ok(minute)) = (partition_of(&key), <[u8; 8]>::try_from(value.as_slice())) {
                partitions.insert(partition, u64::from_be_bytes(minute));
            }
        }
        let mut frontiers = FastMap::default();
        for entry in self.prefixed(&[codec::SERIES]) {
            let (key, _) = entry?;
            let id = key.get(codec::PARTITION_PREFIX_LEN..).filter(|id| id.len() == 16);
            let (Some(partition), Some(id)) = (partition_of(&key), id) else { continue };
            let mut group = [0u8; 18];
            group[..2].copy_from_slice(&key[1..3]);
            group[2..].copy_from_slice(id);
            frontiers.insert(group, partitions.get(&partition).copied().unwrap_or_default());
        }
        Ok(frontiers)
    }

    fn scan<T>(
        &self,
        prefix: Vec<u8>,
        mut decode: impl FnMut(&[u8], &[u8]) -> Result<T, String>,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for entry in self.prefixed(&prefix) {
            let (key, value) = entry?;
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
            let (entries, meta, bytes) = self.encode(batch);
            let writer = self.writer.as_ref().ok_or_else(|| Error::Unavailable("storage is closing".into()))?;
            let tree = self.holder.map(|_| self.data.clone());
            writer
                .send(WriterMsg::Write(WriteRequest { tree, entries, meta, bytes, done }))
                .await
                .map_err(|_| Error::Unavailable("storage writer stopped".into()))?;
            Ok(ticket)
        })
    }

    fn series(&self, vnode: u16, partition: u64, id: SeriesId) -> Result<Option<SeriesKey>, Error> {
        let Some(bytes) = self.get(&codec::series_key(vnode, partition, id))? else { return Ok(None) };
        codec::decode_series(&bytes).map(Some).map_err(corrupt)
    }

    fn series_of_partition(&self, vnode: u16, partition: u64) -> Result<Vec<SeriesKey>, Error> {
        self.scan(codec::partition_prefix(SERIES, vnode, partition), |_, value| codec::decode_series(value))
    }

    fn series_ids_of_partition(&self, vnode: u16, partition: u64) -> Result<Vec<SeriesId>, Error> {
        self.scan(codec::partition_prefix(SERIES, vnode, partition), |key, _| codec::series_key_id(key))
    }

    fn cursor(&self, vnode: u16, partition: u64, id: SeriesId, since_ns: u64) -> Result<SeriesCursor, Error> {
        let Some(bytes) = self.get(&codec::cursor_key(vnode, partition, id))? else {
            return Ok(SeriesCursor::default());
        };
        codec::decode_cursor(&bytes, since_ns, |hash| self.resolve_bounds(hash)).map_err(corrupt)
    }

    fn clock(&self, vnode: u16, partition: u64) -> Result<Option<PartitionClock>, Error> {
        let Some(bytes) = self.get(&codec::clock_key(vnode, partition))? else { return Ok(None) };
        codec::decode_clock(&bytes).map(Some).map_err(corrupt)
    }

    fn rolled_until(&self, vnode: u16, partition: u64) -> Result<u64, Error> {
        let Some(bytes) = self.get(&codec::rolled_until_key(vnode, partition))? else { return Ok(0) };
        let array: [u8; 8] = bytes.as_slice().try_into().map_err(|_| corrupt("roll-up frontier"))?;
        Ok(u64::from_be_bytes(array))
    }

    fn clocks_of_vnode(&self, vnode: u16) -> Result<Vec<(u64, PartitionClock)>, Error> {
        self.scan(codec::vnode_prefix(codec::CLOCK, vnode), |key, value| {
            Ok((codec::key_partition(key).map_err(|e| format!("clock {e}"))?, codec::decode_clock(value)?))
        })
    }

    fn log_clock(&self, vnode: u16, partition: u64) -> Result<Option<PartitionClock>, Error> {
        let Some(bytes) = self.get(&codec::log_clock_key(vnode, partition))? else { return Ok(None) };
        codec::decode_clock(&bytes).map(Some).map_err(corrupt)
    }

    fn log_clocks_of_vnode(&self, vnode: u16) -> Result<Vec<(u64, PartitionClock)>, Error> {
        self.scan(codec::vnode_prefix(codec::LOG_CLOCK, vnode), |key, value| {
            Ok((codec::key_partition(key).map_err(|e| format!("log clock {e}"))?, codec::decode_clock(value)?))
        })
    }

    fn state(&self, vnode: u16, id: SeriesId, resolution: Resolution, period: u64) -> Result<Option<Aggregate>, Error> {
        let key = codec::state_key(vnode, id, resolution, period);
        let Some(bytes) = self.get(&key)? else { return Ok(None) };
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
        for entry in self.entries(start, Some(end), false) {
            let (key, value) = entry?;
            let period =
                codec::state_key_period(&key).ok_or_else(|| Error::Internal("corrupt store: state key".into()))?;
            let state = codec::decode_state(&value, |hash| self.resolve_bounds(hash))
                .map_err(|e| Error::Internal(format!("corrupt store: {e}")))?;
            out.push((period, state));
        }
        Ok(out)
    }

    fn entities(&self) -> Result<Vec<(u64, EntityRecord)>, Error> {
        self.scan(vec![ENTITY], |key, value| Ok((codec::entity_key_partition(key)?, codec::decode_entity(value)?)))
    }

    fn logs(
        &self,
        vnode: u16,
        partition: u64,
        from_ns: u64,
        before: Option<LogPosition>,
        limit: usize,
        max_bytes: usize,
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
        let mut bytes = 0;
        for entry in self.entries(start, Some(end), true) {
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
            let (_, value) = entry?;
            let log = codec::decode_log(&value).map_err(|e| Error::Internal(format!("corrupt store: {e}")))?;
            bytes += log.approximate_bytes();
            out.push(log);
        }
        Ok(out)
    }

    fn newest_log_time(&self, vnode: u16, partition: u64) -> Result<u64, Error> {
        if partition == u64::MAX {
            // No upper key: every time may be stored.
            return Ok(u64::MAX);
        }
        let start = codec::partition_prefix(LOG, vnode, partition);
        let end = codec::partition_prefix(LOG, vnode, partition + 1);
        match self.entries(start, Some(end), true).next() {
            None => Ok(0),
            Some(entry) => {
                let (key, _) = entry?;
                codec::log_key_time(&key)
                    .ok_or_else(|| Error::Internal("corrupt store: a log key of another length".into()))
            }
        }
    }

    fn has_log(&self, vnode: u16, partition: u64, time_ns: u64, fingerprint: u128) -> Result<bool, Error> {
        Ok(self.get(&codec::log_key(vnode, partition, time_ns, fingerprint))?.is_some())
    }

    fn log_batches(&self, vnode: u16) -> Result<Vec<(u128, u64)>, Error> {
        self.scan(codec::vnode_prefix(LOG_BATCH, vnode), |key, value| {
            let fingerprint = codec::log_batch_key_fingerprint(key)?;
            let time = u64::from_be_bytes(value.try_into().map_err(|_| "bad log batch value".to_string())?);
            Ok((fingerprint, time))
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.meta.get(key.as_bytes()).map_err(|e| storage_error("get meta", e))?.map(|v| v.to_vec()))
    }

    fn sweep(&self, cutoffs: RetentionCutoffs) -> Result<SweepReport, Error> {
        let mut deleter = Deleter { store: self, expired: Vec::new(), report: SweepReport::default() };
        // Aggregates are keyed series first, then period; kept logs partition first, then time.
        // So each group's expired keys come first, and the sweep reads those and jumps to the
        // next group instead of reading every key it keeps (three days of minute states are
        // 4 320 keys per series).
        let time_of_state: fn(&[u8]) -> Option<u64> = codec::state_key_period;
        // A minute goes only once it is rolled up into its hour and day: a point of a minute
        // already past retention (the first of a new partition may be of any age) is merged as
        // a minute, and would be lost to its hour and day if the sweep came before the roll-up.
        // The owners roll a minute up within a maintenance pass of it being half its retention
        // old. `minute_unrolled` bounds what nothing rolls up (data of earlier versions, a
        // partition whose roll-up keeps failing); series written after the frontiers were read
        // are kept down to it too.
        let frontiers = self.minute_frontiers()?;
        let minute_cutoff = |group: &[u8]| match <[u8; 18]>::try_from(&group[1..]).ok().and_then(|g| frontiers.get(&g))
        {
            Some(&frontier) => cutoffs.minute.min(frontier).max(cutoffs.minute_unrolled),
            None => cutoffs.minute_unrolled.min(cutoffs.minute),
        };
        let fixed = |cutoff: u64| move |_: &[u8]| cutoff;
        self.sweep_groups(
            Resolution::Minute.tag(),
            codec::STATE_GROUP_LEN,
            &minute_cutoff,
            time_of_state,
            &mut deleter,
        )?;
        for (tag, group_len, cutoff, time_of) in [
            (Resolution::Hour.tag(), codec::STATE_GROUP_LEN, cutoffs.hour, time_of_state),
            (Resolution::Day.tag(), codec::STATE_GROUP_LEN, cutoffs.day, time_of_state),
            (LOG, codec::LOG_GROUP_LEN, cutoffs.logs_ns, codec::log_key_time),
        ] {
            self.sweep_groups(tag, group_len, &fixed(cutoff), time_of, &mut deleter)?;
        }
        // Log-batch fingerprints are keyed by fingerprint, with their time in the value: all are
        // read (a lateness window's worth).
        for entry in self.prefixed(&[LOG_BATCH]) {
            let (key, value) = entry?;
            deleter.report.examined += 1;
            if value.as_slice().try_into().ok().map(u64::from_be_bytes).is_some_and(|t| t < cutoffs.log_batches_ns) {
                deleter.delete(key)?;
            }
        }
        deleter.flush()?;
        Ok(deleter.report)
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn bounds(&self, hash: u64) -> Option<Bounds> {
        self.resolve_bounds(hash)
    }

    fn export_vnode(&self, vnode: u16, sink: &mut super::ChunkSink<'_>) -> Result<(), Error> {
        let prefixes = super::handoff::STATE_TAGS.iter().map(|tag| codec::vnode_prefix(*tag, vnode));
        // Baselines refer to their bounds by hash: the (few) interned bound lists go along.
        self.export(prefixes.chain(std::iter::once(vec![codec::BOUNDS])), sink)
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
        // Not flushed here: the next flush (a checkpoint's) makes the drop durable. Until then a
        // crash brings the tree back, and callers drop it again (both callers are idempotent).
        self.db.drop_tree(&name).map_err(|e| storage_error(&format!("dropping tree {name}"), e))?;
        Ok(())
    }
}

impl SledStorage {
    /// Entries under `prefixes`, in chunks given to `sink`.
    fn export(&self, prefixes: impl Iterator<Item = Vec<u8>>, sink: &mut super::ChunkSink<'_>) -> Result<(), Error> {
        const CHUNK: usize = 2_000;
        let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(CHUNK);
        for prefix in prefixes {
            for entry in self.prefixed(&prefix) {
                chunk.push(entry?);
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

/// The retention sweep's deletions, committed [`SWEEP_CHUNK`] keys at a time.
struct Deleter<'a> {
    store: &'a SledStorage,
    expired: Vec<Vec<u8>>,
    report: SweepReport,
}

impl Deleter<'_> {
    fn delete(&mut self, key: Vec<u8>) -> Result<(), Error> {
        self.expired.push(key);
        if self.expired.len() >= SWEEP_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.expired.is_empty() {
            return Ok(());
        }
        self.report.deleted += self.expired.len() as u64;
        let batch = StoreBatch { ops: self.expired.drain(..).map(|key| Op::DeleteRaw { key }).collect() };
        tokio::runtime::Handle::current().block_on(async {
            let ticket = self.store.commit(batch).await?;
            ticket.await.map_err(|_| Error::Unavailable("storage writer stopped".into()))?
        })
    }
}

/// The writer thread's state: the current write-ahead generation and the checkpoint in flight.
struct WriterState {
    db: sled::Db,
    meta: sled::Tree,
    flush_lock: FlushLock,
    memtable: Arc<Memtable>,
    wal_dir: PathBuf,
    /// The current write-ahead generation.
    wal: WalFile,
    wal_started: Instant,
    /// The checkpoint being applied.
    in_flight: Option<Checkpoint>,
    /// The checkpointer's queue of frozen layers.
    jobs: std::sync::mpsc::SyncSender<Arc<Frozen>>,
    done: std::sync::mpsc::Receiver<Result<(), Error>>,
    checkpoint_bytes: usize,
    interval: Duration,
    failed: Arc<AtomicBool>,
}

impl WriterState {
    /// Writes one group, each request atomically, and makes it durable: own-tree requests go to
    /// the write-ahead log (one sync for the group), the memtable and (their metadata) the
    /// metadata tree; a departed node's straight to its tree, then a sled flush.
    fn write(&mut self, group: &mut [WriteRequest]) -> Result<(), Error> {
        let mut meta_batches: Vec<sled::Batch> = Vec::new();
        let mut flush_sled = false;
        for request in group.iter_mut() {
            let entries = std::mem::take(&mut request.entries);
            let meta = std::mem::take(&mut request.meta);
            if let Some(tree) = &request.tree {
                if meta.is_empty() {
                    tree.apply_batch(sled_batch(entries)).map_err(|e| storage_error("apply", e))?;
                } else {
                    self.transaction(tree, sled_batch(entries), sled_batch(meta))?;
                }
                flush_sled = true;
            } else {
                let memtable = &self.memtable;
                let write_data = |payload: &mut Vec<u8>| {
                    memtable.apply_with(entries, |key, previous, value| log_entry(key, previous, value, payload))
                };
                if meta.is_empty() {
                    self.wal.stage_data_with(write_data);
                } else {
                    self.wal.stage_data_and_meta_with(write_data, &meta);
                    meta_batches.push(sled_batch(meta));
                }
            }
        }
        self.wal.sync().map_err(|e| storage_error("write-ahead log", e))?;
        // The log has them: a crash from here on replays them into the metadata tree.
        for batch in meta_batches {
            self.meta.apply_batch(batch).map_err(|e| storage_error("apply meta", e))?;
        }
        if flush_sled {
            flush(&self.db, &self.flush_lock)?;
        }
        Ok(())
    }

    /// Data and metadata (hand-over markers) change together or not at all.
    fn transaction(&self, tree: &sled::Tree, batch: sled::Batch, meta_batch: sled::Batch) -> Result<(), Error> {
        (tree, &self.meta)
            .transaction(|(tree, meta)| {
                tree.apply_batch(&batch)?;
                meta.apply_batch(&meta_batch)?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| storage_error("apply", format!("{e:?}")))
    }

    /// Hands a frozen layer to the checkpointer.
    fn start(&mut self, checkpoint: Checkpoint) {
        let frozen = Arc::clone(&checkpoint.frozen);
        self.in_flight = Some(checkpoint);
        // The channel holds one job and at most one is in flight: this never waits.
        if self.jobs.send(frozen).is_err() {
            self.fail(checkpointer_stopped());
        }
    }

    /// Freezes the memtable, starts the next write-ahead generation and checkpoints the frozen
    /// one.
    fn rotate(&mut self) -> Result<(), Error> {
        let next = WalFile::create(&self.wal_dir, self.wal.generation() + 1)
            .map_err(|e| storage_error("creating a write-ahead generation", e))?;
        let frozen = self.memtable.freeze();
        let generations = vec![std::mem::replace(&mut self.wal, next).generation()];
        self.wal_started = Instant::now();
        self.start(Checkpoint { frozen, generations });
        Ok(())
    }

    /// A checkpoint was applied and flushed: remove its generations and release its layer.
    fn finish(&mut self, outcome: Result<(), Error>) -> Result<(), Error> {
        let Checkpoint { frozen, generations } = self.in_flight.take().expect("a checkpoint in flight");
        outcome?;
        for generation in generations {
            let file = wal::path(&self.wal_dir, generation);
            std::fs::remove_file(&file).map_err(|e| storage_error(&format!("removing {}", file.display()), e))?;
        }
        wal::sync_dir(&self.wal_dir).map_err(|e| storage_error("syncing the write-ahead directory", e))?;
        self.memtable.release(&frozen);
        metrics::counter!(m::STORE_CHECKPOINTS).increment(1);
        Ok(())
    }

    /// After a group: finish a checkpoint that completed, start one that is due. When the log
    /// has grown to twice the checkpoint size while one is still being applied, wait for it:
    /// the memtable's memory stays bounded, and the wait holds the writer's queue back.
    fn checkpoint(&mut self) -> Result<(), Error> {
        if self.in_flight.is_some() {
            match self.done.try_recv() {
                Ok(outcome) => self.finish(outcome)?,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(checkpointer_stopped()),
            }
        }
        let wal_bytes = self.wal.bytes();
        let due = wal_bytes >= self.checkpoint_bytes || (wal_bytes > 0 && self.wal_started.elapsed() >= self.interval);
        if !due {
            return Ok(());
        }
        if self.in_flight.is_some() {
            if wal_bytes < 2 * self.checkpoint_bytes {
                return Ok(());
            }
            let waited = Instant::now();
            let outcome = self.done.recv().map_err(|_| checkpointer_stopped())?;
            metrics::histogram!(m::STORE_CHECKPOINT_WAIT_SECONDS).record(waited.elapsed().as_secs_f64());
            self.finish(outcome)?;
        }
        self.rotate()
    }

    fn fail(&self, e: Error) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            error!(error = %e, "storage write failed: no further writes are accepted");
        }
    }

    fn record_gauges(&self) {
        let (active, frozen) = self.memtable.bytes();
        metrics::gauge!(m::STORE_MEMTABLE_BYTES).set((active + frozen) as f64);
        metrics::gauge!(m::STORE_WAL_BYTES).set(self.wal.bytes() as f64);
    }
}

fn writer_loop(
    mut state: WriterState,
    mut queue: mpsc::Receiver<WriterMsg>,
    max_batches_per_flush: usize,
    commit_delay: Duration,
) {
    let mut group: Vec<WriteRequest> = Vec::with_capacity(max_batches_per_flush);
    // Whether the previous group held more than one batch: only then is waiting for more
    // worth it (a lone writer would only be made later).
    let mut concurrent = false;
    let take_waiting = |group: &mut Vec<WriteRequest>, queue: &mut mpsc::Receiver<WriterMsg>| {
        while group.len() < max_batches_per_flush {
            match queue.try_recv() {
                Ok(WriterMsg::Write(request)) => group.push(request),
                Ok(WriterMsg::Wake) => {}
                Err(_) => break,
            }
        }
    };
    while let Some(first) = queue.blocking_recv() {
        if let WriterMsg::Write(request) = first {
            group.push(request);
        }
        take_waiting(&mut group, &mut queue);
        if concurrent && !commit_delay.is_zero() && !group.is_empty() && group.len() < max_batches_per_flush {
            std::thread::sleep(commit_delay);
            take_waiting(&mut group, &mut queue);
        }
        concurrent = group.len() > 1;
        if !group.is_empty() {
            let started = Instant::now();
            let outcome: Result<(), Error> = if state.failed.load(Ordering::SeqCst) {
                Err(Error::Unavailable("storage has failed; the node is stopping".into()))
            } else {
                state.write(&mut group)
            };
            if let Err(e) = &outcome {
                state.fail(e.clone());
            }
            let bytes: usize = group.iter().map(|request| request.bytes).sum();
            metrics::histogram!(m::COMMIT_BATCHES_PER_FLUSH).record(group.len() as f64);
            metrics::histogram!(m::COMMIT_BYTES_PER_FLUSH).record(bytes as f64);
            metrics::histogram!(m::COMMIT_FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
            for request in group.drain(..) {
                let _ = request.done.send(outcome.clone());
            }
        }
        if !state.failed.load(Ordering::SeqCst) {
            if let Err(e) = state.checkpoint() {
                state.fail(e);
            }
        }
        state.record_gauges();
    }
}

/// Applies frozen layers to the data tree and flushes, one at a time; wakes the writer when one
/// is done, and every `tick` so that it can start a checkpoint that is due by age.
fn checkpointer_loop(
    db: &sled::Db,
    data: &sled::Tree,
    flush_lock: &FlushLock,
    jobs: std::sync::mpsc::Receiver<Arc<Frozen>>,
    done: std::sync::mpsc::Sender<Result<(), Error>>,
    wake: mpsc::WeakSender<WriterMsg>,
    tick: Duration,
) {
    let wake = || {
        if let Some(writer) = wake.upgrade() {
            // A full queue means the writer is busy and looks at the checkpoint soon anyway.
            let _ = writer.try_send(WriterMsg::Wake);
        }
    };
    loop {
        match jobs.recv_timeout(tick) {
            Ok(frozen) => {
                let started = Instant::now();
                let outcome = apply_frozen(data, &frozen, || flush(db, flush_lock));
                metrics::histogram!(m::STORE_CHECKPOINT_SECONDS).record(started.elapsed().as_secs_f64());
                if done.send(outcome).is_err() {
                    return;
                }
                wake();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => wake(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Entries as a sled batch: each a value, or a deletion.
fn sled_batch(entries: impl IntoIterator<Item = Entry>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, value) in entries {
        put_entry(&mut batch, key, value);
    }
    batch
}

/// Appends a data-tree entry to a write-ahead payload: a series' cursor rewritten within the
/// generation as a patch of its value before ([`codec::cursor_patch`]: its baseline and newest
/// keys, not the steps of the keys it kept), anything else whole.
fn log_entry(key: &[u8], previous: Option<&[u8]>, value: Option<&[u8]>, payload: &mut Vec<u8>) {
    if let (Some(&codec::CURSOR), Some(previous), Some(value)) = (key.first(), previous, value) {
        if let Some(patch) = codec::cursor_patch(previous, value) {
            return wal::encode_patch(key, value, patch, payload);
        }
    }
    wal::encode_entry(key, value, payload);
}

/// Adds an entry to a sled batch: its value, or its deletion.
fn put_entry<K: Into<sled::IVec>, V: Into<sled::IVec>>(batch: &mut sled::Batch, key: K, value: Option<V>) {
    match value {
        Some(value) => batch.insert(key, value),
        None => batch.remove(key),
    }
}

fn checkpointer_stopped() -> Error {
    Error::Unavailable("storage: the checkpointer stopped".into())
}

/// Writes a frozen layer into the data tree, calling `after_chunk` after every
/// [`CHECKPOINT_CHUNK`] entries and after the last one.
///
/// Each entry is its own sled insert, not part of a `Batch`: sled 0.34's `apply_batch` holds its
/// process-wide exclusive lock for the whole batch, so every read (the owners', the queries')
/// waited for it, and the node copies it made could not be freed until it ended. Back to back
/// (docs/benchmarks-history.md, step 13): figure 5 12.7-13.0 KB per series with batches,
/// 10.3-10.4 KB without; figure 1 17.0-16.5 CPU-s with batches, 12.9 without. Nothing needs a
/// chunk to be atomic: readers see the frozen layer itself until the checkpoint is done, and a
/// crash leaves its write-ahead generations to be applied again. (This was reverted once, after
/// a chaos run over-counted; the cause was a failover after a slow stop, not this.)
fn apply_frozen(
    data: &sled::Tree,
    frozen: &Frozen,
    mut after_chunk: impl FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    let mut entries = frozen.entries.iter().peekable();
    // Keys written, by tag (reported per record kind once the checkpoint is in).
    let mut written = [0u64; 256];
    loop {
        for (key, value) in entries.by_ref().take(CHECKPOINT_CHUNK) {
            match value {
                Some(value) => data.insert(key.as_slice(), value.as_slice()).map(drop),
                None => data.remove(key.as_slice()).map(drop),
            }
            .map_err(|e| storage_error("checkpoint", e))?;
            if let Some(tag) = key.as_slice().first() {
                written[usize::from(*tag)] += 1;
            }
        }
        after_chunk()?;
        if entries.peek().is_none() {
            break;
        }
    }
    for (tag, count) in written.iter().enumerate().filter(|(_, count)| **count > 0) {
        let kind = codec::record_kind(tag as u8);
        metrics::counter!(m::STORE_CHECKPOINT_KEYS, "record" => kind).increment(*count);
    }
    Ok(())
}

/// Reads back the write-ahead generations in `dir`, oldest first: data entries into one frozen
/// layer (later writes win), metadata entries straight into `meta` (they stay in the log until
/// a checkpoint's flush has made them durable). Returns the layer (when any generation was
/// found) and the generation to write next. A torn tail of the newest generation (a write that
/// was never acknowledged) is cut off, so that it is not in the middle of the log next time.
fn replay(dir: &Path, meta: &sled::Tree) -> Result<(Option<Checkpoint>, u64), Error> {
    let generations = wal::generations(dir).map_err(|e| storage_error(&format!("listing {}", dir.display()), e))?;
    let next = generations.last().map_or(0, |newest| newest + 1);
    let mut frozen = Frozen::default();
    let mut meta_batch = sled::Batch::default();
    for &generation in &generations {
        let newest = next == generation + 1;
        let report =
            wal::read(dir, generation, newest, &mut |key, value| frozen.replay(key, value), &mut |key, value| {
                put_entry(&mut meta_batch, key, value.resolve(None)?);
                Ok(())
            })
            .map_err(corrupt)?;
        if report.torn_bytes > 0 {
            let path = wal::path(dir, generation);
            warn!(
                file = %path.display(),
                torn_bytes = report.torn_bytes,
                "the write-ahead log ends in a torn frame (a write cut short and never acknowledged): ignored"
            );
            wal::cut_torn_tail(dir, generation, report.torn_bytes)
                .map_err(|e| storage_error(&format!("cutting the torn tail of {}", path.display()), e))?;
        }
    }
    meta.apply_batch(meta_batch).map_err(|e| storage_error("replaying metadata", e))?;
    if generations.is_empty() {
        return Ok((None, next));
    }
    Ok((Some(Checkpoint { frozen: Arc::new(frozen), generations }), next))
}

/// Applies and drops the write-ahead trees an earlier version kept inside sled (`wal-<n>`, of
/// records encoded like the log's entries), oldest first.
fn read_legacy_wal(db: &sled::Db, data: &sled::Tree, flush_lock: &FlushLock) -> Result<(), Error> {
    let mut names: Vec<sled::IVec> =
        db.tree_names().into_iter().filter(|name| name.starts_with(LEGACY_WAL_PREFIX.as_bytes())).collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let mut frozen = Frozen::default();
    for name in &names {
        let tree = db.open_tree(name).map_err(|e| storage_error("opening a legacy write-ahead tree", e))?;
        for record in tree.iter() {
            let (_, record) = record.map_err(|e| storage_error("reading a legacy write-ahead tree", e))?;
            wal::decode_entries(&record, &mut |key, value| frozen.replay(key, value)).map_err(corrupt)?;
        }
    }
    apply_frozen(data, &frozen, || flush(db, flush_lock))?;
    for name in names {
        db.drop_tree(name).map_err(|e| storage_error("dropping a legacy write-ahead tree", e))?;
    }
    flush(db, flush_lock)?;
    info!(entries = frozen.entries.len(), "legacy write-ahead trees applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EncodedCursor;
    use tollgate_rules::normalize::PointKey;
    use tollgate_rules::{Entity, Fixed, SeriesKey};

    fn storage(dir: &Path) -> SledStorage {
        let settings = StorageConfig {
            cache_capacity_bytes: 8 * 1024 * 1024,
            max_batches_per_flush: 64,
            writer_queue_capacity: 16,
            ..StorageConfig::default()
        };
        SledStorage::open(dir, &settings).unwrap()
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

    /// With a commit delay configured, concurrent writers (grouped, and then waited for) are
    /// all acknowledged, and durably: every write is there after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_commit_delay_acknowledges_every_concurrent_batch() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StorageConfig {
            cache_capacity_bytes: 8 * 1024 * 1024,
            max_batches_per_flush: 8,
            commit_delay_us: 2_000,
            ..StorageConfig::default()
        };
        {
            let store = Arc::new(SledStorage::open(dir.path(), &settings).unwrap());
            let writers = (0..40u64).map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut batch = StoreBatch::default();
                    batch.push(Op::Meta { key: format!("writer-{i}"), value: i.to_be_bytes().to_vec() });
                    store.commit(batch).await.unwrap().await.unwrap()
                })
            });
            for writer in writers.collect::<Vec<_>>() {
                writer.await.unwrap().unwrap();
            }
        }
        let store = SledStorage::open(dir.path(), &settings).unwrap();
        for i in 0..40u64 {
            assert_eq!(store.meta(&format!("writer-{i}")).unwrap(), Some(i.to_be_bytes().to_vec()), "writer {i}");
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
            let seen =
                [PointKey { time_ns: 50, start_ns: 40 }, PointKey { time_ns: 70, start_ns: 60 }].into_iter().collect();
            let cursor = EncodedCursor::new(&SeriesCursor { baseline: None, seen, ..Default::default() });
            batch.push(Op::Cursor { vnode: 3, partition: 9, id, cursor });
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
        assert_eq!(cursor.seen.iter().collect::<Vec<_>>(), vec![PointKey { time_ns: 70, start_ns: 60 }]);
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
        let page = store.logs(0, 5, 0, None, 2, usize::MAX).unwrap();
        assert_eq!(page.iter().map(|l| l.fingerprint).collect::<Vec<_>>(), vec![4, 3]);
        let next = store.logs(0, 5, 0, Some(LogPosition { time_ns: 200, fingerprint: 3 }), 10, usize::MAX).unwrap();
        assert_eq!(next.iter().map(|l| l.fingerprint).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(store.logs(0, 5, 150, None, 10, usize::MAX).unwrap().len(), 3);
        // The newest time of each partition (not the next partition's), and what is stored.
        let newest = |vnode, partition| store.newest_log_time(vnode, partition).unwrap();
        assert_eq!(
            (newest(0, 5), newest(0, 6), newest(0, 4), newest(1, 5), newest(0, u64::MAX)),
            (300, 250, 0, 0, u64::MAX)
        );
        assert!(store.has_log(0, 5, 200, 3).unwrap());
        assert!(!store.has_log(0, 5, 200, 4).unwrap() && !store.has_log(0, 6, 200, 3).unwrap());
        // A byte budget ends the read after the record that reaches it.
        let one = log(0, 0).approximate_bytes();
        for (max_bytes, records) in [(1, 1), (one, 1), (one + 1, 2), (3 * one, 3)] {
            assert_eq!(store.logs(0, 5, 0, None, 10, max_bytes).unwrap().len(), records, "{max_bytes} bytes");
        }
        let cutoffs =
            RetentionCutoffs { minute: 0, minute_unrolled: 0, hour: 0, day: 0, logs_ns: 201, log_batches_ns: 0 };
        let report =
            tokio::task::spawn_blocking(move || store.sweep(cutoffs).map(|r| (r, store))).await.unwrap().unwrap();
        assert_eq!(report.0.deleted, 3);
        assert_eq!(report.1.logs(0, 5, 0, None, 10, usize::MAX).unwrap().len(), 1);
    }

    /// The sweep deletes exactly the aggregates older than their resolution's cut-off, wherever
    /// they are (data tree, memtable, a deletion in the memtable), and reads per series its oldest
    /// state and its expired ones, not every state it keeps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_sweep_reads_each_series_expired_states_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStorage::open(dir.path(), &raw_settings()).unwrap();
        let put = |batch: &mut StoreBatch, series: u128, resolution: Resolution, periods: std::ops::Range<u64>| {
            for period in periods {
                batch.push(Op::State { vnode: 3, id: SeriesId(series), resolution, period, state: state(period) });
            }
        };
        // In the data tree: minutes 0..40 of series 1..=20, hours 0..5 of series 1.
        let mut batch = StoreBatch::default();
        for series in 1..=20 {
            put(&mut batch, series, Resolution::Minute, 0..40);
        }
        put(&mut batch, 1, Resolution::Hour, 0..5);
        store.commit(batch).await.unwrap().await.unwrap().unwrap();
        let memtable = Arc::clone(store.memtable.as_ref().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while memtable.bytes() != (0, 0) {
            assert!(Instant::now() < deadline, "the memtable was never checkpointed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // In the memtable: minutes 40..45 of the same series, minutes 5..45 of series 21..=25
        // and 20..45 of series 26 (new), and series 2's minute 3 deleted.
        let mut batch = StoreBatch::default();
        for series in 1..=20 {
            put(&mut batch, series, Resolution::Minute, 40..45);
        }
        for series in 21..=25 {
            put(&mut batch, series, Resolution::Minute, 5..45);
        }
        put(&mut batch, 26, Resolution::Minute, 20..45);
        batch.push(Op::DeleteRaw { key: codec::state_key(3, SeriesId(2), Resolution::Minute, 3) });
        store.commit(batch).await.unwrap().await.unwrap().unwrap();

        let cutoffs =
            RetentionCutoffs { minute: 10, minute_unrolled: 10, hour: 2, day: 0, logs_ns: 0, log_batches_ns: 0 };
        let (report, store) =
            tokio::task::spawn_blocking(move || store.sweep(cutoffs).map(|r| (r, store))).await.unwrap().unwrap();
        // Minutes 0..10 of series 1..=20 (series 2 had 9 left), 5..10 of series 21..=25; hours 0..2.
        let deleted = 20 * 10 - 1 + 5 * 5 + 2;
        assert_eq!(report.deleted, deleted);
        // What was deleted, and series 26's oldest minute: 227 of the 1 129 keys.
        assert_eq!(report.examined, deleted + 1);
        for series in 1..=26u128 {
            for period in 0..45 {
                let kept = store.state(3, SeriesId(series), Resolution::Minute, period).unwrap().is_some();
                let written = match series {
                    1..=20 => !(series == 2 && period == 3),
                    21..=25 => period >= 5,
                    _ => period >= 20,
                };
                assert_eq!(kept, written && period >= 10, "series {series} minute {period}");
            }
        }
        for period in 0..5 {
            let kept = store.state(3, SeriesId(1), Resolution::Hour, period).unwrap().is_some();
            assert_eq!(kept, period >= 2, "hour {period}");
        }
    }

    /// A minute not rolled up into its hour and day yet is kept past its retention (a point of
    /// a minute already that old is merged as a minute, then rolled up), but not past
    /// `minute_unrolled`; so is one whose series the sweep cannot place (written after it read
    /// the series index).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_sweep_keeps_minutes_until_they_are_rolled_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = storage(dir.path());
        let key = |pod: &str| SeriesKey {
            entity: Entity::new("gw", Some(pod)),
            metric: "m".into(),
            attributes: Default::default(),
        };
        let (clocked, unclocked, orphan) = (key("pod-0").id(), key("pod-1").id(), SeriesId(7));
        let mut batch = StoreBatch::default();
        batch.push(Op::Series { vnode: 3, partition: 9, id: clocked, key: key("pod-0") });
        batch.push(Op::Series { vnode: 3, partition: 10, id: unclocked, key: key("pod-1") });
        let clock = PartitionClock { newest_minute_ns: Some(20 * 60_000_000_000) };
        batch.push(Op::LogClock { vnode: 3, partition: 9, clock });
        for minute in 0..20 {
            for id in [clocked, unclocked, orphan] {
                batch.push(Op::State { vnode: 3, id, resolution: Resolution::Minute, period: minute, state: state(1) });
            }
        }
        store.commit(batch).await.unwrap().await.unwrap().unwrap();
        let cutoffs =
            RetentionCutoffs { minute: 10, minute_unrolled: 2, hour: 0, day: 0, logs_ns: 0, log_batches_ns: 0 };
        let store = Arc::new(store);
        let sweep_to = |frontier: Option<u64>| {
            let store = Arc::clone(&store);
            async move {
                if let Some(minute) = frontier {
                    let mut batch = StoreBatch::default();
                    batch.push(Op::RolledUntil { vnode: 3, partition: 9, minute });
                    batch.push(Op::RolledUntil { vnode: 3, partition: 10, minute });
                    store.commit(batch).await.unwrap().await.unwrap().unwrap();
                }
                let swept = Arc::clone(&store);
                tokio::task::spawn_blocking(move || swept.sweep(cutoffs)).await.unwrap().unwrap();
                let oldest = |id| (0..20).find(|m| store.state(3, id, Resolution::Minute, *m).unwrap().is_some());
                (oldest(clocked), oldest(unclocked), oldest(orphan))
            }
        };
        // Nothing rolled up: kept down to `minute_unrolled`.
        assert_eq!(sweep_to(None).await, (Some(2), Some(2), Some(2)));
        // Rolled up to minute 5: what is rolled up and past retention goes.
        assert_eq!(sweep_to(Some(5)).await, (Some(5), Some(5), Some(2)));
        // Rolled up past retention: retention decides.
        assert_eq!(sweep_to(Some(15)).await, (Some(10), Some(10), Some(2)));
    }

    fn raw_settings() -> StorageConfig {
        StorageConfig {
            cache_capacity_bytes: 8 * 1024 * 1024,
            max_batches_per_flush: 64,
            writer_queue_capacity: 16,
            commit_delay_us: 300,
            checkpoint_bytes: 64 * 1024,
            checkpoint_interval_ms: 100,
        }
    }

    fn everything(store: &SledStorage) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .export_all(&mut |chunk| {
                out.extend(chunk);
                Ok(())
            })
            .unwrap();
        out
    }

    /// Random puts and deletes, with checkpoints by size and by age and reopens in between,
    /// against a map: every read sees exactly the acknowledged writes, and once the memtable is
    /// checkpointed the data tree alone holds them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_write_ahead_log_and_checkpoints_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut random = tollgate_rules::fleet::Xorshift::new(7);
        let mut model: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
        let mut meta_model: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        let meta_of = |store: &SledStorage| -> Vec<Option<Vec<u8>>> {
            (0..4).map(|k| store.meta(&format!("marker-{k}")).unwrap()).collect()
        };
        let expected_meta = |model: &std::collections::BTreeMap<String, Vec<u8>>| -> Vec<Option<Vec<u8>>> {
            (0..4).map(|k| model.get(&format!("marker-{k}")).cloned()).collect()
        };
        let mut store = SledStorage::open(dir.path(), &raw_settings()).unwrap();
        let mut checkpointed = false;
        for round in 0..60 {
            let mut batch = StoreBatch::default();
            for _ in 0..80 {
                // Keys share their first byte with every data tag's range, as real keys do.
                let key = format!("E{:04}", random.below(400)).into_bytes();
                if random.below(5) == 0 {
                    model.remove(&key);
                    batch.push(Op::DeleteRaw { key });
                } else {
                    let value = vec![random.below(256) as u8; 10 + random.below(600) as usize];
                    model.insert(key.clone(), value.clone());
                    batch.push(Op::PutRaw { key, value });
                }
            }
            // Every third batch also changes the metadata tree, atomically with its data.
            if round % 3 == 0 {
                let key = format!("marker-{}", random.below(4));
                if random.below(3) == 0 {
                    meta_model.remove(&key);
                    batch.push(Op::DeleteMeta { key });
                } else {
                    meta_model.insert(key.clone(), vec![round as u8]);
                    batch.push(Op::Meta { key, value: vec![round as u8] });
                }
            }
            store.commit(batch).await.unwrap().await.unwrap().unwrap();
            assert_eq!(everything(&store), model.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>());
            assert_eq!(meta_of(&store), expected_meta(&meta_model));
            // Walks taking the memtable a few keys at a time see the same, over everything and
            // over a range that starts and ends between keys.
            for chunk in [1, 3, 64] {
                let walked: Vec<(Vec<u8>, Vec<u8>)> =
                    store.walk(Vec::new(), None, chunk).collect::<Result<_, _>>().unwrap();
                assert_eq!(walked, model.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>(), "{chunk}");
                let (from, to) = (b"E0100x".to_vec(), b"E0199x".to_vec());
                let walked: Vec<(Vec<u8>, Vec<u8>)> =
                    store.walk(from.clone(), Some(to.clone()), chunk).collect::<Result<_, _>>().unwrap();
                let expected: Vec<(Vec<u8>, Vec<u8>)> =
                    model.range(from..to).map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(walked, expected, "{chunk}, a range");
            }
            checkpointed |= !store.data.is_empty();
            if round % 7 == 3 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            if round % 13 == 12 {
                drop(store);
                store = SledStorage::open(dir.path(), &raw_settings()).unwrap();
                assert_eq!(
                    everything(&store),
                    model.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>(),
                    "after reopening"
                );
                assert_eq!(meta_of(&store), expected_meta(&meta_model), "metadata after reopening");
            }
        }
        assert!(checkpointed, "some writes reached the data tree");
        // Idle: the age-based checkpoint empties the memtable and drops every old generation.
        let deadline = Instant::now() + Duration::from_secs(20);
        let memtable = Arc::clone(store.memtable.as_ref().unwrap());
        while memtable.bytes() != (0, 0) || wal::generations(&dir.path().join("wal")).unwrap().len() > 1 {
            assert!(Instant::now() < deadline, "the memtable was never checkpointed: {:?}", memtable.bytes());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tree: Vec<(Vec<u8>, Vec<u8>)> = store
            .data
            .iter()
            .map(|entry| entry.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(tree, model.into_iter().collect::<Vec<_>>());
    }

    /// Cursors are logged as patches of their value before (a fraction of their size), and a
    /// reopened store, which replays the log, has each series' last cursor exactly: with the
    /// whole log replayed (no checkpoint), and with generations rotated every 64 KiB, where every
    /// generation starts each cursor whole and some are half checkpointed when the store stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_cursors_logged_as_patches_replay_to_their_last_value() {
        let bounds: tollgate_rules::Bounds = Arc::from((0..20).map(f64::from).collect::<Vec<_>>());
        let ids: Vec<SeriesId> = (0..6)
            .map(|i| {
                SeriesKey {
                    entity: Entity::new("gw", Some("pod")),
                    metric: format!("m{i}"),
                    attributes: Default::default(),
                }
                .id()
            })
            .collect();
        for (checkpoint_bytes, checkpoint_interval_ms) in [(1 << 30, 600_000), (64 * 1024, 100)] {
            let dir = tempfile::tempdir().unwrap();
            let settings = StorageConfig { checkpoint_bytes, checkpoint_interval_ms, ..raw_settings() };
            let mut store = SledStorage::open(dir.path(), &settings).unwrap();
            let mut cursors: Vec<SeriesCursor> = vec![SeriesCursor::default(); ids.len()];
            let mut whole_bytes = 0;
            for round in 0..240u64 {
                let mut batch = StoreBatch::default();
                for (series, (id, cursor)) in ids.iter().zip(&mut cursors).enumerate() {
                    // A point every 10 s give or take, one in 15 late, a 10-minute window.
                    let series = series as u64;
                    let newest = cursor.seen.back().map_or(1_000_000_000_000, |key| key.time_ns);
                    let time_ns = if round % 15 == 7 {
                        newest - 25_000_000_000 - series
                    } else {
                        newest + 10_000_000_000 + (round * 7_919 + series * 104_729) % 50_000_000
                    };
                    cursor.seen.insert(PointKey { time_ns, start_ns: 3 });
                    cursor.seen.forget_before(cursor.seen.back().unwrap().time_ns.saturating_sub(600_000_000_000));
                    cursor.baseline = Some(tollgate_rules::normalize::Baseline {
                        start_ns: 3,
                        time_ns,
                        count: round * 10 + series,
                        sum: Fixed::from_int(round as i64),
                        bounds: Arc::clone(&bounds),
                        buckets: (0..=20).map(|b| round * b + series).collect(),
                    });
                    let encoded = EncodedCursor::new(cursor);
                    whole_bytes += encoded.bytes.len();
                    batch.push(Op::Cursor { vnode: 2, partition: 11, id: *id, cursor: encoded });
                }
                store.commit(batch).await.unwrap().await.unwrap().unwrap();
                if round % 60 == 59 {
                    if checkpoint_bytes == 1 << 30 && round > 60 {
                        // Nothing was checkpointed since the last reopen: the log holds every
                        // write since then, mostly as patches once the window is full: the
                        // patches carry the baseline (21 buckets here) but not the 60 keys; the
                        // first write of each cursor and those after a late point are whole.
                        let log_bytes: u64 = wal::generations(&dir.path().join("wal"))
                            .unwrap()
                            .iter()
                            .map(|&g| std::fs::metadata(wal::path(&dir.path().join("wal"), g)).unwrap().len())
                            .sum();
                        assert!(
                            (log_bytes as usize) * 5 < whole_bytes * 2,
                            "{log_bytes} bytes of log for {whole_bytes} bytes of cursors"
                        );
                    }
                    drop(store);
                    store = SledStorage::open(dir.path(), &settings).unwrap();
                    for (id, cursor) in ids.iter().zip(&cursors) {
                        assert_eq!(&store.cursor(2, 11, *id, 0).unwrap(), cursor, "round {round}");
                    }
                    whole_bytes = 0;
                }
            }
        }
    }

    /// A key cut short in the data tree (a corrupt store) makes the read that meets it fail with
    /// a corrupt-store error naming the key, instead of a panic in the node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_reports_keys_cut_short_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStorage::open(dir.path(), &raw_settings()).unwrap();
        store.data.insert([codec::ENTITY, 0, 1], b"x".as_slice()).unwrap();
        store.data.insert([codec::LOG_BATCH, 0, 4, 9], 7u64.to_be_bytes().as_slice()).unwrap();
        let error = store.entities().unwrap_err().to_string();
        assert!(error.contains("corrupt store: entity key of 3 bytes"), "{error}");
        let error = store.log_batches(4).unwrap_err().to_string();
        assert!(error.contains("corrupt store: log batch key of 4 bytes"), "{error}");
    }

    fn put(key: &str, value: &str) -> Op {
        Op::PutRaw { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() }
    }

    /// A crash in the middle of a write leaves a torn frame at the end of the newest generation:
    /// the store opens with everything acknowledged before it, cuts the torn bytes off, and later
    /// generations do not make it look like corruption in the middle of the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_reopens_after_a_torn_write_ahead_tail() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StorageConfig { checkpoint_interval_ms: 600_000, ..raw_settings() };
        let store = SledStorage::open(dir.path(), &settings).unwrap();
        let mut batch = StoreBatch::default();
        batch.push(put("Ekept", "1"));
        batch.push(Op::Meta { key: "marker".into(), value: b"m".to_vec() });
        store.commit(batch).await.unwrap().await.unwrap().unwrap();
        drop(store);
        let wal_dir = dir.path().join("wal");
        let newest = *wal::generations(&wal_dir).unwrap().last().unwrap();
        let file = wal::path(&wal_dir, newest);
        let length = std::fs::metadata(&file).unwrap().len();
        assert!(length > 0, "the acknowledged write is in the log, not yet checkpointed");
        // The start of a frame whose payload never made it to disk.
        let mut torn = std::fs::read(&file).unwrap();
        torn.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 0, 9]);
        std::fs::write(&file, &torn).unwrap();

        // Replay alone (the store's open would start checkpointing the generation away).
        let scratch = sled::Config::new().temporary(true).open().unwrap();
        let (replayed, next) = replay(&wal_dir, &scratch.open_tree("meta").unwrap()).unwrap();
        let replayed = replayed.unwrap();
        assert_eq!((replayed.generations.clone(), next), (vec![newest], newest + 1));
        assert_eq!(replayed.frozen.entries.get(b"Ekept".as_slice()), Some(&Some(b"1".to_vec())));
        assert_eq!(std::fs::metadata(&file).unwrap().len(), length, "the torn tail is cut off");
        std::fs::write(&file, &torn).unwrap();

        let store = SledStorage::open(dir.path(), &settings).unwrap();
        assert_eq!(store.get(b"Ekept").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.meta("marker").unwrap(), Some(b"m".to_vec()));
        let mut batch = StoreBatch::default();
        batch.push(put("Elater", "2"));
        store.commit(batch).await.unwrap().await.unwrap().unwrap();
        drop(store);
        let store = SledStorage::open(dir.path(), &settings).unwrap();
        assert_eq!(store.get(b"Ekept").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get(b"Elater").unwrap(), Some(b"2".to_vec()));
        drop(store);

        // Damage in a generation that is not the newest is corruption, reported as such.
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        std::fs::create_dir_all(&wal_dir).unwrap();
        let mut older = WalFile::create(&wal_dir, 5).unwrap();
        older.stage_data(&[(b"Ea".to_vec(), Some(b"1".to_vec()))]);
        older.sync().unwrap();
        WalFile::create(&wal_dir, 6).unwrap();
        let file = wal::path(&wal_dir, 5);
        let mut bytes = std::fs::read(&file).unwrap();
        *bytes.last_mut().unwrap() ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let error = SledStorage::open(dir.path(), &settings).unwrap_err();
        assert!(error.to_string().contains("corrupt store") && error.to_string().contains("checksum"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_refuses_a_data_directory_in_use_and_opens_it_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStorage::open(dir.path(), &raw_settings()).unwrap();
        let error = SledStorage::open(dir.path(), &raw_settings()).unwrap_err();
        assert!(error.to_string().contains("is in use by another process"), "{error}");
        assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
        // Released by the first store's drop, possibly a moment later: the open waits for it.
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(store);
        });
        let reopened = SledStorage::open(dir.path(), &raw_settings());
        holder.join().unwrap();
        assert!(reopened.is_ok(), "{:?}", reopened.err());
    }

    /// A data directory written by the version that kept its write-ahead log in sled trees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_store_applies_a_legacy_write_ahead_tree_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path().join("sled")).open().unwrap();
            let mut older = Vec::new();
            wal::encode_entries(
                &[(b"Ea".to_vec(), Some(b"old".to_vec())), (b"Eb".to_vec(), Some(b"1".to_vec()))],
                &mut older,
            );
            let mut newer = Vec::new();
            wal::encode_entries(&[(b"Ea".to_vec(), Some(b"new".to_vec())), (b"Eb".to_vec(), None)], &mut newer);
            db.open_tree("wal-00000000000000000003").unwrap().insert(0u64.to_be_bytes(), older).unwrap();
            db.open_tree("wal-00000000000000000004").unwrap().insert(0u64.to_be_bytes(), newer).unwrap();
            db.flush().unwrap();
        }
        let store = SledStorage::open(dir.path(), &raw_settings()).unwrap();
        assert_eq!(store.data.get(b"Ea").unwrap().map(|v| v.to_vec()), Some(b"new".to_vec()));
        assert_eq!(store.get(b"Eb").unwrap(), None);
        assert!(!store.db.tree_names().iter().any(|name| name.starts_with(b"wal-")), "legacy trees dropped");
    }
}
