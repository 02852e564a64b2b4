//! Tollgate's cluster: Raft-replicated configuration and membership, the vnode map, and the
//! clients nodes use to talk to each other.
//!
//! Parts:
//! - [`vnodes`]: the vnode map and its minimal-movement rebalancing.
//! - [`state`]: the replicated state and the commands that change it.

pub mod state;
pub mod vnodes;

pub use state::{ClusterState, Command, CommandResponse, PeerNode, Versioned};
pub use vnodes::{Move, NodeId, VnodeMap, VnodeState};
