//! Starting and stopping a node: store, cluster membership, configuration, owners, receivers,
//! the API, the cluster port and background work.
//!
//! Every node runs the cluster machinery; a node started without `--join` on an empty data
//! directory bootstraps a one-node cluster (SPEC §9), a node with `--join` asks a running one to
//! let it in, and a node whose data directory holds cluster state rejoins its cluster.

use crate::api::{self, ApiState};
use crate::budget::Budget;
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::error::Error;
use crate::fanout::Fanout;
use crate::ingest::Ingest;
use crate::metrics as m;
use crate::owner::{Cardinality, OwnerContext, OwnerHandle};
use crate::peer::{self, PeerService};
use crate::query::QueryEngine;
use crate::receiver::{grpc, http as otlp_http};
use crate::runtime::{cluster_error, ClusterConfig, ConfigService};
use crate::store::{Op, Resolution, RetentionCutoffs, SledStorage, Storage, StoreBatch};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tollgate_cluster::lease::LeaseCheck;
use tollgate_cluster::transport::{TonicTransport, Transport};
use tollgate_cluster::{Cluster, ClusterError, ClusterSettings, NodeId, PeerNode};
use tracing::{error, info, warn};

/// How often owners roll up and evict.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a new node keeps asking to join before giving up.
const JOIN_DEADLINE: Duration = Duration::from_secs(300);

/// How long the node listed first in `--join` looks for a running cluster before it bootstraps.
const FIRST_NODE_GRACE: Duration = Duration::from_secs(15);

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
    /// Cluster listener.
    pub cluster: SocketAddr,
    /// The node's name.
    pub node_id: String,
    /// The node's cluster (Raft) id.
    pub raft_id: NodeId,
}

/// How long a starting member waits to catch up with the cluster's log before it returns
/// unready (it becomes ready as soon as it has).
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// Whether this member caught up with the cluster's log ([`Cluster::caught_up`]) and uses the
/// configuration documents it applied.
fn caught_up(cluster: &Cluster, runtime: &watch::Receiver<Arc<crate::runtime::RuntimeConfig>>) -> bool {
    if !cluster.caught_up() || !cluster.holds_lease().holds() {
        return false;
    }
    let applied = cluster.applied();
    let state = &applied.borrow().state;
    let config = runtime.borrow();
    config.pricing.version() >= state.pricing.as_ref().map_or(0, |v| v.version)
        && config.rules.version >= state.rules.as_ref().map_or(0, |v| v.version)
}

/// Waits until [`caught_up`], at most `timeout` when one is given; whether it did.
async fn wait_caught_up(
    cluster: &Cluster,
    runtime: &watch::Receiver<Arc<crate::runtime::RuntimeConfig>>,
    timeout: Option<Duration>,
) -> bool {
    let started = std::time::Instant::now();
    loop {
        if caught_up(cluster, runtime) {
            return true;
        }
        if timeout.is_some_and(|timeout| started.elapsed() >= timeout) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a stopping node lets requests in flight finish before it cuts them off (clients
/// retry, and merges are idempotent).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The node's long-running tasks, by name, so that a stop that takes long says what it waits for.
#[derive(Debug, Default)]
struct Tasks {
    set: JoinSet<&'static str>,
    running: Vec<&'static str>,
}

impl Tasks {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.running.push(name);
        self.set.spawn(async move {
            task.await;
            name
        });
    }

    /// Waits for every task to end (each watches a stop signal), for at most `grace`; those
    /// still running then are named and aborted.
    async fn stop(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.set.join_next()).await {
                Ok(None) => return,
                Ok(Some(Ok(name))) => {
                    if let Some(position) = self.running.iter().position(|n| *n == name) {
                        self.running.swap_remove(position);
                    }
                }
                Ok(Some(Err(e))) => {
                    if !e.is_cancelled() {
                        warn!(error = %e, "node task ended abnormally");
                    }
                }
                Err(_) => {
                    warn!(tasks = ?self.running, grace_ms = grace.as_millis() as u64, "stopping: still busy; cut off");
                    self.set.abort_all();
                    while self.set.join_next().await.is_some() {}
                    return;
                }
            }
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    /// Where it listens.
    pub endpoints: Endpoints,
    stop: watch::Sender<bool>,
    fatal: watch::Receiver<Option<String>>,
    tasks: Tasks,
    /// Stops the cluster port, which serves Raft until the owners are drained.
    peer_stop: watch::Sender<bool>,
    /// The cluster port's server, stopped last (dropped with a failed start, it stops too).
    peer_task: Tasks,
    owners: Arc<Vec<OwnerHandle>>,
    store: Arc<SledStorage>,
    cluster: Arc<Cluster>,
    ready: Arc<AtomicBool>,
    /// Set by [`Node::unready`]: the node stays unready whatever else happens.
    held_unready: Arc<AtomicBool>,
}

const NODE_ID_KEY: &str = "node/id";
const RAFT_ID_KEY: &str = "node/raft_id";
const VNODES_KEY: &str = "node/vnodes";

/// The machine's host name (how peers and clients reach a node listening on all addresses).
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The node's identity: its name and cluster id from the data directory, checked against what
/// was asked for; a new data directory gets a fresh cluster id (ids are never reused, even by a
/// node with the same name).
fn identity(store: &SledStorage, config: &NodeConfig, batch: &mut StoreBatch) -> Result<(String, NodeId), Error> {
    let stored = store.meta(NODE_ID_KEY)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let name = match (&stored, &config.node_id) {
        (Some(stored), Some(asked)) if stored != asked => {
            return Err(Error::InvalidArgument(format!(
                "the data directory {} belongs to node {stored:?}, not {asked:?}",
                config.data_dir.display()
            )))
        }
        (Some(stored), _) => stored.clone(),
        (None, Some(asked)) => asked.clone(),
        (None, None) => hostname().unwrap_or_else(|| "node-1".to_string()),
    };
    if stored.is_none() {
        batch.push(Op::Meta { key: NODE_ID_KEY.into(), value: name.clone().into_bytes() });
    }
    let raft_id = match store.meta(RAFT_ID_KEY)? {
        Some(bytes) => {
            u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| Error::Internal("corrupt raft id".into()))?)
        }
        None => {
            let seed = format!(
                "{name}/{}/{:?}/{}",
                config.data_dir.display(),
                std::time::SystemTime::now(),
                std::process::id()
            );
            // Within 2^53, so that the id survives JSON tools that read numbers as doubles (jq).
            let id = (xxhash_rust::xxh3::xxh3_64(seed.as_bytes()) & ((1 << 53) - 1)).max(1);
            batch.push(Op::Meta { key: RAFT_ID_KEY.into(), value: id.to_be_bytes().to_vec() });
            id
        }
    };
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
    Ok((name, raft_id))
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot listen on {address} ({what}): {e}")))
}

