//! An access-log stream shaped like Envoy AI Gateway's OpenTelemetry access-log sink: Envoy's
//! resource attributes, the LLM log format's string-valued attributes (SWIP-10, "LLM Access Log
//! Format"), the text body of the gateway's example format, and many records per export (Envoy's
//! access-log buffer flushes every 16 KiB or every second).
//!
//! Token counts follow SWIP-10's "Industry token usage reference": most requests are chat,
//! support or RAG calls of 1k–3.5k total tokens; programming calls (6k–20k+ input tokens) make
//! the long tail past the 10k `high_tokens` threshold.

use crate::run::{Export, Lane};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, InstrumentationScope};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tollgate_rules::fleet::{string_attribute, Xorshift, FLEET_MODELS};

/// What the stream looks like.
#[derive(Clone, Debug)]
pub struct LogSpec {
    /// Prefix of service names.
    pub prefix: String,
    /// Gateways (services).
    pub services: usize,
    /// Gateway pods over all services, assigned round-robin.
    pub pods: usize,
    /// Records per export.
    pub records_per_export: usize,
    /// Exports per pod.
    pub rounds: u64,
    /// Fraction of requests answered with an error status (4xx/5xx).
    pub error_rate: f64,
    /// Fraction of requests slower than the 30 s `slow` threshold.
    pub slow_rate: f64,
    /// Fraction of requests with an upstream transport failure.
    pub upstream_failure_rate: f64,
    /// Unix nanoseconds of the first record; each pod's records follow every `spacing_ns`.
    pub start_ns: u64,
    /// Time between two records of a pod, ns.
    pub spacing_ns: u64,
    /// Seed of the generator.
    pub seed: u64,
}

impl LogSpec {
    /// Records over all rounds.
    pub fn records(&self) -> u64 {
        self.pods as u64 * self.rounds * self.records_per_export as u64
    }
}

/// One use case of SWIP-10's token table: weight, input range, output range.
struct UseCase {
    weight: f64,
    input: (f64, f64),
    output: (f64, f64),
}

/// Weights chosen so that most requests are 1k–3.5k tokens and about one in ten is a
/// programming call (whose input is drawn log-uniformly, so a part of them passes 10k).
const USE_CASES: [UseCase; 4] = [
    UseCase { weight: 0.35, input: (500.0, 1000.0), output: (200.0, 400.0) },
    UseCase { weight: 0.30, input: (500.0, 3000.0), output: (300.0, 400.0) },
    UseCase { weight: 0.25, input: (3000.0, 4000.0), output: (300.0, 500.0) },
    UseCase { weight: 0.10, input: (6000.0, 30000.0), output: (400.0, 1500.0) },
];

/// What one generated request looked like (tests and the summary use it).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// HTTP status.
    pub response_code: u16,
    /// Milliseconds.
    pub duration_ms: u64,
    /// `-` when none.
    pub upstream_failure: &'static str,
}

/// Draws one request.
pub fn draw(rng: &mut Xorshift, spec: &LogSpec) -> Request {
    let mut pick = rng.unit();
    let mut case = &USE_CASES[USE_CASES.len() - 1];
    for candidate in &USE_CASES {
        if pick < candidate.weight {
            case = candidate;
            break;
        }
        pick -= candidate.weight;
    }
    let input = if case.input.1 / case.input.0 > 3.0 {
        // Log-uniform: a long tail.
        (case.input.0.ln() + rng.unit() * (case.input.1.ln() - case.input.0.ln())).exp()
    } else {
        case.input.0 + rng.unit() * (case.input.1 - case.input.0)
    };
    let output = case.output.0 + rng.unit() * (case.output.1 - case.output.0);
    let (input_tokens, output_tokens) = (input.round() as u64, output.round() as u64);
    let upstream_failed = rng.unit() < spec.upstream_failure_rate;
    let errored = rng.unit() < spec.error_rate;
    let slow = rng.unit() < spec.slow_rate;
    let (response_code, upstream_failure) = if upstream_failed {
        (503, "delayed connect error: 111")
    } else if errored {
        ([429, 429, 500, 503, 400][rng.below(5) as usize], "-")
    } else {
        (200, "-")
    };
    let duration_ms = if slow {
        30_000 + rng.below(90_000)
    } else if response_code != 200 {
        5 + rng.below(800)
    } else {
        // Time to first token plus 5–40 ms per output token, below the slow threshold.
        (200 + rng.below(1300) + output_tokens * (5 + rng.below(36))).min(29_000)
    };
    Request {
        input_tokens: if response_code == 200 { input_tokens } else { 0 },
        output_tokens: if response_code == 200 { output_tokens } else { 0 },
        response_code,
        duration_ms,
        upstream_failure,
    }
}

