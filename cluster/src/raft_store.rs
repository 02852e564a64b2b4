//! The Raft log and state machine, on sled.
//!
//! One sled database (`<data_dir>/raft`, apart from the node's data store) holds three trees:
//! - `logs`: the log entries, keyed by their big-endian index so that key order is log order;
//! - `meta`: the vote, the last committed and the last purged log id;
//! - `state`: the applied state machine and the current snapshot.
//!
//! Everything is serde_json: openraft's types are serde but rely on attributes (and the rules
//! documents on `skip_serializing_if`) that a positional format such as postcard cannot read
//! back.
//!
//! sled is opened without its background flusher: every write openraft must be able to rely on
//! after a crash is flushed explicitly before it is reported done.

use crate::raft::TypeConfig;
use crate::state::{ClusterState, CommandResponse};
use futures_util::{Stream, StreamExt};
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{abort, TransactionError};
use sled::Transactional;
use std::fmt;
use std::fmt::{Debug, Display};
use std::io;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;
type Vote = VoteOf<TypeConfig>;
type StoredMembership = StoredMembershipOf<TypeConfig>;
type SnapshotMeta = SnapshotMetaOf<TypeConfig>;
type Snapshot = SnapshotOf<TypeConfig, SnapshotData>;

/// The bytes of a snapshot: the last applied log id, the membership and the [`ClusterState`],
/// as JSON.
pub type SnapshotData = Cursor<Vec<u8>>;

/// sled's page cache: the replicated state is small, the log is short once snapshots purge it.
const CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;

const LOGS_TREE: &str = "logs";
const META_TREE: &str = "meta";
const STATE_TREE: &str = "state";

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const LAST_PURGED_KEY: &str = "last_purged";

const APPLIED_KEY: &str = "applied";
const SNAPSHOT_META_KEY: &str = "snapshot_meta";
const SNAPSHOT_DATA_KEY: &str = "snapshot_data";

/// Opens (or creates) the Raft database in `dir` and returns the node's log store and state
/// machine, which share it.
///
/// `dir` must not be the node's data store: the Raft database is a sled database of its own.
///
/// A database locked by another handle (a Raft instance still shutting down, a process still
/// exiting) is an error of kind [`io::ErrorKind::WouldBlock`]; [`open_waiting`] waits for it.
pub fn open(dir: impl AsRef<Path>) -> io::Result<(LogStore, StateMachine)> {
    let dir = dir.as_ref();
    let db = sled::Config::new().path(dir).cache_capacity(CACHE_CAPACITY_BYTES).flush_every_ms(None).open().map_err(
        |e| {
            if sled_lock_held(&e) {
                let what =
                    format!("raft store: the raft database in {} is in use (its lock is held): {e}", dir.display());
                io::Error::new(io::ErrorKind::WouldBlock, what)
            } else {
                other(format!("opening the raft database in {}", dir.display()), e)
            }
        },
    )?;
    Ok((LogStore::open(&db)?, StateMachine::open(&db)?))
}

/// Whether sled failed to open because another handle holds the database's lock (sled 0.34
/// reports it as an I/O error of kind `Other` with this text). The node's data store and the
/// raft store both wait for it, up to [`SLED_LOCK_WAIT`].
pub fn sled_lock_held(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock"))
}

/// How long an open waits for a sled database's lock: a database dropped in this process
/// releases it once sled's background threads (and, for the raft store, Raft's tasks) let go of
/// their handles, which can take a moment on a busy machine.
pub const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// [`open`], waiting up to [`SLED_LOCK_WAIT`] for a lock held by a Raft instance whose tasks are
/// still dropping their handles after `shutdown` (an in-process restart) or by a process that is
/// exiting, as the node's data store waits for its own. It yields while it waits, so that those
/// tasks can finish even on a single-threaded runtime.
pub async fn open_waiting(dir: impl AsRef<Path>) -> io::Result<(LogStore, StateMachine)> {
    let started = std::time::Instant::now();
    loop {
        match open(dir.as_ref()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < SLED_LOCK_WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            opened => return opened,
        }
    }
}

