//! `kill -9` during a stream of exports, restart, resend everything: nothing acknowledged is lost
//! and nothing is counted twice.

mod common;

use common::{now_seconds, pod_export, TestNode};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
