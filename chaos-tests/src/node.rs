//! One `tollgate serve` process: started on free loopback ports in a data directory of its own,
//! killed with `kill -9`, paused with `SIGSTOP`, stopped with `SIGTERM`, and started again on the
//! same data directory and the same cluster port. Its standard output and error are appended to
//! `<data>/<name>.log`, with a marker line for every start.

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a node may take to write its endpoints and answer `GET /readyz` with 200.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// How long a node may take to exit after `SIGTERM` before it is killed.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// The cluster settings of every node (few vnodes, fast elections and failure detection). Only
/// documented variables (docs/configuration.md): a node refuses unknown `TOLLGATE_*` variables.
pub const CLUSTER_ENV: [(&str, &str); 5] = [
    ("TOLLGATE_CLUSTER_VNODES", "32"),
    ("TOLLGATE_CLUSTER_HEARTBEAT_INTERVAL_MS", "100"),
    ("TOLLGATE_CLUSTER_ELECTION_TIMEOUT_MS", "600"),
    ("TOLLGATE_CLUSTER_RPC_TIMEOUT_MS", "2000"),
    ("TOLLGATE_CLUSTER_FAILOVER_AFTER_SECONDS", "10"),
];

/// `<data-dir>/endpoints.json`, written by the node once its listeners are bound.
#[derive(Clone, Debug, Deserialize)]
pub struct Endpoints {
    /// OTLP/gRPC listeners.
    pub otlp_grpc: Vec<SocketAddr>,
    /// API listener.
    pub http: SocketAddr,
    /// Cluster listener.
    pub cluster: SocketAddr,
}

/// What every node of a run shares.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `tollgate` binary.
    pub binary: PathBuf,
    /// The run's directory: node `n` keeps its data in `<root>/n` and its log in `<root>/n.log`.
    pub root: PathBuf,
    /// `TOLLGATE_LOG` of the nodes.
    pub log_filter: String,
    /// The previous version's binary (`--upgrade-from`): the first members run it until they are
    /// upgraded to `binary`.
    pub previous: Option<PathBuf>,
}

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Running.
    Up,
    /// Killed (or crashed), not restarted yet.
    Down,
    /// Stopped with `SIGSTOP`.
    Paused,
    /// Left the cluster and stopped for good.
    Removed,
}

/// A `tollgate serve` process and how to start it again.
#[derive(Debug)]
pub struct NodeProcess {
    /// Node name (`--node-id`).
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    spec: NodeSpec,
    /// The binary it runs (the spec's, or the previous version's until it is upgraded).
    binary: PathBuf,
    join: Option<String>,
    /// Pinned to the first start's port, so a restarted node keeps its cluster address.
    cluster_addr: String,
    child: Option<Child>,
    /// Where it listens (the ports of its latest start).
    pub endpoints: Endpoints,
    /// Where it is in its life.
    pub state: NodeState,
    /// How many times it was started.
    pub starts: u32,
}

impl NodeProcess {
    /// Starts `binary` as a node named `name` that bootstraps a new cluster (`join` = `None`) or
    /// joins the one `join` (a cluster address) belongs to, and waits until it is ready.
    pub async fn start(
        spec: &NodeSpec,
        binary: &Path,
        name: &str,
        join: Option<String>,
    ) -> anyhow::Result<NodeProcess> {
        let dir = spec.root.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut node = NodeProcess {
            name: name.to_string(),
            log: spec.root.join(format!("{name}.log")),
            dir,
            spec: spec.clone(),
            binary: binary.to_path_buf(),
            join,
            cluster_addr: "127.0.0.1:0".into(),
            child: None,
            endpoints: Endpoints {
                otlp_grpc: Vec::new(),
                http: ([127, 0, 0, 1], 0).into(),
                cluster: ([127, 0, 0, 1], 0).into(),
            },
            state: NodeState::Down,
            starts: 0,
        };
        node.spawn().await?;
        node.cluster_addr = node.endpoints.cluster.to_string();
        Ok(node)
    }

    /// The address other nodes reach this node's cluster port at.
    pub fn cluster_addr(&self) -> String {
        self.cluster_addr.clone()
    }

    /// `http://host:port` of the first OTLP/gRPC listener.
    pub fn grpc(&self) -> String {
        format!("http://{}", self.endpoints.otlp_grpc[0])
    }

