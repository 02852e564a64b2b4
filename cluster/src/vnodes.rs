//! The vnode map (SPEC §6): a fixed number of virtual partitions, each owned by one node, and
//! how it changes when members come and go — with as little movement as possible.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A node's id in the cluster (also its Raft id).
pub type NodeId = u64;

/// Where one vnode stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VnodeState {
    /// Owned and serving.
    Active {
        /// The owner.
        owner: NodeId,
    },
    /// Being handed from one node to another: neither merges it until the move completes. Only
    /// the normalisation state moves; the old owner keeps the minutes it merged.
    Moving {
        /// The owner before the move (it exports the vnode's state).
        from: NodeId,
        /// The owner after the move (it imports the state).
        to: NodeId,
    },
}

impl VnodeState {
    /// The node that merges the vnode now, if any.
    pub fn owner(&self) -> Option<NodeId> {
        match self {
            VnodeState::Active { owner } => Some(*owner),
            VnodeState::Moving { .. } => None,
        }
    }

    /// The node that will own the vnode once any move completes.
    pub fn target(&self) -> NodeId {
        match self {
            VnodeState::Active { owner } => *owner,
            VnodeState::Moving { to, .. } => *to,
        }
    }
}

/// Ownership of every vnode, with an epoch that grows on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeMap {
    /// Incremented by every change.
    pub epoch: u64,
    /// One entry per vnode, in vnode order.
    pub vnodes: Vec<VnodeState>,
}

/// One planned change of owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Move {
    /// The vnode.
    pub vnode: u16,
    /// Current owner.
    pub from: NodeId,
    /// New owner.
    pub to: NodeId,
}

impl VnodeMap {
    /// Every vnode owned by `owner`.
    pub fn single(vnodes: u16, owner: NodeId) -> VnodeMap {
        VnodeMap { epoch: 1, vnodes: vec![VnodeState::Active { owner }; vnodes as usize] }
    }

    /// Number of vnodes.
    pub fn len(&self) -> u16 {
        self.vnodes.len() as u16
    }

    /// True without vnodes.
    pub fn is_empty(&self) -> bool {
        self.vnodes.is_empty()
    }

    /// The current owner of a vnode (`None` while it moves).
    pub fn owner(&self, vnode: u16) -> Option<NodeId> {
        self.vnodes.get(vnode as usize).and_then(VnodeState::owner)
    }

