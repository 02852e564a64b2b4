//! The checks the fuzz targets run. Each takes bytes as they would reach a node and asserts what
//! must hold of any input, not only of well-formed exports: Tollgate's own decoders answer as
//! prost's generated ones do (values or error), and nothing on the way from decoding to a query
//! answer panics (overflow checks are on in fuzz builds).

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs};
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, ResourceMetrics};
use prost::Message;
use std::sync::LazyLock;
use tollgate_rules::decode::{self, DecodedMetrics};
use tollgate_rules::evaluate::Step;
use tollgate_rules::ingest::extract_encoded_logs;
use tollgate_rules::{decide, decide_on, CompiledRules, MemoryPipeline, PriceTable, SamplingRules};

/// The most minute states a query of the checks may cover: inputs can hold any times.
const QUERY_MINUTES: i64 = 120;

/// The built-in rules and prices, parsed and compiled once for all inputs.
static RULES: LazyLock<CompiledRules> = LazyLock::new(CompiledRules::default);
static PRICING: LazyLock<PriceTable> =
    LazyLock::new(|| PriceTable::parse(tollgate_rules::pricing::BUILT_IN_PRICING).expect("built-in pricing"));

/// An encoded `ResourceMetrics`, as the receiver splits an export into: Tollgate's decoder gives
/// prost's answer, and both decodings, merged, answer every catalogue metric alike.
pub fn resource_metrics(bytes: &[u8]) {
    let fast = decode::resource_metrics(bytes);
    let prost = ResourceMetrics::decode(bytes);
    let (fast, prost) = match (fast, prost) {
        (Ok(fast), Ok(prost)) => (fast, prost),
        (Err(fast), Err(prost)) => {
            assert_eq!(fast.to_string(), prost.to_string());
            return;
        }
        (fast, prost) => panic!("tollgate decoded {:?}, prost {:?}", fast.map(|_| ()), prost.map(|_| ())),
    };
    assert_eq!(format!("{fast:?}"), format!("{:?}", DecodedMetrics::from_prost(prost.clone())));

    // Now: just after the newest point, so that the input's own times decide what is accepted.
    let now = newest_time(&prost).saturating_add(1_000_000_000);
    let mut node_path = MemoryPipeline::new(RULES.clone(), PRICING.clone());
    let mut prost_path = MemoryPipeline::new(RULES.clone(), PRICING.clone());
    // Twice: cumulative points meet their baseline, retried ones their de-duplication.
    for _ in 0..2 {
        let node_report = node_path.ingest_decoded(vec![fast.clone()], now);
        let prost_report =
            prost_path.ingest(ExportMetricsServiceRequest { resource_metrics: vec![prost.clone()] }, now);
        assert_eq!(format!("{node_report:?}"), format!("{prost_report:?}"));
    }
    assert_eq!(node_path.states.len(), prost_path.states.len());
    let answers = |pipeline: &MemoryPipeline| {
        let Some(((_, first), _)) = pipeline.states.iter().min_by_key(|((_, minute), _)| *minute) else {
            return Vec::new();
        };
        let start = *first * 60;
        let entities: Vec<_> = pipeline.table.iter().map(|(_, entry)| entry.key.entity.clone()).collect();
        let mut out = Vec::new();
        for entry in pipeline.rules.config.catalogue.entries() {
            for entity in &entities {
                for step in [Step::Minute, Step::Hour] {
                    let end = start + QUERY_MINUTES * 60;
                    out.push(format!(
                        "{:?}",
                        pipeline.query(&entry.name, &entity.service, entity.instance.as_deref(), start, end, step)
                    ));
                }
            }
        }
        out
    };
    assert_eq!(answers(&node_path), answers(&prost_path));
}

/// The newest time of any point of a resource.
fn newest_time(resource: &ResourceMetrics) -> u64 {
    let mut newest = 0;
    for metric in resource.scope_metrics.iter().flat_map(|scope| &scope.metrics) {
        let times: Vec<u64> = match &metric.data {
            Some(Data::Histogram(h)) => h.data_points.iter().map(|p| p.time_unix_nano).collect(),
            Some(Data::Sum(s)) => s.data_points.iter().map(|p| p.time_unix_nano).collect(),
            Some(Data::Gauge(g)) => g.data_points.iter().map(|p| p.time_unix_nano).collect(),
            Some(Data::ExponentialHistogram(h)) => h.data_points.iter().map(|p| p.time_unix_nano).collect(),
            Some(Data::Summary(s)) => s.data_points.iter().map(|p| p.time_unix_nano).collect(),
            None => Vec::new(),
        };
        newest = times.into_iter().fold(newest, u64::max);
    }
    newest
}

/// An encoded `ResourceLogs`: its records are kept encoded as prost decodes them, or refused as
/// prost refuses them; each is classified from its encoded view as from its decoded attributes.
pub fn resource_logs(bytes: &[u8]) {
    let bytes = Bytes::copy_from_slice(bytes);
    let kept = decode::encoded_resource_logs(&bytes);
    let prost = ResourceLogs::decode(&bytes[..]);
    let (records, expected) = match (kept, prost) {
        (Ok((resource, records)), Ok(expected)) => {
            assert_eq!(resource, expected.resource);
            (records, expected)
        }
        (Err(kept), Err(prost)) => {
            assert_eq!(kept.to_string(), prost.to_string());
            return;
        }
        (kept, prost) => panic!("tollgate kept {:?}, prost {:?}", kept.map(|_| ()), prost.map(|_| ())),
    };
    let expected: Vec<&LogRecord> = expected.scope_logs.iter().flat_map(|scope| &scope.log_records).collect();
    assert_eq!(records.len(), expected.len());
    let rules = SamplingRules { slow_threshold_ms: Some(1000), token_threshold: Some(100), ..SamplingRules::default() };
    for (record, expected) in records.iter().zip(expected) {
        assert_eq!(&record.decode(), expected);
        let view = record.view();
        assert_eq!(decide_on(&view, &rules, &PRICING), decide(&expected.attributes, &rules, &PRICING));
        let _ = view.body_text();
    }
    extract_encoded_logs(&[bytes], &RULES).expect("decoded above");
}

/// OTLP/JSON bodies: whatever decodes goes through the protobuf checks too.
pub fn json(bytes: &[u8]) {
    if let Ok(request) = tollgate::receiver::json::metrics_request(bytes) {
        for resource in request.resource_metrics {
            resource_metrics(&resource.encode_to_vec());
        }
    }
    if let Ok(request) = tollgate::receiver::json::logs_request(bytes) {
        for resource in request.resource_logs {
            resource_logs(&resource.encode_to_vec());
        }
    }
}
