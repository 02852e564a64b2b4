//! Test support: the real `tollgate` binary on free loopback ports, and clients for it.

#![allow(dead_code)]

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate::Endpoints;

/// A free loopback address for a node's cluster port, outside the kernel's ephemeral port range
/// (32768–60999 by default). Restarts keep a node's cluster port; a port from that range could be
/// taken in the meantime by any listener bound to port 0, such as another test's node.
pub fn cluster_address() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const PORTS: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Another test process (a parallel runner) starts elsewhere in the range.
    let start = std::process::id().wrapping_mul(7_919) % PORTS;
    for _ in 0..PORTS {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % PORTS;
        let address = format!("127.0.0.1:{port}");
        if std::net::TcpListener::bind(&address).is_ok() {
            return address;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + PORTS);
}

/// How long a node may take to start.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A `tollgate serve` process.
pub struct TestNode {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    child: Option<Child>,
    pub endpoints: Endpoints,
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// The cluster listen address; pinned to the first run's port so restarts keep it.
    cluster_addr: String,
    /// The most bytes the process may write into any file (`RLIMIT_FSIZE`), applied at each
    /// start; a restart without it gives the node room again.
    pub file_size_limit: Option<u64>,
    pub http: reqwest::Client,
}

impl TestNode {
    /// Starts a node in a new temporary data directory.
    pub async fn start() -> TestNode {
        TestNode::start_with(&[], &[]).await
    }

    /// Starts a node with extra environment variables and arguments.
    pub async fn start_with(env: &[(&str, &str)], args: &[&str]) -> TestNode {
        TestNode::start_at(&cluster_address(), env, args).await
    }

    /// Starts a node whose cluster port listens on `cluster_addr`.
    pub async fn start_at(cluster_addr: &str, env: &[(&str, &str)], args: &[&str]) -> TestNode {
        TestNode::launch(cluster_addr, env, args, None, true).await
    }

    /// Starts a node that may not write any file beyond `bytes`: past it a write fails with
    /// `EFBIG` (the process ignores `SIGXFSZ`), as writes fail with `ENOSPC` on a full disk.
    /// Uses `sh` and util-linux's `prlimit`.
    pub async fn start_with_file_size_limit(bytes: u64) -> TestNode {
        TestNode::launch(&cluster_address(), &[], &[], Some(bytes), true).await
    }

    /// Starts a node and returns once it listens, ready or not (one waiting to join, say).
    pub async fn start_unready(env: &[(&str, &str)], args: &[&str]) -> TestNode {
        TestNode::start_unready_at(&cluster_address(), env, args).await
    }

    /// As [`TestNode::start_unready`], with its cluster port on `cluster_addr`.
    pub async fn start_unready_at(cluster_addr: &str, env: &[(&str, &str)], args: &[&str]) -> TestNode {
        TestNode::launch(cluster_addr, env, args, None, false).await
    }

