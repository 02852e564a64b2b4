//! What forwarded data and fan-out queries look like between nodes (postcard inside the `Peer`
//! protocol's payload fields).

use bytes::Bytes;
#[cfg(test)]
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use serde::{Deserialize, Serialize, Serializer};
use std::sync::Arc;
use tollgate_rules::attributes::PointAttributes;
use tollgate_rules::ingest::LogFingerprinter;
use tollgate_rules::point::ValidPoint;
use tollgate_rules::{EncodedLog, Entity, ExtractedLog, ExtractedPoint, SeriesId};

/// An extracted point on its way to its owner. Attributes travel as text (their values are
/// compared as text anyway), so the owner computes the same series key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WirePoint {
    series: u128,
    entity: Entity,
    partition: u64,
    metric: String,
    attributes: Vec<(String, String)>,
    point: ValidPoint,
}

/// Encodes points for their owner, read back as [`WirePoint`]s by [`decode_points`], straight
/// from the extracted points: postcard lays out borrowed strings and references exactly like the
/// owned values, so nothing is copied into a `WirePoint` first.
pub fn encode_points(points: &[ExtractedPoint]) -> Vec<u8> {
    /// A [`WirePoint`], borrowed (same fields, same order).
    #[derive(Serialize)]
    struct Borrowed<'a> {
        series: u128,
        entity: &'a Entity,
        partition: u64,
        metric: &'a str,
        attributes: Attributes<'a>,
        point: &'a ValidPoint,
    }
    struct Attributes<'a>(&'a PointAttributes);
    impl Serialize for Attributes<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter())
        }
    }
    struct Points<'a>(&'a [ExtractedPoint]);
    impl Serialize for Points<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(|point| Borrowed {
                series: point.series.0,
                entity: &point.entity,
                partition: point.partition,
                metric: &point.metric,
                attributes: Attributes(&point.attributes),
                point: &point.point,
            }))
        }
    }
    // About what a gateway's histogram point takes, so that the buffer rarely grows.
    let buffer = Vec::with_capacity(64 + 320 * points.len());
    postcard::to_extend(&Points(points), buffer).expect("wire values always encode")
}

/// Decodes [`encode_points`]' output. Consecutive points of one entity or metric (all of an
/// export's, usually) share one allocation of it, as they did before they were forwarded.
pub fn decode_points(bytes: &[u8]) -> Result<Vec<ExtractedPoint>, String> {
    let wire: Vec<WirePoint> = decode("points", bytes)?;
    let mut entity: Option<Arc<Entity>> = None;
    let mut metric: Option<Arc<str>> = None;
    let points = wire
        .into_iter()
        .map(|point| {
            let shared_entity = match &entity {
                Some(last) if **last == point.entity => Arc::clone(last),
                _ => Arc::clone(entity.insert(Arc::new(point.entity))),
            };
            let shared_metric = match &metric {
                Some(last) if **last == *point.metric => Arc::clone(last),
                _ => Arc::clone(metric.insert(Arc::from(point.metric.as_str()))),
            };
            ExtractedPoint {
                series: SeriesId(point.series),
                entity: shared_entity,
                partition: point.partition,
                metric: shared_metric,
                attributes: PointAttributes::from_pairs(&point.attributes),
                point: point.point,
            }
        })
        .collect();
    Ok(points)
}

#[cfg(test)]
fn string_attribute(key: String, value: String) -> KeyValue {
    KeyValue { key, value: Some(AnyValue { value: Some(Value::StringValue(value)) }), ..Default::default() }
}

/// A log record on its way to its owner (the record itself as OTLP protobuf).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireLog {
    entity: Entity,
    partition: u64,
    time_ns: u64,
    fingerprint: u128,
    record: Vec<u8>,
}

impl From<ExtractedLog> for WireLog {
    fn from(log: ExtractedLog) -> WireLog {
        WireLog {
            entity: (*log.entity).clone(),
            partition: log.partition,
            time_ns: log.time_ns,
            // Owners now fingerprint the records they keep themselves; a member of an earlier
            // version still reads this one.
            fingerprint: LogFingerprinter::default().fingerprint(&log.entity, &log.record.view()),
            record: log.record.bytes().to_vec(),
        }
    }
}