/// The Raft log: entries, vote, committed and last purged log id.
///
/// It is its own log reader: clones share the sled trees, so a reader sees every entry as soon
/// as [`RaftLogStorage::append`] has written it.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
}

// sled's own `Debug` prints every key and value.
impl Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    fn open(db: &sled::Db) -> io::Result<LogStore> {
        Ok(LogStore { db: db.clone(), logs: open_tree(db, LOGS_TREE)?, meta: open_tree(db, META_TREE)? })
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let what = format!("raft meta {key}");
        let bytes = self.meta.get(key).map_err(|e| other(format!("reading {what}"), e))?;
        bytes.map(|bytes| decode(&what, &bytes)).transpose()
    }

    async fn write_meta<T: Serialize>(&mut self, key: &str, value: &T) -> io::Result<()> {
        let what = format!("raft meta {key}");
        let bytes = encode(&what, value)?;
        self.meta.insert(key, bytes).map_err(|e| other(format!("writing {what}"), e))?;
        flush(&self.db, &what).await
    }

    async fn append_and_flush(&mut self, entries: impl IntoIterator<Item = Entry>) -> io::Result<()> {
        // One batch: a crash leaves all of the entries or none, never a hole.
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.log_id.index), encode("a log entry", &entry)?);
        }
        self.logs.apply_batch(batch).map_err(|e| other("appending log entries", e))?;
        flush(&self.db, "log entries").await
    }

    fn last_log_id(&self) -> io::Result<Option<LogId>> {
        let last = self.logs.last().map_err(|e| other("reading the last log entry", e))?;
        last.map(|(_, bytes)| decode::<Entry>("the last log entry", &bytes).map(|entry| entry.log_id)).transpose()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let Some((start, end)) = index_range(&range) else { return Ok(Vec::new()) };
        let iter = match end {
            Some(end) => self.logs.range(index_key(start)..index_key(end)),
            None => self.logs.range(index_key(start)..),
        };
        let mut entries: Vec<Entry> = Vec::new();
        for item in iter {
            let (_, bytes) = item.map_err(|e| other(format!("reading log entries {range:?}"), e))?;
            let entry: Entry = decode("a log entry", &bytes)?;
            // Purged or not yet appended entries may be missing at either end, but a gap inside
            // means the log is damaged, and openraft must not be handed non-consecutive entries.
            if let Some(previous) = entries.last() {
                if entry.log_id.index != previous.log_id.index + 1 {
                    return Err(io::Error::other(format!(
                        "raft log has a hole: entry {} follows entry {}",
                        entry.log_id.index, previous.log_id.index
                    )));
                }
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(VOTE_KEY)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED_KEY)?;
        // Purging removes the entries and records the purged id in one transaction, so any entry
        // left is newer than the purged id.
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.write_meta(VOTE_KEY, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not flushed: openraft calls this on every commit, and the committed id only saves
        // re-applying entries on restart. An older value on disk is always safe (the state
        // machine persists what it applied), and the next flush of an append, vote or apply
        // makes this one durable too.
        let what = "raft meta committed";
        let bytes = encode(what, &committed)?;
        self.meta.insert(COMMITTED_KEY, bytes).map_err(|e| other(format!("writing {what}"), e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED_KEY)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Reported only once flushed: openraft counts an acknowledged entry towards the quorum.
        match self.append_and_flush(entries).await {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let first_removed = last_log_id.map_or(0, |id| id.index + 1);
        let mut batch = sled::Batch::default();
        for item in self.logs.range(index_key(first_removed)..) {
            let (key, _) = item.map_err(|e| other("reading log entries to truncate", e))?;
            batch.remove(key);
        }
        // One batch: a crash cannot leave the middle removed and the tail present.
        self.logs.apply_batch(batch).map_err(|e| other("truncating the log", e))?;
        flush(&self.db, "log truncation").await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut keys = Vec::new();
        for item in self.logs.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(|e| other("reading log entries to purge", e))?;
            keys.push(key);
        }
        let purged = encode("raft meta last_purged", &log_id)?;
        // One transaction over both trees: the purged id must never lag behind removed entries,
        // or the log would appear to start after a hole.
        (&self.logs, &self.meta)
            .transaction(|(logs, meta)| {
                for key in &keys {
                    logs.remove(key)?;
                }
                meta.insert(LAST_PURGED_KEY, purged.clone())?;
                Ok(())
            })
            .map_err(|e: TransactionError<io::Error>| other(format!("purging the log up to {log_id}"), e))?;
        flush(&self.db, "log purge").await
    }
}

/// What the application sees of the replicated state: the state after the last applied entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppliedState {
    /// The replicated state.
    pub state: ClusterState,
    /// Index of the last log entry applied to it; `None` before the first one.
    pub last_applied_index: Option<u64>,
}

/// The state machine as persisted after every apply batch, and the contents of a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct PersistedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: ClusterState,
}

