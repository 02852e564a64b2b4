//! A node's membership in the cluster: its Raft node, the replicated state it has applied,
//! writes routed to the leader, joining, and (on the leader) the controller that keeps the vnode
//! map balanced, fails over unreachable nodes and lets nodes leave.

use crate::lease::{Lease, LeaseCheck};
use crate::network::{Directory, NetworkFactory};
use crate::raft::Raft;
use crate::raft_store::{self, AppliedState};
use crate::state::{ClusterState, Command, CommandResponse, PeerNode};
use crate::transport::{Transport, TransportError};
use crate::vnodes::{Move, NodeId, VnodeState};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_proto::peer::{
    AwaitConfigRequest, JoinRequest, JoinResponse, LeaseRequest, LeaseResponse, RaftRequest, RaftResponse,
    WriteRequest, WriteResponse,
};
use tracing::{debug, info, warn};

/// The most voters a cluster keeps; further nodes are learners (SPEC §6).
pub const MAX_VOTERS: usize = 5;

/// Cluster timing and size.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Vnodes of a new cluster.
    pub vnodes: u16,
    /// Raft heartbeat.
    pub heartbeat_interval: Duration,
    /// Raft election timeout (lower bound; twice it is the upper bound).
    pub election_timeout: Duration,
    /// Deadline of one node-to-node call, and of a write waiting for its commit.
    pub rpc_timeout: Duration,
    /// A node unreachable this long loses its vnodes.
    pub failover_after: Duration,
    /// Vnodes moved at once.
    pub max_concurrent_moves: usize,
    /// A snapshot is built every this many log entries, and as many entries are kept before
    /// it; a node further behind than that catches up from a snapshot sent over the network.
    pub snapshot_every_logs: u64,
}

impl ClusterSettings {
    /// [`ClusterSettings::snapshot_every_logs`] of a node.
    pub const SNAPSHOT_EVERY_LOGS: u64 = 1000;
}

/// Why a cluster operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// No leader is reachable (election in progress, or this node is in a minority): retry.
    #[error("{0}")]
    NoQuorum(String),
    /// The state refused the command.
    #[error("{0}")]
    Refused(String),
    /// Something else failed.
    #[error("{0}")]
    Failed(String),
}

/// One member as `GET /api/v1/cluster` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// Cluster address.
    pub cluster_addr: String,
    /// API address.
    pub api_addr: String,
    /// `voter` or `learner` (or `member` when not in the Raft membership yet).
    pub role: String,
    /// Leader's view: milliseconds since the last acknowledged heartbeat (leader only).
    pub last_contact_ms: Option<u64>,
    /// Vnodes it owns.
    pub vnodes: usize,
    /// True while it is leaving.
    pub leaving: bool,
}

/// The cluster as `GET /api/v1/cluster` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub node_id: NodeId,
    /// This node's name.
    pub name: String,
    /// This node's cluster address.
    pub cluster_addr: String,
    /// This node's API address.
    pub api_addr: String,
    /// The vnode count this node was configured with (the cluster's once it is a member).
    pub configured_vnodes: u16,
    /// The cluster whose state this node holds (the id of the node that bootstrapped it), if
    /// any: a node is admitted to a cluster only when it holds none or that cluster's.
    #[serde(default)]
    pub cluster_id: Option<NodeId>,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    /// Whether a leader with a majority is in touch with this node ([`Cluster::in_contact`]).
    #[serde(default = "in_contact_by_default")]
    pub in_contact: bool,
    /// The leader this node is in touch with: `None` while it is not (an election, or cut off
    /// from the majority, where Raft still remembers the leader it last had, or still leads).
    pub leader: Option<NodeId>,
    /// Raft term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last committed entry.
    pub commit_index: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Members.
    pub nodes: Vec<MemberStatus>,
    /// Vnode map summary.
    pub vnodes: VnodeSummary,
    /// Departed nodes whose data a member holds: departed id → member id.
    pub held_by: BTreeMap<NodeId, NodeId>,
    /// Leaving nodes whose data is being copied: leaving id → member id.
    pub draining: BTreeMap<NodeId, NodeId>,
}

/// A status from a node that predates `in_contact` says nothing of it.
fn in_contact_by_default() -> bool {
    true
}

/// Vnode map summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeSummary {
    /// Number of vnodes.
    pub total: u16,
    /// Map epoch.
    pub epoch: u64,
    /// Vnodes being handed over.
    pub moving: usize,
    /// Vnodes still to be handed over (beside `moving`) before every member owns its share: the
    /// leader moves them a few at a time. 0 (and `moving` 0) when the map is balanced. Absent
    /// from versions before it (read as 0).
    #[serde(default)]
    pub to_move: usize,
    /// Vnodes per owner name.
    pub owners: BTreeMap<String, usize>,
}

/// Raft figures of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftFigures {
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Last entry committed by a quorum.
    pub commit_index: u64,
    /// Last entry applied here.
    pub applied_index: u64,
    /// This node leads.
    pub is_leader: bool,
    /// Last entry covered by this node's newest snapshot (built here or installed from the
    /// leader).
    pub snapshot_index: u64,
    /// Last entry removed from this node's log (it is in the snapshot).
    pub purged_index: u64,
}

/// Raft's leadership as it changes, for self-metrics: sees every change of the Raft figures,
/// not samples of them.
pub struct LeadershipWatch(
    openraft::type_config::alias::WatchReceiverOf<
        crate::raft::TypeConfig,
        openraft::RaftMetrics<crate::raft::TypeConfig>,
    >,
);

impl std::fmt::Debug for LeadershipWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadershipWatch").finish_non_exhaustive()
    }
}

impl LeadershipWatch {
    /// The term and the leader after the next change of the Raft figures; `None` once the Raft
    /// node stopped.
    pub async fn next(&mut self) -> Option<(u64, Option<NodeId>)> {
        self.0.changed().await.ok()?;
        let metrics = self.0.borrow_watched();
        Some((metrics.current_term, metrics.current_leader))
    }
}

/// A node's handle on the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// This node's Raft id.
    pub id: NodeId,
    /// This node's addresses.
    pub me: PeerNode,
    raft: Raft,
    applied: watch::Receiver<Arc<AppliedState>>,
    transport: Arc<dyn Transport>,
    settings: ClusterSettings,
    /// The controller and the address directory's updater.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// When a leader's append-entries (or heartbeat) last reached this node.
    leader_contact: Mutex<Option<Instant>>,
    /// This node's lease on the vnodes it owns ([`Cluster::holds_lease`]).
    lease: Mutex<Lease>,
    /// The leader that answered a lease renewal as a node that predates it: its append-entries
    /// (its own, no other leader's) renew the lease instead (see [`crate::lease`]).
    leader_predates_lease: Mutex<Option<NodeId>>,
    /// While this node leads: the members whose vnodes its controller is reassigning (a
    /// failover pass writes one command per vnode); their lease renewals are refused meanwhile.
    failing_over: Mutex<BTreeSet<NodeId>>,
    /// While this node leads: its term, and since when, as its controller saw it take over.
    leading_since: Mutex<Option<(u64, Instant)>>,
}

