//! Real Raft clusters in one process: every node has its own sled store and Raft node, and they
//! talk through a transport that hands calls to the peer's handlers directly, wrapped in
//! [`FaultyTransport`] to partition, drop and delay them. What is tested is Tollgate's cluster
//! behaviour: writes from any node, refusal without quorum, identity across restarts, five voters
//! at most, failover and leaving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_cluster::runtime::wait_applied;
use tollgate_cluster::transport::{BoxFuture, ChunkStream, Faults, FaultyTransport, Transport, TransportError};
use tollgate_cluster::{
    Cluster, ClusterError, ClusterSettings, ClusterState, Command, CommandResponse, NodeId, PeerNode, VnodeState,
};
use tollgate_proto::peer::{
    ForwardExportRequest, ForwardRequest, ForwardResponse, HandOffRequest, JoinRequest, JoinResponse, LeaseRequest,
    LeaseResponse, QueryRequest, QueryResponse, RaftRequest, RaftResponse, WriteRequest, WriteResponse,
};
use tollgate_rules::pricing::{ModelPricing, ProviderPricing};
use tollgate_rules::PricingDocument;

/// Calls go straight to the handlers of the node registered at the address.
#[derive(Debug, Default)]
struct LocalTransport {
    nodes: Mutex<HashMap<String, Arc<Cluster>>>,
}

impl LocalTransport {
    fn node(&self, addr: &str) -> Result<Arc<Cluster>, TransportError> {
        self.nodes
            .lock()
            .unwrap()
            .get(addr)
            .cloned()
            .ok_or_else(|| TransportError::Unreachable { addr: addr.into(), reason: "not running".into() })
    }
}

fn refused(addr: &str, error: ClusterError) -> TransportError {
    let code = match error {
        ClusterError::NoQuorum(_) => "Unavailable",
        ClusterError::Refused(_) => "FailedPrecondition",
        ClusterError::Failed(_) => "Internal",
    };
    TransportError::Refused { addr: addr.into(), code: code.into(), message: error.to_string() }
}

fn not_served(addr: &str) -> TransportError {
    TransportError::Refused { addr: addr.into(), code: "Unimplemented".into(), message: "no data plane here".into() }
}

impl Transport for LocalTransport {
    fn raft(&self, addr: &str, request: RaftRequest) -> BoxFuture<'_, Result<RaftResponse, TransportError>> {
        let node = self.node(addr);
        Box::pin(async move { Ok(node?.serve_raft(request).await) })
    }

    fn forward(&self, addr: &str, _: ForwardRequest) -> BoxFuture<'_, Result<ForwardResponse, TransportError>> {
        let error = not_served(addr);
        Box::pin(async move { Err(error) })
    }

    fn forward_export(
        &self,
        addr: &str,
        _: ForwardExportRequest,
    ) -> BoxFuture<'_, Result<ForwardResponse, TransportError>> {
        let error = not_served(addr);
        Box::pin(async move { Err(error) })
    }

    fn query(&self, addr: &str, _: QueryRequest) -> BoxFuture<'_, Result<QueryResponse, TransportError>> {
        let error = not_served(addr);
        Box::pin(async move { Err(error) })
    }

    fn hand_off(&self, addr: &str, _: HandOffRequest) -> BoxFuture<'_, Result<ChunkStream, TransportError>> {
        let error = not_served(addr);
        Box::pin(async move { Err(error) })
    }

    fn write(&self, addr: &str, request: WriteRequest) -> BoxFuture<'_, Result<WriteResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move { self.node(&addr)?.handle_write(request).await.map_err(|e| refused(&addr, e)) })
    }

    fn join(&self, addr: &str, request: JoinRequest) -> BoxFuture<'_, Result<JoinResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move { self.node(&addr)?.handle_join(request).await.map_err(|e| refused(&addr, e)) })
    }

    fn lease(
        &self,
        addr: &str,
        request: LeaseRequest,
        _: Duration,
    ) -> BoxFuture<'_, Result<LeaseResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move { self.node(&addr)?.handle_lease(request).map_err(|e| refused(&addr, e)) })
    }
}

