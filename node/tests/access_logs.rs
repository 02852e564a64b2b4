//! Access logs shaped like Envoy AI Gateway's OTLP sink: the shared sampling cases as records,
//! kept ones read back with their reasons, log-derived metrics, retries, paging, filters and a
//! runtime threshold change.

mod common;

use common::TestNode;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value as Any, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use tollgate_rules::testing::{sampling_cases, string_attribute, CaseValue};

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The resource Envoy Gateway's OpenTelemetry access-log sink sends: Envoy's built-in labels and
/// the sink's `resources`.
fn envoy_resource(service: &str) -> Resource {
    Resource {
        attributes: vec![
            string_attribute("log_name", "otel_envoy_accesslog"),
            string_attribute("zone_name", ""),
            string_attribute("cluster_name", "default/aigw-run"),
            string_attribute("node_name", "default-aigw-run-85f8cf28"),
            string_attribute("service.name", "envoy-ai-gateway"),
            string_attribute("aigw.service", service),
            string_attribute("service.instance.id", "pod-0"),
        ],
        ..Default::default()
    }
}

fn record(time: u64, attributes: &BTreeMap<String, CaseValue>) -> LogRecord {
    let mut kvs = vec![
        string_attribute("k8s.namespace.name", "default"),
        string_attribute("k8s.pod.name", "envoy-default-aigw-0"),
        string_attribute("start_time", "2026-11-26T10:00:00.000Z"),
        string_attribute("method", "POST"),
        string_attribute("request.path", "/v1/chat/completions"),
        string_attribute("x-request-id", &format!("req-{time}")),
    ];
    kvs.extend(attributes.iter().map(|(k, v)| KeyValue {
        key: k.clone(),
        value: Some(v.any_value()),
        ..Default::default()
    }));
    LogRecord {
        time_unix_nano: time * 1_000_000_000,
        observed_time_unix_nano: time * 1_000_000_000 + 5,
        body: Some(AnyValue {
            value: Some(Any::StringValue(format!("[{time}] /v1/chat/completions model=m 200 1ms"))),
        }),
        attributes: kvs,
        ..Default::default()
    }
}

