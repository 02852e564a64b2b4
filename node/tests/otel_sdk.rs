//! A real OTLP client written by someone else: the OpenTelemetry Rust SDK with its OTLP
//! exporters and Envoy AI Gateway's bucket bounds, as the gateway's own Go SDK exports them:
//! delta over gRPC, cumulative (the gateway's default) over OTLP/HTTP with protobuf and with
//! JSON, and access logs through the SDK's log exporter over OTLP/HTTP JSON and gRPC. Values
//! recorded through the SDK come back exact through the API.

mod common;

use common::TestNode;
use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::Resource;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_rules::testing::{gateway_bounds, gateway_unit};

/// The gateway pod's resource, in the SWIP-10 convention; without `service.instance.id` for an
/// empty `instance` (as the gateway's Go SDK sends it unless told one).
fn resource(instance: &str) -> Resource {
    let mut attributes =
        vec![KeyValue::new("service.name", "envoy-ai-gateway"), KeyValue::new("aigw.service", "sdk-gw")];
    if !instance.is_empty() {
        attributes.push(KeyValue::new("service.instance.id", instance.to_string()));
    }
    Resource::builder_empty().with_attributes(attributes).build()
}

fn provider(endpoint: &str, instance: &str) -> SdkMeterProvider {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_compression(opentelemetry_otlp::Compression::Gzip)
        .with_temporality(Temporality::Delta)
        .build()
        .expect("exporter");
    with_exporter(exporter, instance)
}

/// A meter provider that exports to `url` (the full `/v1/metrics` URL) over OTLP/HTTP with
/// `protocol`, cumulative.
fn http_provider(url: &str, protocol: Protocol, instance: &str) -> SdkMeterProvider {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_protocol(protocol)
        .with_temporality(Temporality::Cumulative)
        .build()
        .expect("exporter");
    with_exporter(exporter, instance)
}

fn with_exporter(exporter: opentelemetry_otlp::MetricExporter, instance: &str) -> SdkMeterProvider {
    // Export only when flushed, so the test decides what lands in one export.
    let reader = PeriodicReader::builder(exporter).with_interval(Duration::from_secs(3600)).build();
    SdkMeterProvider::builder().with_reader(reader).with_resource(resource(instance)).build()
}

/// A histogram with the gateway's unit and bucket bounds for `name`.
fn gateway_histogram(meter: &opentelemetry::metrics::Meter, name: &'static str) -> Histogram<f64> {
    meter.f64_histogram(name).with_unit(gateway_unit(name)).with_boundaries(gateway_bounds(name).to_vec()).build()
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
    let duration = gateway_histogram(&meter, "gen_ai.server.request.duration");
    let tokens = gateway_histogram(&meter, "gen_ai.client.token.usage");
    let ttft = gateway_histogram(&meter, "gen_ai.server.time_to_first_token");

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

/// The sum of `metric` of the service `sdk-gw` over the last ten minutes and the next two.
async fn total(node: &TestNode, metric: &str, query: &str) -> f64 {
    let now = common::now_seconds();
    let (status, body) = node
        .get(&format!("/api/v1/metrics/{metric}?service=sdk-gw&start={}&end={}{query}", now - 600, now + 120))
        .await;
    assert_eq!(status, 200, "{body}");
    body["series"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()))
        .sum()
}

