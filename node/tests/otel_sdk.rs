//! A real OTLP client written by someone else: the OpenTelemetry Rust SDK with its OTLP/gRPC
//! exporter, delta temporality and Envoy AI Gateway's bucket bounds, as the gateway's own Go SDK
//! exports them. Values recorded through the SDK come back exact through the API.

mod common;

use common::TestNode;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::Resource;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_rules::testing::gateway_bounds;

fn provider(endpoint: &str, instance: &str) -> SdkMeterProvider {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_compression(opentelemetry_otlp::Compression::Gzip)
        .with_temporality(Temporality::Delta)
        .build()
        .expect("exporter");
    // Export only when flushed, so the test decides what lands in one export.
    let reader = PeriodicReader::builder(exporter).with_interval(Duration::from_secs(3600)).build();
    let resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", "envoy-ai-gateway"),
            KeyValue::new("aigw.service", "sdk-gw"),
            KeyValue::new("service.instance.id", instance.to_string()),
        ])
        .build();
    SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build()
}

fn attributes(model: &str, extra: &[(&'static str, &'static str)]) -> Vec<KeyValue> {
    let mut out = vec![
        KeyValue::new("gen_ai.operation.name", "chat"),
        KeyValue::new("gen_ai.provider.name", "openai"),
        KeyValue::new("gen_ai.original.model", model.to_string()),
        KeyValue::new("gen_ai.request.model", model.to_string()),
        KeyValue::new("gen_ai.response.model", model.to_string()),
    ];
    out.extend(extra.iter().map(|(k, v)| KeyValue::new(*k, *v)));
    out
}

async fn flush(provider: &SdkMeterProvider) {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush().expect("export accepted")).await.unwrap();
}

/// The single minute holding data for `metric` and its value (the export happened in one minute).
async fn only_value(node: &TestNode, metric: &str, query: &str, labels: Value) -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (status, body) = node
        .get(&format!("/api/v1/metrics/{metric}?service=sdk-gw&start={}&end={}{query}", now - 600, now + 120))
        .await;
    assert_eq!(status, 200, "{body}");
    let series = body["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["labels"] == labels)
        .unwrap_or_else(|| panic!("{metric} {labels}: {body}"));
    let values: Vec<f64> = series["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).collect();
    assert_eq!(values.len(), 1, "{metric}: one minute with data expected: {body}");
    values[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_opentelemetry_sdk_delta_exports_are_exact() {
    let node = TestNode::start().await;
    let provider = provider(&node.grpc(), "sdk-pod-0");
    let meter = provider.meter("envoyproxy/ai-gateway");
    let duration = meter
        .f64_histogram("gen_ai.server.request.duration")
        .with_unit("s")
        .with_boundaries(gateway_bounds("gen_ai.server.request.duration").to_vec())
        .build();
    let tokens = meter
        .f64_histogram("gen_ai.client.token.usage")
        .with_unit("token")
        .with_boundaries(gateway_bounds("gen_ai.client.token.usage").to_vec())
        .build();
    let ttft = meter
        .f64_histogram("gen_ai.server.time_to_first_token")
        .with_unit("s")
        .with_boundaries(gateway_bounds("gen_ai.server.time_to_first_token").to_vec())
        .build();

    for seconds in [0.3, 0.9, 1.7, 5.5] {
        duration.record(seconds, &attributes("gpt-4o", &[]));
    }
    duration.record(0.05, &attributes("gpt-4o", &[("error.type", "_OTHER")]));
    tokens.record(1000.0, &attributes("gpt-4o", &[("gen_ai.token.type", "input")]));
    tokens.record(600.0, &attributes("gpt-4o", &[("gen_ai.token.type", "input")]));
    tokens.record(200.0, &attributes("gpt-4o", &[("gen_ai.token.type", "output")]));
    tokens.record(700.0, &attributes("llama3.2:latest", &[("gen_ai.token.type", "input")]));
    ttft.record(0.2, &attributes("gpt-4o", &[]));
    ttft.record(0.7, &attributes("gpt-4o", &[]));
    flush(&provider).await;

    let none = json!({});
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_request_cpm", "", none.clone()).await, 5.0);
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_error_cpm", "", none.clone()).await, 1.0);
    // (0.3 + 0.9 + 1.7 + 5.5 + 0.05) / 5 s in ms
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_request_latency_avg", "", none.clone()).await, 1690.0);
    // Ranks over {0.05, 0.3, 0.9, 1.7, 5.5}: p50 → 3rd value's bucket (0.64, 1.28] → 1280 ms;
    // p99 → 5th value's bucket (5.12, 10.24], capped at the observed max 5.5 s.
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_request_latency_percentile", "", json!({"p": "50"})).await, 1280.0);
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_request_latency_percentile", "", json!({"p": "99"})).await, 5500.0);
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_input_token_rate", "", none.clone()).await, 2300.0);
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_total_token_rate", "", none.clone()).await, 2500.0);
    // Built-in pricing (SkyWalking's gen-ai-config.yml): gpt-4o 2.5 in / 10 out per million.
    assert_eq!(
        only_value(&node, "meter_envoy_ai_gw_estimated_cost", "", none.clone()).await,
        1600.0 * 2.5 + 200.0 * 10.0
    );
    assert_eq!(
        only_value(&node, "meter_envoy_ai_gw_unpriced_token_rate", "", json!({"model": "llama3.2:latest"})).await,
        700.0
    );
    assert_eq!(only_value(&node, "meter_envoy_ai_gw_ttft_avg", "", none.clone()).await, 450.0);
    assert_eq!(
        only_value(
            &node,
            "meter_envoy_ai_gw_instance_model_request_cpm",
            "&instance=sdk-pod-0",
            json!({"model": "gpt-4o"})
        )
        .await,
        5.0
    );

    // A second delta export adds only what was recorded since the first.
    duration.record(2.0, &attributes("gpt-4o", &[]));
    flush(&provider).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (_, body) = node
        .get(&format!(
            "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=sdk-gw&start={}&end={}",
            now - 600,
            now + 120
        ))
        .await;
    let total: f64 = body["series"][0]["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).sum();
    assert_eq!(total, 6.0);
    provider.shutdown().ok();
}
