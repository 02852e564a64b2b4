//! Owner actors (ractor): one per owned vnode, the only place its series are merged.
//!
//! An owner holds the normalisation state of its series (cursors, partition clocks) and a small
//! cache of hot aggregates, runs the rules crate on each message, and writes everything the
//! message changed as one atomic batch. It does not wait for the flush: it hands the batch to the
//! store's group-commit writer and moves on; a small task replies to the sender once the batch is
//! durable. Batches of one owner are applied in order, so later batches never overtake earlier
//! ones.
//!
//! Intake is bounded: ractor mailboxes are unbounded, so every message carries a permit of the
//! owner's semaphore (`limits.owner_queue_capacity`); without one the sender gets a retryable
//! overload error instead of queueing.
//!
//! The cache holds the newest minute of each series (its points arrive in time order; a retried or
//! late point of an older minute reads that minute back from the store): when a series moves on
//! to a new minute, the one before leaves at the next message after everything written is durable.
//! Periodically (`Maintain`) an owner rolls closed minutes into hour and day states, evicts idle
//! state from memory once everything it wrote is durable, and forgets old log-batch fingerprints.

use crate::clock::Clock;
use crate::error::Error;
use crate::metrics as m;
use crate::runtime::RuntimeConfig;
use crate::store::{durable, EncodedCursor, EntityRecord, Op, Resolution, Storage, StoreBatch, StoredLog};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tollgate_cluster::lease::LeaseCheck;
use tollgate_cluster::raft_store::AppliedState;
use tollgate_cluster::{Cluster, NodeId};
use tollgate_rules::ingest::{log_counters, log_increment, LogCounter, LogFingerprinter};
use tollgate_rules::normalize::{PartitionClock, PointKey};
use tollgate_rules::series::{minute_of, shrink_if_sparse, FastMap, FastSet, NANOS_PER_MINUTE};
use tollgate_rules::{
    Aggregate, Applied, Delta, DropReason, Entity, ExtractedLog, ExtractedPoint, Fixed, IngestReport, LogView,
    RejectReason, Rejection, SeriesId, SeriesTable,
};
use tracing::{debug, warn};

/// Everything owners share.
#[derive(Debug)]
pub struct OwnerContext {
    /// This node's cluster id.
    pub me: NodeId,
    /// The applied cluster state: who owns which vnode.
    pub cluster: watch::Receiver<Arc<AppliedState>>,
    /// The cluster, asked before every merge whether this node holds its lease on the vnodes it
    /// owns ([`Cluster::holds_lease`]).
    pub lease: Arc<Cluster>,
    /// Durable state.
    pub store: Arc<dyn Storage>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Configuration in force.
    pub config: watch::Receiver<Arc<RuntimeConfig>>,
    /// Series per service in memory across all owners of this node.
    pub cardinality: Cardinality,
    /// How long minute states are kept (`retention.minute_seconds`), nanoseconds: minutes are
    /// rolled up well before the sweep deletes them.
    pub minute_retention_ns: u64,
}

/// Live series per service across the owners of a node (SPEC §8: new series beyond the limit are
/// rejected; live ones are never evicted to make room). A service's instances live in different
/// vnodes, so one owner alone cannot enforce the limit. The node's own limit
/// (`limits.max_series`) bounds them all, whatever their services: the memory they take.
#[derive(Debug, Default)]
pub struct Cardinality {
    counts: std::sync::Mutex<SeriesCounts>,
    /// Most series in memory on this node; 0: no limit.
    max_series: usize,
}

#[derive(Debug, Default)]
struct SeriesCounts {
    per_service: FastMap<String, usize>,
    total: usize,
}

/// Why a new series was refused, with the count at the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The service is at `max_series_per_service`.
    Service(usize),
    /// The node is at `limits.max_series`.
    Node(usize),
}

/// Whether a point's series may be in memory (`OwnerState::admit_series`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    /// It already is.
    Live,
    /// Read back from the store, counted.
    Restored,
    /// Counted; the point creates it.
    New,
    /// Not in memory, and no room for it.
    Refused(Full),
}

impl Cardinality {
    /// Counts with the node's limit of series in memory (`limits.max_series`; 0: none).
    pub fn new(max_series: usize) -> Self {
        Cardinality { counts: Default::default(), max_series }
    }

    /// Counts a new series if the node and the service have room.
    pub fn try_add(&self, service: &str, limit: usize) -> Result<(), Full> {
        let mut counts = self.counts.lock().expect("cardinality lock");
        if self.max_series > 0 && counts.total >= self.max_series {
            return Err(Full::Node(counts.total));
        }
        let count = counts.per_service.get(service).copied().unwrap_or(0);
        if count >= limit {
            return Err(Full::Service(count));
        }
        *counts.per_service.entry(service.to_string()).or_default() += 1;
        counts.total += 1;
        Ok(())
    }

    /// Forgets a series that left memory.
    pub fn remove(&self, service: &str) {
        let mut counts = self.counts.lock().expect("cardinality lock");
        if let Some(count) = counts.per_service.get_mut(service) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.per_service.remove(service);
            }
            counts.total = counts.total.saturating_sub(1);
        }
    }
}

/// The reply to a batch: its report once durable, or why not.
pub type Reply = oneshot::Sender<Result<IngestReport, Error>>;