/// The resource Envoy Gateway's OpenTelemetry access-log sink sends for one gateway pod.
fn envoy_resource(service: &str, instance: &str) -> Resource {
    Resource {
        attributes: vec![
            string_attribute("log_name", "otel_envoy_accesslog"),
            string_attribute("zone_name", ""),
            string_attribute("cluster_name", &format!("default/{service}")),
            string_attribute("node_name", &format!("default-{instance}")),
            string_attribute("service.name", "envoy-ai-gateway"),
            string_attribute("aigw.service", service),
            string_attribute("service.instance.id", instance),
        ],
        ..Default::default()
    }
}

fn rfc3339_millis(time_ns: u64) -> String {
    let seconds = (time_ns / 1_000_000_000) as i64;
    let millis = (time_ns / 1_000_000) % 1000;
    match chrono::DateTime::from_timestamp(seconds, 0) {
        Some(t) => format!("{}.{millis:03}Z", t.format("%Y-%m-%dT%H:%M:%S")),
        None => "-".into(),
    }
}

/// One gateway pod: its resource and its own generator (so the stream does not depend on how
/// pods are spread over threads or lanes).
struct Pod {
    service: String,
    resource: Resource,
    sequence: u64,
    rng: Xorshift,
}

fn record(pod: &mut Pod, spec: &LogSpec, time_ns: u64) -> LogRecord {
    let rng = &mut pod.rng;
    let request = draw(rng, spec);
    let (provider, model) = FLEET_MODELS[rng.below(FLEET_MODELS.len() as u64) as usize];
    let request_id = format!("{:016x}-{:08x}", rng.next_u64(), pod.sequence);
    pod.sequence += 1;
    let start_time = rfc3339_millis(time_ns.saturating_sub(request.duration_ms * 1_000_000));
    let path = "/v1/chat/completions";
    let upstream_time = request.duration_ms.saturating_sub(3).to_string();
    let attributes = vec![
        string_attribute("start_time", &start_time),
        string_attribute("method", "POST"),
        string_attribute("request.path", path),
        string_attribute("x-envoy-origin-path", path),
        string_attribute("response_code", &request.response_code.to_string()),
        string_attribute("duration", &request.duration_ms.to_string()),
        string_attribute("bytes_received", &(request.input_tokens * 4 + 180).to_string()),
        string_attribute("bytes_sent", &(request.output_tokens * 4 + 420).to_string()),
        string_attribute("user-agent", "OpenAI/Python 1.99.9"),
        string_attribute("x-request-id", &request_id),
        string_attribute("x-forwarded-for", "10.0.3.17"),
        string_attribute("x-envoy-upstream-service-time", &upstream_time),
        string_attribute("upstream_host", "10.0.7.21:443"),
        string_attribute("upstream_cluster", &format!("httproute/default/{}/rule/0", pod.service)),
        string_attribute("upstream_local_address", "10.0.1.4:51622"),
        string_attribute("upstream_transport_failure_reason", request.upstream_failure),
        string_attribute("downstream_remote_address", "10.0.3.17:40112"),
        string_attribute("downstream_local_address", "10.0.1.4:1975"),
        string_attribute("connection_termination_details", "-"),
        string_attribute("gen_ai.request.model", model),
        string_attribute("gen_ai.response.model", model),
        string_attribute("gen_ai.provider.name", provider),
        string_attribute("gen_ai.usage.input_tokens", &request.input_tokens.to_string()),
        string_attribute("gen_ai.usage.output_tokens", &request.output_tokens.to_string()),
        string_attribute("session.id", "-"),
    ];
    let body = format!(
        "[{start_time}] {path} model={model} {} llm_input_token={} llm_output_token={} llm_reasoning_token=0 {}ms",
        request.response_code, request.input_tokens, request.output_tokens, request.duration_ms
    );
    LogRecord {
        time_unix_nano: time_ns,
        observed_time_unix_nano: time_ns,
        body: Some(AnyValue { value: Some(Value::StringValue(body)) }),
        attributes,
        ..Default::default()
    }
}

