//! MCP metrics end to end (SPEC §3 MCP row and §3.1, UPSTREAM-NOTES §2.2 and §5): OTLP exports
//! shaped like Envoy AI Gateway's MCP instruments go through the in-memory pipeline, and every
//! MCP metric of the catalogue is checked at both scopes against values worked out by hand from
//! the inputs below. No expected value is computed by the code under test.
//!
//! # The scenario
//!
//! Service `mcp-gw`; T0 = 1_764_151_200 (a UTC hour boundary); minute k = [T0 + 60k, T0 + 60k + 60).
//! MCP bounds (s): 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10, so bucket index → upper bound in ms:
//! 0→5 1→10 2→25 3→50 4→100 5→250 6→500 7→1000 8→2500 9→5000 10→10000 11→overflow.
//!
//! * `pod-a` (`job_name` convention) exports DELTA, with min/max, at T0+20, T0+50 (minute 0),
//!   T0+80 (minute 1) and T0+140 (minute 2). Its first export is retried after T0+80.
//! * `pod-b` (`aigw.service` convention) exports CUMULATIVE (the gateway's default) from a process
//!   started at T0−100, at T0+30, T0+90, T0+150 and T0+270 (minutes 0, 1, 2, 4), with lifetime
//!   min/max as the Go SDK sends them. Its first points start 130 s before their time (≤ 300 s),
//!   so they count whole. Its T0+90 export is retried after T0+150.
//! * a resource without `service.instance.id` exports DELTA once at T0+140 (minute 2): it feeds
//!   the service scope only.
//! * Minute 3 has no data at all. In minute 4 only pod-b exports, and only one of its counters moved.
//!
//! Per-minute deltas (what each minute must contain), `{index: count}`, sums in seconds:
//!
//! `mcp.request.duration` (attributes `mcp.backend`, `error.type` on errors):
//! | series | minute 0 | minute 1 | minute 2 | minute 4 |
//! |---|---|---|---|---|
//! | A1 pod-a github ok  | {0:1,2:2,5:1} + {3:1} = c5 s0.273 max0.2 | {1:1} c1 s0.009 max0.009 | – | – |
//! | A2 pod-a github err | {7:1} c1 s0.7 max0.7 | – | {6:2} c2 s0.75 max0.45 | – |
//! | A3 pod-a context7 ok | {3:1,4:1} c2 s0.12 max0.08 | {11:1} c1 s12 max12 | – | – |
//! | B1 pod-b github ok  | {2:1,4:2} c3 s0.215 | {6:1,8:1} c2 s2.4 | {2:1} c1 s0.02 | c0 s0 |
//! | B2 pod-b context7 err | {9:1} c1 s3 | c0 s0 | {11:1} c1 s20 | c0 s0 |
//! | N1 (no instance) github ok | – | – | {6:1} c1 s0.5 max0.5 | – |
//!
//! `mcp.initialization.duration` (attribute `mcp.backend`):
//! | series | minute 0 | minute 1 | minute 2 | minute 4 |
//! |---|---|---|---|---|
//! | pod-a github   | {6:1,7:1} c2 s0.9 max0.6 | – | – | – |
//! | pod-a context7 | – | {8:1} c1 s1.5 max1.5 | – | – |
//! | pod-b github   | {5:1} c1 s0.2 | c0 | {7:2} c2 s1.7 | c0 |
//!
//! `mcp.method.count` (Float64Counter; attributes `mcp.method.name`, `status`, `mcp.backend`):
//! | series | minute 0 | minute 1 | minute 2 | minute 4 |
//! |---|---|---|---|---|
//! | pod-a initialize success github  | 2 | – | – | – |
//! | pod-a tools/list success github  | 3 | – | – | – |
//! | pod-a tools/call success github  | 4+1 = 5 | – | – | – |
//! | pod-a tools/call error github    | 1 | – | 2 | – |
//! | pod-a tools/call success context7 | 2 | – | – | – |
//! | pod-a tools/call failed context7 | – | 2 | – | – |
//! | pod-a tools/call error context7  | – | 1 | – | – |
//! | pod-a initialize success context7 | – | 1 | – | – |
//! | pod-b tools/call success github (totals 5, 8, 8, 10) | 5 | 3 | 0 | 2 |
//! | pod-b tools/call error context7 (totals 1, 1, 4, 4)  | 1 | 0 | 3 | 0 |
//! | pod-b initialize success github (totals 1, 1, 1, 1)  | 1 | 0 | 0 | 0 |
//! | pod-b tools/list success context7 (totals 6, 8, 11, 11) | 6 | 2 | 3 | 0 |
//! | N tools/call success github | – | – | 1 | – |
//!
//! `mcp.capabilities.negotiated` (Float64Counter; `capability.type`, `capability.side`, `mcp.backend`):
//! | series | minute 0 | minute 1 | minute 2 | minute 4 |
//! |---|---|---|---|---|
//! | pod-a tools client github, tools server github, prompts server github | 1 each | – | – | – |
//! | pod-a resources server context7, tools server context7 | – | 1 each | – | – |
//! | pod-b tools server github (totals 1, 1, 2, 2)     | 1 | 0 | 1 | 0 |
//! | pod-b resources server github (totals 1, 1, 1, 1) | 1 | 0 | 0 | 0 |

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use std::collections::BTreeMap;
use tollgate_rules::testing::{gateway_resource, string_attribute, Convention};
use tollgate_rules::{Catalogue, CompiledRules, IngestReport, MemoryPipeline, PriceTable, Scope, Step};

const NS: u64 = 1_000_000_000;
/// A UTC hour boundary (unix seconds).
const T0: u64 = 1_764_151_200;
const SERVICE: &str = "mcp-gw";
const POD_A: &str = "pod-a";
const POD_B: &str = "pod-b";
/// Start of pod-b's process (cumulative start time).
const B_START: u64 = T0 - 100;
const DELTA: i32 = 1;
const CUMULATIVE: i32 = 2;

/// `mcp.request.duration` / `mcp.initialization.duration` bounds (UPSTREAM-NOTES §2.2).
const BOUNDS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const DURATION: &str = "mcp.request.duration";
const INITIALIZATION: &str = "mcp.initialization.duration";
const METHODS: &str = "mcp.method.count";
const CAPABILITIES: &str = "mcp.capabilities.negotiated";

const N: Option<f64> = None;

fn s(value: f64) -> Option<f64> {
    Some(value)
}

// ---------------------------------------------------------------------------------------------
// OTLP builders
// ---------------------------------------------------------------------------------------------

fn attributes(pairs: &[(&str, &str)]) -> Vec<KeyValue> {
    pairs.iter().map(|(k, v)| string_attribute(k, v)).collect()
}

/// Per-bucket counts (`BOUNDS.len() + 1` of them) from `(index, count)` pairs.
fn buckets(sparse: &[(usize, u64)]) -> Vec<u64> {
    let mut out = vec![0; BOUNDS.len() + 1];
    for (index, count) in sparse {
        out[*index] += count;
    }
    out
}

/// One export of one gateway resource, as the gateway's OpenTelemetry Go SDK sends it: one
/// `ResourceMetrics`, scope `envoyproxy/ai-gateway`, the MCP instruments that have points.
#[derive(Clone, Debug)]
struct Export {
    convention: Convention,
    instance: Option<&'static str>,
    temporality: i32,
    start: u64,
    time: u64,
    durations: Vec<HistogramDataPoint>,
    initializations: Vec<HistogramDataPoint>,
    methods: Vec<NumberDataPoint>,
    capabilities: Vec<NumberDataPoint>,
}

impl Export {
    fn new(convention: Convention, instance: Option<&'static str>, temporality: i32, start: u64, time: u64) -> Self {
        Export {
            convention,
            instance,
            temporality,
            start,
            time,
            durations: Vec::new(),
            initializations: Vec::new(),
            methods: Vec::new(),
            capabilities: Vec::new(),
        }
    }

    fn histogram(
        &self,
        pairs: &[(&str, &str)],
        sparse: &[(usize, u64)],
        sum: f64,
        extremes: (f64, f64),
    ) -> HistogramDataPoint {
        let bucket_counts = buckets(sparse);
        HistogramDataPoint {
            attributes: attributes(pairs),
            start_time_unix_nano: self.start * NS,
            time_unix_nano: self.time * NS,
            count: bucket_counts.iter().sum(),
            sum: Some(sum),
            bucket_counts,
            explicit_bounds: BOUNDS.to_vec(),
            min: Some(extremes.0),
            max: Some(extremes.1),
            ..Default::default()
        }
    }