/// Messages of an owner.
#[derive(Debug)]
pub enum OwnerMsg {
    /// Merge these points (all of this owner's vnode).
    Metrics {
        /// The points.
        points: Vec<ExtractedPoint>,
        /// Where the report goes once durable.
        reply: Reply,
        /// The intake slot this message occupies.
        permit: OwnedSemaphorePermit,
    },
    /// Classify, count and keep these log records (all of this owner's vnode), which arrived
    /// together in one export whose part for this vnode has fingerprint `batch`.
    Logs {
        /// The records.
        records: Vec<ExtractedLog>,
        /// Fingerprint of this slice of the export (retries have the same one).
        batch: u128,
        /// Where the report goes once durable.
        reply: Reply,
        /// The intake slot this message occupies.
        permit: OwnedSemaphorePermit,
    },
    /// Roll up, evict, forget.
    Maintain {
        /// Signalled when done (tests and shutdown).
        done: oneshot::Sender<()>,
    },
    /// The periodic maintenance: at most one is queued at a time, so a slow owner does not pile
    /// them up. `queued` is cleared when it is taken.
    Tick { queued: Arc<AtomicBool> },
    /// The vnode is being handed to another node: make everything written so far durable, so
    /// that the store holds all of its state.
    Release {
        /// Signalled when done.
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// The node is leaving: roll every stored minute of the vnode up, so that its data moves
    /// complete (the vnode is owned elsewhere, so no minute can change any more).
    RollUpAll {
        /// Signalled when done.
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// State of the vnode handed over by its previous owner: merge it into the store.
    Import {
        /// Raw store entries.
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        /// A metadata entry written in the same batch (the mover's marker).
        marker: Option<(String, Vec<u8>)>,
        /// Signalled when durable.
        done: oneshot::Sender<Result<(), Error>>,
    },
}

/// A running owner: its actor and its intake semaphore.
#[derive(Clone, Debug)]
pub struct OwnerHandle {
    /// The vnode it owns.
    pub vnode: u16,
    actor: ActorRef<OwnerMsg>,
    intake: Arc<Semaphore>,
    /// True while a periodic tick is queued.
    tick_queued: Arc<AtomicBool>,
}

impl OwnerHandle {
    /// Spawns the owner of `vnode`.
    pub async fn spawn(vnode: u16, context: Arc<OwnerContext>, queue_capacity: usize) -> Result<OwnerHandle, Error> {
        let (actor, _) = Actor::spawn(None, Owner, OwnerArguments { vnode, context })
            .await
            .map_err(|e| Error::Internal(format!("starting owner of vnode {vnode}: {e}")))?;
        Ok(OwnerHandle {
            vnode,
            actor,
            intake: Arc::new(Semaphore::new(queue_capacity)),
            tick_queued: Arc::new(AtomicBool::new(false)),
        })
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        Arc::clone(&self.intake).try_acquire_owned().map_err(|_| {
            metrics::counter!(m::OVERLOAD, "what" => "owner_queue").increment(1);
            Error::overloaded(format!("the owner of vnode {} has a full queue", self.vnode))
        })
    }

    fn send(&self, message: OwnerMsg) -> Result<(), Error> {
        self.actor
            .cast(message)
            .map_err(|_| Error::Unavailable(format!("the owner of vnode {} stopped", self.vnode)))?;
        metrics::counter!(m::OWNER_PUSHED).increment(1);
        Ok(())
    }

    /// Queues points; the receiver yields the report once they are durable.
    pub fn submit_metrics(
        &self,
        points: Vec<ExtractedPoint>,
    ) -> Result<oneshot::Receiver<Result<IngestReport, Error>>, Error> {
        let permit = self.permit()?;
        let (reply, receiver) = oneshot::channel();
        self.send(OwnerMsg::Metrics { points, reply, permit })?;
        Ok(receiver)
    }

    /// Queues log records; the receiver yields the report once they are durable.
    pub fn submit_logs(
        &self,
        records: Vec<ExtractedLog>,
        batch: u128,
    ) -> Result<oneshot::Receiver<Result<IngestReport, Error>>, Error> {
        let permit = self.permit()?;
        let (reply, receiver) = oneshot::channel();
        self.send(OwnerMsg::Logs { records, batch, reply, permit })?;
        Ok(receiver)
    }

    /// Asks for maintenance and waits until it is done.
    pub async fn maintain(&self) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.send(OwnerMsg::Maintain { done })?;
        wait.await.map_err(|_| Error::Unavailable(format!("the owner of vnode {} stopped", self.vnode)))
    }

    /// Releases the vnode for a hand-over and waits until its store is complete.
    pub async fn release(&self) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.send(OwnerMsg::Release { done })?;
        wait.await.map_err(|_| Error::Unavailable(format!("the owner of vnode {} stopped", self.vnode)))?
    }

    /// Rolls every stored minute of the vnode (owned elsewhere) up and waits until it is durable.
    pub async fn roll_up_all(&self) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.send(OwnerMsg::RollUpAll { done })?;
        wait.await.map_err(|_| Error::Unavailable(format!("the owner of vnode {} stopped", self.vnode)))?
    }

    /// Merges handed-over entries into the store and waits until they are durable.
    pub async fn import(
        &self,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        marker: Option<(String, Vec<u8>)>,
    ) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.send(OwnerMsg::Import { entries, marker, done })?;
        wait.await.map_err(|_| Error::Unavailable(format!("the owner of vnode {} stopped", self.vnode)))?
    }

    /// Asks for maintenance without waiting (the periodic tick; skipped while the previous tick
    /// is still queued).
    pub fn tick(&self) {
        if self.tick_queued.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.send(OwnerMsg::Tick { queued: Arc::clone(&self.tick_queued) }).is_err() {
            self.tick_queued.store(false, Ordering::SeqCst);
        }
    }

    /// Stops the actor after the messages already queued.
    pub async fn stop(&self) {
        let _ = self.actor.stop_and_wait(None, Some(Duration::from_secs(30))).await;
    }
}

struct Owner;

struct OwnerArguments {
    vnode: u16,
    context: Arc<OwnerContext>,
}

/// A partition this owner has seen since it started.
#[derive(Debug)]
struct PartitionState {
    entity: Arc<Entity>,
    /// Minutes before this are already in the hour and day states.
    rolled_until: u64,
    /// Newest data time written to the entity index.
    entity_written_ns: u64,
    /// Start of the newest minute of the partition's access logs (its log clock, stored).
    log_newest_minute_ns: Option<u64>,
}

/// A partition's clock (its points) and the newest minute of its access logs.
type Clocks = (Option<PartitionClock>, Option<u64>);

/// Key of a cached aggregate: series, resolution, period (first minute).
type StateKey = (SeriesId, Resolution, u64);

struct OwnerState {
    vnode: u16,
    /// Whether this node owned the vnode at the last message.
    owned: bool,
    context: Arc<OwnerContext>,
    table: SeriesTable,
    partitions: FastMap<u64, PartitionState>,
    cache: FastMap<StateKey, Aggregate>,
    /// Minute aggregates a newer minute of their series pushed out, removed from the cache once
    /// every batch written so far is durable (until then a read of the store could miss their
    /// last write).
    retiring: Vec<StateKey>,
    /// The cache's size as last added to the `tollgate_states_cached` gauge.
    cached_reported: usize,
    /// Log counters of each partition known to have their key stored, with their series id.
    log_counters: FastMap<(u64, LogCounter), SeriesId>,
    /// Fingerprints of log batches processed within the lateness window, with their time.
    log_batches: FastMap<u128, u64>,
    log_batches_loaded: bool,
    /// Fingerprints the records kept, reusing the attribute order of the one before (a
    /// gateway's access-log format is fixed).
    log_fingerprinter: LogFingerprinter,
    /// Fingerprints of the records kept by batches not yet durable, with their batch's sequence:
    /// the store shows a batch's records only once the writer applied it, and a copy can come
    /// in the meantime (in the same export, or in another export queued behind it).
    kept_in_flight: FastMap<u128, u64>,
    /// Per partition, the time of the newest kept log stored here (or on its way), once read
    /// from the store: a record newer than it cannot be a copy of a stored one, and needs no
    /// store read. Only this owner writes its vnode's logs here, so it holds across ownership
    /// changes (a partition's entry is a few bytes).
    newest_kept: FastMap<u64, u64>,
    /// Batches handed to the writer.
    submitted: u64,
    /// How far the batches handed to the writer are durable.
    durable: watch::Sender<Durable>,
}