impl PersistedState {
    fn applied_state(&self) -> Arc<AppliedState> {
        Arc::new(AppliedState {
            state: self.state.clone(),
            last_applied_index: self.last_applied.as_ref().map(|id| id.index),
        })
    }
}

/// The Raft state machine: applies committed commands to the [`ClusterState`], persists it after
/// every batch and publishes it to its subscribers ([`StateMachine::subscribe`]).
pub struct StateMachine {
    db: sled::Db,
    tree: sled::Tree,
    current: PersistedState,
    applied: watch::Sender<Arc<AppliedState>>,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachine")
            .field("last_applied", &self.current.last_applied)
            .field("membership", &self.current.membership)
            .finish_non_exhaustive()
    }
}

impl StateMachine {
    fn open(db: &sled::Db) -> io::Result<StateMachine> {
        let tree = open_tree(db, STATE_TREE)?;
        let bytes = tree.get(APPLIED_KEY).map_err(|e| other("reading the applied state", e))?;
        let current: PersistedState =
            bytes.map(|bytes| decode("the applied state", &bytes)).transpose()?.unwrap_or_default();
        let (applied, _) = watch::channel(current.applied_state());
        Ok(StateMachine { db: db.clone(), tree, current, applied })
    }

    /// The applied state, now and after every change (apply batch or installed snapshot).
    ///
    /// Subscribe before handing the state machine to [`crate::raft::Raft`], which takes it.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AppliedState>> {
        self.applied.subscribe()
    }

    /// Persists the in-memory state, then publishes it: what subscribers see is durable.
    async fn persist(&mut self) -> io::Result<()> {
        let bytes = encode("the applied state", &self.current)?;
        self.tree.insert(APPLIED_KEY, bytes).map_err(|e| other("writing the applied state", e))?;
        flush(&self.db, "the applied state").await?;
        self.applied.send_replace(self.current.applied_state());
        Ok(())
    }

    fn apply_entry(&mut self, entry: Entry) -> CommandResponse {
        let response = match entry.payload {
            EntryPayload::Normal(command) => self.current.state.apply(&command),
            EntryPayload::Membership(membership) => {
                self.current.membership = StoredMembership::new(Some(entry.log_id), membership);
                CommandResponse::Applied { version: 0 }
            }
            EntryPayload::Blank => CommandResponse::Applied { version: 0 },
        };
        self.current.last_applied = Some(entry.log_id);
        response
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.current.last_applied, self.current.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut answers = Vec::new();
        let mut applied_any = false;
        let mut read_error = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = match item {
                Ok(item) => item,
                Err(e) => {
                    // What was applied so far is still persisted and answered below.
                    read_error = Some(e);
                    break;
                }
            };
            let response = self.apply_entry(entry);
            applied_any = true;
            if let Some(responder) = responder {
                answers.push((responder, response));
            }
        }
        let persisted = if applied_any { self.persist().await } else { Ok(()) };
        // Answered after publishing, so that a client whose write returned finds it in the
        // applied state. Answered even when persisting failed: the entries are committed in the
        // log, so their outcome stands, and an unanswered client would wait forever.
        for (responder, response) in answers {
            responder.send(response);
        }
        persisted?;
        match read_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), tree: self.tree.clone(), view: self.current.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Self::SnapshotData) -> Result<(), io::Error> {
        let bytes = snapshot.into_inner();
        let installed: PersistedState = decode("an installed snapshot", &bytes)?;
        if installed.last_applied != meta.last_log_id || installed.membership != meta.last_membership {
            return Err(io::Error::other(format!(
                "installed snapshot does not match its metadata {meta}: it holds last applied {:?}, membership {}",
                installed.last_applied, installed.membership
            )));
        }
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED_KEY, encode("the applied state", &installed)?);
        batch.insert(SNAPSHOT_META_KEY, encode("snapshot metadata", meta)?);
        batch.insert(SNAPSHOT_DATA_KEY, bytes);
        // One batch: after a crash the state machine is either the old one or the snapshot's.
        self.tree.apply_batch(batch).map_err(|e| other(format!("installing snapshot {meta}"), e))?;
        flush(&self.db, "an installed snapshot").await?;
        self.current = installed;
        self.applied.send_replace(self.current.applied_state());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        read_snapshot(&self.tree)
    }
}

