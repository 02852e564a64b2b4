//! Gateway-shaped OTLP exports.
//!
//! Metrics (after `fleet_export` of node/tests/common): per pod, a DELTA
//! `gen_ai.server.request.duration` histogram per provider and CUMULATIVE
//! `gen_ai.client.token.usage` histograms (input and output tokens) per provider, with the
//! gateway's bounds and attributes. Every export knows what it reports: its request count (what
//! `request_cpm` sums) and its increase of input tokens (what `input_token_rate` sums).
//!
//! Access logs: per pod, records with the gateway's LLM attributes, each named by a unique
//! `x-request-id`; about half are failed requests (`response_code` 500, kept for the `error`
//! reason), the others quick successes that the default rules drop. Every export knows its
//! records, so the judge can look each kept one up and make sure no dropped one was stored.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
};
use serde::Serialize;
use tollgate_rules::fleet::{
    gateway_bounds, gateway_resource, gateway_unit, point_attributes, string_attribute, Convention, Xorshift,
};

const DURATION: &str = "gen_ai.server.request.duration";
const TOKENS: &str = "gen_ai.client.token.usage";
const PROVIDERS: [(&str, &str); 3] =
    [("openai", "gpt-4o-mini-2024-07-18"), ("anthropic", "claude-sonnet-4-20250514"), ("deepseek", "deepseek-chat")];

/// A cumulative histogram's running totals.
#[derive(Clone, Debug)]
struct Running {
    count: u64,
    sum: u64,
    buckets: Vec<u64>,
}

impl Running {
    fn new() -> Running {
        Running { count: 0, sum: 0, buckets: vec![0; gateway_bounds(TOKENS).len() + 1] }
    }

    fn add(&mut self, value: u64) {
        let bounds = gateway_bounds(TOKENS);
        self.count += 1;
        self.sum += value;
        self.buckets[bounds.partition_point(|b| *b < value as f64)] += 1;
    }
}

/// One gateway pod: its name, the start time of its cumulative series, and their totals.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `service.instance.id`.
    pub instance: String,
    /// Unix seconds: start time of the cumulative series (the pod's process start).
    started: u64,
    /// Per provider: (input, output) token totals since `started`.
    totals: Vec<(Running, Running)>,
}

impl Pod {
    /// A pod whose cumulative series start at `started` (unix seconds).
    pub fn new(instance: &str, started: u64) -> Pod {
        Pod {
            instance: instance.to_string(),
            started,
            totals: PROVIDERS.iter().map(|_| (Running::new(), Running::new())).collect(),
        }
    }
}

/// An OTLP export request.
#[derive(Clone, Debug)]
pub enum Request {
    /// `MetricsService/Export`.
    Metrics(ExportMetricsServiceRequest),
    /// `LogsService/Export`.
    Logs(ExportLogsServiceRequest),
}

/// One access-log record of an export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    /// Its `x-request-id` attribute, unique in a run.
    pub id: String,
    /// Whether the default rules keep it (a failed request); the others must not be stored.
    pub kept: bool,
}

/// One export request and what it reports.
#[derive(Clone, Debug)]
pub struct Export {
    /// The request, sent as it is on every attempt.
    pub request: Request,
    /// Service name.
    pub service: String,
    /// Instances it carries.
    pub pods: Vec<String>,
    /// Unix seconds of its points.
    pub time: u64,
    /// Requests it reports (Σ count of the request-duration points).
    pub requests: u64,
    /// Increase of input tokens it reports (Σ of this export's new input tokens).
    pub input_tokens: u64,
    /// Its access-log records (none for a metrics export).
    pub records: Vec<LogEntry>,
}