/// How far an owner's batches are durable.
#[derive(Clone, Copy, Debug, Default)]
struct Durable {
    /// Highest batch known durable (batches become durable in order).
    highest: u64,
    /// A batch failed to become durable: the store failed, and no later batch will be durable
    /// either (the node stops).
    failed: bool,
}

impl Actor for Owner {
    type Msg = OwnerMsg;
    type State = OwnerState;
    type Arguments = OwnerArguments;

    async fn pre_start(&self, _: ActorRef<OwnerMsg>, args: OwnerArguments) -> Result<OwnerState, ActorProcessingErr> {
        Ok(OwnerState {
            vnode: args.vnode,
            owned: false,
            context: args.context,
            table: SeriesTable::new(),
            partitions: FastMap::default(),
            cache: FastMap::default(),
            retiring: Vec::new(),
            cached_reported: 0,
            log_counters: FastMap::default(),
            log_batches: FastMap::default(),
            log_batches_loaded: false,
            log_fingerprinter: LogFingerprinter::default(),
            kept_in_flight: FastMap::default(),
            newest_kept: FastMap::default(),
            submitted: 0,
            durable: watch::channel(Durable::default()).0,
        })
    }

    async fn post_stop(&self, _: ActorRef<OwnerMsg>, state: &mut OwnerState) -> Result<(), ActorProcessingErr> {
        metrics::gauge!(m::SERIES_ACTIVE).decrement(state.table.len() as f64);
        metrics::gauge!(m::STATES_CACHED).decrement(state.cached_reported as f64);
        for (_, entry) in state.table.iter() {
            state.context.cardinality.remove(&entry.key.entity.service);
        }
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<OwnerMsg>,
        message: OwnerMsg,
        state: &mut OwnerState,
    ) -> Result<(), ActorProcessingErr> {
        metrics::counter!(m::OWNER_POPPED).increment(1);
        // Ownership is read from the applied cluster state at every message: data that was
        // queued before a hand-over began is refused once it has.
        let owned = state.owns_now();
        if owned != state.owned {
            state.transition(owned).await;
        }
        // The lease, then the map once more: once the lease is held, the map read after it is at
        // least as new as the commit it was regained with (the state machine publishes the map
        // before Raft counts the entry applied). A vnode found moved here is refused this once;
        // the next message makes the transition.
        let merges = matches!(message, OwnerMsg::Metrics { .. } | OwnerMsg::Logs { .. });
        let lapsed = merges.then(|| state.context.lease.holds_lease()).filter(|check| !check.holds());
        let owned = owned && state.owns_now();
        match message {
            OwnerMsg::Metrics { reply, .. } | OwnerMsg::Logs { reply, .. } if !owned => {
                let _ = reply.send(Err(state.not_owner()));
            }
            OwnerMsg::Metrics { reply, .. } | OwnerMsg::Logs { reply, .. } if lapsed.is_some() => {
                let _ = reply.send(Err(lease_lapsed(lapsed)));
            }
            OwnerMsg::Metrics { points, reply, permit } => {
                let outcome = state.ingest_metrics(points);
                state.finish(outcome, reply, permit).await;
            }
            OwnerMsg::Logs { records, batch, reply, permit } => {
                let outcome = state.ingest_logs(records, batch);
                state.finish(outcome, reply, permit).await;
            }
            OwnerMsg::Release { done } => {
                let result = if owned {
                    Err(Error::Conflict(format!("vnode {} is owned here; nothing to release", state.vnode)))
                } else {
                    Ok(())
                };
                let _ = done.send(result);
            }
            OwnerMsg::RollUpAll { done } => {
                let result = if owned {
                    Err(Error::Conflict(format!("vnode {} is owned here; its minutes are still open", state.vnode)))
                } else {
                    state.roll_up_everything().await
                };
                let _ = done.send(result);
            }
            OwnerMsg::Import { entries, marker, done } => {
                let result = if owned {
                    Err(Error::Conflict(format!("vnode {} is owned here already; refusing an import", state.vnode)))
                } else {
                    state.import(entries, marker).await
                };
                let _ = done.send(result);
            }
            OwnerMsg::Tick { queued } => {
                queued.store(false, Ordering::SeqCst);
                if let Err(error) = state.maintain().await {
                    warn!(vnode = state.vnode, %error, "owner maintenance failed");
                }
            }
            OwnerMsg::Maintain { done } => {
                if let Err(error) = state.maintain().await {
                    warn!(vnode = state.vnode, %error, "owner maintenance failed");
                }
                let _ = done.send(());
            }
        }
        state.report_cached();
        Ok(())
    }
}

/// The refusal of data for a vnode this node owns while its lease is lapsed.
fn lease_lapsed(check: Option<LeaseCheck>) -> Error {
    let contact = match check {
        Some(LeaseCheck::Lapsed { last_contact: Some(ago) }) => {
            format!("last in touch with the cluster's leader {} ms ago", ago.as_millis())
        }
        _ => "not in touch with a cluster leader since it started".into(),
    };
    Error::Unavailable(format!(
        "this node's lease on the vnodes it owns is lapsed ({contact}): out of touch for half of \
         cluster.failover_after_seconds, they may have been given to other members, and it merges nothing until \
         it is back in touch and caught up; retry"
    ))
}

/// What processing one message produced: the batch to write (always), and the report to send
/// once it is durable, or the error that stopped processing.
type Outcome = (StoreBatch, Result<IngestReport, Error>);

/// What ingesting one export's records for a vnode produces.
#[derive(Default)]
struct LogBatchOut {
    report: IngestReport,
    batch: StoreBatch,
    /// The aggregates the records' counters merged into.
    touched: FastSet<StateKey>,
}

impl OwnerState {
    /// True when the applied cluster state says this node owns the vnode now.
    fn owns_now(&self) -> bool {
        self.context.cluster.borrow().state.vnodes.owner(self.vnode) == Some(self.context.me)
    }

    fn not_owner(&self) -> Error {
        Error::Unavailable(format!(
            "this node does not own vnode {} now (it is moving or elsewhere); retry",
            self.vnode
        ))
    }

