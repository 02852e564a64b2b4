//! Configuration over the API and the command line: versions, validation, bearer tokens, changes
//! applied at runtime; the query API's parameter errors; and what `tollgate serve` sets for its
//! own process.

mod common;

use common::TestNode;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
};
use serde_json::{json, Value};
use std::process::Command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_rules::testing::{gateway_bounds, gateway_resource, string_attribute, Convention};

const TOKEN: &str = "s3cret-token";

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn input_tokens(model: &str, time: u64, tokens: f64) -> ExportMetricsServiceRequest {
    let bounds = gateway_bounds("gen_ai.client.token.usage").to_vec();
    let mut buckets = vec![0; bounds.len() + 1];
    buckets[8] = 1;
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(gateway_resource(Convention::AigwService, "cfg-gw", Some("pod-0"))),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "gen_ai.client.token.usage".into(),
                    data: Some(metric::Data::Histogram(Histogram {
                        aggregation_temporality: 1,
                        data_points: vec![HistogramDataPoint {
                            attributes: vec![
                                string_attribute("gen_ai.token.type", "input"),
                                string_attribute("gen_ai.response.model", model),
                                string_attribute("gen_ai.provider.name", "acme"),
                            ],
                            start_time_unix_nano: (time - 5) * 1_000_000_000,
                            time_unix_nano: time * 1_000_000_000,
                            count: 1,
                            sum: Some(tokens),
                            bucket_counts: buckets,
                            explicit_bounds: bounds,
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn cli(node: &TestNode, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--api", &node.api()])
        .args(args)
        .env_remove("TOLLGATE_API_TOKEN")
        .output()
        .expect("the CLI runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_pricing_and_rules_are_versioned_validated_protected_and_applied_at_runtime() {
    let node = TestNode::start_with(&[("TOLLGATE_API_TOKEN", TOKEN)], &[]).await;

    // The built-in documents, version 0.
    let (status, body) = node.get("/api/v1/config/pricing").await;
    assert_eq!(status, 200);
    assert_eq!(body["version"], 0);
    assert_eq!(body["document"]["providers"].as_array().unwrap().len(), 12);
    // A single node leads its own cluster and is up to date by definition.
    assert_eq!(body["freshness"]["up_to_date"], true, "{}", body["freshness"]);
    assert!(body["freshness"]["applied_index"].as_u64().is_some_and(|i| i > 0), "{}", body["freshness"]);
    let (_, rules) = node.get("/api/v1/config/rules").await;
    assert_eq!(rules["version"], 0);
    assert_eq!(rules["document"]["sampling"]["token_threshold"], 10000);

    let pricing = "providers:\n  - provider: acme\n    models:\n      - name: acme-large\n        input-estimated-cost-per-m: 2\n";
    // Writes need the token.
    let (status, body) = node.put("/api/v1/config/pricing", pricing, None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = node.put("/api/v1/config/pricing", pricing, Some("wrong")).await;
    assert_eq!(status, 401);
    // Invalid documents are refused with the field named, and nothing changes.
    let (status, body) = node
        .put(
            "/api/v1/config/pricing",
            "providers:\n  - provider: acme\n    models:\n      - name: x\n        input-estimated-cost-per-m: -2\n",
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("providers[0].models[0].input-estimated-cost-per-m"), "{body}");
    let (status, body) = node.put("/api/v1/config/rules", "sampling:\n  token_threshold: lots\n", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(node.get("/api/v1/config/pricing").await.1["version"], 0);

    // Merges before the change use the old prices (acme-large is unpriced), after it the new.
    let base = now_seconds() - 180;
    let minute = |t: u64| (t / 60 * 60) as i64;
    let mut client = node.metrics_client(0).await;
    client.export(input_tokens("acme-large-v2", base - 60, 1000.0)).await.unwrap();
    let (status, body) = node.put("/api/v1/config/pricing", pricing, Some(TOKEN)).await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(1)), "{body}");
    client.export(input_tokens("acme-large-v2", base, 1000.0)).await.unwrap();
    let no_labels = json!({});
    let cost = |t| node.value("meter_envoy_ai_gw_estimated_cost", "cfg-gw", None, &no_labels, minute(t));
    assert_eq!(cost(base - 60).await, Some(0.0), "history keeps the cost of its time");
    assert_eq!(cost(base).await, Some(2000.0));
    let model = json!({"model": "acme-large-v2"});
    let unpriced = |t| node.value("meter_envoy_ai_gw_unpriced_token_rate", "cfg-gw", None, &model, minute(t));
    assert_eq!(unpriced(base - 60).await, Some(1000.0));
    assert_eq!(unpriced(base).await, None);

    // YAML read with the version in a header; media types are case-insensitive.
    for accept in ["application/yaml", "application/YAML"] {
        let response = node
            .http
            .get(format!("{}/api/v1/config/pricing", node.api()))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-tollgate-config-version"], "1");
        let text = response.text().await.unwrap();
        assert!(text.contains("acme-large") && !text.starts_with('{'), "{accept}: {text}");
    }

    // The command line, with and without the token.
    let (ok, stdout, _) = cli(&node, &["pricing", "get"]);
    assert!(ok && stdout.starts_with("# pricing version 1\n") && stdout.contains("acme-large"), "{stdout}");
    let file = node.dir.join("rules.yaml");
    std::fs::write(&file, "sampling:\n  slow_threshold_ms: 1000\n").unwrap();
    let (ok, _, stderr) = cli(&node, &["rules", "set", file.to_str().unwrap()]);
    assert!(!ok && stderr.contains("401"), "{stderr}");
    let (ok, stdout, stderr) = cli(&node, &["--token", TOKEN, "rules", "set", file.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "rules version 1");
    assert_eq!(node.get("/api/v1/config/rules").await.1["document"]["sampling"]["slow_threshold_ms"], 1000);
    let (ok, stdout, _) = cli(
        &node,
        &[
            "query",
            "meter_envoy_ai_gw_estimated_cost",
            "--service",
            "cfg-gw",
            "--start",
            &(base - 120).to_string(),
            "--json",
        ],
    );
    assert!(ok);
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["name"], "meter_envoy_ai_gw_estimated_cost");
    let (ok, stdout, _) = cli(&node, &["services"]);
    assert!(ok && stdout.contains("cfg-gw") && stdout.contains("pod-0"), "{stdout}");
    // A metric name is one path segment: a `#`, `?` or `/` in it does not make it another request
    // (the first two queried the metric before them, the third reached /api/v1/services).
    for name in ["meter_envoy_ai_gw_request_cpm#frag", "meter_envoy_ai_gw_request_cpm?x=1", "../services"] {
        let (ok, _, stderr) = cli(&node, &["query", name, "--service", "cfg-gw"]);
        assert!(!ok && stderr.contains(&format!("no metric named {name:?}")), "{name}: {stderr}");
    }
    // Listing takes no query options (it said that a metric was required).
    let (ok, _, stderr) = cli(&node, &["query", "--list", "--service", "cfg-gw"]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_query_api_answers_and_parameter_errors() {
    let node = TestNode::start().await;
    let (status, catalogue) = node.get("/api/v1/metrics").await;
    assert_eq!(status, 200);
    let entries = catalogue.as_array().unwrap();
    assert_eq!(entries.len(), 76);
    assert!(entries.contains(&json!({"name": "meter_envoy_ai_gw_instance_model_token_rate", "unit": "tokens/min", "scope": "instance", "labels": ["model", "token_type"]})));

    let base = now_seconds() - 120;
    node.metrics_client(0).await.export(input_tokens("gpt-4o", base, 500.0)).await.unwrap();
    let (_, services) = node.get("/api/v1/services").await;
    assert_eq!(services["services"][0]["name"], "cfg-gw");
    assert_eq!(services["services"][0]["layer"], "ENVOY_AI_GATEWAY");
    assert_eq!(services["services"][0]["instances"][0]["name"], "pod-0");
    assert_eq!(services["services"][0]["instances"][0]["last_seen"], base);

    let hour = (base / 3600 * 3600) as i64;
    let (status, body) = node
        .get(&format!(
            "/api/v1/metrics/meter_envoy_ai_gw_input_token_rate?service=cfg-gw&start={hour}&end={}&step=hour",
            hour + 3600
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["step"], "hour");
    // A rate over an hour is the per-minute average: 500 tokens / 60 minutes.
    assert_eq!(body["series"][0]["points"], json!([[hour, (500.0f64 / 60.0 * 1e6).round() / 1e6]]));
    let rfc3339 = "2026-01-01T00:00:00Z";
    let (status, body) = node
        .get(&format!(
            "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start={rfc3339}&end=2026-01-01T00:03:00Z"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["series"][0]["points"].as_array().unwrap().len(), 3);
    // Without data: a metric without labels has its series, a percentile metric one per rank, a
    // metric labelled by the data none (as docs/api.md says).
    let window = format!("service=no-data-gw&start={rfc3339}&end=2026-01-01T00:02:00Z");
    let labels = |body: &Value| -> Vec<Value> {
        let series = body["series"].as_array().unwrap();
        assert!(series.iter().all(|s| s["points"].as_array().unwrap().iter().all(|p| p[1].is_null())), "{body}");
        series.iter().map(|s| s["labels"].clone()).collect()
    };
    let (_, empty) = node.get(&format!("/api/v1/metrics/meter_envoy_ai_gw_request_cpm?{window}")).await;
    assert_eq!(labels(&empty), [json!({})]);
    let (_, empty) = node.get(&format!("/api/v1/metrics/meter_envoy_ai_gw_request_latency_percentile?{window}")).await;
    let ranks = ["50", "75", "90", "95", "99"].map(|p| json!({ "p": p }));
    assert_eq!(labels(&empty), ranks);
    let (_, empty) = node.get(&format!("/api/v1/metrics/meter_envoy_ai_gw_provider_request_cpm?{window}")).await;
    assert_eq!(labels(&empty), Vec::<Value>::new());
    // A single node answers for everything: partial=false changes nothing.
    let all_or_nothing = format!(
        "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start={rfc3339}&end=2026-01-01T00:03:00Z&partial=false"
    );
    assert_eq!(node.get(&all_or_nothing).await, (status, body));
    // SPEC §3's name of an MCP instance metric answers as SkyWalking's.
    let (spec_name, spec_body) =
        node.get("/api/v1/metrics/meter_envoy_ai_gw_instance_mcp_request_cpm?service=cfg-gw&instance=p").await;
    let (upstream_name, upstream_body) =
        node.get("/api/v1/metrics/meter_envoy_ai_gw_mcp_instance_request_cpm?service=cfg-gw&instance=p").await;
    assert_eq!((spec_name, &spec_body), (200, &upstream_body), "{spec_body}");
    assert_eq!(upstream_name, 200);

    for (query, status, code) in [
        ("/api/v1/metrics/meter_envoy_ai_gw_instance_request_cpm?service=cfg-gw", 400, "invalid_argument"),
        ("/api/v1/metrics/meter_nothing?service=cfg-gw", 404, "not_found"),
        // A name that is not UTF-8 once decoded: answered in JSON as well (it was plain text).
        ("/api/v1/metrics/%FF?service=cfg-gw", 400, "invalid_argument"),
        ("/api/v1/metrics/meter_envoy_ai_gw_request_cpm", 400, "invalid_argument"),
        ("/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&step=week", 400, "invalid_argument"),
        ("/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=10&end=5", 400, "invalid_argument"),
        ("/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=yesterday", 400, "invalid_argument"),
        (
            "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=0&end=99999999999",
            400,
            "invalid_argument",
        ),
        // Times the node cannot represent: the first two made it loop until it ran out of memory.
        (
            "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=9223372036854775000&end=9223372036854775807",
            400,
            "invalid_argument",
        ),
        (
            "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=-9223372036854775808&end=0&step=day",
            400,
            "invalid_argument",
        ),
        ("/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=-5&end=10", 400, "invalid_argument"),
        ("/api/v1/logs?service=cfg-gw&start=1&end=99999999999", 400, "invalid_argument"),
        ("/api/v1/logs?service=cfg-gw&cursor=nope", 400, "invalid_argument"),
        ("/api/v1/logs?service=cfg-gw&cursor=0-0", 400, "invalid_argument"),
        ("/api/v1/logs?service=cfg-gw&limit=0", 400, "invalid_argument"),
        ("/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&partial=maybe", 400, "invalid_argument"),
        ("/api/v1/services?partial=1", 400, "invalid_argument"),
        ("/api/v2/anything", 404, "not_found"),
    ] {
        let (actual, body) = node.get(query).await;
        assert_eq!((actual, body["code"].as_str()), (status, Some(code)), "{query}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{query}: {body}");
    }
    // A parameter a read does not know is refused by name: a mistyped one would otherwise be
    // answered as if it had not been given (the whole service for a mistyped instance).
    for (query, unknown) in [
        ("/api/v1/metrics/meter_envoy_ai_gw_instance_request_cpm?service=cfg-gw&instnace=p", "instnace"),
        ("/api/v1/logs?service=cfg-gw&reasn=error", "reasn"),
        ("/api/v1/services?parital=false", "parital"),
    ] {
        let (status, body) = node.get(query).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")), "{query}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("unknown field `{unknown}`")), "{query}: {body}");
    }
    // The extreme times that are allowed, and the extreme cursor, answer (tests run with
    // overflow checks: an overflow would be a panic, not an answer).
    for query in [
        "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=16725225000&end=2500-01-01T00:00:00Z",
        "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=16725200000&end=16725225600&step=day",
        "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=cfg-gw&start=0&end=60",
        "/api/v1/logs?service=cfg-gw&start=0&end=16725225600",
        "/api/v1/logs?service=cfg-gw&cursor=18446744073709551615-ffffffffffffffffffffffffffffffff",
        "/api/v1/logs?service=cfg-gw&cursor=0-00000000000000000000000000000000",
    ] {
        let (status, body) = node.get(query).await;
        assert_eq!(status, 200, "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_every_api_error_is_json() {
    let node = TestNode::start().await;
    let response = node.http.post(format!("{}/api/v1/services", node.api())).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
    let (status, body) = node.get("/api/v1/logs?service=x&limit=abc").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")), "{body}");
    // An oversized body is refused from its declared length, before it is read: the answer comes
    // with the body not sent at all. (An HTTP client sending the body meanwhile may meet the
    // closed connection before it reads the answer, so this one only sends the head.)
    let address = node.api().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "PUT /api/v1/config/rules HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/yaml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        5 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    read.expect("the answer comes without the body").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(body["code"], "too_large", "{body}");
    // Config versions are self-metrics that follow changes.
    assert!(node.self_metrics().await.contains(r#"tollgate_config_version{document="rules"} 0"#));
    node.put("/api/v1/config/rules", "{}", None).await;
    assert!(node.self_metrics().await.contains(r#"tollgate_config_version{document="rules"} 1"#));
    assert!(node.self_metrics().await.contains(r#"tollgate_queries_total{kind="logs",outcome="invalid_argument"} 1"#));
}

/// `/metrics` also carries the process's own figures, under the names of Prometheus' process
/// collector and read at each scrape, and the version that runs.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_metrics_carry_the_process_figures_and_the_version() {
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let node = TestNode::start().await;
    let text = node.self_metrics().await;
    for family in ["process_cpu_seconds_total counter", "process_resident_memory_bytes gauge", "process_open_fds gauge"]
    {
        assert!(text.contains(&format!("# TYPE {family}\n")), "no {family} in\n{text}");
    }
    let version = format!("tollgate_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"));
    assert!(text.contains(&version), "no {version} in\n{text}");

    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let field = |name: &str| -> f64 {
        let line = status.lines().find_map(|line| line.strip_prefix(name)).unwrap_or_else(|| panic!("{name}"));
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    };
    let rss = node.self_metric("process_resident_memory_bytes").await;
    let vm_rss = field("VmRSS:") * 1024.0;
    assert!(rss > vm_rss / 2.0 && rss < vm_rss * 2.0, "resident {rss} bytes, VmRSS {vm_rss} bytes");
    assert!(node.self_metric("process_virtual_memory_bytes").await >= rss);
    assert!(node.self_metric("process_threads").await >= 2.0);
    let (open, max) = (node.self_metric("process_open_fds").await, node.self_metric("process_max_fds").await);
    assert!(open >= 3.0 && open <= max, "open {open}, max {max}");
    let started = node.self_metric("process_start_time_seconds").await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started >= before - 1.0 && started <= now, "started {started}, test between {before} and {now}");

    // CPU time grows as the node works (the kernel counts it in ticks of 10 ms): send queries
    // until it did.
    let cpu = node.self_metric("process_cpu_seconds_total").await;
    assert!(cpu > 0.0, "starting the node took CPU time");
    let mut later = cpu;
    for _ in 0..10_000 {
        node.get("/api/v1/metrics").await;
        later = node.self_metric("process_cpu_seconds_total").await;
        if later != cpu {
            break;
        }
    }
    assert!(later > cpu, "cpu {cpu} s, then {later} s");
}

/// `tollgate serve` turns transparent huge pages off for its own process first thing
/// (`tollgate::os`, docs/deployment.md). Nothing in this test binary turns them off, so the node
/// cannot inherit the setting from it.
#[cfg(target_os = "linux")]
#[test]
fn test_serve_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--otlp-grpc-addrs", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0"])
        .env("TOLLGATE_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("tollgate serve starts");
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(ours.contains("THP_enabled:\t1"), "this test process must not have them off already:\n{ours}");
    // Right after exec the flag is still the parent's: wait for `main` to set it.
    let status_path = format!("/proc/{}/status", child.id());
    let mut last = String::new();
    for _ in 0..200 {
        let status = std::fs::read_to_string(&status_path).unwrap_or_default();
        last = status.lines().find(|line| line.starts_with("THP_enabled:")).unwrap_or_default().to_string();
        if last.ends_with('0') {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(last, "THP_enabled:\t0", "the node's /proc/PID/status line");
}

/// Starts `tollgate serve` with `format` as `TOLLGATE_LOG_FORMAT` (unset when `None`) and
/// standard output to a pipe, as a container runtime or a log collector has it; returns the
/// lines it logged up to the API's `listening` event.
fn serve_logs(format: Option<&str>) -> Vec<String> {
    let mut env = vec![("TOLLGATE_LOG", "tollgate=info")];
    env.extend(format.map(|format| ("TOLLGATE_LOG_FORMAT", format)));
    // The API's `listening` event, in either format (JSON's `"message":"api listening"`).
    serve_logs_until(&env, "api listening")
}

/// The lines a new node logs, with `env` (no other `TOLLGATE_LOG*` or `RUST_LOG`), up to the first
/// that contains `until`.
fn serve_logs_until(env: &[(&str, &str)], until: &str) -> Vec<String> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--otlp-grpc-addrs", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0"])
        .env_remove("TOLLGATE_LOG")
        .env_remove("RUST_LOG")
        .env_remove("TOLLGATE_LOG_FORMAT")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped());
    let mut child = command.spawn().expect("tollgate serve starts");
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("standard output is text");
        let done = line.contains(until);
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().any(|line| line.contains(until)), "no {until:?} in the node's logs:\n{}", lines.join("\n"));
    lines
}

/// By default the node logs its own events, among them the Raft leader it follows, and not
/// openraft's internals (every vote and task, about 25 lines for one start and stop); a filter
/// that names openraft brings them back.
#[test]
fn test_serve_logs_the_raft_leader_and_leaves_openraft_internals_out_unless_asked() {
    let internals = ["get_initial_state", "startup done", "becomes leader", "vote is changing"];
    let lines = serve_logs_until(&[], "vnodes owned by this node");
    let leader = lines.iter().find(|line| line.contains(" INFO raft leader ")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(leader.contains("term=1") && leader.contains("this_node=true"), "{leader}");
    for line in &lines {
        assert!(!internals.iter().any(|internal| line.contains(internal)), "openraft's internals by default: {line}");
    }
    let lines = serve_logs_until(&[("TOLLGATE_LOG", "info,openraft=info")], "vnodes owned by this node");
    assert!(lines.iter().any(|line| line.contains("becomes leader")), "asked for openraft's logs: {lines:#?}");
    let lines = serve_logs_until(&[("RUST_LOG", "info,openraft=info")], "vnodes owned by this node");
    assert!(lines.iter().any(|line| line.contains("becomes leader")), "RUST_LOG too: {lines:#?}");
}

/// Logs written to a pipe are plain lines (no terminal colour codes for a log collector to
/// store); `TOLLGATE_LOG_FORMAT=json` makes each line one JSON object; an unknown format stops the
/// node with an error that names the variable.
#[test]
fn test_serve_logs_plain_text_or_json() {
    for format in [None, Some("text")] {
        let lines = serve_logs(format);
        assert!(lines.iter().all(|line| !line.contains('\x1b')), "{format:?}: colour codes in\n{}", lines.join("\n"));
        assert!(lines.iter().any(|line| line.contains(" INFO ") && line.contains("store opened")), "{lines:#?}");
    }
    let lines = serve_logs(Some("json"));
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["timestamp"].is_string() && event["level"].is_string(), "{event}");
    }
    let listening: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(listening["message"], "api listening", "{listening}");
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert!(listening["address"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{listening}");

    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("TOLLGATE_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(r#"TOLLGATE_LOG_FORMAT: "xml" is not a log format (text or json)"#), "{stderr}");
}

/// A client command whose reader went away (`tollgate query --list | head -1`) ends quietly and
/// successfully, as other command-line tools do, instead of panicking on the closed pipe; a
/// command that fails still says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_client_output_into_a_closed_pipe_ends_quietly() {
    // `serve` ignores the client commands' TOLLGATE_API, whatever it holds (it refused to start).
    let node = TestNode::start_with(&[("TOLLGATE_API", "garbage")], &[]).await;
    for args in [&["query", "--list"][..], &["services"], &["cluster", "status"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--api", &node.api()])
            .args(args)
            .stdout(writer)
            .output()
            .expect("the CLI runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && stderr.is_empty(), "{args:?}: {:?}, stderr: {stderr}", output.status);
    }
    let (ok, _, stderr) = cli(&node, &["query", "meter_envoy_ai_gw_no_such_metric", "--service", "x"]);
    assert!(!ok && stderr.starts_with("tollgate: ") && !stderr.contains("panicked"), "{stderr}");
    // Pointed at the OTLP/HTTP port, which answers an unknown path with an empty 404: the error
    // says which address was asked and what it should be (it ended in an empty message).
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--api", &node.otlp_http(), "services"])
        .output()
        .expect("the CLI runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&node.otlp_http()) && stderr.contains("API address"), "{stderr}");
}

/// Raft's store cannot be written (the disk is full): the configuration write fails with an
/// error, and the node, whose Raft stopped and would never follow the cluster's configuration
/// again, stops by itself; it served on as healthy and ready before, its configuration frozen.
/// Started again with room, it holds every committed version and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_configuration_write_on_a_full_disk_stops_the_node() {
    // No file may grow beyond 1 MiB: Raft's log reaches it first (nothing else is written).
    let mut node = TestNode::start_with_file_size_limit(1 << 20).await;
    let pricing = |price: u64| {
        let models: String = (0..1_000)
            .map(|i| format!("      - name: model-{i:04}\n        input-estimated-cost-per-m: {price}\n"))
            .collect();
        format!("providers:\n  - provider: p\n    models:\n{models}")
    };
    let mut committed: u64 = 0;
    let failure = loop {
        let (status, body) = node.put("/api/v1/config/pricing", &pricing(committed + 1), None).await;
        if status != 200 {
            break (status, body);
        }
        committed += 1;
        assert_eq!(body["version"], committed, "{body}");
        assert!(committed < 100, "100 versions of 60 KB committed and the disk never filled");
    };
    assert!(failure.0 >= 500, "a write that cannot be stored is the server's error: {failure:?}");
    let message = failure.1["error"].as_str().unwrap_or_default();
    assert!(message.contains("File too large"), "the answer says what failed: {message}");
    let status = node.wait_exit(std::time::Duration::from_secs(25)).await;
    assert!(!status.success(), "a node whose Raft stopped exits with an error: {status}");

    node.file_size_limit = None;
    node.restart().await;
    let (status, body) = node.get("/api/v1/config/pricing").await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].as_u64().unwrap();
    // The failed write may have reached the log before the failure (it was never answered 200).
    assert!(version == committed || version == committed + 1, "version {version} after {committed} commits");
    let (status, body) = node.put("/api/v1/config/pricing", &pricing(7), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"].as_u64(), Some(version + 1));
}

/// A node asked to stop while it starts (here: waiting to be admitted to a cluster nobody
/// answers for, up to five minutes) stops at once and cleanly. Before, no handler listened until
/// the start was over: SIGTERM killed the process, and a container's first process, for which the
/// kernel drops unhandled signals, kept waiting until its grace period ended in SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_signal_while_waiting_to_join_stops_the_node() {
    let nobody = common::cluster_address();
    let mut node = TestNode::start_unready(&[], &["--node-id", "n2", "--join", &nobody]).await;
    // Its API answers, but it is not ready: it is asking to join.
    assert_eq!(node.http.get(format!("{}/readyz", node.api())).send().await.unwrap().status().as_u16(), 503);
    node.signal("TERM");
    let status = node.wait_exit(std::time::Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
}

/// A second SIGTERM (or Ctrl-C) stops the node at once, with status 130, instead of waiting out
/// the grace given to requests in flight: here one whose body never finishes arriving. Before,
/// the runtime swallowed the second signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_second_signal_stops_the_node_at_once() {
    use std::io::Write;
    let mut node = TestNode::start().await;
    let mut stalled = std::net::TcpStream::connect(node.endpoints.otlp_http).unwrap();
    stalled
        .write_all(
            b"POST /v1/metrics HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/x-protobuf\r\n\
              Content-Length: 100000\r\n\r\n0123456789",
        )
        .unwrap();
    // The request is in flight once the node has counted its first bytes against the budget
    // (the gauge is absent until it is first set).
    while node.self_metric_opt("tollgate_inflight_bytes").await.unwrap_or(0.0) == 0.0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    node.signal("TERM");
    // Not ready any more: the node is stopping, and listening for a second signal.
    while node.http.get(format!("{}/readyz", node.api())).send().await.is_ok_and(|r| r.status().is_success()) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    node.signal("TERM");
    let status = node.wait_exit(std::time::Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(tollgate::cli::FORCED_EXIT), "{status}");
    drop(stalled);
}

/// With `shutdown_delay_ms`, a stopping node first stops being ready and goes on serving, so that
/// a load balancer stops sending it requests before its listeners close (they closed at once:
/// requests routed meanwhile were refused), then stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_shutdown_delay_keeps_serving_while_not_ready() {
    let mut node = TestNode::start_with(&[("TOLLGATE_SHUTDOWN_DELAY_MS", "3000")], &[]).await;
    let base = now_seconds() - 120;
    node.signal("TERM");
    // The signal is handled a moment later.
    let body = loop {
        let (status, body) = node.get("/readyz").await;
        if status == 503 {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(body["error"], "not ready: starting or stopping", "{body}");
    // Still serving: an export is acknowledged and read back.
    node.metrics_client(0).await.export(input_tokens("gpt-4o", base, 500.0)).await.expect("acknowledged");
    let minute = (base / 60 * 60) as i64;
    let labels = serde_json::json!({});
    let value = node.value("meter_envoy_ai_gw_input_token_rate", "cfg-gw", None, &labels, minute).await;
    assert_eq!(value, Some(500.0));
    let status = node.wait_exit(std::time::Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}

/// A metric answer is a point per step of each group: grouped by a label with many values over
/// many steps, it outgrew the node's memory (a day of minutes of 5 000 models: a 1.7 GB answer,
/// 11.6 GB of memory). Past `limits.max_answer_points` values it is refused with what to ask
/// instead; within it, answered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_metric_answer_is_bounded_in_values() {
    let node = TestNode::start_with(&[("TOLLGATE_LIMITS_MAX_ANSWER_POINTS", "10000")], &[]).await;
    let base = now_seconds() - 120;
    let mut client = node.metrics_client(0).await;
    for model in 0..50 {
        client.export(input_tokens(&format!("model-{model}"), base, 100.0)).await.unwrap();
    }
    let metric = "/api/v1/metrics/meter_envoy_ai_gw_model_token_rate?service=cfg-gw";
    let minute = base / 60 * 60;
    // 50 groups of 60 minutes: 3 000 values.
    let (status, body) = node.get(&format!("{metric}&start={}&end={}", minute + 60 - 3600, minute + 60)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["series"].as_array().unwrap().len(), 50);
    // 50 groups of 1 440 minutes: 72 000.
    let (status, body) = node.get(&format!("{metric}&start={}&end={}", minute + 60 - 86_400, minute + 60)).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("of 1440 values") && error.contains("limits.max_answer_points"), "{error}");
    // The same day at hour steps: 50 × 24.
    let (status, body) =
        node.get(&format!("{metric}&start={}&end={}&step=hour", minute + 60 - 86_400, minute + 60)).await;
    assert_eq!(status, 200, "{body}");
    // A percentile metric has a series per rank: one group, 5 ranks × 1 440 minutes is within,
    // 5 × 2 880 is not.
    let percentiles = "/api/v1/metrics/meter_envoy_ai_gw_request_latency_percentile?service=cfg-gw";
    let (status, body) = node.get(&format!("{percentiles}&start={}&end={}", minute + 60 - 86_400, minute + 60)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        node.get(&format!("{percentiles}&start={}&end={}", minute + 60 - 2 * 86_400, minute + 60)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")), "{body}");
    // Counted as the answer would hold them (it said 1 series of 14 400 values).
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("at least 5 series of 2880 values (14400)"), "{error}");
}
