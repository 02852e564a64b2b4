//! Real processes for the benchmarks: `tollgate serve` on loopback ports in a data directory of
//! its own, and the no-op sink (`tollgate-loadgen sink`). Nothing is pinned to a core: the node,
//! the sink and the load generator share the machine.

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(120);

/// The part of `<data-dir>/endpoints.json` the benchmarks need.
#[derive(Clone, Debug, Deserialize)]
pub struct Endpoints {
    /// OTLP/gRPC listeners.
    pub otlp_grpc: Vec<SocketAddr>,
    /// API listener.
    pub http: SocketAddr,
    /// Cluster listener.
    pub cluster: SocketAddr,
}

/// A `tollgate serve` process.
#[derive(Debug)]
pub struct NodeProcess {
    child: Option<Child>,
    /// Where it listens.
    pub endpoints: Endpoints,
}

impl NodeProcess {
    /// Starts `binary serve` on `dir` and waits until `GET /readyz` answers 200; also returns the
    /// time from spawning the process to that first 200.
    pub async fn start(binary: &Path, dir: &Path, http: &reqwest::Client) -> anyhow::Result<(NodeProcess, Duration)> {
        NodeProcess::start_with(binary, dir, http, &[]).await
    }

    /// [`NodeProcess::start`] with more arguments of `serve` (`--node-id`, `--join`, ...).
    pub async fn start_with(
        binary: &Path,
        dir: &Path,
        http: &reqwest::Client,
        args: &[&str],
    ) -> anyhow::Result<(NodeProcess, Duration)> {
        let endpoints_file = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints_file);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--otlp-grpc-addrs", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0"])
            .args(args)
            .env("TOLLGATE_LOG", std::env::var("TOLLGATE_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let spawned = Instant::now();
        let child = command.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let mut node = NodeProcess {
            child: Some(child),
            endpoints: Endpoints {
                otlp_grpc: Vec::new(),
                http: ([127, 0, 0, 1], 0).into(),
                cluster: ([127, 0, 0, 1], 0).into(),
            },
        };
        loop {
            if spawned.elapsed() > READY_DEADLINE {
                bail!("tollgate did not become ready within {READY_DEADLINE:?}");
            }
            if let Some(status) = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("tollgate exited while starting: {status}");
            }
            if node.endpoints.otlp_grpc.is_empty() {
                if let Ok(text) = std::fs::read_to_string(&endpoints_file) {
                    if let Ok(endpoints) = serde_json::from_str::<Endpoints>(&text) {
                        node.endpoints = endpoints;
                    }
                }
            }
            if !node.endpoints.otlp_grpc.is_empty() {
                let ready = http.get(format!("{}/readyz", node.api())).send().await;
                if ready.is_ok_and(|r| r.status().as_u16() == 200) {
                    return Ok((node, spawned.elapsed()));
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `http://host:port` of the first OTLP/gRPC listener.
    pub fn grpc(&self) -> String {
        format!("http://{}", self.endpoints.otlp_grpc[0])
    }

    /// `http://host:port` of the API.
    pub fn api(&self) -> String {
        format!("http://{}", self.endpoints.http)
    }

    /// Resident set size, bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid())
    }

    /// CPU time (user + system) the process used so far, seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid())
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `VmRSS` of a process, bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    let kib: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?.parse()?;
    Ok(kib * 1024)
}

/// User + system CPU time of a process, seconds (`/proc/<pid>/stat`, clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad stat for {pid}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts with field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11).ok_or_else(|| anyhow!("no utime"))?.parse()?;
    let stime: f64 = fields.get(12).ok_or_else(|| anyhow!("no stime"))?.parse()?;
    Ok((utime + stime) / 100.0)
}

/// A `tollgate-loadgen sink` process.
#[derive(Debug)]
pub struct SinkProcess {
    child: Child,
    /// `http://host:port`.
    pub target: String,
}

impl SinkProcess {
    /// Starts the sink on a free loopback port (this same executable, `sink` subcommand).
    pub fn start() -> anyhow::Result<SinkProcess> {
        let executable = std::env::current_exe()?;
        let mut child = Command::new(executable)
            .args(["sink", "--grpc-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the sink")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no sink stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        // The sink's first line: `listening <address>`.
        let first = lines.next().ok_or_else(|| anyhow!("the sink exited"))??;
        let address = first.strip_prefix("listening ").ok_or_else(|| anyhow!("unexpected sink output {first:?}"))?;
        let target = format!("http://{address}");
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(SinkProcess { child, target })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