    /// Ownership changed: everything written so far is made durable, and memory is forgotten
    /// (a new owner reads the handed-over state from the store; a former owner holds nothing).
    async fn transition(&mut self, owned: bool) {
        if let Err(error) = self.settle().await {
            warn!(vnode = self.vnode, %error, "writes before an ownership change are not durable");
        }
        for (_, entry) in self.table.iter() {
            self.context.cardinality.remove(&entry.key.entity.service);
        }
        metrics::gauge!(m::SERIES_ACTIVE).decrement(self.table.len() as f64);
        self.table = SeriesTable::new();
        self.partitions.clear();
        self.cache.clear();
        self.retiring.clear();
        self.log_counters.clear();
        self.log_batches.clear();
        self.log_batches_loaded = false;
        self.owned = owned;
        debug!(vnode = self.vnode, owned, "vnode ownership changed");
    }

    /// Queues the batch with the writer (in this owner's order) and replies once it is durable;
    /// the intake permit is released with the reply. A batch is written even when processing
    /// stopped early with an error: what was applied in memory must reach the disk, so that a
    /// retry of the whole request is recognised for the part that was merged.
    async fn finish(&mut self, outcome: Outcome, reply: Reply, permit: OwnedSemaphorePermit) {
        let (batch, result) = outcome;
        if batch.is_empty() {
            drop(permit);
            let _ = reply.send(result);
            return;
        }
        let ticket = match self.context.store.commit(batch).await {
            Ok(ticket) => ticket,
            Err(error) => {
                drop(permit);
                let _ = reply.send(Err(error));
                return;
            }
        };
        self.submitted += 1;
        let sequence = self.submitted;
        let durable_sender = self.durable.clone();
        tokio::spawn(async move {
            let written = durable(ticket).await;
            // Batches become durable in the order they were queued, so the highest durable
            // sequence implies all lower ones.
            durable_sender.send_if_modified(|durable| match &written {
                Ok(()) => {
                    let advanced = sequence > durable.highest;
                    durable.highest = durable.highest.max(sequence);
                    advanced
                }
                Err(_) => !std::mem::replace(&mut durable.failed, true),
            });
            drop(permit);
            let _ = reply.send(written.and(result));
        });
    }

    fn config(&self) -> Arc<RuntimeConfig> {
        Arc::clone(&self.context.config.borrow())
    }

    /// Loads a partition's clock and frontier the first time it is seen.
    fn ensure_partition(&mut self, partition: u64, entity: &Arc<Entity>) -> Result<(), Error> {
        if self.partitions.contains_key(&partition) {
            return Ok(());
        }
        let store = &self.context.store;
        if let Some(clock) = store.clock(self.vnode, partition)? {
            self.table.restore_clock(partition, clock);
        }
        let rolled_until = store.rolled_until(self.vnode, partition)?;
        let log_newest_minute_ns = store.log_clock(self.vnode, partition)?.and_then(|clock| clock.newest_minute_ns);
        self.partitions.insert(
            partition,
            PartitionState { entity: Arc::clone(entity), rolled_until, entity_written_ns: 0, log_newest_minute_ns },
        );
        Ok(())
    }

    /// Makes sure the series is in memory, or says why it may not be. A series not in memory,
    /// whether new or stored (idle for two lateness windows, or not read back since a restart),
    /// counts against the limits as it comes in: they bound the memory the series take (SPEC §8),
    /// so a stored series would otherwise let a node exceed them. Its store reads come first: a
    /// failure counts nothing.
    fn admit_series(
        &mut self,
        id: SeriesId,
        partition: u64,
        service: &str,
        config: &RuntimeConfig,
    ) -> Result<Admitted, Error> {
        if self.table.get(&id).is_some() {
            return Ok(Admitted::Live);
        }
        let store = &self.context.store;
        let stored = match store.series(self.vnode, partition, id)? {
            Some(key) => {
                let normalize = &config.rules.config.normalize;
                let since = self.table.clock(partition).map(|c| c.oldest_accepted_ns(normalize)).unwrap_or(0);
                Some((key, store.cursor(self.vnode, partition, id, since)?))
            }
            None => None,
        };
        let limit = config.rules.config.normalize.max_series_per_service;
        if let Err(full) = self.context.cardinality.try_add(service, limit) {
            return Ok(Admitted::Refused(full));
        }
        match stored {
            Some((key, cursor)) => {
                self.table.restore_series(key, cursor);
                metrics::gauge!(m::SERIES_ACTIVE).increment(1.0);
                Ok(Admitted::Restored)
            }
            None => Ok(Admitted::New),
        }
    }

    fn ingest_metrics(&mut self, points: Vec<ExtractedPoint>) -> Outcome {
        self.drop_retired();
        let config = self.config();
        let now = self.context.clock.now_ns();
        let mut report = IngestReport::default();
        // About a state and a cursor per point (one point per series in an export): sized up
        // front, since an `Op` is large and growing the vector copies it again and again.
        let mut batch = StoreBatch { ops: Vec::with_capacity(2 * points.len() + 4) };
        let mut touched = Touched::default();
        let mut failure = None;
        for point in points {
            if let Err(error) = self.ingest_point(point, &config, now, &mut report, &mut batch, &mut touched) {
                failure = Some(error);
                break;
            }
        }
        self.record_changes(&mut batch);
        self.write_states(touched.states, &mut batch);
        self.write_cursors(touched.cursors, &mut batch);
        (batch, failure.map_or(Ok(report), Err))
    }