impl WireLog {
    /// Back to an extracted record.
    pub fn into_extracted(self) -> Result<ExtractedLog, String> {
        let record = EncodedLog::new(Bytes::from(self.record)).map_err(|e| format!("forwarded log record: {e}"))?;
        Ok(ExtractedLog { entity: Arc::new(self.entity), partition: self.partition, time_ns: self.time_ns, record })
    }
}

/// The data points of an encoded OTLP `ResourceMetrics`, counted without decoding them (the
/// receiving node counts what it passes on undecoded); an error when its structure, down to the
/// points, does not parse.
pub fn count_data_points(resource_metrics: &[u8]) -> Result<u64, String> {
    // Field numbers of `opentelemetry/proto/metrics/v1/metrics.proto`: scope metrics, metrics,
    // the data (gauge, sum, histogram, exponential histogram, summary), data points.
    count_nested(resource_metrics, &[&[2], &[2], &[5, 7, 9, 10, 11], &[1]])
        .map_err(|error| format!("resource metrics do not parse: {error}"))
}

/// The log records of an encoded OTLP `ResourceLogs`, counted without decoding them.
pub fn count_log_records(resource_logs: &[u8]) -> Result<u64, String> {
    // `opentelemetry/proto/logs/v1/logs.proto`: scope logs, log records.
    count_nested(resource_logs, &[&[2], &[2]]).map_err(|error| format!("resource logs do not parse: {error}"))
}

/// The messages at the end of `path` (field numbers, level by level) inside `message`.
fn count_nested(message: &[u8], path: &[&[u64]]) -> Result<u64, String> {
    let Some((numbers, rest)) = path.split_first() else {
        return Ok(1);
    };
    let mut count = 0;
    length_delimited(message, numbers, &mut |content| {
        count += count_nested(content, rest)?;
        Ok(())
    })?;
    Ok(count)
}

/// Calls `each` with the content of every length-delimited field of a protobuf message whose
/// number is one of `numbers`, checking the framing of all its fields.
fn length_delimited(
    mut message: &[u8],
    numbers: &[u64],
    each: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let decode_varint = |bytes: &mut &[u8]| prost::encoding::decode_varint(bytes).map_err(|e| e.to_string());
    let truncated = || "truncated field".to_string();
    while !message.is_empty() {
        let key = decode_varint(&mut message)?;
        let skip = match key & 7 {
            0 => {
                decode_varint(&mut message)?;
                0
            }
            1 => 8,
            2 => {
                let len = usize::try_from(decode_varint(&mut message)?).map_err(|_| truncated())?;
                let content = message.get(..len).ok_or_else(truncated)?;
                if numbers.contains(&(key >> 3)) {
                    each(content)?;
                }
                len
            }
            5 => 4,
            wire_type => return Err(format!("unexpected wire type {wire_type}")),
        };
        message = message.get(skip..).ok_or_else(truncated)?;
    }
    Ok(())
}

/// Encodes a wire value.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("wire values always encode")
}

/// Encodes a value whose types skip empty optional fields (the catalogue's rules): postcard
/// cannot read those back, JSON can.
pub fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("wire values always encode")
}

/// Decodes [`encode_json`]'s output, naming what failed.
pub fn decode_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("undecodable {what}: {e}"))
}

