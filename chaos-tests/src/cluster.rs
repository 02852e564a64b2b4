//! The cluster under test: its node processes, the list of nodes clients may send to, and the
//! cluster API (`GET /api/v1/cluster`) views used to tell when it is healthy or settled.

use crate::node::{NodeProcess, NodeSpec, NodeState};
use anyhow::Context;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::info;

/// A node as clients see it: a name and where to send.
#[derive(Clone, Debug)]
pub struct Target {
    /// Node name.
    pub name: String,
    /// OTLP/gRPC URL.
    pub grpc: String,
    /// API URL.
    pub api: String,
}

/// The node processes of a run.
#[derive(Debug)]
pub struct Cluster {
    /// Every node ever started, in start order (removed ones stay, marked [`NodeState::Removed`]).
    pub nodes: Vec<NodeProcess>,
    spec: NodeSpec,
    targets: watch::Sender<Vec<Target>>,
    /// Short-timeout client for cluster views.
    pub http: reqwest::Client,
}

impl Cluster {
    /// Starts `count` nodes `n1..`: the first bootstraps, the others join it.
    pub async fn start(spec: NodeSpec, count: usize) -> anyhow::Result<Cluster> {
        let (targets, _) = watch::channel(Vec::new());
        let mut cluster = Cluster {
            nodes: Vec::new(),
            spec,
            targets,
            http: reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?,
        };
        // The first members run the previous version when there is one (a rolling upgrade).
        let first = cluster.spec.previous.clone().unwrap_or_else(|| cluster.spec.binary.clone());
        for _ in 0..count {
            cluster.add_node_running(&first).await?;
        }
        Ok(cluster)
    }

    /// Starts a new node `n<k>` (the new version) joining the cluster through a running member
    /// (or bootstrapping, for the first), and publishes it to the clients.
    pub async fn add_node(&mut self) -> anyhow::Result<usize> {
        let binary = self.spec.binary.clone();
        self.add_node_running(&binary).await
    }

    async fn add_node_running(&mut self, binary: &std::path::Path) -> anyhow::Result<usize> {
        let name = format!("n{}", self.nodes.len() + 1);
        let join = self.nodes.iter().filter(|n| n.state == NodeState::Up).map(|n| n.cluster_addr()).next();
        info!(node = %name, join = ?join, binary = %binary.display(), "starting a node");
        let node =
            NodeProcess::start(&self.spec, binary, &name, join).await.with_context(|| format!("starting {name}"))?;
        self.nodes.push(node);
        self.publish();
        Ok(self.nodes.len() - 1)
    }

    /// The clients' view of the nodes.
    pub fn targets(&self) -> watch::Receiver<Vec<Target>> {
        self.targets.subscribe()
    }

    /// Tells the clients the current members and their addresses (down or paused ones included:
    /// clients do not know, they find out by failing).
    pub fn publish(&self) {
        let targets = self
            .nodes
            .iter()
            .filter(|n| n.is_member())
            .map(|n| Target { name: n.name.clone(), grpc: n.grpc(), api: n.api() })
            .collect();
        self.targets.send_replace(targets);
    }