    /// `http://host:port` of the API.
    pub fn api(&self) -> String {
        format!("http://{}", self.endpoints.http)
    }

    /// The process id, while a process exists.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is a member of the cluster (not removed).
    pub fn is_member(&self) -> bool {
        self.state != NodeState::Removed
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let endpoints_file = self.dir.join("endpoints.json");
        // The previous process's endpoints must not be mistaken for the new one's.
        let _ = std::fs::remove_file(&endpoints_file);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(
            log,
            "===== tollgate-chaos: start #{} of {} at {} (cluster address {}) =====",
            self.starts,
            self.name,
            chrono::Utc::now().to_rfc3339(),
            self.cluster_addr
        )?;
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--node-id", &self.name])
            .args(["--otlp-grpc-addrs", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0", "--cluster-addr", &self.cluster_addr]);
        if let Some(join) = &self.join {
            command.args(["--join", join]);
        }
        // Unknown TOLLGATE_* variables make a node refuse to start: pass only ours.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TOLLGATE_") {
                command.env_remove(key);
            }
        }
        command
            .envs(CLUSTER_ENV)
            .env("TOLLGATE_LOG", &self.spec.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let started = Instant::now();
        let child = command.spawn().with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child.id();
        self.child = Some(child);
        self.state = NodeState::Up;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let mut endpoints: Option<Endpoints> = None;
        loop {
            if let Some(status) = self.exited() {
                bail!("{} exited while starting ({status}); see {}", self.name, self.log.display());
            }
            if started.elapsed() > START_DEADLINE {
                self.kill9();
                bail!("{} was not ready within {START_DEADLINE:?}; see {}", self.name, self.log.display());
            }
            if endpoints.is_none() {
                if let Ok(text) = std::fs::read_to_string(&endpoints_file) {
                    endpoints = serde_json::from_str(&text).ok();
                }
            }
            if let Some(found) = &endpoints {
                let ready = http.get(format!("http://{}/readyz", found.http)).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.endpoints = endpoints.ok_or_else(|| anyhow!("no endpoints"))?;
        info!(
            node = %self.name,
            pid,
            api = %self.endpoints.http,
            grpc = %self.endpoints.otlp_grpc[0],
            cluster = %self.endpoints.cluster,
            ready_after_ms = started.elapsed().as_millis() as u64,
            "node ready"
        );
        Ok(())
    }

    /// The exit status if the process ended by itself (it is reaped and marked down).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        self.state = NodeState::Down;
        Some(status)
    }

    /// `kill -9` (also of a paused process) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.state != NodeState::Removed {
            self.state = NodeState::Down;
        }
    }

    /// `SIGSTOP`: the process stops answering anything, as a hung or cut-off node.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("STOP")?;
        self.state = NodeState::Paused;
        Ok(())
    }

    /// `SIGCONT` after [`NodeProcess::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("CONT")?;
        self.state = NodeState::Up;
        Ok(())
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("{} has no process", self.name))?;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({}) failed: {status}", self.name);
        }
        Ok(())
    }

    /// `SIGTERM` and wait for the exit (`kill -9` after [`STOP_DEADLINE`]); returns the exit
    /// status, or `None` when it had to be killed.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.state == NodeState::Paused {
            self.resume()?;
        }
        if self.child.is_none() {
            return Ok(None);
        }
        self.signal("TERM")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Ok(Some(status));
            }
            if started.elapsed() > STOP_DEADLINE {
                warn!(node = %self.name, "no exit within {STOP_DEADLINE:?} of SIGTERM: kill -9");
                self.kill9();
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the process again on the same data directory and cluster port (other ports change).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn().await
    }

    /// Whether it runs the previous version (`--upgrade-from`), not upgraded yet.
    pub fn runs_previous(&self) -> bool {
        self.binary != self.spec.binary
    }

    /// Starts the new version on the same data directory and cluster port, after the caller
    /// stopped the process.
    pub async fn start_upgraded(&mut self) -> anyhow::Result<()> {
        self.binary = self.spec.binary.clone();
        self.restart().await
    }

    /// Marks the node as gone for good (after it left the cluster and was stopped).
    pub fn mark_removed(&mut self) {
        self.state = NodeState::Removed;
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.state == NodeState::Paused {
            let _ = self.resume();
        }
        self.kill9();
    }
}

/// The last `lines` lines of a file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