fn raft_config(settings: &ClusterSettings) -> Result<Arc<openraft::Config>, ClusterError> {
    let election = settings.election_timeout.as_millis() as u64;
    let config = openraft::Config {
        cluster_name: "tollgate".into(),
        heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
        election_timeout_min: election,
        election_timeout_max: election * 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_every_logs),
        max_in_snapshot_log_to_keep: settings.snapshot_every_logs,
        // A member that lost the leader for a while (a network blip, a paused process) first
        // asks whether it could win; without this it raised its term at every election timeout,
        // and when it came back the leader stepped down for that term: one leader change per
        // blip of any member.
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    config.validate().map(Arc::new).map_err(|e| ClusterError::Failed(format!("raft configuration: {e}")))
}

// Commands carry the rules and pricing documents, whose optional fields are skipped when empty:
// JSON, not postcard, reads them back.
fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(bytes).map_err(|e| ClusterError::Failed(format!("undecodable {what}: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("cluster messages always encode")
}

impl Cluster {
    /// Opens the Raft store in `dir`, starts the Raft node and, for a new node, either bootstraps
    /// a one-node cluster (`join` empty) or asks the nodes in `join` to be let in. A node whose
    /// store already holds cluster state just rejoins its cluster.
    pub async fn start(
        dir: &Path,
        id: NodeId,
        me: PeerNode,
        settings: ClusterSettings,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let (log_store, state_machine) = raft_store::open_waiting(dir)
            .await
            .map_err(|e| ClusterError::Failed(format!("opening the raft store: {e}")))?;
        let applied = state_machine.subscribe();
        let directory = Directory::default();
        directory.update(&applied.borrow().state.nodes);
        transport.set_cluster_id(applied.borrow().state.cluster_id.unwrap_or(0));
        let network = NetworkFactory::new(Arc::clone(&transport), directory.clone());
        let raft = Raft::new(id, raft_config(&settings)?, network, log_store, state_machine)
            .await
            .map_err(|e| ClusterError::Failed(format!("starting raft: {e}")))?;
        let lease = Lease::new(settings.failover_after / 2, settings.election_timeout);
        let cluster = Arc::new(Cluster {
            id,
            me,
            raft,
            applied,
            transport,
            settings,
            tasks: Mutex::new(Vec::new()),
            leader_contact: Mutex::new(None),
            lease: Mutex::new(lease),
            leader_predates_lease: Mutex::new(None),
            failing_over: Mutex::new(BTreeSet::new()),
            leading_since: Mutex::new(None),
        });
        let controller = tokio::spawn(controller(Arc::clone(&cluster)));
        let renewals = tokio::spawn(renew_lease(Arc::clone(&cluster)));
        let addresses = tokio::spawn({
            let mut applied = cluster.applied();
            let transport = Arc::clone(&cluster.transport);
            async move {
                while applied.changed().await.is_ok() {
                    let state = Arc::clone(&applied.borrow_and_update());
                    directory.update(&state.state.nodes);
                    transport.set_cluster_id(state.state.cluster_id.unwrap_or(0));
                }
            }
        });
        cluster.tasks.lock().expect("tasks lock").extend([controller, renewals, addresses]);
        Ok(cluster)
    }

    /// True once this node is part of an initialized cluster.
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Makes this node the first node of a new cluster and waits until the bootstrap is applied.
    pub async fn bootstrap(&self) -> Result<(), ClusterError> {
        if !self.is_initialized().await {
            let members = BTreeMap::from([(self.id, self.me.clone())]);
            if let Err(e) = self.raft.initialize(members).await {
                return Err(ClusterError::Failed(format!("initializing the cluster: {e}")));
            }
            info!(node = self.id, name = %self.me.name, "bootstrapped a new cluster");
        }
        self.wait_leader(self.settings.election_timeout * 10).await?;
        if !self.applied.borrow().state.is_bootstrapped() {
            let command = Command::Bootstrap { vnodes: self.settings.vnodes, id: self.id, node: self.me.clone() };
            match self.write(command).await? {
                CommandResponse::Applied { .. } => {}
                CommandResponse::Refused { reason } => debug!(%reason, "bootstrap already applied"),
            }
        }
        Ok(())
    }

    /// Checks that this node's advertised cluster address reaches this node: the other nodes
    /// use it for every call meant for this one. An address of another node (a copied
    /// configuration) is an error: with `--join` naming that node, this node took the join
    /// address for its own and bootstrapped a cluster of its own, silently; otherwise the leader
    /// could never reach it. An address that does not answer yet (a name not yet in DNS) is
    /// only logged: the cluster's own checks catch it later.
    pub async fn check_advertised(&self) -> Result<(), ClusterError> {
        let addr = &self.me.cluster_addr;
        let wrong = |who: String| {
            ClusterError::Failed(format!(
                "the advertised cluster address {addr} (advertise_addr) reaches {who}, not this node ({}, {}): other \
                 nodes would reach that node when they mean this one; set advertise_addr to an address of this node",
                self.me.name, self.id
            ))
        };
        match self.transport.identify(addr).await {
            Ok(answer) if answer.node_id == self.id => Ok(()),
            Ok(answer) => Err(wrong(format!("node {} ({})", answer.name, answer.node_id))),
            // Only another node refuses this node's own call (another secret, another cluster,
            // an older version).
            Err(TransportError::Refused { code, message, .. })
                if matches!(code.as_str(), "Unauthenticated" | "FailedPrecondition" | "Unimplemented") =>
            {
                Err(wrong(format!("another node, which refused this node's call ({code}: {message})")))
            }
            Err(error) => {
                warn!(address = %addr, %error, "could not check that the advertised cluster address reaches this node");
                Ok(())
            }
        }
    }

    /// What this node says of itself when it asks to be let in.
    fn join_request(&self) -> JoinRequest {
        JoinRequest {
            node_id: self.id,
            name: self.me.name.clone(),
            cluster_addr: self.me.cluster_addr.clone(),
            api_addr: self.me.api_addr.clone(),
            vnodes: u32::from(self.settings.vnodes),
            cluster_id: self.applied.borrow().state.cluster_id.unwrap_or(0),
        }
    }

    /// Asks the nodes at `addresses` (cluster ports) to let this node in, retrying until one
    /// does or `deadline` passes, then waits until this node is a member of the applied state.
    pub async fn join(&self, addresses: &[String], deadline: Duration) -> Result<(), ClusterError> {
        let started = Instant::now();
        let request = self.join_request();
        let mut attempt: u32 = 0;
        loop {
            if self.applied.borrow().state.nodes.contains_key(&self.id) {
                return Ok(());
            }
            for address in addresses {
                match self.transport.join(address, request.clone()).await {
                    Ok(response) => {
                        info!(via = %address, leader = response.leader_id, "joined the cluster");
                        return self.wait_member(deadline.saturating_sub(started.elapsed())).await;
                    }
                    Err(error @ TransportError::Refused { .. }) if is_final(&error) => {
                        return Err(ClusterError::Refused(format!("joining via {address} was refused: {error}")));
                    }
                    // Retryable: the cluster is busy (another node joining), or the leader could
                    // not replicate to this node (its advertised address is wrong, say): asked
                    // again shortly, with the reason shown at the default level.
                    Err(error) => warn!(via = %address, %error, "join attempt failed"),
                }
            }
            if started.elapsed() > deadline {
                return Err(ClusterError::NoQuorum(format!("could not join via {addresses:?} within {deadline:?}")));
            }
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10)))).await;
        }
    }

    /// For a member that restarted: when the addresses the cluster knows it by are not its own
    /// any more, asks the other members (any of them forwards to the leader) to update them, or
    /// updates them itself while it is the leader (the others would forward to its old address),
    /// retrying until that succeeds or `deadline` passes.
    pub async fn announce(&self, deadline: Duration) -> Result<(), ClusterError> {
        let started = Instant::now();
        loop {
            let state = self.state();
            if state.nodes.get(&self.id).is_none_or(|known| *known == self.me) {
                return Ok(());
            }
            let request = self.join_request();
            let announced = if self.is_leader() {
                // The others would forward the announcement to this node's old address: the
                // leader (a single node, or one elected again) updates its addresses itself.
                match self.handle_join(request).await {
                    Ok(_) => Some("itself".to_string()),
                    Err(error) => {
                        warn!(%error, "announcing new addresses failed");
                        None
                    }
                }
            } else {
                let peers = state.nodes.iter().filter(|(id, _)| **id != self.id).map(|(_, n)| &n.cluster_addr);
                let mut announced = None;
                for address in peers {
                    match self.transport.join(address, request.clone()).await {
                        Ok(_) => {
                            announced = Some(address.clone());
                            break;
                        }
                        Err(error) => warn!(via = %address, %error, "announcing new addresses failed"),
                    }
                }
                announced
            };
            if let Some(via) = announced {
                info!(%via, "announced new addresses");
                let me = self.me.clone();
                let id = self.id;
                let left = deadline.saturating_sub(started.elapsed());
                return if wait_applied(&self.applied, left, |a| a.state.nodes.get(&id) == Some(&me)).await {
                    Ok(())
                } else {
                    Err(ClusterError::NoQuorum("the new addresses were not applied here in time".into()))
                };
            }
            if started.elapsed() > deadline {
                return Err(ClusterError::NoQuorum(format!("could not announce new addresses within {deadline:?}")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_member(&self, timeout: Duration) -> Result<(), ClusterError> {
        let id = self.id;
        if wait_applied(&self.applied, timeout, |a| a.state.nodes.contains_key(&id)).await {
            Ok(())
        } else {
            Err(ClusterError::NoQuorum("joined, but the membership was not applied here in time".into()))
        }
    }

    async fn wait_leader(&self, timeout: Duration) -> Result<NodeId, ClusterError> {
        let waited = self.raft.wait(Some(timeout)).metrics(|m| m.current_leader.is_some(), "a leader").await;
        match waited {
            Ok(m) => Ok(m.current_leader.expect("checked")),
            Err(_) => Err(ClusterError::NoQuorum(format!("no leader elected within {timeout:?}"))),
        }
    }

    /// Hands a Raft RPC from a peer to the local Raft node, noting contact with the leader.
    pub async fn serve_raft(&self, request: RaftRequest) -> RaftResponse {
        if let Some(error) = crate::network::misaddressed(self.id, request.target) {
            return RaftResponse { payload: Vec::new(), error };
        }
        let (response, accepted) = crate::network::serve_raft(&self.raft, request).await;
        if let Some(accepted) = accepted {
            let now = Instant::now();
            *self.leader_contact.lock().expect("contact lock") = Some(now);
            if *self.leader_predates_lease.lock().expect("lease lock") == Some(accepted.leader) {
                self.lease.lock().expect("lease lock").touch(now, accepted.commit, false);
            }
        }
        response
    }

    /// Answers a member's lease renewal: only a leader a majority acknowledged within two
    /// election timeouts does, with its term and what it committed in it, and only while the
    /// member acknowledged it within a quarter of `failover_after` (its failover counts from
    /// those acknowledgements: a member that reaches the leader but whose Raft messages fail gets
    /// no lease) and is not losing its vnodes in a failover pass now.
    pub fn handle_lease(&self, request: LeaseRequest) -> Result<LeaseResponse, ClusterError> {
        let member = request.node_id;
        let metrics = self.raft.metrics().borrow_watched().clone();
        if metrics.state != ServerState::Leader || !self.in_contact_by(&metrics) {
            return Err(ClusterError::NoQuorum("not a leader with a majority in touch: no lease to give".into()));
        }
        let Some(commit) = committed_in_term(&metrics) else {
            return Err(ClusterError::NoQuorum("a new leader that committed nothing in its term yet; retry".into()));
        };
        if member != self.id {
            let heartbeat = metrics.heartbeat.clone().unwrap_or_default();
            if !heartbeat.contains_key(&member) {
                return Err(ClusterError::NoQuorum(format!("node {member} is not a member this leader replicates to")));
            }
            let since = self.leading_since.lock().expect("leading lock").map(|(_, since)| since);
            let silent = acked_ago(&heartbeat, member).or_else(|| since.map(|s| s.elapsed()));
            if silent.is_none_or(|silent| silent > self.settings.failover_after / 4) {
                return Err(ClusterError::NoQuorum(format!(
                    "node {member} has not acknowledged this leader's messages lately: no lease"
                )));
            }
            if self.failing_over.lock().expect("failover lock").contains(&member) {
                return Err(ClusterError::NoQuorum(format!("node {member}'s vnodes are being reassigned; retry")));
            }
        }
        Ok(LeaseResponse { term: metrics.current_term, commit_index: commit })
    }

    /// Whether this node may merge data for the vnodes the applied map gives it: it holds its
    /// [lease](crate::lease) (in touch with a leader within half of `failover_after`, so that
    /// the leader cannot have given them to another member; and, after a lapse, back in touch
    /// and caught up). A single-member cluster always holds it once it leads.
    pub fn holds_lease(&self) -> LeaseCheck {
        let now = Instant::now();
        let (acked, commit, applied) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow_watched();
            let acked = if metrics.state != ServerState::Leader {
                None
            } else if self.sole_voter(&metrics) {
                Some(now)
            } else {
                metrics
                    .last_quorum_acked
                    .and_then(|acked| now.checked_sub(openraft::Instant::elapsed(&acked.into_inner())))
            };
            (acked, committed_in_term(&metrics), metrics.last_applied.map_or(0, |l| l.index))
        };
        let mut lease = self.lease.lock().expect("lease lock");
        if let Some(acked) = acked {
            lease.touch(acked, commit, true);
        }
        lease.check(now, applied)
    }

    /// True when this node is in touch with a leader: it leads and a quorum acknowledged it
    /// recently, or it heard from the leader within two election timeouts. A node cut off from
    /// the majority is not, even while it still remembers who led.
    pub fn in_contact(&self) -> bool {
        self.in_contact_by(&self.raft.metrics().borrow_watched().clone())
    }

    /// True when this node is in touch with a leader and has applied everything that leader
    /// reported committed in its own term: a node restarted has caught up with the changes
    /// committed meanwhile (configuration, the vnode map). The commit must be of the current
    /// term (a leader's first entry commits everything before it): openraft does not restore the
    /// reported commit at a restart, and a new leader reports none, or an older one, until its
    /// first entry is committed.
    pub fn caught_up(&self) -> bool {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let Some(committed) = committed_in_term(&metrics) else { return false };
        let applied = metrics.last_applied.as_ref().map_or(0, |l| l.index);
        applied >= committed && self.in_contact_by(&metrics)
    }

    /// Whether this node is the only voter (a single-node cluster): it leads with itself as its
    /// majority.
    fn sole_voter(&self, metrics: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> bool {
        metrics.membership_config.membership().voter_ids().all(|id| id == self.id)
    }

    /// [`Cluster::in_contact`] by Raft's `metrics` as read by the caller.
    fn in_contact_by(&self, metrics: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> bool {
        let window = self.settings.election_timeout * 2;
        if metrics.state == ServerState::Leader {
            return self.sole_voter(metrics)
                || metrics
                    .last_quorum_acked
                    .is_some_and(|acked| openraft::Instant::elapsed(&acked.into_inner()) <= window);
        }
        metrics.current_leader.is_some()
            && self.leader_contact.lock().expect("contact lock").is_some_and(|t| t.elapsed() <= window)
    }

    /// The replicated state as applied on this node, as it changes.
    pub fn applied(&self) -> watch::Receiver<Arc<AppliedState>> {
        self.applied.clone()
    }

    /// The replicated state as applied now.
    pub fn state(&self) -> ClusterState {
        self.applied.borrow().state.clone()
    }

    /// The Raft node (the peer service hands it Raft RPCs).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The transport to the other nodes.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The cluster settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The current leader and its node, if known.
    pub fn leader(&self) -> Option<(NodeId, PeerNode)> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let leader = metrics.current_leader?;
        let node =
            metrics.membership_config.membership().nodes().find(|(id, _)| **id == leader).map(|(_, n)| n.clone())?;
        Some((leader, node))
    }

    /// Why this node's Raft stopped by itself, if it did: its log or state machine could not be
    /// written (a full disk), or it panicked. Such a node no longer follows the cluster's
    /// configuration (pricing, rules, the vnode map) and never will again: it must stop.
    pub fn failure(&self) -> Option<String> {
        self.raft.metrics().borrow_watched().running_state.as_ref().err().map(ToString::to_string)
    }

    /// Resolves when this node's Raft stops (by itself: [`Cluster::failure`]; or at shutdown),
    /// with why.
    pub async fn stopped(&self) -> String {
        let wait = self.raft.wait(None);
        let _ = wait.metrics(|m| m.running_state.is_err(), "raft stopped").await;
        self.failure().unwrap_or_else(|| "raft stopped".into())
    }

    /// True when this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Commits a command, on the leader or through it, and returns its response once it is
    /// applied on the leader. A follower cut off from the leader, or a leader without a quorum,
    /// fails with [`ClusterError::NoQuorum`] (retryable).
    pub async fn write(&self, command: Command) -> Result<CommandResponse, ClusterError> {
        let timeout = self.settings.rpc_timeout * 2;
        for _ in 0..3 {
            if let Some(error) = self.failure() {
                return Err(ClusterError::Failed(format!("raft stopped: {error}")));
            }
            if self.is_leader() {
                // Raft stopping by itself (its store failed while applying, say) leaves the
                // write unanswered: it is answered with the failure instead.
                let written = tokio::select! {
                    written = tokio::time::timeout(timeout, self.raft.client_write(command.clone())) => written,
                    error = self.stopped() => return Err(ClusterError::Failed(format!("raft stopped: {error}"))),
                };
                return match written {
                    Ok(Ok(response)) => {
                        self.await_config_everywhere(&command, &response.data).await;
                        Ok(response.data)
                    }
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => continue,
                    Ok(Err(e)) => Err(ClusterError::Failed(e.to_string())),
                    Err(_) => Err(ClusterError::NoQuorum(format!(
                        "the write was not confirmed within {timeout:?}: this leader cannot reach a majority. It \
                         is in this leader's log and may still be committed once a majority is back: read the \
                         document's version before retrying"
                    ))),
                };
            }
            let Some((leader, node)) = self.leader() else {
                self.wait_leader(self.settings.election_timeout * 3).await?;
                continue;
            };
            debug!(leader, "forwarding a write to the leader");
            let request = WriteRequest { command: encode(&command) };
            return match self.transport.write(&node.cluster_addr, request).await {
                Ok(WriteResponse { response }) => decode("write response", &response),
                Err(e @ TransportError::Refused { .. }) if !e.is_retryable() => {
                    Err(ClusterError::Failed(e.to_string()))
                }
                Err(e) => Err(ClusterError::NoQuorum(format!(
                    "the leader {} could not be reached, or did not answer: {e}. If it took the write, the change \
                     may still be committed: read the document's version before retrying",
                    node.name
                ))),
            };
        }
        Err(ClusterError::NoQuorum("no stable leader; retry".into()))
    }

    /// After a configuration write (on the leader): waits, at most an election timeout, until
    /// this node and every member in touch with it use the new document, so that data merged on
    /// any of them after the answer uses it. A member out of touch uses it once it is back:
    /// what other nodes forward to it waits for it there, and a restarted node is not ready
    /// before it caught up with the cluster's log.
    async fn await_config_everywhere(&self, command: &Command, response: &CommandResponse) {
        let CommandResponse::Applied { version } = *response else { return };
        let (pricing_version, rules_version) = match command {
            Command::SetPricing(_) => (version, 0),
            Command::SetRules(_) => (0, version),
            _ => return,
        };
        let timeout = self.settings.election_timeout;
        let window = self.settings.election_timeout * 2;
        let heartbeat = self.raft.metrics().borrow_watched().heartbeat.clone().unwrap_or_default();
        let in_touch: Vec<(NodeId, String)> = self
            .state()
            .nodes
            .iter()
            .filter(|(id, _)| **id == self.id || acked_ago(&heartbeat, **id).is_some_and(|ago| ago <= window))
            .map(|(id, node)| (*id, node.cluster_addr.clone()))
            .collect();
        let request = AwaitConfigRequest { pricing_version, rules_version, timeout_ms: timeout.as_millis() as u32 };
        let calls = in_touch.iter().map(|(id, addr)| {
            async move {
                match self.transport.await_config(addr, request).await {
                    Ok(used) if used.pricing_version >= pricing_version && used.rules_version >= rules_version => {}
                    Ok(_) => warn!(
                        node = id,
                        pricing_version,
                        rules_version,
                        "a member did not apply the new configuration within {timeout:?}"
                    ),
                    // A node of an older version cannot say: it applies the change within moments.
                    Err(TransportError::Refused { code, .. }) if code == "Unimplemented" => {}
                    Err(e) => {
                        debug!(node = id, error = %e, "could not ask a member whether it applied the new configuration")
                    }
                }
            }
        });
        futures_util::future::join_all(calls).await;
    }

    /// Handles a write forwarded by another node (this node must be the leader).
    pub async fn handle_write(&self, request: WriteRequest) -> Result<WriteResponse, ClusterError> {
        let command: Command = decode("command", &request.command)?;
        let response = self.write(command).await?;
        Ok(WriteResponse { response: encode(&response) })
    }

    /// Handles a join request: the leader adds the node as a learner (waiting until it caught
    /// up), makes it a data-plane member, and a voter while there are fewer than five.
    pub async fn handle_join(&self, request: JoinRequest) -> Result<JoinResponse, ClusterError> {
        if !self.is_leader() {
            let (leader, node) = match self.leader() {
                Some(found) => found,
                None => (
                    self.wait_leader(self.settings.election_timeout * 3).await?,
                    self.leader().ok_or_else(|| ClusterError::NoQuorum("no leader".into()))?.1,
                ),
            };
            if leader == self.id {
                return Box::pin(self.handle_join(request)).await;
            }
            // The leader's final refusal (another cluster, a name taken, a node that left) is
            // this node's answer too; anything else is worth a retry.
            return self.transport.join(&node.cluster_addr, request).await.map_err(|e| match e {
                TransportError::Refused { ref message, .. } if is_final(&e) => ClusterError::Refused(message.clone()),
                e => ClusterError::NoQuorum(format!("forwarding the join to the leader: {e}")),
            });
        }
        let id = request.node_id;
        let node = PeerNode { name: request.name, cluster_addr: request.cluster_addr, api_addr: request.api_addr };
        let state = self.state();
        if state.departed.contains(&id) {
            return Err(ClusterError::Refused(format!(
                "node {id} ({}) left this cluster; to join again, start it with an empty data directory",
                node.name
            )));
        }
        if let Some(ours) = state.cluster_id.filter(|ours| request.cluster_id != 0 && request.cluster_id != *ours) {
            return Err(ClusterError::Refused(format!(
                "{} (node {id}) holds the state of another cluster (cluster {}; this is cluster {ours}): a node \
                 joins only with an empty data directory; stop it, move its data directory away and start it with --join",
                node.name, request.cluster_id
            )));
        }
        if request.vnodes != 0 && state.is_bootstrapped() && request.vnodes != u32::from(state.vnodes.len()) {
            return Err(ClusterError::Refused(format!(
                "this cluster has {} vnodes but {} was started with cluster.vnodes = {}; the count is fixed when a cluster is created",
                state.vnodes.len(),
                node.name,
                request.vnodes
            )));
        }
        if let Some((other, _)) = state.nodes.iter().find(|(other, n)| **other != id && n.name == node.name) {
            return Err(ClusterError::Refused(format!(
                "a member named {:?} exists already (id {other}); remove it first or choose another --node-id",
                node.name
            )));
        }
        if let Some(known) = state.nodes.get(&id).filter(|known| known.name != node.name) {
            return Err(ClusterError::Refused(format!(
                "node {id} is the member named {:?}, not {:?}: a node keeps the name it joined with",
                known.name, node.name
            )));
        }
        if state.nodes.get(&id) == Some(&node) {
            return Ok(JoinResponse { leader_id: self.id });
        }
        // A new node, or a member at new addresses: the node there must be this one.
        self.check_joining(id, &node).await?;
        let membership = self.raft.metrics().borrow_watched().membership_config.membership().clone();
        match membership.nodes().find(|(n, _)| **n == id).map(|(_, known)| known.clone()) {
            None => {
                info!(node = id, name = %node.name, "adding a learner");
                self.raft
                    .add_learner(id, node.clone(), true)
                    .await
                    .map_err(|e| membership_error(&format!("adding {id}"), e))?;
            }
            Some(known) if known != node => {
                // A member restarted with other addresses: the same node, reachable elsewhere.
                info!(node = id, from = %known, to = %node, "updating a member's addresses");
                self.raft
                    .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, node.clone())])), false)
                    .await
                    .map_err(|e| membership_error(&format!("updating {id}'s addresses"), e))?;
            }
            Some(_) => {}
        }
        // A new node is admitted once the leader reaches it. openraft's blocking `add_learner`
        // waits only until the learner is within `replication_lag_threshold` (5000) entries, which
        // an unreachable node is at once in a short log; admitted, it would be made a voter that
        // never answers, which left a single-node cluster without a majority for good (nothing
        // could remove it). A member's new addresses reach the transport only once the state has
        // them, so the leader does not wait to replicate there first (the member announced them
        // itself, and `check_joining` found no other node there).
        let new = !state.nodes.contains_key(&id);
        if new && !self.wait_replicated(id, LEARNER_CONTACT_TIMEOUT).await {
            if answered(&self.raft.metrics().borrow_watched(), id) {
                // Reachable, still catching up (a large snapshot, a slow link): it stays a
                // learner, and the node's next attempt finds it further on.
                info!(node = id, name = %node.name, "not admitted yet: the leader is still replicating to it");
                return Err(ClusterError::NoQuorum(format!(
                    "the leader is still replicating its log to {}; retry",
                    node.name
                )));
            }
            warn!(node = id, name = %node.name, address = %node.cluster_addr, "not admitted: the leader cannot replicate to it");
            if let Err(e) = self.raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false).await {
                warn!(node = id, error = %e, "removing a learner that could not be reached failed");
            }
            return Err(ClusterError::NoQuorum(format!(
                "the leader could not replicate to {} at {} within {LEARNER_CONTACT_TIMEOUT:?}: check that this \
                 cluster address is right and reachable from the leader; retry",
                node.name, node.cluster_addr
            )));
        }
        if let CommandResponse::Refused { reason } = self.write(Command::AddNode { id, node }).await? {
            return Err(ClusterError::Refused(reason));
        }
        self.promote_voters().await;
        Ok(JoinResponse { leader_id: self.id })
    }

    /// Asks the node at a new node's cluster address (or a member's new one) who it is, before it
    /// is made a learner (or the member's addresses change). Another node there (a wrong address),
    /// or a node that refuses this cluster's calls (it holds another cluster's state, or has
    /// another secret), would never be reached as that node: the join would only time out as
    /// unreachable, and a member's traffic would go to another node. No answer within [`IDENTIFY_TIMEOUT`] (not listening
    /// yet, an address that drops packets, a version without the call) is left to the
    /// replication check that follows.
    async fn check_joining(&self, id: NodeId, node: &PeerNode) -> Result<(), ClusterError> {
        let addr = &node.cluster_addr;
        let Ok(answer) = tokio::time::timeout(IDENTIFY_TIMEOUT, self.transport.identify(addr)).await else {
            return Ok(());
        };
        match answer {
            Ok(answer) if answer.node_id == id => Ok(()),
            Ok(answer) => Err(ClusterError::Refused(format!(
                "the cluster address {addr} given for {name} (node {id}) reaches node {} ({}): give {name}'s own \
                 cluster address",
                answer.name,
                answer.node_id,
                name = node.name
            ))),
            Err(TransportError::Refused { code, message, .. })
                if matches!(code.as_str(), "FailedPrecondition" | "Unauthenticated") =>
            {
                Err(ClusterError::Refused(format!(
                    "{} at {addr} refuses this cluster's calls ({code}: {message})",
                    node.name
                )))
            }
            Err(_) => Ok(()),
        }
    }

    /// Waits up to `timeout` for the leader to have replicated its log to `id` ([`replicated`]).
    async fn wait_replicated(&self, id: NodeId, timeout: Duration) -> bool {
        self.raft.wait(Some(timeout)).metrics(|m| replicated(m, id), "the log replicated to a learner").await.is_ok()
    }

    /// Makes learners voters while there are fewer than [`MAX_VOTERS`].
    async fn promote_voters(&self) {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let state = self.state();
        // Only admitted members the leader replicates to: a voter that never answers counts
        // against the majority.
        let candidates: Vec<NodeId> = membership
            .learner_ids()
            .filter(|id| state.nodes.contains_key(id) && !state.leaving.contains(id) && replicated(&metrics, *id))
            .collect();
        let room = MAX_VOTERS.saturating_sub(voters.len());
        let promote: BTreeSet<NodeId> = candidates.into_iter().take(room).collect();
        if promote.is_empty() {
            return;
        }
        info!(nodes = ?promote, "promoting learners to voters");
        if let Err(e) = self.raft.change_membership(ChangeMembers::AddVoterIds(promote), true).await {
            // Another membership change (a node joining at the same time) is still being
            // committed: the controller's next pass promotes them.
            if membership_change_in_progress(&e) {
                info!("a membership change is still being committed; promoting at the next pass");
                return;
            }
            warn!(error = %e, "promoting learners failed");
        }
    }

    /// Asks the cluster to remove a member: its vnodes move to the others, a member copies
    /// everything it holds, and it leaves the state and the Raft membership. Returns once it is
    /// gone from the applied state, or fails after `timeout` (the removal goes on).
    ///
    /// `force` removes a member that cannot leave cleanly (it is down for good): once failover
    /// gave its vnodes away, it is forgotten with the data it held.
    pub async fn remove_node(&self, id: NodeId, force: bool, timeout: Duration) -> Result<(), ClusterError> {
        if !self.state().nodes.contains_key(&id) {
            return Err(ClusterError::Refused(format!("node {id} is not a member")));
        }
        let command = if force { Command::RemoveNode { id } } else { Command::MarkLeaving { id } };
        if let CommandResponse::Refused { reason } = self.write(command).await? {
            return Err(ClusterError::Refused(reason));
        }
        // This node leaving meanwhile (removed by another request) stops following the cluster:
        // it cannot tell when `id` is gone, and says so at once (it waited out `timeout`, then
        // reported a removal that had finished as still going on).
        let me = self.id;
        let settled = |a: &Arc<AppliedState>| !a.state.nodes.contains_key(&id) || a.state.departed.contains(&me);
        if !wait_applied(&self.applied, timeout, settled).await {
            return Err(ClusterError::NoQuorum(format!("node {id} is still leaving after {timeout:?}; it goes on")));
        }
        let state = self.state();
        if id != me && state.nodes.contains_key(&id) {
            return Err(ClusterError::NoQuorum(format!(
                "node {id} is leaving, but this node left the cluster meanwhile and no longer follows it: ask a \
                 member ({}) whether it is gone",
                state.member_names()
            )));
        }
        Ok(())
    }

    /// The cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let in_contact = self.in_contact_by(&metrics);
        let applied = self.applied.borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let raft_nodes: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let heartbeat = metrics.heartbeat.clone().unwrap_or_default();
        let leading_since = self
            .leading_since
            .lock()
            .expect("leading lock")
            .filter(|(term, _)| *term == metrics.current_term)
            .map(|(_, since)| since);
        // The members that keep vnodes: the leader balances the map over them.
        let staying: BTreeSet<NodeId> =
            applied.state.nodes.keys().copied().filter(|id| !applied.state.leaving.contains(id)).collect();
        let mut owned: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut moving = 0;
        for vnode in &applied.state.vnodes.vnodes {
            match vnode {
                VnodeState::Active { owner } => *owned.entry(*owner).or_default() += 1,
                VnodeState::Moving { .. } => moving += 1,
            }
        }
        let nodes = applied
            .state
            .nodes
            .iter()
            .map(|(id, node)| MemberStatus {
                id: *id,
                name: node.name.clone(),
                cluster_addr: node.cluster_addr.clone(),
                api_addr: node.api_addr.clone(),
                role: if voters.contains(id) {
                    "voter".into()
                } else if raft_nodes.contains(id) {
                    "learner".into()
                } else {
                    "member".into()
                },
                // The leader's own entry is the time of its own last log write, which grows while
                // nothing is written (a single node): it is in contact with itself.
                last_contact_ms: if *id == self.id && heartbeat.contains_key(id) {
                    Some(0)
                } else {
                    // A member that has not answered since this node took over: as long as that
                    // (it showed nothing, as on a follower; failover counts the same silence).
                    let since_leading = || leading_since.map(|since| since.elapsed());
                    match heartbeat.get(id) {
                        Some(Some(t)) => Some(openraft::Instant::elapsed(&t.into_inner())),
                        Some(None) => since_leading(),
                        // Not a Raft member (admitted, not yet added): not asked.
                        None => None,
                    }
                    .map(|silent| silent.as_millis() as u64)
                },
                vnodes: owned.get(id).copied().unwrap_or(0),
                leaving: applied.state.leaving.contains(id),
            })
            .collect();
        let owners = owned
            .iter()
            .map(|(id, count)| (applied.state.nodes.get(id).map_or_else(|| id.to_string(), |n| n.name.clone()), *count))
            .collect();
        ClusterStatus {
            node_id: self.id,
            name: self.me.name.clone(),
            cluster_addr: self.me.cluster_addr.clone(),
            api_addr: self.me.api_addr.clone(),
            configured_vnodes: self.settings.vnodes,
            cluster_id: applied.state.cluster_id,
            state: format!("{:?}", metrics.state).to_lowercase(),
            in_contact,
            leader: metrics.current_leader.filter(|_| in_contact),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            commit_index: metrics.cluster_committed.map(|l| l.index),
            applied_index: metrics.last_applied.map(|l| l.index),
            nodes,
            vnodes: VnodeSummary {
                total: applied.state.vnodes.len(),
                epoch: applied.state.vnodes.epoch,
                moving,
                to_move: applied.state.vnodes.rebalance(&staying).len(),
                owners,
            },
            held_by: applied.state.held_by.clone(),
            draining: applied.state.draining.iter().map(|(from, drain)| (*from, drain.to)).collect(),
        }
    }

    /// Watches the leadership (term and leader) as it changes.
    pub fn leadership(&self) -> LeadershipWatch {
        LeadershipWatch(self.raft.metrics())
    }

    /// Raft figures for self-metrics.
    pub fn figures(&self) -> RaftFigures {
        let metrics = self.raft.metrics().borrow_watched().clone();
        RaftFigures {
            term: metrics.current_term,
            leader: metrics.current_leader,
            commit_index: metrics.cluster_committed.map_or(0, |l| l.index),
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            is_leader: metrics.state == ServerState::Leader,
            snapshot_index: metrics.snapshot.map_or(0, |l| l.index),
            purged_index: metrics.purged.map_or(0, |l| l.index),
        }
    }

    /// Stops the controller and the Raft node.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().expect("tasks lock").drain(..).collect();
        for task in tasks {
            task.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
    }
}