/// `HOST:PORT` peers use for a listener: its own address, or the host name when it listens on
/// all addresses.
fn reachable(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        format!("{}:{}", hostname().unwrap_or_else(|| "localhost".into()), bound.port())
    } else {
        bound.to_string()
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

impl Node {
    /// Opens the store, joins or bootstraps the cluster, starts the owners, binds every listener
    /// and starts serving. Returns once the node is ready.
    pub async fn start(config: NodeConfig, clock: Arc<dyn Clock>) -> Result<Node, Error> {
        Node::start_with_transport(config, clock, None).await
    }

    /// [`Node::start`] with a given transport to the other nodes (tests inject faults with it).
    pub async fn start_with_transport(
        config: NodeConfig,
        clock: Arc<dyn Clock>,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Node, Error> {
        config.validate().map_err(|e| Error::InvalidArgument(e.to_string()))?;
        crate::store::format::check_and_stamp(&config.data_dir)?;
        // A previous run's endpoints must not be mistaken for this one's.
        let _ = std::fs::remove_file(config.data_dir.join("endpoints.json"));
        let prometheus = m::install();
        m::zero_counters();
        let store = Arc::new(SledStorage::open(&config.data_dir, &config.storage)?);
        let mut batch = StoreBatch::default();
        let (name, raft_id) = identity(&store, &config, &mut batch)?;
        if !batch.is_empty() {
            crate::store::durable(store.commit(batch).await?).await?;
        }
        let storage: Arc<dyn Storage> = store.clone();

        // Listeners first: the cluster port must answer before this node asks to join.
        let mut grpc_listeners = Vec::new();
        for address in &config.otlp_grpc_addrs {
            grpc_listeners.push(bind(*address, "otlp grpc").await?);
        }
        let http_listener = bind(config.otlp_http_addr, "otlp http").await?;
        let api_listener = bind(config.http_addr, "api").await?;
        let cluster_listener = bind(config.cluster_addr, "cluster").await?;
        let local = |listener: &TcpListener| listener.local_addr().map_err(|e| Error::Internal(e.to_string()));
        let endpoints = Endpoints {
            otlp_grpc: grpc_listeners.iter().map(local).collect::<Result<_, _>>()?,
            otlp_http: local(&http_listener)?,
            http: local(&api_listener)?,
            cluster: local(&cluster_listener)?,
            node_id: name.clone(),
            raft_id,
        };
        let me = PeerNode {
            name: name.clone(),
            cluster_addr: config.advertise_addr.clone().unwrap_or_else(|| reachable(endpoints.cluster)),
            api_addr: reachable(endpoints.http),
        };

        let transport: Arc<dyn Transport> = transport.unwrap_or_else(|| {
            Arc::new(
                TonicTransport::new(
                    config.cluster_secret.clone(),
                    Duration::from_millis(config.cluster.rpc_timeout_ms),
                    config.cluster.max_forward_inflight_bytes,
                )
                .with_forward_calls(config.cluster.forward_calls_per_peer),
            )
        });
        let settings = ClusterSettings {
            vnodes: config.cluster.vnodes,
            heartbeat_interval: Duration::from_millis(config.cluster.heartbeat_interval_ms),
            election_timeout: Duration::from_millis(config.cluster.election_timeout_ms),
            rpc_timeout: Duration::from_millis(config.cluster.rpc_timeout_ms),
            failover_after: Duration::from_secs(config.cluster.failover_after_seconds),
            max_concurrent_moves: 16,
            snapshot_every_logs: ClusterSettings::SNAPSHOT_EVERY_LOGS,
        };
        let cluster = Cluster::start(&config.data_dir.join("raft"), raft_id, me, settings, Arc::clone(&transport))
            .await
            .map_err(cluster_error)?;
        let config_service = Arc::new(ClusterConfig::start(Arc::clone(&cluster))?);
        let runtime = config_service.watch();

        let context = Arc::new(OwnerContext {
            me: raft_id,
            cluster: cluster.applied(),
            lease: Arc::clone(&cluster),
            store: Arc::clone(&storage),
            clock: Arc::clone(&clock),
            config: runtime.clone(),
            cardinality: Cardinality::new(config.limits.max_series),
            minute_retention_ns: config.retention.minute_seconds.saturating_mul(1_000_000_000),
        });
        let mut owners = Vec::with_capacity(config.cluster.vnodes as usize);
        for vnode in 0..config.cluster.vnodes {
            owners.push(OwnerHandle::spawn(vnode, Arc::clone(&context), config.limits.owner_queue_capacity).await?);
        }
        let owners = Arc::new(owners);
        let ingest = Ingest::new(
            Arc::clone(&owners),
            runtime.clone(),
            Arc::clone(&cluster),
            Duration::from_millis(config.limits.request_timeout_ms),
        );
        let budget = Budget::new(config.limits.max_inflight_bytes);
        let query = QueryEngine::new(
            Arc::clone(&storage),
            runtime.clone(),
            config.cluster.vnodes,
            config.limits.max_query_points,
            config.limits.max_answer_points,
            config.limits.max_log_page,
            config.limits.max_concurrent_queries,
        );

        let (stop, stop_receiver) = watch::channel(false);
        let (fatal_sender, fatal) = watch::channel(None);
        let ready = Arc::new(AtomicBool::new(false));
        let healthy = Arc::new(AtomicBool::new(true));
        let mut tasks = Tasks::default();
        let peer_stop = watch::channel(false).0;
        let mut peer_task = Tasks::default();

        // The cluster port.
        {
            let service = PeerService::new(
                Arc::clone(&cluster),
                ingest.clone(),
                Arc::clone(&owners),
                query.clone(),
                Arc::clone(&storage),
                stop_receiver.clone(),
            );
            let secret = config.cluster_secret.clone();
            let shutdown = stopped(peer_stop.subscribe());
            peer_task.spawn("cluster port", async move {
                if let Err(e) = peer::serve(cluster_listener, service, secret, shutdown).await {
                    error!(error = %e, "cluster port failed");
                }
            });
        }

        let body_timeout = Duration::from_millis(config.limits.body_timeout_ms);
        for listener in grpc_listeners {
            let services = grpc::OtlpGrpc::new(ingest.clone(), budget.clone());
            let shutdown = stopped(stop_receiver.clone());
            let limit = config.limits.max_request_bytes;
            tasks.spawn("otlp grpc server", async move {
                if let Err(e) = grpc::serve(listener, services, limit, body_timeout, shutdown).await {
                    error!(error = %e, "otlp grpc server failed");
                }
            });
        }
        {
            let router =
                otlp_http::router(ingest.clone(), budget.clone(), config.limits.max_request_bytes, body_timeout);
            let shutdown = stopped(stop_receiver.clone());
            let address = endpoints.otlp_http;
            tasks.spawn("otlp http server", async move {
                info!(%address, "otlp http listening");
                crate::net::serve_http(http_listener, router, shutdown, crate::net::HEADER_READ_TIMEOUT).await;
            });
        }
        {
            let api_state = ApiState {
                query: Fanout::new(query.clone(), Arc::clone(&cluster)),
                config: Arc::clone(&config_service) as Arc<dyn ConfigService>,
                cluster: Arc::clone(&cluster),
                prometheus: prometheus.clone(),
                api_token: config.api_token.clone(),
                ready: Arc::clone(&ready),
                healthy: Arc::clone(&healthy),
                clock: Arc::clone(&clock),
            };
            let router = api::router(api_state);
            let shutdown = stopped(stop_receiver.clone());
            let address = endpoints.http;
            tasks.spawn("api server", async move {
                info!(%address, "api listening");
                crate::net::serve_http(api_listener, router, shutdown, crate::net::HEADER_READ_TIMEOUT).await;
            });
        }
        write_endpoints(&config.data_dir, &endpoints)?;
        cluster.check_advertised().await.map_err(cluster_error)?;

        // Membership: bootstrap, join, or rejoin (the store already holds the cluster).
        if !cluster.is_initialized().await {
            // The same --join list can be given to every node (a StatefulSet): a node skips its
            // own address, and the node listed first bootstraps when no other answers.
            let own = &cluster.me.cluster_addr;
            let others: Vec<String> = config.join.iter().filter(|a| *a != own).cloned().collect();
            if others.is_empty() {
                cluster.bootstrap().await.map_err(cluster_error)?;
            } else if config.join.first() == Some(own) {
                info!(join = ?others, "listed first: joining a running cluster, or bootstrapping one");
                match cluster.join(&others, FIRST_NODE_GRACE).await {
                    Ok(()) => {}
                    Err(ClusterError::NoQuorum(reason)) => {
                        info!(%reason, "no running cluster answered: bootstrapping a new one");
                        cluster.bootstrap().await.map_err(cluster_error)?;
                    }
                    Err(e) => return Err(cluster_error(e)),
                }
            } else {
                info!(join = ?others, "asking to join a cluster");
                cluster.join(&others, JOIN_DEADLINE).await.map_err(cluster_error)?;
            }
        } else {
            // Restarted with other addresses (another port, another IP): tell the cluster.
            let cluster = Arc::clone(&cluster);
            let stop = stopped(stop_receiver.clone());
            tasks.spawn("address announcement", async move {
                tokio::select! {
                    announced = cluster.announce(JOIN_DEADLINE) => if let Err(e) = announced {
                        warn!(error = %e, "the cluster still knows this node by its old addresses");
                    },
                    () = stop => {}
                }
            });
        }
        let cluster_vnodes = cluster.state().vnodes.len();
        if cluster_vnodes != 0 && cluster_vnodes != config.cluster.vnodes {
            return Err(Error::InvalidArgument(format!(
                "the cluster has {cluster_vnodes} vnodes but cluster.vnodes is {}; the count is fixed when a cluster is created",
                config.cluster.vnodes
            )));
        }

        tasks.spawn("mover", {
            let handle = crate::mover::start(Arc::clone(&cluster), Arc::clone(&owners), Arc::clone(&storage));
            let mut stop = stop_receiver.clone();
            async move {
                let _ = stop.changed().await;
                handle.abort();
            }
        });
        spawn_background(
            &mut tasks,
            &config,
            &owners,
            &storage,
            &store,
            &cluster,
            &clock,
            &runtime,
            &healthy,
            &stop_receiver,
            prometheus,
            fatal_sender,
        );

        // Ready once the cluster state this node follows has vnodes and names it a member, and it
        // caught up with the cluster's log: a node restarted while the configuration changed
        // must not merge what the load balancer sends it with the old one. A node that left and
        // starts again on its data knows it at once (the departure watch below says so): no
        // need to wait out the minute.
        tollgate_cluster::runtime::wait_applied(&cluster.applied(), Duration::from_secs(60), |a| {
            a.state.is_member(raft_id) || a.state.departed.contains(&raft_id)
        })
        .await;
        let (member, departed) = {
            let applied = cluster.applied().borrow().clone();
            (applied.state.is_member(raft_id), applied.state.departed.contains(&raft_id))
        };
        let is_ready = member && wait_caught_up(&cluster, &runtime, Some(CATCH_UP_WAIT)).await;
        if !member && !departed {
            warn!("not a member of a bootstrapped cluster yet; not ready");
        } else if member && !is_ready {
            warn!("not in touch with a leader, or still applying its log; not ready until it caught up");
        }
        ready.store(is_ready, Ordering::SeqCst);
        let held_unready = Arc::new(AtomicBool::new(false));
        if !is_ready && !departed {
            let ready = Arc::clone(&ready);
            let held_unready = Arc::clone(&held_unready);
            let cluster = Arc::clone(&cluster);
            let runtime = runtime.clone();
            let stop = stopped(stop_receiver.clone());
            tasks.spawn("readiness", async move {
                let mut applied = cluster.applied();
                let caught_up = async {
                    applied.wait_for(|a| a.state.is_member(raft_id)).await.is_ok()
                        && wait_caught_up(&cluster, &runtime, None).await
                };
                tokio::select! {
                    caught_up = caught_up => {
                        // Neither a departure nor `Node::unready` may be undone: each is checked
                        // again after the store, which they may have crossed.
                        let held = || {
                            held_unready.load(Ordering::SeqCst)
                                || cluster.applied().borrow().state.departed.contains(&raft_id)
                        };
                        if caught_up && !held() {
                            ready.store(true, Ordering::SeqCst);
                            if held() {
                                ready.store(false, Ordering::SeqCst);
                            } else {
                                info!("caught up with the cluster; ready");
                            }
                        }
                    }
                    () = stop => {}
                }
            });
        }
        // A node that left stops being ready: the load balancer must stop sending it traffic.
        {
            let ready = Arc::clone(&ready);
            let mut applied = cluster.applied();
            let mut stop = stop_receiver.clone();
            tasks.spawn("departure watch", async move {
                tokio::select! {
                    left = applied.wait_for(|a| a.state.departed.contains(&raft_id)) => {
                        if left.is_ok() {
                            ready.store(false, Ordering::SeqCst);
                            warn!("this node left the cluster: its data is held by another member; it can be stopped");
                        }
                    }
                    _ = stop.changed() => {}
                }
            });
        }
        info!(node = %endpoints.node_id, raft_id, "tollgate node started");
        Ok(Node { endpoints, stop, fatal, tasks, peer_stop, peer_task, owners, store, cluster, ready, held_unready })
    }

    /// Stops being ready (`/readyz` answers 503) while it goes on serving: load balancers stop
    /// sending it requests before its listeners close (`shutdown_delay_ms`).
    pub fn unready(&self) {
        self.held_unready.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    /// The owners (tests drive maintenance through them).
    pub fn owners(&self) -> &[OwnerHandle] {
        &self.owners
    }

    /// The node's cluster handle.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
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

    /// Stops accepting requests and lets the ones in flight finish (for at most
    /// [`STOP_GRACE`]), drains the owners and waits for their writes to be durable, then closes
    /// the cluster port and stops the Raft node. The cluster port stays open until the owners
    /// are drained: the node keeps answering the leader's heartbeats, so a slow stop never looks
    /// like a dead node (which failover would take the vnodes of, without a hand-over).
    pub async fn shutdown(mut self) {
        let started = std::time::Instant::now();
        let elapsed_ms = || started.elapsed().as_millis() as u64;
        self.ready.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        self.tasks.stop(STOP_GRACE).await;
        info!(elapsed_ms = elapsed_ms(), "stopping: requests and background work stopped");
        for owner in self.owners.iter() {
            let owner_started = std::time::Instant::now();
            // A failed store takes no more writes: maintenance would only fail, once per owner.
            if !self.store.has_failed() {
                let _ = owner.maintain().await;
            }
            owner.stop().await;
            if owner_started.elapsed() > Duration::from_secs(1) {
                let took_ms = owner_started.elapsed().as_millis() as u64;
                warn!(vnode = owner.vnode, took_ms, "stopping: this owner took long to drain");
            }
        }
        info!(elapsed_ms = elapsed_ms(), "stopping: owners drained");
        // Calls still in flight (those that wait for the applied state give up when the node
        // stops), or a connection hyper's graceful shutdown waits on, are cut off after the grace.
        let _ = self.peer_stop.send(true);
        self.peer_task.stop(STOP_GRACE).await;
        self.cluster.shutdown().await;
        info!(elapsed_ms = elapsed_ms(), failed = self.store.has_failed(), "tollgate node stopped");
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_background(
    tasks: &mut Tasks,
    config: &NodeConfig,
    owners: &Arc<Vec<OwnerHandle>>,
    storage: &Arc<dyn Storage>,
    store: &Arc<SledStorage>,
    cluster: &Arc<Cluster>,
    clock: &Arc<dyn Clock>,
    runtime: &watch::Receiver<Arc<crate::runtime::RuntimeConfig>>,
    healthy: &Arc<AtomicBool>,
    stop_receiver: &watch::Receiver<bool>,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    fatal_sender: watch::Sender<Option<String>>,
) {
    // Owner maintenance: roll-ups, eviction.
    {
        let owners = Arc::clone(owners);
        let mut stop = stop_receiver.clone();
        tasks.spawn("owner maintenance", async move {
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
        let store = Arc::clone(storage);
        let clock = Arc::clone(clock);
        let retention = config.retention.clone();
        let runtime = runtime.clone();
        let mut stop = stop_receiver.clone();
        tasks.spawn("retention", async move {
            let period = Duration::from_secs(retention.sweep_interval_seconds);
            // The first sweep waits a minute: startup is busy enough.
            let start = tokio::time::Instant::now() + period.min(Duration::from_secs(60));
            let mut interval = tokio::time::interval_at(start, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stop.changed() => break,
                }
                let lateness_ns = runtime.borrow().rules.config.normalize.max_lateness_seconds * 1_000_000_000;
                let cutoffs = retention_cutoffs(clock.now_ns(), &retention, lateness_ns);
                let store = Arc::clone(&store);
                // This node's data, and what it holds for departed nodes.
                let swept = tokio::task::spawn_blocking(move || {
                    let mut report = store.sweep(cutoffs)?;
                    for holder in store.held_holders()? {
                        let held = store.held(holder)?.sweep(cutoffs)?;
                        report.examined += held.examined;
                        report.deleted += held.deleted;
                    }
                    Ok::<_, crate::error::Error>(report)
                });
                match swept.await {
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
    // Leader changes, from every change of the Raft figures: each new leadership (a term with a
    // leader) is logged, and counted after the first one this node saw.
    {
        let mut leadership = cluster.leadership();
        let mut stop = stop_receiver.clone();
        let cluster = Arc::clone(cluster);
        tasks.spawn("leader changes", async move {
            let mut last: Option<(u64, NodeId)> = None;
            loop {
                let changed = tokio::select! {
                    changed = leadership.next() => changed,
                    _ = stop.changed() => break,
                };
                let Some((term, leader)) = changed else { break };
                let Some(leader) = leader else { continue };
                if last == Some((term, leader)) {
                    continue;
                }
                if last.is_some() {
                    metrics::counter!(m::RAFT_LEADER_CHANGES).increment(1);
                }
                last = Some((term, leader));
                let name = cluster.state().nodes.get(&leader).map(|node| node.name.clone());
                let name = name.unwrap_or_else(|| "(not yet known here)".into());
                info!(term, leader = %name, id = leader, this_node = leader == cluster.id, "raft leader");
            }
        });
    }
    // Raft and vnode self-metrics, sampled every second.
    {
        let cluster = Arc::clone(cluster);
        let mut stop = stop_receiver.clone();
        tasks.spawn("raft figures", async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            // After a pause, one tick and not a burst of the missed ones (see `stalled`).
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Each owner logs its own transitions at debug level; the node logs the count.
            let mut owned_before = None;
            // Whether the lease was held since the node started, and whether its lapse was told
            // (its lapses and returns are logged once each).
            let (mut lease_held_once, mut lease_lapse_told) = (false, false);
            // Contact with a leader that has a majority (as a follower, or as a leader with its
            // quorum); an election after the leader went away is not reported.
            let mut contact = Contact::new(cluster.settings().election_timeout * 2);
            let mut last_tick = Instant::now();
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stop.changed() => break,
                }
                // A tick long after the last one: this process was not running (paused), and
                // what it last heard is old; the next tick judges the contact.
                let stalled = last_tick.elapsed() > Duration::from_secs(3);
                last_tick = Instant::now();
                match contact.tick(cluster.in_contact(), stalled, last_tick) {
                    Some(ContactChange::CutOff { for_ms }) => warn!(
                        for_ms,
                        "cut off from the cluster (no leader with a majority reaches this node): configuration \
                         and membership writes through it fail (503) until one does; exports for the vnodes it \
                         owns go on until its lease on them lapses"
                    ),
                    Some(ContactChange::Back { away_ms }) => info!(away_ms, "in contact with the cluster again"),
                    None => {}
                }
                let lease = cluster.holds_lease();
                match (lease, lease_lapse_told) {
                    (LeaseCheck::Lapsed { last_contact }, false) if lease_held_once => warn!(
                        last_contact_ms = last_contact.map(|ago| ago.as_millis() as u64),
                        "lease lapsed: out of touch with the cluster's leader for half of \
                         cluster.failover_after_seconds, this node merges nothing for the vnodes it owns (they may \
                         be given to other members) until it is back in touch and caught up; their exports are \
                         refused (503, retryable)"
                    ),
                    (LeaseCheck::Held, true) => info!("lease regained: merging exports for the vnodes it owns again"),
                    _ => {}
                }
                // A node starting holds no lease yet: only a lapse after it held one is told.
                lease_held_once |= lease.holds();
                lease_lapse_told = lease_held_once && !lease.holds();
                metrics::gauge!(m::VNODES_LEASE_HELD).set(f64::from(u8::from(lease.holds())));
                let raft = cluster.figures();
                metrics::gauge!(m::RAFT_TERM).set(raft.term as f64);
                metrics::gauge!(m::RAFT_COMMIT_INDEX).set(raft.commit_index as f64);
                metrics::gauge!(m::RAFT_APPLIED_INDEX).set(raft.applied_index as f64);
                // A leader cut off from the majority still leads as far as Raft knows (until it
                // hears of a higher term), but it commits nothing: not counted, so the cluster
                // shows one leader, the one the majority follows.
                let leads = raft.is_leader && cluster.in_contact();
                metrics::gauge!(m::RAFT_IS_LEADER).set(f64::from(u8::from(leads)));
                let state = cluster.state();
                let owned = (0..state.vnodes.len()).filter(|v| state.vnodes.owner(*v) == Some(cluster.id)).count();
                metrics::gauge!(m::VNODES_OWNED).set(owned as f64);
                if !state.vnodes.is_empty() && owned_before.replace(owned) != Some(owned) {
                    info!(owned, of = state.vnodes.len(), "vnodes owned by this node");
                }
            }
        });
    }
    // Store size, self-metric upkeep, storage failure (of the data store or of Raft's).
    {
        let store = Arc::clone(store);
        let cluster = Arc::clone(cluster);
        let healthy = Arc::clone(healthy);
        let mut stop = stop_receiver.clone();
        tasks.spawn("store upkeep", async move {
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
                if let Some(error) = cluster.failure() {
                    if healthy.swap(false, Ordering::SeqCst) {
                        error!(%error, "raft stopped: this node no longer follows the cluster's configuration");
                        let _ = fatal_sender.send(Some(format!("raft failed: {error}")));
                    }
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
}

/// How long past their retention minutes not rolled up yet are kept at most. The owners roll a
/// minute up within a maintenance pass (10 s) of it being half its retention old; this bounds
/// what nothing rolls up (data of earlier versions, a partition whose roll-up keeps failing).
/// A minute merged more than this past its retention can still be swept in the moments before
/// its roll-up.
const UNROLLED_MINUTES_GRACE_SECONDS: u64 = 7 * 86_400;

/// What retention deletes at `now_ns`.
pub fn retention_cutoffs(
    now_ns: u64,
    retention: &crate::config::RetentionConfig,
    lateness_ns: u64,
) -> RetentionCutoffs {
    let minute_of = |seconds: u64| now_ns.saturating_sub(seconds * 1_000_000_000) / 60_000_000_000;
    // An hour or a day goes once all of it is older than its retention: keyed by its first
    // minute, it is kept while that is less than its length before the first minute kept. (By
    // its start, today's roll-up was deleted while it held data minutes old, whenever
    // `day_seconds` was under a day, and the hour at the edge an hour early.)
    RetentionCutoffs {
        minute: minute_of(retention.minute_seconds),
        minute_unrolled: minute_of(retention.minute_seconds.saturating_add(UNROLLED_MINUTES_GRACE_SECONDS)),
        hour: minute_of(retention.hour_seconds).saturating_sub(Resolution::Hour.minutes() - 1),
        day: minute_of(retention.day_seconds).saturating_sub(Resolution::Day.minutes() - 1),
        logs_ns: now_ns.saturating_sub(retention.logs_seconds * 1_000_000_000),
        log_batches_ns: now_ns.saturating_sub(lateness_ns),
    }
}

fn write_endpoints(data_dir: &std::path::Path, endpoints: &Endpoints) -> Result<(), Error> {
    let path: PathBuf = data_dir.join("endpoints.json");
    let temporary = data_dir.join("endpoints.json.tmp");
    let text = serde_json::to_string_pretty(endpoints).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&temporary, text).map_err(|e| Error::Internal(format!("writing {}: {e}", temporary.display())))?;
    std::fs::rename(&temporary, &path).map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
}

/// Whether a node is in contact with a leader that has a majority, judged once a second: the
/// changes worth a log line. Being without one for less than `grace` (an election after the
/// leader went away) is not one; being cut off longer is, and so is coming back after that.
#[derive(Debug)]
struct Contact {
    grace: Duration,
    state: ContactState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ContactState {
    /// Not yet in contact since the node started.
    Starting,
    InContact,
    /// Out of contact since then; `told` once that was logged.
    Away {
        since: Instant,
        told: bool,
    },
}

/// A change of [`Contact`] to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContactChange {
    /// Out of contact for `for_ms` already.
    CutOff { for_ms: u64 },
    /// In contact again after `away_ms` (only after a [`ContactChange::CutOff`]).
    Back { away_ms: u64 },
}

impl Contact {
    fn new(grace: Duration) -> Self {
        Contact { grace, state: ContactState::Starting }
    }

    /// One judgement: `in_contact` now; `stalled` when the process was not running since the last
    /// one (what it last heard is old: no judgement of a loss).
    fn tick(&mut self, in_contact: bool, stalled: bool, now: Instant) -> Option<ContactChange> {
        let ms = |since: Instant| now.saturating_duration_since(since).as_millis() as u64;
        match (in_contact, self.state) {
            (true, ContactState::Away { since, told }) => {
                self.state = ContactState::InContact;
                told.then(|| ContactChange::Back { away_ms: ms(since) })
            }
            (true, _) => {
                self.state = ContactState::InContact;
                None
            }
            (false, _) if stalled => None,
            (false, ContactState::InContact) => {
                self.state = ContactState::Away { since: now, told: false };
                None
            }
            (false, ContactState::Away { since, told: false })
                if now.saturating_duration_since(since) >= self.grace =>
            {
                self.state = ContactState::Away { since, told: true };
                Some(ContactChange::CutOff { for_ms: ms(since) })
            }
            (false, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn test_retention_keeps_a_roll_up_while_any_of_it_is_young_enough() {
        let retention = crate::config::RetentionConfig {
            minute_seconds: 3_600,
            hour_seconds: 3_600,
            day_seconds: 7_200,
            ..crate::config::RetentionConfig::default()
        };
        // 2026-12-07T12:00:30Z.
        let day = 20_794 * 1_440;
        let now_ns = (day + 12 * 60) * 60_000_000_000 + 30_000_000_000;
        let cutoffs = retention_cutoffs(now_ns, &retention, 0);
        let kept = |start: u64, cutoff: u64| start >= cutoff;
        // Minutes: kept from 11:00.
        assert_eq!(cutoffs.minute, day + 11 * 60);
        // Today holds minutes younger than two hours: kept; yesterday ended ten hours before
        // the limit: deleted.
        assert!(kept(day, cutoffs.day), "{cutoffs:?}");
        assert!(!kept(day - 1_440, cutoffs.day), "{cutoffs:?}");
        // The hour from 10:00 is all older than 11:00, the first minute kept: deleted; the
        // hour from 11:00 is kept.
        assert!(!kept(day + 10 * 60, cutoffs.hour), "{cutoffs:?}");
        assert!(kept(day + 11 * 60, cutoffs.hour), "{cutoffs:?}");
        assert_eq!(cutoffs.hour, day + 10 * 60 + 1);
    }

    /// Counts the tasks whose future was dropped (ended or aborted).
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn test_tasks_stop_waits_for_tasks_that_watch_the_signal_and_cuts_off_the_others() {
        let (stop, stop_receiver) = watch::channel(false);
        let dropped = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let mut tasks = Tasks::default();
        for name in ["watches the signal", "also watches it"] {
            let (guard, finished, stop) =
                (Dropped(Arc::clone(&dropped)), Arc::clone(&finished), stopped(stop_receiver.clone()));
            tasks.spawn(name, async move {
                let _guard = guard;
                stop.await;
                // Some clean-up after the signal, well within the grace.
                tokio::time::sleep(Duration::from_secs(1)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        let guard = Dropped(Arc::clone(&dropped));
        tasks.spawn("ignores the signal", async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });

        let started = tokio::time::Instant::now();
        stop.send(true).unwrap();
        tasks.stop(Duration::from_secs(5)).await;
        // (Time is paused and advanced by the runtime: these figures are exact, not measured.)
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(finished.load(Ordering::SeqCst), 2, "tasks that watch the signal finish their clean-up");
        assert_eq!(dropped.load(Ordering::SeqCst), 3, "the task that ignores the signal is aborted");
        assert!(tasks.set.is_empty());
        assert_eq!(tasks.running, vec!["ignores the signal"]);
    }

    #[tokio::test(start_paused = true)]
    async fn test_tasks_stop_returns_as_soon_as_every_task_ended() {
        let (stop, stop_receiver) = watch::channel(false);
        let mut tasks = Tasks::default();
        for name in ["a", "b", "c"] {
            let stop = stopped(stop_receiver.clone());
            tasks.spawn(name, stop);
        }
        let started = tokio::time::Instant::now();
        stop.send(true).unwrap();
        tasks.stop(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(tasks.running.is_empty());
    }

    #[test]
    fn test_contact_reports_a_cut_off_past_the_grace_and_the_return_after_it() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut contact = Contact::new(Duration::from_secs(2));
        // Not in contact while starting: nothing to report.
        assert_eq!(contact.tick(false, false, at(0)), None);
        assert_eq!(contact.tick(false, false, at(5)), None);
        assert_eq!(contact.tick(true, false, at(6)), None);
        // An election: out of contact for less than the grace, then back. Nothing logged.
        assert_eq!(contact.tick(false, false, at(7)), None);
        assert_eq!(contact.tick(false, false, at(8)), None);
        assert_eq!(contact.tick(true, false, at(9)), None);
        // Cut off: reported once, when the grace has passed, and the return after it.
        assert_eq!(contact.tick(false, false, at(10)), None);
        assert_eq!(contact.tick(false, false, at(11)), None);
        assert_eq!(contact.tick(false, false, at(12)), Some(ContactChange::CutOff { for_ms: 2000 }));
        assert_eq!(contact.tick(false, false, at(13)), None);
        assert_eq!(contact.tick(true, false, at(15)), Some(ContactChange::Back { away_ms: 5000 }));
        assert_eq!(contact.tick(true, false, at(16)), None);
        // After a pause of the process, what it last heard is old: no judgement of a loss.
        assert_eq!(contact.tick(false, true, at(30)), None);
        assert_eq!(contact.tick(true, false, at(31)), None);
    }
}
