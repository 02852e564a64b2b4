//! Golden cases (`rules/tests/cases/`, vendored byte for byte from the shared cases) and OTLP
//! builders shaped like Envoy AI Gateway's exports. Compiled for tests and for other crates'
//! tests through the `testing` feature; never part of a release build's behaviour.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The folder holding the vendored golden cases.
pub fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("cases")
}

fn load<T: for<'de> Deserialize<'de>>(file: &str) -> T {
    let path = cases_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// `aggregation.yaml`.
#[derive(Debug, Deserialize)]
pub struct AggregationCases {
    /// A gen-ai-config pricing document.
    pub pricing: serde_json::Value,
    /// The cases.
    pub cases: Vec<AggregationCase>,
}

/// One aggregation case: points fed in order, expected outputs.
#[derive(Debug, Deserialize)]
pub struct AggregationCase {
    /// Name.
    pub name: String,
    /// Input points.
    pub points: Vec<CasePoint>,
    /// Expected values.
    pub expect: Vec<CaseExpect>,
}

/// One OTLP histogram point of a case.
#[derive(Clone, Debug, Deserialize)]
pub struct CasePoint {
    /// Service.
    pub service: String,
    /// Instance.
    pub instance: Option<String>,
    /// Metric name.
    pub metric: String,
    /// `delta` or `cumulative`.
    pub temporality: String,
    /// Point attributes.
    pub attrs: BTreeMap<String, String>,
    /// Start, unix seconds.
    pub start: u64,
    /// Time, unix seconds.
    pub time: u64,
    /// Count.
    pub count: u64,
    /// Sum.
    pub sum: f64,
    /// Bucket counts.
    pub bucket_counts: Vec<u64>,
    /// Bounds.
    pub explicit_bounds: Vec<f64>,
    /// Min.
    pub min: Option<f64>,
    /// Max.
    pub max: Option<f64>,
}

/// One expected output value.
#[derive(Clone, Debug, Deserialize)]
pub struct CaseExpect {
    /// Output metric name.
    pub metric: String,
    /// Service.
    pub service: String,
    /// Instance, for instance metrics.
    #[serde(default)]
    pub instance: Option<String>,
    /// Labels of the series.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Minute, unix seconds.
    pub minute: i64,
    /// Value, or null.
    pub value: Option<f64>,
}

/// `pricing.yaml`.
#[derive(Debug, Deserialize)]
pub struct PricingCases {
    /// Pricing document.
    pub pricing: serde_json::Value,
    /// Request costs.
    pub requests: Vec<PricingRequest>,
    /// Cached-token adjustments.
    pub cached_token_adjustments: Vec<CachedAdjustment>,
}

/// A request cost case.
#[derive(Debug, Deserialize)]
pub struct PricingRequest {
    /// Reported model.
    pub model: String,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// The name or alias that matched, or null.
    pub matched: Option<String>,
    /// Cost in micro-units.
    pub cost_micro: f64,
}

/// A cached-token adjustment case.
#[derive(Debug, Deserialize)]
pub struct CachedAdjustment {
    /// Model.
    pub model: String,
    /// Token type.
    pub token_type: String,
    /// Tokens.
    pub tokens: u64,
    /// Cost change in micro-units.
    pub cost_micro_adjustment: f64,
}

/// `sampling.yaml`.
#[derive(Debug, Deserialize)]
pub struct SamplingCases {
    /// Default thresholds.
    pub defaults: SamplingDefaults,
    /// The cases.
    pub cases: Vec<SamplingCase>,
}

/// Default thresholds as the cases state them.
#[derive(Debug, Deserialize)]
pub struct SamplingDefaults {
    /// Token threshold.
    pub token_threshold: Option<u64>,
    /// LLM slow threshold.
    pub slow_threshold_ms: Option<u64>,
    /// MCP slow threshold.
    pub mcp_slow_threshold_ms: Option<u64>,
    /// Cost threshold.
    pub cost_threshold: Option<f64>,
}

/// One access-log case.
#[derive(Debug, Deserialize)]
pub struct SamplingCase {
    /// Record attributes (strings or ints).
    pub attributes: BTreeMap<String, CaseValue>,
    /// `llm`, `mcp` or null.
    pub kind: Option<String>,
    /// Kept?
    pub keep: bool,
    /// Keep reasons.
    pub reasons: Vec<String>,
}

/// An attribute value of a case: text or integer.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum CaseValue {
    /// An integer.
    Int(i64),
    /// A string.
    Text(String),
}