/// A refusal that retrying cannot change: the cluster said no, or the secret is wrong.
fn is_final(error: &TransportError) -> bool {
    matches!(error, TransportError::Refused { code, .. }
        if matches!(code.as_str(), "FailedPrecondition" | "Unauthenticated" | "PermissionDenied" | "InvalidArgument"))
}

/// Waits until the applied state satisfies `ready`; false on timeout.
pub async fn wait_applied(
    applied: &watch::Receiver<Arc<AppliedState>>,
    timeout: Duration,
    ready: impl Fn(&Arc<AppliedState>) -> bool,
) -> bool {
    let mut applied = applied.clone();
    let waited = tokio::time::timeout(timeout, async move { applied.wait_for(|a| ready(a)).await.is_ok() }).await;
    waited.unwrap_or(false)
}

/// A membership change refused because another one is still being committed (two nodes
/// joining at once): retrying shortly succeeds.
fn membership_change_in_progress(
    error: &RaftError<crate::raft::TypeConfig, ClientWriteError<crate::raft::TypeConfig>>,
) -> bool {
    matches!(
        error.api_error(),
        Some(ClientWriteError::ChangeMembershipError(openraft::error::ChangeMembershipError::InProgress(_)))
    )
}

/// A failed membership change: retryable (`NoQuorum`, answered 503 / `UNAVAILABLE`) when another
/// change is in progress, else a failure.
fn membership_error(
    context: &str,
    error: RaftError<crate::raft::TypeConfig, ClientWriteError<crate::raft::TypeConfig>>,
) -> ClusterError {
    if membership_change_in_progress(&error) {
        ClusterError::NoQuorum(format!("{context}: another membership change is being committed; retry"))
    } else {
        ClusterError::Failed(format!("{context}: {error}"))
    }
}