/// Builds a snapshot of the state machine as it was when the builder was made.
pub struct SnapshotBuilder {
    db: sled::Db,
    tree: sled::Tree,
    view: PersistedState,
}

impl Debug for SnapshotBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotBuilder").field("last_applied", &self.view.last_applied).finish_non_exhaustive()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let meta = SnapshotMeta { last_log_id: self.view.last_applied, last_membership: self.view.membership.clone() };
        let bytes = encode("a snapshot", &self.view)?;
        let meta_bytes = encode("snapshot metadata", &meta)?;
        // Building runs beside the state machine, which may install a newer snapshot meanwhile;
        // that one must stay the current snapshot.
        let stored = self.tree.transaction(|tx| {
            if let Some(current) = tx.get(SNAPSHOT_META_KEY)? {
                let current: SnapshotMeta = match decode("snapshot metadata", &current) {
                    Ok(current) => current,
                    Err(e) => return abort(e),
                };
                if current.last_log_id > meta.last_log_id {
                    return Ok(false);
                }
            }
            tx.insert(SNAPSHOT_META_KEY, meta_bytes.clone())?;
            tx.insert(SNAPSHOT_DATA_KEY, bytes.clone())?;
            Ok(true)
        });
        match stored {
            Ok(true) => flush(&self.db, "a snapshot").await?,
            Ok(false) => {
                tracing::debug!(snapshot = %meta, "a newer snapshot was installed meanwhile; keeping it as the current one");
            }
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(other(format!("storing snapshot {meta}"), e)),
        }
        Ok(Snapshot { meta, snapshot: Cursor::new(bytes) })
    }
}

fn read_snapshot(tree: &sled::Tree) -> io::Result<Option<Snapshot>> {
    // A transaction for a consistent pair: a snapshot builder may be replacing both.
    let (meta, data) = tree
        .transaction(|tx| {
            Ok::<_, sled::transaction::ConflictableTransactionError<io::Error>>((
                tx.get(SNAPSHOT_META_KEY)?,
                tx.get(SNAPSHOT_DATA_KEY)?,
            ))
        })
        .map_err(|e| other("reading the current snapshot", e))?;
    match (meta, data) {
        (Some(meta), Some(data)) => {
            let meta: SnapshotMeta = decode("snapshot metadata", &meta)?;
            Ok(Some(Snapshot { meta, snapshot: Cursor::new(data.to_vec()) }))
        }
        (None, None) => Ok(None),
        _ => Err(io::Error::other("the current snapshot is missing its metadata or its data")),
    }
}

/// The half-open index range `[start, end)` of `range` (`end` `None`: unbounded), or `None` when
/// it is empty.
fn index_range(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        // `..=u64::MAX` is as unbounded as it gets.
        Bound::Included(&end) => end.checked_add(1),
        Bound::Excluded(&end) => Some(end),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if end <= start => None,
        _ => Some((start, end)),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn open_tree(db: &sled::Db, name: &str) -> io::Result<sled::Tree> {
    db.open_tree(name).map_err(|e| other(format!("opening the raft tree {name}"), e))
}

/// Writes all of the database to disk: openraft is told an IO is done only after this.
async fn flush(db: &sled::Db, what: &str) -> io::Result<()> {
    let db = db.clone();
    // fsync blocks: keep it off the async workers, which run Raft's timers and network.
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| other(format!("flushing {what}"), e))?
        .map_err(|e| other(format!("flushing {what}"), e))?;
    Ok(())
}

