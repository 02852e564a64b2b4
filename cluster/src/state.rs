//! The replicated state (SPEC §6): pricing, rules, members and the vnode map, changed only by
//! committed [`Command`]s. Applying a command is a pure function, so every node that applied the
//! same log holds the same state.

use crate::vnodes::{NodeId, VnodeMap, VnodeState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use tollgate_rules::{PricingDocument, RulesConfig};

/// How other nodes reach a member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// Its name (`--node-id`), for people.
    pub name: String,
    /// `HOST:PORT` of its cluster port.
    pub cluster_addr: String,
    /// `HOST:PORT` of its HTTP API.
    pub api_addr: String,
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.cluster_addr)
    }
}

/// A document and the version it was committed as.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// Version: 1 for the first written document (0 is the built-in one).
    pub version: u64,
    /// The document.
    pub document: T,
}

/// A change of the replicated state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// The first command of a new cluster: its vnodes, all owned by its first node.
    Bootstrap {
        /// Number of vnodes, fixed for the cluster's life.
        vnodes: u16,
        /// The first node.
        id: NodeId,
        /// How to reach it.
        node: PeerNode,
    },
    /// Replace the pricing document.
    SetPricing(PricingDocument),
    /// Replace the rules document.
    SetRules(RulesConfig),
    /// A node joins the data plane (it owns nothing until moves give it vnodes).
    AddNode {
        /// Its id.
        id: NodeId,
        /// How to reach it.
        node: PeerNode,
    },
    /// A node asks to leave: its vnodes are handed to others, then it is removed.
    MarkLeaving {
        /// Its id.
        id: NodeId,
    },
    /// Forget a member that owns nothing, without copying its data (`leave --force`: the node
    /// is gone for good, and what it held with it).
    RemoveNode {
        /// Its id.
        id: NodeId,
    },
    /// A leaving node that owns nothing any more: `to` starts copying everything it holds.
    BeginDrain {
        /// The leaving node.
        from: NodeId,
        /// The member that will hold its data.
        to: NodeId,
    },
    /// `to` holds a durable copy of everything `from` held: from now on `to` answers for it and
    /// `from` is no longer a member.
    Drained {
        /// The leaving node.
        from: NodeId,
        /// The member now holding its data.
        to: NodeId,
        /// The drain this completes (a restarted drain has a new one).
        generation: u64,
    },
    /// Start handing a vnode (its normalisation state) from its owner to another member.
    BeginMove {
        /// The vnode.
        vnode: u16,
        /// Its owner.
        from: NodeId,
        /// The new owner.
        to: NodeId,
    },
    /// The new owner has the state: it owns the vnode from now on.
    CompleteMove {
        /// The vnode.
        vnode: u16,
    },
    /// Give up a move; the old owner keeps the vnode.
    AbortMove {
        /// The vnode.
        vnode: u16,
    },
    /// Reassign a vnode at once, without hand-over (its owner is unreachable: failover).
    Reassign {
        /// The vnode.
        vnode: u16,
        /// The new owner.
        to: NodeId,
    },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Bootstrap { vnodes, id, node } => write!(f, "bootstrap({vnodes} vnodes, {id} {node})"),
            Command::SetPricing(_) => f.write_str("set-pricing"),
            Command::SetRules(_) => f.write_str("set-rules"),
            Command::AddNode { id, node } => write!(f, "add-node({id} {node})"),
            Command::MarkLeaving { id } => write!(f, "mark-leaving({id})"),
            Command::RemoveNode { id } => write!(f, "remove-node({id})"),
            Command::BeginMove { vnode, from, to } => write!(f, "begin-move({vnode}: {from} -> {to})"),
            Command::BeginDrain { from, to } => write!(f, "begin-drain({from} -> {to})"),
            Command::Drained { from, to, generation } => write!(f, "drained({from} -> {to}, #{generation})"),
            Command::CompleteMove { vnode } => write!(f, "complete-move({vnode})"),
            Command::AbortMove { vnode } => write!(f, "abort-move({vnode})"),
            Command::Reassign { vnode, to } => write!(f, "reassign({vnode} -> {to})"),
        }
    }
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Applied; the version of the document written, or the vnode map epoch.
    Applied {
        /// Document version or map epoch after the change.
        version: u64,
    },
    /// Not applied: the state did not allow it (stale or conflicting command).
    Refused {
        /// Why.
        reason: String,
    },
}