    /// Everything that can fail (store reads) happens before the point is applied, so a failure
    /// leaves no trace in memory.
    fn ingest_point(
        &mut self,
        point: ExtractedPoint,
        config: &RuntimeConfig,
        now: u64,
        report: &mut IngestReport,
        batch: &mut StoreBatch,
        touched: &mut Touched,
    ) -> Result<(), Error> {
        let id = point.series;
        let partition = point.partition;
        self.ensure_partition(partition, &point.entity)?;
        let admitted = self.admit_series(id, partition, &point.entity.service, config)?;
        if let Admitted::Refused(full) = admitted {
            let message = match full {
                Full::Service(count) => {
                    format!("service {:?} already has {count} series (max_series_per_service)", point.entity.service)
                }
                Full::Node(count) => format!("this node already holds {count} series (limits.max_series)"),
            };
            let rejection = Rejection::new(RejectReason::CardinalityLimit, message);
            report.reject(&rejection, || format!("{} of {} at {}", point.metric, point.entity, point.point.time_ns));
            return Ok(());
        }
        let point_key = PointKey { time_ns: point.point.time_ns, start_ns: point.point.start_ns };
        let minute = minute_of(point_key.time_ns) as u64;
        let rolled_until = self.partitions[&partition].rolled_until;
        let keys = state_keys(id, minute, rolled_until);
        // The series' cursor remembers the newest point it accepted (and is stored with the
        // states it merged): a later minute has no stored state, so the store is not read.
        let moved_on_from = self
            .table
            .get(&id)
            .and_then(|entry| entry.cursor.seen.back())
            .map(|k| minute_of(k.time_ns) as u64)
            .filter(|newest| minute > *newest);
        for key in keys.iter() {
            if key.1 == Resolution::Minute && moved_on_from.is_some() {
                self.cache.entry(*key).or_default();
            } else if let Err(error) = self.load_state(*key) {
                // The point fails with its batch: a new series it counted is not created.
                if admitted == Admitted::New {
                    self.context.cardinality.remove(&point.entity.service);
                }
                return Err(error);
            }
        }
        let cache = &mut self.cache;
        let applied = self.table.apply(point, now, &config.rules, &config.pricing, report, |_, _, delta| {
            for key in keys.iter() {
                if let Some(state) = cache.get_mut(key) {
                    state.merge_delta(delta);
                    touched.states.insert(*key);
                }
            }
        });
        match applied {
            Applied::Merged(_) | Applied::Baseline => {
                // The cache keeps the newest minute of a series: moving on pushes the one before
                // out (the minute before it left when the series moved on to it).
                if let Some(previous) = moved_on_from {
                    self.retiring.push((id, Resolution::Minute, previous));
                }
                // Written once per batch, whatever the number of points merged into the series.
                touched.cursors.insert(id, partition);
                self.note_entity(partition, point_key.time_ns, batch);
            }
            Applied::Rejected(RejectReason::TooLate) => metrics::counter!(m::POINTS_LATE).increment(1),
            Applied::Duplicate | Applied::Rejected(_) => {}
        }
        Ok(())
    }

    /// Series created and clocks moved since the last batch.
    fn record_changes(&mut self, batch: &mut StoreBatch) {
        let changes = self.table.take_changes();
        for id in changes.created {
            if let Some(entry) = self.table.get(&id) {
                let partition = entry.key.entity.partition_hash();
                batch.push(Op::Series { vnode: self.vnode, partition, id, key: (*entry.key).clone() });
                metrics::gauge!(m::SERIES_ACTIVE).increment(1.0);
            }
        }
        for partition in changes.clocks {
            if let Some(clock) = self.table.clock(partition) {
                batch.push(Op::Clock { vnode: self.vnode, partition, clock: *clock });
            }
        }
    }

    /// Removes the retiring aggregates from the cache if every batch written so far is durable
    /// (otherwise they wait for a later message, or for maintenance, which settles first).
    fn drop_retired(&mut self) {
        if self.retiring.is_empty() || self.durable.borrow().highest < self.submitted {
            return;
        }
        for key in self.retiring.drain(..) {
            self.cache.remove(&key);
        }
    }

    /// Adds the change of the cache's size since the last report to `tollgate_states_cached`.
    fn report_cached(&mut self) {
        let cached = self.cache.len();
        if cached != self.cached_reported {
            metrics::gauge!(m::STATES_CACHED).increment(cached as f64 - self.cached_reported as f64);
            self.cached_reported = cached;
        }
    }

    /// Makes sure an aggregate is in the cache (from the store, or empty).
    fn load_state(&mut self, key: StateKey) -> Result<(), Error> {
        if !self.cache.contains_key(&key) {
            let (id, resolution, period) = key;
            let state = self.context.store.state(self.vnode, id, resolution, period)?.unwrap_or_default();
            self.cache.insert(key, state);
        }
        Ok(())
    }

    /// Adds the cursors of the series that merged points to the batch.
    fn write_cursors(&self, cursors: FastMap<SeriesId, u64>, batch: &mut StoreBatch) {
        batch.ops.reserve(cursors.len());
        for (id, partition) in cursors {
            if let Some(entry) = self.table.get(&id) {
                batch.push(Op::Cursor { vnode: self.vnode, partition, id, cursor: EncodedCursor::new(&entry.cursor) });
            }
        }
    }

    /// Adds the touched aggregates to the batch.
    fn write_states(&self, touched: FastSet<StateKey>, batch: &mut StoreBatch) {
        batch.ops.reserve(touched.len());
        for key in touched {
            if let Some(state) = self.cache.get(&key) {
                let (id, resolution, period) = key;
                batch.push(Op::State { vnode: self.vnode, id, resolution, period, state: state.clone() });
            }
        }
    }

    /// Updates the entity index when a partition's data moved into a new minute.
    fn note_entity(&mut self, partition: u64, time_ns: u64, batch: &mut StoreBatch) {
        let Some(state) = self.partitions.get_mut(&partition) else { return };
        if time_ns / NANOS_PER_MINUTE <= state.entity_written_ns / NANOS_PER_MINUTE && state.entity_written_ns != 0 {
            return;
        }
        state.entity_written_ns = state.entity_written_ns.max(time_ns);
        batch.push(Op::Entity {
            partition,
            record: EntityRecord {
                service: state.entity.service.clone(),
                instance: state.entity.instance.clone(),
                last_seen_ns: state.entity_written_ns,
            },
        });
    }

    /// Moves the partition's log clock to the minute of an access log it merged. Roll-ups close
    /// a partition's minutes by it too: a partition that sends only access logs has no other
    /// clock (points move the partition clock, which their lateness follows; logs do not).
    fn note_log_minute(&mut self, partition: u64, time_ns: u64, batch: &mut StoreBatch) {
        let Some(state) = self.partitions.get_mut(&partition) else { return };
        let minute_ns = time_ns - time_ns % NANOS_PER_MINUTE;
        if state.log_newest_minute_ns.is_some_and(|newest| newest >= minute_ns) {
            return;
        }
        state.log_newest_minute_ns = Some(minute_ns);
        let clock = PartitionClock { newest_minute_ns: Some(minute_ns) };
        batch.push(Op::LogClock { vnode: self.vnode, partition, clock });
    }

    fn load_log_batches(&mut self) -> Result<(), Error> {
        if self.log_batches_loaded {
            return Ok(());
        }
        for (fingerprint, time) in self.context.store.log_batches(self.vnode)? {
            self.log_batches.insert(fingerprint, time);
        }
        self.log_batches_loaded = true;
        Ok(())
    }