/// The export at `time` (unix seconds) of `pods` of `service`: one `ResourceMetrics` per pod. The
/// pods' cumulative totals advance whether or not the export is ever acknowledged, as a real
/// gateway's do.
pub fn export(service: &str, convention: Convention, pods: &mut [&mut Pod], time: u64, rng: &mut Xorshift) -> Export {
    let duration_bounds = gateway_bounds(DURATION);
    let token_bounds = gateway_bounds(TOKENS);
    let mut requests = 0;
    let mut input_tokens = 0;
    let mut resources = Vec::new();
    for pod in pods.iter_mut() {
        let mut durations = Vec::new();
        let mut tokens = Vec::new();
        for (index, (provider, model)) in PROVIDERS.iter().enumerate() {
            let attributes = |extra| point_attributes(provider, model, extra);
            // Delta request durations of this second: 1-4 requests.
            let count = 1 + rng.below(4);
            requests += count;
            let mut buckets = vec![0u64; duration_bounds.len() + 1];
            let mut sum = 0.0;
            for _ in 0..count {
                let seconds = (1 + rng.below(8000)) as f64 / 1000.0;
                sum += seconds;
                buckets[duration_bounds.partition_point(|b| *b < seconds)] += 1;
            }
            durations.push(HistogramDataPoint {
                attributes: attributes(None),
                start_time_unix_nano: (time - 1) * 1_000_000_000,
                time_unix_nano: time * 1_000_000_000,
                count,
                sum: Some(sum),
                bucket_counts: buckets,
                explicit_bounds: duration_bounds.to_vec(),
                ..Default::default()
            });
            // Cumulative token usage: the same requests' tokens added to the running totals.
            let (input, output) = &mut pod.totals[index];
            for _ in 0..count {
                let new_input = 20 + rng.below(4000);
                input_tokens += new_input;
                input.add(new_input);
                output.add(5 + rng.below(900));
            }
            for (token_type, running) in [("input", &*input), ("output", &*output)] {
                tokens.push(HistogramDataPoint {
                    attributes: attributes(Some(("gen_ai.token.type", token_type))),
                    start_time_unix_nano: pod.started * 1_000_000_000,
                    time_unix_nano: time * 1_000_000_000,
                    count: running.count,
                    sum: Some(running.sum as f64),
                    bucket_counts: running.buckets.clone(),
                    explicit_bounds: token_bounds.to_vec(),
                    ..Default::default()
                });
            }
        }
        let metric = |name: &str, points: Vec<HistogramDataPoint>, temporality: i32| Metric {
            name: name.into(),
            unit: gateway_unit(name).into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: points,
                aggregation_temporality: temporality,
            })),
            ..Default::default()
        };
        resources.push(ResourceMetrics {
            resource: Some(gateway_resource(convention, service, Some(&pod.instance))),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope { name: "envoyproxy/ai-gateway".into(), ..Default::default() }),
                metrics: vec![metric(DURATION, durations, 1), metric(TOKENS, tokens, 2)],
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    Export {
        request: Request::Metrics(ExportMetricsServiceRequest { resource_metrics: resources }),
        service: service.to_string(),
        pods: pods.iter().map(|p| p.instance.clone()).collect(),
        time,
        requests,
        input_tokens,
        records: Vec::new(),
    }
}

