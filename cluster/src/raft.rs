//! The Raft type configuration of Tollgate's replicated state.

use crate::state::{Command, CommandResponse, PeerNode};

openraft::declare_raft_types!(
    /// Raft types: commands of the replicated state, `u64` node ids, members with their
    /// addresses.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = PeerNode,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig, crate::raft_store::StateMachine>;
