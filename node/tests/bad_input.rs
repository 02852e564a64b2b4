//! Bad input gets the documented answer, one bad point never costs the good points of its
//! request, overload is an explicit retryable error, and the node keeps serving.

mod common;

use bytes::{Buf, BufMut};
use common::TestNode;
use flate2::write::GzEncoder;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde_json::Value;
use std::io::Write;
use tollgate_rules::testing::{gateway_resource, string_attribute, Convention};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

const LIMIT: &str = "65536";

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn point(provider: &str, time: u64) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes: vec![string_attribute("gen_ai.provider.name", provider)],
        start_time_unix_nano: (time - 10) * 1_000_000_000,
        time_unix_nano: time * 1_000_000_000,
        count: 2,
        sum: Some(1.5),
        bucket_counts: vec![1, 1, 0],
        explicit_bounds: vec![0.5, 1.0],
        min: Some(0.4),
        max: Some(1.0),
        ..Default::default()
    }
}

fn request(resource: Resource, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics { metrics, ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn durations(points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: "gen_ai.server.request.duration".into(),
        data: Some(metric::Data::Histogram(Histogram { data_points: points, aggregation_temporality: 1 })),
        ..Default::default()
    }
}

fn gateway(service: &str) -> Resource {
    gateway_resource(Convention::JobName, service, Some("pod-0"))
}

/// Sends arbitrary bytes as a gRPC message.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;
#[derive(Clone, Copy, Debug, Default)]
struct RawEncoder;
#[derive(Clone, Copy, Debug, Default)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_grpc(node: &TestNode, bytes: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(node.grpc()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export");
    grpc.unary(tonic::Request::new(bytes), path, RawCodec).await.map(|r| r.into_inner())
}

/// One gRPC message frame sent as it is, with `grpc-encoding: gzip` (`compressed` sets the
/// frame's flag): the answer's `grpc-status` and `grpc-message`.
async fn grpc_frame(node: &TestNode, compressed: bool, payload: &[u8]) -> (Option<String>, String) {
    grpc_body(node, Some("gzip"), framed(compressed, payload)).await
}

/// `bytes` as one gzip member.
fn gzip_member(bytes: &[u8]) -> Vec<u8> {
    let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(bytes).unwrap();
    gzip.finish().unwrap()
}

/// gRPC's framing of one message: the compressed flag, the length, the message.
fn framed(compressed: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A gRPC request body sent as it is (with `grpc-encoding` if given): the answer's `grpc-status`
/// and `grpc-message`.
async fn grpc_body(node: &TestNode, encoding: Option<&str>, frame: Vec<u8>) -> (Option<String>, String) {
    use http_body_util::BodyExt;
    use tower::Service;
    let mut channel = tonic::transport::Endpoint::from_shared(node.grpc()).unwrap().connect().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("{}/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", node.grpc()))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(encoding) = encoding {
        request = request.header("grpc-encoding", encoding);
    }
    let request = request.body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame)))).unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let response = channel.call(request).await.unwrap();
    let headers = response.headers().clone();
    let trailers = response.into_body().collect().await.unwrap().trailers().cloned().unwrap_or_default();
    let get = |name: &str| headers.get(name).or(trailers.get(name)).map(|v| v.to_str().unwrap().to_string());
    (get("grpc-status"), get("grpc-message").unwrap_or_default())
}

