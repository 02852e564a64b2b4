//! Moving data between nodes as the applied cluster state asks (SPEC §6).
//!
//! - A vnode moving to this node: pull its normalisation state from the previous owner, merge it
//!   into the store through the vnode's owner actor (which does not own it yet), and commit the
//!   end of the move. Until then the vnode belongs to nobody and clients get retryable errors for
//!   its series. The import and a marker naming the move are written in one batch, and the
//!   marker is removed once the move is committed: a crash or a failed commit in between never
//!   imports twice.
//! - A leaving node drained to this node: pull everything it holds (its own data and what it
//!   holds for nodes that left before) into trees of their own, then commit the drain. The
//!   copies are not queried until the drain's commit says so, so a drain started over (its
//!   target crashed, or a new target was chosen) simply starts from empty trees.
//! - Trees of departed nodes this node does not hold (any more) are deleted.

use crate::metrics as m;
use crate::owner::OwnerHandle;
use crate::store::{durable, Op, Storage, StoreBatch};
use futures_util::StreamExt;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tollgate_cluster::raft_store::AppliedState;
use tollgate_cluster::{Cluster, ClusterState, Command, CommandResponse, NodeId, VnodeState};
use tollgate_proto::peer::HandOffRequest;
use tracing::{debug, info, warn};

/// The metadata key marking an imported, not yet committed move of `vnode`.
fn marker_key(vnode: u16) -> String {
    format!("handoff/{vnode}")
}

fn marker_value(from: NodeId, to: NodeId) -> Vec<u8> {
    format!("{from}->{to}").into_bytes()
}

/// Work in progress, so that a state change does not start it twice.
#[derive(Debug, Default)]
struct InProgress {
    vnodes: BTreeSet<u16>,
    drains: BTreeSet<NodeId>,
}

/// Watches the cluster state: takes over the vnodes moving to this node, copies the data of
/// nodes drained to it, and drops data it no longer holds.
pub fn start(cluster: Arc<Cluster>, owners: Arc<Vec<OwnerHandle>>, store: Arc<dyn Storage>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let in_progress: Arc<Mutex<InProgress>> = Arc::default();
        let mut applied = cluster.applied();
        loop {
            let state: Arc<AppliedState> = Arc::clone(&applied.borrow_and_update());
            for (vnode, vnode_state) in state.state.vnodes.vnodes.iter().enumerate() {
                let vnode = vnode as u16;
                let VnodeState::Moving { from, to } = vnode_state else { continue };
                if *to != cluster.id || !in_progress.lock().expect("lock").vnodes.insert(vnode) {
                    continue;
                }
                let (cluster, owners, store, in_progress) =
                    (Arc::clone(&cluster), Arc::clone(&owners), Arc::clone(&store), Arc::clone(&in_progress));
                let from = *from;
                tokio::spawn(async move {
                    take_over(&cluster, &owners[vnode as usize], store.as_ref(), vnode, from).await;
                    in_progress.lock().expect("lock").vnodes.remove(&vnode);
                });
            }
            for (from, drain) in &state.state.draining {
                if drain.to != cluster.id || !in_progress.lock().expect("lock").drains.insert(*from) {
                    continue;
                }
                let (cluster, store, in_progress) =
                    (Arc::clone(&cluster), Arc::clone(&store), Arc::clone(&in_progress));
                let (from, generation) = (*from, drain.generation);
                tokio::spawn(async move {
                    take_drain(&cluster, store.as_ref(), from, generation).await;
                    in_progress.lock().expect("lock").drains.remove(&from);
                });
            }
            let busy = in_progress.lock().expect("lock").drains.clone();
            if let Err(error) = drop_stale_held(&state.state, cluster.id, store.as_ref(), &busy) {
                warn!(%error, "dropping data this node no longer holds failed");
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    })
}

/// True while `state` moves `vnode` from `from` to `me`.
fn moving(state: &ClusterState, vnode: u16, from: NodeId, me: NodeId) -> bool {
    matches!(state.vnodes.vnodes.get(vnode as usize), Some(VnodeState::Moving { from: f, to }) if *f == from && *to == me)
}

/// True while the applied state still moves `vnode` from `from` to this node.
fn still_moving(cluster: &Cluster, vnode: u16, from: NodeId) -> bool {
    moving(&cluster.state(), vnode, from, cluster.id)
}

async fn take_over(cluster: &Cluster, owner: &OwnerHandle, store: &dyn Storage, vnode: u16, from: NodeId) {
    let mut attempt: u32 = 0;
    let marker = marker_value(from, cluster.id);
    while still_moving(cluster, vnode, from) {
        attempt += 1;
        match try_take_over(cluster, owner, store, vnode, from, &marker).await {
            Ok(()) => {
                metrics::counter!(m::VNODE_MOVES, "direction" => "in", "kind" => "state").increment(1);
                debug!(vnode, from, "took a vnode over");
                // The end of the move is committed, but maybe not yet applied here (the leader
                // committed it): until it is, the vnode still looks moving to this node, and the
                // mover must not start taking it over again (the old owner would wait 30 s for a
                // move that is over, and the attempt would fail with a warning).
                let me = cluster.id;
                let done = move |a: &Arc<AppliedState>| !moving(&a.state, vnode, from, me);
                let _ =
                    tollgate_cluster::runtime::wait_applied(&cluster.applied(), Duration::from_secs(30), done).await;
                return;
            }
            Err(error) => {
                metrics::counter!(m::VNODE_MOVE_FAILURES, "direction" => "in", "kind" => "state").increment(1);
                warn!(vnode, from, attempt, %error, "taking a vnode over failed; retrying");
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(20)))).await;
            }
        }
    }
    // The move ended otherwise (aborted, or reassigned by failover): forget any marker.
    let _ = clear_marker(store, vnode).await;
}