fn request(service: &str, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(envoy_resource(service)),
            scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// Posts an OTLP/JSON logs request to the node's OTLP/HTTP port.
async fn post_json_logs(node: &TestNode, json: impl Into<reqwest::Body>) -> reqwest::Response {
    let url = format!("{}/v1/logs", node.otlp_http());
    let request = node.http.post(url).header("content-type", "application/json").body(json);
    request.send().await.expect("otlp http reachable")
}

async fn logs(node: &TestNode, query: &str) -> Value {
    let (status, body) = node.get(&format!("/api/v1/logs?{query}")).await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

async fn total(node: &TestNode, metric: &str, service: &str, start: u64, labels: Value) -> f64 {
    let (status, body) =
        node.get(&format!("/api/v1/metrics/{metric}?service={service}&start={}&end={}", start - 60, start + 600)).await;
    assert_eq!(status, 200, "{body}");
    body["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"] == labels)
        .flat_map(|s| s["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()))
        .sum()
}

fn status_class(attributes: &BTreeMap<String, CaseValue>) -> &'static str {
    let code = match attributes.get("response_code") {
        Some(CaseValue::Int(i)) => Some(*i),
        Some(CaseValue::Text(t)) => t.parse::<i64>().ok(),
        None => None,
    };
    match code {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_access_logs_sampling_counters_retries_paging_and_runtime_thresholds() {
    let node = TestNode::start().await;
    let cases = sampling_cases();
    let base = now_seconds() - 300;
    let records: Vec<LogRecord> =
        cases.cases.iter().enumerate().map(|(i, case)| record(base + i as u64, &case.attributes)).collect();
    let mut client = node.logs_client().await;
    let response = client.export(request("log-gw", records.clone())).await.expect("accepted").into_inner();
    assert!(response.partial_success.is_none(), "{:?}", response.partial_success);

    // Kept records, newest first, with their reasons and parsed fields.
    let window = format!("service=log-gw&start={}&end={}", base - 60, base + 600);
    let body = logs(&node, &format!("{window}&limit=100")).await;
    let kept: Vec<(u64, Vec<String>)> = body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|log| {
            let index = log["time"].as_u64().unwrap() / 1_000_000_000 - base;
            (index, log["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect())
        })
        .collect();
    let mut expected: Vec<(u64, Vec<String>)> =
        cases.cases.iter().enumerate().filter(|(_, c)| c.keep).map(|(i, c)| (i as u64, c.reasons.clone())).collect();
    expected.reverse();
    assert_eq!(kept, expected);
    assert!(body["next_cursor"].is_null());
    let first = &body["logs"][body["logs"].as_array().unwrap().len() - 1];
    assert_eq!(first["service"], "log-gw");
    assert_eq!(first["instance"], "pod-0");
    assert_eq!(first["kind"], "llm");
    assert_eq!(first["attributes"]["method"], "POST");
    assert!(first["body"].as_str().unwrap().contains("/v1/chat/completions"));

    // Log-derived metrics: every classified record by status class, every keep reason.
    let mut by_class: BTreeMap<&str, f64> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, f64> = BTreeMap::new();
    for case in cases.cases.iter().filter(|c| c.kind.is_some()) {
        *by_class.entry(status_class(&case.attributes)).or_default() += 1.0;
        for reason in &case.reasons {
            *by_reason.entry(reason.clone()).or_default() += 1.0;
        }
    }
    for (class, count) in &by_class {
        let value =
            total(&node, "meter_envoy_ai_gw_log_request_cpm", "log-gw", base, json!({"status_class": class})).await;
        assert_eq!(value, *count, "status class {class}");
    }
    for (reason, count) in &by_reason {
        let value = total(&node, "meter_envoy_ai_gw_log_sampled_cpm", "log-gw", base, json!({"reason": reason})).await;
        assert_eq!(value, *count, "reason {reason}");
    }

    // A retried export changes nothing; nor does the same export sent again as OTLP/JSON (its
    // records are hashed as prost encodes them, which is how this client encoded them).
    client.export(request("log-gw", records.clone())).await.expect("accepted");
    let json = serde_json::to_vec(&request("log-gw", records.clone())).unwrap();
    let response = post_json_logs(&node, json).await;
    assert_eq!(response.status(), 200);
    assert_eq!(logs(&node, &format!("{window}&limit=100")).await["logs"], body["logs"]);
    for (class, count) in &by_class {
        let value =
            total(&node, "meter_envoy_ai_gw_log_request_cpm", "log-gw", base, json!({"status_class": class})).await;
        assert_eq!(value, *count, "status class {class} after a retry");
    }

    // Paging: pages of 2 add up to the whole list.
    assert_eq!(Value::Array(node.all_logs(&window, 2).await), body["logs"]);

    // Filters.
    let only = logs(&node, &format!("{window}&reason=high_tokens")).await;
    assert!(only["logs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["reasons"].as_array().unwrap().contains(&json!("high_tokens"))));
    assert_eq!(only["logs"].as_array().unwrap().len() as f64, by_reason["high_tokens"]);
    let mcp = logs(&node, &format!("{window}&kind=mcp")).await;
    assert!(mcp["logs"].as_array().unwrap().iter().all(|l| l["kind"] == "mcp"));
    assert_eq!(logs(&node, &format!("{window}&model=nonexistent-model")).await["logs"].as_array().unwrap().len(), 1);
    let (status, error) = node.get(&format!("/api/v1/logs?{window}&reason=boring")).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")));
    // An empty model or instance is no filter (it was a filter nothing matched); an empty service
    // is none.
    assert_eq!(logs(&node, &format!("{window}&model=&instance=")).await["logs"], body["logs"]);
    let (status, error) = node.get("/api/v1/logs?service=").await;
    assert_eq!((status, error["error"].as_str()), (400, Some("service is required")), "{error}");

    // A runtime threshold change applies to the next records.
    let record_6000 = |time| {
        let attributes = BTreeMap::from([
            ("gen_ai.request.model".to_string(), CaseValue::Text("gpt-4o".into())),
            ("response_code".to_string(), CaseValue::Text("200".into())),
            ("gen_ai.usage.input_tokens".to_string(), CaseValue::Text("5000".into())),
            ("gen_ai.usage.output_tokens".to_string(), CaseValue::Text("1000".into())),
        ]);
        record(time, &attributes)
    };
    client.export(request("threshold-gw", vec![record_6000(base)])).await.expect("accepted");
    let (status, body) = node.put("/api/v1/config/rules", "sampling:\n  token_threshold: 5000\n", None).await;
    assert_eq!(status, 200, "{body}");
    client.export(request("threshold-gw", vec![record_6000(base + 1)])).await.expect("accepted");
    let kept = logs(&node, &format!("service=threshold-gw&start={}&end={}", base - 60, base + 60)).await;
    let kept = kept["logs"].as_array().unwrap();
    assert_eq!(kept.len(), 1, "only the record after the change is kept: {kept:?}");
    assert_eq!(kept[0]["time"].as_u64(), Some((base + 1) * 1_000_000_000));
    assert_eq!(kept[0]["reasons"], json!(["high_tokens"]));
    // Cost per request with the built-in pricing: 5000·2.5 + 1000·10 micro-units.
    assert_eq!(kept[0]["cost"], json!(22500.0));
    assert_eq!(kept[0]["total_tokens"], json!(6000));
}

/// The attributes of an LLM call that failed with `response_code`: kept as an error.
fn failed_llm_call(response_code: &str) -> BTreeMap<String, CaseValue> {
    [
        ("gen_ai.request.model".to_string(), CaseValue::Text("gpt-4o".into())),
        ("response_code".to_string(), CaseValue::Text(response_code.into())),
    ]
    .into_iter()
    .collect()
}

/// A record acknowledged a moment ago is in the default range (`end` = now): the range ended at
/// the start of the current second, so a record stamped within it was missing until the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_record_just_acknowledged_is_in_the_default_range() {
    let node = TestNode::start().await;
    let mut client = node.logs_client().await;
    let attributes = failed_llm_call("503");
    for attempt in 0..3 {
        let mut record = record(0, &attributes);
        let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        record.time_unix_nano = now_ns;
        record.observed_time_unix_nano = now_ns;
        client.export(request("fresh-gw", vec![record])).await.expect("accepted");
        let body = logs(&node, "service=fresh-gw").await;
        let times: Vec<u64> =
            body["logs"].as_array().unwrap().iter().map(|log| log["time"].as_u64().unwrap()).collect();
        assert!(times.contains(&now_ns), "attempt {attempt}: {now_ns} missing from {times:?}");
    }
}

/// A retried export is answered as the first one was: a record refused then (stamped too far in
/// the future) is refused again, where the retry was told that everything was taken; also one
/// that the clock has caught up with since (it was never stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_retried_log_export_reports_the_records_refused_the_first_time() {
    let node = TestNode::start().await;
    let mut client = node.logs_client().await;
    let errors = failed_llm_call("500");
    let now = now_seconds();
    // 303 s ahead, 300 s allowed: refused now, within bounds four seconds later.
    let records = vec![record(now - 60, &errors), record(now + 11 * 86_400, &errors), record(now + 303, &errors)];
    let export = request("retry-gw", records);
    for attempt in 0..3 {
        if attempt == 1 {
            tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        }
        let answer = client.export(export.clone()).await.expect("accepted").into_inner();
        let partial = answer.partial_success.unwrap_or_default();
        assert_eq!(partial.rejected_log_records, 2, "attempt {attempt}: {partial:?}");
        assert!(partial.error_message.contains("too_far_in_future: 2"), "attempt {attempt}: {partial:?}");
    }
    let window = format!("service=retry-gw&start={}&end={}", now - 120, now);
    assert_eq!(logs(&node, &window).await["logs"].as_array().unwrap().len(), 1, "the good record, once");
}

/// A node whose `limits.max_log_page` is below the default page answers a query without `limit`
/// with a page of that size (it refused the `limit` its client had not sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_query_without_limit_gets_a_page_of_max_log_page_when_that_is_smaller() {
    let node = TestNode::start_with(&[("TOLLGATE_LIMITS_MAX_LOG_PAGE", "3")], &[]).await;
    let mut client = node.logs_client().await;
    let errors = failed_llm_call("500");
    let base = now_seconds() - 120;
    let records = (0..5).map(|i| record(base + i, &errors)).collect();
    client.export(request("small-page-gw", records)).await.expect("accepted");
    let window = format!("service=small-page-gw&start={}&end={}", base - 60, base + 60);
    let page = logs(&node, &window).await;
    assert_eq!(page["logs"].as_array().unwrap().len(), 3, "{page}");
    let cursor = page["next_cursor"].as_str().expect("more records");
    let rest = logs(&node, &format!("{window}&cursor={cursor}")).await;
    assert_eq!(rest["logs"].as_array().unwrap().len(), 2, "{rest}");
    let (status, body) = node.get(&format!("/api/v1/logs?{window}&limit=4")).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("limit must be between 1 and 3")), "{body}");
}

/// A record that repeats an attribute is read by the first value, in its derived fields and in
/// its attributes alike (the attributes showed the last value: `response_code` 200 beside the
/// reason `error` and `response_code` 500 derived from the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_repeated_attribute_shows_the_value_the_record_was_read_by() {
    let node = TestNode::start().await;
    let mut client = node.logs_client().await;
    let mut record = record(now_seconds() - 60, &BTreeMap::new());
    for (key, value) in [
        ("response_code", "500"),
        ("gen_ai.request.model", "gpt-4o"),
        ("response_code", "200"),
        ("gen_ai.request.model", "other-model"),
    ] {
        record.attributes.push(string_attribute(key, value));
    }
    client.export(request("repeat-gw", vec![record])).await.expect("accepted");
    let body = logs(&node, "service=repeat-gw").await;
    let log = &body["logs"][0];
    assert_eq!(
        (&log["reasons"], &log["response_code"], &log["model"]),
        (&json!(["error"]), &json!(500), &json!("gpt-4o"))
    );
    assert_eq!(log["attributes"]["response_code"], "500", "{log}");
    assert_eq!(log["attributes"]["gen_ai.request.model"], "gpt-4o", "{log}");
}

/// OTLP/JSON as protobuf's JSON mapping also writes it (a relay such as the Collector writes a
/// non-finite double as `"NaN"`; enums may come by name): accepted, sampled and stored like any
/// other record, instead of a 400 that lost the whole export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_otlp_json_logs_in_the_spellings_of_protobufs_json_mapping_are_kept() {
    let node = TestNode::start().await;
    let time = (now_seconds() - 60) * 1_000_000_000;
    let record = |id: &str, code: &str| {
        format!(
            r#"{{"timeUnixNano":"{time}","severityNumber":"SEVERITY_NUMBER_ERROR","body":{{"stringValue":"{id}"}},
                "attributes":[{{"key":"x-request-id","value":{{"stringValue":"{id}"}}}},
                              {{"key":"request.path","value":{{"stringValue":"/v1/chat/completions"}}}},
                              {{"key":"gen_ai.request.model","value":{{"stringValue":"gpt-4o"}}}},
                              {{"key":"response_code","value":{{"stringValue":"{code}"}}}},
                              {{"key":"upstream_ratio","value":{{"doubleValue":"NaN"}}}},
                              {{"key":"duration","value":{{"intValue":181}}}}],
                "traceId":"5b8efff798038103d269b633813fc60c"}}"#
        )
    };
    let json = format!(
        r#"{{"resourceLogs":[{{"resource":{{"attributes":[
            {{"key":"service.name","value":{{"stringValue":"envoy-ai-gateway"}}}},
            {{"key":"aigw.service","value":{{"stringValue":"json-gw"}}}},
            {{"key":"service.instance.id","value":{{"stringValue":"pod-0"}}}},
            {{"key":"cluster.weight","value":{{"doubleValue":"Infinity"}}}}]}},
          "scopeLogs":[{{"logRecords":[{},{}]}}]}}]}}"#,
        record("kept-500", "500"),
        record("dropped-200", "200")
    );
    let response = post_json_logs(&node, json).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "{}"));
    let logs = logs(&node, "service=json-gw").await;
    let logs = logs["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0]["body"], "kept-500");
    assert_eq!(logs[0]["reasons"], json!(["error"]));
    assert_eq!(logs[0]["duration_ms"], json!(181));
    assert_eq!(logs[0]["attributes"]["upstream_ratio"], "NaN");
}