fn pods(spec: &LogSpec) -> Vec<Pod> {
    let services = spec.services.max(1);
    (0..spec.pods)
        .map(|index| {
            let service = format!("{}-{:03}", spec.prefix, index % services);
            let instance = format!("{service}-pod-{:04}", index / services);
            let rng = Xorshift::new(spec.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            Pod { resource: envoy_resource(&service, &instance), service, sequence: 0, rng }
        })
        .collect()
}

fn export(pod: &mut Pod, spec: &LogSpec, round: u64) -> Export {
    let first = round * spec.records_per_export as u64;
    let records: Vec<LogRecord> = (0..spec.records_per_export as u64)
        .map(|i| record(pod, spec, spec.start_ns + (first + i) * spec.spacing_ns))
        .collect();
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(pod.resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope { name: "envoy".into(), ..Default::default() }),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    Export { body: request.encode_to_vec().into(), items: spec.records_per_export as u64 }
}

/// Every export, encoded up front, split into lanes (lane `l` holds pods `l, l + lanes, ...`).
pub fn pregenerate(spec: &LogSpec, lanes: usize) -> Vec<Vec<Export>> {
    let lanes = lanes.max(1);
    let mut pods = pods(spec);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = pods.len().div_ceil(threads).max(1);
    let per_pod: Vec<Vec<Export>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .chunks_mut(chunk)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter_mut()
                        .map(|pod| (0..spec.rounds).map(|round| export(pod, spec, round)).collect())
                        .collect::<Vec<Vec<Export>>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("generator thread")).collect()
    });
    let mut result: Vec<Vec<Export>> = vec![Vec::new(); lanes];
    let mut iterators: Vec<std::vec::IntoIter<Export>> = per_pod.into_iter().map(Vec::into_iter).collect();
    for _ in 0..spec.rounds {
        for (pod, exports) in iterators.iter_mut().enumerate() {
            if let Some(export) = exports.next() {
                result[pod % lanes].push(export);
            }
        }
    }
    result
}

/// Lanes that generate each export just before sending it.
pub fn live_lanes(spec: &LogSpec, lanes: usize) -> Vec<Lane> {
    let lanes = lanes.max(1);
    let mut grouped: Vec<Vec<Pod>> = (0..lanes).map(|_| Vec::new()).collect();
    for (index, pod) in pods(spec).into_iter().enumerate() {
        grouped[index % lanes].push(pod);
    }
    grouped
        .into_iter()
        .map(|mut pods| {
            let spec = spec.clone();
            let iterator = (0..spec.rounds).flat_map(move |round| {
                pods.iter_mut().map(|pod| export(pod, &spec, round)).collect::<Vec<_>>().into_iter()
            });
            Box::new(iterator) as Lane
        })
        .collect()
}