/// Cumulative exports over OTLP/HTTP, as the gateway sends by default: each export repeats the
/// totals since the provider started; Tollgate counts the first whole (its start time is
/// recent) and then only what each export adds, and an export that adds nothing adds nothing.
async fn cumulative_over_http(protocol: Protocol) {
    let node = TestNode::start().await;
    let provider = http_provider(&format!("{}/v1/metrics", node.otlp_http()), protocol, "sdk-pod-http");
    let meter = provider.meter("envoyproxy/ai-gateway");
    let duration = gateway_histogram(&meter, "gen_ai.server.request.duration");
    let tokens = gateway_histogram(&meter, "gen_ai.client.token.usage");
    let input = attributes("gpt-4o", &[("gen_ai.token.type", "input")]);
    let output = attributes("gpt-4o", &[("gen_ai.token.type", "output")]);

    for seconds in [0.4, 1.1, 2.5] {
        duration.record(seconds, &attributes("gpt-4o", &[]));
    }
    tokens.record(1200.0, &input);
    tokens.record(300.0, &output);
    flush(&provider).await;
    assert_eq!(total(&node, "meter_envoy_ai_gw_request_cpm", "").await, 3.0);
    assert_eq!(total(&node, "meter_envoy_ai_gw_input_token_rate", "").await, 1200.0);

    // The second export carries the totals 5 requests and 2 000 input tokens.
    duration.record(0.8, &attributes("gpt-4o", &[]));
    duration.record(0.1, &attributes("gpt-4o", &[("error.type", "_OTHER")]));
    tokens.record(800.0, &input);
    flush(&provider).await;
    assert_eq!(total(&node, "meter_envoy_ai_gw_request_cpm", "").await, 5.0);
    assert_eq!(total(&node, "meter_envoy_ai_gw_error_cpm", "").await, 1.0);
    assert_eq!(total(&node, "meter_envoy_ai_gw_input_token_rate", "").await, 2000.0);
    assert_eq!(total(&node, "meter_envoy_ai_gw_output_token_rate", "").await, 300.0);
    // gpt-4o: 2.5 per million input tokens, 10 per million output tokens.
    assert_eq!(total(&node, "meter_envoy_ai_gw_estimated_cost", "").await, 2000.0 * 2.5 + 300.0 * 10.0);

    // Nothing recorded since: the same totals again add nothing.
    flush(&provider).await;
    assert_eq!(total(&node, "meter_envoy_ai_gw_request_cpm", "").await, 5.0);
    assert_eq!(total(&node, "meter_envoy_ai_gw_input_token_rate", "").await, 2000.0);
    let over_http = r#"tollgate_requests_total{protocol="http",signal="metrics",outcome="ok"}"#;
    assert_eq!(node.self_metric(over_http).await, 3.0, "three exports over OTLP/HTTP");
    assert_eq!(node.self_metric_opt("tollgate_points_rejected_total").await.unwrap_or(0.0), 0.0);
    provider.shutdown().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_opentelemetry_sdk_cumulative_exports_over_http_protobuf_are_exact() {
    cumulative_over_http(Protocol::HttpBinary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_opentelemetry_sdk_cumulative_exports_over_http_json_are_exact() {
    cumulative_over_http(Protocol::HttpJson).await;
}

/// Two pods of one gateway that set no `service.instance.id` send the very same cumulative
/// series, each with its own start time, their exports interleaved. Each pod's totals are kept
/// apart (by their start times), so every request is counted once: a reset at each change of
/// start time would count each pod's whole total again at each of its exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_opentelemetry_sdk_cumulative_pods_without_an_instance_id_are_each_counted_once() {
    let node = TestNode::start().await;
    let url = format!("{}/v1/metrics", node.otlp_http());
    let mut pods = Vec::new();
    for _ in 0..2 {
        let provider = http_provider(&url, Protocol::HttpBinary, "");
        let duration = gateway_histogram(&provider.meter("envoyproxy/ai-gateway"), "gen_ai.server.request.duration");
        // Each pod's start time is when it first records.
        duration.record(0.3, &attributes("gpt-4o", &[]));
        pods.push((provider, duration));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut recorded = 2;
    for round in 0..4 {
        for (pod, (provider, duration)) in pods.iter().enumerate() {
            for _ in 0..round + pod {
                duration.record(1.5, &attributes("gpt-4o", &[]));
                recorded += 1;
            }
            flush(provider).await;
        }
    }
    assert_eq!(recorded, 2 + (1 + 2 + 3) + (1 + 2 + 3 + 4), "pod 0 records 0 to 3 per round, pod 1 1 to 4");
    assert_eq!(total(&node, "meter_envoy_ai_gw_request_cpm", "").await, recorded as f64);
    assert_eq!(node.self_metric_opt("tollgate_points_rejected_total").await.unwrap_or(0.0), 0.0);
    for (provider, _) in pods {
        provider.shutdown().ok();
    }
}

/// Access logs through the SDK's log exporter: a failed request is kept with its attributes
/// and body, numbers sent as integers or as strings; a quick success is dropped; both feed the
/// log-derived request counts.
async fn access_logs(exporter: opentelemetry_otlp::LogExporter, node: &TestNode) {
    let now = std::time::SystemTime::now();
    // The SDK exports, flushes and drops its HTTP client on a thread that may block.
    let flushed = tokio::task::spawn_blocking(move || {
        let provider =
            SdkLoggerProvider::builder().with_simple_exporter(exporter).with_resource(resource("sdk-pod-logs")).build();
        let logger = provider.logger("envoy");
        let emit = |id: &str, code: opentelemetry::logs::AnyValue, duration: &str, input: i64, output: &str| {
            let mut record = logger.create_log_record();
            record.set_timestamp(now);
            record.set_observed_timestamp(now);
            record.set_body(format!("/v1/chat/completions model=gpt-4o {id}").into());
            record.add_attribute("x-request-id", id.to_string());
            record.add_attribute("response_code", code);
            record.add_attribute("duration", duration.to_string());
            record.add_attribute("gen_ai.request.model", "gpt-4o");
            record.add_attribute("gen_ai.response.model", "gpt-4o-2024-08-06");
            record.add_attribute("gen_ai.provider.name", "openai");
            record.add_attribute("gen_ai.usage.input_tokens", input);
            record.add_attribute("gen_ai.usage.output_tokens", output.to_string());
            record.add_attribute("upstream_transport_failure_reason", "-");
            logger.emit(record);
        };
        emit("kept-as-int", 503i64.into(), "812", 1500, "0");
        emit("kept-as-text", "429".into(), "35", 0, "0");
        emit("dropped", 200i64.into(), "950", 900, "120");
        emit("slow", "200".into(), "45000", 2000, "700");
        let result = provider.force_flush();
        provider.shutdown().ok();
        result
    });
    flushed.await.unwrap().expect("logs export accepted");

    let logs = node.all_logs("service=sdk-gw", 100).await;
    let ids: Vec<&str> = logs.iter().map(|l| l["attributes"]["x-request-id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec!["kept-as-int", "kept-as-text", "slow"], "{logs:?}");
    let by_id = |id: &str| logs.iter().find(|l| l["attributes"]["x-request-id"] == id).unwrap();
    let failed = by_id("kept-as-int");
    assert_eq!(failed["reasons"], json!(["error"]));
    assert_eq!(failed["response_code"], 503);
    assert_eq!(failed["duration_ms"], 812);
    assert_eq!(failed["input_tokens"], 1500);
    assert_eq!(failed["model"], "gpt-4o-2024-08-06");
    assert_eq!(failed["provider"], "openai");
    assert_eq!(failed["instance"], "sdk-pod-logs");
    assert_eq!(failed["body"], "/v1/chat/completions model=gpt-4o kept-as-int");
    assert_eq!(failed["attributes"]["response_code"], "503", "the original value as text");
    assert_eq!(
        failed["time"].as_u64().unwrap() / 1_000_000_000,
        now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    );
    assert_eq!(by_id("kept-as-text")["response_code"], 429);
    assert_eq!(by_id("slow")["reasons"], json!(["slow"]));
    assert_eq!(by_id("slow")["total_tokens"], 2700);
    // Every record, kept or not, is counted by status class.
    assert_eq!(total(node, "meter_envoy_ai_gw_log_request_cpm", "").await, 4.0);
    assert_eq!(node.self_metric(r#"tollgate_logs_kept_total{reason="error"}"#).await, 2.0);
    assert_eq!(node.self_metric(r#"tollgate_logs_kept_total{reason="slow"}"#).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_opentelemetry_sdk_access_logs_over_http_json_are_sampled() {
    let node = TestNode::start().await;
    let exporter = opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/logs", node.otlp_http()))
        .with_protocol(Protocol::HttpJson)
        .build()
        .expect("exporter");
    access_logs(exporter, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_opentelemetry_sdk_access_logs_over_grpc_are_sampled() {
    let node = TestNode::start().await;
    let exporter =
        opentelemetry_otlp::LogExporter::builder().with_tonic().with_endpoint(node.grpc()).build().expect("exporter");
    access_logs(exporter, &node).await;
}