/// Everything replicated. Fields added later must be `#[serde(default)]`: older snapshots and
/// applied states are read back as JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Pricing, if ever written (otherwise the built-in one).
    pub pricing: Option<Versioned<PricingDocument>>,
    /// Rules, if ever written (otherwise the built-in ones).
    pub rules: Option<Versioned<RulesConfig>>,
    /// Data-plane members.
    pub nodes: BTreeMap<NodeId, PeerNode>,
    /// Ownership of the vnodes (empty before bootstrap).
    pub vnodes: VnodeMap,
    /// Members on their way out.
    #[serde(default)]
    pub leaving: BTreeSet<NodeId>,
    /// Leaving nodes whose data is being copied, and where to.
    #[serde(default)]
    pub draining: BTreeMap<NodeId, Drain>,
    /// Departed nodes whose data a member holds and answers queries for: holder → member.
    #[serde(default)]
    pub held_by: BTreeMap<NodeId, NodeId>,
    /// Drains started so far (the next drain's generation).
    #[serde(default)]
    pub drains: u64,
    /// Nodes that left (drained or removed): they leave the Raft membership and may not rejoin.
    #[serde(default)]
    pub departed: BTreeSet<NodeId>,
    /// Which cluster this is: the id of the node that bootstrapped it (node ids are random), so
    /// that a node holding another cluster's state is told apart. `None` before the bootstrap,
    /// and in clusters bootstrapped before it was recorded.
    #[serde(default)]
    pub cluster_id: Option<NodeId>,
}

/// A drain in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// The member copying the leaving node's data.
    pub to: NodeId,
    /// Which attempt this is.
    pub generation: u64,
}

fn refused(reason: impl Into<String>) -> CommandResponse {
    CommandResponse::Refused { reason: reason.into() }
}

impl ClusterState {
    /// True once the cluster was bootstrapped.
    pub fn is_bootstrapped(&self) -> bool {
        !self.vnodes.is_empty()
    }

