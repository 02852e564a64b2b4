//! Reading back: metric series, services, kept logs (SPEC §7). Everything is read from the store,
//! which holds every acknowledged write, so a value is visible as soon as its export was
//! acknowledged.
//!
//! A metric query is answered in two steps, so that a cluster can spread the first:
//! [`QueryEngine::partial`] folds the states this node holds into a [`Partial`], partials merge,
//! and [`Partial::finish`] evaluates the catalogue rule.

use crate::error::Error;
use crate::ingest::vnode_of;
use crate::runtime::RuntimeConfig;
use crate::store::{EntityRecord, LogPosition, Resolution, Storage, StoredLog};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use tollgate_rules::entity::LAYER;
use tollgate_rules::{KeepReason, LogKind, MetricQuery, Partial, Scope, Step};

/// The latest time a query may name, 2500-01-01T00:00:00Z in unix seconds. Data times are
/// nanoseconds in a `u64` (up to the year 2554): with this bound, a range rounded out to whole
/// days still fits, and no computation on it overflows (a query for the year 292 billion once
/// made a node loop until it ran out of memory).
pub const LATEST_TIME: i64 = 16_725_225_600;

/// Checks that `seconds`, the time `name` of a query (as `written`), is one a query may name:
/// between 1970 and [`LATEST_TIME`]. The API checks the times it parses, a node the times of a
/// metric query a peer sends.
pub fn check_time(name: &str, seconds: i64, written: impl std::fmt::Debug) -> Result<(), Error> {
    if (0..=LATEST_TIME).contains(&seconds) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{name}: {written:?} is not between 1970-01-01T00:00:00Z and 2500-01-01T00:00:00Z"
    )))
}

/// Reads metric states, entities and logs from the store.
#[derive(Clone, Debug)]
pub struct QueryEngine {
    store: Arc<dyn Storage>,
    config: watch::Receiver<Arc<RuntimeConfig>>,
    vnodes: u16,
    max_query_points: usize,
    max_answer_points: usize,
    max_log_page: usize,
    slots: Arc<QuerySlots>,
}

/// Bounds the queries a node runs at once (`limits.max_concurrent_queries`) and those waiting
/// for a turn (four times as many): a further query is refused as overloaded (retryable) rather
/// than queued without bound on the blocking threads, where each would hold its memory and
/// slow every other.
#[derive(Debug)]
pub struct QuerySlots {
    running: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

/// Counts a query waiting for a slot while it waits (also when its request goes away).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl QuerySlots {
    /// Room for `running` queries at once (at least one) and four times as many waiting.
    pub fn new(running: usize) -> QuerySlots {
        let running = running.max(1);
        QuerySlots {
            running: Arc::new(tokio::sync::Semaphore::new(running)),
            waiting: Default::default(),
            max_waiting: 4 * running,
        }
    }

    /// Runs `work` (store reads) on a blocking thread once a slot is free.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        use std::sync::atomic::Ordering::SeqCst;
        let permit = match Arc::clone(&self.running).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let already_waiting = self.waiting.fetch_add(1, SeqCst);
                let waiting = Waiting(&self.waiting);
                if already_waiting >= self.max_waiting {
                    drop(waiting);
                    metrics::counter!(crate::metrics::OVERLOAD, "what" => "queries").increment(1);
                    return Err(Error::overloaded(format!(
                        "this node is running and queueing as many queries as it may ({} at once, \
                         limits.max_concurrent_queries, and {} waiting); retry",
                        self.max_waiting / 4,
                        self.max_waiting
                    )));
                }
                let permit = Arc::clone(&self.running).acquire_owned().await;
                drop(waiting);
                permit.map_err(|_| Error::Unavailable("the node is stopping".into()))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _slot = permit;
            work()
        })
        .await
        .map_err(|e| Error::Internal(format!("query task failed: {e}")))?
    }
}

/// `GET /api/v1/services` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Service name.
    pub name: String,
    /// Always `ENVOY_AI_GATEWAY`.
    pub layer: String,
    /// Its instances.
    pub instances: Vec<InstanceView>,
}

/// An instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Instance name.
    pub name: String,
    /// Newest data time, unix seconds.
    pub last_seen: i64,
}

