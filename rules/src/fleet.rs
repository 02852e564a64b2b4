//! Exports shaped exactly like Envoy AI Gateway's (SWIP-10 appendix A/B, UPSTREAM-NOTES §2):
//! the resource of a gateway pod, the four GenAI histograms with their bounds and attributes,
//! delta or cumulative. Used by the load generator, the benchmarks and the tests.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// A string attribute.
pub fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(Value::StringValue(value.to_string())) }),
        ..Default::default()
    }
}

/// How a gateway names itself (SPEC §1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// Merged SkyWalking: `job_name=envoy-ai-gateway`, `service.name=<gateway>`.
    JobName,
    /// SWIP-10 proposal: `service.name=envoy-ai-gateway`, `aigw.service=<gateway>`.
    AigwService,
}

/// The point attributes the gateway sets on its GenAI metrics for a chat request to `model` of
/// `provider`, with one `extra` attribute (`gen_ai.token.type`, `error.type`) where it has one.
pub fn point_attributes(provider: &str, model: &str, extra: Option<(&str, &str)>) -> Vec<KeyValue> {
    let mut attributes = vec![
        string_attribute("gen_ai.operation.name", "chat"),
        string_attribute("gen_ai.provider.name", provider),
        string_attribute("gen_ai.original.model", model),
        string_attribute("gen_ai.request.model", model),
        string_attribute("gen_ai.response.model", model),
    ];
    if let Some((key, value)) = extra {
        attributes.push(string_attribute(key, value));
    }
    attributes
}

/// The resource attributes of a gateway pod, as the OpenTelemetry Go SDK of Envoy AI Gateway
/// sends them.
pub fn gateway_resource(convention: Convention, service: &str, instance: Option<&str>) -> Resource {
    let mut attributes = match convention {
        Convention::JobName => {
            vec![string_attribute("job_name", "envoy-ai-gateway"), string_attribute("service.name", service)]
        }
        Convention::AigwService => {
            vec![string_attribute("service.name", "envoy-ai-gateway"), string_attribute("aigw.service", service)]
        }
    };
    if let Some(instance) = instance {
        attributes.push(string_attribute("service.instance.id", instance));
    }
    attributes.push(string_attribute("telemetry.sdk.language", "go"));
    attributes.push(string_attribute("telemetry.sdk.name", "opentelemetry"));
    attributes.push(string_attribute("telemetry.sdk.version", "1.40.0"));
    Resource { attributes, ..Default::default() }
}

/// The unit Envoy AI Gateway sets on a metric.
pub fn gateway_unit(metric: &str) -> &'static str {
    match metric {
        "gen_ai.client.token.usage" => "token",
        "gen_ai.server.request.duration"
        | "gen_ai.server.time_to_first_token"
        | "gen_ai.server.time_per_output_token" => "s",
        _ => "",
    }
}

/// Explicit bounds Envoy AI Gateway uses per metric (UPSTREAM-NOTES §2.1).
pub fn gateway_bounds(metric: &str) -> &'static [f64] {
    match metric {
        "gen_ai.client.token.usage" => &[
            1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
            67108864.0,
        ],
        "gen_ai.server.request.duration" => {
            &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
        }
        "gen_ai.server.time_to_first_token" => &[
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0,
            30.0, 45.0, 60.0,
        ],
        "gen_ai.server.time_per_output_token" => {
            &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
        }
        _ => &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
    }
}