    fn ingest_logs(&mut self, records: Vec<ExtractedLog>, fingerprint: u128) -> Outcome {
        let mut out = LogBatchOut::default();
        if let Err(error) = self.load_log_batches() {
            return (out.batch, Err(error));
        }
        let config = self.config();
        let now = self.context.clock.now_ns();
        if let Some(&first_ns) = self.log_batches.get(&fingerprint) {
            // A retry answers as the batch was answered: the records refused then (by the clock
            // of that first attempt, which this owner remembers with the batch) are refused again
            // (a retry was told that everything was taken), the others are duplicates.
            let normalize = &config.rules.config.normalize;
            for record in &records {
                match too_far_in_future(record, normalize, first_ns) {
                    Some(rejection) => out.report.reject(&rejection, || format!("log record of {}", record.entity)),
                    None => out.report.duplicates += 1,
                }
            }
            metrics::counter!(m::LOG_BATCHES_DUPLICATE).increment(1);
            return (out.batch, Ok(out.report));
        }
        // The store has the records of durable batches (the writer applies a batch before it
        // syncs it).
        let durable = self.durable.borrow().highest;
        self.kept_in_flight.retain(|_, batch| *batch > durable);
        let mut failure = None;
        for record in records {
            if let Err(error) = self.ingest_log(record, &config, now, &mut out) {
                failure = Some(error);
                break;
            }
        }
        let LogBatchOut { report, mut batch, touched, .. } = out;
        // A batch that failed part-way is not remembered: its retry must be processed again
        // (the records kept before the failure are stored, and their copies in the retry are
        // recognised as duplicates; the counters of records not kept are not idempotent, which
        // is why the batch is remembered).
        if failure.is_none() {
            self.log_batches.insert(fingerprint, now);
            batch.push(Op::LogBatch { vnode: self.vnode, fingerprint, time_ns: now });
        }
        self.write_states(touched, &mut batch);
        (batch, failure.map_or(Ok(report), Err))
    }

    fn ingest_log(
        &mut self,
        record: ExtractedLog,
        config: &RuntimeConfig,
        now: u64,
        LogBatchOut { report, batch, touched }: &mut LogBatchOut,
    ) -> Result<(), Error> {
        let normalize = &config.rules.config.normalize;
        self.ensure_partition(record.partition, &record.entity)?;
        if let Some(rejection) = too_far_in_future(&record, normalize, now) {
            report.reject(&rejection, || format!("log record of {}", record.entity));
            return Ok(());
        }
        let view = record.record.view();
        let decision = tollgate_rules::decide_on(&view, &config.rules.config.sampling, &config.pricing);
        for field in &decision.malformed {
            metrics::counter!(m::LOGS_MALFORMED, "field" => *field).increment(1);
        }
        let Some(kind) = decision.kind else {
            report.drop_items(DropReason::NotClassified, 1);
            return Ok(());
        };
        // A kept record is stored under its fingerprint: a copy of one this owner kept already
        // (the same record twice in an export, or again in another export) is a duplicate,
        // neither stored nor counted again (it was counted twice and stored once).
        // Marked as kept only once nothing can fail (below): a record marked and then failed
        // would have its retry taken for a copy, and be lost.
        let fingerprint = if decision.keep() {
            let fingerprint = self.log_fingerprinter.fingerprint(&record.entity, &view);
            let store = &self.context.store;
            let newest = match self.newest_kept.entry(record.partition) {
                std::collections::hash_map::Entry::Occupied(entry) => *entry.get(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    *entry.insert(store.newest_log_time(self.vnode, record.partition)?)
                }
            };
            // Records mostly come in time order: a store read only for one not newer than the
            // newest kept (a copy has its original's time).
            if self.kept_in_flight.contains_key(&fingerprint)
                || (record.time_ns <= newest
                    && store.has_log(self.vnode, record.partition, record.time_ns, fingerprint)?)
            {
                report.duplicates += 1;
                return Ok(());
            }
            Some(fingerprint)
        } else {
            None
        };
        let minute = minute_of(record.time_ns) as u64;
        let rolled_until = self.partitions[&record.partition].rolled_until;
        // Each counter with its series id, and whether this owner knew it already.
        let mut counters: Vec<(LogCounter, SeriesId, bool)> = Vec::with_capacity(1 + decision.reasons.len());
        let mut new_series = Vec::new();
        for counter in log_counters(&decision) {
            let (id, known) = match self.log_counters.get(&(record.partition, counter)) {
                Some(id) => (*id, true),
                None => {
                    let key = counter.key(&record.entity);
                    let id = key.id();
                    if self.context.store.series(self.vnode, record.partition, id)?.is_none() {
                        new_series.push((id, key));
                    }
                    (id, false)
                }
            };
            counters.push((counter, id, known));
            for &state_key in state_keys(id, minute, rolled_until).iter() {
                self.load_state(state_key)?;
            }
        }
        // Nothing below can fail.
        for (id, key) in new_series {
            batch.push(Op::Series { vnode: self.vnode, partition: record.partition, id, key });
        }
        let increment = log_increment();
        let delta = Delta {
            count: 0,
            sum: increment.sum,
            min: None,
            max: None,
            bounds: &increment.bounds,
            buckets: &[],
            cost: Fixed::ZERO,
            unpriced: Fixed::ZERO,
        };
        for (counter, id, known) in counters {
            if !known {
                self.log_counters.insert((record.partition, counter), id);
            }
            for &state_key in state_keys(id, minute, rolled_until).iter() {
                if let Some(state) = self.cache.get_mut(&state_key) {
                    state.merge_delta(&delta);
                    touched.insert(state_key);
                }
            }
        }
        self.note_entity(record.partition, record.time_ns, batch);
        self.note_log_minute(record.partition, record.time_ns, batch);
        let Some(fingerprint) = fingerprint else {
            report.drop_items(DropReason::Sampled, 1);
            return Ok(());
        };
        if let Some(newest) = self.newest_kept.get_mut(&record.partition) {
            *newest = (*newest).max(record.time_ns);
        }
        // This batch is the next one handed to the writer.
        self.kept_in_flight.insert(fingerprint, self.submitted + 1);
        for reason in &decision.reasons {
            metrics::counter!(m::LOGS_KEPT, "reason" => reason.as_str()).increment(1);
        }
        report.merged += 1;
        batch.push(Op::Log {
            vnode: self.vnode,
            partition: record.partition,
            log: stored_log(&record, &view, fingerprint, kind, &decision),
        });
        Ok(())
    }