/// Whether the leader (whose `metrics` these are) has replicated to `id` its log up to the
/// membership in force (the one that made `id` a learner, say): `id` is reachable and has the log
/// so far.
fn replicated(metrics: &openraft::RaftMetrics<crate::raft::TypeConfig>, id: NodeId) -> bool {
    let membership = metrics.membership_config.log_id();
    match metrics.replication.as_ref().and_then(|replication| replication.get(&id)) {
        Some(Some(matched)) => Some(matched) >= membership.as_ref(),
        _ => false,
    }
}

/// Whether `id` has answered the leader (whose `metrics` these are): a heartbeat or a
/// replication call acknowledged.
fn answered(metrics: &openraft::RaftMetrics<crate::raft::TypeConfig>, id: NodeId) -> bool {
    metrics.heartbeat.as_ref().and_then(|heartbeat| heartbeat.get(&id)).is_some_and(|last| last.is_some())
}

/// How long a join waits for the leader to replicate to the new learner before it is refused
/// (retryable): a reachable node gets the short Raft log, or its snapshot, well within it.
const LEARNER_CONTACT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the leader waits for a joining node to say who it is before going on without the
/// answer (the replication check then decides): short, since it comes before that check's
/// [`LEARNER_CONTACT_TIMEOUT`] within the join's own deadline.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the leader's controller looks at the cluster.
const CONTROL_INTERVAL: Duration = Duration::from_millis(500);