/// A log query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogQuery {
    /// Service.
    pub service: String,
    /// Only this instance.
    pub instance: Option<String>,
    /// First time included, unix ns.
    pub start_ns: u64,
    /// End time, exclusive, unix ns.
    pub end_ns: u64,
    /// Only records kept for this reason.
    pub reason: Option<KeepReason>,
    /// Only this kind.
    pub kind: Option<LogKind>,
    /// Only this model.
    pub model: Option<String>,
    /// Page size.
    pub limit: usize,
    /// Continue after this position.
    pub cursor: Option<LogPosition>,
}

/// One page of logs, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogPage {
    /// The logs.
    pub logs: Vec<StoredLog>,
    /// Where the next page starts, if there may be one.
    pub next: Option<LogPosition>,
}

/// Most records examined per partition for one page (filters can skip many).
const MAX_LOG_SCAN: usize = 200_000;

/// About the most bytes of records one page holds, whatever its `limit`: a page ends after the
/// record that reaches it (so it always holds at least one), and `next` continues from there.
/// Records can be large (the body and attributes are stored whole, up to an export's 16 MiB): a
/// page of 100 records of 7 MiB was an 88 MB answer, a member's part of it more than the 64 MiB
/// a peer's answer may be (the member was then missing from every such query), and 1 000 of them
/// more memory than a node has.
pub const MAX_LOG_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// Sorts `logs` newest first and cuts them to what one page holds: `limit` records and about
/// `max_bytes` ([`MAX_LOG_PAGE_BYTES`], or unbounded for an asker that predates byte bounds).
/// True when something was cut.
fn cut_to_page(logs: &mut Vec<StoredLog>, limit: usize, max_bytes: usize) -> bool {
    logs.sort_by_key(|log| std::cmp::Reverse((log.time_ns, log.fingerprint)));
    let mut bytes = 0;
    let fit = logs
        .iter()
        .take(limit)
        .take_while(|log| {
            let fits = bytes < max_bytes;
            bytes += log.approximate_bytes();
            fits
        })
        .count();
    let cut = fit < logs.len();
    logs.truncate(fit);
    cut
}

/// The page size of a logs query that gives no `limit`, unless `limits.max_log_page` is smaller.
pub const DEFAULT_LOG_PAGE: usize = 100;

impl QueryEngine {
    /// A query engine.
    pub fn new(
        store: Arc<dyn Storage>,
        config: watch::Receiver<Arc<RuntimeConfig>>,
        vnodes: u16,
        max_query_points: usize,
        max_answer_points: usize,
        max_log_page: usize,
        max_concurrent_queries: usize,
    ) -> QueryEngine {
        let slots = Arc::new(QuerySlots::new(max_concurrent_queries));
        QueryEngine { store, config, vnodes, max_query_points, max_answer_points, max_log_page, slots }
    }

    /// The page size of a logs query that gives no `limit`: 100, or `limits.max_log_page` when
    /// that is smaller.
    pub fn default_log_page(&self) -> usize {
        DEFAULT_LOG_PAGE.min(self.max_log_page)
    }

