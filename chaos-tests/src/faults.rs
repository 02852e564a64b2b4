//! The fault schedule: one fault at a time, at random times from the seed, so that never more
//! than one member is down or paused (a 3-member Raft cluster survives one failure):
//! - `kill`: `kill -9` a random member, start it again after 1-8 s (same data, same cluster port);
//! - `pause`: `SIGSTOP` a random member for 1-5 s, then `SIGCONT` (a hung or cut-off node);
//! - `restart`: `SIGTERM` a random member, wait for its clean exit, start it again;
//! - `scale`: start a new member (scale out), or remove one through another member's
//!   `DELETE /api/v1/cluster/nodes/{name}` and stop it once removed (scale in), keeping at
//!   least 3 members;
//! - `upgrade`: `SIGTERM` a member still running the previous version (`--upgrade-from`), wait
//!   for its clean exit, start the new version on its data (a rolling upgrade, one at a time).

use crate::cluster::Cluster;
use crate::node::NodeState;
use clap::ValueEnum;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tollgate_rules::fleet::Xorshift;
use tracing::{error, info, warn};

/// A kind of fault (`--faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum FaultKind {
    /// `kill -9` a member and restart it after 1-8 s.
    Kill,
    /// `SIGSTOP` a member for 1-5 s, then `SIGCONT`.
    Pause,
    /// `SIGTERM` a member and restart it at once.
    Restart,
    /// Add a member, or remove one (at least 3 stay).
    Scale,
    /// `SIGTERM` a member running the previous version (`--upgrade-from`) and start the new one
    /// on its data.
    Upgrade,
    /// No faults (a baseline run).
    None,
}

/// The most members scale-outs may reach above the initial count.
const MAX_EXTRA_MEMBERS: usize = 2;

/// The fewest members scale-ins leave.
const MIN_MEMBERS: usize = 3;

/// How long a scale-in may take (the node's vnodes and data move away first).
const LEAVE_DEADLINE: Duration = Duration::from_secs(330);

/// What the schedule did.
#[derive(Debug, Default)]
pub struct FaultLog {
    /// Faults injected per kind.
    pub injected: BTreeMap<&'static str, u64>,
    /// Problems that are Tollgate's (a node that crashed, refused to restart, did not stop
    /// cleanly, an unexpected answer to a membership change).
    pub violations: Vec<String>,
}

