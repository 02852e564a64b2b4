//! Property tests: random point streams against a naive model, and the algebra of merges.

// The model is written with plain index loops on purpose: obviously correct beats idiomatic.
#![allow(clippy::needless_range_loop)]

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{metric, Histogram, Metric, ResourceMetrics, ScopeMetrics};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tollgate_rules::aggregate::{Aggregate, Bounds, Delta};
use tollgate_rules::attributes::AttributeSet;
use tollgate_rules::normalize::MAX_STARTS_PER_SERIES;
use tollgate_rules::testing::{gateway_resource, string_attribute, Convention};
use tollgate_rules::{
    Catalogue, CompiledRules, Entity, Fixed, MemoryPipeline, MetricQuery, Partial, PriceTable, SeriesKey, Step,
};

const T0: u64 = 1_764_151_200; // a minute boundary, unix seconds
const NS: u64 = 1_000_000_000;
const BOUNDS: [f64; 3] = [0.5, 1.0, 2.0];
/// The value of every observation in each bucket, in thousandths.
const OBSERVED_MILLIS: [u64; 4] = [250, 750, 1_500, 4_000];
const METRIC: &str = "gen_ai.server.request.duration";

/// One generated point of one series.
#[derive(Clone, Debug)]
struct GenPoint {
    series: usize,
    cumulative: bool,
    start: u64,
    time: u64,
    buckets: [u64; 4],
    /// Sum in thousandths.
    sum_millis: u64,
}

