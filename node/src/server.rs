//! Starting and stopping a node: store, configuration, owners, receivers, API, background work.

use crate::api::{self, ApiState};
use crate::budget::Budget;
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::error::Error;
use crate::ingest::Ingest;
use crate::metrics as m;
use crate::owner::{OwnerContext, OwnerHandle};
use crate::query::QueryEngine;
use crate::receiver::{grpc, http as otlp_http};
use crate::runtime::{ConfigService, LocalConfig};
use crate::store::{Op, RetentionCutoffs, SledStorage, Storage, StoreBatch};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// How often owners roll up and evict.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(10);

/// The addresses a started node listens on (ports resolved when 0 was asked for). Also written
/// to `<data_dir>/endpoints.json` so that scripts and tests can find them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// OTLP/gRPC listeners.
    pub otlp_grpc: Vec<SocketAddr>,
    /// OTLP/HTTP listener.
    pub otlp_http: SocketAddr,
    /// API listener.
    pub http: SocketAddr,
    /// The node's id.
    pub node_id: String,
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    /// Where it listens.
    pub endpoints: Endpoints,
    stop: watch::Sender<bool>,
    fatal: watch::Receiver<Option<String>>,
    tasks: JoinSet<()>,
    owners: Arc<Vec<OwnerHandle>>,
    store: Arc<SledStorage>,
    ready: Arc<AtomicBool>,
}

const NODE_ID_KEY: &str = "node/id";
const VNODES_KEY: &str = "node/vnodes";