/// Pages through the kept records of a service of many pods, whose records interleave in time:
/// every record exactly once, newest first, with each filter. A page keeps only its newest
/// records from one pod to the next, reading each next pod only back to the oldest of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_pages_over_many_pods_hold_every_record_once_newest_first() {
    const PODS: u64 = 12;
    const RECORDS: u64 = 25;
    let node = TestNode::start().await;
    let mut client = node.logs_client().await;
    let base = now_seconds() - 600;
    let mut expected: Vec<(u64, String)> = Vec::new();
    for pod in 0..PODS {
        let records: Vec<LogRecord> = (0..RECORDS)
            .map(|i| {
                // Times interleave across pods; pods 0 and 1 share theirs (ties).
                let time_ns = (base + i * 10) * 1_000_000_000 + (pod.max(1) - 1) * 1_000_000;
                let model = if i % 3 == 0 { "gpt-4o" } else { "claude" };
                let attributes: BTreeMap<String, CaseValue> = [
                    ("gen_ai.request.model".to_string(), CaseValue::Text(model.into())),
                    ("response_code".to_string(), CaseValue::Text("500".into())),
                ]
                .into_iter()
                .collect();
                let mut record = record(0, &attributes);
                record.time_unix_nano = time_ns;
                let id = format!("pod-{pod}-{i}");
                // The record's own id, in place of the one `record` gives (a repeated attribute
                // shows its first value).
                record.attributes.retain(|kv| kv.key != "x-request-id");
                record.attributes.push(string_attribute("x-request-id", &id));
                expected.push((time_ns, id));
                record
            })
            .collect();
        let mut request = request("pods-gw", records);
        let resource = request.resource_logs[0].resource.as_mut().unwrap();
        resource.attributes.retain(|kv| kv.key != "service.instance.id");
        resource.attributes.push(string_attribute("service.instance.id", &format!("pod-{pod}")));
        client.export(request).await.expect("accepted");
    }
    expected.sort_by_key(|(time, _)| std::cmp::Reverse(*time));

    let window = format!("service=pods-gw&start={}&end={}", base - 60, base + 600);
    for (filter, limit) in [("", 7), ("", 1), ("&model=gpt-4o", 5), ("&instance=pod-3", 4)] {
        let seen: Vec<(u64, String)> = node
            .all_logs(&format!("{window}{filter}"), limit)
            .await
            .iter()
            .map(|log| (log["time"].as_u64().unwrap(), log["attributes"]["x-request-id"].as_str().unwrap().to_string()))
            .collect();
        let wanted: Vec<(u64, String)> = expected
            .iter()
            .filter(|(_, id)| match filter {
                "&model=gpt-4o" => id.rsplit('-').next().unwrap().parse::<u64>().unwrap() % 3 == 0,
                "&instance=pod-3" => id.starts_with("pod-3-"),
                _ => true,
            })
            .cloned()
            .collect();
        let times = |records: &[(u64, String)]| records.iter().map(|(time, _)| *time).collect::<Vec<_>>();
        assert_eq!(times(&seen), times(&wanted), "{filter}: newest first");
        let ids = |records: &[(u64, String)]| records.iter().map(|(_, id)| id.clone()).collect::<BTreeSet<_>>();
        assert_eq!(seen.len(), wanted.len(), "{filter}: each record once");
        assert_eq!(ids(&seen), ids(&wanted), "{filter}: every record");
    }
}