    fn number(&self, pairs: &[(&str, &str)], value: f64) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attributes(pairs),
            start_time_unix_nano: self.start * NS,
            time_unix_nano: self.time * NS,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        }
    }

    /// An `mcp.request.duration` point of a backend; failed requests carry `error.type`.
    fn duration(self, backend: &str, error: bool, sparse: &[(usize, u64)], sum: f64, extremes: (f64, f64)) -> Self {
        if error {
            self.duration_with(&[("mcp.backend", backend), ("error.type", "_OTHER")], sparse, sum, extremes)
        } else {
            self.duration_with(&[("mcp.backend", backend)], sparse, sum, extremes)
        }
    }

    fn duration_with(
        mut self,
        pairs: &[(&str, &str)],
        sparse: &[(usize, u64)],
        sum: f64,
        extremes: (f64, f64),
    ) -> Self {
        let point = self.histogram(pairs, sparse, sum, extremes);
        self.durations.push(point);
        self
    }

    /// An `mcp.initialization.duration` point of a backend.
    fn initialization(mut self, backend: &str, sparse: &[(usize, u64)], sum: f64, extremes: (f64, f64)) -> Self {
        let point = self.histogram(&[("mcp.backend", backend)], sparse, sum, extremes);
        self.initializations.push(point);
        self
    }

    /// An `mcp.method.count` point.
    fn method(self, method: &str, status: &str, backend: &str, value: f64) -> Self {
        self.method_with(&[("mcp.method.name", method), ("status", status), ("mcp.backend", backend)], value)
    }

    fn method_with(mut self, pairs: &[(&str, &str)], value: f64) -> Self {
        let point = self.number(pairs, value);
        self.methods.push(point);
        self
    }

    /// An `mcp.capabilities.negotiated` point.
    fn capability(self, capability: &str, side: &str, backend: &str, value: f64) -> Self {
        self.capability_with(
            &[("capability.type", capability), ("capability.side", side), ("mcp.backend", backend)],
            value,
        )
    }

    fn capability_with(mut self, pairs: &[(&str, &str)], value: f64) -> Self {
        let point = self.number(pairs, value);
        self.capabilities.push(point);
        self
    }

    fn points(&self) -> u64 {
        (self.durations.len() + self.initializations.len() + self.methods.len() + self.capabilities.len()) as u64
    }

    fn request(&self) -> ExportMetricsServiceRequest {
        let histogram = |name: &str, unit: &str, points: &[HistogramDataPoint]| Metric {
            name: name.into(),
            unit: unit.into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: points.to_vec(),
                aggregation_temporality: self.temporality,
            })),
            ..Default::default()
        };
        let counter = |name: &str, points: &[NumberDataPoint]| Metric {
            name: name.into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: points.to_vec(),
                aggregation_temporality: self.temporality,
                is_monotonic: true,
            })),
            ..Default::default()
        };
        let mut metrics = Vec::new();
        // The gateway sets no unit on the request duration and (wrongly) `token` on the
        // initialization duration, whose values are seconds (UPSTREAM-NOTES §2.2).
        if !self.durations.is_empty() {
            metrics.push(histogram(DURATION, "", &self.durations));
        }
        if !self.initializations.is_empty() {
            metrics.push(histogram(INITIALIZATION, "token", &self.initializations));
        }
        if !self.methods.is_empty() {
            metrics.push(counter(METHODS, &self.methods));
        }
        if !self.capabilities.is_empty() {
            metrics.push(counter(CAPABILITIES, &self.capabilities));
        }
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(gateway_resource(self.convention, SERVICE, self.instance)),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: "envoyproxy/ai-gateway".into(), ..Default::default() }),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

/// pod-a: delta temporality, min/max of the interval (see the module table).
fn pod_a_exports() -> [Export; 4] {
    let export = |start, time| Export::new(Convention::JobName, Some(POD_A), DELTA, start, time);
    [
        // T0+20, minute 0.
        export(T0 - 10, T0 + 20)
            // values 0.003 (≤0.005: 0), 0.02, 0.02 (≤0.025: 2), 0.2 (≤0.25: 5); sum 0.243
            .duration("github", false, &[(0, 1), (2, 2), (5, 1)], 0.243, (0.003, 0.2))
            // value 0.7 (≤1: 7)
            .duration("github", true, &[(7, 1)], 0.7, (0.7, 0.7))
            // values 0.04 (≤0.05: 3), 0.08 (≤0.1: 4); sum 0.12
            .duration("context7", false, &[(3, 1), (4, 1)], 0.12, (0.04, 0.08))
            // values 0.3 (≤0.5: 6), 0.6 (≤1: 7); sum 0.9
            .initialization("github", &[(6, 1), (7, 1)], 0.9, (0.3, 0.6))
            .method("initialize", "success", "github", 2.0)
            .method("tools/list", "success", "github", 3.0)
            .method("tools/call", "success", "github", 4.0)
            .method("tools/call", "error", "github", 1.0)
            .method("tools/call", "success", "context7", 2.0)
            .capability("tools", "client", "github", 1.0)
            .capability("tools", "server", "github", 1.0)
            .capability("prompts", "server", "github", 1.0),
        // T0+50, minute 0 again.
        export(T0 + 20, T0 + 50)
            // value 0.03 (≤0.05: 3)
            .duration("github", false, &[(3, 1)], 0.03, (0.03, 0.03))
            .method("tools/call", "success", "github", 1.0),
        // T0+80, minute 1.
        export(T0 + 50, T0 + 80)
            // value 0.009 (≤0.01: 1)
            .duration("github", false, &[(1, 1)], 0.009, (0.009, 0.009))
            // value 12 (> 10: overflow 11)
            .duration("context7", false, &[(11, 1)], 12.0, (12.0, 12.0))
            // value 1.5 (≤2.5: 8)
            .initialization("context7", &[(8, 1)], 1.5, (1.5, 1.5))
            .method("tools/call", "failed", "context7", 2.0)
            .method("tools/call", "error", "context7", 1.0)
            .method("initialize", "success", "context7", 1.0)
            .capability("resources", "server", "context7", 1.0)
            .capability("tools", "server", "context7", 1.0),
        // T0+140, minute 2.
        export(T0 + 80, T0 + 140)
            // values 0.3, 0.45 (≤0.5: 6); sum 0.75
            .duration("github", true, &[(6, 2)], 0.75, (0.3, 0.45))
            .method("tools/call", "error", "github", 2.0),
    ]
}

/// pod-b: cumulative temporality, running totals since B_START, lifetime min/max.
fn pod_b_exports() -> [Export; 4] {
    let export = |time| Export::new(Convention::AigwService, Some(POD_B), CUMULATIVE, B_START, time);
    [
        // T0+30, minute 0: the first points count whole (start 130 s before).
        export(T0 + 30)
            // values 0.015 (2), 0.1, 0.1 (4); sum 0.215
            .duration("github", false, &[(2, 1), (4, 2)], 0.215, (0.015, 0.1))
            // value 3 (≤5: 9)
            .duration("context7", true, &[(9, 1)], 3.0, (3.0, 3.0))
            // value 0.2 (≤0.25: 5)
            .initialization("github", &[(5, 1)], 0.2, (0.2, 0.2))
            .method("tools/call", "success", "github", 5.0)
            .method("tools/call", "error", "context7", 1.0)
            .method("initialize", "success", "github", 1.0)
            .method("tools/list", "success", "context7", 6.0)
            .capability("tools", "server", "github", 1.0)
            .capability("resources", "server", "github", 1.0),
        // T0+90, minute 1.
        export(T0 + 90)
            // + values 0.4 (6), 2.0 (8): sum 0.215 + 2.4 = 2.615
            .duration("github", false, &[(2, 1), (4, 2), (6, 1), (8, 1)], 2.615, (0.015, 2.0))
            // unchanged
            .duration("context7", true, &[(9, 1)], 3.0, (3.0, 3.0))
            .initialization("github", &[(5, 1)], 0.2, (0.2, 0.2))
            .method("tools/call", "success", "github", 8.0)
            .method("tools/call", "error", "context7", 1.0)
            .method("initialize", "success", "github", 1.0)
            .method("tools/list", "success", "context7", 8.0)
            .capability("tools", "server", "github", 1.0)
            .capability("resources", "server", "github", 1.0),
        // T0+150, minute 2.
        export(T0 + 150)
            // + value 0.02 (2): sum 2.635
            .duration("github", false, &[(2, 2), (4, 2), (6, 1), (8, 1)], 2.635, (0.015, 2.0))
            // + value 20 (overflow): sum 23, lifetime max 20 (must not be used)
            .duration("context7", true, &[(9, 1), (11, 1)], 23.0, (3.0, 20.0))
            // + values 0.8, 0.9 (≤1: 7): sum 1.9
            .initialization("github", &[(5, 1), (7, 2)], 1.9, (0.2, 0.9))
            .method("tools/call", "success", "github", 8.0)
            .method("tools/call", "error", "context7", 4.0)
            .method("initialize", "success", "github", 1.0)
            .method("tools/list", "success", "context7", 11.0)
            .capability("tools", "server", "github", 2.0)
            .capability("resources", "server", "github", 1.0),
        // T0+270, minute 4: only tools/call success github moved (8 → 10).
        export(T0 + 270)
            .duration("github", false, &[(2, 2), (4, 2), (6, 1), (8, 1)], 2.635, (0.015, 2.0))
            .duration("context7", true, &[(9, 1), (11, 1)], 23.0, (3.0, 20.0))
            .initialization("github", &[(5, 1), (7, 2)], 1.9, (0.2, 0.9))
            .method("tools/call", "success", "github", 10.0)
            .method("tools/call", "error", "context7", 4.0)
            .method("initialize", "success", "github", 1.0)
            .method("tools/list", "success", "context7", 11.0)
            .capability("tools", "server", "github", 2.0)
            .capability("resources", "server", "github", 1.0),
    ]
}

/// The resource without an instance: one delta export at T0+140 (minute 2).
fn no_instance_export() -> Export {
    Export::new(Convention::JobName, None, DELTA, T0 + 110, T0 + 140)
        // value 0.5 (≤0.5: 6)
        .duration("github", false, &[(6, 1)], 0.5, (0.5, 0.5))
        .method("tools/call", "success", "github", 1.0)
}

fn ingest(pipeline: &mut MemoryPipeline, export: &Export, report: &mut IngestReport) {
    let one = pipeline.ingest(export.request(), (export.time + 1) * NS);
    assert_eq!(one.rejected_total(), 0, "{}", one.error_message("data points"));
    report.merge(&one);
}

/// The module's scenario, ingested in time order with two retried exports.
fn scenario() -> (MemoryPipeline, IngestReport) {
    let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
    let mut report = IngestReport::default();
    let [a0, a1, a2, a3] = pod_a_exports();
    let [b0, b1, b2, b3] = pod_b_exports();
    let n0 = no_instance_export();
    for export in [&a0, &b0, &a1, &a2, &a0, &b1, &a3, &n0, &b2, &b1, &b3] {
        ingest(&mut pipeline, export, &mut report);
    }
    (pipeline, report)
}

// ---------------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------------

type Labels = &'static [(&'static str, &'static str)];
/// Series of one answer: label set → `(step start, value)` points.
type Answer = BTreeMap<BTreeMap<String, String>, Vec<(i64, Option<f64>)>>;

fn service(name: &str) -> String {
    format!("meter_envoy_ai_gw_mcp_{name}")
}