async fn try_take_over(
    cluster: &Cluster,
    owner: &OwnerHandle,
    store: &dyn Storage,
    vnode: u16,
    from: NodeId,
    marker: &[u8],
) -> Result<(), String> {
    let already_imported = store.meta(&marker_key(vnode)).map_err(|e| e.to_string())?.is_some_and(|v| v == marker);
    if !already_imported {
        let from_addr = address_of(&cluster.state(), from)?;
        let mut stream = cluster
            .transport()
            .hand_off(&from_addr, HandOffRequest { vnode: u32::from(vnode), drain: false })
            .await
            .map_err(|e| e.to_string())?;
        let mut entries = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            entries.extend(chunk.keys.into_iter().zip(chunk.values));
        }
        owner.import(entries, Some((marker_key(vnode), marker.to_vec()))).await.map_err(|e| e.to_string())?;
    }
    match cluster.write(Command::CompleteMove { vnode }).await {
        Ok(_) => {}
        Err(e) => return Err(format!("committing the end of the move: {e}")),
    }
    clear_marker(store, vnode).await
}

fn address_of(state: &ClusterState, id: NodeId) -> Result<String, String> {
    state.nodes.get(&id).map(|n| n.cluster_addr.clone()).ok_or_else(|| format!("node {id} is not a member any more"))
}

async fn clear_marker(store: &dyn Storage, vnode: u16) -> Result<(), String> {
    if store.meta(&marker_key(vnode)).map_err(|e| e.to_string())?.is_none() {
        return Ok(());
    }
    let mut batch = StoreBatch::default();
    batch.push(Op::DeleteMeta { key: marker_key(vnode) });
    durable(store.commit(batch).await.map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())
}

/// The holders a drain of `from` carries: `from` and the departed nodes it holds data of.
fn drained_holders(state: &ClusterState, from: NodeId) -> BTreeSet<NodeId> {
    let mut holders: BTreeSet<NodeId> = state.held_by_member(from).into_iter().collect();
    holders.insert(from);
    holders
}

/// True while the applied state still drains `from` to this node in `generation`.
fn still_draining(cluster: &Cluster, from: NodeId, generation: u64) -> bool {
    cluster.state().draining.get(&from).is_some_and(|d| d.to == cluster.id && d.generation == generation)
}

async fn take_drain(cluster: &Cluster, store: &dyn Storage, from: NodeId, generation: u64) {
    let mut attempt: u32 = 0;
    while still_draining(cluster, from, generation) {
        attempt += 1;
        match try_take_drain(cluster, store, from, generation).await {
            Ok(entries) => {
                metrics::counter!(m::VNODE_MOVES, "direction" => "in", "kind" => "drain").increment(1);
                info!(from, generation, entries, "holds a departed node's data now");
                return;
            }
            Err(error) => {
                metrics::counter!(m::VNODE_MOVE_FAILURES, "direction" => "in", "kind" => "drain").increment(1);
                warn!(from, generation, attempt, %error, "copying a leaving node's data failed; retrying");
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(20)))).await;
            }
        }
    }
}

async fn try_take_drain(cluster: &Cluster, store: &dyn Storage, from: NodeId, generation: u64) -> Result<u64, String> {
    let state = cluster.state();
    let holders = drained_holders(&state, from);
    // Start from empty trees: an earlier attempt may have copied part of it.
    for holder in &holders {
        store.drop_held(*holder).map_err(|e| e.to_string())?;
    }
    let mut views = std::collections::BTreeMap::new();
    for holder in &holders {
        views.insert(*holder, store.held(*holder).map_err(|e| e.to_string())?);
    }
    let from_addr = address_of(&state, from)?;
    let mut stream = cluster
        .transport()
        .hand_off(&from_addr, HandOffRequest { vnode: 0, drain: true })
        .await
        .map_err(|e| e.to_string())?;
    let mut entries = 0u64;
    let mut pending = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let view = views
            .get(&chunk.holder)
            .ok_or_else(|| format!("node {from} sent data of node {}, which it does not hold", chunk.holder))?;
        entries += chunk.keys.len() as u64;
        let mut batch = StoreBatch::default();
        for (key, value) in chunk.keys.into_iter().zip(chunk.values) {
            batch.push(Op::PutRaw { key, value });
        }
        pending.push(view.commit(batch).await.map_err(|e| e.to_string())?);
    }
    for ticket in pending {
        durable(ticket).await.map_err(|e| e.to_string())?;
    }
    match cluster.write(Command::Drained { from, to: cluster.id, generation }).await {
        Ok(CommandResponse::Applied { .. }) => Ok(entries),
        Ok(CommandResponse::Refused { reason }) => {
            // Already committed by an earlier attempt whose answer was lost?
            if cluster.state().held_by.get(&from) == Some(&cluster.id) {
                Ok(entries)
            } else {
                Err(format!("the drain was not committed: {reason}"))
            }
        }
        Err(e) => Err(format!("committing the drain: {e}")),
    }
}

/// Deletes trees of departed nodes that this node neither holds nor is copying.
fn drop_stale_held(
    state: &ClusterState,
    me: NodeId,
    store: &dyn Storage,
    busy: &BTreeSet<NodeId>,
) -> Result<(), String> {
    let mut keep: BTreeSet<NodeId> = state.held_by_member(me).into_iter().collect();
    for (from, drain) in &state.draining {
        if drain.to == me || busy.contains(from) {
            keep.extend(drained_holders(state, *from));
        }
    }
    for holder in store.held_holders().map_err(|e| e.to_string())? {
        if !keep.contains(&holder) {
            info!(holder, "dropping data this node does not hold");
            store.drop_held(holder).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