/// Kept records are stored whole, body and attributes, up to an export's 16 MiB: a page holds
/// `limit` records and about 8 MiB, whichever comes first, and the cursor goes on from there.
/// (A page of 100 records of 7 MiB was an 88 MB answer, and in a cluster a member's part of such
/// a page was more than a peer's answer may be: the member was missing from every such query.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_pages_of_large_records_are_bounded_in_bytes_and_hold_every_record_once() {
    const RECORDS: u64 = 12;
    const BODY: usize = 3 * 1024 * 1024;
    let node = TestNode::start().await;
    let mut client = node.logs_client().await;
    let base = now_seconds() - 600;
    for i in 0..RECORDS {
        let attributes: BTreeMap<String, CaseValue> = [
            ("gen_ai.request.model".to_string(), CaseValue::Text("gpt-4o".into())),
            ("response_code".to_string(), CaseValue::Text("500".into())),
        ]
        .into_iter()
        .collect();
        let mut record = record(base + i, &attributes);
        let text = format!("{i:>4}").repeat(BODY / 4);
        record.body = Some(AnyValue { value: Some(Any::StringValue(text)) });
        let mut request = request("big-gw", vec![record]);
        let resource = request.resource_logs[0].resource.as_mut().unwrap();
        resource.attributes.retain(|kv| kv.key != "service.instance.id");
        resource.attributes.push(string_attribute("service.instance.id", &format!("pod-{}", i % 3)));
        client.export(request).await.expect("accepted");
    }

    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let url = format!(
            "{}/api/v1/logs?service=big-gw&start={}&end={}&limit=100{cursor}",
            node.api(),
            base - 60,
            base + 60
        );
        let bytes = node.http.get(&url).send().await.unwrap().bytes().await.unwrap();
        assert!(bytes.len() < 12 * 1024 * 1024, "a page of {} bytes", bytes.len());
        let page: Value = serde_json::from_slice(&bytes).unwrap();
        pages += 1;
        for log in page["logs"].as_array().unwrap() {
            seen.push(log["time"].as_u64().unwrap() / 1_000_000_000 - base);
            assert_eq!(log["body"].as_str().unwrap().len(), BODY, "the body whole");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen, (0..RECORDS).rev().collect::<Vec<_>>(), "every record once, newest first");
    assert!(pages >= 4, "{pages} pages for {RECORDS} records of 3 MiB");

    // A member asked for its part by a node that predates byte-bounded pages (no
    // `max_page_bytes`) answers a whole page as before: that node merges pages by count only, and
    // would page past the records of a page cut short.
    let mut peer = tollgate_proto::peer::peer_client::PeerClient::connect(format!("http://{}", node.cluster_addr()))
        .await
        .unwrap()
        .max_decoding_message_size(64 * 1024 * 1024);
    let query = tollgate::query::LogQuery {
        service: "big-gw".into(),
        instance: None,
        start_ns: (base - 60) * 1_000_000_000,
        end_ns: (base + 60) * 1_000_000_000,
        reason: None,
        kind: None,
        model: None,
        limit: 100,
        cursor: None,
    };
    for (max_page_bytes, records) in [(0, RECORDS as usize), (8 * 1024 * 1024, 3)] {
        let request = tollgate_proto::peer::QueryRequest {
            kind: tollgate_proto::peer::QueryKind::Logs as i32,
            payload: tollgate::wire::encode(&query),
            max_page_bytes,
            ..Default::default()
        };
        let answer = peer.query(request).await.unwrap().into_inner();
        let page: tollgate::query::LogPage = tollgate::wire::decode("page", &answer.payload).unwrap();
        assert_eq!((page.logs.len(), page.next.is_some()), (records, max_page_bytes > 0), "{max_page_bytes}");
    }
}