fn instance(name: &str) -> String {
    format!("meter_envoy_ai_gw_mcp_instance_{name}")
}

fn close(actual: Option<f64>, expected: Option<f64>) -> bool {
    match (actual, expected) {
        (None, None) => true,
        // Expected values are exact decimals; the tolerance only absorbs f64 rounding of / and ·1000.
        (Some(a), Some(e)) => (a - e).abs() <= 1e-9 * e.abs().max(1.0),
        _ => false,
    }
}

/// Compares whole answers (exactly the expected series, every point) and reports all failures
/// at once.
struct Checker<'a> {
    pipeline: &'a MemoryPipeline,
    failures: Vec<String>,
    points: usize,
}

impl<'a> Checker<'a> {
    fn new(pipeline: &'a MemoryPipeline) -> Self {
        Checker { pipeline, failures: Vec::new(), points: 0 }
    }

    fn expect(
        &mut self,
        name: &str,
        instance: Option<&str>,
        step: Step,
        start: u64,
        rows: &[(Labels, Vec<Option<f64>>)],
    ) {
        let steps = rows.first().map_or(1, |(_, values)| values.len()) as u64;
        let end = start + steps * step.seconds() as u64;
        let Some(result) = self.pipeline.query(name, SERVICE, instance, start as i64, end as i64, step) else {
            self.failures.push(format!("{name}: not in the catalogue"));
            return;
        };
        let where_ = format!("{name} instance={instance:?} step={step}");
        let actual: Answer = result.series.iter().map(|s| (s.labels.clone(), s.points.clone())).collect();
        if actual.len() != result.series.len() {
            self.failures.push(format!("{where_}: two series with the same labels: {:?}", result.series));
        }
        let expected: Answer = rows
            .iter()
            .map(|(labels, values)| {
                let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                let points = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ((start + i as u64 * step.seconds() as u64) as i64, *v))
                    .collect();
                (labels, points)
            })
            .collect();
        let actual_keys: Vec<_> = actual.keys().collect();
        let expected_keys: Vec<_> = expected.keys().collect();
        if actual_keys != expected_keys {
            self.failures.push(format!("{where_}: series {actual_keys:?}, expected {expected_keys:?}"));
        }
        for (labels, points) in &expected {
            let Some(got) = actual.get(labels) else { continue };
            let times: Vec<i64> = got.iter().map(|(t, _)| *t).collect();
            let want_times: Vec<i64> = points.iter().map(|(t, _)| *t).collect();
            if times != want_times {
                self.failures.push(format!("{where_} {labels:?}: times {times:?}, expected {want_times:?}"));
                continue;
            }
            for ((time, value), (_, want)) in got.iter().zip(points) {
                self.points += 1;
                if !close(*value, *want) {
                    let offset = (*time as u64 - T0) / 60;
                    self.failures.push(format!(
                        "{where_} {labels:?} at T0+{offset}min ({time}): got {value:?}, expected {want:?}"
                    ));
                }
            }
        }
    }

    /// Minute steps T0 .. T0+5 min: `[minute 0, 1, 2, 3, 4]`.
    fn minutes(&mut self, name: &str, instance: Option<&str>, rows: &[(Labels, [Option<f64>; 5])]) {
        let rows: Vec<(Labels, Vec<Option<f64>>)> = rows.iter().map(|(l, v)| (*l, v.to_vec())).collect();
        self.expect(name, instance, Step::Minute, T0, &rows);
    }

    /// Hour steps [T0, T0+1 h) and [T0+1 h, T0+2 h): the value of the first hour; the second
    /// hour has no data and must be null.
    fn hour(&mut self, name: &str, instance: Option<&str>, rows: &[(Labels, Option<f64>)]) {
        let rows: Vec<(Labels, Vec<Option<f64>>)> = rows.iter().map(|(l, v)| (*l, vec![*v, None])).collect();
        self.expect(name, instance, Step::Hour, T0, &rows);
    }

    fn finish(self, at_least: usize) {
        assert!(self.failures.is_empty(), "{} mismatches:\n{}", self.failures.len(), self.failures.join("\n"));
        assert!(self.points >= at_least, "only {} points checked", self.points);
    }
}

const P50: Labels = &[("p", "50")];
const P75: Labels = &[("p", "75")];
const P90: Labels = &[("p", "90")];
const P95: Labels = &[("p", "95")];
const P99: Labels = &[("p", "99")];
const GITHUB: Labels = &[("backend", "github")];
const CONTEXT7: Labels = &[("backend", "context7")];
const INITIALIZE: Labels = &[("method", "initialize")];
const TOOLS_LIST: Labels = &[("method", "tools/list")];
const TOOLS_CALL: Labels = &[("method", "tools/call")];
const GITHUB_INITIALIZE: Labels = &[("backend", "github"), ("method", "initialize")];
const GITHUB_TOOLS_LIST: Labels = &[("backend", "github"), ("method", "tools/list")];
const GITHUB_TOOLS_CALL: Labels = &[("backend", "github"), ("method", "tools/call")];
const CONTEXT7_INITIALIZE: Labels = &[("backend", "context7"), ("method", "initialize")];
const CONTEXT7_TOOLS_LIST: Labels = &[("backend", "context7"), ("method", "tools/list")];
const CONTEXT7_TOOLS_CALL: Labels = &[("backend", "context7"), ("method", "tools/call")];
const TOOLS: Labels = &[("capability_type", "tools")];
const PROMPTS: Labels = &[("capability_type", "prompts")];
const RESOURCES: Labels = &[("capability_type", "resources")];
const NONE: Labels = &[];

/// The MCP catalogue as SPEC §3 (MCP row) and UPSTREAM-NOTES §5 define it: name, unit, source,
/// output labels (`p` for percentiles).
const EXPECTED_CATALOGUE: [(&str, &str, &str, &[&str]); 13] = [
    ("request_cpm", "calls/min", DURATION, &[]),
    ("request_latency_avg", "ms", DURATION, &[]),
    ("request_latency_percentile", "ms", DURATION, &["p"]),
    ("method_cpm", "calls/min", METHODS, &["method"]),
    ("error_cpm", "calls/min", METHODS, &[]),
    ("initialization_latency_avg", "ms", INITIALIZATION, &[]),
    ("initialization_latency_percentile", "ms", INITIALIZATION, &["p"]),
    ("capabilities_cpm", "calls/min", CAPABILITIES, &["capability_type"]),
    ("backend_request_cpm", "calls/min", DURATION, &["backend"]),
    ("backend_request_latency_avg", "ms", DURATION, &["backend"]),
    ("backend_method_cpm", "calls/min", METHODS, &["backend", "method"]),
    ("backend_error_cpm", "calls/min", METHODS, &["backend"]),
    // Not in the SPEC §3 list, but in SkyWalking's rules (UPSTREAM-NOTES §5) and in docs.
    ("backend_initialization_latency_avg", "ms", INITIALIZATION, &["backend"]),
];

// ---------------------------------------------------------------------------------------------
// Catalogue and docs
// ---------------------------------------------------------------------------------------------

#[test]
fn test_mcp_catalogue_has_every_mcp_metric_at_both_scopes() {
    let catalogue = Catalogue::default();
    let index = catalogue.index();
    let mut actual: Vec<(String, String, Vec<String>, Scope)> = catalogue
        .entries()
        .into_iter()
        .filter(|e| e.name.starts_with("meter_envoy_ai_gw_mcp_"))
        .map(|e| (e.name, e.unit, e.labels, e.scope))
        .collect();
    let mut expected = Vec::new();
    for (name, unit, source, labels) in EXPECTED_CATALOGUE {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        expected.push((service(name), unit.to_string(), labels.clone(), Scope::Service));
        expected.push((instance(name), unit.to_string(), labels, Scope::Instance));
        for full in [service(name), instance(name)] {
            let rule = &index[&full].rule;
            assert_eq!(rule.source, source, "{full}");
            if labels_are_percentile(name) {
                assert_eq!(rule.percentiles, vec![50, 75, 90, 95, 99], "{full}");
            }
        }
    }
    actual.sort_by(|a, b| a.0.cmp(&b.0));
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(actual, expected);
}

fn labels_are_percentile(name: &str) -> bool {
    name.ends_with("_percentile")
}

