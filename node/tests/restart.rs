//! `kill -9` during a stream of exports, restart, resend everything: nothing acknowledged is lost
//! and nothing is counted twice.

mod common;

use common::TestNode;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate_rules::testing::{gateway_bounds, gateway_resource, string_attribute, Convention};

const EXPORTS: u64 = 400;
const PODS: u64 = 2;

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Export `k` of pod `pod`: delta request durations for three providers, and a cumulative input
/// token series. Returns the request, its request count and its cumulative token total.
fn export(base: u64, pod: u64, k: u64) -> (ExportMetricsServiceRequest, u64) {
    let time = base + k;
    let bounds = gateway_bounds("gen_ai.server.request.duration").to_vec();
    let mut durations = Vec::new();
    let mut requests = 0;
    for provider in ["openai", "anthropic", "deepseek"] {
        let count = (k + pod) % 3 + 1;
        requests += count;
        let mut buckets = vec![0u64; bounds.len() + 1];
        let slot = (k as usize) % buckets.len();
        buckets[slot] = count;
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
            min: Some(0.5),
            max: Some(0.5),
            ..Default::default()
        });
    }
    // Cumulative tokens: 100·(1 + 2 + … + (k+1)) since the series started at `base − 1`.
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
    let histogram = |name: &str, points, temporality| Metric {
        name: name.into(),
        data: Some(metric::Data::Histogram(Histogram { data_points: points, aggregation_temporality: temporality })),
        ..Default::default()
    };
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(gateway_resource(Convention::AigwService, "restart-gw", Some(&format!("pod-{pod}")))),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    histogram("gen_ai.server.request.duration", durations, 1),
                    histogram("gen_ai.client.token.usage", vec![tokens], 2),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    (request, requests)
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
