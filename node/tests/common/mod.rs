//! Test support: the real `tollgate` binary on free loopback ports, and clients for it.

#![allow(dead_code)]

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate::Endpoints;

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
    pub http: reqwest::Client,
}

impl TestNode {
    /// Starts a node in a new temporary data directory.
    pub async fn start() -> TestNode {
        TestNode::start_with(&[], &[]).await
    }

    /// Starts a node with extra environment variables and arguments.
    pub async fn start_with(env: &[(&str, &str)], args: &[&str]) -> TestNode {
        let temp = tempfile::tempdir().expect("temporary directory");
        let dir = temp.path().to_path_buf();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, endpoints) = spawn(&dir, &env, &args).await;
        TestNode { dir, _temp: Some(temp), child: Some(child), endpoints, env, args, http: reqwest::Client::new() }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let status = child.wait().expect("exit status");
        self.child = None;
        status
    }

    /// Starts the node again on the same data directory (new ports).
    pub async fn restart(&mut self) {
        self.kill9();
        let (child, endpoints) = spawn(&self.dir, &self.env, &self.args).await;
        self.child = Some(child);
        self.endpoints = endpoints;
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
        let response = self.http.get(format!("{}{path_and_query}", self.api())).send().await.expect("api reachable");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// PUT a body to an API path with an optional token.
    pub async fn put(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.http.put(format!("{}{path}", self.api())).body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("api reachable");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
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
        let (status, body) = self.get(&query).await;
        assert_eq!(status, 200, "{query}: {body}");
        let series = body["series"].as_array().expect("series");
        let matching = series.iter().find(|s| &s["labels"] == labels)?;
        matching["points"][0][1].as_f64()
    }

    /// Self-metrics text.
    pub async fn self_metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.api())).send().await.expect("api").text().await.expect("text")
    }
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

async fn spawn(dir: &Path, env: &[(String, String)], args: &[String]) -> (Child, Endpoints) {
    let file = dir.join("endpoints.json");
    // The previous process's endpoints must not be mistaken for the new one's.
    let _ = std::fs::remove_file(&file);
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--otlp-grpc-addrs", "127.0.0.1:0,127.0.0.1:0"])
        .args(["--otlp-http-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0"])
        .args(args)
        .env("TOLLGATE_LOG", std::env::var("TOLLGATE_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut guard = KillOnDrop(Some(command.spawn().expect("the tollgate binary starts")));
    let child = guard.0.as_mut().expect("spawned");
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
    (guard.0.take().expect("spawned"), endpoints)
}