/// A follower's lease renewals: every half election timeout, asks the leader it knows (see
/// [`crate::lease`]). A leader that predates the `Lease` RPC makes its append-entries count
/// instead, until a leader answers one.
async fn renew_lease(cluster: Arc<Cluster>) {
    let interval = cluster.settings.election_timeout / 2;
    loop {
        tokio::time::sleep(interval).await;
        if cluster.is_leader() {
            continue;
        }
        if cluster.applied.borrow().state.departed.contains(&cluster.id) {
            continue;
        }
        let Some((leader_id, leader)) = cluster.leader() else { continue };
        let request = LeaseRequest { node_id: cluster.id };
        let sent = Instant::now();
        // At most an election timeout: a leader gone silent must not hold renewals up once
        // another is elected.
        let answer = cluster.transport.lease(&leader.cluster_addr, request, cluster.settings.election_timeout).await;
        let mut predates = cluster.leader_predates_lease.lock().expect("lease lock");
        match answer {
            Ok(answer) => {
                *predates = None;
                cluster.lease.lock().expect("lease lock").touch(sent, Some(answer.commit_index), true);
            }
            Err(TransportError::Refused { code, .. }) if code == "Unimplemented" => {
                if predates.replace(leader_id) != Some(leader_id) {
                    info!(leader = %leader.name, "the leader predates lease renewals: its heartbeats renew this node's lease");
                }
            }
            Err(error) => debug!(leader = %leader.name, %error, "lease renewal failed"),
        }
    }
}