fn settings() -> ClusterSettings {
    ClusterSettings {
        vnodes: 16,
        heartbeat_interval: Duration::from_millis(50),
        election_timeout: Duration::from_millis(300),
        rpc_timeout: Duration::from_millis(500),
        failover_after: Duration::from_secs(3),
        max_concurrent_moves: 4,
        snapshot_every_logs: ClusterSettings::SNAPSHOT_EVERY_LOGS,
    }
}

const WAIT: Duration = Duration::from_secs(30);

struct TestNode {
    cluster: Arc<Cluster>,
    mover: tokio::task::JoinHandle<()>,
}

struct TestCluster {
    root: tempfile::TempDir,
    local: Arc<LocalTransport>,
    faults: Arc<Faults>,
    nodes: BTreeMap<NodeId, TestNode>,
    settings: ClusterSettings,
}

fn addr(id: NodeId) -> String {
    format!("node-{id}:11900")
}

/// Stands in for the data plane's mover: a node that is handed a vnode, or a leaving node's data,
/// has nothing to pull here, so it completes the move or the drain at once.
fn complete_moves(cluster: Arc<Cluster>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied = cluster.applied();
        loop {
            let moving: Vec<u16> = applied
                .borrow_and_update()
                .state
                .vnodes
                .vnodes
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s, VnodeState::Moving { to, .. } if *to == cluster.id))
                .map(|(vnode, _)| vnode as u16)
                .collect();
            for vnode in moving {
                let _ = cluster.write(Command::CompleteMove { vnode }).await;
            }
            let drains: Vec<(NodeId, u64)> = applied
                .borrow()
                .state
                .draining
                .iter()
                .filter(|(_, drain)| drain.to == cluster.id)
                .map(|(from, drain)| (*from, drain.generation))
                .collect();
            for (from, generation) in drains {
                let _ = cluster.write(Command::Drained { from, to: cluster.id, generation }).await;
            }
            let _ = tokio::time::timeout(Duration::from_millis(300), applied.changed()).await;
        }
    })
}