    async fn launch(
        cluster_addr: &str,
        env: &[(&str, &str)],
        args: &[&str],
        limit: Option<u64>,
        wait_ready: bool,
    ) -> TestNode {
        let temp = tempfile::tempdir().expect("temporary directory");
        let dir = temp.path().to_path_buf();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, endpoints) = spawn(&dir, &env, &args, cluster_addr, limit, wait_ready).await;
        let cluster_addr = endpoints.cluster.to_string();
        TestNode {
            dir,
            _temp: Some(temp),
            child: Some(child),
            endpoints,
            env,
            args,
            cluster_addr,
            file_size_limit: limit,
            http: reqwest::Client::new(),
        }
    }

    /// Starts a cluster member named `name` with the test cluster settings, joining `join` (a
    /// cluster address) or bootstrapping a new cluster.
    pub async fn start_member(name: &str, join: Option<&str>, env: &[(&str, &str)]) -> TestNode {
        let mut all: Vec<(&str, &str)> = CLUSTER_ENV.to_vec();
        all.retain(|(key, _)| !env.iter().any(|(k, _)| k == key));
        all.extend_from_slice(env);
        let mut args = vec!["--node-id", name];
        if let Some(join) = join {
            args.extend(["--join", join]);
        }
        TestNode::start_with(&all, &args).await
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The cluster address other nodes reach this node at.
    pub fn cluster_addr(&self) -> String {
        self.endpoints.cluster.to_string()
    }

    /// The Raft id.
    pub fn raft_id(&self) -> u64 {
        self.endpoints.raft_id
    }

    /// `GET /api/v1/cluster`.
    pub async fn cluster_status(&self) -> Value {
        let (status, body) = self.get("/api/v1/cluster").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself, for at most `deadline`; returns its status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = exited(child, deadline).await;
        let status = status.unwrap_or_else(|| panic!("tollgate still running {deadline:?} later"));
        self.child = None;
        status
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends the process a signal (`TERM`, `INT`, ...) without waiting for it.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let sent = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{name}");
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let status = child.wait().expect("exit status");
        self.child = None;
        status
    }

    /// Starts the node again on the same data directory (new ports, but the same cluster port).
    pub async fn restart(&mut self) {
        self.kill9();
        let (child, endpoints) =
            spawn(&self.dir, &self.env, &self.args, &self.cluster_addr, self.file_size_limit, true).await;
        self.child = Some(child);
        self.endpoints = endpoints;
    }

    /// As [`TestNode::restart`], returning once the node listens, ready or not.
    pub async fn restart_unready(&mut self) {
        self.kill9();
        let (child, endpoints) =
            spawn(&self.dir, &self.env, &self.args, &self.cluster_addr, self.file_size_limit, false).await;
        self.child = Some(child);
        self.endpoints = endpoints;
    }

    /// Sets an environment variable of the node's next starts.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Starts the node again with a new cluster port too: it must tell the cluster.
    pub async fn restart_elsewhere(&mut self) {
        self.kill9();
        let (child, endpoints) =
            spawn(&self.dir, &self.env, &self.args, &cluster_address(), self.file_size_limit, true).await;
        self.child = Some(child);
        self.cluster_addr = endpoints.cluster.to_string();
        self.endpoints = endpoints;
    }

    /// DELETE an API path with an optional token.
    pub async fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.send(self.http.delete(format!("{}{path}", self.api())), token).await
    }

    /// POST a JSON body to an API path with an optional token.
    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.api())).json(body), token).await
    }

    /// Sends a request with an optional bearer token: its status and its body (JSON, or the text).
    async fn send(&self, request: reqwest::RequestBuilder, token: Option<&str>) -> (u16, Value) {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.expect("api reachable");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// The API base URL.
    pub fn api(&self) -> String {
        format!("http://{}", self.endpoints.http)
    }

    /// The OTLP/HTTP base URL.
    pub fn otlp_http(&self) -> String {
        format!("http://{}", self.endpoints.otlp_http)
    }

    /// The gRPC endpoint (the first listener).
    pub fn grpc(&self) -> String {
        format!("http://{}", self.endpoints.otlp_grpc[0])
    }

    /// A metrics client on the `index`-th gRPC listener.
    pub async fn metrics_client(&self, index: usize) -> MetricsServiceClient<tonic::transport::Channel> {
        MetricsServiceClient::connect(format!("http://{}", self.endpoints.otlp_grpc[index]))
            .await
            .expect("grpc connect")
    }

    /// A logs client on the first gRPC listener.
    pub async fn logs_client(&self) -> LogsServiceClient<tonic::transport::Channel> {
        LogsServiceClient::connect(self.grpc()).await.expect("grpc connect")
    }

    /// GET an API path, expecting JSON and a status.
    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path_and_query}", self.api())), None).await
    }

    /// Every kept log `GET /api/v1/logs?{query}` answers, page by page with pages of `limit`
    /// (each checked to hold at most that), in the order the pages give them.
    pub async fn all_logs(&self, query: &str, limit: usize) -> Vec<Value> {
        let mut logs = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/logs?{query}&limit={limit}");
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={cursor}"));
            }
            let (status, page) = self.get(&path).await;
            assert_eq!(status, 200, "{path}: {page}");
            let records = page["logs"].as_array().expect("logs");
            assert!(records.len() <= limit, "{path}: {} logs in a page of {limit}", records.len());
            logs.extend(records.iter().cloned());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return logs,
            }
        }
    }

    /// PUT a body to an API path with an optional token.
    pub async fn put(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        self.send(self.http.put(format!("{}{path}", self.api())).body(body.to_string()), token).await
    }

    /// One value of a metric query: `(labels, minute) -> value`.
    pub async fn value(
        &self,
        metric: &str,
        service: &str,
        instance: Option<&str>,
        labels: &Value,
        minute: i64,
    ) -> Option<f64> {
        let mut query = format!("/api/v1/metrics/{metric}?service={service}&start={minute}&end={}", minute + 60);
        if let Some(instance) = instance {
            query.push_str(&format!("&instance={instance}"));
        }
        let response = self.http.get(format!("{}{query}", self.api())).send().await.expect("api reachable");
        let missing = response.headers().get("x-tollgate-missing-nodes").cloned();
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("json");
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(missing, None, "{query}: some members did not answer");
        let series = body["series"].as_array().expect("series");
        let matching = series.iter().find(|s| &s["labels"] == labels)?;
        matching["points"][0][1].as_f64()
    }

    /// Self-metrics text.
    pub async fn self_metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.api())).send().await.expect("api").text().await.expect("text")
    }

    /// The value of a self-metric, `None` while it was never recorded. `name` carries the labels
    /// of a labelled one as the exporter writes them (`name{label="value"}`).
    pub async fn self_metric_opt(&self, name: &str) -> Option<f64> {
        metric_value(&self.self_metrics().await, name)
    }

    /// The value of an unlabelled self-metric.
    pub async fn self_metric(&self, name: &str) -> f64 {
        let value = self.self_metric_opt(name).await;
        value.unwrap_or_else(|| panic!("no {name} in /metrics"))
    }
}