    /// Indexes of members (not removed).
    pub fn members(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_member()).collect()
    }

    /// Indexes of running members.
    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].state == NodeState::Up).collect()
    }

    /// `GET /api/v1/cluster` of one node.
    pub async fn view(&self, index: usize) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/cluster", self.nodes[index].api());
        let response = self.http.get(&url).send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "{url}: {status} {body}");
        Ok(body)
    }

    /// Views of every running member (errors as text).
    pub async fn views(&self) -> Vec<(String, Result<Value, String>)> {
        let mut out = Vec::new();
        for index in self.up() {
            out.push((self.nodes[index].name.clone(), self.view(index).await.map_err(|e| e.to_string())));
        }
        out
    }

    /// Waits (at most `limit`) until every running member answers and all follow the same
    /// leader, whose view lists every member; returns whether that happened.
    pub async fn wait_healthy(&self, limit: Duration) -> bool {
        let started = Instant::now();
        let members: BTreeSet<String> = self.members().iter().map(|i| self.nodes[*i].name.clone()).collect();
        loop {
            let views = self.views().await;
            let leaders: BTreeSet<Option<u64>> =
                views.iter().map(|(_, v)| v.as_ref().ok().and_then(|v| v["leader"].as_u64())).collect();
            let listed = views.iter().all(|(_, v)| v.as_ref().is_ok_and(|v| names(v) == members));
            if listed && leaders.len() == 1 && !leaders.contains(&None) {
                return true;
            }
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (at most `limit`) until the cluster settled: every running member answers, all
    /// follow one leader and have the same vnode map epoch, nothing moves, drains or leaves,
    /// every member is listed and owns its fair share of vnodes; twice in a row, a second
    /// apart. Returns the last views, or what was still wrong.
    pub async fn wait_settled(&self, limit: Duration) -> Result<Vec<(String, Value)>, String> {
        let started = Instant::now();
        let members: BTreeSet<String> = self.members().iter().map(|i| self.nodes[*i].name.clone()).collect();
        let mut previous: Option<u64> = None;
        loop {
            let views = self.views().await;
            match settled(&views, &members) {
                Ok(epoch) if previous == Some(epoch) => {
                    return Ok(views.into_iter().map(|(n, v)| (n, v.unwrap_or_default())).collect());
                }
                Ok(epoch) => previous = Some(epoch),
                Err(problem) => {
                    previous = None;
                    if started.elapsed() > limit {
                        return Err(problem);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn names(view: &Value) -> BTreeSet<String> {
    view["nodes"].as_array().into_iter().flatten().filter_map(|n| n["name"].as_str().map(String::from)).collect()
}

/// The epoch all views agree on when the cluster is settled, else what is not.
fn settled(views: &[(String, Result<Value, String>)], members: &BTreeSet<String>) -> Result<u64, String> {
    let mut epochs = BTreeSet::new();
    let mut leaders = BTreeSet::new();
    for (name, view) in views {
        let view = view.as_ref().map_err(|e| format!("{name}: {e}"))?;
        let listed = names(view);
        if &listed != members {
            return Err(format!("{name} lists {listed:?}, the members are {members:?}"));
        }
        let vnodes = &view["vnodes"];
        if vnodes["moving"].as_u64() != Some(0) {
            return Err(format!("{name}: {} vnodes moving", vnodes["moving"]));
        }
        if view["draining"].as_object().is_some_and(|d| !d.is_empty()) {
            return Err(format!("{name}: draining {}", view["draining"]));
        }
        let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
        if let Some(leaving) = nodes.iter().find(|n| n["leaving"] == true) {
            return Err(format!("{name}: {} is leaving", leaving["name"]));
        }
        let total = vnodes["total"].as_u64().unwrap_or(0);
        let fair = total / members.len().max(1) as u64;
        let owned: Vec<u64> = nodes.iter().map(|n| n["vnodes"].as_u64().unwrap_or(0)).collect();
        if total == 0 || owned.iter().sum::<u64>() != total || owned.iter().any(|o| *o != fair && *o != fair + 1) {
            return Err(format!("{name}: vnodes not balanced: {owned:?} of {total}"));
        }
        epochs.insert(vnodes["epoch"].as_u64().unwrap_or(0));
        leaders.insert(view["leader"].as_u64());
    }
    if epochs.len() != 1 {
        return Err(format!("vnode map epochs differ: {epochs:?}"));
    }
    if leaders.len() != 1 || leaders.contains(&None) {
        return Err(format!("leaders differ: {leaders:?}"));
    }
    Ok(*epochs.first().expect("one epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(epoch: u64, owned: &[(&str, u64)], moving: u64) -> Result<Value, String> {
        Ok(json!({
            "leader": 1,
            "nodes": owned.iter().map(|(n, v)| json!({"name": n, "vnodes": v, "leaving": false})).collect::<Vec<_>>(),
            "vnodes": {"total": 32, "epoch": epoch, "moving": moving},
            "draining": {},
        }))
    }

    #[test]
    fn test_settled_needs_same_epoch_no_moves_every_member_and_balance() {
        let members: BTreeSet<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        let good = [("n1", 11), ("n2", 11), ("n3", 10)];
        let views = vec![("n1".to_string(), view(5, &good, 0)), ("n2".to_string(), view(5, &good, 0))];
        assert_eq!(settled(&views, &members), Ok(5));
        let views = vec![("n1".to_string(), view(5, &good, 0)), ("n2".to_string(), view(6, &good, 0))];
        assert!(settled(&views, &members).unwrap_err().contains("epochs"));
        let views = vec![("n1".to_string(), view(5, &good, 1))];
        assert!(settled(&views, &members).unwrap_err().contains("moving"));
        let views = vec![("n1".to_string(), view(5, &[("n1", 16), ("n2", 16)], 0))];
        assert!(settled(&views, &members).unwrap_err().contains("lists"));
        let views = vec![("n1".to_string(), view(5, &[("n1", 20), ("n2", 6), ("n3", 6)], 0))];
        assert!(settled(&views, &members).unwrap_err().contains("balanced"));
    }
}