/// The access-log export at `time` (unix seconds) of `pods` of `service`: one `ResourceLogs` per
/// pod with 1 to 3 records, each its own request at `time` plus a few microseconds, half of them
/// failed (kept for `error`), the others quick successes of few tokens (dropped).
pub fn log_export(service: &str, convention: Convention, pods: &[&Pod], time: u64, rng: &mut Xorshift) -> Export {
    let mut resources = Vec::new();
    let mut records = Vec::new();
    for pod in pods {
        let mut log_records = Vec::new();
        for n in 0..1 + rng.below(3) {
            let (provider, model) = PROVIDERS[rng.below(PROVIDERS.len() as u64) as usize];
            let id = format!("{}-{time}-{n}", pod.instance);
            let kept = rng.below(2) == 0;
            let (code, duration_ms, input, output) = if kept {
                (500, 20 + rng.below(200), 0, 0)
            } else {
                (200, 200 + rng.below(3000), 20 + rng.below(2000), 5 + rng.below(500))
            };
            let body = format!("[{time}] /v1/chat/completions model={model} {code} {duration_ms}ms");
            log_records.push(LogRecord {
                time_unix_nano: time * 1_000_000_000 + n * 1_000,
                observed_time_unix_nano: time * 1_000_000_000 + n * 1_000,
                body: Some(AnyValue { value: Some(any_value::Value::StringValue(body)) }),
                attributes: vec![
                    string_attribute("request.path", "/v1/chat/completions"),
                    string_attribute("response_code", &code.to_string()),
                    string_attribute("duration", &duration_ms.to_string()),
                    string_attribute("x-request-id", &id),
                    string_attribute("upstream_transport_failure_reason", "-"),
                    string_attribute("gen_ai.request.model", model),
                    string_attribute("gen_ai.response.model", model),
                    string_attribute("gen_ai.provider.name", provider),
                    string_attribute("gen_ai.usage.input_tokens", &input.to_string()),
                    string_attribute("gen_ai.usage.output_tokens", &output.to_string()),
                    string_attribute("session.id", "-"),
                ],
                ..Default::default()
            });
            records.push(LogEntry { id, kept });
        }
        resources.push(ResourceLogs {
            resource: Some(gateway_resource(convention, service, Some(&pod.instance))),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope { name: "envoy".into(), ..Default::default() }),
                log_records,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    Export {
        request: Request::Logs(ExportLogsServiceRequest { resource_logs: resources }),
        service: service.to_string(),
        pods: pods.iter().map(|p| p.instance.clone()).collect(),
        time,
        requests: 0,
        input_tokens: 0,
        records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(export: &Export) -> &ExportMetricsServiceRequest {
        let Request::Metrics(request) = &export.request else { panic!("a metrics export") };
        request
    }

    fn input_points(export: &Export) -> Vec<&HistogramDataPoint> {
        let mut out = Vec::new();
        for resource in &metrics(export).resource_metrics {
            for scope in &resource.scope_metrics {
                for metric in &scope.metrics {
                    if metric.name != TOKENS {
                        continue;
                    }
                    let Some(metric::Data::Histogram(h)) = &metric.data else { panic!("histogram") };
                    assert_eq!(h.aggregation_temporality, 2, "cumulative");
                    out.extend(h.data_points.iter().filter(|p| {
                        p.attributes
                            .iter()
                            .any(|a| a.key == "gen_ai.token.type" && format!("{:?}", a.value).contains("input"))
                    }));
                }
            }
        }
        out
    }

    #[test]
    fn test_export_reports_its_requests_and_cumulative_increase() {
        let mut rng = Xorshift::new(7);
        let mut a = Pod::new("pod-a", 999);
        let mut b = Pod::new("pod-b", 999);
        let mut reported = 0;
        let mut last_total = 0.0;
        for k in 0..5 {
            let export = export("svc", Convention::AigwService, &mut [&mut a, &mut b], 1000 + k, &mut rng);
            assert_eq!(export.pods, vec!["pod-a", "pod-b"]);
            let mut requests = 0;
            for resource in &metrics(&export).resource_metrics {
                for metric in &resource.scope_metrics[0].metrics {
                    let Some(metric::Data::Histogram(h)) = &metric.data else { panic!("histogram") };
                    for point in &h.data_points {
                        assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count, "buckets add up");
                        assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
                        if metric.name == DURATION {
                            assert_eq!(h.aggregation_temporality, 1, "delta");
                            requests += point.count;
                        }
                    }
                }
            }
            assert_eq!(requests, export.requests);
            reported += export.input_tokens;
            let total: f64 = input_points(&export).iter().map(|p| p.sum.unwrap()).sum();
            assert_eq!(total - last_total, export.input_tokens as f64, "the increase is what it reports");
            last_total = total;
        }
        assert_eq!(last_total, reported as f64);
    }

    #[test]
    fn test_log_export_lists_its_records_and_which_the_rules_keep() {
        let mut rng = Xorshift::new(11);
        let (a, b) = (Pod::new("svc-pod-0", 999), Pod::new("svc-pod-1", 999));
        let mut ids = std::collections::BTreeSet::new();
        let mut kept = 0;
        let mut all = 0;
        for time in 1000..1050 {
            let export = log_export("svc", Convention::JobName, &[&a, &b], time, &mut rng);
            let Request::Logs(request) = &export.request else { panic!("a logs export") };
            assert_eq!(request.resource_logs.len(), 2, "one resource per pod");
            let records: Vec<&LogRecord> =
                request.resource_logs.iter().flat_map(|r| &r.scope_logs[0].log_records).collect();
            assert_eq!(records.len(), export.records.len());
            for (record, entry) in records.iter().zip(&export.records) {
                let text = |key: &str| {
                    record.attributes.iter().find(|a| a.key == key).and_then(|a| match &a.value {
                        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) => Some(s.clone()),
                        _ => None,
                    })
                };
                assert_eq!(text("x-request-id").as_deref(), Some(entry.id.as_str()));
                let code: u32 = text("response_code").unwrap().parse().unwrap();
                let tokens: u64 = text("gen_ai.usage.input_tokens").unwrap().parse::<u64>().unwrap()
                    + text("gen_ai.usage.output_tokens").unwrap().parse::<u64>().unwrap();
                let duration: u64 = text("duration").unwrap().parse().unwrap();
                // Kept by the default rules (SPEC §5) exactly when it failed.
                assert_eq!(entry.kept, code >= 400);
                assert!(tokens < 10_000 && duration < 30_000, "no other reason to keep it");
                assert!(record.time_unix_nano / 1_000_000_000 == time);
                assert!(ids.insert(entry.id.clone()), "ids are unique: {}", entry.id);
                kept += u64::from(entry.kept);
                all += 1;
            }
        }
        assert!(all >= 100 && kept > all / 4 && kept < all * 3 / 4, "{kept} of {all} kept");
    }
}