/// Models a simulated fleet serves: (provider, model).
pub const FLEET_MODELS: [(&str, &str); 6] = [
    ("openai", "gpt-4o-mini-2024-07-18"),
    ("openai", "gpt-4.1"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("deepseek", "deepseek-chat"),
    ("gcp.vertex_ai", "gemini-2.5-flash"),
    ("openai", "llama3.2:latest"),
];

/// A small deterministic generator (xorshift64*), so fleets are reproducible without a
/// dependency on a random-number crate.
#[derive(Clone, Debug)]
pub struct Xorshift(u64);

impl Xorshift {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Xorshift {
        Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One gateway pod exporting its GenAI histograms, as the gateway's OpenTelemetry SDK does: one
/// `ResourceMetrics` with one scope and the four metrics, one point per attribute set.
#[derive(Clone, Debug)]
pub struct GatewayPod {
    /// Service (gateway) name.
    pub service: String,
    /// Instance (pod) name.
    pub instance: String,
    /// How the pod names itself.
    pub convention: Convention,
    /// How many of [`FLEET_MODELS`] it serves.
    pub models: usize,
    /// Cumulative (the gateway's default) or delta temporality.
    pub cumulative: bool,
    /// Seconds between exports.
    pub interval_seconds: u64,
    /// Unix seconds of the process start (cumulative start time).
    pub started: u64,
    rng: Xorshift,
    totals: std::collections::HashMap<(usize, usize), (u64, f64, Vec<u64>)>,
}

impl GatewayPod {
    /// A pod.
    pub fn new(
        service: &str,
        instance: &str,
        models: usize,
        cumulative: bool,
        interval_seconds: u64,
        started: u64,
    ) -> Self {
        let seed = service.bytes().chain(instance.bytes()).fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        GatewayPod {
            service: service.into(),
            instance: instance.into(),
            convention: Convention::JobName,
            models: models.clamp(1, FLEET_MODELS.len()),
            cumulative,
            interval_seconds,
            started,
            rng: Xorshift::new(seed),
            totals: Default::default(),
        }
    }

    /// Points per export.
    pub fn points_per_export(&self) -> usize {
        // Per model: 5 token types, duration ok + error, TTFT, TPOT.
        self.models * 9
    }

    /// Export number `index` (0-based): its time is `started + (index + 1) × interval`.
    pub fn export(&mut self, index: u64) -> ExportMetricsServiceRequest {
        let time = self.started + (index + 1) * self.interval_seconds;
        let start = if self.cumulative { self.started } else { time - self.interval_seconds };
        let mut token_points = Vec::new();
        let mut duration_points = Vec::new();
        let mut ttft_points = Vec::new();
        let mut tpot_points = Vec::new();
        for (model_index, (provider, model)) in FLEET_MODELS.iter().copied().enumerate().take(self.models) {
            let attributes = |extra| point_attributes(provider, model, extra);
            let requests = 1 + self.rng.below(20);
            let errors = self.rng.below(3).min(requests);
            let token_types = ["input", "output", "cached_input", "cache_creation_input", "reasoning"];
            for (slot, token_type) in token_types.iter().enumerate() {
                let mean = [2400.0, 350.0, 800.0, 120.0, 60.0][slot];
                let values: Vec<f64> = (0..requests).map(|_| (mean * (0.2 + 1.6 * self.rng.unit())).round()).collect();
                let point = self.point(
                    "gen_ai.client.token.usage",
                    model_index,
                    slot,
                    &values,
                    start,
                    time,
                    attributes(Some(("gen_ai.token.type", token_type))),
                );
                token_points.push(point);
            }
            let latencies: Vec<f64> = (0..requests - errors).map(|_| 0.2 + 6.0 * self.rng.unit()).collect();
            duration_points.push(self.point(
                "gen_ai.server.request.duration",
                model_index,
                5,
                &latencies,
                start,
                time,
                attributes(None),
            ));
            let failures: Vec<f64> = (0..errors).map(|_| 0.01 + 0.5 * self.rng.unit()).collect();
            duration_points.push(self.point(
                "gen_ai.server.request.duration",
                model_index,
                6,
                &failures,
                start,
                time,
                attributes(Some(("error.type", "_OTHER"))),
            ));
            let ttft: Vec<f64> = (0..requests - errors).map(|_| 0.05 + 1.5 * self.rng.unit()).collect();
            ttft_points.push(self.point(
                "gen_ai.server.time_to_first_token",
                model_index,
                7,
                &ttft,
                start,
                time,
                attributes(None),
            ));
            let tpot: Vec<f64> = (0..requests - errors).map(|_| 0.01 + 0.2 * self.rng.unit()).collect();
            tpot_points.push(self.point(
                "gen_ai.server.time_per_output_token",
                model_index,
                8,
                &tpot,
                start,
                time,
                attributes(None),
            ));
        }
        let temporality = if self.cumulative { 2 } else { 1 };
        let metric = |name: &str, description: &str, points: Vec<HistogramDataPoint>| Metric {
            name: name.into(),
            description: description.into(),
            unit: gateway_unit(name).into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: points,
                aggregation_temporality: temporality,
            })),
            ..Default::default()
        };
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(gateway_resource(self.convention, &self.service, Some(&self.instance))),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: "envoyproxy/ai-gateway".into(), ..Default::default() }),
                    metrics: vec![
                        metric("gen_ai.client.token.usage", "Number of tokens processed.", token_points),
                        metric(
                            "gen_ai.server.request.duration",
                            "Generative AI server request duration such as time-to-last byte or last output token.",
                            duration_points,
                        ),
                        metric(
                            "gen_ai.server.time_to_first_token",
                            "Time to receive first token in streaming responses.",
                            ttft_points,
                        ),
                        metric(
                            "gen_ai.server.time_per_output_token",
                            "Time per output token generated after the first token for successful responses.",
                            tpot_points,
                        ),
                    ],
                    schema_url: String::new(),
                }],
                schema_url: "https://opentelemetry.io/schemas/1.39.0".into(),
            }],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn point(
        &mut self,
        metric: &str,
        model: usize,
        slot: usize,
        values: &[f64],
        start: u64,
        time: u64,
        attributes: Vec<KeyValue>,
    ) -> HistogramDataPoint {
        let bounds = gateway_bounds(metric);
        let mut buckets = vec![0u64; bounds.len() + 1];
        for value in values {
            buckets[bounds.partition_point(|b| b < value)] += 1;
        }
        let sum: f64 = values.iter().map(|v| (v * 1e6).round() / 1e6).sum();
        let (min, max) = values.iter().fold((None, None), |(lo, hi): (Option<f64>, Option<f64>), v| {
            (Some(lo.map_or(*v, |l| l.min(*v))), Some(hi.map_or(*v, |h| h.max(*v))))
        });
        let (count, sum, buckets, min, max) = if self.cumulative {
            let total = self.totals.entry((model, slot)).or_insert_with(|| (0, 0.0, vec![0; bounds.len() + 1]));
            total.0 += values.len() as u64;
            total.1 += sum;
            for (t, b) in total.2.iter_mut().zip(&buckets) {
                *t += b;
            }
            (total.0, total.1, total.2.clone(), None, None)
        } else {
            (values.len() as u64, sum, buckets, min, max)
        };
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: start * 1_000_000_000,
            time_unix_nano: time * 1_000_000_000,
            count,
            sum: Some(sum),
            bucket_counts: buckets,
            explicit_bounds: bounds.to_vec(),
            min,
            max,
            ..Default::default()
        }
    }
}