fn encode<T: Serialize + ?Sized>(what: &str, value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| other(format!("encoding {what}"), e))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| other(format!("decoding {what}"), e))
}

fn other(context: impl Display, error: impl Display) -> io::Error {
    io::Error::other(format!("raft store: {context}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, PeerNode};
    use openraft::entry::RaftEntry;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;
    use openraft::{Membership, StorageError};
    use std::collections::{BTreeMap, BTreeSet};
    use tempfile::TempDir;
    use tollgate_rules::PricingDocument;

    struct TempStoreBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for TempStoreBuilder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let write_error = |e: io::Error| StorageError::write(TypeConfig::err_from_error(&e));
            let dir = tempfile::tempdir().map_err(write_error)?;
            let (log_store, state_machine) = open(dir.path()).map_err(write_error)?;
            Ok((dir, log_store, state_machine))
        }
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(term, 1), index)
    }

    fn node(name: &str) -> PeerNode {
        PeerNode { name: name.into(), cluster_addr: format!("{name}:11900"), api_addr: format!("{name}:12800") }
    }

    fn membership() -> Membership<u64, PeerNode> {
        let nodes = BTreeMap::from([(1, node("a")), (2, node("b"))]);
        Membership::new(vec![BTreeSet::from([1, 2])], nodes).expect("a valid membership")
    }

    fn pricing() -> PricingDocument {
        PricingDocument::parse(tollgate_rules::pricing::BUILT_IN_PRICING).expect("the built-in pricing parses")
    }

    /// Blank, membership, bootstrap and a pricing change at indexes 1..=4.
    fn entries() -> Vec<Entry> {
        vec![
            Entry::new_blank(log_id(1, 1)),
            Entry::new_membership(log_id(1, 2), membership()),
            Entry::new_normal(log_id(1, 3), Command::Bootstrap { vnodes: 8, id: 1, node: node("a") }),
            Entry::new_normal(log_id(1, 4), Command::SetPricing(pricing())),
        ]
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("the flush is reported").expect("the flush succeeds");
    }

    async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) {
        let items = entries.into_iter().map(|entry| Ok((entry, None)));
        sm.apply(futures_util::stream::iter(items)).await.expect("apply");
    }

    #[tokio::test]
    async fn test_raft_store_passes_openraft_suite() {
        Suite::test_all(TempStoreBuilder).await.expect("openraft's storage suite");
    }

    #[tokio::test]
    async fn test_raft_store_reopens_with_everything_written() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(1, 1);
        {
            let (mut log_store, mut state_machine) = open(dir.path()).unwrap();
            let subscriber = state_machine.subscribe();
            append(&mut log_store, entries()).await;
            log_store.save_vote(&vote).await.unwrap();
            log_store.save_committed(Some(log_id(1, 4))).await.unwrap();
            log_store.purge(log_id(1, 1)).await.unwrap();
            apply(&mut state_machine, entries()).await;

            let applied = subscriber.borrow().clone();
            assert_eq!(applied.last_applied_index, Some(4));
            assert_eq!(applied.state.pricing.as_ref().map(|p| p.version), Some(1));
        }

        let (mut log_store, mut state_machine) = open(dir.path()).unwrap();
        let state = log_store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1)));
        assert_eq!(state.last_log_id, Some(log_id(1, 4)));
        let mut reader = log_store.get_log_reader().await;
        assert_eq!(reader.try_get_log_entries(0..).await.unwrap(), entries()[1..].to_vec());
        assert_eq!(reader.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log_store.read_committed().await.unwrap(), Some(log_id(1, 4)));

        let (last_applied, stored_membership) = state_machine.applied_state().await.unwrap();
        assert_eq!(last_applied, Some(log_id(1, 4)));
        assert_eq!(stored_membership, StoredMembership::new(Some(log_id(1, 2)), membership()));
        let applied = state_machine.subscribe().borrow().clone();
        assert_eq!(applied.last_applied_index, Some(4));
        let stored_pricing = applied.state.pricing.as_ref().expect("pricing survives a restart");
        assert_eq!(stored_pricing.version, 1);
        assert_eq!(stored_pricing.document, pricing());
        assert!(applied.state.is_bootstrapped());
    }

    #[tokio::test]
    async fn test_raft_store_truncates_and_reads_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log_store, _state_machine) = open(dir.path()).unwrap();
        append(&mut log_store, entries()).await;
        log_store.truncate_after(Some(log_id(1, 2))).await.unwrap();
        let mut reader = log_store.get_log_reader().await;
        assert_eq!(reader.try_get_log_entries(..).await.unwrap(), entries()[..2].to_vec());
        assert_eq!(reader.try_get_log_entries(2..=2).await.unwrap(), entries()[1..2].to_vec());
        assert!(reader.try_get_log_entries(3..3).await.unwrap().is_empty());
        assert_eq!(log_store.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 2)));
    }

    #[tokio::test]
    async fn test_raft_store_snapshot_installs_into_a_fresh_store() {
        let leader_dir = tempfile::tempdir().unwrap();
        let (_leader_log, mut leader) = open(leader_dir.path()).unwrap();
        apply(&mut leader, entries()).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 4)));
        assert_eq!(snapshot.meta.last_membership, StoredMembership::new(Some(log_id(1, 2)), membership()));
        let leader_state = leader.subscribe().borrow().state.clone();

        let follower_dir = tempfile::tempdir().unwrap();
        {
            let (_follower_log, mut follower) = open(follower_dir.path()).unwrap();
            let subscriber = follower.subscribe();
            assert_eq!(subscriber.borrow().last_applied_index, None);
            follower.install_snapshot(&snapshot.meta, snapshot.snapshot.clone()).await.unwrap();
            assert_eq!(subscriber.borrow().state, leader_state);
            assert_eq!(subscriber.borrow().last_applied_index, Some(4));
        }

        // After a restart: the installed state, and the snapshot to send on.
        let (_follower_log, mut follower) = open(follower_dir.path()).unwrap();
        assert_eq!(follower.subscribe().borrow().state, leader_state);
        assert_eq!(
            follower.applied_state().await.unwrap(),
            (snapshot.meta.last_log_id, snapshot.meta.last_membership.clone())
        );
        let current = follower.get_current_snapshot().await.unwrap().expect("the installed snapshot is kept");
        assert_eq!(current.meta, snapshot.meta);
        assert_eq!(current.snapshot.into_inner(), snapshot.snapshot.into_inner());
    }

    #[tokio::test]
    async fn test_raft_store_keeps_a_newer_installed_snapshot_over_an_older_build() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        apply(&mut sm, entries()[..2].to_vec()).await;
        let mut stale_builder = sm.get_snapshot_builder().await;

        let other_dir = tempfile::tempdir().unwrap();
        let (_other_log, mut other) = open(other_dir.path()).unwrap();
        apply(&mut other, entries()).await;
        let newer = other.get_snapshot_builder().await.build_snapshot().await.unwrap();
        sm.install_snapshot(&newer.meta, newer.snapshot).await.unwrap();

        let stale = stale_builder.build_snapshot().await.unwrap();
        assert_eq!(stale.meta.last_log_id, Some(log_id(1, 2)));
        let current = sm.get_current_snapshot().await.unwrap().expect("a current snapshot");
        assert_eq!(current.meta, newer.meta);
    }

    #[tokio::test]
    async fn test_raft_store_refuses_a_snapshot_that_contradicts_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        apply(&mut sm, entries()).await;
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let mut meta = snapshot.meta.clone();
        meta.last_log_id = Some(log_id(1, 9));

        let fresh_dir = tempfile::tempdir().unwrap();
        let (_fresh_log, mut fresh) = open(fresh_dir.path()).unwrap();
        assert!(fresh.install_snapshot(&meta, snapshot.snapshot).await.is_err());
        assert_eq!(fresh.applied_state().await.unwrap().0, None);
        assert!(fresh.get_current_snapshot().await.unwrap().is_none());
    }

    /// A network for a cluster of one: there is never anyone to reach.
    struct NoNetwork;

    impl openraft::RaftNetworkFactory<TypeConfig> for NoNetwork {
        type Network = NoNetwork;

        async fn new_client(&mut self, _target: u64, _node: &PeerNode) -> NoNetwork {
            NoNetwork
        }
    }

    impl openraft::RaftNetworkV2<TypeConfig> for NoNetwork {
        type SnapshotData = SnapshotData;

        async fn append_entries(
            &mut self,
            _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
            _option: openraft::network::RPCOption,
        ) -> Result<openraft::raft::AppendEntriesResponse<TypeConfig>, openraft::error::RPCError<TypeConfig>> {
            Err(openraft::error::Unreachable::from_string("no network").into())
        }

        async fn vote(
            &mut self,
            _rpc: openraft::raft::VoteRequest<TypeConfig>,
            _option: openraft::network::RPCOption,
        ) -> Result<openraft::raft::VoteResponse<TypeConfig>, openraft::error::RPCError<TypeConfig>> {
            Err(openraft::error::Unreachable::from_string("no network").into())
        }

        async fn full_snapshot(
            &mut self,
            _vote: Vote,
            _snapshot: Snapshot,
            _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + OptionalSend + 'static,
            _option: openraft::network::RPCOption,
        ) -> Result<openraft::raft::SnapshotResponse<TypeConfig>, openraft::error::StreamingError<TypeConfig>> {
            Err(openraft::error::Unreachable::from_string("no network").into())
        }
    }

    async fn start_single_node(dir: &Path) -> (crate::raft::Raft, watch::Receiver<Arc<AppliedState>>) {
        let (log_store, state_machine) = open_waiting(dir).await.unwrap();
        let applied = state_machine.subscribe();
        let config = Arc::new(openraft::Config::default().validate().unwrap());
        let raft = crate::raft::Raft::new(1, config, NoNetwork, log_store, state_machine).await.unwrap();
        (raft, applied)
    }

    #[tokio::test]
    async fn test_raft_store_waits_for_a_held_lock() {
        let dir = tempfile::tempdir().unwrap();
        let held = open(dir.path()).unwrap();
        let error = open(dir.path()).expect_err("the database is in use");
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock, "{error}");
        assert!(error.to_string().contains("in use"), "{error}");
        // Released by a task of the same single-threaded runtime while the opener waits.
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let release = tokio::spawn({
            let released = Arc::clone(&released);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                drop(held);
                released.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        open_waiting(dir.path()).await.unwrap();
        assert!(released.load(std::sync::atomic::Ordering::SeqCst), "it waited for the release");
        release.await.unwrap();
    }

    #[tokio::test]
    async fn test_raft_store_answers_client_writes_through_raft() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (raft, applied) = start_single_node(dir.path()).await;
            raft.initialize(BTreeMap::from([(1, node("a"))])).await.unwrap();
            raft.wait(Some(std::time::Duration::from_secs(10))).current_leader(1, "a leader").await.unwrap();

            let bootstrap = Command::Bootstrap { vnodes: 8, id: 1, node: node("a") };
            let response = raft.client_write(bootstrap).await.unwrap();
            assert!(matches!(response.data, CommandResponse::Applied { .. }), "{:?}", response.data);
            let response = raft.client_write(Command::SetPricing(pricing())).await.unwrap();
            assert_eq!(response.data, CommandResponse::Applied { version: 1 });
            // Answered only once published: the write is visible as soon as it returns.
            assert_eq!(applied.borrow().last_applied_index, Some(response.log_id.index));
            assert_eq!(applied.borrow().state.pricing.as_ref().map(|p| p.version), Some(1));
            raft.shutdown().await.unwrap();
        }

        let (raft, applied) = start_single_node(dir.path()).await;
        assert!(applied.borrow().state.is_bootstrapped());
        assert_eq!(applied.borrow().state.pricing.as_ref().map(|p| p.document.clone()), Some(pricing()));
        raft.wait(Some(std::time::Duration::from_secs(10))).current_leader(1, "a leader again").await.unwrap();
        let response = raft.client_write(Command::SetPricing(pricing())).await.unwrap();
        assert_eq!(response.data, CommandResponse::Applied { version: 2 });
        raft.shutdown().await.unwrap();
    }
}