    /// Waits until every batch handed to the writer so far is durable; fails at once when one of
    /// them failed (a failed store never makes the rest durable: waiting out the timeout made
    /// every owner with a failed write hold the node's stop for 30 s).
    async fn settle(&mut self) -> Result<(), Error> {
        let target = self.submitted;
        let mut durable = self.durable.subscribe();
        let settled = tokio::time::timeout(Duration::from_secs(30), async {
            durable.wait_for(|d| d.highest >= target || d.failed).await.map(|d| d.highest >= target).unwrap_or(false)
        })
        .await;
        match settled {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Unavailable("a write failed: the store has failed".into())),
            Err(_) => Err(Error::Unavailable("writes did not become durable".into())),
        }
    }

    async fn maintain(&mut self) -> Result<(), Error> {
        self.settle().await?;
        // Everything is durable (settled above): the minutes series moved on from leave.
        self.drop_retired();
        let config = self.config();
        let normalize = &config.rules.config.normalize;
        let now = self.context.clock.now_ns();
        // Aggregates: at most the newest two minutes of each partition, where nearly every point
        // lands; the rest is durable and is read back if a late point needs it.
        let open_from: FastMap<u64, u64> = self
            .table
            .clocks()
            .map(|(partition, clock)| {
                (*partition, clock.newest_minute_ns.map_or(0, |newest| newest / NANOS_PER_MINUTE).saturating_sub(1))
            })
            .collect();
        let keep_minutes: FastMap<SeriesId, u64> = self
            .table
            .iter()
            .map(|(id, entry)| (*id, open_from.get(&entry.key.entity.partition_hash()).copied().unwrap_or(u64::MAX)))
            .collect();
        let before = self.cache.len();
        self.cache.retain(|(id, resolution, period), _| {
            *resolution == Resolution::Minute && keep_minutes.get(id).is_some_and(|open| *period >= *open)
        });
        shrink_if_sparse(&mut self.cache);
        // Series idle for two lateness windows leave memory; their cursor is in the store.
        let idle_before = now.saturating_sub(2 * normalize.max_lateness_seconds * 1_000_000_000);
        let evicted = self.table.evict_idle(idle_before);
        for key in &evicted {
            self.context.cardinality.remove(&key.entity.service);
        }
        metrics::gauge!(m::SERIES_ACTIVE).decrement(evicted.len() as f64);
        let forget_before = now.saturating_sub(normalize.max_lateness_seconds * 1_000_000_000);
        self.log_batches.retain(|_, time| *time >= forget_before);
        shrink_if_sparse(&mut self.log_batches);
        debug!(
            vnode = self.vnode,
            evicted_states = before - self.cache.len(),
            evicted_series = evicted.len(),
            "owner maintenance"
        );
        if self.owned {
            self.roll_up(&config, now).await
        } else {
            // A vnode owned elsewhere gets no more points here: every minute is closed.
            self.roll_up_everything().await
        }
    }

    /// Rolls every stored minute of the vnode's partitions up (the vnode is not owned here).
    async fn roll_up_everything(&mut self) -> Result<(), Error> {
        self.settle().await?;
        for (partition, (clock, log_newest)) in self.stored_clocks()? {
            let Some(newest) = clock.and_then(|c| c.newest_minute_ns).max(log_newest) else { continue };
            self.roll_up_partition(partition, newest / NANOS_PER_MINUTE + 1, 1).await?;
        }
        Ok(())
    }

    /// Each partition of the vnode with its stored clock and the newest minute of its stored log
    /// clock (a partition may have either or both).
    fn stored_clocks(&self) -> Result<BTreeMap<u64, Clocks>, Error> {
        let store = &self.context.store;
        let mut clocks: BTreeMap<u64, Clocks> = BTreeMap::new();
        for (partition, clock) in store.clocks_of_vnode(self.vnode)? {
            clocks.entry(partition).or_default().0 = Some(clock);
        }
        for (partition, clock) in store.log_clocks_of_vnode(self.vnode)? {
            clocks.entry(partition).or_default().1 = clock.newest_minute_ns;
        }
        Ok(clocks)
    }

    /// Merges closed minutes into hour and day states, partition by partition, and advances each
    /// partition's frontier in the same batch. A minute is closed when it lies a lateness window
    /// behind its partition's newest minute, or when the partition went quiet (its newest minute
    /// is a lateness window behind `now`: a stopped pod, an idle service): then all its minutes
    /// are closed, or they would stay unrolled until retention deletes them. A point that still
    /// arrives for a closed minute also updates its hour and day ([`state_keys`]). A partition
    /// that is not quiet is rolled up once it has [`ROLLUP_MINUTES`] closed minutes. Minutes half
    /// their retention old are closed whatever the lateness window (it may be longer than the
    /// retention: up to a day, against at least an hour), or the sweep would delete them before
    /// they are rolled up; a point that arrives for one later still reaches its hour and day.
    async fn roll_up(&mut self, config: &RuntimeConfig, now: u64) -> Result<(), Error> {
        let normalize = &config.rules.config.normalize;
        // In-memory clocks are newer than stored ones only by batches not yet durable; the owner
        // settled before maintenance, so the stored clocks are current.
        for (partition, (clock, log_newest)) in self.stored_clocks()? {
            // The newest minute of the partition's points or access logs.
            let Some(newest) = clock.and_then(|c| c.newest_minute_ns).max(log_newest) else { continue };
            let quiet = newest < now.saturating_sub(normalize.lateness_ns());
            let expiring_ns = now.saturating_sub(self.context.minute_retention_ns / 2).min(newest + NANOS_PER_MINUTE);
            // A lateness window behind the newest point (the points' lateness follows it), or
            // behind the newest access log of a partition without points.
            let behind = match clock {
                Some(clock) if clock.newest_minute_ns.is_some() => clock.oldest_accepted_ns(normalize),
                _ => newest.saturating_sub(normalize.lateness_ns()),
            };
            let closed_ns = if quiet { newest + NANOS_PER_MINUTE } else { behind.max(expiring_ns) };
            let at_least = if quiet { 1 } else { ROLLUP_MINUTES };
            self.roll_up_partition(partition, closed_ns.div_ceil(NANOS_PER_MINUTE), at_least).await?;
        }
        Ok(())
    }

    /// Merges the partition's minutes before `closed` that are not rolled up yet into hour and
    /// day states, and moves its frontier to `closed`, in one batch; only if that is at least
    /// `at_least` minutes (at least 1).
    async fn roll_up_partition(&mut self, partition: u64, closed: u64, at_least: u64) -> Result<(), Error> {
        let store = Arc::clone(&self.context.store);
        let rolled_until = store.rolled_until(self.vnode, partition)?;
        if closed.saturating_sub(rolled_until) < at_least {
            return Ok(());
        }
        let (rollups, minutes) = self.rollup_states(partition, rolled_until, closed)?;
        let mut batch = StoreBatch::default();
        for ((id, resolution, period), state) in rollups {
            batch.push(Op::State { vnode: self.vnode, id, resolution, period, state });
        }
        batch.push(Op::RolledUntil { vnode: self.vnode, partition, minute: closed });
        durable(store.commit(batch).await?).await?;
        metrics::counter!(m::ROLLED_UP_MINUTES).increment(minutes);
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.rolled_until = closed;
        }
        Ok(())
    }

    /// The hour and day states of a partition with its stored minutes in `[from, to)` merged in,
    /// and how many minute states that was.
    fn rollup_states(&self, partition: u64, from: u64, to: u64) -> Result<(FastMap<StateKey, Aggregate>, u64), Error> {
        let store = &self.context.store;
        let mut rollups: FastMap<StateKey, Aggregate> = FastMap::default();
        let mut minutes = 0u64;
        for id in store.series_ids_of_partition(self.vnode, partition)? {
            for (minute, state) in store.states(self.vnode, id, Resolution::Minute, from, to)? {
                minutes += 1;
                for resolution in [Resolution::Hour, Resolution::Day] {
                    let period = resolution.period_of(minute);
                    let entry = match rollups.entry((id, resolution, period)) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(store.state(self.vnode, id, resolution, period)?.unwrap_or_default())
                        }
                    };
                    entry.merge(&state);
                }
            }
        }
        Ok((rollups, minutes))
    }

    /// Merges a hand-over into the store (the vnode is not owned here yet, so nothing else
    /// writes it): series keys, cursors, bounds and log batches are copied; clocks keep
    /// the newer minute. The minutes this node merged before stay as they are.
    async fn import(
        &mut self,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        marker: Option<(String, Vec<u8>)>,
    ) -> Result<(), Error> {
        self.settle().await?;
        let store = Arc::clone(&self.context.store);
        let imported = crate::store::handoff::Imported::parse(entries)?;
        let mut batch = StoreBatch::default();
        if let Some((key, value)) = marker {
            batch.push(Op::Meta { key, value });
        }
        for (key, value) in imported.raw {
            batch.push(Op::PutRaw { key, value });
        }
        for (partition, clock) in imported.clocks {
            let merged = match store.clock(self.vnode, partition)? {
                Some(existing) if existing.newest_minute_ns > clock.newest_minute_ns => existing,
                _ => clock,
            };
            batch.push(Op::Clock { vnode: self.vnode, partition, clock: merged });
        }
        let count = batch.ops.len();
        durable(store.commit(batch).await?).await?;
        debug!(vnode = self.vnode, writes = count, "imported a vnode hand-over");
        Ok(())
    }
}

