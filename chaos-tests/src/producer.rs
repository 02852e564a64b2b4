//! Producers: each owns one service and its pods and sends, per second of data time, a metrics
//! export and an access-log export (each with all pods in one request, or one request per pod)
//! to random nodes over OTLP/gRPC, retrying what was not acknowledged, as a gateway's OTLP
//! exporter does. Every export ends either acknowledged or, after [`Settings::give_up`],
//! unknown; the [`Ledger`] records which.

use crate::cluster::Target;
use crate::export::{export, log_export, Export, Pod, Request};
use crate::ledger::{AttemptClass, ExportRecord, FailedAttempt, Ledger, Outcome};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tollgate_rules::fleet::{Convention, Xorshift};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

/// How producers behave.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// After this long without acknowledgement an export is given up and recorded as unknown.
    pub give_up: Duration,
    /// When export 0 is due; export `k` is due `k` seconds later.
    pub started: Instant,
    /// Data time (unix seconds) of export 0; export `k` is at `base + k`.
    pub base: u64,
}

/// One producer.
#[derive(Debug)]
pub struct Producer {
    /// Service it owns.
    pub service: String,
    convention: Convention,
    pods: Vec<Pod>,
    /// One request per pod instead of one for all.
    per_pod: bool,
    rng: Xorshift,
    clients: Clients,
}

impl Producer {
    /// A producer of `service` with `pods` pods whose cumulative series start at `base - 1`.
    pub fn new(index: usize, service: &str, pods: usize, base: u64, seed: u64) -> Producer {
        Producer {
            service: service.to_string(),
            convention: if index.is_multiple_of(2) { Convention::AigwService } else { Convention::JobName },
            pods: (0..pods).map(|p| Pod::new(&format!("{service}-pod-{p}"), base - 1)).collect(),
            per_pod: index % 2 == 1,
            rng: Xorshift::new(seed),
            clients: Clients::default(),
        }
    }

    /// Sends exports until `stop` turns true, then finishes the export in progress.
    pub async fn run(
        mut self,
        settings: Settings,
        targets: watch::Receiver<Vec<Target>>,
        mut stop: watch::Receiver<bool>,
        ledger: Arc<Mutex<Ledger>>,
    ) {
        info!(service = %self.service, pods = self.pods.len(), per_pod = self.per_pod, "producer started");
        let mut k = 0u64;
        loop {
            let due = settings.started + Duration::from_secs(k);
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            if *stop.borrow() {
                break;
            }
            let time = settings.base + k;
            let mut exports: Vec<Export> = if self.per_pod {
                let mut out = Vec::new();
                for pod in self.pods.iter_mut() {
                    out.push(export(&self.service, self.convention, &mut [pod], time, &mut self.rng));
                }
                for pod in &self.pods {
                    out.push(log_export(&self.service, self.convention, &[pod], time, &mut self.rng));
                }
                out
            } else {
                let mut pods: Vec<&mut Pod> = self.pods.iter_mut().collect();
                vec![export(&self.service, self.convention, &mut pods, time, &mut self.rng)]
            };
            if !self.per_pod {
                let pods: Vec<&Pod> = self.pods.iter().collect();
                exports.push(log_export(&self.service, self.convention, &pods, time, &mut self.rng));
            }
            for export in exports {
                let record = send(&mut self.clients, &mut self.rng, &targets, export, &settings).await;
                ledger.lock().expect("ledger").record(record);
            }
            k += 1;
        }
        info!(service = %self.service, exports = k, "producer stopped");
    }
}

