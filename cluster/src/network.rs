//! openraft's network over the [`Transport`]: the client side ([`NetworkFactory`]) and the
//! server side ([`serve_raft`]). openraft's messages travel as JSON inside the `Raft` RPC.

use crate::raft::{Raft, TypeConfig};
use crate::state::PeerNode;
use crate::transport::Transport;
use crate::vnodes::NodeId;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::sync::{Arc, RwLock};
use tollgate_proto::peer::{RaftKind, RaftRequest, RaftResponse};

pub use crate::raft_store::SnapshotData;

/// A full snapshot on the wire.
#[derive(Serialize, Deserialize)]
struct FullSnapshot {
    vote: VoteOf<TypeConfig>,
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// The latest known cluster address of each node. openraft keeps a client per peer for as long
/// as the peer stays in the membership, so a member that restarted elsewhere is reached through
/// this directory (kept current from the applied state), not through the address its client was
/// created with.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    addresses: Arc<RwLock<HashMap<NodeId, String>>>,
}

impl Directory {
    /// Records the addresses of `nodes`.
    pub fn update<'a>(&self, nodes: impl IntoIterator<Item = (&'a NodeId, &'a PeerNode)>) {
        let mut addresses = self.addresses.write().expect("directory lock");
        for (id, node) in nodes {
            if addresses.get(id) != Some(&node.cluster_addr) {
                addresses.insert(*id, node.cluster_addr.clone());
            }
        }
    }

    fn resolve(&self, id: NodeId) -> Option<String> {
        self.addresses.read().expect("directory lock").get(&id).cloned()
    }
}

/// Creates openraft clients for peers.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    transport: Arc<dyn Transport>,
    directory: Directory,
}

impl NetworkFactory {
    /// Clients over `transport`, addressing peers through `directory` first.
    pub fn new(transport: Arc<dyn Transport>, directory: Directory) -> NetworkFactory {
        NetworkFactory { transport, directory }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> Network {
        Network {
            transport: Arc::clone(&self.transport),
            target,
            fallback: node.cluster_addr.clone(),
            directory: self.directory.clone(),
            addr: node.cluster_addr.clone(),
        }
    }
}

/// openraft's client for one peer.
#[derive(Debug)]
pub struct Network {
    transport: Arc<dyn Transport>,
    target: NodeId,
    fallback: String,
    directory: Directory,
    addr: String,
}

impl Network {
    async fn call<Q: Serialize, A: DeserializeOwned>(
        &mut self,
        kind: RaftKind,
        request: &Q,
        option: &RPCOption,
    ) -> Result<A, RPCError<TypeConfig>> {
        self.addr = self.directory.resolve(self.target).unwrap_or_else(|| self.fallback.clone());
        let payload = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest { kind: kind as i32, payload, target: self.target };
        let call = self.transport.raft(&self.addr, request);
        let response = match tokio::time::timeout(option.soft_ttl(), call).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(RPCError::Unreachable(Unreachable::new(&error))),
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "{} did not answer in time",
                    self.addr
                ))))
            }
        };
        decode_response(&self.addr, response).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

fn decode_response<A: DeserializeOwned>(addr: &str, response: RaftResponse) -> Result<A, String> {
    if !response.error.is_empty() {
        return Err(format!("{addr}: {}", response.error));
    }
    serde_json::from_slice(&response.payload).map_err(|e| format!("{addr}: undecodable raft response: {e}"))
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::AppendEntries, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftKind::PreVote, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = FullSnapshot { vote, meta: snapshot.meta, data: snapshot.snapshot.into_inner() };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = self.call(RaftKind::FullSnapshot, &request, &option) => result.map_err(|e| match e {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::from_string(r.to_string())),
            }),
        }
    }
}

fn answer<T: Serialize, E: std::fmt::Display>(result: Result<T, E>) -> RaftResponse {
    match result {
        Ok(value) => match serde_json::to_vec(&value) {
            Ok(payload) => RaftResponse { payload, error: String::new() },
            Err(e) => RaftResponse { payload: Vec::new(), error: format!("cannot encode the answer: {e}") },
        },
        Err(e) => RaftResponse { payload: Vec::new(), error: e.to_string() },
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RaftResponse> {
    serde_json::from_slice(payload)
        .map_err(|e| RaftResponse { payload: Vec::new(), error: format!("undecodable raft request: {e}") })
}

/// Why this node, `id`, must not take a call meant for node `target` (0: not said, by older
/// senders): the caller has this address for another node, whose data directory is gone or
/// which belongs to another cluster. Taken, a Raft message would let a stranger answer, and vote,
/// for that node, and a query would answer with this node's data for the other's.
pub fn misaddressed(id: NodeId, target: NodeId) -> Option<String> {
    (target != 0 && target != id).then(|| {
        format!(
            "this is node {id}, not node {target}: the address the caller has for node {target} now belongs to another node"
        )
    })
}

/// An append-entries (or heartbeat) this node accepted from a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The leader that sent it.
    pub leader: NodeId,
    /// The index the leader reported committed, when it committed it in its own term: a new
    /// leader's report of an earlier term's commit may be behind what was committed.
    pub commit: Option<u64>,
}

/// Hands a Raft RPC from a peer to the local Raft node; for an append-entries it accepted, what
/// the leader said.
pub async fn serve_raft(raft: &Raft, request: RaftRequest) -> (RaftResponse, Option<Accepted>) {
    let kind = RaftKind::try_from(request.kind).unwrap_or(RaftKind::Unspecified);
    let response = match kind {
        RaftKind::AppendEntries => return append_entries(raft, &request.payload).await,
        RaftKind::Vote => match decode(&request.payload) {
            Ok(rpc) => answer(raft.vote(rpc).await),
            Err(e) => e,
        },
        RaftKind::PreVote => match decode(&request.payload) {
            Ok(rpc) => answer(raft.pre_vote(rpc).await),
            Err(e) => e,
        },
        RaftKind::FullSnapshot => match decode::<FullSnapshot>(&request.payload) {
            Ok(full) => {
                let snapshot =
                    SnapshotOf::<TypeConfig, SnapshotData> { meta: full.meta, snapshot: Cursor::new(full.data) };
                answer(raft.install_full_snapshot(full.vote, snapshot).await)
            }
            Err(e) => e,
        },
        RaftKind::Unspecified => {
            RaftResponse { payload: Vec::new(), error: format!("unknown raft message kind {}", request.kind) }
        }
    };
    (response, None)
}

async fn append_entries(raft: &Raft, payload: &[u8]) -> (RaftResponse, Option<Accepted>) {
    let rpc: AppendEntriesRequest<TypeConfig> = match decode(payload) {
        Ok(rpc) => rpc,
        Err(e) => return (e, None),
    };
    let (term, leader) = (rpc.vote.leader_id().term, rpc.vote.leader_id().node_id);
    let commit = rpc.leader_commit.filter(|c| c.committed_leader_id().term == term).map(|c| c.index);
    let result = raft.append_entries(rpc).await;
    let accepted = matches!(&result, Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)));
    (answer(result), accepted.then_some(Accepted { leader, commit }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_call_for_another_node_is_refused() {
        assert_eq!(misaddressed(7, 7), None);
        assert_eq!(misaddressed(7, 0), None, "older senders do not say");
        let error = misaddressed(7, 8).unwrap();
        assert!(error.contains("this is node 7, not node 8"), "{error}");
    }
}