async fn post(
    node: &TestNode,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let mut request =
        node.http.post(format!("{}{path}", node.otlp_http())).header("content-type", content_type).body(body);
    if let Some(encoding) = encoding {
        request = request.header("content-encoding", encoding);
    }
    let response = request.send().await.expect("otlp http reachable");
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

async fn request_cpm(node: &TestNode, service: &str, minute: u64) -> Option<f64> {
    node.value("meter_envoy_ai_gw_request_cpm", service, None, &serde_json::json!({}), minute as i64).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_malformed_and_oversized_requests_get_the_documented_answers() {
    let node = TestNode::start_with(&[("TOLLGATE_LIMITS_MAX_REQUEST_BYTES", LIMIT)], &[]).await;

    // Malformed protobuf over gRPC: INVALID_ARGUMENT (not INTERNAL, not retried by clients).
    let status = raw_grpc(&node, vec![0xff, 0xff, 0xff, 0x0f]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Oversized over gRPC: RESOURCE_EXHAUSTED.
    let status = raw_grpc(&node, vec![0u8; 70_000]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Malformed protobuf over HTTP: 400 with a google.rpc.Status in protobuf.
    let (code, body) = post(&node, "/v1/metrics", "application/x-protobuf", None, vec![0xff, 0xff, 0xff, 0x0f]).await;
    assert_eq!(code, 400);
    let status = RpcStatus::decode(body.as_slice()).unwrap();
    assert_eq!(status.code, 3);
    assert!(status.message.starts_with("malformed protobuf request"), "{}", status.message);
    // Malformed JSON: 400 with a JSON status.
    let (code, body) =
        post(&node, "/v1/metrics", "application/json", None, br#"{"resourceMetrics": [}"#.to_vec()).await;
    assert_eq!(code, 400);
    let status: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["code"], 3);
    assert!(status["message"].as_str().unwrap().starts_with("malformed JSON request"), "{status}");
    // Unknown content type and encoding.
    assert_eq!(post(&node, "/v1/logs", "text/plain", None, b"hello".to_vec()).await.0, 400);
    assert_eq!(post(&node, "/v1/logs", "application/json", Some("br"), b"{}".to_vec()).await.0, 400);
    // Oversized over HTTP: 413, also when only the decompressed body is too large.
    assert_eq!(post(&node, "/v1/metrics", "application/x-protobuf", None, vec![0u8; 70_000]).await.0, 413);
    let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::best());
    gzip.write_all(&vec![0u8; 1_000_000]).unwrap();
    let bomb = gzip.finish().unwrap();
    assert!(bomb.len() < 65_536);
    // The same over gRPC: inflating past the limit is RESOURCE_EXHAUSTED, a body that is not
    // gzip is malformed (tonic said INTERNAL).
    let too_large = r#"tollgate_requests_total{protocol="grpc",signal="metrics",outcome="too_large"}"#;
    let before = node.self_metric_opt(too_large).await.unwrap_or(0.0);
    let (status, message) = grpc_frame(&node, true, &bomb).await;
    assert_eq!(status.as_deref(), Some("8"), "{message}");
    // Too large (not retried), not the retryable overload.
    assert!(message.contains("once%20inflated"), "{message}");
    // Refused before its handler ran, and counted all the same.
    assert_eq!(node.self_metric_opt(too_large).await, Some(before + 1.0));
    // A body without a message is malformed (tonic said INTERNAL), and counted as such.
    let malformed = r#"tollgate_requests_total{protocol="grpc",signal="metrics",outcome="invalid_argument"}"#;
    let before = node.self_metric_opt(malformed).await.unwrap_or(0.0);
    let (status, message) = grpc_body(&node, None, Vec::new()).await;
    assert_eq!(status.as_deref(), Some("3"), "{message}");
    assert_eq!(node.self_metric_opt(malformed).await, Some(before + 1.0));
    let (status, message) = grpc_frame(&node, true, &[1, 2, 3]).await;
    assert_eq!(status.as_deref(), Some("3"), "{message}");
    assert!(message.starts_with("invalid%20gzip%20body"), "{message}");
    // A message cut short: its frame says 100 bytes, the request ends after 10 (tonic says
    // INTERNAL, which clients must not be told of a malformed request).
    let mut truncated = vec![0u8];
    truncated.extend_from_slice(&100u32.to_be_bytes());
    truncated.extend_from_slice(&[0u8; 10]);
    let (status, message) = grpc_body(&node, Some("gzip"), truncated).await;
    assert_eq!(status.as_deref(), Some("3"), "{message}");
    assert!(message.starts_with("Unexpected%20EOF"), "{message}");
    // A compressed flag gRPC does not define, and a message marked compressed in a request that
    // names no encoding: malformed (tonic said INTERNAL).
    let mut flag = framed(false, b"");
    flag[0] = 2;
    let (status, message) = grpc_body(&node, Some("gzip"), flag).await;
    assert_eq!(status.as_deref(), Some("3"), "{message}");
    assert!(message.contains("compressed%20flag%20is%202"), "{message}");
    let (status, message) = grpc_body(&node, None, framed(true, &gzip_member(b""))).await;
    assert_eq!(status.as_deref(), Some("3"), "{message}");
    assert!(message.contains("names%20no%20grpc-encoding"), "{message}");
    assert_eq!(post(&node, "/v1/metrics", "application/x-protobuf", Some("gzip"), bomb).await.0, 413);
    assert_eq!(post(&node, "/v1/metrics", "application/x-protobuf", Some("gzip"), vec![1, 2, 3]).await.0, 400);

    // Still serving: protobuf, gzip-compressed protobuf and JSON all land.
    let time = now_seconds() - 120;
    let minute = time / 60 * 60;
    let body = request(gateway("http-gw"), vec![durations(vec![point("a", time)])]).encode_to_vec();
    assert_eq!(post(&node, "/v1/metrics", "application/x-protobuf", None, body).await.0, 200);
    let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&request(gateway("http-gw"), vec![durations(vec![point("b", time)])]).encode_to_vec()).unwrap();
    assert_eq!(post(&node, "/v1/metrics", "application/x-protobuf", Some("gzip"), gzip.finish().unwrap()).await.0, 200);
    let json = serde_json::to_vec(&request(gateway("http-gw"), vec![durations(vec![point("c", time)])])).unwrap();
    let (code, body) = post(&node, "/v1/metrics", "application/json", None, json).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), serde_json::json!({}));
    assert_eq!(request_cpm(&node, "http-gw", minute).await, Some(6.0));
    // A gzip body of two members (`cat a.gz b.gz`) is one stream: both requests' data lands (only
    // the first did, and the answer was 200). Bytes after the last member are a malformed body.
    let member =
        |pod: &str| gzip_member(&request(gateway("gz-gw"), vec![durations(vec![point(pod, time)])]).encode_to_vec());
    let two_members = [member("first"), member("second")].concat();
    assert_eq!(post(&node, "/v1/metrics", "application/x-protobuf", Some("gzip"), two_members).await.0, 200);
    assert_eq!(request_cpm(&node, "gz-gw", minute).await, Some(4.0));
    let trailing = [member("third"), b"this is not gzip".to_vec()].concat();
    let (code, body) = post(&node, "/v1/metrics", "application/x-protobuf", Some("gzip"), trailing).await;
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert_eq!(request_cpm(&node, "gz-gw", minute).await, Some(4.0));
    // The same over gRPC, one message compressed as two members: both land (tonic read only the
    // first member, and answered OK); bytes after the last member are malformed.
    let two_members = [member("grpc-first"), member("grpc-second")].concat();
    let (status, message) = grpc_frame(&node, true, &two_members).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");
    assert_eq!(request_cpm(&node, "gz-gw", minute).await, Some(8.0));
    let trailing = [member("grpc-third"), b"this is not gzip".to_vec()].concat();
    let (status, message) = grpc_frame(&node, true, &trailing).await;
    assert_eq!(status.as_deref(), Some("3"), "{message}");
    assert_eq!(request_cpm(&node, "gz-gw", minute).await, Some(8.0));
    // An Export call of two messages, compressed or not: refused whole (tonic merged the first,
    // dropped the second unread and answered OK).
    let plain = |pod: &str| request(gateway("two-gw"), vec![durations(vec![point(pod, time)])]).encode_to_vec();
    for (encoding, compressed) in [(None, false), (Some("gzip"), false), (Some("gzip"), true)] {
        let message = |pod: &str| framed(compressed, &if compressed { gzip_member(&plain(pod)) } else { plain(pod) });
        let body = [message("first"), message("second")].concat();
        let (status, message) = grpc_body(&node, encoding, body).await;
        assert_eq!(status.as_deref(), Some("3"), "{encoding:?} {compressed}: {message}");
        assert!(message.contains("more%20than%20one%20message"), "{message}");
    }
    assert_eq!(request_cpm(&node, "two-gw", minute).await, None);
    let (status, message) = grpc_body(&node, None, framed(false, &plain("alone"))).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");
    assert_eq!(request_cpm(&node, "two-gw", minute).await, Some(2.0));
    let (code, _) = node.get("/healthz").await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_bad_points_are_rejected_with_reasons_and_good_points_kept() {
    let node = TestNode::start().await;
    let mut client = node.metrics_client(0).await;
    let time = now_seconds() - 120;
    let minute = time / 60 * 60;

    let mut wrong_buckets = point("wrong-buckets", time);
    wrong_buckets.bucket_counts = vec![1, 1];
    let mut not_adding_up = point("not-adding-up", time);
    not_adding_up.count = 5;
    let mut nan = point("nan", time);
    nan.sum = Some(f64::NAN);
    let future = point("future", now_seconds() + 3600);
    let gauge = Metric {
        name: "gen_ai.server.request.duration".into(),
        data: Some(metric::Data::Gauge(Gauge { data_points: vec![NumberDataPoint::default()] })),
        ..Default::default()
    };
    let unknown = Metric { name: "http.server.request.duration".into(), ..durations(vec![point("x", time)]) };
    let mut export = request(
        gateway("bad-gw"),
        vec![
            durations(vec![point("good-1", time), wrong_buckets, not_adding_up, nan, future, point("good-2", time)]),
            gauge,
            unknown,
        ],
    );
    // Not a gateway resource: accepted and dropped; a gateway resource without a name: rejected.
    export.resource_metrics.push(
        request(
            Resource { attributes: vec![string_attribute("service.name", "checkout")], ..Default::default() },
            vec![durations(vec![point("y", time)])],
        )
        .resource_metrics
        .remove(0),
    );
    export.resource_metrics.push(
        request(
            Resource { attributes: vec![string_attribute("job_name", "envoy-ai-gateway")], ..Default::default() },
            vec![durations(vec![point("z", time)])],
        )
        .resource_metrics
        .remove(0),
    );

    let response = client.export(export).await.expect("a partially bad request is still accepted").into_inner();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 6);
    let message = partial.error_message;
    assert!(message.starts_with("rejected 6 data points ("), "{message}");
    for reason in [
        "bucket_count_mismatch: 1",
        "bucket_sum_mismatch: 1",
        "non_finite_value: 1",
        "too_far_in_future: 1",
        "unsupported_type: 1",
        "missing_service: 1",
    ] {
        assert!(message.contains(reason), "{reason} missing from {message}");
    }
    assert!(message.contains("bucket_counts has 2 entries and explicit_bounds 2: expected 3"), "{message}");
    assert!(message.contains("bucket_counts add up to 2 but count is 5"), "{message}");
    assert_eq!(request_cpm(&node, "bad-gw", minute).await, Some(4.0), "the two good points are merged");

    // A point too late for its partition.
    let response = client
        .export(request(gateway("bad-gw"), vec![durations(vec![point("old", time - 1200)])]))
        .await
        .unwrap()
        .into_inner();
    let partial = response.partial_success.expect("too late");
    assert!(partial.error_message.contains("too_late: 1"), "{}", partial.error_message);

    let metrics = node.self_metrics().await;
    for line in [
        r#"tollgate_points_rejected_total{reason="bucket_count_mismatch",protocol="grpc"} 1"#,
        r#"tollgate_points_rejected_total{reason="too_late",protocol="grpc"} 1"#,
        r#"tollgate_points_dropped_total{reason="not_gateway"} 1"#,
        r#"tollgate_points_dropped_total{reason="unknown_metric"} 1"#,
        "tollgate_points_late_total 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics:\n{metrics}");
    }
}