/// A copy of a kept record is a duplicate wherever it comes: twice in one export, or again in
/// another export (with its attributes in another order). It was stored once and counted twice
/// in the log-derived metrics, which then disagreed with the stored logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_copy_of_a_kept_record_is_stored_and_counted_once() {
    let node = TestNode::start().await;
    let mut client = node.logs_client().await;
    let base = now_seconds() - 120;
    let error = |time: u64| {
        let attributes = BTreeMap::from([
            ("gen_ai.request.model".to_string(), CaseValue::Text("gpt-4o".into())),
            ("response_code".to_string(), CaseValue::Text("500".into())),
        ]);
        record(time, &attributes)
    };
    let (first, second, third) = (error(base), error(base + 1), error(base + 2));
    client.export(request("copy-gw", vec![first.clone(), first.clone(), second.clone()])).await.expect("accepted");
    let mut reordered = second.clone();
    reordered.attributes.reverse();
    client.export(request("copy-gw", vec![reordered, third])).await.expect("accepted");

    let window = format!("service=copy-gw&start={}&end={}", base - 60, base + 600);
    let times: Vec<u64> = logs(&node, &format!("{window}&limit=100")).await["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|log| log["time"].as_u64().unwrap() / 1_000_000_000 - base)
        .collect();
    assert_eq!(times, [2, 1, 0]);
    let sampled = total(&node, "meter_envoy_ai_gw_log_sampled_cpm", "copy-gw", base, json!({"reason": "error"})).await;
    let requests =
        total(&node, "meter_envoy_ai_gw_log_request_cpm", "copy-gw", base, json!({"status_class": "5xx"})).await;
    assert_eq!((sampled, requests), (3.0, 3.0), "as many as the stored logs");
    assert_eq!(node.self_metric("tollgate_logs_kept_total{reason=\"error\"}").await, 3.0);
    assert_eq!(node.self_metric("tollgate_log_records_duplicate_total").await, 2.0);

    // Copies in exports that come together: each is merged while the one before may still be
    // on its way to the store.
    let copy = error(base + 3);
    let exports = (0..20u64).map(|k| {
        let mut client = client.clone();
        let records = vec![copy.clone(), error(base + 10 + k)];
        async move { client.export(request("copy-gw", records)).await.expect("accepted") }
    });
    futures_util::future::join_all(exports).await;
    let kept = node.all_logs(&window, 100).await;
    assert_eq!(kept.len(), 3 + 1 + 20);
    let sampled = total(&node, "meter_envoy_ai_gw_log_sampled_cpm", "copy-gw", base, json!({"reason": "error"})).await;
    assert_eq!(sampled, 24.0, "as many as the stored logs");
    assert_eq!(node.self_metric("tollgate_log_records_duplicate_total").await, 2.0 + 19.0);
}
