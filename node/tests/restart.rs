//! `kill -9` during a stream of exports (metrics, then access logs), restart, resend everything:
//! nothing acknowledged is lost and nothing is counted or kept twice.

mod common;

use common::{now_seconds, pod_export, TestNode};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate_rules::testing::{gateway_resource, string_attribute, Convention};

const EXPORTS: u64 = 400;
const PODS: u64 = 2;

/// Export `k` of pod `pod` (see [`pod_export`]): the request and its request count.
fn export(base: u64, pod: u64, k: u64) -> (ExportMetricsServiceRequest, u64) {
    let (resource, requests) = pod_export("restart-gw", base, k, pod);
    (ExportMetricsServiceRequest { resource_metrics: vec![resource] }, requests)
}

async fn sum_of(node: &TestNode, metric: &str, start: u64, end: u64) -> f64 {
    let (status, body) =
        node.get(&format!("/api/v1/metrics/{metric}?service=restart-gw&start={start}&end={end}&step=minute")).await;
    assert_eq!(status, 200, "{body}");
    body["series"][0]["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_kill9_during_stream_then_resend_counts_everything_exactly_once() {
    let mut node = TestNode::start().await;
    let base = now_seconds() - EXPORTS - 60;
    let exports: Vec<(u64, u64)> = (0..EXPORTS).flat_map(|k| (0..PODS).map(move |pod| (pod, k))).collect();
    let expected_requests: u64 = exports.iter().map(|(pod, k)| export(base, *pod, *k).1).sum();
    let expected_tokens: u64 = PODS * 100 * EXPORTS * (EXPORTS + 1) / 2;

    // The stream, in its own task; the test kills the node while it runs.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let producer = {
        let endpoint = node.grpc();
        let acknowledged = Arc::clone(&acknowledged);
        let exports = exports.clone();
        tokio::spawn(async move {
            let mut client = opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(endpoint)
                .await
                .unwrap();
            let mut failures = 0;
            for (pod, k) in exports {
                match client.export(export(base, pod, k).0).await {
                    Ok(response) => {
                        assert!(response.into_inner().partial_success.is_none());
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => failures += 1,
                }
            }
            failures
        })
    };
    while acknowledged.load(Ordering::SeqCst) < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill9();
    let failures = producer.await.unwrap();
    let acked = acknowledged.load(Ordering::SeqCst);
    assert!(failures > 0 && acked >= 150, "the kill must interrupt the stream (acked {acked}, failed {failures})");

    node.restart().await;
    // What was acknowledged before the kill is there, with nothing extra.
    let partial = sum_of(&node, "meter_envoy_ai_gw_request_cpm", base - 60, base + EXPORTS + 60).await as u64;
    let acked_requests: u64 = exports[..acked].iter().map(|(pod, k)| export(base, *pod, *k).1).sum();
    assert!(partial >= acked_requests, "lost acknowledged data: {partial} < {acked_requests}");
    assert!(partial <= expected_requests);

    // The client retries everything, acknowledged or not.
    let mut client = node.metrics_client(1).await;
    for (pod, k) in &exports {
        let response = client.export(export(base, *pod, *k).0).await.expect("accepted after restart").into_inner();
        assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
    }
    let requests = sum_of(&node, "meter_envoy_ai_gw_request_cpm", base - 60, base + EXPORTS + 60).await;
    assert_eq!(requests, expected_requests as f64, "every request counted exactly once");
    let tokens = sum_of(&node, "meter_envoy_ai_gw_input_token_rate", base - 60, base + EXPORTS + 60).await;
    assert_eq!(tokens, expected_tokens as f64, "cumulative series: the whole increase, once");

    // And once more after a second restart, with a third replay.
    node.restart().await;
    let mut client = node.metrics_client(0).await;
    for (pod, k) in exports.iter().rev().take(50) {
        client.export(export(base, *pod, *k).0).await.expect("accepted");
    }
    let requests = sum_of(&node, "meter_envoy_ai_gw_request_cpm", base - 60, base + EXPORTS + 60).await;
    assert_eq!(requests, expected_requests as f64);
    let tokens = sum_of(&node, "meter_envoy_ai_gw_input_token_rate", base - 60, base + EXPORTS + 60).await;
    assert_eq!(tokens, expected_tokens as f64);
}

/// Export `k` of pod `pod` of a gateway that sets no `service.instance.id`: both pods send the
/// same cumulative request-duration series, pod `pod`'s started at `base − 100 − 10·pod` with a
/// total of (pod + 1)·(k + 1) requests at `base + 10·k`.
fn shared_series_export(base: u64, pod: u64, k: u64) -> ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
    };
    let bounds = tollgate_rules::testing::gateway_bounds("gen_ai.server.request.duration").to_vec();
    let count = (pod + 1) * (k + 1);
    let mut bucket_counts = vec![0; bounds.len() + 1];
    bucket_counts[3] = count;
    let point = HistogramDataPoint {
        attributes: vec![string_attribute("gen_ai.response.model", "m")],
        start_time_unix_nano: (base - 100 - 10 * pod) * 1_000_000_000,
        time_unix_nano: (base + 10 * k) * 1_000_000_000,
        count,
        sum: Some(count as f64),
        bucket_counts,
        explicit_bounds: bounds,
        ..Default::default()
    };
    let metric = Metric {
        name: "gen_ai.server.request.duration".into(),
        data: Some(metric::Data::Histogram(Histogram { data_points: vec![point], aggregation_temporality: 2 })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(gateway_resource(Convention::AigwService, "restart-gw", None)),
            scope_metrics: vec![ScopeMetrics { metrics: vec![metric], ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// Exports `rounds` of both pods of [`shared_series_export`], each accepted whole.
async fn send_shared_series(node: &TestNode, base: u64, rounds: std::ops::Range<u64>) {
    let mut client = node.metrics_client(0).await;
    for k in rounds {
        for pod in 0..2 {
            let response = client.export(shared_series_export(base, pod, k)).await.expect("accepted").into_inner();
            assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
        }
    }
}

/// Two pods that share a series (no `service.instance.id`) each keep their own running totals
/// across a `kill -9`: after the restart, each pod's next export adds only what it counted
/// since its previous one, and a retried export adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_kill9_keeps_the_totals_of_each_pod_sharing_a_series() {
    let mut node = TestNode::start().await;
    let base = now_seconds() - 200;
    send_shared_series(&node, base, 0..4).await;
    let (start, end) = (base - 60, base + 120);
    assert_eq!(sum_of(&node, "meter_envoy_ai_gw_request_cpm", start, end).await, 4.0 * 3.0);
    node.kill9();
    node.restart().await;
    send_shared_series(&node, base, 3..8).await;
    assert_eq!(sum_of(&node, "meter_envoy_ai_gw_request_cpm", start, end).await, 8.0 * 3.0);
}

/// Pods streaming at once into the node whose disk fills: their partitions spread over many
/// owners, so that several have a write in flight when the store fails.
const FULL_PODS: u64 = 16;

/// A full disk: the export whose write fails, and every one after it, gets a retryable error
/// (never an acknowledgement), the node stops by itself promptly (an owner with a failed write
/// waited 30 s for it to become durable, each in turn), and started again with room it holds
/// every acknowledged export; the client's retries then count everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_full_disk_refuses_exports_stops_the_node_and_loses_nothing_acknowledged() {
    // No file may grow beyond 1 MiB: the write-ahead log reaches it first (a checkpoint is due
    // at 64 MiB of log) and its write fails as on a full disk.
    let mut node = TestNode::start_with_file_size_limit(1 << 20).await;
    let base = now_seconds() - 400;
    let export = |pod: u64, k: u64| pod_export("full-gw", base, k, pod);
    let streams: Vec<_> = (0..FULL_PODS)
        .map(|pod| {
            let endpoint = node.grpc();
            tokio::spawn(async move {
                let mut client = opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(endpoint)
                    .await
                    .unwrap();
                // Exports 0..acked were acknowledged; export `acked` was refused with `error`.
                for k in 0..350 {
                    let request = ExportMetricsServiceRequest { resource_metrics: vec![pod_export("full-gw", base, k, pod).0] };
                    if let Err(status) = client.export(request).await {
                        return (k, status);
                    }
                }
                panic!("pod {pod}: 350 exports acknowledged and the disk never filled");
            })
        })
        .collect();
    let mut refused = Vec::new();
    for stream in streams {
        refused.push(stream.await.unwrap());
    }
    for (pod, (k, status)) in refused.iter().enumerate() {
        // Refused while the node still answered: retryable. (A stream may also find the node
        // already gone.)
        if !status.message().contains("transport error") {
            assert_eq!(status.code(), tonic::Code::Unavailable, "pod {pod}, export {k}: {status:?}");
        }
    }
    let status = node.wait_exit(Duration::from_secs(25)).await;
    assert!(!status.success(), "a node whose store failed exits with an error: {status}");

    node.file_size_limit = None;
    node.restart().await;
    let (start, end) = (base - 60, base + 420);
    let requests = |last: &dyn Fn(u64) -> u64| -> u64 {
        (0..FULL_PODS).map(|pod| (0..last(pod)).map(|k| export(pod, k).1).sum::<u64>()).sum()
    };
    let acked = requests(&|pod| refused[pod as usize].0);
    let attempted = requests(&|pod| refused[pod as usize].0 + 1);
    let (merged, _) = common::sum_of(&node, "meter_envoy_ai_gw_request_cpm", "full-gw", start, end).await;
    assert!(merged as u64 >= acked, "lost acknowledged exports: {merged} requests < {acked}");
    assert!(merged as u64 <= attempted, "{merged} requests > {attempted} sent");

    // The client retries the refused export of each pod, then goes on with one more.
    let mut client = node.metrics_client(0).await;
    for (pod, (k, _)) in refused.iter().enumerate() {
        for k in [*k, k + 1] {
            let request = ExportMetricsServiceRequest { resource_metrics: vec![export(pod as u64, k).0] };
            let response = client.export(request).await.expect("accepted with room").into_inner();
            assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
        }
    }
    let expected = requests(&|pod| refused[pod as usize].0 + 2);
    let (merged, _) = common::sum_of(&node, "meter_envoy_ai_gw_request_cpm", "full-gw", start, end).await;
    assert_eq!(merged, expected as f64, "every request counted exactly once");
    let expected_tokens: u64 = refused.iter().map(|(k, _)| 100 * (k + 2) * (k + 3) / 2).sum();
    let (tokens, _) = common::sum_of(&node, "meter_envoy_ai_gw_input_token_rate", "full-gw", start, end).await;
    assert_eq!(tokens, expected_tokens as f64, "cumulative series: the whole increase, once");
}

/// The data directory removed under a running node: the next export is refused (retryable), not
/// acknowledged into files no restart reads (until a checkpoint found the directory gone, up to
/// 30 s later), and the node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_export_after_the_data_directory_is_removed_is_refused_and_the_node_stops() {
    let mut node = TestNode::start().await;
    let base = now_seconds() - 120;
    let mut client = node.metrics_client(0).await;
    let request = |k: u64| ExportMetricsServiceRequest { resource_metrics: vec![pod_export("gone-gw", base, k, 0).0] };
    client.export(request(0)).await.expect("acknowledged");
    std::fs::remove_dir_all(&node.dir).unwrap();
    let status = client.export(request(1)).await.expect_err("an export the node cannot store is not acknowledged");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let status = node.wait_exit(Duration::from_secs(25)).await;
    assert!(!status.success(), "a node whose store failed exits with an error: {status}");
}

const LOG_EXPORTS: u64 = 300;
const RECORDS_PER_EXPORT: u64 = 4;

/// Log export `k`: four failed LLM requests (all kept, reason `error`), each with its own id.
fn log_export(base: u64, k: u64) -> ExportLogsServiceRequest {
    let records = (0..RECORDS_PER_EXPORT)
        .map(|i| LogRecord {
            time_unix_nano: (base + k) * 1_000_000_000 + i,
            attributes: vec![
                string_attribute("gen_ai.request.model", "gpt-4o"),
                string_attribute("response_code", "500"),
                string_attribute("x-request-id", &format!("req-{k}-{i}")),
            ],
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(gateway_resource(Convention::AigwService, "restart-logs-gw", Some("pod-0"))),
            scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// The request ids of every kept record, page by page.
async fn kept_ids(node: &TestNode, base: u64) -> Vec<String> {
    let query = format!("service=restart-logs-gw&start={}&end={}", base - 60, base + LOG_EXPORTS + 60);
    let logs = node.all_logs(&query, 500).await;
    logs.iter().map(|log| log["attributes"]["x-request-id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_kill9_during_a_log_stream_keeps_every_acknowledged_record_once() {
    let mut node = TestNode::start().await;
    let base = now_seconds() - LOG_EXPORTS - 60;
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let producer = {
        let mut client = node.logs_client().await;
        let acknowledged = Arc::clone(&acknowledged);
        tokio::spawn(async move {
            let mut failures = 0;
            for k in 0..LOG_EXPORTS {
                match client.export(log_export(base, k)).await {
                    Ok(response) => {
                        assert!(response.into_inner().partial_success.is_none());
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => failures += 1,
                }
            }
            failures
        })
    };
    while acknowledged.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill9();
    let failures = producer.await.unwrap();
    let acked = acknowledged.load(Ordering::SeqCst) as u64;
    assert!(failures > 0 && acked >= 100, "the kill must interrupt the stream (acked {acked}, failed {failures})");

    // Every record of every acknowledged export survived the kill, none twice.
    node.restart().await;
    let ids = kept_ids(&node, base).await;
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a record was kept twice");
    for k in 0..acked {
        for i in 0..RECORDS_PER_EXPORT {
            assert!(unique.contains(&format!("req-{k}-{i}")), "acknowledged record req-{k}-{i} was lost");
        }
    }

    // The client retries every export: each record is kept exactly once.
    let mut client = node.logs_client().await;
    for k in 0..LOG_EXPORTS {
        let response = client.export(log_export(base, k)).await.expect("accepted after restart").into_inner();
        assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
    }
    let ids = kept_ids(&node, base).await;
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len() as u64, unique.len() as u64),
        (LOG_EXPORTS * RECORDS_PER_EXPORT, LOG_EXPORTS * RECORDS_PER_EXPORT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_data_directory_of_a_newer_format_is_refused_and_left_as_it_is() {
    let mut node = TestNode::start().await;
    let base = now_seconds() - 300;
    let mut client = node.metrics_client(0).await;
    let (request, requests) = export(base, 0, 0);
    client.export(request).await.expect("accepted");
    node.terminate();
    let stamp = node.dir.join("FORMAT");
    assert_eq!(std::fs::read_to_string(&stamp).unwrap(), "tollgate data format 1\n", "a new directory is stamped");

    // As a newer version would have left it, then started with this one (a downgrade).
    std::fs::write(&stamp, "tollgate data format 2\n").unwrap();
    let files = |dir: &std::path::Path| {
        let mut listing = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    listing.push((path.clone(), std::fs::read(&path).unwrap()));
                }
            }
        }
        listing.sort();
        listing
    };
    let before = files(&node.dir);
    let (status, stderr) =
        common::refused_start(&node.dir, &[], &[], "the node started on a directory of a newer format").await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("holds data format 2, written by a newer version of Tollgate"), "{stderr}");
    assert!(stderr.contains("this version reads data format 1 and older"), "{stderr}");
    assert!(files(&node.dir) == before, "nothing in the directory was opened for writing");

    std::fs::write(&stamp, "tollgate data format 1\n").unwrap();
    node.restart().await;
    assert_eq!(sum_of(&node, "meter_envoy_ai_gw_request_cpm", base - 60, base + 120).await as u64, requests);
}

/// A write-ahead log damaged in the middle (a flipped bit), not at its end: the node refuses to
/// start and says where and how to go on, leaving the file as it is. It used to take the damage
/// for a torn tail, start without every write after it, and cut them off the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_log_damaged_in_the_middle_stops_the_start_and_is_left_as_it_is() {
    let mut node = TestNode::start().await;
    let base = now_seconds() - 300;
    let mut client = node.metrics_client(0).await;
    for k in 0..50 {
        client.export(export(base, 0, k).0).await.expect("accepted");
    }
    node.kill9();
    let wal = node.dir.join("wal");
    let newest = std::fs::read_dir(&wal).unwrap().map(|e| e.unwrap().path()).max().expect("a generation");
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();

    let (status, stderr) = common::refused_start(&node.dir, &[], &[], "the node started on a damaged log").await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("a valid frame follows at byte"), "{stderr}");
    assert!(stderr.contains("truncate -s "), "{stderr}");
    assert_eq!(std::fs::read(&newest).unwrap(), bytes, "the damaged log is left as it is");

    // Going on as the message says, without the writes from the damaged frame on.
    let cut: u64 =
        stderr.split("truncate -s ").nth(1).and_then(|rest| rest.split(' ').next()).unwrap().parse().unwrap();
    assert!(cut as usize <= middle && cut > 0, "cut at {cut}, damage at {middle}");
    std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(cut).unwrap();
    node.restart().await;
    let requests = sum_of(&node, "meter_envoy_ai_gw_request_cpm", base - 60, base + 120).await as u64;
    let all: u64 = (0..50).map(|k| export(base, 0, k).1).sum();
    assert!(requests > 0 && requests < all, "{requests} of {all} requests kept");
}