    /// Refuses a metric answer of more than `limits.max_answer_points` values (a point per
    /// step of each group): 13 days of minutes of a metric grouped by 5 000 models was a 1.7 GB
    /// answer and 11.6 GB of the node's memory. Checked as groups appear, on every member, and
    /// on the merged answer.
    pub fn check_answer(&self, query: &MetricQuery, partial: &Partial) -> Result<(), Error> {
        // A metric without labels answers its one series even with no data (all null).
        let groups = if query.metric.rule.group_by.is_empty() { 1 } else { partial.groups.len() };
        let values = groups.saturating_mul(query.values_per_group());
        if values <= self.max_answer_points {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "the answer has at least {} series of {} values ({values}); at most {} (limits.max_answer_points): \
             ask for one instance, a shorter range or a larger step",
            groups.saturating_mul(query.series_per_group()),
            query.steps(),
            self.max_answer_points
        )))
    }

    /// Runs `work` (reads of this engine's store) when one of the node's query slots is free
    /// ([`QuerySlots`]).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.slots.run(work).await
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<RuntimeConfig> {
        Arc::clone(&self.config.borrow())
    }

    /// Resolves and checks a metric query.
    pub fn metric_query(
        &self,
        name: &str,
        service: &str,
        instance: Option<&str>,
        start: i64,
        end: i64,
        step: Step,
    ) -> Result<MetricQuery, Error> {
        let config = self.config();
        let metric = config
            .rules
            .metric(name)
            .ok_or_else(|| Error::NotFound(format!("no metric named {name:?} (GET /api/v1/metrics lists them)")))?
            .clone();
        if service.is_empty() {
            return Err(Error::InvalidArgument("service is required".into()));
        }
        if metric.scope == Scope::Instance && instance.is_none_or(str::is_empty) {
            return Err(Error::InvalidArgument(format!("{name} is an instance metric: instance is required")));
        }
        if end <= start {
            return Err(Error::InvalidArgument(format!("end ({end}) must be after start ({start})")));
        }
        let points = (end - step.floor(start) + step.seconds() - 1) / step.seconds();
        if points as usize > self.max_query_points {
            return Err(Error::InvalidArgument(format!(
                "the range has {points} {step} steps; at most {} (limits.max_query_points): use a larger step",
                self.max_query_points
            )));
        }
        Ok(MetricQuery {
            metric,
            service: service.to_string(),
            instance: if metric_scope_is_instance(name, &config) { instance.map(str::to_string) } else { None },
            start,
            end,
            step,
        })
    }

    /// Folds the states of this node for `query`. Blocking (store reads).
    pub fn partial(&self, query: &MetricQuery) -> Result<Partial, Error> {
        let config = self.config();
        let catalogue = &config.rules.config.catalogue;
        let mut partial = Partial::default();
        let start_minute = (query.step.floor(query.start).max(0) / 60) as u64;
        // Whole steps: the minutes of the last step after `end` count too (`MetricQuery::covers`).
        let end_minute = (query.steps_end().max(0) as u64).div_ceil(60);
        for (partition, entity) in self.store.entities()? {
            if entity.service != query.service {
                continue;
            }
            if query.metric.scope == Scope::Instance && entity.instance != query.instance {
                continue;
            }
            let vnode = vnode_of(partition, self.vnodes);
            let rolled_until = self.store.rolled_until(vnode, partition)?;
            for key in self.store.series_of_partition(vnode, partition)? {
                if key.metric != query.metric.rule.source {
                    continue;
                }
                let id = key.id();
                let mut add = |states: Vec<(u64, tollgate_rules::Aggregate)>| {
                    for (period, state) in states {
                        partial.add(catalogue, query, &key, period as i64 * 60, &state);
                    }
                    self.check_answer(query, &partial)
                };
                match query.step {
                    Step::Minute => add(self.store.states(vnode, id, Resolution::Minute, start_minute, end_minute)?)?,
                    Step::Hour | Step::Day => {
                        let resolution = if query.step == Step::Hour { Resolution::Hour } else { Resolution::Day };
                        // Roll-ups hold the minutes before the frontier; later minutes are read as
                        // minutes and folded into their step.
                        add(self.store.states(vnode, id, resolution, start_minute, end_minute.min(rolled_until))?)?;
                        add(self.store.states(
                            vnode,
                            id,
                            Resolution::Minute,
                            start_minute.max(rolled_until),
                            end_minute,
                        )?)?;
                    }
                }
            }
        }
        Ok(partial)
    }

    /// This engine and one over the data held for each of `holders` (departed nodes).
    fn holdings(&self, holders: &[u64]) -> Result<Vec<QueryEngine>, Error> {
        let mut engines = vec![self.clone()];
        if holders.is_empty() {
            return Ok(engines);
        }
        let present = self.store.held_holders()?;
        for holder in holders {
            if !present.contains(holder) {
                return Err(Error::Unavailable(format!("the data of departed node {holder} is not on this node")));
            }
            engines.push(QueryEngine { store: self.store.held(*holder)?, ..self.clone() });
        }
        Ok(engines)
    }

    /// [`QueryEngine::partial`] over this node's data and what it holds for `holders`.
    pub fn partial_held(&self, query: &MetricQuery, holders: &[u64]) -> Result<Partial, Error> {
        let mut partial = Partial::default();
        for engine in self.holdings(holders)? {
            partial.merge(&engine.partial(query)?);
            self.check_answer(query, &partial)?;
        }
        Ok(partial)
    }

    /// [`QueryEngine::logs`] over this node's data and what it holds for `holders`.
    pub fn logs_held(&self, query: &LogQuery, holders: &[u64], max_bytes: usize) -> Result<LogPage, Error> {
        let pages = self
            .holdings(holders)?
            .iter()
            .map(|engine| engine.logs(query, max_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(QueryEngine::merge_log_pages(pages, query.limit, max_bytes))
    }

    /// [`QueryEngine::entities`] over this node's data and what it holds for `holders`.
    pub fn entities_held(&self, holders: &[u64]) -> Result<Vec<EntityRecord>, Error> {
        let mut entities = Vec::new();
        for engine in self.holdings(holders)? {
            entities.extend(engine.entities()?);
        }
        Ok(entities)
    }

    /// The entities this node holds data of.
    pub fn entities(&self) -> Result<Vec<EntityRecord>, Error> {
        Ok(self.store.entities()?.into_iter().map(|(_, entity)| entity).collect())
    }

    /// Services and their instances, from entity records of any number of nodes.
    pub fn services_of(entities: impl IntoIterator<Item = EntityRecord>) -> Vec<ServiceView> {
        let mut services: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for entity in entities {
            let instances = services.entry(entity.service).or_default();
            if let Some(instance) = entity.instance {
                let last_seen = instances.entry(instance).or_default();
                *last_seen = (*last_seen).max(entity.last_seen_ns);
            }
        }
        services
            .into_iter()
            .map(|(name, instances)| ServiceView {
                name,
                layer: LAYER.to_string(),
                instances: instances
                    .into_iter()
                    .map(|(name, last_seen_ns)| InstanceView { name, last_seen: (last_seen_ns / 1_000_000_000) as i64 })
                    .collect(),
            })
            .collect()
    }

    /// Merges the log pages of several nodes into one, newest first.
    pub fn merge_log_pages(pages: impl IntoIterator<Item = LogPage>, limit: usize, max_bytes: usize) -> LogPage {
        let mut logs = Vec::new();
        let mut more = false;
        for page in pages {
            more |= page.next.is_some();
            logs.extend(page.logs);
        }
        more |= cut_to_page(&mut logs, limit, max_bytes);
        let next = if more {
            logs.last().map(|log| LogPosition { time_ns: log.time_ns, fingerprint: log.fingerprint })
        } else {
            None
        };
        LogPage { logs, next }
    }

    /// One page of kept logs, newest first. Blocking (store reads).
    pub fn logs(&self, query: &LogQuery, max_bytes: usize) -> Result<LogPage, Error> {
        if query.limit == 0 || query.limit > self.max_log_page {
            return Err(Error::InvalidArgument(format!("limit must be between 1 and {}", self.max_log_page)));
        }
        if query.end_ns <= query.start_ns {
            return Err(Error::InvalidArgument("end must be after start".into()));
        }
        let end = LogPosition { time_ns: query.end_ns, fingerprint: 0 };
        let before = query.cursor.map_or(end, |cursor| cursor.min(end));
        let mut candidates: Vec<StoredLog> = Vec::new();
        let mut more = false;
        // Only the newest `limit` records of all partitions make the page, so no more are kept
        // from one partition to the next (a service of 200 pods held `limit + 1` records of
        // each: 650 MB for one page of 1 000), and each next partition is read back only as far
        // as the oldest of them.
        let mut start_ns = query.start_ns;
        for (partition, entity) in self.store.entities()? {
            if entity.service != query.service || (query.instance.is_some() && entity.instance != query.instance) {
                continue;
            }
            let vnode = vnode_of(partition, self.vnodes);
            let (matches, exhausted) = self.partition_logs(vnode, partition, before, start_ns, query, max_bytes)?;
            more |= !exhausted;
            candidates.extend(matches);
            if cut_to_page(&mut candidates, query.limit, max_bytes) {
                more = true;
                start_ns = candidates.last().map_or(start_ns, |oldest| oldest.time_ns);
            }
        }
        cut_to_page(&mut candidates, query.limit, max_bytes);
        let next = if more {
            candidates.last().map(|log| LogPosition { time_ns: log.time_ns, fingerprint: log.fingerprint })
        } else {
            None
        };
        Ok(LogPage { logs: candidates, next })
    }

    /// Up to `limit + 1` matching logs of one partition before `before` and from `start_ns` on,
    /// and no more once they pass `max_bytes`; `exhausted` when there are no more.
    fn partition_logs(
        &self,
        vnode: u16,
        partition: u64,
        mut before: LogPosition,
        start_ns: u64,
        query: &LogQuery,
        max_bytes: usize,
    ) -> Result<(Vec<StoredLog>, bool), Error> {
        let chunk = (query.limit + 1).clamp(64, 4096);
        let mut matches = Vec::new();
        let mut bytes = 0;
        let mut scanned = 0;
        loop {
            let page = self.store.logs(vnode, partition, start_ns, Some(before), chunk, max_bytes)?;
            // Fewer than asked for, and not because the bytes ran out: none are left.
            let exhausted =
                page.len() < chunk && page.iter().map(StoredLog::approximate_bytes).sum::<usize>() < max_bytes;
            for log in page {
                scanned += 1;
                before = LogPosition { time_ns: log.time_ns, fingerprint: log.fingerprint };
                if matches_filters(&log, query) {
                    bytes += log.approximate_bytes();
                    matches.push(log);
                    if matches.len() > query.limit || bytes > max_bytes {
                        return Ok((matches, false));
                    }
                }
            }
            if exhausted {
                return Ok((matches, true));
            }
            if scanned >= MAX_LOG_SCAN {
                return Ok((matches, false));
            }
        }
    }
}

fn metric_scope_is_instance(name: &str, config: &RuntimeConfig) -> bool {
    config.rules.metric(name).is_some_and(|m| m.scope == Scope::Instance)
}

fn matches_filters(log: &StoredLog, query: &LogQuery) -> bool {
    if let Some(reason) = query.reason {
        if !log.reasons.iter().any(|r| r == reason.as_str()) {
            return false;
        }
    }
    if query.kind.is_some_and(|kind| kind != log.kind) {
        return false;
    }
    if let Some(model) = &query.model {
        if log.model.as_deref() != Some(model.as_str()) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;

    /// Waits until `slots` counts `expected` queries waiting.
    async fn waiting(slots: &QuerySlots, expected: usize) {
        for _ in 0..500 {
            if slots.waiting.load(SeqCst) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} waiting, not {expected}", slots.waiting.load(SeqCst));
    }

    /// Starts a query that holds one of `slots` until `finish` is sent; returns once it does.
    async fn hold_a_slot(
        slots: &Arc<QuerySlots>,
    ) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<Result<(), Error>>) {
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let available = slots.running.available_permits();
        let query = tokio::spawn({
            let slots = Arc::clone(slots);
            async move { slots.run(move || finished.recv().map_err(|e| Error::Internal(e.to_string()))).await }
        });
        while slots.running.available_permits() == available {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (finish, query)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_query_slots_bound_running_and_waiting_queries() {
        let slots = Arc::new(QuerySlots::new(1));
        // One query holds the only slot until told to finish.
        let (finish, running) = hold_a_slot(&slots).await;
        // Four wait for it (and one more that gives up waiting is not counted any longer).
        let queued: Vec<_> = (0..4)
            .map(|i| {
                let slots = Arc::clone(&slots);
                tokio::spawn(async move { slots.run(move || Ok(i)).await })
            })
            .collect();
        waiting(&slots, 4).await;
        match slots.run(|| Ok(99)).await {
            Err(Error::Overloaded { message, .. }) => {
                assert!(message.contains("limits.max_concurrent_queries"), "{message}");
            }
            other => panic!("a fifth waiting query is refused, not {other:?}"),
        }
        waiting(&slots, 4).await;
        // Once the slot is free every waiting query runs, in turn.
        finish.send(()).unwrap();
        running.await.unwrap().unwrap();
        let mut answers = Vec::new();
        for query in queued {
            answers.push(query.await.unwrap().unwrap());
        }
        assert_eq!(answers, vec![0, 1, 2, 3]);
        assert_eq!((slots.waiting.load(SeqCst), slots.running.available_permits()), (0, 1));

        // A waiting query whose request goes away stops counting.
        let (finish, holder) = hold_a_slot(&slots).await;
        let abandoned = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.run(|| Ok(())).await }
        });
        waiting(&slots, 1).await;
        abandoned.abort();
        waiting(&slots, 0).await;
        finish.send(()).unwrap();
        holder.await.unwrap().unwrap();
    }
}