/// Decodes a wire value, naming what failed.
pub fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("undecodable {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::logs::v1::LogRecord;
    use prost::Message;
    use tollgate_rules::testing::{gateway_resource, Convention, GatewayPod};
    use tollgate_rules::{extract_logs, extract_metrics, CompiledRules};

    /// The owned form [`encode_points`] must encode exactly like.
    impl From<ExtractedPoint> for WirePoint {
        fn from(point: ExtractedPoint) -> WirePoint {
            let attributes = point.attributes.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
            WirePoint {
                series: point.series.0,
                entity: (*point.entity).clone(),
                partition: point.partition,
                metric: point.metric.to_string(),
                attributes,
                point: point.point,
            }
        }
    }

    #[test]
    fn test_points_survive_the_wire_with_their_series_id() {
        let mut pod = GatewayPod::new("gw", "pod-0", 2, false, 10, 1_764_151_200);
        let batch = extract_metrics(pod.export(0), &CompiledRules::default());
        assert!(!batch.points.is_empty());
        for point in &batch.points {
            let key = point.key();
            let wire: WirePoint = point.clone().into();
            let back = decode_points(&encode(&vec![wire])).unwrap().remove(0);
            assert_eq!(back.series, key.id());
            assert_eq!(back.key(), key);
            assert_eq!(back.point, point.point);
        }
        // The borrowed encoding is byte for byte the owned one, and reads back the same points.
        let owned: Vec<WirePoint> = batch.points.iter().cloned().map(WirePoint::from).collect();
        let bytes = encode_points(&batch.points);
        assert_eq!(bytes, encode(&owned));
        let back = decode_points(&bytes).unwrap();
        assert_eq!(back.len(), batch.points.len());
        for (back, point) in back.iter().zip(&batch.points) {
            assert_eq!((back.series, back.key(), &back.point), (point.series, point.key(), &point.point));
        }
        assert!(Arc::ptr_eq(&back[0].entity, &back[back.len() - 1].entity), "one entity, shared");
        assert!(decode_points(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn test_data_points_are_counted_without_decoding() {
        use opentelemetry_proto::tonic::metrics::v1::{metric::Data, Gauge, Metric, NumberDataPoint, ScopeMetrics};
        let mut pod = GatewayPod::new("gw", "pod-0", 3, true, 10, 1_764_151_200);
        let mut export = pod.export(0);
        // A gauge (not a gateway metric, still data points) and a metric without data.
        export.resource_metrics[0].scope_metrics.push(ScopeMetrics {
            metrics: vec![
                Metric {
                    name: "other".into(),
                    data: Some(Data::Gauge(Gauge { data_points: vec![NumberDataPoint::default(); 4] })),
                    ..Default::default()
                },
                Metric { name: "empty".into(), ..Default::default() },
            ],
            ..Default::default()
        });
        let resource = &export.resource_metrics[0];
        let expected: usize = resource
            .scope_metrics
            .iter()
            .flat_map(|scope| &scope.metrics)
            .map(|metric| tollgate_rules::ingest::data_point_count(metric.data.as_ref()))
            .sum();
        assert!(expected > 10, "the pod exports several histograms: {expected}");
        let bytes = resource.encode_to_vec();
        assert_eq!(count_data_points(&bytes), Ok(expected as u64));
        // Truncated anywhere inside, the framing no longer holds.
        for cut in [1, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
            assert!(count_data_points(&bytes[..cut]).is_err(), "cut at {cut} of {}", bytes.len());
        }
        assert_eq!(count_data_points(&[]), Ok(0));
        // The same walk over logs: records of two scopes, with attributes and bodies.
        use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
        let record = |code: &str| LogRecord {
            time_unix_nano: 5,
            body: Some(AnyValue { value: Some(Value::StringValue("GET /v1/chat/completions".into())) }),
            attributes: vec![string_attribute("response_code".into(), code.into())],
            ..Default::default()
        };
        let resource_logs = ResourceLogs {
            resource: Some(gateway_resource(Convention::JobName, "gw", None)),
            scope_logs: vec![
                ScopeLogs { log_records: vec![record("200"), record("503"), record("200")], ..Default::default() },
                ScopeLogs { log_records: vec![record("429"), record("200")], ..Default::default() },
            ],
            ..Default::default()
        };
        let bytes = resource_logs.encode_to_vec();
        assert_eq!(count_log_records(&bytes), Ok(5));
        assert!(count_log_records(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn test_logs_survive_the_wire() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
        let record = LogRecord {
            time_unix_nano: 5,
            attributes: vec![string_attribute("response_code".into(), "503".into())],
            ..Default::default()
        };
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(gateway_resource(Convention::JobName, "gw", None)),
                scope_logs: vec![ScopeLogs { log_records: vec![record], ..Default::default() }],
                ..Default::default()
            }],
        };
        let log = extract_logs(request.clone(), &CompiledRules::default()).records.remove(0);
        let wire = WireLog::from(log.clone());
        // A member of an earlier version reads the record's fingerprint from the wire.
        let record = &request.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(wire.fingerprint, tollgate_rules::log_fingerprint(&log.entity, record));
        let back = decode::<WireLog>("log", &encode(&wire)).unwrap().into_extracted().unwrap();
        assert_eq!((&back.entity, back.time_ns, &back.record), (&log.entity, log.time_ns, &log.record));
        assert_eq!(&back.record.decode(), record);
    }
}
