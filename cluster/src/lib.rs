//! Tollgate's cluster: Raft-replicated configuration and membership, the vnode map, and the
//! clients nodes use to talk to each other.
//!
//! Parts:
//! - [`vnodes`]: the vnode map and its minimal-movement rebalancing.
//! - [`state`]: the replicated state and the commands that change it.
//! - [`raft`], [`raft_store`]: the Raft types, and the log and state machine on sled.
//! - [`transport`], [`network`]: calls between nodes (tonic, or with injected faults), and
//!   openraft's network on top.
//! - [`lease`]: whether a member may merge data for the vnodes it owns (it was in touch with a
//!   leader recently enough that they cannot have been given to another member).
//! - [`runtime`]: a node's handle on the cluster: bootstrap, join, writes through the leader,
//!   status, and the leader's controller (failover, leaving, rebalancing).

pub mod lease;
pub mod network;
pub mod raft;
pub mod raft_store;
pub mod runtime;
pub mod state;
pub mod transport;
pub mod vnodes;

pub use runtime::{Cluster, ClusterError, ClusterSettings, ClusterStatus, RaftFigures};
pub use state::{ClusterState, Command, CommandResponse, PeerNode, Versioned};
pub use vnodes::{Move, NodeId, VnodeMap, VnodeState};