/// Label names and sources: the code, docs/metrics.md and SPEC §3 / UPSTREAM-NOTES §2.2 agree.
#[test]
fn test_mcp_label_names_match_docs_and_spec() {
    let catalogue = Catalogue::default();
    // SPEC §3 names the labels method, capability_type, backend; UPSTREAM-NOTES §2.2 gives the
    // gateway's attributes they come from.
    for (label, attribute) in
        [("method", "mcp.method.name"), ("backend", "mcp.backend"), ("capability_type", "capability.type")]
    {
        let source = &catalogue.labels[label];
        assert_eq!(source.attributes, vec![attribute.to_string()], "label {label}");
        assert_eq!(source.default, "unknown", "label {label}");
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let docs = std::fs::read_to_string(&path).expect("docs/metrics.md");
    let cells = |line: &str| -> Vec<String> { line.split('|').map(|c| c.trim().to_string()).collect() };
    let ticked = |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(str::to_string).collect() };

    // The labels table.
    for (label, attribute) in
        [("method", "mcp.method.name"), ("backend", "mcp.backend"), ("capability_type", "capability.type")]
    {
        let row = docs
            .lines()
            .find(|l| l.starts_with(&format!("| `{label}` |")))
            .unwrap_or_else(|| panic!("docs: no row for label {label}"));
        assert_eq!(ticked(&cells(row)[2]), vec![attribute.to_string()], "docs label {label}: {row}");
    }

    // The MCP table: one row per rule, with the catalogue's unit, source and labels.
    let section: Vec<&str> =
        docs.lines().skip_while(|l| *l != "## MCP metrics").skip(1).take_while(|l| !l.starts_with("## ")).collect();
    assert!(section.iter().any(|l| l.contains("`meter_envoy_ai_gw_mcp_`")), "service prefix undocumented");
    assert!(section.iter().any(|l| l.contains("`meter_envoy_ai_gw_mcp_instance_`")), "instance prefix undocumented");
    let rows: BTreeMap<String, Vec<String>> = section
        .iter()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let c = cells(l);
            (ticked(&c[1])[0].clone(), c)
        })
        .collect();
    let mut documented: Vec<&str> = rows.keys().map(String::as_str).collect();
    let mut expected_names: Vec<&str> = EXPECTED_CATALOGUE.iter().map(|e| e.0).collect();
    documented.sort_unstable();
    expected_names.sort_unstable();
    assert_eq!(documented, expected_names, "docs MCP table rows");
    for (name, unit, source, labels) in EXPECTED_CATALOGUE {
        let row = &rows[name];
        assert_eq!(row[4], unit, "docs unit of {name}");
        assert_eq!(ticked(&row[2]).first().map(String::as_str), Some(source), "docs source of {name}");
        let expected: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        assert_eq!(ticked(&row[5]), expected, "docs labels of {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Ingest
// ---------------------------------------------------------------------------------------------

#[test]
fn test_mcp_exports_are_merged_once_and_retries_are_duplicates() {
    let (_, report) = scenario();
    // pod-a: 12 + 2 + 8 + 2 points; pod-b: 4 exports × 9 points; no-instance: 2 points.
    let [a0, a1, a2, a3] = pod_a_exports();
    let b = pod_b_exports();
    assert_eq!((a0.points(), a1.points(), a2.points(), a3.points()), (12, 2, 8, 2));
    assert!(b.iter().all(|e| e.points() == 9));
    assert_eq!(no_instance_export().points(), 2);
    assert_eq!(report.merged, 12 + 2 + 8 + 2 + 4 * 9 + 2);
    // Retried: a0 (12 points) and b1 (9 points).
    assert_eq!(report.duplicates, 12 + 9);
    // pod-b's first points started 130 s before their time (≤ max_delta_gap 300 s): merged whole.
    assert_eq!(report.baselines, 0);
    assert_eq!(report.rejected_total(), 0);
    assert!(report.dropped.is_empty(), "{:?}", report.dropped);
}

// ---------------------------------------------------------------------------------------------
// Minute values
// ---------------------------------------------------------------------------------------------

#[test]
fn test_mcp_service_scope_minute_values() {
    let (pipeline, _) = scenario();
    let mut c = Checker::new(&pipeline);

    // Σ count over A1..A3, B1, B2, N1:
    // m0: 5+1+2+3+1 = 12; m1: 1+1+2+0 = 4; m2: 2+1+1+1 = 5; m3: no data; m4: B1, B2 moved by 0.
    c.minutes(&service("request_cpm"), None, &[(NONE, [s(12.0), s(4.0), s(5.0), N, s(0.0)])]);
    // 1000·Σsum/Σcount: m0 (0.273+0.7+0.12+0.215+3)=4.308/12 → 359 ms;
    // m1 (0.009+12+2.4)=14.409/4 → 3602.25 ms; m2 (0.75+0.02+20+0.5)=21.27/5 → 4254 ms;
    // m4 count 0 → absent.
    c.minutes(&service("request_latency_avg"), None, &[(NONE, [s(359.0), s(3602.25), s(4254.0), N, N])]);
    // Buckets (all minutes include pod-b cumulative deltas, so the max is unknown: no clamp, and
    // a rank in the overflow bucket is null).
    // m0: {0:1,2:3,3:2,4:3,5:1,7:1,9:1} total 12; cumulative 1,1,4,6,9,10,10,11,11,12.
    //   p50 ceil(6)=6 → idx3 50; p75 ceil(9)=9 → idx4 100; p90 ceil(10.8)=11 → idx7 1000;
    //   p95 ceil(11.4)=12 → idx9 5000; p99 ceil(11.88)=12 → 5000.
    // m1: {1:1,6:1,8:1,11:1} total 4; cumulative idx1:1 idx6:2 idx8:3 idx11:4.
    //   p50 2 → 500; p75 3 → 2500; p90 ceil(3.6)=4, p95 4, p99 4 → overflow, max unknown → null.
    // m2: {2:1,6:3,11:1} total 5; cumulative idx2:1 idx6:4 idx11:5.
    //   p50 ceil(2.5)=3 → 500; p75 ceil(3.75)=4 → 500; p90 ceil(4.5)=5, p95 5, p99 5 → null.
    // m4: total 0 → null.
    c.minutes(
        &service("request_latency_percentile"),
        None,
        &[
            (P50, [s(50.0), s(500.0), s(500.0), N, N]),
            (P75, [s(100.0), s(2500.0), s(500.0), N, N]),
            (P90, [s(1000.0), N, N, N, N]),
            (P95, [s(5000.0), N, N, N, N]),
            (P99, [s(5000.0), N, N, N, N]),
        ],
    );
    // initialize: m0 2 (A) + 1 (B) = 3; m1 1 (A context7) + 0 (B) = 1; m2 0 (B); m4 0 (B).
    // tools/list: m0 3 (A) + 6 (B) = 9; m1 2 (B); m2 3 (B); m4 0.
    // tools/call: m0 A 5+1+2 = 8, B 5+1 = 6 → 14; m1 A failed 2 + error 1, B 3 + 0 → 6;
    //   m2 A error 2, B 0 + 3, N 1 → 6; m4 B 2 + 0 → 2.
    c.minutes(
        &service("method_cpm"),
        None,
        &[
            (INITIALIZE, [s(3.0), s(1.0), s(0.0), N, s(0.0)]),
            (TOOLS_LIST, [s(9.0), s(2.0), s(3.0), N, s(0.0)]),
            (TOOLS_CALL, [s(14.0), s(6.0), s(6.0), N, s(2.0)]),
        ],
    );
    // status=error only (`failed` is not an error): m0 A 1 + B 1 = 2; m1 A 1 + B 0 = 1 (A's 2
    // failed calls excluded); m2 A 2 + B 3 = 5; m4 B 0.
    c.minutes(&service("error_cpm"), None, &[(NONE, [s(2.0), s(1.0), s(5.0), N, s(0.0)])]);
    // m0 (0.9+0.2)/(2+1) = 0.36666.. s → 1100/3 ms; m1 1.5/1 (+ pod-b c0) → 1500; m2 1.7/2 → 850;
    // m4 count 0 → absent.
    c.minutes(&service("initialization_latency_avg"), None, &[(NONE, [s(1100.0 / 3.0), s(1500.0), s(850.0), N, N])]);
    // m0: {5:1,6:1,7:1} total 3, max unknown (pod-b): p50 ceil(1.5)=2 → idx6 500; p75 ceil(2.25)=3
    //   → idx7 1000; p90/p95/p99 3 → 1000.
    // m1: {8:1} from pod-a only (pod-b's delta is empty), max 1.5 known: idx8 (2500) clamped to 1500.
    // m2: {7:2}, max unknown → 1000 for every rank. m4: total 0 → null.
    c.minutes(
        &service("initialization_latency_percentile"),
        None,
        &[
            (P50, [s(500.0), s(1500.0), s(1000.0), N, N]),
            (P75, [s(1000.0), s(1500.0), s(1000.0), N, N]),
            (P90, [s(1000.0), s(1500.0), s(1000.0), N, N]),
            (P95, [s(1000.0), s(1500.0), s(1000.0), N, N]),
            (P99, [s(1000.0), s(1500.0), s(1000.0), N, N]),
        ],
    );
    // tools: m0 A client 1 + A server 1 + B 1 = 3; m1 A context7 1 + B 0 = 1; m2 B 1; m4 B 0.
    // prompts: m0 A 1. resources: m0 B 1; m1 A 1 + B 0 = 1; m2 B 0; m4 B 0.
    c.minutes(
        &service("capabilities_cpm"),
        None,
        &[
            (TOOLS, [s(3.0), s(1.0), s(1.0), N, s(0.0)]),
            (PROMPTS, [s(1.0), N, N, N, N]),
            (RESOURCES, [s(1.0), s(1.0), s(0.0), N, s(0.0)]),
        ],
    );
    // github: m0 A1 5 + A2 1 + B1 3 = 9; m1 A1 1 + B1 2 = 3; m2 A2 2 + B1 1 + N1 1 = 4; m4 B1 0.
    // context7: m0 A3 2 + B2 1 = 3; m1 A3 1 + B2 0 = 1; m2 B2 1; m4 B2 0.
    c.minutes(
        &service("backend_request_cpm"),
        None,
        &[(GITHUB, [s(9.0), s(3.0), s(4.0), N, s(0.0)]), (CONTEXT7, [s(3.0), s(1.0), s(1.0), N, s(0.0)])],
    );
    // github: m0 (0.273+0.7+0.215)=1.188/9 → 132 ms; m1 (0.009+2.4)=2.409/3 → 803 ms;
    //   m2 (0.75+0.02+0.5)=1.27/4 → 317.5 ms; m4 count 0 → absent.
    // context7: m0 (0.12+3)=3.12/3 → 1040 ms; m1 12/1 → 12000; m2 20/1 → 20000; m4 absent.
    c.minutes(
        &service("backend_request_latency_avg"),
        None,
        &[(GITHUB, [s(132.0), s(803.0), s(317.5), N, N]), (CONTEXT7, [s(1040.0), s(12000.0), s(20000.0), N, N])],
    );
    // (github, initialize): m0 A 2 + B 1 = 3; B 0 after.   (github, tools/list): m0 A 3 only.
    // (github, tools/call): m0 A 5 + A err 1 + B 5 = 11; m1 B 3; m2 A err 2 + B 0 + N 1 = 3; m4 B 2.
    // (context7, initialize): m1 A 1.   (context7, tools/list): B 6, 2, 3, 0.
    // (context7, tools/call): m0 A 2 + B err 1 = 3; m1 A failed 2 + A err 1 + B 0 = 3; m2 B 3; m4 B 0.
    // Check: the rows add up to method_cpm: m0 3+3+11+6+3 = 26 = 3+9+14; m1 0+3+1+2+3 = 9 = 1+2+6.
    c.minutes(
        &service("backend_method_cpm"),
        None,
        &[
            (GITHUB_INITIALIZE, [s(3.0), s(0.0), s(0.0), N, s(0.0)]),
            (GITHUB_TOOLS_LIST, [s(3.0), N, N, N, N]),
            (GITHUB_TOOLS_CALL, [s(11.0), s(3.0), s(3.0), N, s(2.0)]),
            (CONTEXT7_INITIALIZE, [N, s(1.0), N, N, N]),
            (CONTEXT7_TOOLS_LIST, [s(6.0), s(2.0), s(3.0), N, s(0.0)]),
            (CONTEXT7_TOOLS_CALL, [s(3.0), s(3.0), s(3.0), N, s(0.0)]),
        ],
    );
    // github errors: only pod-a (delta): m0 1, m2 2; no github error series in m1 or m4.
    // context7 errors: m0 B 1; m1 A 1 + B 0 = 1; m2 B 3; m4 B 0.
    c.minutes(
        &service("backend_error_cpm"),
        None,
        &[(GITHUB, [s(1.0), N, s(2.0), N, N]), (CONTEXT7, [s(1.0), s(1.0), s(3.0), N, s(0.0)])],
    );
    // github: m0 (0.9+0.2)/3 → 1100/3 ms; m1 only pod-b with count 0 → absent; m2 1.7/2 → 850.
    // context7: m1 1.5/1 → 1500.
    c.minutes(
        &service("backend_initialization_latency_avg"),
        None,
        &[(GITHUB, [s(1100.0 / 3.0), N, s(850.0), N, N]), (CONTEXT7, [N, s(1500.0), N, N, N])],
    );
    c.finish(13 * 5);
}

#[test]
fn test_mcp_instance_scope_minute_values_of_the_delta_pod() {
    let (pipeline, _) = scenario();
    let mut c = Checker::new(&pipeline);
    let pod = Some(POD_A);

    // m0 A1 5 + A2 1 + A3 2 = 8; m1 A1 1 + A3 1 = 2; m2 A2 2; nothing in m3, m4.
    c.minutes(&instance("request_cpm"), pod, &[(NONE, [s(8.0), s(2.0), s(2.0), N, N])]);
    // m0 (0.273+0.7+0.12)=1.093/8 → 136.625 ms; m1 (0.009+12)=12.009/2 → 6004.5; m2 0.75/2 → 375.
    c.minutes(&instance("request_latency_avg"), pod, &[(NONE, [s(136.625), s(6004.5), s(375.0), N, N])]);
    // Delta points only: the max is known.
    // m0: {0:1,2:2,3:2,4:1,5:1,7:1} total 8, max 0.7; cumulative idx0:1 idx2:3 idx3:5 idx4:6 idx5:7 idx7:8.
    //   p50 4 → idx3 50; p75 6 → idx4 100; p90 ceil(7.2)=8, p95 ceil(7.6)=8, p99 ceil(7.92)=8 → idx7
    //   (1000) clamped to the max 700.
    // m1: {1:1,11:1} total 2, max 12: p50 1 → idx1 10; p75 ceil(1.5)=2 → overflow → max 12000; p90..p99 same.
    // m2: {6:2} max 0.45: every rank → idx6 (500) clamped to 450.
    c.minutes(
        &instance("request_latency_percentile"),
        pod,
        &[
            (P50, [s(50.0), s(10.0), s(450.0), N, N]),
            (P75, [s(100.0), s(12000.0), s(450.0), N, N]),
            (P90, [s(700.0), s(12000.0), s(450.0), N, N]),
            (P95, [s(700.0), s(12000.0), s(450.0), N, N]),
            (P99, [s(700.0), s(12000.0), s(450.0), N, N]),
        ],
    );
    // initialize: m0 2, m1 1 (context7). tools/list: m0 3. tools/call: m0 5+1+2 = 8; m1 failed 2 +
    // error 1 = 3; m2 error 2.
    c.minutes(
        &instance("method_cpm"),
        pod,
        &[
            (INITIALIZE, [s(2.0), s(1.0), N, N, N]),
            (TOOLS_LIST, [s(3.0), N, N, N, N]),
            (TOOLS_CALL, [s(8.0), s(3.0), s(2.0), N, N]),
        ],
    );
    // m0 1 (github); m1 1 (context7; the 2 failed calls are not errors); m2 2 (github).
    c.minutes(&instance("error_cpm"), pod, &[(NONE, [s(1.0), s(1.0), s(2.0), N, N])]);
    // m0 0.9/2 → 450 ms; m1 1.5/1 → 1500 ms.
    c.minutes(&instance("initialization_latency_avg"), pod, &[(NONE, [s(450.0), s(1500.0), N, N, N])]);
    // m0: {6:1,7:1}, max 0.6: p50 1 → idx6 500 (max 0.6 is above 0.5: no clamp); p75 ceil(1.5)=2 →
    //   idx7 (1000) clamped to 600; p90..p99 → 600. m1: {8:1} max 1.5 → 2500 clamped to 1500.
    c.minutes(
        &instance("initialization_latency_percentile"),
        pod,
        &[
            (P50, [s(500.0), s(1500.0), N, N, N]),
            (P75, [s(600.0), s(1500.0), N, N, N]),
            (P90, [s(600.0), s(1500.0), N, N, N]),
            (P95, [s(600.0), s(1500.0), N, N, N]),
            (P99, [s(600.0), s(1500.0), N, N, N]),
        ],
    );
    // tools: m0 client 1 + server 1 = 2; m1 1 (context7). prompts: m0 1. resources: m1 1.
    c.minutes(
        &instance("capabilities_cpm"),
        pod,
        &[(TOOLS, [s(2.0), s(1.0), N, N, N]), (PROMPTS, [s(1.0), N, N, N, N]), (RESOURCES, [N, s(1.0), N, N, N])],
    );
    // github: m0 A1 5 + A2 1 = 6; m1 A1 1; m2 A2 2. context7: m0 A3 2; m1 A3 1.
    c.minutes(
        &instance("backend_request_cpm"),
        pod,
        &[(GITHUB, [s(6.0), s(1.0), s(2.0), N, N]), (CONTEXT7, [s(2.0), s(1.0), N, N, N])],
    );
    // github: m0 (0.273+0.7)=0.973/6 → 973/6 ms; m1 0.009/1 → 9; m2 0.75/2 → 375.
    // context7: m0 0.12/2 → 60; m1 12/1 → 12000.
    c.minutes(
        &instance("backend_request_latency_avg"),
        pod,
        &[(GITHUB, [s(973.0 / 6.0), s(9.0), s(375.0), N, N]), (CONTEXT7, [s(60.0), s(12000.0), N, N, N])],
    );
    // (github, tools/call): m0 success 5 + error 1 = 6; m2 error 2.
    // (context7, tools/call): m0 success 2; m1 failed 2 + error 1 = 3.
    c.minutes(
        &instance("backend_method_cpm"),
        pod,
        &[
            (GITHUB_INITIALIZE, [s(2.0), N, N, N, N]),
            (GITHUB_TOOLS_LIST, [s(3.0), N, N, N, N]),
            (GITHUB_TOOLS_CALL, [s(6.0), N, s(2.0), N, N]),
            (CONTEXT7_INITIALIZE, [N, s(1.0), N, N, N]),
            (CONTEXT7_TOOLS_CALL, [s(2.0), s(3.0), N, N, N]),
        ],
    );
    c.minutes(
        &instance("backend_error_cpm"),
        pod,
        &[(GITHUB, [s(1.0), N, s(2.0), N, N]), (CONTEXT7, [N, s(1.0), N, N, N])],
    );
    // github: m0 0.9/2 → 450. context7: m1 1.5/1 → 1500.
    c.minutes(
        &instance("backend_initialization_latency_avg"),
        pod,
        &[(GITHUB, [s(450.0), N, N, N, N]), (CONTEXT7, [N, s(1500.0), N, N, N])],
    );
    c.finish(13 * 5);
}

#[test]
fn test_mcp_instance_scope_minute_values_of_the_cumulative_pod() {
    let (pipeline, _) = scenario();
    let mut c = Checker::new(&pipeline);
    let pod = Some(POD_B);

    // Deltas of the running counts: B1 3, 2, 1, 0 and B2 1, 0, 1, 0 → 4, 2, 2, –, 0.
    c.minutes(&instance("request_cpm"), pod, &[(NONE, [s(4.0), s(2.0), s(2.0), N, s(0.0)])]);
    // m0 (0.215+3)=3.215/4 → 803.75 ms; m1 2.4/2 → 1200; m2 (0.02+20)=20.02/2 → 10010; m4 count 0.
    c.minutes(&instance("request_latency_avg"), pod, &[(NONE, [s(803.75), s(1200.0), s(10010.0), N, N])]);
    // Cumulative input: min/max are ignored (the lifetime max 20 s must not appear).
    // m0: {2:1,4:2,9:1} total 4; cumulative idx2:1 idx4:3 idx9:4. p50 2 → 100; p75 3 → 100;
    //   p90 ceil(3.6)=4 → 5000; p95 4 → 5000; p99 4 → 5000.
    // m1: {6:1,8:1}: p50 1 → 500; p75 2 → 2500; p90..p99 2 → 2500.
    // m2: {2:1,11:1}: p50 1 → 25; p75..p99 2 → overflow, max unknown → null.
    c.minutes(
        &instance("request_latency_percentile"),
        pod,
        &[
            (P50, [s(100.0), s(500.0), s(25.0), N, N]),
            (P75, [s(100.0), s(2500.0), N, N, N]),
            (P90, [s(5000.0), s(2500.0), N, N, N]),
            (P95, [s(5000.0), s(2500.0), N, N, N]),
            (P99, [s(5000.0), s(2500.0), N, N, N]),
        ],
    );
    // initialize (github) totals 1,1,1,1 → 1,0,0,0; tools/list (context7) 6,8,11,11 → 6,2,3,0;
    // tools/call: success github 5,8,8,10 → 5,3,0,2 plus error context7 1,1,4,4 → 1,0,3,0 = 6,3,3,2.
    c.minutes(
        &instance("method_cpm"),
        pod,
        &[
            (INITIALIZE, [s(1.0), s(0.0), s(0.0), N, s(0.0)]),
            (TOOLS_LIST, [s(6.0), s(2.0), s(3.0), N, s(0.0)]),
            (TOOLS_CALL, [s(6.0), s(3.0), s(3.0), N, s(2.0)]),
        ],
    );
    c.minutes(&instance("error_cpm"), pod, &[(NONE, [s(1.0), s(0.0), s(3.0), N, s(0.0)])]);
    // m0 0.2/1 → 200 ms; m1 count 0 → absent; m2 (1.9−0.2)=1.7/2 → 850; m4 absent.
    c.minutes(&instance("initialization_latency_avg"), pod, &[(NONE, [s(200.0), N, s(850.0), N, N])]);
    // m0 {5:1} → 250 for every rank; m1 empty → null; m2 {7:2} → 1000; m4 null.
    let init = [s(250.0), N, s(1000.0), N, N];
    c.minutes(
        &instance("initialization_latency_percentile"),
        pod,
        &[(P50, init), (P75, init), (P90, init), (P95, init), (P99, init)],
    );
    // tools totals 1,1,2,2 → 1,0,1,0; resources 1,1,1,1 → 1,0,0,0.
    c.minutes(
        &instance("capabilities_cpm"),
        pod,
        &[(TOOLS, [s(1.0), s(0.0), s(1.0), N, s(0.0)]), (RESOURCES, [s(1.0), s(0.0), s(0.0), N, s(0.0)])],
    );
    c.minutes(
        &instance("backend_request_cpm"),
        pod,
        &[(GITHUB, [s(3.0), s(2.0), s(1.0), N, s(0.0)]), (CONTEXT7, [s(1.0), s(0.0), s(1.0), N, s(0.0)])],
    );
    // github: m0 0.215/3 → 215/3 ms; m1 2.4/2 → 1200; m2 0.02/1 → 20.
    // context7: m0 3/1 → 3000; m1 count 0 → absent (while its cpm is 0); m2 20/1 → 20000.
    c.minutes(
        &instance("backend_request_latency_avg"),
        pod,
        &[(GITHUB, [s(215.0 / 3.0), s(1200.0), s(20.0), N, N]), (CONTEXT7, [s(3000.0), N, s(20000.0), N, N])],
    );
    c.minutes(
        &instance("backend_method_cpm"),
        pod,
        &[
            (GITHUB_INITIALIZE, [s(1.0), s(0.0), s(0.0), N, s(0.0)]),
            (GITHUB_TOOLS_CALL, [s(5.0), s(3.0), s(0.0), N, s(2.0)]),
            (CONTEXT7_TOOLS_LIST, [s(6.0), s(2.0), s(3.0), N, s(0.0)]),
            (CONTEXT7_TOOLS_CALL, [s(1.0), s(0.0), s(3.0), N, s(0.0)]),
        ],
    );
    c.minutes(&instance("backend_error_cpm"), pod, &[(CONTEXT7, [s(1.0), s(0.0), s(3.0), N, s(0.0)])]);
    c.minutes(&instance("backend_initialization_latency_avg"), pod, &[(GITHUB, [s(200.0), N, s(850.0), N, N])]);
    c.finish(13 * 5);
}

// ---------------------------------------------------------------------------------------------
// Specific behaviours
// ---------------------------------------------------------------------------------------------

/// SPEC §3: a minute with no data has no value; an average over zero count is absent (not 0),
/// while the rate of a minute that received data with zero count is 0.
#[test]
fn test_mcp_missing_minute_is_null_and_zero_count_average_is_absent() {
    let (pipeline, _) = scenario();
    let catalogue = Catalogue::default();
    let mut checked = 0;
    // Minute 3 (T0+180) has no data for any entity: every MCP metric at both scopes is null there.
    // Unlabelled metrics still answer with their series (one, or one per rank); labelled ones
    // have no series at all.
    for entry in catalogue.entries().into_iter().filter(|e| e.name.starts_with("meter_envoy_ai_gw_mcp_")) {
        let instances: &[Option<&str>] =
            if entry.scope == Scope::Instance { &[Some(POD_A), Some(POD_B)] } else { &[None] };
        for &inst in instances {
            let result =
                pipeline.query(&entry.name, SERVICE, inst, (T0 + 180) as i64, (T0 + 240) as i64, Step::Minute).unwrap();
            let grouped = entry.labels.iter().any(|l| l != "p");
            let expected_series = if grouped {
                0
            } else if entry.labels.is_empty() {
                1
            } else {
                5
            };
            assert_eq!(result.series.len(), expected_series, "{} {inst:?}", entry.name);
            for series in &result.series {
                assert_eq!(series.points, vec![((T0 + 180) as i64, None)], "{} {inst:?}", entry.name);
            }
            checked += 1;
        }
    }
    // 13 service-scope metrics once, 13 instance-scope metrics for each pod.
    assert_eq!(checked, 13 + 13 * 2);

    let mut c = Checker::new(&pipeline);
    // Minute 4: pod-b's histograms did not move → rate 0, average and percentiles absent.
    let m4 = |name: &str, inst: Option<&str>, value: Option<f64>, c: &mut Checker| {
        let rows: Vec<(Labels, Vec<Option<f64>>)> = vec![(NONE, vec![value])];
        c.expect(name, inst, Step::Minute, T0 + 240, &rows);
    };
    for (scope_name, inst) in [(service as fn(&str) -> String, None), (instance, Some(POD_B))] {
        m4(&scope_name("request_cpm"), inst, s(0.0), &mut c);
        m4(&scope_name("request_latency_avg"), inst, N, &mut c);
        m4(&scope_name("error_cpm"), inst, s(0.0), &mut c);
        m4(&scope_name("initialization_latency_avg"), inst, N, &mut c);
    }
    // pod-a sent nothing in minute 4: null, not 0.
    m4(&instance("request_cpm"), Some(POD_A), N, &mut c);
    m4(&instance("error_cpm"), Some(POD_A), N, &mut c);
    // Minute 1: pod-b's context7 requests did not move: cpm 0 but average absent (github moved:
    // 2 requests, 2.4 s → 1200 ms).
    c.expect(
        &instance("backend_request_cpm"),
        Some(POD_B),
        Step::Minute,
        T0 + 60,
        &[(GITHUB, vec![s(2.0)]), (CONTEXT7, vec![s(0.0)])],
    );
    c.expect(
        &instance("backend_request_latency_avg"),
        Some(POD_B),
        Step::Minute,
        T0 + 60,
        &[(GITHUB, vec![s(1200.0)]), (CONTEXT7, vec![N])],
    );
    c.finish(14);
}

/// UPSTREAM-NOTES §5: `error_cpm` is `tagEqual('status','error')`; `failed` is not counted.
#[test]
fn test_mcp_error_cpm_counts_status_error_only() {
    let (pipeline, _) = scenario();
    let mut c = Checker::new(&pipeline);
    let minute1 = |value: Option<f64>| vec![(NONE, vec![value])];
    // pod-a minute 1: failed 2 + error 1 (context7) → error_cpm 1, method_cpm tools/call 3.
    c.expect(&instance("error_cpm"), Some(POD_A), Step::Minute, T0 + 60, &minute1(s(1.0)));
    c.expect(&instance("backend_error_cpm"), Some(POD_A), Step::Minute, T0 + 60, &[(CONTEXT7, vec![s(1.0)])]);
    c.expect(
        &instance("backend_method_cpm"),
        Some(POD_A),
        Step::Minute,
        T0 + 60,
        &[(CONTEXT7_INITIALIZE, vec![s(1.0)]), (CONTEXT7_TOOLS_CALL, vec![s(3.0)])],
    );
    // Service minute 1: pod-a error 1 + pod-b error (context7, unchanged) 0 = 1.
    c.expect(&service("error_cpm"), None, Step::Minute, T0 + 60, &minute1(s(1.0)));
    c.finish(5);
}

/// SPEC §3.1 on MCP histograms: first bucket with cumulative ≥ ceil(r/100·total), its upper
/// bound in ms, never above the known max; the overflow bucket reports the max; with cumulative
/// input the max is unknown and an overflow rank is null.
#[test]
fn test_mcp_percentiles_clamp_to_max_and_overflow_reports_max() {
    let (pipeline, _) = scenario();
    let mut c = Checker::new(&pipeline);
    let ranks = |values: [Option<f64>; 5]| -> Vec<(Labels, Vec<Option<f64>>)> {
        [P50, P75, P90, P95, P99].into_iter().zip(values).map(|(p, v)| (p, vec![v])).collect()
    };
    // pod-a minute 0: p90 falls into bucket ≤1 s whose bound 1000 ms is above the max 0.7 s → 700.
    c.expect(
        &instance("request_latency_percentile"),
        Some(POD_A),
        Step::Minute,
        T0,
        &ranks([s(50.0), s(100.0), s(700.0), s(700.0), s(700.0)]),
    );
    // pod-a minute 1: {≤10 ms: 1, overflow: 1}; p75 = overflow → the max 12 s.
    c.expect(
        &instance("request_latency_percentile"),
        Some(POD_A),
        Step::Minute,
        T0 + 60,
        &ranks([s(10.0), s(12000.0), s(12000.0), s(12000.0), s(12000.0)]),
    );
    // Service minute 1 merges pod-a's known max with pod-b's cumulative delta (unknown extremes):
    // the step's max is unknown, so overflow ranks are null and nothing is clamped.
    c.expect(
        &service("request_latency_percentile"),
        None,
        Step::Minute,
        T0 + 60,
        &ranks([s(500.0), s(2500.0), N, N, N]),
    );
    // pod-b minute 2: overflow with cumulative input → null even though the point said max=20 s.
    c.expect(
        &instance("request_latency_percentile"),
        Some(POD_B),
        Step::Minute,
        T0 + 120,
        &ranks([s(25.0), N, N, N, N]),
    );
    // Service initialization minute 1: pod-a {≤2.5 s: 1} max 1.5 s plus pod-b's empty cumulative
    // delta (no values, so it does not make the max unknown) → 1500 for every rank.
    c.expect(&service("initialization_latency_percentile"), None, Step::Minute, T0 + 60, &ranks([s(1500.0); 5]));
    c.finish(25);
}

/// SPEC §3: for an hour step, rates are Σ over the hour / 60 and averages and percentiles come
/// from the merged state — i.e. the hour equals the merge of its minutes. The next hour, with no
/// data, is null.
#[test]
fn test_mcp_hour_step_equals_merging_its_minutes() {
    let (pipeline, _) = scenario();
    let mut c = Checker::new(&pipeline);

    // ---- service ----
    // request_cpm: (12+4+5+0)/60 = 21/60.
    c.hour(&service("request_cpm"), None, &[(NONE, s(21.0 / 60.0))]);
    // Σsum 4.308+14.409+21.27 = 39.987 s over 21 → 39987/21 ms.
    c.hour(&service("request_latency_avg"), None, &[(NONE, s(39987.0 / 21.0))]);
    // Buckets m0 {0:1,2:3,3:2,4:3,5:1,7:1,9:1} + m1 {1:1,6:1,8:1,11:1} + m2 {2:1,6:3,11:1}
    // = {0:1,1:1,2:4,3:2,4:3,5:1,6:4,7:1,8:1,9:1,11:2}, total 21, max unknown;
    // cumulative 1,2,6,8,11,12,16,17,18,19,19,21.
    // p50 ceil(10.5)=11 → idx4 100; p75 ceil(15.75)=16 → idx6 500; p90 ceil(18.9)=19 → idx9 5000;
    // p95 ceil(19.95)=20 and p99 ceil(20.79)=21 → overflow → null.
    c.hour(
        &service("request_latency_percentile"),
        None,
        &[(P50, s(100.0)), (P75, s(500.0)), (P90, s(5000.0)), (P95, N), (P99, N)],
    );
    // initialize 3+1+0+0 = 4; tools/list 9+2+3+0 = 14; tools/call 14+6+6+2 = 28.
    c.hour(
        &service("method_cpm"),
        None,
        &[(INITIALIZE, s(4.0 / 60.0)), (TOOLS_LIST, s(14.0 / 60.0)), (TOOLS_CALL, s(28.0 / 60.0))],
    );
    // 2+1+5+0 = 8.
    c.hour(&service("error_cpm"), None, &[(NONE, s(8.0 / 60.0))]);
    // (0.9+0.2+1.5+1.7) = 4.3 s over 3+1+2 = 6 → 4300/6 ms.
    c.hour(&service("initialization_latency_avg"), None, &[(NONE, s(4300.0 / 6.0))]);
    // {5:1,6:1,7:1} + {8:1} + {7:2} = {5:1,6:1,7:3,8:1}, total 6, max unknown; cumulative 1,2,5,6.
    // p50 3 → idx7 1000; p75 ceil(4.5)=5 → idx7 1000; p90 ceil(5.4)=6, p95 6, p99 6 → idx8 2500.
    c.hour(
        &service("initialization_latency_percentile"),
        None,
        &[(P50, s(1000.0)), (P75, s(1000.0)), (P90, s(2500.0)), (P95, s(2500.0)), (P99, s(2500.0))],
    );
    // tools 3+1+1+0 = 5; prompts 1; resources 1+1+0+0 = 2.
    c.hour(
        &service("capabilities_cpm"),
        None,
        &[(TOOLS, s(5.0 / 60.0)), (PROMPTS, s(1.0 / 60.0)), (RESOURCES, s(2.0 / 60.0))],
    );
    // github 9+3+4+0 = 16; context7 3+1+1+0 = 5.
    c.hour(&service("backend_request_cpm"), None, &[(GITHUB, s(16.0 / 60.0)), (CONTEXT7, s(5.0 / 60.0))]);
    // github (1.188+2.409+1.27) = 4.867 s / 16 → 304.1875 ms; context7 (3.12+12+20) = 35.12 / 5 → 7024.
    c.hour(&service("backend_request_latency_avg"), None, &[(GITHUB, s(304.1875)), (CONTEXT7, s(7024.0))]);
    // (github, initialize) 3; (github, tools/list) 3; (github, tools/call) 11+3+3+2 = 19;
    // (context7, initialize) 1; (context7, tools/list) 6+2+3+0 = 11; (context7, tools/call) 3+3+3+0 = 9.
    // Check: 3+3+19+1+11+9 = 46 = 4+14+28.
    c.hour(
        &service("backend_method_cpm"),
        None,
        &[
            (GITHUB_INITIALIZE, s(3.0 / 60.0)),
            (GITHUB_TOOLS_LIST, s(3.0 / 60.0)),
            (GITHUB_TOOLS_CALL, s(19.0 / 60.0)),
            (CONTEXT7_INITIALIZE, s(1.0 / 60.0)),
            (CONTEXT7_TOOLS_LIST, s(11.0 / 60.0)),
            (CONTEXT7_TOOLS_CALL, s(9.0 / 60.0)),
        ],
    );
    // github 1+2 = 3; context7 1+1+3+0 = 5.
    c.hour(&service("backend_error_cpm"), None, &[(GITHUB, s(3.0 / 60.0)), (CONTEXT7, s(5.0 / 60.0))]);
    // github (0.9+0.2+1.7) = 2.8 s / (2+1+2) = 5 → 560 ms; context7 1.5/1 → 1500.
    c.hour(&service("backend_initialization_latency_avg"), None, &[(GITHUB, s(560.0)), (CONTEXT7, s(1500.0))]);

    // ---- pod-a (delta) ----
    let pod = Some(POD_A);
    // 8+2+2 = 12.
    c.hour(&instance("request_cpm"), pod, &[(NONE, s(12.0 / 60.0))]);
    // (1.093+12.009+0.75) = 13.852 s / 12 → 13852/12 ms.
    c.hour(&instance("request_latency_avg"), pod, &[(NONE, s(13852.0 / 12.0))]);
    // {0:1,2:2,3:2,4:1,5:1,7:1} + {1:1,11:1} + {6:2} = {0:1,1:1,2:2,3:2,4:1,5:1,6:2,7:1,11:1},
    // total 12, max 12 (known); cumulative idx0:1 1:2 2:4 3:6 4:7 5:8 6:10 7:11 11:12.
    // p50 6 → idx3 50; p75 9 → idx6 500; p90 ceil(10.8)=11 → idx7 1000; p95 ceil(11.4)=12 and
    // p99 ceil(11.88)=12 → overflow → 12000.
    c.hour(
        &instance("request_latency_percentile"),
        pod,
        &[(P50, s(50.0)), (P75, s(500.0)), (P90, s(1000.0)), (P95, s(12000.0)), (P99, s(12000.0))],
    );
    // initialize 2+1 = 3; tools/list 3; tools/call 8+3+2 = 13.
    c.hour(
        &instance("method_cpm"),
        pod,
        &[(INITIALIZE, s(3.0 / 60.0)), (TOOLS_LIST, s(3.0 / 60.0)), (TOOLS_CALL, s(13.0 / 60.0))],
    );
    // 1+1+2 = 4.
    c.hour(&instance("error_cpm"), pod, &[(NONE, s(4.0 / 60.0))]);
    // (0.9+1.5) = 2.4 s / 3 → 800 ms.
    c.hour(&instance("initialization_latency_avg"), pod, &[(NONE, s(800.0))]);
    // {6:1,7:1,8:1}, max 1.5: p50 ceil(1.5)=2 → idx7 1000 (below the max); p75 ceil(2.25)=3 →
    // idx8 (2500) clamped to 1500; p90..p99 → 1500.
    c.hour(
        &instance("initialization_latency_percentile"),
        pod,
        &[(P50, s(1000.0)), (P75, s(1500.0)), (P90, s(1500.0)), (P95, s(1500.0)), (P99, s(1500.0))],
    );
    // tools 2+1 = 3; prompts 1; resources 1.
    c.hour(
        &instance("capabilities_cpm"),
        pod,
        &[(TOOLS, s(3.0 / 60.0)), (PROMPTS, s(1.0 / 60.0)), (RESOURCES, s(1.0 / 60.0))],
    );
    // github 6+1+2 = 9; context7 2+1 = 3.
    c.hour(&instance("backend_request_cpm"), pod, &[(GITHUB, s(9.0 / 60.0)), (CONTEXT7, s(3.0 / 60.0))]);
    // github (0.973+0.009+0.75) = 1.732 s / 9 → 1732/9 ms; context7 (0.12+12) = 12.12 / 3 → 4040.
    c.hour(&instance("backend_request_latency_avg"), pod, &[(GITHUB, s(1732.0 / 9.0)), (CONTEXT7, s(4040.0))]);
    // (github, tools/call) 6+2 = 8; (context7, tools/call) 2+3 = 5. Check: 2+3+8+1+5 = 19 = 3+3+13.
    c.hour(
        &instance("backend_method_cpm"),
        pod,
        &[
            (GITHUB_INITIALIZE, s(2.0 / 60.0)),
            (GITHUB_TOOLS_LIST, s(3.0 / 60.0)),
            (GITHUB_TOOLS_CALL, s(8.0 / 60.0)),
            (CONTEXT7_INITIALIZE, s(1.0 / 60.0)),
            (CONTEXT7_TOOLS_CALL, s(5.0 / 60.0)),
        ],
    );
    // github 1+2 = 3; context7 1.
    c.hour(&instance("backend_error_cpm"), pod, &[(GITHUB, s(3.0 / 60.0)), (CONTEXT7, s(1.0 / 60.0))]);
    c.hour(&instance("backend_initialization_latency_avg"), pod, &[(GITHUB, s(450.0)), (CONTEXT7, s(1500.0))]);

    // ---- pod-b (cumulative) ----
    let pod = Some(POD_B);
    // 4+2+2+0 = 8.
    c.hour(&instance("request_cpm"), pod, &[(NONE, s(8.0 / 60.0))]);
    // (3.215+2.4+20.02) = 25.635 s / 8 → 3204.375 ms.
    c.hour(&instance("request_latency_avg"), pod, &[(NONE, s(3204.375))]);
    // {2:1,4:2,9:1} + {6:1,8:1} + {2:1,11:1} = {2:2,4:2,6:1,8:1,9:1,11:1}, total 8, max unknown;
    // cumulative idx2:2 4:4 6:5 8:6 9:7 11:8. p50 4 → 100; p75 6 → idx8 2500;
    // p90 ceil(7.2)=8, p95 ceil(7.6)=8, p99 ceil(7.92)=8 → overflow → null.
    c.hour(
        &instance("request_latency_percentile"),
        pod,
        &[(P50, s(100.0)), (P75, s(2500.0)), (P90, N), (P95, N), (P99, N)],
    );
    // initialize 1; tools/list 6+2+3+0 = 11; tools/call 6+3+3+2 = 14.
    c.hour(
        &instance("method_cpm"),
        pod,
        &[(INITIALIZE, s(1.0 / 60.0)), (TOOLS_LIST, s(11.0 / 60.0)), (TOOLS_CALL, s(14.0 / 60.0))],
    );
    // 1+0+3+0 = 4.
    c.hour(&instance("error_cpm"), pod, &[(NONE, s(4.0 / 60.0))]);
    // 1.9 s (the final running sum) / 3 → 1900/3 ms.
    c.hour(&instance("initialization_latency_avg"), pod, &[(NONE, s(1900.0 / 3.0))]);
    // {5:1,7:2}, max unknown: p50 ceil(1.5)=2 → idx7 1000; every higher rank → 1000.
    c.hour(
        &instance("initialization_latency_percentile"),
        pod,
        &[(P50, s(1000.0)), (P75, s(1000.0)), (P90, s(1000.0)), (P95, s(1000.0)), (P99, s(1000.0))],
    );
    // tools 1+0+1+0 = 2; resources 1.
    c.hour(&instance("capabilities_cpm"), pod, &[(TOOLS, s(2.0 / 60.0)), (RESOURCES, s(1.0 / 60.0))]);
    // github 3+2+1+0 = 6; context7 1+0+1+0 = 2.
    c.hour(&instance("backend_request_cpm"), pod, &[(GITHUB, s(6.0 / 60.0)), (CONTEXT7, s(2.0 / 60.0))]);
    // github 2.635 s / 6 → 2635/6 ms; context7 23 s / 2 → 11500.
    c.hour(&instance("backend_request_latency_avg"), pod, &[(GITHUB, s(2635.0 / 6.0)), (CONTEXT7, s(11500.0))]);
    // (github, initialize) 1; (github, tools/call) 5+3+0+2 = 10; (context7, tools/list) 11;
    // (context7, tools/call) 1+0+3+0 = 4. Check: 1+10+11+4 = 26 = 1+11+14.
    c.hour(
        &instance("backend_method_cpm"),
        pod,
        &[
            (GITHUB_INITIALIZE, s(1.0 / 60.0)),
            (GITHUB_TOOLS_CALL, s(10.0 / 60.0)),
            (CONTEXT7_TOOLS_LIST, s(11.0 / 60.0)),
            (CONTEXT7_TOOLS_CALL, s(4.0 / 60.0)),
        ],
    );
    c.hour(&instance("backend_error_cpm"), pod, &[(CONTEXT7, s(4.0 / 60.0))]);
    c.hour(&instance("backend_initialization_latency_avg"), pod, &[(GITHUB, s(1900.0 / 3.0))]);
    c.finish(3 * 13 * 2);
}

/// SPEC §1.5 on MCP counters and histograms: a cumulative first point whose start lies more than
/// `max_delta_gap` (300 s) before it only becomes the baseline; a restart (new start time) and a
/// decrease of a monotonic counter are resets whose point is the delta.
#[test]
fn test_mcp_cumulative_baseline_restart_and_reset() {
    let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
    let mut report = IngestReport::default();
    let long_ago = T0 - 1000;
    let restart = T0 + 100;
    let export = |start, time| Export::new(Convention::JobName, Some("pod-c"), CUMULATIVE, start, time);
    let exports = [
        // T0+10: start 1010 s before → baseline only (50 requests of 0.1 s, 100 calls, 9 capabilities).
        export(long_ago, T0 + 10)
            .duration("github", false, &[(4, 50)], 5.0, (0.1, 0.1))
            .method("tools/call", "success", "github", 100.0)
            .capability("tools", "server", "github", 9.0),
        // T0+70: +3 requests of 0.1 s (sum 5.3), +4 calls, capabilities unchanged.
        export(long_ago, T0 + 70)
            .duration("github", false, &[(4, 53)], 5.3, (0.1, 0.1))
            .method("tools/call", "success", "github", 104.0)
            .capability("tools", "server", "github", 9.0),
        // T0+130: the gateway restarted at T0+100 → new start: the points are the deltas
        // (1 request of 0.02 s, 2 calls, 3 capabilities).
        export(restart, T0 + 130)
            .duration("github", false, &[(2, 1)], 0.02, (0.02, 0.02))
            .method("tools/call", "success", "github", 2.0)
            .capability("tools", "server", "github", 3.0),
        // T0+190: requests unchanged; calls 2 → 7 (+5); capabilities 3 → 1 with the same start:
        // a decrease of a monotonic sum is a reset → delta 1.
        export(restart, T0 + 190)
            .duration("github", false, &[(2, 1)], 0.02, (0.02, 0.02))
            .method("tools/call", "success", "github", 7.0)
            .capability("tools", "server", "github", 1.0),
    ];
    for e in &exports {
        ingest(&mut pipeline, e, &mut report);
    }
    assert_eq!(report.baselines, 3);
    assert_eq!(report.merged, 9);
    let mut c = Checker::new(&pipeline);
    let minutes4 = |values: [Option<f64>; 4]| values.to_vec();
    for (name, inst) in [(service as fn(&str) -> String, None), (instance, Some("pod-c"))] {
        // Minute 0 held only baselines: no data. m1 3 requests; m2 1; m3 0.
        c.expect(&name("request_cpm"), inst, Step::Minute, T0, &[(NONE, minutes4([N, s(3.0), s(1.0), s(0.0)]))]);
        // m1 0.3/3 → 100 ms; m2 0.02/1 → 20 ms; m3 count 0 → absent.
        c.expect(&name("request_latency_avg"), inst, Step::Minute, T0, &[(NONE, minutes4([N, s(100.0), s(20.0), N]))]);
        // m1 {4:3} → 100 ms for every rank; m2 {2:1} → 25 ms (cumulative: no clamp to 0.02 s).
        let p = minutes4([N, s(100.0), s(25.0), N]);
        c.expect(
            &name("request_latency_percentile"),
            inst,
            Step::Minute,
            T0,
            &[(P50, p.clone()), (P75, p.clone()), (P90, p.clone()), (P95, p.clone()), (P99, p)],
        );
        // m1 104−100 = 4; m2 2 (restart); m3 7−2 = 5.
        c.expect(&name("method_cpm"), inst, Step::Minute, T0, &[(TOOLS_CALL, minutes4([N, s(4.0), s(2.0), s(5.0)]))]);
        // m1 9−9 = 0; m2 3 (restart); m3 1 (decrease → reset).
        c.expect(&name("capabilities_cpm"), inst, Step::Minute, T0, &[(TOOLS, minutes4([N, s(0.0), s(3.0), s(1.0)]))]);
    }
    c.finish(2 * 9 * 4);
}

/// docs/metrics.md: "A label whose attribute is missing has the value `unknown`."
#[test]
fn test_mcp_missing_label_attributes_are_unknown() {
    let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
    let mut report = IngestReport::default();
    let export = Export::new(Convention::JobName, Some("pod-d"), DELTA, T0 - 10, T0 + 20)
        // no mcp.backend: value 0.04 (≤0.05: 3)
        .duration_with(&[], &[(3, 1)], 0.04, (0.04, 0.04))
        // no mcp.backend, 4 calls
        .method_with(&[("mcp.method.name", "tools/call"), ("status", "error")], 4.0)
        // no mcp.method.name, empty mcp.backend, 2 calls
        .method_with(&[("status", "success"), ("mcp.backend", "")], 2.0)
        // no capability.type
        .capability_with(&[("capability.side", "server")], 1.0);
    ingest(&mut pipeline, &export, &mut report);
    assert_eq!(report.merged, 4);
    let unknown_backend: Labels = &[("backend", "unknown")];
    let mut c = Checker::new(&pipeline);
    let at_t0 = |v: f64| vec![s(v)];
    c.expect(&service("backend_request_cpm"), None, Step::Minute, T0, &[(unknown_backend, at_t0(1.0))]);
    c.expect(&service("backend_request_latency_avg"), None, Step::Minute, T0, &[(unknown_backend, at_t0(40.0))]);
    c.expect(
        &service("backend_method_cpm"),
        None,
        Step::Minute,
        T0,
        &[
            (&[("backend", "unknown"), ("method", "tools/call")], at_t0(4.0)),
            (&[("backend", "unknown"), ("method", "unknown")], at_t0(2.0)),
        ],
    );
    c.expect(
        &service("method_cpm"),
        None,
        Step::Minute,
        T0,
        &[(TOOLS_CALL, at_t0(4.0)), (&[("method", "unknown")], at_t0(2.0))],
    );
    c.expect(&service("backend_error_cpm"), None, Step::Minute, T0, &[(unknown_backend, at_t0(4.0))]);
    c.expect(&service("capabilities_cpm"), None, Step::Minute, T0, &[(&[("capability_type", "unknown")], at_t0(1.0))]);
    c.finish(8);
}