/// On the leader: fail over unreachable nodes, let leaving nodes go, keep the map balanced.
async fn controller(cluster: Arc<Cluster>) {
    let mut contact = Contact::default();
    let mut last_pass = Instant::now();
    loop {
        tokio::time::sleep(CONTROL_INTERVAL).await;
        // Notes a leader's acknowledgements in the lease even when nothing is merged (else a
        // leader stepping down would look out of touch since its last merge).
        cluster.holds_lease();
        // A pass long after the last one: this process was not running (paused, starved), so
        // every member looks silent; the next pass, with Raft's view brought up to date (this
        // node may not even lead any more), judges their contact.
        let stalled = last_pass.elapsed() > CONTROL_INTERVAL * 4;
        last_pass = Instant::now();
        // One reading of Raft's state: leading, and in which term.
        let (leading, term) = {
            let metrics = cluster.raft.metrics();
            let metrics = metrics.borrow_watched();
            (metrics.state == ServerState::Leader, metrics.current_term)
        };
        // The term this node leads in, and since when (`Cluster::leading_since`): a leadership
        // lost and won again between two passes is a new one (its members' silence counts from
        // then).
        let since = {
            let mut leading_since = cluster.leading_since.lock().expect("leading lock");
            match *leading_since {
                Some((leading_term, since)) if leading && leading_term == term => Some(since),
                _ => {
                    contact = Contact::default();
                    *leading_since = leading.then(|| (term, Instant::now()));
                    leading_since.map(|(_, since)| since)
                }
            }
        };
        let Some(since) = since else { continue };
        if !stalled {
            contact.update(&cluster, term, since);
        }
        if let Err(error) = control_once(&cluster, term, since).await {
            debug!(%error, "controller pass incomplete");
        }
    }
}