/// Sends one export until it is acknowledged or given up.
pub async fn send(
    clients: &mut Clients,
    rng: &mut Xorshift,
    targets: &watch::Receiver<Vec<Target>>,
    export: Export,
    settings: &Settings,
) -> ExportRecord {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut attempts = 0u32;
    let mut acked_by = None;
    loop {
        let target = {
            let targets = targets.borrow();
            targets[rng.below(targets.len() as u64) as usize].clone()
        };
        attempts += 1;
        match attempt(clients, &target.grpc, &export.request, settings.attempt_timeout).await {
            Ok(()) => {
                acked_by = Some(target.name.clone());
                break;
            }
            Err((class, error)) => {
                debug!(service = %export.service, time = export.time, pods = export.pods.len(), node = %target.name,
                    class = class.name(), %error, "export attempt failed");
                if class == AttemptClass::Unexpected {
                    warn!(service = %export.service, time = export.time, node = %target.name, %error, "unexpected answer to an export");
                }
                failures.push(FailedAttempt {
                    node: target.name.clone(),
                    at_ms: started.elapsed().as_millis() as u64,
                    class,
                    error,
                });
                if started.elapsed() >= settings.give_up {
                    break;
                }
                // 100, 200, 400, 800 ms, then 800 ms, each plus up to 100 ms of jitter.
                let backoff = 100 * (1u64 << (attempts - 1).min(3)) + rng.below(100);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
    let outcome = if acked_by.is_some() { Outcome::Acked } else { Outcome::Unknown };
    if outcome == Outcome::Unknown {
        warn!(service = %export.service, time = export.time, pods = export.pods.len(), attempts,
            "export given up: its outcome is unknown");
    }
    ExportRecord {
        service: export.service,
        pods: export.pods,
        time: export.time,
        requests: export.requests,
        input_tokens: export.input_tokens,
        records: export.records,
        outcome,
        acked_by,
        attempts,
        failures,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

/// gRPC channels per URL (dropped after a failure, so a stuck connection is not reused).
#[derive(Debug, Default)]
pub struct Clients(HashMap<String, Channel>);

/// One attempt: `Ok` when acknowledged without rejections.
async fn attempt(
    clients: &mut Clients,
    url: &str,
    request: &Request,
    timeout: Duration,
) -> Result<(), (AttemptClass, String)> {
    let channel = match clients.0.get(url) {
        Some(channel) => channel.clone(),
        None => {
            let endpoint = Endpoint::from_shared(url.to_string())
                .map_err(|e| (AttemptClass::Unexpected, e.to_string()))?
                .connect_timeout(Duration::from_secs(1));
            let channel = endpoint.connect_lazy();
            clients.0.insert(url.to_string(), channel.clone());
            channel
        }
    };
    // Rejected items, with the node's reason, or the status the call failed with.
    let call = async {
        match request {
            Request::Metrics(request) => MetricsServiceClient::new(channel).export(request.clone()).await.map(|r| {
                r.into_inner()
                    .partial_success
                    .filter(|p| p.rejected_data_points > 0)
                    .map(|p| format!("{} points rejected: {}", p.rejected_data_points, p.error_message))
            }),
            Request::Logs(request) => LogsServiceClient::new(channel).export(request.clone()).await.map(|r| {
                r.into_inner()
                    .partial_success
                    .filter(|p| p.rejected_log_records > 0)
                    .map(|p| format!("{} log records rejected: {}", p.rejected_log_records, p.error_message))
            }),
        }
    };
    let failure = match tokio::time::timeout(timeout, call).await {
        Err(_) => (AttemptClass::Unknown, format!("no answer within {timeout:?}")),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(rejected))) => (AttemptClass::Unexpected, rejected),
        Ok(Err(status)) => classify(&status),
    };
    clients.0.remove(url);
    Err(failure)
}

/// How a failed gRPC call failed.
fn classify(status: &tonic::Status) -> (AttemptClass, String) {
    let text = format!("{:?}: {}", status.code(), status.message());
    let source = std::error::Error::source(status).map(|s| format!("{s:?}"));
    let detail = source.as_ref().map(|s| format!(" ({s})")).unwrap_or_default();
    let lower = format!("{text}{detail}").to_lowercase();
    // Statuses made by the client's transport carry the transport error as their source; the
    // node's own answers do not.
    let transport = source.is_some() || lower.contains("transport error") || lower.contains("h2 protocol error");
    let class = if transport {
        if lower.contains("connect") && !lower.contains("reset") {
            AttemptClass::Unreachable
        } else {
            // Lost after the request may have left (connection reset, broken pipe, h2 error).
            AttemptClass::Unknown
        }
    } else {
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => AttemptClass::Refused,
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => AttemptClass::Unknown,
            _ => AttemptClass::Unexpected,
        }
    };
    (class, format!("{text}{detail}"))
}