    /// The vnodes each node owns or will own, including nodes with none.
    pub fn counts(&self, members: &BTreeSet<NodeId>) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = members.iter().map(|m| (*m, 0)).collect();
        for state in &self.vnodes {
            *counts.entry(state.target()).or_default() += 1;
        }
        counts
    }

    /// The moves that balance the map over `members` while moving as few vnodes as possible:
    /// vnodes of non-members go to the least loaded members; then the most loaded members give
    /// vnodes to the least loaded until every member has `len / n` or `len / n + 1`. Vnodes
    /// that are moving already are left alone. Deterministic: the same map and members always
    /// give the same moves.
    pub fn rebalance(&self, members: &BTreeSet<NodeId>) -> Vec<Move> {
        if members.is_empty() {
            return Vec::new();
        }
        let total = self.vnodes.len();
        let n = members.len();
        let base = total / n;
        let extra = total % n;
        // Current load of members (targets of moves count for their target).
        let mut load: BTreeMap<NodeId, Vec<u16>> = members.iter().map(|m| (*m, Vec::new())).collect();
        let mut orphans: Vec<(u16, NodeId)> = Vec::new();
        for (vnode, state) in self.vnodes.iter().enumerate() {
            let vnode = vnode as u16;
            match state {
                VnodeState::Moving { to, .. } if members.contains(to) => load.get_mut(to).expect("member").push(vnode),
                VnodeState::Active { owner } if members.contains(owner) => {
                    load.get_mut(owner).expect("member").push(vnode)
                }
                VnodeState::Active { owner } => orphans.push((vnode, *owner)),
                VnodeState::Moving { .. } => {}
            }
        }
        // Capacity: the `extra` members that already hold the most keep one more.
        let mut by_load: Vec<(usize, NodeId)> = load.iter().map(|(m, v)| (v.len(), *m)).collect();
        by_load.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let capacity: BTreeMap<NodeId, usize> =
            by_load.iter().enumerate().map(|(rank, (_, m))| (*m, base + usize::from(rank < extra))).collect();
        let mut moves = Vec::new();
        // Surplus vnodes of over-full members (their highest vnodes, for determinism).
        let mut surplus: Vec<(u16, NodeId)> = orphans;
        for (member, vnodes) in &mut load {
            let keep = capacity[member];
            vnodes.sort_unstable();
            while vnodes.len() > keep {
                let vnode = vnodes.pop().expect("non-empty");
                surplus.push((vnode, *member));
            }
        }
        surplus.sort_unstable();
        for (vnode, from) in surplus {
            let (to, _) = load
                .iter()
                .filter(|(m, v)| v.len() < capacity[*m])
                .min_by_key(|(m, v)| (v.len(), **m))
                .expect("total capacity equals the number of vnodes");
            let to = *to;
            load.get_mut(&to).expect("member").push(vnode);
            moves.push(Move { vnode, from, to });
        }
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn apply(map: &mut VnodeMap, moves: &[Move]) {
        for m in moves {
            map.vnodes[m.vnode as usize] = VnodeState::Active { owner: m.to };
        }
        map.epoch += 1;
    }

    #[test]
    fn test_rebalance_single_node_to_three_moves_only_what_it_must() {
        let mut map = VnodeMap::single(256, 1);
        let moves = map.rebalance(&members(&[1, 2, 3]));
        assert_eq!(moves.len(), 256 - 86, "node 1 keeps its share");
        apply(&mut map, &moves);
        let counts = map.counts(&members(&[1, 2, 3]));
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![86, 85, 85]);
        assert!(map.rebalance(&members(&[1, 2, 3])).is_empty(), "balanced maps stay put");
    }

    #[test]
    fn test_rebalance_after_leave_moves_only_the_leavers_vnodes() {
        let mut map = VnodeMap::single(256, 1);
        let moves = map.rebalance(&members(&[1, 2, 3]));
        apply(&mut map, &moves);
        let moves = map.rebalance(&members(&[1, 3]));
        assert_eq!(moves.len(), 85);
        assert!(moves.iter().all(|m| m.from == 2 && m.to != 2));
        apply(&mut map, &moves);
        assert_eq!(map.counts(&members(&[1, 3])).values().copied().collect::<Vec<_>>(), vec![128, 128]);
    }

    #[test]
    fn test_rebalance_leaves_moving_vnodes_alone() {
        let mut map = VnodeMap::single(8, 1);
        map.vnodes[0] = VnodeState::Moving { from: 1, to: 2 };
        let moves = map.rebalance(&members(&[1, 2]));
        assert!(moves.iter().all(|m| m.vnode != 0));
        assert_eq!(moves.len(), 3, "vnode 0 already counts for node 2");
    }

    proptest! {
        #[test]
        fn prop_rebalance_balances_and_moves_at_most_the_excess(
            owners in prop::collection::vec(1u64..6, 1..300),
            members_list in prop::collection::btree_set(1u64..8, 1..6),
        ) {
            let map = VnodeMap { epoch: 1, vnodes: owners.iter().map(|o| VnodeState::Active { owner: *o }).collect() };
            let moves = map.rebalance(&members_list);
            let mut after = map.clone();
            apply(&mut after, &moves);
            let counts = after.counts(&members_list);
            let max = counts.values().max().unwrap();
            let min = counts.values().min().unwrap();
            prop_assert!(max - min <= 1, "balanced: {counts:?}");
            prop_assert!(after.vnodes.iter().all(|s| members_list.contains(&s.target())));
            // Minimal: a member only loses vnodes it holds beyond its share, and only
            // non-members and over-full members give.
            let before = map.counts(&members_list);
            let share = map.vnodes.len().div_ceil(members_list.len());
            for m in &moves {
                prop_assert!(!members_list.contains(&m.from) || before[&m.from] > share - 1);
                prop_assert!(members_list.contains(&m.to));
            }
            let mut seen = BTreeSet::new();
            prop_assert!(moves.iter().all(|m| seen.insert(m.vnode)), "each vnode moves at most once");
        }
    }
}