/// The members the leader has lost contact with, and since when: each loss and each return is
/// logged once (openraft itself warns at every heartbeat that fails, four times a second).
#[derive(Debug, Default)]
struct Contact {
    lost: BTreeMap<NodeId, Instant>,
}

impl Contact {
    /// Compares the leader's last acknowledgement from each member with the election timeout
    /// (a follower that long without the leader would start an election itself).
    fn update(&mut self, cluster: &Cluster, term: u64, leader_since: Instant) {
        let state = cluster.state();
        let metrics = cluster.raft.metrics().borrow_watched().clone();
        let Some(heartbeat) = leader_heartbeat(metrics, term) else { return };
        let settings = &cluster.settings;
        for (id, node) in &state.nodes {
            if *id == cluster.id {
                continue;
            }
            let silent = acked_ago(&heartbeat, *id).unwrap_or_else(|| leader_since.elapsed());
            let out = silent > settings.election_timeout;
            match (out, self.lost.get(id)) {
                (true, None) => {
                    warn!(node = id, name = %node.name, address = %node.cluster_addr,
                        silent_ms = silent.as_millis() as u64,
                        failover_in_s = settings.failover_after.saturating_sub(silent).as_secs(),
                        "lost contact with a member");
                    self.lost.insert(*id, Instant::now().checked_sub(silent).unwrap_or_else(Instant::now));
                }
                (false, Some(since)) => {
                    info!(node = id, name = %node.name, away_ms = since.elapsed().as_millis() as u64,
                        "back in contact with a member");
                    self.lost.remove(id);
                }
                _ => {}
            }
        }
        self.lost.retain(|id, _| state.nodes.contains_key(id));
    }
}

/// The leader's record of its members' acknowledgements, from `metrics` taken while this node
/// still leads in `term`: `None` once it does not (a node that lost its leadership has no such
/// record, and every member would look silent since it took over).
fn leader_heartbeat(metrics: openraft::RaftMetrics<crate::raft::TypeConfig>, term: u64) -> Option<Acks> {
    if metrics.state != ServerState::Leader || metrics.current_term != term {
        return None;
    }
    metrics.heartbeat
}