/// OTLP/JSON as protobuf's JSON mapping also writes it: an enum by its name, a non-finite double
/// as a string. The bad points are rejected with their reasons and the good ones kept; before,
/// the whole histogram was dropped and the export answered `{}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_json_bad_points_are_rejected_with_reasons_and_good_points_kept() {
    let node = TestNode::start().await;
    let time = now_seconds() - 120;
    let minute = time / 60 * 60;
    let point = |provider: &str, sum: &str, bounds: &str| {
        format!(
            r#"{{"attributes":[{{"key":"gen_ai.provider.name","value":{{"stringValue":"{provider}"}}}}],
              "startTimeUnixNano":"{start}","timeUnixNano":"{time}","count":"2","sum":{sum},
              "bucketCounts":["1","1","0"],"explicitBounds":{bounds},"min":0.4,"max":1.0}}"#,
            start = (time - 10) * 1_000_000_000,
            time = time * 1_000_000_000,
        )
    };
    let export = |temporality: &str, points: &[String]| {
        format!(
            r#"{{"resourceMetrics":[{{"resource":{{"attributes":[
                {{"key":"job_name","value":{{"stringValue":"envoy-ai-gateway"}}}},
                {{"key":"service.name","value":{{"stringValue":"json-gw"}}}},
                {{"key":"service.instance.id","value":{{"stringValue":"pod-0"}}}}]}},
              "scopeMetrics":[{{"metrics":[{{"name":"gen_ai.server.request.duration","unit":"s",
                "histogram":{{"aggregationTemporality":{temporality},"dataPoints":[{}]}}}}]}}]}}]}}"#,
            points.join(",")
        )
    };
    let body = export(
        r#""AGGREGATION_TEMPORALITY_DELTA""#,
        &[
            point("good-1", "1.5", "[0.5,1.0]"),
            point("nan", r#""NaN""#, "[0.5,1.0]"),
            point("infinite-bound", "1.5", r#"[0.5,"Infinity"]"#),
            point("good-2", r#""1.5""#, r#"["0.5",1]"#),
        ],
    );
    let (code, body) = post(&node, "/v1/metrics", "application/json", None, body.into_bytes()).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let response: Value = serde_json::from_slice(&body).unwrap();
    // An int64, so a string in protobuf's JSON mapping.
    assert_eq!(response["partialSuccess"]["rejectedDataPoints"], "2", "{response}");
    let message = response["partialSuccess"]["errorMessage"].as_str().unwrap();
    assert!(message.contains("non_finite_value: 1") && message.contains("sum is NaN"), "{message}");
    assert!(message.contains("invalid_bounds: 1") && message.contains("explicit_bounds[1] is inf"), "{message}");
    assert_eq!(request_cpm(&node, "json-gw", minute).await, Some(4.0), "the two good points are merged");

    // A field that does not parse is a 400 that says which and where; nothing is merged.
    let body = export(r#""DELTA""#, &[point("good-3", "1.5", "[0.5,1.0]")]);
    let (code, body) = post(&node, "/v1/metrics", "application/json", None, body.into_bytes()).await;
    assert_eq!(code, 400);
    let status: Value = serde_json::from_slice(&body).unwrap();
    let message = status["message"].as_str().unwrap();
    assert!(message.contains(r#""DELTA" is not an aggregation temporality"#), "{message}");
    assert!(message.contains(" at line "), "{message}");
    assert_eq!(request_cpm(&node, "json-gw", minute).await, Some(4.0));
}

/// A node whose requests and in-flight budget are both limited to 200 000 bytes.
async fn start_with_a_200_kb_budget() -> TestNode {
    TestNode::start_with(
        &[("TOLLGATE_LIMITS_MAX_REQUEST_BYTES", "200000"), ("TOLLGATE_LIMITS_MAX_INFLIGHT_BYTES", "200000")],
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_flood_beyond_the_inflight_budget_gets_retryable_errors_and_the_node_keeps_serving() {
    let node = start_with_a_200_kb_budget().await;
    let time = now_seconds() - 120;
    // Each request is well under the request limit but together they exceed the budget.
    let big = |n: u64| {
        let points = (0..400).map(|i| point(&format!("p{n}-{i}"), time)).collect();
        request(gateway("flood-gw"), vec![durations(points)])
    };
    assert!(big(0).encoded_len() > 20_000);
    let client = node.metrics_client(0).await;
    let attempts = (0..64).map(|n| {
        let mut client = client.clone();
        let export = big(n);
        async move { client.export(export).await }
    });
    let results = futures_join_all(attempts).await;
    let overloaded: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert!(accepted > 0, "some requests fit the budget");
    assert!(!overloaded.is_empty(), "64 concurrent requests of 20+ KB exceed a 200 KB budget");
    for status in &overloaded {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("max_inflight_bytes"), "{status:?}");
        // OTLP clients retry RESOURCE_EXHAUSTED only with RetryInfo in the details.
        use tonic_types::StatusExt;
        assert!(status.get_details_retry_info().is_some(), "{status:?}");
    }
    // Every refusal is counted, those of a body over the budget (before the handler ran) too.
    let counted =
        node.self_metric(r#"tollgate_requests_total{protocol="grpc",signal="metrics",outcome="overloaded"}"#).await;
    assert_eq!(counted, overloaded.len() as f64);
    // The node keeps serving once the flood is over, and counted what it refused.
    let mut client = node.metrics_client(1).await;
    client.export(big(1000)).await.expect("accepted after the flood");
    assert!(node.self_metrics().await.contains(r#"tollgate_overload_total{what="inflight_bytes"}"#));
    // Every message the owners took was pushed into their intake first, maintenance ticks too.
    let pushed = node.self_metric("tollgate_owner_intake_pushed_total").await;
    let popped = node.self_metric("tollgate_owner_intake_popped_total").await;
    assert!(popped > 0.0 && popped <= pushed, "pushed {pushed}, popped {popped}");
}

/// One request within `limits.max_request_bytes` fits on an idle node even when
/// `limits.max_inflight_bytes` equals it: its wire, inflated and decoded bytes are charged to one
/// permit, capped at the whole budget. Charged as two permits, a gRPC request over half the
/// budget was refused as overloaded at every retry, plain or gzip, while OTLP/HTTP took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_one_request_within_the_request_limit_fits_a_budget_of_the_same_size() {
    let node = start_with_a_200_kb_budget().await;
    let time = now_seconds() - 120;
    let export = |service: &str| {
        request(gateway(service), vec![durations((0..1300).map(|i| point(&format!("p{i}"), time)).collect())])
    };
    let plain = export("whole-gw");
    assert!((150_000..200_000).contains(&plain.encoded_len()), "{}", plain.encoded_len());
    let mut client = node.metrics_client(0).await;
    client.export(plain).await.expect("a request within the limit fits an idle node");
    let (status, message) = grpc_frame(&node, true, &gzip_member(&export("whole-gz-gw").encode_to_vec())).await;
    assert_eq!(status.as_deref(), Some("0"), "{message}");
    let minute = time - time % 60;
    assert_eq!(request_cpm(&node, "whole-gw", minute).await, Some(2600.0));
    assert_eq!(request_cpm(&node, "whole-gz-gw", minute).await, Some(2600.0));
    assert_eq!(node.self_metric("tollgate_inflight_bytes").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_request_is_charged_to_the_budget_while_its_body_is_still_arriving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = start_with_a_200_kb_budget().await;
    // A slow OTLP/HTTP upload: 180 000 of its 199 000 bytes sent, the rest still to come.
    let mut upload = partial_upload(&node, 199_000, 180_000).await;

    // Meanwhile a 21 KB export does not fit, over gRPC or HTTP: refused at once, retryably.
    let time = now_seconds() - 120;
    let export =
        request(gateway("slow-gw"), vec![durations((0..400).map(|i| point(&format!("p{i}"), time)).collect())]);
    assert!(export.encoded_len() > 21_000);
    let mut client = node.metrics_client(0).await;
    let status = client.export(export.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_inflight_bytes"), "{status:?}");
    use tonic_types::StatusExt;
    assert!(status.get_details_retry_info().is_some(), "{status:?}");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/metrics", node.otlp_http()))
        .header("content-type", "application/x-protobuf")
        .body(export.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));

    // The upload ends (as garbage: 400); its bytes are returned and the export fits again.
    upload.write_all(&vec![0u8; 19_000]).await.unwrap();
    let mut answer = vec![0u8; 12];
    upload.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 400", "{}", String::from_utf8_lossy(&answer));
    client.export(export).await.expect("accepted once the upload is over");
    assert_eq!(node.self_metric("tollgate_inflight_bytes").await, 0.0);
}

/// An upload that stops halfway is cut off once `limits.body_timeout_ms` passes, over HTTP (503,
/// retryable) and gRPC (`DEADLINE_EXCEEDED`), and the budget it held is released: stalled uploads held it as
/// long as their connections stayed open, and every other export was refused as overloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_stalled_upload_is_cut_off_and_releases_the_budget() {
    use tokio::io::AsyncReadExt;
    use tower::Service;
    let node = TestNode::start_with(
        &[
            ("TOLLGATE_LIMITS_MAX_REQUEST_BYTES", "200000"),
            ("TOLLGATE_LIMITS_MAX_INFLIGHT_BYTES", "200000"),
            ("TOLLGATE_LIMITS_BODY_TIMEOUT_MS", "1500"),
        ],
        &[],
    )
    .await;
    let time = now_seconds() - 120;
    let export =
        request(gateway("stall-gw"), vec![durations((0..400).map(|i| point(&format!("p{i}"), time)).collect())]);
    let mut client = node.metrics_client(0).await;

    // OTLP/HTTP: 180 000 of 199 000 bytes, then nothing.
    let mut upload = partial_upload(&node, 199_000, 180_000).await;
    assert_eq!(client.export(export.clone()).await.unwrap_err().code(), Code::ResourceExhausted);
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), upload.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the stalled upload was never answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("limits.body_timeout_ms"), "{answer}");
    assert_eq!(node.self_metric("tollgate_inflight_bytes").await, 0.0);
    client.export(export.clone()).await.expect("accepted once the stalled upload is cut off");

    // OTLP/gRPC: a message frame of 180 000 bytes of which 150 000 come, on a stream kept open.
    let mut channel = tonic::transport::Endpoint::from_shared(node.grpc()).unwrap().connect().await.unwrap();
    let (frames, stream) = tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>(4);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&180_000u32.to_be_bytes());
    frame.extend_from_slice(&vec![0u8; 150_000]);
    frames.send(Ok(http_body::Frame::data(bytes::Bytes::from(frame)))).await.unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(stream));
    let call = http::Request::builder()
        .method("POST")
        .uri(format!("{}/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", node.grpc()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let response = tokio::time::timeout(std::time::Duration::from_secs(20), channel.call(call))
        .await
        .expect("the stalled stream was never answered")
        .unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a trailers-only answer");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("limits.body_timeout_ms"), "{status:?}");
    drop(frames);
    assert_eq!(node.self_metric("tollgate_inflight_bytes").await, 0.0);
    client.export(export).await.expect("accepted once the stalled stream is cut off");
}

/// An OTLP/HTTP upload declaring `declared` bytes of which `sent` were sent, once the node charged
/// them to its in-flight budget; the connection stays open.
async fn partial_upload(node: &TestNode, declared: usize, sent: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut upload = tokio::net::TcpStream::connect(node.endpoints.otlp_http).await.unwrap();
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nhost: tollgate\r\ncontent-type: application/x-protobuf\r\ncontent-length: {declared}\r\n\r\n"
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&vec![0u8; sent]).await.unwrap();
    let started = std::time::Instant::now();
    while node.self_metric_opt("tollgate_inflight_bytes").await.unwrap_or(0.0) < sent as f64 {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the arriving body was never charged");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    upload
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

/// A retried export is merged once, also when the lateness window grew since the series forgot
/// its point: shortened, the window made the series forget the point's key; lengthened again, it
/// let the retry through as a new point, and its minute counted it twice. Across a restart too:
/// the series' cursor stores when it forgot keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_retry_is_not_merged_again_after_the_lateness_window_grew() {
    let mut node = TestNode::start().await;
    let now = now_seconds();
    let late = now - 180;
    let export = request(gateway("window-gw"), vec![durations(vec![point("openai", late)])]);
    let mut client = node.metrics_client(0).await;
    for _ in 0..2 {
        let response = client.export(export.clone()).await.unwrap().into_inner();
        assert!(response.partial_success.is_none(), "{response:?}");
    }
    assert_eq!(request_cpm(&node, "window-gw", late / 60 * 60).await, Some(2.0));

    let (status, body) = node.put("/api/v1/config/rules", "normalize:\n  max_lateness_seconds: 0\n", None).await;
    assert_eq!(status, 200, "{body}");
    let current = request(gateway("window-gw"), vec![durations(vec![point("openai", now)])]);
    let response = client.export(current).await.unwrap().into_inner();
    assert!(response.partial_success.is_none(), "{response:?}");
    let (status, body) = node.put("/api/v1/config/rules", "normalize:\n  max_lateness_seconds: 600\n", None).await;
    assert_eq!(status, 200, "{body}");
    node.restart().await;

    let mut client = node.metrics_client(0).await;
    let response = client.export(export).await.unwrap().into_inner();
    let partial = response.partial_success.expect("the retried point is rejected");
    assert_eq!(partial.rejected_data_points, 1, "{partial:?}");
    assert!(partial.error_message.contains("too_late"), "{partial:?}");
    assert_eq!(request_cpm(&node, "window-gw", late / 60 * 60).await, Some(2.0));
    assert_eq!(request_cpm(&node, "window-gw", now / 60 * 60).await, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cardinality_limit_spans_the_instances_of_a_service() {
    let node = TestNode::start().await;
    let (status, body) = node.put("/api/v1/config/rules", "normalize:\n  max_series_per_service: 3\n", None).await;
    assert_eq!(status, 200, "{body}");
    let mut client = node.metrics_client(0).await;
    let time = now_seconds() - 60;
    // Five pods of one service: their series live in different vnodes (owners).
    let mut rejected = 0;
    for pod in 0..5 {
        let resource = gateway_resource(Convention::JobName, "wide-gw", Some(&format!("pod-{pod}")));
        let response =
            client.export(request(resource, vec![durations(vec![point("openai", time)])])).await.unwrap().into_inner();
        if let Some(partial) = response.partial_success {
            assert!(partial.error_message.contains("cardinality_limit: 1"), "{}", partial.error_message);
            rejected += partial.rejected_data_points;
        }
    }
    assert_eq!(rejected, 2);
    // Live series keep working at the limit; other services are not affected.
    let resource = gateway_resource(Convention::JobName, "wide-gw", Some("pod-0"));
    let response =
        client.export(request(resource, vec![durations(vec![point("openai", time + 1)])])).await.unwrap().into_inner();
    assert!(response.partial_success.is_none());
    let resource = gateway_resource(Convention::JobName, "narrow-gw", Some("pod-9"));
    let response =
        client.export(request(resource, vec![durations(vec![point("openai", time)])])).await.unwrap().into_inner();
    assert!(response.partial_success.is_none());
}

/// The node's own limit (`limits.max_series`) bounds the series it holds in memory whatever
/// their services: new series beyond it are rejected with their reason, live ones keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_node_series_limit_bounds_new_series_of_every_service() {
    let node = TestNode::start_with(&[("TOLLGATE_LIMITS_MAX_SERIES", "4")], &[]).await;
    let mut client = node.metrics_client(0).await;
    let time = now_seconds() - 60;
    let mut rejected = 0;
    for service in 0..3 {
        for pod in 0..2 {
            let resource = gateway_resource(Convention::JobName, &format!("gw-{service}"), Some(&format!("pod-{pod}")));
            let response = client
                .export(request(resource, vec![durations(vec![point("openai", time)])]))
                .await
                .unwrap()
                .into_inner();
            if let Some(partial) = response.partial_success {
                let message = partial.error_message;
                assert!(message.contains("cardinality_limit: 1"), "{message}");
                assert!(message.contains("this node already holds 4 series (limits.max_series)"), "{message}");
                rejected += partial.rejected_data_points;
            }
        }
    }
    assert_eq!(rejected, 2, "six new series, room for four");
    assert_eq!(node.self_metric("tollgate_series_active").await, 4.0);
    let resource = gateway_resource(Convention::JobName, "gw-0", Some("pod-0"));
    let response =
        client.export(request(resource, vec![durations(vec![point("openai", time + 1)])])).await.unwrap().into_inner();
    assert!(response.partial_success.is_none(), "a live series at the limit: {:?}", response.partial_success);
}

/// A series that is not in memory counts against the limits when it comes back, stored or not:
/// otherwise the series a node read back from its store (after a restart, or after they were idle
/// for two lateness windows) would take it past `limits.max_series` and a service past
/// `max_series_per_service`, which bound the memory they take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_series_read_back_from_the_store_count_against_the_limits() {
    let mut node = TestNode::start_with(&[("TOLLGATE_LIMITS_MAX_SERIES", "4")], &[]).await;
    let mut client = node.metrics_client(0).await;
    let time = now_seconds() - 120;
    let export = |service: &str, pod: usize, time: u64| {
        let resource = gateway_resource(Convention::JobName, service, Some(&format!("pod-{pod}")));
        request(resource, vec![durations(vec![point("openai", time)])])
    };
    for pod in 0..4 {
        let response = client.export(export("old-gw", pod, time)).await.unwrap().into_inner();
        assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
    }
    // After a restart nothing is in memory: four new series fill the node.
    node.restart().await;
    let mut client = node.metrics_client(0).await;
    for pod in 0..4 {
        let response = client.export(export("new-gw", pod, time)).await.unwrap().into_inner();
        assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
    }
    // A stored series of before the restart finds the node full, as a new one would.
    let response = client.export(export("old-gw", 0, time + 60)).await.unwrap().into_inner();
    let partial = response.partial_success.expect("the stored series is refused");
    assert_eq!(partial.rejected_data_points, 1);
    assert!(partial.error_message.contains("this node already holds 4 series (limits.max_series)"), "{partial:?}");
    assert_eq!(node.self_metric("tollgate_series_active").await, 4.0);
    // Its minute of before the restart is still there: the refusal lost nothing stored.
    let (sum, _) = common::sum_of(&node, "meter_envoy_ai_gw_request_cpm", "old-gw", time - 60, time + 120).await;
    assert_eq!(sum, 8.0, "four pods of two requests");

    // With room again (a higher per-node limit), the stored series comes back and merges on.
    node.set_env("TOLLGATE_LIMITS_MAX_SERIES", "5");
    node.restart().await;
    let mut client = node.metrics_client(0).await;
    let response = client.export(export("old-gw", 0, time + 60)).await.unwrap().into_inner();
    assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
    let (sum, _) = common::sum_of(&node, "meter_envoy_ai_gw_request_cpm", "old-gw", time - 60, time + 120).await;
    assert_eq!(sum, 10.0);
}