/// The node's identity: what the data directory says, checked against what was asked for.
fn identity(store: &SledStorage, config: &NodeConfig, batch: &mut StoreBatch) -> Result<String, Error> {
    let stored = store.meta(NODE_ID_KEY)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let id = match (&stored, &config.node_id) {
        (Some(stored), Some(asked)) if stored != asked => {
            return Err(Error::InvalidArgument(format!(
                "the data directory {} belongs to node {stored:?}, not {asked:?}",
                config.data_dir.display()
            )))
        }
        (Some(stored), _) => stored.clone(),
        (None, Some(asked)) => asked.clone(),
        (None, None) => "node-1".to_string(),
    };
    if stored.is_none() {
        batch.push(Op::Meta { key: NODE_ID_KEY.into(), value: id.clone().into_bytes() });
    }
    match store.meta(VNODES_KEY)? {
        Some(bytes) => {
            let stored_vnodes = u16::from_be_bytes(
                bytes.as_slice().try_into().map_err(|_| Error::Internal("corrupt vnode count".into()))?,
            );
            if stored_vnodes != config.cluster.vnodes {
                return Err(Error::InvalidArgument(format!(
                    "cluster.vnodes is {} but the data directory was created with {stored_vnodes}; it cannot change",
                    config.cluster.vnodes
                )));
            }
        }
        None => batch.push(Op::Meta { key: VNODES_KEY.into(), value: config.cluster.vnodes.to_be_bytes().to_vec() }),
    }
    Ok(id)
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot listen on {address} ({what}): {e}")))
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

impl Node {
    /// Opens the store, starts the owners, binds every listener and starts serving.
    pub async fn start(config: NodeConfig, clock: Arc<dyn Clock>) -> Result<Node, Error> {
        config.validate().map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // A previous run's endpoints must not be mistaken for this one's.
        let _ = std::fs::remove_file(config.data_dir.join("endpoints.json"));
        let prometheus = m::install();
        let store = Arc::new(SledStorage::open(
            &config.data_dir,
            config.storage.cache_capacity_bytes,
            config.storage.max_batches_per_flush,
            config.storage.writer_queue_capacity,
        )?);
        let mut batch = StoreBatch::default();
        let node_id = identity(&store, &config, &mut batch)?;
        if !batch.is_empty() {
            crate::store::durable(store.commit(batch).await?).await?;
        }
        let storage: Arc<dyn Storage> = store.clone();
        let config_service: Arc<dyn ConfigService> = Arc::new(LocalConfig::load(Arc::clone(&storage))?);
        let runtime = config_service.watch();

        let context = Arc::new(OwnerContext {
            store: Arc::clone(&storage),
            clock: Arc::clone(&clock),
            config: runtime.clone(),
            cardinality: Default::default(),
        });
        let mut owners = Vec::with_capacity(config.cluster.vnodes as usize);
        for vnode in 0..config.cluster.vnodes {
            owners.push(OwnerHandle::spawn(vnode, Arc::clone(&context), config.limits.owner_queue_capacity).await?);
        }
        let owners = Arc::new(owners);
        let ingest =
            Ingest::new(Arc::clone(&owners), runtime.clone(), Duration::from_millis(config.limits.request_timeout_ms));
        let budget = Budget::new(config.limits.max_inflight_bytes);

        let (stop, stop_receiver) = watch::channel(false);
        let (fatal_sender, fatal) = watch::channel(None);
        let ready = Arc::new(AtomicBool::new(false));
        let healthy = Arc::new(AtomicBool::new(true));
        let mut tasks = JoinSet::new();

        let mut grpc_addresses = Vec::new();
        for address in &config.otlp_grpc_addrs {
            let listener = bind(*address, "otlp grpc").await?;
            grpc_addresses.push(listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?);
            let services = grpc::OtlpGrpc::new(ingest.clone(), budget.clone());
            let shutdown = stopped(stop_receiver.clone());
            let limit = config.limits.max_request_bytes;
            tasks.spawn(async move {
                if let Err(e) = grpc::serve(listener, services, limit, shutdown).await {
                    error!(error = %e, "otlp grpc server failed");
                }
            });
        }

        let http_listener = bind(config.otlp_http_addr, "otlp http").await?;
        let otlp_http_address = http_listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
        let router = otlp_http::router(ingest.clone(), budget.clone(), config.limits.max_request_bytes);
        let shutdown = stopped(stop_receiver.clone());
        tasks.spawn(async move {
            info!(address = %otlp_http_address, "otlp http listening");
            if let Err(e) = axum::serve(http_listener, router).with_graceful_shutdown(shutdown).await {
                error!(error = %e, "otlp http server failed");
            }
        });

        let api_listener = bind(config.http_addr, "api").await?;
        let api_address = api_listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
        let query = QueryEngine::new(
            Arc::clone(&storage),
            runtime.clone(),
            config.cluster.vnodes,
            config.limits.max_query_points,
            config.limits.max_log_page,
        );
        let api_state = ApiState {
            query,
            config: Arc::clone(&config_service),
            prometheus: prometheus.clone(),
            api_token: config.api_token.clone(),
            ready: Arc::clone(&ready),
            healthy: Arc::clone(&healthy),
            clock: Arc::clone(&clock),
        };
        let api_router = api::router(api_state);
        let shutdown = stopped(stop_receiver.clone());
        tasks.spawn(async move {
            info!(address = %api_address, "api listening");
            if let Err(e) = axum::serve(api_listener, api_router).with_graceful_shutdown(shutdown).await {
                error!(error = %e, "api server failed");
            }
        });

        // Owner maintenance: roll-ups, eviction.
        {
            let owners = Arc::clone(&owners);
            let mut stop = stop_receiver.clone();
            tasks.spawn(async move {
                let mut interval = tokio::time::interval(MAINTENANCE_INTERVAL);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = interval.tick() => owners.iter().for_each(OwnerHandle::tick),
                        _ = stop.changed() => break,
                    }
                }
            });
        }
        // Retention.
        {
            let store = Arc::clone(&storage);
            let clock = Arc::clone(&clock);
            let retention = config.retention.clone();
            let runtime = runtime.clone();
            let mut stop = stop_receiver.clone();
            tasks.spawn(async move {
                let period = Duration::from_secs(retention.sweep_interval_seconds);
                // The first sweep waits a minute: startup is busy enough.
                let mut interval =
                    tokio::time::interval_at(tokio::time::Instant::now() + period.min(Duration::from_secs(60)), period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = interval.tick() => {}
                        _ = stop.changed() => break,
                    }
                    let lateness_ns = runtime.borrow().rules.config.normalize.max_lateness_seconds * 1_000_000_000;
                    let cutoffs = retention_cutoffs(clock.now_ns(), &retention, lateness_ns);
                    let store = Arc::clone(&store);
                    match tokio::task::spawn_blocking(move || store.sweep(cutoffs)).await {
                        Ok(Ok(report)) => {
                            metrics::counter!(m::RETENTION_DELETED).increment(report.deleted);
                            info!(examined = report.examined, deleted = report.deleted, "retention sweep");
                        }
                        Ok(Err(e)) => warn!(error = %e, "retention sweep failed"),
                        Err(e) => warn!(error = %e, "retention sweep panicked"),
                    }
                }
            });
        }
        // Store size, self-metric upkeep, storage failure.
        {
            let store = Arc::clone(&store);
            let healthy = Arc::clone(&healthy);
            let mut stop = stop_receiver.clone();
            tasks.spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_secs(1));
                let mut ticks: u64 = 0;
                loop {
                    tokio::select! {
                        _ = interval.tick() => {}
                        _ = stop.changed() => break,
                    }
                    ticks += 1;
                    if store.has_failed() && healthy.swap(false, Ordering::SeqCst) {
                        let _ = fatal_sender.send(Some("storage failed".into()));
                    }
                    if ticks.is_multiple_of(5) {
                        prometheus.run_upkeep();
                    }
                    if ticks % 30 == 1 {
                        let store = Arc::clone(&store);
                        if let Ok(size) = tokio::task::spawn_blocking(move || store.size_on_disk()).await {
                            metrics::gauge!(m::STORE_SIZE_BYTES).set(size as f64);
                        }
                    }
                }
            });
        }

        let endpoints =
            Endpoints { otlp_grpc: grpc_addresses, otlp_http: otlp_http_address, http: api_address, node_id };
        write_endpoints(&config.data_dir, &endpoints)?;
        ready.store(true, Ordering::SeqCst);
        info!(node = %endpoints.node_id, "tollgate node ready");
        Ok(Node { endpoints, stop, fatal, tasks, owners, store, ready })
    }

    /// The owners (tests drive maintenance through them).
    pub fn owners(&self) -> &[OwnerHandle] {
        &self.owners
    }

    /// Resolves with a reason when the node must stop (storage failed).
    pub async fn fatal(&mut self) -> String {
        loop {
            if let Some(reason) = self.fatal.borrow().clone() {
                return reason;
            }
            if self.fatal.changed().await.is_err() {
                return "node tasks stopped".into();
            }
        }
    }

    /// Stops accepting requests, lets the ones in flight finish, drains the owners and waits for
    /// their writes to be durable.
    pub async fn shutdown(mut self) {
        self.ready.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result {
                warn!(error = %e, "node task ended abnormally");
            }
        }
        for owner in self.owners.iter() {
            let _ = owner.maintain().await;
            owner.stop().await;
        }
        info!(failed = self.store.has_failed(), "tollgate node stopped");
    }
}

/// What retention deletes at `now_ns`.
pub fn retention_cutoffs(
    now_ns: u64,
    retention: &crate::config::RetentionConfig,
    lateness_ns: u64,
) -> RetentionCutoffs {
    let minute_of = |seconds: u64| now_ns.saturating_sub(seconds * 1_000_000_000) / 60_000_000_000;
    RetentionCutoffs {
        minute: minute_of(retention.minute_seconds),
        hour: minute_of(retention.hour_seconds),
        day: minute_of(retention.day_seconds),
        logs_ns: now_ns.saturating_sub(retention.logs_seconds * 1_000_000_000),
        log_batches_ns: now_ns.saturating_sub(lateness_ns),
        lateness_ns,
    }
}

fn write_endpoints(data_dir: &std::path::Path, endpoints: &Endpoints) -> Result<(), Error> {
    let path: PathBuf = data_dir.join("endpoints.json");
    let temporary = data_dir.join("endpoints.json.tmp");
    let text = serde_json::to_string_pretty(endpoints).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&temporary, text).map_err(|e| Error::Internal(format!("writing {}: {e}", temporary.display())))?;
    std::fs::rename(&temporary, &path).map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
}