/// Injects faults until `deadline`, then leaves every member running.
pub async fn run(
    cluster: &mut Cluster,
    kinds: &[FaultKind],
    deadline: Instant,
    rng: &mut Xorshift,
    initial: usize,
    log: &mut FaultLog,
) -> anyhow::Result<()> {
    let kinds: Vec<FaultKind> = kinds.iter().copied().filter(|k| *k != FaultKind::None).collect();
    loop {
        let gap = Duration::from_millis(2000 + rng.below(5000));
        if Instant::now() + gap >= deadline {
            break;
        }
        sleep_watching(cluster, gap, log).await?;
        if kinds.is_empty() {
            continue;
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        match kind {
            FaultKind::Kill => kill(cluster, rng, log).await?,
            FaultKind::Pause => pause(cluster, rng, log).await?,
            FaultKind::Restart => restart(cluster, rng, log).await?,
            FaultKind::Upgrade => {
                let previous: Vec<usize> =
                    cluster.up().into_iter().filter(|i| cluster.nodes[*i].runs_previous()).collect();
                if !previous.is_empty() {
                    upgrade(cluster, previous[rng.below(previous.len() as u64) as usize], log).await?;
                }
            }
            FaultKind::Scale => {
                let members = cluster.members().len();
                let grow = members < MIN_MEMBERS + 1 || (members < initial + MAX_EXTRA_MEMBERS && rng.below(2) == 0);
                if grow {
                    scale_out(cluster, log).await?;
                } else {
                    scale_in(cluster, rng, log).await?;
                }
            }
            FaultKind::None => {}
        }
        if !cluster.wait_healthy(Duration::from_secs(30)).await {
            warn!(views = ?cluster.views().await, "the cluster did not look healthy within 30 s of the fault; going on");
        }
    }
    sleep_watching(cluster, deadline.saturating_duration_since(Instant::now()), log).await?;
    info!(injected = ?log.injected, "faults stopped");
    Ok(())
}

/// Sleeps, restarting any member that exited by itself (a crash: a violation).
async fn sleep_watching(cluster: &mut Cluster, duration: Duration, log: &mut FaultLog) -> anyhow::Result<()> {
    let until = Instant::now() + duration;
    loop {
        check_crashes(cluster, log).await?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
    }
}

/// Restarts members whose process ended by itself, recording each as a violation.
pub async fn check_crashes(cluster: &mut Cluster, log: &mut FaultLog) -> anyhow::Result<()> {
    for index in cluster.members() {
        if cluster.nodes[index].state != NodeState::Up {
            continue;
        }
        if let Some(status) = cluster.nodes[index].exited() {
            let node = &cluster.nodes[index];
            error!(node = %node.name, %status, tail = %node.log_tail(30), "a node exited by itself");
            log.violations.push(format!(
                "{} exited by itself ({status}); the end of {}:\n{}",
                node.name,
                node.log.display(),
                node.log_tail(30)
            ));
            restart_node(cluster, index, log).await?;
        }
    }
    Ok(())
}

fn count(log: &mut FaultLog, kind: &'static str) {
    *log.injected.entry(kind).or_default() += 1;
}

fn random_up(cluster: &Cluster, rng: &mut Xorshift) -> Option<usize> {
    let up = cluster.up();
    (!up.is_empty()).then(|| up[rng.below(up.len() as u64) as usize])
}

/// Starts a stopped member again; a member that cannot start is a violation and ends the run.
async fn restart_node(cluster: &mut Cluster, index: usize, log: &mut FaultLog) -> anyhow::Result<()> {
    start_again(cluster, index, log, false).await
}

/// Starts a stopped member again, on the new version when `upgraded`.
async fn start_again(cluster: &mut Cluster, index: usize, log: &mut FaultLog, upgraded: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let node = &mut cluster.nodes[index];
    let result = if upgraded { node.start_upgraded().await } else { node.restart().await };
    if let Err(e) = result {
        let node = &cluster.nodes[index];
        let what = if upgraded { "start on the new version" } else { "start again" };
        log.violations.push(format!("{} did not {what}: {e:#}\n{}", node.name, node.log_tail(30)));
        return Err(e.context(format!("starting {} again", node.name)));
    }
    let done = if upgraded { "node upgraded" } else { "node restarted" };
    info!(node = %cluster.nodes[index].name, took_ms = started.elapsed().as_millis() as u64, "{done}");
    cluster.publish();
    Ok(())
}

async fn kill(cluster: &mut Cluster, rng: &mut Xorshift, log: &mut FaultLog) -> anyhow::Result<()> {
    let Some(index) = random_up(cluster, rng) else { return Ok(()) };
    let down_for = Duration::from_millis(1000 + rng.below(7001));
    let node = &mut cluster.nodes[index];
    info!(node = %node.name, pid = ?node.pid(), down_for_ms = down_for.as_millis() as u64, "FAULT kill -9");
    node.kill9();
    count(log, "kill");
    tokio::time::sleep(down_for).await;
    restart_node(cluster, index, log).await
}

async fn pause(cluster: &mut Cluster, rng: &mut Xorshift, log: &mut FaultLog) -> anyhow::Result<()> {
    let Some(index) = random_up(cluster, rng) else { return Ok(()) };
    let paused_for = Duration::from_millis(1000 + rng.below(4001));
    let node = &mut cluster.nodes[index];
    info!(node = %node.name, pid = ?node.pid(), paused_for_ms = paused_for.as_millis() as u64, "FAULT pause (SIGSTOP)");
    node.pause()?;
    count(log, "pause");
    tokio::time::sleep(paused_for).await;
    cluster.nodes[index].resume()?;
    info!(node = %cluster.nodes[index].name, "resumed (SIGCONT)");
    Ok(())
}

async fn restart(cluster: &mut Cluster, rng: &mut Xorshift, log: &mut FaultLog) -> anyhow::Result<()> {
    let Some(index) = random_up(cluster, rng) else { return Ok(()) };
    let node = &cluster.nodes[index];
    info!(node = %node.name, pid = ?node.pid(), "FAULT restart (SIGTERM, then start)");
    count(log, "restart");
    stop(cluster, index, log).await?;
    restart_node(cluster, index, log).await
}

/// Stops a member running the previous version (`SIGTERM`) and starts the new version on its
/// data: one step of a rolling upgrade.
pub async fn upgrade(cluster: &mut Cluster, index: usize, log: &mut FaultLog) -> anyhow::Result<()> {
    let node = &cluster.nodes[index];
    info!(node = %node.name, pid = ?node.pid(), "FAULT upgrade (SIGTERM, then start the new version)");
    count(log, "upgrade");
    stop(cluster, index, log).await?;
    start_again(cluster, index, log, true).await
}

/// `SIGTERM` and wait for the exit; an exit that is not clean is a violation.
async fn stop(cluster: &mut Cluster, index: usize, log: &mut FaultLog) -> anyhow::Result<()> {
    let node = &mut cluster.nodes[index];
    let started = Instant::now();
    match node.terminate().await? {
        Some(status) if status.success() => {
            info!(node = %node.name, took_ms = started.elapsed().as_millis() as u64, "stopped cleanly");
        }
        other => {
            let what = other.map_or_else(|| "no exit within 30 s of SIGTERM".to_string(), |s| s.to_string());
            error!(node = %node.name, %what, "the node did not stop cleanly");
            log.violations.push(format!(
                "{} did not stop cleanly on SIGTERM: {what}\n{}",
                node.name,
                node.log_tail(30)
            ));
        }
    }
    Ok(())
}

async fn scale_out(cluster: &mut Cluster, log: &mut FaultLog) -> anyhow::Result<()> {
    info!(members = cluster.members().len(), "FAULT scale out");
    count(log, "scale-out");
    match cluster.add_node().await {
        Ok(index) => {
            info!(node = %cluster.nodes[index].name, "joined");
            Ok(())
        }
        Err(e) => {
            log.violations.push(format!("a new node could not join: {e:#}"));
            Err(e)
        }
    }
}

async fn scale_in(cluster: &mut Cluster, rng: &mut Xorshift, log: &mut FaultLog) -> anyhow::Result<()> {
    let up = cluster.up();
    if cluster.members().len() <= MIN_MEMBERS || up.len() < 2 {
        return Ok(());
    }
    let victim = up[rng.below(up.len() as u64) as usize];
    let others: Vec<usize> = up.iter().copied().filter(|i| *i != victim).collect();
    let name = cluster.nodes[victim].name.clone();
    info!(node = %name, members = cluster.members().len(), "FAULT scale in (DELETE /api/v1/cluster/nodes/{name})");
    count(log, "scale-in");
    let http = reqwest::Client::builder().timeout(LEAVE_DEADLINE).build()?;
    let started = Instant::now();
    loop {
        let through = others[rng.below(others.len() as u64) as usize];
        let api = cluster.nodes[through].api();
        let result = http.delete(format!("{api}/api/v1/cluster/nodes/{name}")).send().await;
        let (status, body) = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap_or_default())
            }
            Err(e) => (0, Value::String(e.to_string())),
        };
        info!(node = %name, through = %cluster.nodes[through].name, status, %body, "leave answered");
        match status {
            200 => break,
            404 if !listed(cluster, through, &name).await => break,
            409 => {
                warn!(node = %name, %body, "the cluster refused the removal; the node stays");
                return Ok(());
            }
            0 | 503 if started.elapsed() < LEAVE_DEADLINE => tokio::time::sleep(Duration::from_millis(500)).await,
            _ => {
                log.violations.push(format!("DELETE /api/v1/cluster/nodes/{name}: {status} {body}"));
                return Ok(());
            }
        }
    }
    // Removed from the state: wait until every other member agrees, then stop the process.
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(30) {
        let mut gone = true;
        for index in &others {
            gone &= !listed(cluster, *index, &name).await;
        }
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let node = &mut cluster.nodes[victim];
    let status = node.terminate().await?;
    node.mark_removed();
    cluster.publish();
    info!(node = %name, took_ms = started.elapsed().as_millis() as u64, exit = ?status, "left the cluster and stopped");
    Ok(())
}

async fn listed(cluster: &Cluster, index: usize, name: &str) -> bool {
    match cluster.view(index).await {
        Ok(view) => view["nodes"].as_array().into_iter().flatten().any(|n| n["name"] == name),
        Err(_) => true,
    }
}
