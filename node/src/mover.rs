//! Taking vnodes over (SPEC §6): when the applied cluster state says a vnode moves to this node,
//! pull its hand-over from the previous owner, merge it into the store (through the vnode's owner
//! actor, which does not own it yet), and commit the end of the move. Until then the vnode
//! belongs to nobody and clients get retryable errors for its series.
//!
//! The import and a marker naming the move are written in one batch, and the marker is removed
//! once the move is committed: a crash or a failed commit in between never imports twice.

use crate::metrics as m;
use crate::owner::OwnerHandle;
use crate::store::{durable, Op, Storage, StoreBatch};
use futures_util::StreamExt;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tollgate_cluster::{Cluster, Command, NodeId, VnodeState};
use tollgate_proto::peer::HandOffRequest;
use tracing::{info, warn};

/// The metadata key marking an imported, not yet committed move of `vnode`.
fn marker_key(vnode: u16) -> String {
    format!("handoff/{vnode}")
}

fn marker_value(from: NodeId, to: NodeId) -> Vec<u8> {
    format!("{from}->{to}").into_bytes()
}

/// Watches the cluster state and takes over the vnodes moving to this node.
pub fn start(cluster: Arc<Cluster>, owners: Arc<Vec<OwnerHandle>>, store: Arc<dyn Storage>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let in_progress: Arc<Mutex<BTreeSet<u16>>> = Arc::default();
        let mut applied = cluster.applied();
        loop {
            let state = Arc::clone(&applied.borrow_and_update());
            for (vnode, vnode_state) in state.state.vnodes.vnodes.iter().enumerate() {
                let vnode = vnode as u16;
                let VnodeState::Moving { from, to, full } = vnode_state else { continue };
                if *to != cluster.id || !in_progress.lock().expect("lock").insert(vnode) {
                    continue;
                }
                let (cluster, owners, store, in_progress) =
                    (Arc::clone(&cluster), Arc::clone(&owners), Arc::clone(&store), Arc::clone(&in_progress));
                let (from, full) = (*from, *full);
                tokio::spawn(async move {
                    take_over(&cluster, &owners[vnode as usize], store.as_ref(), vnode, from, full).await;
                    in_progress.lock().expect("lock").remove(&vnode);
                });
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    })
}

/// True while the applied state still moves `vnode` from `from` to this node.
fn still_moving(cluster: &Cluster, vnode: u16, from: NodeId) -> bool {
    matches!(
        cluster.state().vnodes.vnodes.get(vnode as usize),
        Some(VnodeState::Moving { from: f, to, .. }) if *f == from && *to == cluster.id
    )
}

async fn take_over(cluster: &Cluster, owner: &OwnerHandle, store: &dyn Storage, vnode: u16, from: NodeId, full: bool) {
    let mut attempt: u32 = 0;
    let marker = marker_value(from, cluster.id);
    while still_moving(cluster, vnode, from) {
        attempt += 1;
        match try_take_over(cluster, owner, store, vnode, from, full, &marker).await {
            Ok(()) => {
                metrics::counter!(m::VNODE_MOVES, "direction" => "in", "kind" => if full { "full" } else { "state" })
                    .increment(1);
                info!(vnode, from, full, "took a vnode over");
                return;
            }
            Err(error) => {
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
    full: bool,
    marker: &[u8],
) -> Result<(), String> {
    let already_imported = store.meta(&marker_key(vnode)).map_err(|e| e.to_string())?.is_some_and(|v| v == marker);
    if !already_imported {
        let from_addr = cluster
            .state()
            .nodes
            .get(&from)
            .map(|n| n.cluster_addr.clone())
            .ok_or_else(|| format!("node {from} is not a member any more"))?;
        let mut stream = cluster
            .transport()
            .hand_off(&from_addr, HandOffRequest { vnode: u32::from(vnode), full })
            .await
            .map_err(|e| e.to_string())?;
        let mut entries = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            entries.extend(chunk.keys.into_iter().zip(chunk.values));
        }
        owner.import(entries, full, Some((marker_key(vnode), marker.to_vec()))).await.map_err(|e| e.to_string())?;
    }
    match cluster.write(Command::CompleteMove { vnode }).await {
        Ok(_) => {}
        Err(e) => return Err(format!("committing the end of the move: {e}")),
    }
    clear_marker(store, vnode).await
}

async fn clear_marker(store: &dyn Storage, vnode: u16) -> Result<(), String> {
    if store.meta(&marker_key(vnode)).map_err(|e| e.to_string())?.is_none() {
        return Ok(());
    }
    let mut batch = StoreBatch::default();
    batch.push(Op::DeleteMeta { key: marker_key(vnode) });
    durable(store.commit(batch).await.map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())
}