/// Shares of the generated requests: (kept by the default sampling rules, ≥ 10k tokens,
/// errors, slow), estimated from `samples` draws.
pub fn expected_shares(spec: &LogSpec, samples: u64) -> (f64, f64, f64, f64) {
    let mut rng = Xorshift::new(spec.seed);
    let (mut kept, mut high, mut errors, mut slow) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..samples {
        let r = draw(&mut rng, spec);
        let is_high = r.input_tokens + r.output_tokens >= 10_000;
        let is_error = r.response_code >= 400;
        let is_slow = r.duration_ms >= 30_000;
        high += is_high as u64;
        errors += is_error as u64;
        slow += is_slow as u64;
        kept += (is_high || is_error || is_slow || r.upstream_failure != "-") as u64;
    }
    let n = samples.max(1) as f64;
    (kept as f64 / n, high as f64 / n, errors as f64 / n, slow as f64 / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LogSpec {
        LogSpec {
            prefix: "t".into(),
            services: 2,
            pods: 4,
            records_per_export: 16,
            rounds: 3,
            error_rate: 0.02,
            slow_rate: 0.01,
            upstream_failure_rate: 0.005,
            start_ns: 1_764_151_200_000_000_000,
            spacing_ns: 1_000_000,
            seed: 1,
        }
    }

    #[test]
    fn test_draw_follows_the_swip10_token_table() {
        let spec = spec();
        let mut rng = Xorshift::new(7);
        let draws: Vec<Request> = (0..50_000).map(|_| draw(&mut rng, &spec)).collect();
        let ok: Vec<u64> =
            draws.iter().filter(|r| r.response_code == 200).map(|r| r.input_tokens + r.output_tokens).collect();
        let share = |pred: &dyn Fn(u64) -> bool| ok.iter().filter(|t| pred(**t)).count() as f64 / ok.len() as f64;
        // Most requests are 1k–3.5k tokens (chat, support and RAG; chat's low end dips below 1k).
        assert!(share(&|t| (700..=4_500).contains(&t)) > 0.8, "{}", share(&|t| (700..=4_500).contains(&t)));
        // A long tail past the 10k sampling threshold, from programming calls.
        let tail = share(&|t| t >= 10_000);
        assert!((0.04..0.10).contains(&tail), "{tail}");
        assert!(ok.iter().any(|t| *t > 25_000));
    }

    #[test]
    fn test_draw_rates_match_the_options() {
        let spec = LogSpec { error_rate: 0.1, slow_rate: 0.05, upstream_failure_rate: 0.02, ..spec() };
        let mut rng = Xorshift::new(3);
        let draws: Vec<Request> = (0..50_000).map(|_| draw(&mut rng, &spec)).collect();
        let share = |pred: &dyn Fn(&Request) -> bool| draws.iter().filter(|r| pred(r)).count() as f64 / 50_000.0;
        let upstream = share(&|r| r.upstream_failure != "-");
        assert!((0.015..0.025).contains(&upstream), "{upstream}");
        let errors = share(&|r| r.response_code >= 400 && r.upstream_failure == "-");
        assert!((0.09..0.11).contains(&errors), "{errors}");
        let slow = share(&|r| r.duration_ms >= 30_000);
        assert!((0.045..0.055).contains(&slow), "{slow}");
    }

    #[test]
    fn test_pregenerate_is_reproducible_and_keeps_each_pod_in_one_lane_in_order() {
        let spec = spec();
        let first = pregenerate(&spec, 3);
        let again = pregenerate(&spec, 3);
        let bodies = |lanes: &[Vec<Export>]| lanes.iter().flatten().map(|e| e.body.clone()).collect::<Vec<_>>();
        assert_eq!(bodies(&first), bodies(&again));
        assert_eq!(first.iter().flatten().map(|e| e.items).sum::<u64>(), spec.records());
        // Pod 0 is in lane 0; its records come out in time order.
        let times: Vec<u64> = first[0]
            .iter()
            .map(|e| ExportLogsServiceRequest::decode(e.body.clone()).unwrap())
            .filter(|r| {
                r.resource_logs[0].resource.as_ref().unwrap().attributes[6].value
                    == pods(&spec)[0].resource.attributes[6].value
            })
            .flat_map(|r| {
                r.resource_logs[0].scope_logs[0].log_records.iter().map(|l| l.time_unix_nano).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(times.len(), 3 * 16);
        assert!(times.windows(2).all(|w| w[0] < w[1]));
    }
}