impl TestCluster {
    fn new() -> TestCluster {
        TestCluster {
            root: tempfile::tempdir().unwrap(),
            local: Arc::new(LocalTransport::default()),
            faults: Faults::new(),
            nodes: BTreeMap::new(),
            settings: settings(),
        }
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    async fn start(&mut self, id: NodeId) -> Arc<Cluster> {
        let me = PeerNode { name: format!("node-{id}"), cluster_addr: addr(id), api_addr: format!("node-{id}:12800") };
        let transport: Arc<dyn Transport> = Arc::new(FaultyTransport::new(
            &addr(id),
            Arc::clone(&self.local) as Arc<dyn Transport>,
            Arc::clone(&self.faults),
        ));
        let cluster = Cluster::start(&self.dir(id), id, me, self.settings.clone(), transport).await.expect("start");
        self.local.nodes.lock().unwrap().insert(addr(id), Arc::clone(&cluster));
        let mover = complete_moves(Arc::clone(&cluster));
        self.nodes.insert(id, TestNode { cluster: Arc::clone(&cluster), mover });
        cluster
    }

    async fn bootstrap(&mut self, id: NodeId) -> Arc<Cluster> {
        let cluster = self.start(id).await;
        cluster.bootstrap().await.expect("bootstrap");
        cluster
    }

    async fn join(&mut self, id: NodeId, via: NodeId) -> Arc<Cluster> {
        let cluster = self.start(id).await;
        cluster.join(&[addr(via)], WAIT).await.expect("join");
        cluster
    }

    /// Stops a node the way a crash does, as far as the others can tell.
    async fn stop(&mut self, id: NodeId) {
        let TestNode { cluster, mover } = self.nodes.remove(&id).expect("running");
        self.local.nodes.lock().unwrap().remove(&addr(id));
        mover.abort();
        let _ = mover.await;
        cluster.shutdown().await;
        let weak = Arc::downgrade(&cluster);
        drop(cluster);
        // The sled store is released once the last handle is gone.
        let deadline = Instant::now() + WAIT;
        while weak.strong_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn node(&self, id: NodeId) -> &Arc<Cluster> {
        &self.nodes[&id].cluster
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes.values().find(|n| n.cluster.is_leader()).map(|n| n.cluster.id)
    }

    async fn wait_leader_among(&self, ids: &[NodeId]) -> NodeId {
        wait_until("a leader", || ids.iter().copied().find(|id| self.node(*id).is_leader())).await
    }

    /// Waits until every running node applied a state satisfying `ready`.
    async fn wait_all(&self, what: &str, ready: impl Fn(&ClusterState) -> bool + Copy) {
        for (id, node) in &self.nodes {
            let ok = wait_applied(&node.cluster.applied(), WAIT, |a| ready(&a.state)).await;
            assert!(ok, "node {id}: {what} not applied within {WAIT:?}; state: {:?}", node.cluster.state());
        }
    }
}

async fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pricing(price: f64) -> PricingDocument {
    PricingDocument {
        last_updated: None,
        providers: vec![ProviderPricing {
            provider: "openai".into(),
            prefix_match: None,
            models: Some(vec![model("gpt-4o-mini", price)]),
        }],
    }
}

fn model(name: &str, input: f64) -> ModelPricing {
    ModelPricing {
        name: name.into(),
        aliases: None,
        input: Some(input),
        output: Some(input * 4.0),
        cached_input: None,
        cache_creation_input: None,
    }
}

fn price_of(state: &ClusterState) -> Option<f64> {
    state.pricing.as_ref()?.document.providers.first()?.models.as_ref()?.first()?.input
}

fn voters(cluster: &Cluster) -> BTreeSet<NodeId> {
    cluster.status().nodes.into_iter().filter(|m| m.role == "voter").map(|m| m.id).collect()
}

fn owned_by(state: &ClusterState, id: NodeId) -> usize {
    state.vnodes.vnodes.iter().filter(|s| matches!(s, VnodeState::Active { owner } if *owner == id)).count()
}

fn balanced(state: &ClusterState, members: &[NodeId]) -> bool {
    let total = state.vnodes.vnodes.len();
    let fair = total / members.len();
    state.vnodes.vnodes.iter().all(|s| matches!(s, VnodeState::Active { .. }))
        && members.iter().all(|id| (fair..=fair + 1).contains(&owned_by(state, *id)))
}

async fn three_nodes() -> TestCluster {
    three_nodes_with(settings()).await
}

async fn three_nodes_with(settings: ClusterSettings) -> TestCluster {
    let mut cluster = TestCluster::new();
    cluster.settings = settings;
    cluster.bootstrap(1).await;
    cluster.join(2, 1).await;
    cluster.join(3, 1).await;
    cluster.wait_all("three members, balanced", |s| s.nodes.len() == 3 && balanced(s, &[1, 2, 3])).await;
    let leader = cluster.wait_leader_among(&[1, 2, 3]).await;
    wait_until("three voters", || (voters(cluster.node(leader)).len() == 3).then_some(())).await;
    cluster
}

/// Retries a write while it fails with a retryable error, as the API's clients do.
async fn write_retrying(node: &Cluster, command: Command) -> CommandResponse {
    let deadline = Instant::now() + WAIT;
    loop {
        match node.write(command.clone()).await {
            Ok(response) => return response,
            Err(ClusterError::NoQuorum(reason)) if Instant::now() < deadline => {
                eprintln!("retrying a write: {reason}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_writes_from_any_node_reach_every_node() {
    let cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();

    let response =
        cluster.node(follower).write(Command::SetPricing(pricing(0.15))).await.expect("write via a follower");
    assert_eq!(response, CommandResponse::Applied { version: 1 });
    cluster.wait_all("pricing v1", |s| s.pricing.as_ref().map(|p| p.version) == Some(1)).await;
    for id in [1, 2, 3] {
        assert_eq!(price_of(&cluster.node(id).state()), Some(0.15), "node {id}");
    }

    // A refusal is the state's answer, the same wherever the write was made.
    let mut bad = pricing(0.15);
    bad.providers[0].models.as_mut().unwrap().push(model("broken", -1.0));
    match cluster.node(follower).write(Command::SetPricing(bad)).await.expect("committed") {
        CommandResponse::Refused { reason } => assert!(reason.contains("broken"), "{reason}"),
        other => panic!("a negative price was accepted: {other:?}"),
    }
    let states: Vec<ClusterState> = [1, 2, 3].iter().map(|id| cluster.node(*id).state()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "every node applied the same log");
    assert_eq!(states[0].pricing.as_ref().unwrap().version, 1);

    let status = cluster.node(follower).status();
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.vnodes.total, 16);
    assert_eq!(status.vnodes.owners.values().sum::<usize>(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_minority_refuses_writes_and_catches_up_after_healing() {
    let cluster = three_nodes().await;
    let old_leader = cluster.leader().expect("a leader");
    cluster.faults.isolate(&addr(old_leader));

    let error = cluster.node(old_leader).write(Command::SetPricing(pricing(1.0))).await.expect_err("no quorum");
    match &error {
        ClusterError::NoQuorum(reason) => assert!(reason.contains("retry"), "{reason}"),
        other => panic!("expected a retryable error, got {other:?}"),
    }

    let majority: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != old_leader).collect();
    let new_leader = wait_until("a new leader in the majority", || {
        majority.iter().copied().find(|id| cluster.node(*id).is_leader())
    })
    .await;
    let response = write_retrying(cluster.node(majority[0]), Command::SetPricing(pricing(2.0))).await;
    assert!(matches!(response, CommandResponse::Applied { .. }), "{response:?}");
    assert_ne!(new_leader, old_leader);
    wait_until("the cut-off node knows it is out of touch", || (!cluster.node(old_leader).in_contact()).then_some(()))
        .await;
    assert!(cluster.node(majority[0]).in_contact() && cluster.node(majority[1]).in_contact());
    assert_eq!(price_of(&cluster.node(old_leader).state()), None, "the minority applied nothing new");

    cluster.faults.heal_all();
    cluster.wait_all("the majority's pricing", |s| price_of(s) == Some(2.0)).await;
    wait_until("back in touch", || cluster.node(old_leader).in_contact().then_some(())).await;
    let states: Vec<ClusterState> = [1, 2, 3].iter().map(|id| cluster.node(*id).state()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "the old leader converged");
}

/// A follower cut off for several election timeouts (a network blip, a paused process) does not
/// depose the leader when it comes back: with Pre-Vote it asks whether it could win before it
/// raises its term, the others refuse while they hear from the leader, and so the term it would
/// come back with, which the leader would have to step down for, never exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_follower_back_from_isolation_does_not_depose_the_leader() {
    let cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let term = cluster.node(leader).figures().term;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();

    cluster.faults.isolate(&addr(follower));
    // Several of its election timeouts (300-600 ms) without a leader.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(cluster.node(follower).figures().term, term, "the cut-off follower did not raise its term");
    cluster.faults.heal_all();
    wait_until("the follower back in touch", || cluster.node(follower).in_contact().then_some(())).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for id in [1, 2, 3] {
        let figures = cluster.node(id).figures();
        assert_eq!((figures.leader, figures.term), (Some(leader), term), "node {id} follows the same leader");
    }
    let response = write_retrying(cluster.node(follower), Command::SetPricing(pricing(3.0))).await;
    assert!(matches!(response, CommandResponse::Applied { .. }), "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_converges_despite_dropped_and_delayed_calls() {
    let cluster = three_nodes().await;
    cluster.faults.drop_every(4);
    cluster.faults.delay(Duration::from_millis(15));
    for round in 1..=12u32 {
        let node = cluster.node(NodeId::from(round % 3 + 1));
        let response = write_retrying(node, Command::SetPricing(pricing(f64::from(round)))).await;
        assert!(matches!(response, CommandResponse::Applied { .. }), "{response:?}");
    }
    cluster.faults.heal_all();
    cluster.wait_all("the last pricing", |s| price_of(s) == Some(12.0)).await;
    let states: Vec<ClusterState> = [1, 2, 3].iter().map(|id| cluster.node(*id).state()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "every node applied the same log");
    // A write retried after a lost answer may commit twice: versions count commits, at least 12.
    assert!(states[0].pricing.as_ref().unwrap().version >= 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_restarted_node_keeps_its_identity_and_catches_up() {
    let mut cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let restarted = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let before = owned_by(&cluster.node(restarted).state(), restarted);
    assert!(before > 0);

    cluster.stop(restarted).await;
    let response = write_retrying(cluster.node(leader), Command::SetPricing(pricing(3.0))).await;
    assert!(matches!(response, CommandResponse::Applied { .. }));

    let node = cluster.start(restarted).await;
    assert!(node.is_initialized().await, "the raft store kept the membership");
    cluster.wait_all("pricing made while it was down", |s| price_of(s) == Some(3.0)).await;
    let state = node.state();
    assert_eq!(state.nodes.len(), 3, "no new member: the same node came back");
    assert_eq!(owned_by(&state, restarted), before, "its vnodes waited for it (no failover within 3s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_node_far_behind_catches_up_from_a_snapshot_sent_over_the_network() {
    const EVERY: u64 = 20;
    let mut cluster = three_nodes_with(ClusterSettings { snapshot_every_logs: EVERY, ..settings() }).await;
    let leader = cluster.leader().expect("a leader");
    let lagging = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let running: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != lagging).collect();
    let behind_at = cluster.node(lagging).figures().applied_index;
    cluster.stop(lagging).await;

    // Enough writes for snapshots to be built and the log behind them purged.
    let last = 6 * EVERY;
    for round in 1..=last {
        let response = write_retrying(cluster.node(leader), Command::SetPricing(pricing(round as f64))).await;
        assert!(matches!(response, CommandResponse::Applied { .. }), "{response:?}");
    }
    wait_until("the running nodes purged what the stopped node misses", || {
        running.iter().all(|id| cluster.node(*id).figures().purged_index > behind_at).then_some(())
    })
    .await;

    // Only a snapshot can bring it back: the entries it misses are gone from every log.
    let node = cluster.start(lagging).await;
    cluster.wait_all("the newest pricing", |s| price_of(s) == Some(last as f64)).await;
    let figures = node.figures();
    assert!(figures.snapshot_index > behind_at, "a snapshot was installed: {figures:?}");
    let states: Vec<ClusterState> = [1, 2, 3].iter().map(|id| cluster.node(*id).state()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "the node caught up to the same state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_keeps_five_voters_and_makes_the_rest_learners() {
    let mut cluster = TestCluster::new();
    cluster.bootstrap(1).await;
    for id in 2..=6 {
        cluster.join(id, 1).await;
    }
    cluster.wait_all("six members", |s| s.nodes.len() == 6).await;
    let leader = cluster.wait_leader_among(&[1, 2, 3, 4, 5, 6]).await;
    let status = wait_until("five voters", || {
        let status = cluster.node(leader).status();
        (status.nodes.iter().filter(|m| m.role == "voter").count() == 5).then_some(status)
    })
    .await;
    let learners: Vec<&str> = status.nodes.iter().filter(|m| m.role == "learner").map(|m| m.name.as_str()).collect();
    assert_eq!(learners, ["node-6"], "{status:?}");
    // Learners own data like everyone else.
    cluster.wait_all("a balanced map over six", |s| balanced(s, &[1, 2, 3, 4, 5, 6])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_unreachable_node_loses_its_vnodes_after_the_failover_delay() {
    let mut cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let failed = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let stopped_at = Instant::now();
    cluster.stop(failed).await;
    cluster.wait_all("the failed node's vnodes reassigned", move |s| owned_by(s, failed) == 0).await;
    assert!(stopped_at.elapsed() >= Duration::from_secs(3), "failover waited for failover_after");
    let state = cluster.node(leader).state();
    let live: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != failed).collect();
    assert_eq!(live.iter().map(|id| owned_by(&state, *id)).sum::<usize>(), 16, "every vnode has a live owner");
    assert!(state.nodes.contains_key(&failed), "failover keeps the member: it may come back");

    // Back, it owns nothing, then the controller gives it its share again.
    cluster.start(failed).await;
    cluster.wait_all("rebalanced with the node back", |s| balanced(s, &[1, 2, 3])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_leaving_node_hands_everything_over_and_is_removed() {
    let cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let leaving = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    cluster.node(leader).remove_node(leaving, false, WAIT).await.expect("leave");
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != leaving).collect();
    for id in &rest {
        let ok = wait_applied(&cluster.node(*id).applied(), WAIT, |a| !a.state.nodes.contains_key(&leaving)).await;
        let state = cluster.node(*id).state();
        assert!(ok && state.leaving.is_empty(), "node {id}: {state:?}");
        assert!(balanced(&state, &rest), "node {id}: {state:?}");
    }
    wait_until("out of the raft membership", || {
        (!cluster.node(leader).status().nodes.iter().any(|m| m.id == leaving)
            && voters(cluster.node(leader)) == rest.iter().copied().collect())
        .then_some(())
    })
    .await;
    // The last member cannot leave.
    let state = cluster.node(leader).state();
    assert_eq!(state.held_by.get(&leaving).map(|m| rest.contains(m)), Some(true), "a member holds its data");
    // The leader leaves too: it hands its role over as well.
    let leader = cluster.wait_leader_among(&rest).await;
    let last = rest.iter().copied().find(|id| *id != leader).unwrap();
    cluster.node(last).remove_node(leader, false, WAIT).await.expect("the leader leaves");
    wait_until("the last member leads alone", || {
        (cluster.node(last).is_leader() && voters(cluster.node(last)) == BTreeSet::from([last])).then_some(())
    })
    .await;
    assert_eq!(cluster.node(last).state().held_by.len(), 2, "it holds both departed nodes' data");
    let error = cluster.node(last).remove_node(last, false, WAIT).await.expect_err("last member");
    assert!(matches!(error, ClusterError::Refused(ref r) if r.contains("last member")), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_dead_node_is_removed_by_force_after_failover() {
    let mut cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let dead = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    cluster.stop(dead).await;
    // A dead node cannot be drained: a clean leave waits, a forced one is refused until failover
    // gave its vnodes away.
    match cluster.node(leader).remove_node(dead, true, Duration::from_secs(1)).await {
        Err(ClusterError::Refused(reason)) => assert!(reason.contains("owns"), "{reason}"),
        other => panic!("forced removal of an owner: {other:?}"),
    }
    cluster.wait_all("failover", move |s| owned_by(s, dead) == 0).await;
    cluster.node(leader).remove_node(dead, true, WAIT).await.expect("forced removal");
    cluster.wait_all("two members", move |s| s.nodes.len() == 2 && !s.nodes.contains_key(&dead)).await;
    wait_until("the dead node out of the raft membership", || {
        (voters(cluster.node(leader)) == [1, 2, 3].into_iter().filter(|id| *id != dead).collect()).then_some(())
    })
    .await;
    assert!(cluster.node(leader).state().held_by.is_empty(), "its data is given up, not held");
}

/// A leader cut off with one follower from the majority of five voters goes on sending that
/// follower heartbeats (same term: the follower accepts them, and with Pre-Vote never runs for
/// election). Counting those as contact kept the follower's lease, so it went on merging the
/// vnodes the majority had meanwhile given to others. Renewals are answered only by a leader a
/// majority acknowledged: both lapse within half of `failover_after`, before the majority
/// reassigns anything, and regain it once back and caught up with the reassignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_minority_with_the_old_leader_loses_its_lease_before_the_majority_reassigns_its_vnodes() {
    let mut cluster = TestCluster::new();
    cluster.bootstrap(1).await;
    for id in 2..=5 {
        cluster.join(id, 1).await;
    }
    let all = [1, 2, 3, 4, 5];
    cluster.wait_all("a balanced map over five", |s| balanced(s, &all)).await;
    wait_until("five voters holding their leases", || {
        let leader = cluster.leader()?;
        let voters = cluster.node(leader).status().nodes.iter().filter(|m| m.role == "voter").count();
        (voters == 5 && all.iter().all(|id| cluster.node(*id).holds_lease().holds())).then_some(())
    })
    .await;
    let old_leader = cluster.leader().expect("a leader");
    let follower = all.into_iter().find(|id| *id != old_leader).unwrap();
    let majority: Vec<NodeId> = all.into_iter().filter(|id| *id != old_leader && *id != follower).collect();
    let owned_before = owned_by(&cluster.node(follower).state(), follower);
    assert!(owned_before > 0, "the follower owns vnodes");

    cluster.faults.partition(&[&addr(old_leader), &addr(follower)]);
    let reassigned = |id: NodeId| {
        let reassigned = |state: &ClusterState| owned_by(state, follower) == 0 && owned_by(state, old_leader) == 0;
        majority.iter().any(|m| m != &id && reassigned(&cluster.node(*m).state()))
    };
    wait_lapsed_before_reassigned(&cluster, &[old_leader, follower], reassigned).await;
    assert_eq!(owned_by(&cluster.node(follower).state(), follower), owned_before, "its own map is unchanged");
    let new_leader = cluster.wait_leader_among(&majority).await;
    wait_until("the majority reassigned the minority's vnodes", || reassigned(0).then_some(())).await;
    wait_until("the majority merging", || {
        majority.iter().all(|id| cluster.node(*id).holds_lease().holds()).then_some(())
    })
    .await;
    assert!(!cluster.node(follower).holds_lease().holds(), "the follower still merges nothing");

    cluster.faults.heal_all();
    let reassigned = cluster.node(new_leader).state().vnodes.epoch;
    for id in [old_leader, follower] {
        let node = cluster.node(id);
        wait_until("back in touch, holding its lease", || node.holds_lease().holds().then_some(())).await;
        assert!(
            node.state().vnodes.epoch >= reassigned,
            "node {id} holds its lease with the map it was given meanwhile"
        );
    }
}

/// Polls until every node of `ids` lapsed, asserting that none of them still held its lease when
/// `reassigned` (asked with each node) was seen true.
async fn wait_lapsed_before_reassigned(cluster: &TestCluster, ids: &[NodeId], reassigned: impl Fn(NodeId) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut lapsed = BTreeSet::new();
    while lapsed.len() < ids.len() {
        for id in ids {
            if !lapsed.contains(id) {
                let held = cluster.node(*id).holds_lease().holds();
                assert!(!(held && reassigned(*id)), "node {id} held its lease after its vnodes were reassigned");
                if !held {
                    lapsed.insert(*id);
                }
            }
        }
        assert!(Instant::now() < deadline, "{ids:?}: not all lapsed within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A member the leader's Raft messages do not reach, though its own calls reach the leader (a
/// one-way firewall, a stale address, a hung Raft core) loses its vnodes at failover, since the
/// leader counts from its acknowledgements; the leader refuses it a lease well before, so it
/// stops merging them before they are given away, and merges again once back and caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_member_the_leader_cannot_reach_loses_its_lease_before_its_vnodes() {
    let cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    wait_until("every lease held", || [1, 2, 3].iter().all(|id| cluster.node(*id).holds_lease().holds()).then_some(()))
        .await;
    assert!(owned_by(&cluster.node(follower).state(), follower) > 0);

    cluster.faults.slow_raft_to(&addr(follower), None);
    let reassigned = |_| owned_by(&cluster.node(leader).state(), follower) == 0;
    wait_lapsed_before_reassigned(&cluster, &[follower], reassigned).await;
    wait_until("the follower's vnodes reassigned", || reassigned(0).then_some(())).await;
    assert!(!cluster.node(follower).holds_lease().holds(), "still no lease");

    cluster.faults.heal_all();
    let epoch = cluster.node(leader).state().vnodes.epoch;
    let node = cluster.node(follower);
    wait_until("the follower holding its lease again", || node.holds_lease().holds().then_some(())).await;
    assert!(node.state().vnodes.epoch >= epoch, "it holds its lease with the map it was given meanwhile");
}

/// Under a leader that predates lease renewals (a rolling upgrade), followers count its
/// heartbeats instead: they hold their leases, lose one when cut off, and regain it when back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_under_a_leader_that_predates_renewals_heartbeats_keep_the_lease() {
    let cluster = three_nodes().await;
    let leader = cluster.leader().expect("a leader");
    cluster.faults.predate_lease(&addr(leader));
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    // Longer than the lease (half of failover_after) since the last answered renewal.
    tokio::time::sleep(cluster.settings.failover_after).await;
    for id in [1, 2, 3] {
        assert!(cluster.node(id).holds_lease().holds(), "node {id} holds its lease");
    }
    cluster.faults.isolate(&addr(follower));
    wait_until("the cut-off follower's lease lapsed", || (!cluster.node(follower).holds_lease().holds()).then_some(()))
        .await;
    cluster.faults.heal(&addr(follower));
    wait_until("the follower holding its lease again", || cluster.node(follower).holds_lease().holds().then_some(()))
        .await;
}
