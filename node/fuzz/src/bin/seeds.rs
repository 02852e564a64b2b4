//! Writes the starting corpus of each fuzz target into `corpus/<target>/`: the gateway's exports
//! (`tollgate_rules::fleet`), the golden cases' points and access-log records, and OTLP/JSON
//! bodies of both.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use std::path::Path;
use tollgate_rules::fleet::GatewayPod;
use tollgate_rules::testing::{self, Convention};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn main() {
    let started = 1_764_151_200;
    for (models, cumulative) in [(1, true), (2, false), (1, false)] {
        let mut pod = GatewayPod::new("gw", "gw-pod-0", models, cumulative, 10, started);
        let first = pod.export(0).resource_metrics.remove(0).encode_to_vec();
        let second = pod.export(1).resource_metrics.remove(0).encode_to_vec();
        write("otlp_metrics", &format!("pod-{models}-{cumulative}"), &first);
        // Two exports of one pod, merged as protobuf merges concatenated messages.
        write("otlp_metrics", &format!("pod-{models}-{cumulative}-twice"), &[first, second].concat());
    }
    for (index, case) in testing::aggregation_cases().cases.iter().enumerate() {
        let mut all = Vec::new();
        for point in &case.points {
            all.extend(point.request(Convention::JobName).resource_metrics.remove(0).encode_to_vec());
        }
        write("otlp_metrics", &format!("case-{index}"), &all);
    }

    let resource = Resource {
        attributes: vec![
            string("service.name", "envoy-ai-gateway"),
            string("aigw.service", "gw"),
            string("service.instance.id", "gw-pod-0"),
        ],
        ..Default::default()
    };
    let mut records = Vec::new();
    for (index, case) in testing::sampling_cases().cases.iter().enumerate() {
        let mut attributes: Vec<KeyValue> = case
            .attributes
            .iter()
            .map(|(k, v)| KeyValue { key: k.clone(), value: Some(v.any_value()), ..Default::default() })
            .collect();
        attributes.push(string("request.path", "/v1/chat/completions"));
        let record = LogRecord {
            time_unix_nano: (started + index as u64) * 1_000_000_000,
            body: Some(AnyValue { value: Some(any_value::Value::StringValue("POST /v1/chat/completions 200".into())) }),
            attributes,
            ..Default::default()
        };
        let logs = ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs { log_records: vec![record.clone()], ..Default::default() }],
            ..Default::default()
        };
        write("otlp_logs", &format!("case-{index}"), &logs.encode_to_vec());
        records.push(record);
    }

    write(
        "otlp_json",
        "metrics",
        br#"{"resourceMetrics":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"gw"}},{"key":"service.instance.id","value":{"stringValue":"gw-pod-0"}},{"key":"job_name","value":{"stringValue":"envoy-ai-gateway"}}]},"scopeMetrics":[{"scope":{"name":"envoyproxy/ai-gateway"},"metrics":[{"name":"gen_ai.server.request.duration","unit":"s","histogram":{"aggregationTemporality":2,"dataPoints":[{"attributes":[{"key":"gen_ai.request.model","value":{"stringValue":"gpt-4o"}},{"key":"gen_ai.provider.name","value":{"stringValue":"openai"}}],"startTimeUnixNano":"1764151200000000000","timeUnixNano":"1764151260000000000","count":"3","sum":1.5,"bucketCounts":["1","2","0"],"explicitBounds":[0.5,1.0],"min":0.2,"max":0.9}]}},{"name":"gen_ai.client.token.usage","unit":"{token}","histogram":{"aggregationTemporality":"AGGREGATION_TEMPORALITY_DELTA","dataPoints":[{"attributes":[{"key":"gen_ai.token.type","value":{"stringValue":"input"}},{"key":"gen_ai.request.model","value":{"stringValue":"gpt-4o"}}],"timeUnixNano":"1764151260000000000","count":2,"sum":"NaN","bucketCounts":[2],"explicitBounds":[]}]}}]}]}]}"#,
    );
    write(
        "otlp_json",
        "logs",
        br#"{"resourceLogs":[{"resource":{"attributes":[{"key":"aigw.service","value":{"stringValue":"gw"}},{"key":"service.instance.id","value":{"stringValue":"gw-pod-0"}}]},"scopeLogs":[{"logRecords":[{"timeUnixNano":"1764151260000000000","severityNumber":"SEVERITY_NUMBER_INFO","body":{"stringValue":"POST /v1/chat/completions 500"},"traceId":"5b8efff798038103d269b633813fc60c","attributes":[{"key":"request.path","value":{"stringValue":"/v1/chat/completions"}},{"key":"gen_ai.request.model","value":{"stringValue":"gpt-4o"}},{"key":"response_code","value":{"intValue":"500"}},{"key":"duration","value":{"doubleValue":"Infinity"}},{"key":"gen_ai.usage.input_tokens","value":{"stringValue":"12000"}},{"key":"blob","value":{"bytesValue":"AAEC"}},{"key":"list","value":{"arrayValue":{"values":[{"boolValue":true}]}}}]}]}]}]}"#,
    );
    println!("seeds written under corpus/ ({} access-log records)", records.len());
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}