/// Closed minutes a partition that is still sending gathers before they are rolled up. A roll-up
/// lists the partition's series and reads and rewrites each one's hour and day states: rolling up
/// ten minutes at once does that once instead of ten times (with one export a minute, roll-ups a
/// minute at a time cost the node more CPU than the ingest itself, docs/benchmarks-history.md step
/// 36). Queries read the minutes after the frontier as minutes, so answers do not change; the
/// frontier lags a partition's newest minute by at most `max_lateness` and this many minutes, and
/// no minute stays unrolled past half the minutes' retention and this many minutes.
const ROLLUP_MINUTES: u64 = 10;

/// What a batch of points changed and must write.
#[derive(Default)]
struct Touched {
    /// Aggregates merged into.
    states: FastSet<StateKey>,
    /// Series whose cursor moved, with their partition.
    cursors: FastMap<SeriesId, u64>,
}

/// The refusal of a log record stamped more than `max_future_seconds` ahead of `now_ns`.
fn too_far_in_future(
    record: &ExtractedLog,
    normalize: &tollgate_rules::normalize::NormalizeConfig,
    now_ns: u64,
) -> Option<Rejection> {
    (record.time_ns > now_ns.saturating_add(normalize.max_future_seconds * 1_000_000_000)).then(|| {
        Rejection::new(
            RejectReason::TooFarInFuture,
            format!("time {} is more than {} s ahead of the clock", record.time_ns, normalize.max_future_seconds),
        )
    })
}

/// The aggregates a merge into `minute` updates: the minute, and also its hour and day when the
/// minute is behind the partition's roll-up frontier (those were rolled up already).
fn state_keys(id: SeriesId, minute: u64, rolled_until: u64) -> StateKeys {
    let minute_key = (id, Resolution::Minute, minute);
    if minute < rolled_until {
        let hour = (id, Resolution::Hour, Resolution::Hour.period_of(minute));
        let day = (id, Resolution::Day, Resolution::Day.period_of(minute));
        StateKeys { keys: [minute_key, hour, day], len: 3 }
    } else {
        StateKeys { keys: [minute_key; 3], len: 1 }
    }
}

/// One to three [`StateKey`]s, on the stack: [`state_keys`] runs for every point and counter.
struct StateKeys {
    keys: [StateKey; 3],
    len: usize,
}

impl std::ops::Deref for StateKeys {
    type Target = [StateKey];

    fn deref(&self) -> &[StateKey] {
        &self.keys[..self.len]
    }
}

/// The stored form of a kept record.
fn stored_log(
    record: &ExtractedLog,
    view: &LogView<'_>,
    fingerprint: u128,
    kind: tollgate_rules::LogKind,
    decision: &tollgate_rules::LogDecision,
) -> StoredLog {
    let attributes = view
        .attributes
        .iter()
        .map(|(key, value)| {
            (
                String::from_utf8_lossy(key).into_owned(),
                tollgate_rules::logrecord::value(*value).into_text().into_owned(),
            )
        })
        .collect();
    let body = view.body_text().map(Cow::into_owned);
    StoredLog {
        time_ns: record.time_ns,
        fingerprint,
        service: record.entity.service.clone(),
        instance: record.entity.instance.clone(),
        kind,
        reasons: decision.reasons.iter().map(|r| r.as_str().to_string()).collect(),
        model: decision.model.clone(),
        provider: decision.provider.clone(),
        input_tokens: decision.input_tokens,
        output_tokens: decision.output_tokens,
        total_tokens: decision.total_tokens,
        cost: decision.cost,
        response_code: decision.response_code,
        duration_ms: decision.duration_ms,
        session_id: decision.session_id.clone(),
        attributes,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cardinality_limits_per_service_and_per_node() {
        let counts = Cardinality::new(3);
        assert_eq!(counts.try_add("a", 2), Ok(()));
        assert_eq!(counts.try_add("a", 2), Ok(()));
        assert_eq!(counts.try_add("a", 2), Err(Full::Service(2)));
        assert_eq!(counts.try_add("b", 2), Ok(()));
        assert_eq!(counts.try_add("c", 2), Err(Full::Node(3)), "the node is full whatever the service");
        // Series leaving memory make room; a service never seen is not counted down.
        counts.remove("zzz");
        assert_eq!(counts.try_add("d", 2), Err(Full::Node(3)));
        counts.remove("a");
        assert_eq!(counts.try_add("d", 2), Ok(()));
        assert_eq!(counts.try_add("a", 2), Err(Full::Node(3)));
        let unlimited = Cardinality::new(0);
        for _ in 0..1000 {
            assert_eq!(unlimited.try_add("e", usize::MAX), Ok(()));
        }
    }
}