impl CaseValue {
    /// As an OTLP value of the same type.
    pub fn any_value(&self) -> AnyValue {
        match self {
            CaseValue::Int(i) => AnyValue { value: Some(Value::IntValue(*i)) },
            CaseValue::Text(s) => AnyValue { value: Some(Value::StringValue(s.clone())) },
        }
    }
}

/// Loads `aggregation.yaml`.
pub fn aggregation_cases() -> AggregationCases {
    load("aggregation.yaml")
}

/// Loads `pricing.yaml`.
pub fn pricing_cases() -> PricingCases {
    load("pricing.yaml")
}

/// Loads `sampling.yaml`.
pub fn sampling_cases() -> SamplingCases {
    load("sampling.yaml")
}

impl CasePoint {
    /// The OTLP histogram point.
    pub fn data_point(&self) -> HistogramDataPoint {
        HistogramDataPoint {
            attributes: self.attrs.iter().map(|(k, v)| string_attribute(k, v)).collect(),
            start_time_unix_nano: self.start * 1_000_000_000,
            time_unix_nano: self.time * 1_000_000_000,
            count: self.count,
            sum: Some(self.sum),
            bucket_counts: self.bucket_counts.clone(),
            explicit_bounds: self.explicit_bounds.clone(),
            min: self.min,
            max: self.max,
            ..Default::default()
        }
    }

    /// OTLP temporality value.
    pub fn temporality(&self) -> i32 {
        match self.temporality.as_str() {
            "delta" => 1,
            "cumulative" => 2,
            other => panic!("unknown temporality {other}"),
        }
    }

    /// One export holding just this point, as the gateway would send it.
    pub fn request(&self, convention: Convention) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(gateway_resource(convention, &self.service, self.instance.as_deref())),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: "envoyproxy/ai-gateway".into(), ..Default::default() }),
                    metrics: vec![Metric {
                        name: self.metric.clone(),
                        unit: gateway_unit(&self.metric).into(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points: vec![self.data_point()],
                            aggregation_temporality: self.temporality(),
                        })),
                        ..Default::default()
                    }],
                    schema_url: String::new(),
                }],
                schema_url: "https://opentelemetry.io/schemas/1.39.0".into(),
            }],
        }
    }
}

impl CaseExpect {
    /// Compares with an evaluated value; `Err` says what differs.
    pub fn check(&self, actual: Option<f64>) -> Result<(), String> {
        match (self.value, actual) {
            (None, None) => Ok(()),
            (Some(expected), Some(actual)) if (expected - actual).abs() <= 1e-6 => Ok(()),
            (expected, actual) => Err(format!(
                "{} service={} instance={:?} labels={:?} minute={}: expected {expected:?}, got {actual:?}",
                self.metric, self.service, self.instance, self.labels, self.minute
            )),
        }
    }
}

pub use crate::fleet::{
    gateway_bounds, gateway_resource, gateway_unit, string_attribute, Convention, GatewayPod, Xorshift, FLEET_MODELS,
};

/// A delta `gen_ai.server.request.duration` histogram of one point for provider `openai`:
/// `count` requests of `seconds` each (bounds 0.5 s and 5 s), from `time - 1` to `time` (unix
/// seconds).
pub fn delta_duration(time: u64, count: u64, seconds: f64) -> Metric {
    let mut bucket_counts = vec![0; 3];
    bucket_counts[[0.5, 5.0].iter().filter(|bound| seconds > **bound).count()] = count;
    Metric {
        name: "gen_ai.server.request.duration".into(),
        data: Some(metric::Data::Histogram(Histogram {
            aggregation_temporality: 1,
            data_points: vec![HistogramDataPoint {
                attributes: vec![string_attribute("gen_ai.provider.name", "openai")],
                start_time_unix_nano: (time - 1) * 1_000_000_000,
                time_unix_nano: time * 1_000_000_000,
                count,
                sum: Some(seconds * count as f64),
                bucket_counts,
                explicit_bounds: vec![0.5, 5.0],
                min: Some(seconds),
                max: Some(seconds),
                ..Default::default()
            }],
        })),
        ..Default::default()
    }
}