/// The value of `name` in a self-metrics text (see [`TestNode::self_metric_opt`]).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')).and_then(|value| value.trim().parse().ok())
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills the child if startup fails (a panic must not leave an orphan process).
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Retention long enough for data dated like the golden cases (2025): a sweep during a slow
/// test must not delete what the test reads back.
pub const KEEP_OLD_DATA: [(&str, &str); 3] = [
    ("TOLLGATE_RETENTION_MINUTE_SECONDS", "400000000"),
    ("TOLLGATE_RETENTION_HOUR_SECONDS", "400000000"),
    ("TOLLGATE_RETENTION_DAY_SECONDS", "400000000"),
];

/// Cluster settings of test clusters: few vnodes, fast elections.
pub const CLUSTER_ENV: [(&str, &str); 5] = [
    ("TOLLGATE_CLUSTER_VNODES", "16"),
    ("TOLLGATE_CLUSTER_HEARTBEAT_INTERVAL_MS", "100"),
    ("TOLLGATE_CLUSTER_ELECTION_TIMEOUT_MS", "600"),
    ("TOLLGATE_CLUSTER_RPC_TIMEOUT_MS", "2000"),
    ("TOLLGATE_CLUSTER_FAILOVER_AFTER_SECONDS", "60"),
];

/// Waits until `nodes` (all running members) agree on a map with no vnode moving, each owning
/// its fair share.
pub async fn wait_balanced(nodes: &[&TestNode]) {
    let started = Instant::now();
    loop {
        let mut views = Vec::new();
        for node in nodes {
            views.push(node.cluster_status().await);
        }
        for view in &views {
            check_to_move(view);
        }
        let fair = 16 / nodes.len() as u64;
        let settled = views.iter().all(|view| {
            view["vnodes"]["moving"] == 0
                && view["vnodes"]["epoch"] == views[0]["vnodes"]["epoch"]
                && view["nodes"].as_array().map(Vec::len) == Some(nodes.len())
                && view["nodes"].as_array().into_iter().flatten().all(|member| {
                    let owned = member["vnodes"].as_u64().unwrap_or(0);
                    owned == fair || owned == fair + 1
                })
        });
        if settled {
            return;
        }
        assert!(started.elapsed() < START_DEADLINE, "the cluster did not settle: {views:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `vnodes.to_move` of a status agrees with its own map: 0 with nothing moving exactly when every
/// member that is not leaving owns its share and they own every vnode.
fn check_to_move(view: &Value) {
    let staying: Vec<&Value> =
        view["nodes"].as_array().into_iter().flatten().filter(|m| m["leaving"] == false).collect();
    if staying.is_empty() {
        return;
    }
    let total = view["vnodes"]["total"].as_u64().expect("total");
    let share = total / staying.len() as u64;
    let owned: Vec<u64> = staying.iter().map(|m| m["vnodes"].as_u64().unwrap_or(0)).collect();
    let (moving, to_move) = (view["vnodes"]["moving"].as_u64().unwrap(), view["vnodes"]["to_move"].as_u64().unwrap());
    let balanced =
        moving == 0 && owned.iter().sum::<u64>() == total && owned.iter().all(|&o| o == share || o == share + 1);
    assert_eq!(balanced, moving + to_move == 0, "`to_move` disagrees with the map: {view:#}");
}

async fn spawn(
    dir: &Path,
    env: &[(String, String)],
    args: &[String],
    cluster_addr: &str,
    file_size_limit: Option<u64>,
    wait_ready: bool,
) -> (Child, Endpoints) {
    let file = dir.join("endpoints.json");
    // The previous process's endpoints must not be mistaken for the new one's.
    let _ = std::fs::remove_file(&file);
    let binary = env!("CARGO_BIN_EXE_tollgate");
    let mut command = match file_size_limit {
        None => Command::new(binary),
        Some(bytes) => {
            let prlimit = Command::new("prlimit").arg("--version").stdout(Stdio::null()).status();
            assert!(prlimit.is_ok_and(|s| s.success()), "this test needs prlimit (util-linux) on the PATH");
            // An ignored signal stays ignored across exec: the node gets EFBIG, not SIGXFSZ.
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(r#"trap '' XFSZ; exec prlimit --fsize="$0" -- "$@""#)
                .arg(bytes.to_string())
                .arg(binary);
            command
        }
    };
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--otlp-grpc-addrs", "127.0.0.1:0,127.0.0.1:0"])
        .args(["--otlp-http-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--cluster-addr", cluster_addr])
        .args(args)
        .env("TOLLGATE_LOG", std::env::var("TOLLGATE_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .env_remove("TOLLGATE_TEST_LOG")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    if file_size_limit.is_some() {
        // The limit would also hold for the node's output when the test's goes to a file.
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut guard = KillOnDrop(Some(command.spawn().expect("the tollgate binary starts")));
    let child = guard.0.as_mut().expect("spawned");
    if let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) {
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::stdout()));
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
    }
    let started = Instant::now();
    let endpoints: Endpoints = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(endpoints) = serde_json::from_str(&text) {
                break endpoints;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tollgate exited during startup with {status}");
        }
        assert!(started.elapsed() < START_DEADLINE, "tollgate did not start within {START_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if wait_ready {
        let client = reqwest::Client::new();
        loop {
            let ready =
                client.get(format!("http://{}/readyz", endpoints.http)).send().await.map(|r| r.status().is_success());
            if ready.unwrap_or(false) {
                break;
            }
            assert!(started.elapsed() < START_DEADLINE, "tollgate did not become ready within {START_DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (guard.0.take().expect("spawned"), endpoints)
}

/// Unix seconds now.
pub fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Export `k` of a fleet of `pods` gateway pods of `service`, all in one request (see
/// [`pod_export`]). Returns the request and the number of requests it reports.
pub fn fleet_export(
    service: &str,
    base: u64,
    k: u64,
    pods: u64,
) -> (opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest, u64) {
    let (resource_metrics, requests): (Vec<_>, Vec<u64>) =
        (0..pods).map(|pod| pod_export(service, base, k, pod)).unzip();
    let request = opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest { resource_metrics };
    (request, requests.iter().sum())
}

/// Export `k` of gateway pod `pod` of `service`: delta request durations for three providers
/// (1 to 3 requests each) at `base + k`, and a cumulative input-token series started at
/// `base − 1` whose total is 100·(1 + 2 + … + (k+1)). Returns the pod's resource and the number
/// of requests it reports.
pub fn pod_export(
    service: &str,
    base: u64,
    k: u64,
    pod: u64,
) -> (opentelemetry_proto::tonic::metrics::v1::ResourceMetrics, u64) {
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
    };
    use tollgate_rules::testing::{gateway_bounds, gateway_resource, string_attribute, Convention};
    let time = base + k;
    let histogram = |name: &str, points, temporality| Metric {
        name: name.into(),
        data: Some(metric::Data::Histogram(Histogram { data_points: points, aggregation_temporality: temporality })),
        ..Default::default()
    };
    let mut requests = 0;
    let bounds = gateway_bounds("gen_ai.server.request.duration").to_vec();
    let mut durations = Vec::new();
    for provider in ["openai", "anthropic", "deepseek"] {
        let count = (k + pod) % 3 + 1;
        requests += count;
        let mut buckets = vec![0u64; bounds.len() + 1];
        buckets[(k as usize + pod as usize) % (bounds.len() + 1)] = count;
        durations.push(HistogramDataPoint {
            attributes: vec![
                string_attribute("gen_ai.provider.name", provider),
                string_attribute("gen_ai.response.model", "m"),
            ],
            start_time_unix_nano: (time - 1) * 1_000_000_000,
            time_unix_nano: time * 1_000_000_000,
            count,
            sum: Some(0.5 * count as f64),
            bucket_counts: buckets,
            explicit_bounds: bounds.clone(),
            ..Default::default()
        });
    }
    let total = 100 * (k + 1) * (k + 2) / 2;
    let token_bounds = gateway_bounds("gen_ai.client.token.usage").to_vec();
    let mut token_buckets = vec![0u64; token_bounds.len() + 1];
    token_buckets[7] = k + 1;
    let tokens = HistogramDataPoint {
        attributes: vec![
            string_attribute("gen_ai.token.type", "input"),
            string_attribute("gen_ai.response.model", "m"),
        ],
        start_time_unix_nano: (base - 1) * 1_000_000_000,
        time_unix_nano: time * 1_000_000_000,
        count: k + 1,
        sum: Some(total as f64),
        bucket_counts: token_buckets,
        explicit_bounds: token_bounds,
        ..Default::default()
    };
    let resource = ResourceMetrics {
        resource: Some(gateway_resource(Convention::AigwService, service, Some(&format!("pod-{pod}")))),
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![
                histogram("gen_ai.server.request.duration", durations, 1),
                histogram("gen_ai.client.token.usage", vec![tokens], 2),
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    (resource, requests)
}

/// The input tokens `exports` exports of [`fleet_export`] report in all.
pub fn fleet_tokens(exports: u64, pods: u64) -> u64 {
    pods * 100 * exports * (exports + 1) / 2
}

/// The sum over all points of a service metric's first series, with the header naming nodes
/// that did not answer.
pub async fn sum_of(node: &TestNode, metric: &str, service: &str, start: u64, end: u64) -> (f64, Option<String>) {
    let url = format!("{}/api/v1/metrics/{metric}?service={service}&start={start}&end={end}&step=minute", node.api());
    let response = node.http.get(&url).send().await.expect("api reachable");
    let missing = response.headers().get("x-tollgate-missing-nodes").map(|v| v.to_str().unwrap_or("").to_string());
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{url}: {body}");
    let sum = body["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p[1].as_f64())
        .sum();
    (sum, missing)
}

/// Starts `tollgate serve` on `dir` with `args` and `env` (loopback ports), expecting it to stop
/// by itself (panics with `started` when it still runs after 30 s): its exit status and
/// standard error.
pub async fn refused_start(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    started: &str,
) -> (std::process::ExitStatus, String) {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--otlp-grpc-addrs", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--cluster-addr", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = exited(&mut serve, Duration::from_secs(30)).await else {
        serve.kill().unwrap();
        panic!("{started}");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(serve.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Waits up to `deadline` for `child` to exit by itself: its status, or `None` if it still runs.
async fn exited(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("exit status") {
            return Some(status);
        }
        if started.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