    /// True when `id` is a member of this bootstrapped cluster: a node that serves traffic.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.is_bootstrapped() && self.nodes.contains_key(&id)
    }

    /// The members' names, sorted and comma-separated: whom to ask instead of a node that left.
    pub fn member_names(&self) -> String {
        let mut names: Vec<&str> = self.nodes.values().map(|node| node.name.as_str()).collect();
        names.sort_unstable();
        names.join(", ")
    }

    /// True when `id` owns a vnode or takes part in a move.
    pub fn owns_or_moves(&self, id: NodeId) -> bool {
        self.vnodes.vnodes.iter().any(|s| match s {
            VnodeState::Active { owner } => *owner == id,
            VnodeState::Moving { from, to } => *from == id || *to == id,
        })
    }

    /// Holders whose data `member` answers for (besides its own).
    pub fn held_by_member(&self, member: NodeId) -> Vec<NodeId> {
        self.held_by.iter().filter(|(_, m)| **m == member).map(|(holder, _)| *holder).collect()
    }

    /// Applies one committed command. Never panics: a command the state does not allow is
    /// refused and changes nothing.
    ///
    /// What it refuses must be the same on every version that may share a log: a node replaying
    /// an entry (after a restart, or while an upgrade rolls) must decide as the nodes that
    /// applied it did, or their versions of the configuration part. So the documents' `validate`
    /// may be loosened but never tightened; a new limit on a document belongs where writes enter
    /// (the API and the configuration file), not here.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        match command {
            Command::Bootstrap { vnodes, id, node } => {
                if self.is_bootstrapped() {
                    return refused("the cluster is already bootstrapped");
                }
                if *vnodes == 0 {
                    return refused("a cluster needs at least one vnode");
                }
                self.nodes.insert(*id, node.clone());
                self.vnodes = VnodeMap::single(*vnodes, *id);
                self.cluster_id = Some(*id);
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
            Command::SetPricing(document) => {
                if let Err(e) = document.validate() {
                    return refused(e.to_string());
                }
                let version = self.pricing.as_ref().map_or(0, |v| v.version) + 1;
                self.pricing = Some(Versioned { version, document: document.clone() });
                CommandResponse::Applied { version }
            }
            Command::SetRules(document) => {
                if let Err(e) = document.validate() {
                    return refused(e.to_string());
                }
                let version = self.rules.as_ref().map_or(0, |v| v.version) + 1;
                self.rules = Some(Versioned { version, document: document.clone() });
                CommandResponse::Applied { version }
            }
            Command::AddNode { id, node } => {
                if self.departed.contains(id) {
                    return refused(format!(
                        "node {id} ({}) left this cluster; to join again, start it with an empty data directory",
                        node.name
                    ));
                }
                self.nodes.insert(*id, node.clone());
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
            Command::MarkLeaving { id } => {
                if !self.nodes.contains_key(id) {
                    return refused(format!("node {id} is not a member"));
                }
                if self.nodes.keys().all(|member| member == id || self.leaving.contains(member)) {
                    return refused(format!("node {id} is the last member: a cluster cannot be empty"));
                }
                self.leaving.insert(*id);
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
            Command::RemoveNode { id } => {
                if self.owns_or_moves(*id) {
                    return refused(format!("node {id} still owns or moves vnodes"));
                }
                if self.draining.values().any(|d| d.to == *id) {
                    return refused(format!("node {id} is receiving a drain"));
                }
                if self.nodes.remove(id).is_none() {
                    return refused(format!("node {id} is not a member"));
                }
                self.leaving.remove(id);
                self.draining.remove(id);
                self.departed.insert(*id);
                // What it held is gone with it.
                self.held_by.retain(|_, member| member != id);
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
            Command::BeginDrain { from, to } => {
                if !self.leaving.contains(from) {
                    return refused(format!("node {from} is not leaving"));
                }
                if self.owns_or_moves(*from) {
                    return refused(format!("node {from} still owns or moves vnodes"));
                }
                if self.draining.values().any(|d| d.to == *from) {
                    return refused(format!("node {from} is receiving a drain"));
                }
                if from == to || !self.nodes.contains_key(to) || self.leaving.contains(to) {
                    return refused(format!("node {to} cannot take node {from}'s data"));
                }
                self.drains += 1;
                self.draining.insert(*from, Drain { to: *to, generation: self.drains });
                CommandResponse::Applied { version: self.drains }
            }
            Command::Drained { from, to, generation } => {
                if self.draining.get(from) != Some(&Drain { to: *to, generation: *generation }) {
                    return refused(format!("no drain #{generation} of node {from} to node {to} is under way"));
                }
                self.draining.remove(from);
                for member in self.held_by.values_mut() {
                    if member == from {
                        *member = *to;
                    }
                }
                self.held_by.insert(*from, *to);
                self.nodes.remove(from);
                self.leaving.remove(from);
                self.departed.insert(*from);
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
            Command::BeginMove { vnode, from, to } => {
                if !self.nodes.contains_key(to) {
                    return refused(format!("node {to} is not a member"));
                }
                match self.vnodes.vnodes.get(*vnode as usize) {
                    Some(VnodeState::Active { owner }) if owner == from && from != to => {}
                    other => return refused(format!("vnode {vnode} is {other:?}, not owned by {from}")),
                }
                self.vnodes.vnodes[*vnode as usize] = VnodeState::Moving { from: *from, to: *to };
                self.vnodes.epoch += 1;
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
            Command::CompleteMove { vnode } => match self.vnodes.vnodes.get(*vnode as usize) {
                Some(VnodeState::Moving { to, .. }) => {
                    let to = *to;
                    self.vnodes.vnodes[*vnode as usize] = VnodeState::Active { owner: to };
                    self.vnodes.epoch += 1;
                    CommandResponse::Applied { version: self.vnodes.epoch }
                }
                other => refused(format!("vnode {vnode} is {other:?}, not moving")),
            },
            Command::AbortMove { vnode } => match self.vnodes.vnodes.get(*vnode as usize) {
                Some(VnodeState::Moving { from, .. }) => {
                    let from = *from;
                    self.vnodes.vnodes[*vnode as usize] = VnodeState::Active { owner: from };
                    self.vnodes.epoch += 1;
                    CommandResponse::Applied { version: self.vnodes.epoch }
                }
                other => refused(format!("vnode {vnode} is {other:?}, not moving")),
            },
            Command::Reassign { vnode, to } => {
                if !self.nodes.contains_key(to) {
                    return refused(format!("node {to} is not a member"));
                }
                if (*vnode as usize) >= self.vnodes.vnodes.len() {
                    return refused(format!("no vnode {vnode}"));
                }
                self.vnodes.vnodes[*vnode as usize] = VnodeState::Active { owner: *to };
                self.vnodes.epoch += 1;
                CommandResponse::Applied { version: self.vnodes.epoch }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> PeerNode {
        PeerNode { name: name.into(), cluster_addr: format!("{name}:11900"), api_addr: format!("{name}:12800") }
    }

    fn applied(response: CommandResponse) -> u64 {
        match response {
            CommandResponse::Applied { version } => version,
            CommandResponse::Refused { reason } => panic!("refused: {reason}"),
        }
    }

    #[test]
    fn test_state_bootstrap_then_documents_are_versioned() {
        let mut state = ClusterState::default();
        assert!(!state.is_bootstrapped());
        assert_eq!(state.cluster_id, None);
        applied(state.apply(&Command::Bootstrap { vnodes: 4, id: 1, node: node("a") }));
        assert!(matches!(
            state.apply(&Command::Bootstrap { vnodes: 4, id: 2, node: node("b") }),
            CommandResponse::Refused { .. }
        ));
        assert_eq!(state.cluster_id, Some(1), "the bootstrapping node names the cluster, once");
        // A state written before the identity was recorded reads back without one.
        let mut old = serde_json::to_value(&state).unwrap();
        old.as_object_mut().unwrap().remove("cluster_id");
        assert_eq!(serde_json::from_value::<ClusterState>(old).unwrap().cluster_id, None);
        assert_eq!(applied(state.apply(&Command::SetPricing(PricingDocument::default()))), 1);
        assert_eq!(applied(state.apply(&Command::SetPricing(PricingDocument::default()))), 2);
        assert_eq!(applied(state.apply(&Command::SetRules(RulesConfig::default()))), 1);
        let mut bad = RulesConfig::default();
        bad.normalize.max_series_per_service = 0;
        assert!(matches!(state.apply(&Command::SetRules(bad)), CommandResponse::Refused { .. }));
        assert_eq!(state.rules.as_ref().unwrap().version, 1);
    }

    #[test]
    fn test_state_moves_follow_their_protocol() {
        let mut state = ClusterState::default();
        applied(state.apply(&Command::Bootstrap { vnodes: 4, id: 1, node: node("a") }));
        assert!(matches!(
            state.apply(&Command::BeginMove { vnode: 0, from: 1, to: 2 }),
            CommandResponse::Refused { .. }
        ));
        applied(state.apply(&Command::AddNode { id: 2, node: node("b") }));
        let epoch = applied(state.apply(&Command::BeginMove { vnode: 0, from: 1, to: 2 }));
        assert_eq!(state.vnodes.owner(0), None);
        assert!(matches!(
            state.apply(&Command::BeginMove { vnode: 0, from: 1, to: 2 }),
            CommandResponse::Refused { .. }
        ));
        assert!(matches!(state.apply(&Command::RemoveNode { id: 2 }), CommandResponse::Refused { .. }));
        assert_eq!(applied(state.apply(&Command::CompleteMove { vnode: 0 })), epoch + 1);
        assert_eq!(state.vnodes.owner(0), Some(2));
        applied(state.apply(&Command::BeginMove { vnode: 1, from: 1, to: 2 }));
        applied(state.apply(&Command::AbortMove { vnode: 1 }));
        assert_eq!(state.vnodes.owner(1), Some(1));
        applied(state.apply(&Command::Reassign { vnode: 0, to: 1 }));
        applied(state.apply(&Command::MarkLeaving { id: 2 }));
        assert!(
            matches!(state.apply(&Command::MarkLeaving { id: 1 }), CommandResponse::Refused { .. }),
            "the last member stays"
        );
        applied(state.apply(&Command::RemoveNode { id: 2 }));
        assert!(!state.nodes.contains_key(&2) && state.leaving.is_empty());
    }

    #[test]
    fn test_state_drains_pass_held_data_on_atomically() {
        let mut state = ClusterState::default();
        applied(state.apply(&Command::Bootstrap { vnodes: 2, id: 1, node: node("a") }));
        for (id, name) in [(2, "b"), (3, "c")] {
            applied(state.apply(&Command::AddNode { id, node: node(name) }));
        }
        applied(state.apply(&Command::BeginMove { vnode: 1, from: 1, to: 2 }));
        applied(state.apply(&Command::CompleteMove { vnode: 1 }));
        applied(state.apply(&Command::MarkLeaving { id: 2 }));
        let refuse = |state: &mut ClusterState, command: Command| {
            assert!(matches!(state.apply(&command), CommandResponse::Refused { .. }), "{command} was applied");
        };
        refuse(&mut state, Command::BeginDrain { from: 2, to: 1 });
        applied(state.apply(&Command::BeginMove { vnode: 1, from: 2, to: 3 }));
        applied(state.apply(&Command::CompleteMove { vnode: 1 }));
        refuse(&mut state, Command::BeginDrain { from: 1, to: 3 });
        refuse(&mut state, Command::BeginDrain { from: 2, to: 2 });
        let first = applied(state.apply(&Command::BeginDrain { from: 2, to: 1 }));
        // The target became unreachable: the leader restarts the drain elsewhere.
        let second = applied(state.apply(&Command::BeginDrain { from: 2, to: 3 }));
        assert_ne!(first, second);
        refuse(&mut state, Command::Drained { from: 2, to: 1, generation: first });
        refuse(&mut state, Command::RemoveNode { id: 3 });
        applied(state.apply(&Command::Drained { from: 2, to: 3, generation: second }));
        assert!(!state.nodes.contains_key(&2) && state.leaving.is_empty() && state.draining.is_empty());
        assert_eq!(state.held_by_member(3), vec![2]);

        // When the holder leaves in turn, what it held moves on with its own data.
        applied(state.apply(&Command::MarkLeaving { id: 3 }));
        applied(state.apply(&Command::BeginMove { vnode: 1, from: 3, to: 1 }));
        applied(state.apply(&Command::CompleteMove { vnode: 1 }));
        let third = applied(state.apply(&Command::BeginDrain { from: 3, to: 1 }));
        applied(state.apply(&Command::Drained { from: 3, to: 1, generation: third }));
        assert_eq!(state.held_by_member(1), vec![2, 3]);
        assert_eq!(state.nodes.keys().copied().collect::<Vec<_>>(), vec![1]);
    }
}
