//! Gateway-shaped OTLP metric exports (after `fleet_export` of node/tests/common): per pod, a
//! DELTA `gen_ai.server.request.duration` histogram per provider and CUMULATIVE
//! `gen_ai.client.token.usage` histograms (input and output tokens) per provider, with the
//! gateway's bounds and attributes. Every export knows what it reports: its request count (what
//! `request_cpm` sums) and its increase of input tokens (what `input_token_rate` sums).

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
};
use tollgate_rules::fleet::{gateway_bounds, gateway_resource, gateway_unit, point_attributes, Convention, Xorshift};

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

/// One export request and what it reports.
#[derive(Clone, Debug)]
pub struct Export {
    /// The request, sent as it is on every attempt.
    pub request: ExportMetricsServiceRequest,
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
        request: ExportMetricsServiceRequest { resource_metrics: resources },
        service: service.to_string(),
        pods: pods.iter().map(|p| p.instance.clone()).collect(),
        time,
        requests,
        input_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input_points(export: &Export) -> Vec<&HistogramDataPoint> {
        let mut out = Vec::new();
        for resource in &export.request.resource_metrics {
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
            for resource in &export.request.resource_metrics {
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
}