impl GenPoint {
    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// The series of the stream: (instance, provider) pairs, two pods of one service.
fn series_identity(series: usize) -> (&'static str, &'static str) {
    [("pod-0", "openai"), ("pod-0", "anthropic"), ("pod-1", "openai")][series]
}

fn series_key(series: usize) -> SeriesKey {
    let (instance, provider) = series_identity(series);
    SeriesKey {
        entity: Entity::new("gw", Some(instance)),
        metric: METRIC.into(),
        attributes: AttributeSet::from_pairs([("gen_ai.provider.name", provider)]),
    }
}

fn request(point: &GenPoint) -> ExportMetricsServiceRequest {
    let (instance, provider) = series_identity(point.series);
    let data_point = opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint {
        attributes: vec![string_attribute("gen_ai.provider.name", provider)],
        start_time_unix_nano: point.start * NS,
        time_unix_nano: point.time * NS,
        count: point.count(),
        sum: Some(point.sum_millis as f64 / 1000.0),
        bucket_counts: point.buckets.to_vec(),
        explicit_bounds: BOUNDS.to_vec(),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(gateway_resource(Convention::JobName, "gw", Some(instance))),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: METRIC.into(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: vec![data_point],
                        aggregation_temporality: if point.cumulative { 2 } else { 1 },
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Delta series: consecutive intervals. Cumulative series: running totals with occasional
/// resets (totals from zero, with or without a new start), first start recent or long ago
/// (`shift` seconds earlier still, for a second source of one series).
fn series_points(
    series: usize,
    cumulative: bool,
    span_seconds: u64,
    shift: u64,
) -> impl Strategy<Value = Vec<GenPoint>> {
    let steps = prop::collection::vec((1u64..=90, prop::array::uniform4(0u64..4), 0u8..20), 1..12);
    (steps, prop::bool::ANY).prop_map(move |(steps, old_start)| {
        let mut out = Vec::new();
        let mut time = T0;
        let mut start = if cumulative && old_start { T0 - 400 } else { T0 - 10 } - shift;
        let mut running = ([0u64; 4], 0u64);
        for (advance, buckets, reset) in steps {
            // Each observation's value lies in its bucket: a sum grows with the counts, and no
            // observations sum to 0 (a histogram's sum, as OTLP has it).
            let sum_millis: u64 = buckets.iter().zip(OBSERVED_MILLIS).map(|(count, value)| count * value).sum();
            let previous = time;
            time = (time + advance).min(T0 + span_seconds);
            if time == previous && !out.is_empty() {
                continue;
            }
            if cumulative {
                // 1 in 20: a restart with a new start time; 1 in 20: totals restart but the
                // exporter keeps its start time (a reset seen only as a decrease).
                if reset == 0 {
                    start = previous;
                }
                if reset <= 1 {
                    running = ([0; 4], 0);
                }
                for (total, add) in running.0.iter_mut().zip(buckets) {
                    *total += add;
                }
                running.1 += sum_millis;
                out.push(GenPoint { series, cumulative, start, time, buckets: running.0, sum_millis: running.1 });
            } else {
                out.push(GenPoint { series, cumulative, start: previous.max(T0 - 10), time, buckets, sum_millis });
            }
        }
        out
    })
}

/// Arrival order: all points shuffled (or each series in order, interleaved), plus retries of
/// random points inserted at random later positions. A cumulative series 2 has, half of the
/// time, a second source (a pod without `service.instance.id` beside another) with start times
/// of its own.
fn stream(span_seconds: u64, in_order: bool) -> impl Strategy<Value = Vec<GenPoint>> {
    let series = (prop::bool::ANY, prop::bool::ANY, prop::bool::ANY, prop::bool::ANY).prop_flat_map(
        move |(c0, c1, c2, two_sources)| {
            let second =
                series_points(2, c2, span_seconds, 7).prop_map(move |p| if c2 && two_sources { p } else { vec![] });
            (
                series_points(0, c0, span_seconds, 0),
                series_points(1, c1, span_seconds, 0),
                series_points(2, c2, span_seconds, 0),
                second,
            )
        },
    );
    (series, prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..8), any::<u64>())
        .prop_map(move |((a, b, c, d), retries, seed)| {
            let mut all: Vec<GenPoint> = Vec::new();
            if in_order {
                // Interleave series (and sources) while keeping each one in time order.
                let mut queues = [a, b, c, d].map(std::collections::VecDeque::from);
                let mut state = seed | 1;
                while queues.iter().any(|q| !q.is_empty()) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let pick = (state % 4) as usize;
                    if let Some(p) = queues[pick].pop_front() {
                        all.push(p);
                    }
                }
            } else {
                all.extend(a);
                all.extend(b);
                all.extend(c);
                all.extend(d);
                let mut state = seed | 1;
                for i in (1..all.len()).rev() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    all.swap(i, (state % (i as u64 + 1)) as usize);
                }
            }
            for (which, position) in retries {
                if all.is_empty() {
                    break;
                }
                let original = which.index(all.len());
                let at = original + 1 + position.index(all.len() - original);
                let copy = all[original].clone();
                all.insert(at.min(all.len()), copy);
            }
            all
        })
}

/// What the model expects per (series, minute): count, sum (thousandths), buckets.
type ModelStates = BTreeMap<(usize, u64), (u64, i64, [u64; 4])>;

/// The naive model of SPEC §1.5: every accepted key remembered forever, plain loops. A cumulative
/// series keeps the last point of each of its start times (`normalize::switch_stream`): a start it
/// does not know at or after its newest point is a new life and counts whole; one before it is
/// another source, whose first point counts as a series' first point does. Starts other than the
/// point's own are forgotten once older than the lateness window; a new start beyond
/// `MAX_STARTS_PER_SERIES` alive is refused, and so is a point older than its own start's last.
fn model(stream: &[GenPoint], lateness_seconds: u64, gap_seconds: u64) -> (ModelStates, u64) {
    let mut states = ModelStates::new();
    let mut accepted: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
    let mut starts: HashMap<usize, Vec<GenPoint>> = HashMap::new();
    let mut newest_minute: HashMap<&str, u64> = HashMap::new();
    let mut rejected = 0;
    for point in stream {
        let partition = series_identity(point.series).0;
        let minute = point.time / 60 * 60;
        if let Some(newest) = newest_minute.get(partition) {
            if minute + lateness_seconds < *newest {
                rejected += 1;
                continue;
            }
        }
        let keys = accepted.entry(point.series).or_default();
        if keys.contains(&(point.start, point.time)) {
            continue;
        }
        let add: Option<([u64; 4], i64)> = if !point.cumulative {
            Some((point.buckets, point.sum_millis as i64))
        } else {
            let oldest = newest_minute.get(partition).map_or(0, |newest| newest.saturating_sub(lateness_seconds));
            let kept = starts.entry(point.series).or_default();
            if let Some(own) = kept.iter().find(|p| p.start == point.start) {
                if point.time < own.time {
                    rejected += 1;
                    continue;
                }
            } else if !kept.is_empty() && 1 + kept.iter().filter(|p| p.time >= oldest).count() > MAX_STARTS_PER_SERIES {
                rejected += 1;
                continue;
            }
            let newest = kept.iter().map(|p| p.time).max();
            kept.retain(|p| p.start == point.start || p.time >= oldest);
            match kept.iter().position(|p| p.start == point.start) {
                None => {
                    let whole = match newest {
                        Some(newest) if point.start >= newest => true,
                        _ => point.time - point.start <= gap_seconds,
                    };
                    kept.push(point.clone());
                    whole.then_some((point.buckets, point.sum_millis as i64))
                }
                Some(i) => {
                    let previous = std::mem::replace(&mut kept[i], point.clone());
                    let reset =
                        point.count() < previous.count() || (0..4).any(|i| point.buckets[i] < previous.buckets[i]);
                    if reset {
                        Some((point.buckets, point.sum_millis as i64))
                    } else {
                        let mut buckets = [0; 4];
                        for i in 0..4 {
                            buckets[i] = point.buckets[i] - previous.buckets[i];
                        }
                        Some((buckets, point.sum_millis as i64 - previous.sum_millis as i64))
                    }
                }
            }
        };
        keys.push((point.start, point.time));
        let newest = newest_minute.entry(partition).or_insert(minute);
        *newest = (*newest).max(minute);
        if let Some((buckets, sum)) = add {
            let entry = states.entry((point.series, minute / 60)).or_insert((0, 0, [0; 4]));
            entry.0 += buckets.iter().sum::<u64>();
            entry.1 += sum;
            for i in 0..4 {
                entry.2[i] += buckets[i];
            }
        }
    }
    (states, rejected)
}

fn run(stream: &[GenPoint]) -> (MemoryPipeline, u64) {
    let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
    let now = (T0 + 3600) * NS;
    let mut rejected = 0;
    for point in stream {
        rejected += pipeline.ingest(request(point), now).rejected_total();
    }
    (pipeline, rejected)
}

fn check_against_model(stream: &[GenPoint]) -> Result<(), TestCaseError> {
    let (pipeline, rejected) = run(stream);
    let (expected, model_rejected) = model(stream, 600, 300);
    prop_assert_eq!(rejected, model_rejected);
    let mut actual = ModelStates::new();
    for ((id, minute), state) in pipeline.states.iter() {
        let series = (0..3).find(|s| series_key(*s).id() == *id).expect("a generated series");
        let buckets: [u64; 4] = state.buckets.clone().try_into().expect("four buckets");
        let sum_millis = (state.sum.nanos() / 1_000_000) as i64;
        prop_assert_eq!(state.sum.nanos() % 1_000_000, 0);
        actual.insert((series, *minute as u64), (state.count, sum_millis, buckets));
    }
    prop_assert_eq!(actual, expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Within the lateness window, shuffled arrival with retries: every distinct delta point is
    /// merged exactly once; cumulative points out of order are rejected, the rest become exact
    /// deltas.
    #[test]
    fn prop_shuffled_stream_matches_model(points in stream(8 * 60, false)) {
        check_against_model(&points)?;
    }

    /// Per-series order with interleaving and retries: nothing is rejected, and per-series
    /// totals equal the model's.
    #[test]
    fn prop_ordered_stream_matches_model(points in stream(8 * 60, true)) {
        check_against_model(&points)?;
    }

    /// Spans longer than the lateness window: late points are rejected exactly when the model
    /// says so.
    #[test]
    fn prop_long_stream_lateness_matches_model(points in stream(40 * 60, false)) {
        check_against_model(&points)?;
    }
}

fn arbitrary_state() -> impl Strategy<Value = Aggregate> {
    let bound_sets: Vec<Vec<f64>> = vec![vec![0.5, 1.0, 2.0], vec![1.0, 4.0], vec![], vec![0.25, 1.0, 2.0, 8.0]];
    (
        prop::sample::select(bound_sets),
        prop::collection::vec(0u64..50, 0..6),
        -1_000_000i64..1_000_000,
        prop::option::of((0.0f64..10.0, 0.0f64..10.0)),
        -5_000i64..5_000,
        0i64..5_000,
        0usize..3,
    )
        .prop_map(|(bounds, mut counts, sum_micros, extremes, cost, unpriced, merges)| {
            let bounds: Bounds = Arc::from(bounds);
            counts.resize(if bounds.is_empty() { 1 } else { bounds.len() + 1 }, 0);
            let mut state = Aggregate::empty();
            for part in 0..=merges {
                let delta = Delta {
                    count: counts.iter().sum(),
                    sum: Fixed::from_nanos(sum_micros as i128 * 1000 + part as i128),
                    min: extremes.map(|(a, b)| a.min(b)),
                    max: extremes.map(|(a, b)| a.max(b)),
                    bounds: &bounds,
                    buckets: &counts,
                    cost: Fixed::from_nanos(cost as i128 * 7),
                    unpriced: Fixed::from_nanos(unpriced as i128),
                };
                state.merge_delta(&delta);
            }
            state
        })
}

fn merged(parts: &[&Aggregate]) -> Aggregate {
    let mut out = Aggregate::empty();
    for part in parts {
        out.merge(part);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn prop_merge_is_commutative(a in arbitrary_state(), b in arbitrary_state()) {
        prop_assert_eq!(merged(&[&a, &b]), merged(&[&b, &a]));
    }

    #[test]
    fn prop_merge_is_associative(a in arbitrary_state(), b in arbitrary_state(), c in arbitrary_state()) {
        let mut left = merged(&[&a, &b]);
        left.merge(&c);
        let mut right = a.clone();
        right.merge(&merged(&[&b, &c]));
        prop_assert_eq!(left, right);
    }

    #[test]
    fn prop_empty_is_identity(a in arbitrary_state()) {
        prop_assert_eq!(merged(&[&Aggregate::empty(), &a]), a.clone());
        let mut b = a.clone();
        b.merge(&Aggregate::empty());
        prop_assert_eq!(b, a);
    }

    /// Hour and day roll-ups (merge the minutes first, as the store does) evaluate exactly like
    /// the minutes themselves, for every catalogue metric kind.
    #[test]
    fn prop_rollups_equal_merging_the_minutes(
        minutes in prop::collection::vec((0i64..(3 * 1440), 0usize..3, arbitrary_state()), 1..40),
        step in prop::sample::select(vec![Step::Hour, Step::Day]),
    ) {
        let catalogue = Catalogue::default();
        let index = catalogue.index();
        let start = (T0 as i64) - 1440 * 60;
        for name in ["meter_envoy_ai_gw_request_cpm", "meter_envoy_ai_gw_request_latency_avg",
                     "meter_envoy_ai_gw_request_latency_percentile", "meter_envoy_ai_gw_provider_request_cpm"] {
            let query = MetricQuery {
                metric: index[name].clone(), service: "gw".into(), instance: None,
                start, end: start + 4 * 1440 * 60, step,
            };
            let mut from_minutes = Partial::default();
            let mut rollups: BTreeMap<(usize, i64), Aggregate> = BTreeMap::new();
            for (minute, series, state) in &minutes {
                let at = start + minute * 60;
                from_minutes.add(&catalogue, &query, &series_key(*series), at, state);
                rollups.entry((*series, step.floor(at))).or_default().merge(state);
            }
            let mut from_rollups = Partial::default();
            for ((series, at), state) in &rollups {
                from_rollups.add(&catalogue, &query, &series_key(*series), *at, state);
            }
            prop_assert_eq!(&from_minutes, &from_rollups);
            prop_assert_eq!(from_minutes.finish(&query), from_rollups.finish(&query));
        }
    }
}