/// The index the cluster committed, as Raft's `metrics` report it, if it was committed in the
/// current term: a new leader reports none, or an earlier term's (which may be behind what the
/// leader before it committed, though its log holds it), until its first entry is committed,
/// and that entry commits everything before it.
fn committed_in_term(metrics: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> Option<u64> {
    metrics.cluster_committed.filter(|c| c.committed_leader_id().term == metrics.current_term).map(|c| c.index)
}

/// A leader's record of its members' acknowledgements (Raft's heartbeat metrics).
type Acks = BTreeMap<NodeId, Option<openraft::type_config::alias::SerdeInstantOf<crate::raft::TypeConfig>>>;

/// How long ago `id` last acknowledged the leader whose record `acks` is: `None` when it has not
/// since that leader took over, or is not a Raft member.
fn acked_ago(acks: &Acks, id: NodeId) -> Option<Duration> {
    acks.get(&id).and_then(|acked| *acked).map(|acked| openraft::Instant::elapsed(&acked.into_inner()))
}

/// Members unreachable in the view of the leader of `term`: those not acknowledged within
/// `failover_after` (nodes never heard of since this leader took over count as reachable until
/// `failover_after` passed). `None` when this node no longer leads in `term`: it decides nothing.
fn unreachable_members(
    cluster: &Cluster,
    state: &ClusterState,
    term: u64,
    leader_since: Instant,
) -> Option<BTreeSet<NodeId>> {
    let metrics = cluster.raft.metrics().borrow_watched().clone();
    let heartbeat = leader_heartbeat(metrics, term)?;
    let failover_after = cluster.settings.failover_after;
    let unreachable = state
        .nodes
        .keys()
        .copied()
        .filter(|id| *id != cluster.id)
        .filter(|id| acked_ago(&heartbeat, *id).unwrap_or_else(|| leader_since.elapsed()) > failover_after)
        .collect();
    Some(unreachable)
}

/// Ends a failover pass (however the pass ends): no member is refused a lease for it any more.
struct FailoverPass<'a>(&'a Cluster);

impl Drop for FailoverPass<'_> {
    fn drop(&mut self) {
        self.0.failing_over.lock().expect("failover lock").clear();
    }
}

async fn control_once(cluster: &Cluster, term: u64, leader_since: Instant) -> Result<(), ClusterError> {
    let state = cluster.state();
    if !state.is_bootstrapped() {
        return Ok(());
    }
    cluster.promote_voters().await;
    // Read after the await, which can outlast this node's leadership.
    let Some(unreachable) = unreachable_members(cluster, &state, term, leader_since) else { return Ok(()) };
    let live: BTreeSet<NodeId> =
        state.nodes.keys().copied().filter(|id| !unreachable.contains(id) && !state.leaving.contains(id)).collect();
    if live.is_empty() {
        return Ok(());
    }

    // Failover: vnodes of unreachable nodes go to live ones at once (no hand-over possible).
    // Their lease renewals are refused until the pass is over: one answered halfway would let a
    // member that just came back merge for vnodes reassigned moments later.
    *cluster.failing_over.lock().expect("failover lock") = unreachable.clone();
    let _pass = FailoverPass(cluster);
    let mut reassigned = false;
    let mut load: BTreeMap<NodeId, usize> =
        state.vnodes.counts(&live).into_iter().filter(|(id, _)| live.contains(id)).collect();
    for (vnode, vnode_state) in state.vnodes.vnodes.iter().enumerate() {
        let vnode = vnode as u16;
        let command = match vnode_state {
            VnodeState::Active { owner } if unreachable.contains(owner) => {
                let (to, count) = load.iter_mut().min_by_key(|(id, count)| (**count, **id)).expect("live is not empty");
                *count += 1;
                Some(Command::Reassign { vnode, to: *to })
            }
            VnodeState::Moving { from, to, .. } if unreachable.contains(from) && live.contains(to) => {
                Some(Command::Reassign { vnode, to: *to })
            }
            VnodeState::Moving { to, .. } if unreachable.contains(to) => Some(Command::AbortMove { vnode }),
            _ => None,
        };
        if let Some(command) = command {
            warn!(vnode, %command, "failover");
            cluster.write(command).await?;
            reassigned = true;
        }
    }
    if reassigned {
        return Ok(());
    }

    // Leaving nodes: once they own and move nothing, a live member copies their data (a
    // drain); the drain's completion removes them from the state.
    for id in &state.leaving {
        if state.owns_or_moves(*id) || state.draining.values().any(|d| d.to == *id) {
            continue;
        }
        if let Some(drain) = state.draining.get(id) {
            if live.contains(&drain.to) {
                continue;
            }
            warn!(node = id, target = drain.to, "the drain target is unreachable; restarting the drain");
        }
        if unreachable.contains(id) {
            // Its data cannot be copied while it is down (`leave --force` gives it up).
            continue;
        }
        let Some(to) = drain_target(&state, &live, *id) else { continue };
        info!(node = id, to, "draining a leaving node");
        cluster.write(Command::BeginDrain { from: *id, to }).await?;
    }

    // Nodes gone from the state leave the Raft membership too.
    let membership = cluster.raft.metrics().borrow_watched().membership_config.membership().clone();
    let gone_voters: BTreeSet<NodeId> = membership.voter_ids().filter(|id| state.departed.contains(id)).collect();
    let remaining = membership.voter_ids().filter(|id| !gone_voters.contains(id)).count();
    if !gone_voters.is_empty() && remaining > 0 {
        info!(nodes = ?gone_voters, "removing departed voters");
        cluster
            .raft
            .change_membership(ChangeMembers::RemoveVoters(gone_voters), false)
            .await
            .map_err(|e| ClusterError::Failed(e.to_string()))?;
        cluster.promote_voters().await;
    }
    let membership = cluster.raft.metrics().borrow_watched().membership_config.membership().clone();
    let gone_learners: BTreeSet<NodeId> = membership.learner_ids().filter(|id| state.departed.contains(id)).collect();
    if !gone_learners.is_empty() {
        info!(nodes = ?gone_learners, "removing departed learners");
        cluster
            .raft
            .change_membership(ChangeMembers::RemoveNodes(gone_learners), false)
            .await
            .map_err(|e| ClusterError::Failed(e.to_string()))?;
    }

    // Planned moves toward a balanced map, a few at a time; leaving nodes move everything.
    let moving = state.vnodes.vnodes.iter().filter(|s| matches!(s, VnodeState::Moving { .. })).count();
    let budget = cluster.settings.max_concurrent_moves.saturating_sub(moving);
    if budget == 0 {
        return Ok(());
    }
    let moves: Vec<Move> = state.vnodes.rebalance(&live);
    let planned: Vec<Move> =
        moves.iter().filter(|planned| !unreachable.contains(&planned.from)).take(budget).copied().collect();
    if !planned.is_empty() {
        // One line per pass; each vnode's move at debug level.
        info!(starting = planned.len(), in_flight = moving, to_go = moves.len(), "moving vnodes");
    }
    for planned in planned {
        debug!(vnode = planned.vnode, from = planned.from, to = planned.to, "moving a vnode");
        cluster.write(Command::BeginMove { vnode: planned.vnode, from: planned.from, to: planned.to }).await?;
    }
    Ok(())
}

/// The live member that takes a leaving node's data: the one holding the fewest departed nodes'
/// data, then owning the fewest vnodes.
fn drain_target(state: &ClusterState, live: &BTreeSet<NodeId>, leaving: NodeId) -> Option<NodeId> {
    let owned = state.vnodes.counts(live);
    live.iter()
        .copied()
        .filter(|id| *id != leaving && !state.leaving.contains(id))
        .min_by_key(|id| (state.held_by_member(*id).len(), owned.get(id).copied().unwrap_or(0), *id))
}
