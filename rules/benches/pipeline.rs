//! Decode alone versus decode → select → normalise → merge, on exports shaped like a fleet of
//! Envoy AI Gateway pods (SWIP-10 appendix A/B: the four histograms, their bounds, their
//! attributes). Both run in the same process on the same pre-encoded bytes, so the ratio is
//! what Tollgate's own work costs on top of protobuf decoding.
//!
//! `cargo bench -p tollgate-rules --bench pipeline` prints criterion's figures and then one line
//! per temporality:
//! `bench pipeline_<temporality>: <v> points/s (baseline decode <v> points/s, ratio <r>)`.

// Printing the figures is the point of a benchmark.
#![allow(clippy::print_stdout)]

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tollgate_rules::testing::GatewayPod;
use tollgate_rules::{CompiledRules, MemoryPipeline, PriceTable};

const SERVICES: usize = 5;
const PODS_PER_SERVICE: usize = 10;
const MODELS: usize = 6;
const ROUNDS: u64 = 60;
const INTERVAL_SECONDS: u64 = 10;
const STARTED: u64 = 1_764_151_200;

/// Pre-encoded exports, in sending order, with the time each was sent.
struct Workload {
    exports: Vec<(u64, Vec<u8>)>,
    points: u64,
}

fn workload(cumulative: bool) -> Workload {
    let mut pods: Vec<GatewayPod> = (0..SERVICES)
        .flat_map(|s| (0..PODS_PER_SERVICE).map(move |p| (s, p)))
        .map(|(s, p)| {
            GatewayPod::new(
                &format!("gw-{s}"),
                &format!("gw-{s}-pod-{p}"),
                MODELS,
                cumulative,
                INTERVAL_SECONDS,
                STARTED,
            )
        })
        .collect();
    let mut exports = Vec::new();
    let mut points = 0;
    for round in 0..ROUNDS {
        for pod in &mut pods {
            let request = pod.export(round);
            points += pod.points_per_export() as u64;
            let sent = STARTED + (round + 1) * INTERVAL_SECONDS + 1;
            exports.push((sent * 1_000_000_000, request.encode_to_vec()));
        }
    }
    Workload { exports, points }
}

fn pricing() -> PriceTable {
    PriceTable::parse(include_str!("../src/gen-ai-config.yml")).expect("valid pricing")
}

fn decode_only(workload: &Workload) -> u64 {
    let mut points = 0u64;
    for (_, bytes) in &workload.exports {
        let request = ExportMetricsServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
        for resource in &request.resource_metrics {
            for scope in &resource.scope_metrics {
                points += scope.metrics.len() as u64;
            }
        }
        black_box(request);
    }
    points
}

fn full_path(workload: &Workload, pipeline: &mut MemoryPipeline) -> u64 {
    let mut merged = 0;
    for (now, bytes) in &workload.exports {
        let request = ExportMetricsServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
        let report = pipeline.ingest(request, *now);
        assert_eq!(report.rejected_total(), 0, "{}", report.error_message("points"));
        merged += report.merged + report.baselines;
    }
    merged
}

fn new_pipeline() -> MemoryPipeline {
    MemoryPipeline::new(CompiledRules::default(), pricing())
}

fn bench_pipeline(c: &mut Criterion) {
    for (label, cumulative) in [("delta", false), ("cumulative", true)] {
        let workload = workload(cumulative);
        let mut group = c.benchmark_group(format!("ingest_{label}"));
        group.throughput(Throughput::Elements(workload.points));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(5));
        group.bench_function("decode_only", |b| b.iter(|| decode_only(&workload)));
        group.bench_function("decode_select_normalise_merge", |b| {
            b.iter_batched(new_pipeline, |mut pipeline| full_path(&workload, &mut pipeline), BatchSize::PerIteration)
        });
        group.finish();
    }
}

/// Alternating timed passes of both paths for a fixed time, then one summary line.
fn summary() {
    for (label, cumulative) in [("delta", false), ("cumulative", true)] {
        let workload = workload(cumulative);
        let (mut decode_time, mut full_time) = (Duration::ZERO, Duration::ZERO);
        let mut passes = 0u32;
        while passes < 3 || decode_time + full_time < Duration::from_secs(6) {
            let started = Instant::now();
            black_box(decode_only(&workload));
            decode_time += started.elapsed();
            let mut pipeline = new_pipeline();
            let started = Instant::now();
            let merged = full_path(&workload, &mut pipeline);
            full_time += started.elapsed();
            assert_eq!(merged, workload.points, "every point is merged (or becomes a baseline) exactly once");
            passes += 1;
        }
        let points = (workload.points * passes as u64) as f64;
        let decode_rate = points / decode_time.as_secs_f64();
        let full_rate = points / full_time.as_secs_f64();
        println!(
            "bench pipeline_{label}: {full_rate:.0} points/s (baseline decode {decode_rate:.0} points/s, ratio {:.2})",
            full_rate / decode_rate
        );
    }
}

criterion_group!(benches, bench_pipeline);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
