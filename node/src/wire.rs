//! What forwarded data and fan-out queries look like between nodes (postcard inside the `Peer`
//! protocol's payload fields).

use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tollgate_rules::point::ValidPoint;
use tollgate_rules::{Entity, ExtractedLog, ExtractedPoint, SeriesId};

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

impl From<ExtractedPoint> for WirePoint {
    fn from(point: ExtractedPoint) -> WirePoint {
        let attributes = point
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), tollgate_rules::attributes::value_text(kv.value.as_ref()).into_owned()))
            .collect();
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

fn string_attribute(key: String, value: String) -> KeyValue {
    KeyValue { key, value: Some(AnyValue { value: Some(Value::StringValue(value)) }), ..Default::default() }
}

impl From<WirePoint> for ExtractedPoint {
    fn from(point: WirePoint) -> ExtractedPoint {
        ExtractedPoint {
            series: SeriesId(point.series),
            entity: Arc::new(point.entity),
            partition: point.partition,
            metric: Arc::from(point.metric.as_str()),
            attributes: point.attributes.into_iter().map(|(k, v)| string_attribute(k, v)).collect(),
            point: point.point,
        }
    }
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
            fingerprint: log.fingerprint,
            record: log.record.encode_to_vec(),
        }
    }
}

impl WireLog {
    /// Back to an extracted record.
    pub fn into_extracted(self) -> Result<ExtractedLog, String> {
        let record = LogRecord::decode(self.record.as_slice()).map_err(|e| format!("forwarded log record: {e}"))?;
        Ok(ExtractedLog {
            entity: Arc::new(self.entity),
            partition: self.partition,
            time_ns: self.time_ns,
            fingerprint: self.fingerprint,
            record,
        })
    }
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
    use tollgate_rules::testing::{gateway_resource, Convention, GatewayPod};
    use tollgate_rules::{extract_logs, extract_metrics, CompiledRules};

    #[test]
    fn test_points_survive_the_wire_with_their_series_id() {
        let mut pod = GatewayPod::new("gw", "pod-0", 2, false, 10, 1_764_151_200);
        let batch = extract_metrics(pod.export(0), &CompiledRules::default());
        assert!(!batch.points.is_empty());
        for point in batch.points {
            let key = point.key();
            let wire: WirePoint = point.clone().into();
            let back: ExtractedPoint = decode::<WirePoint>("point", &encode(&wire)).unwrap().into();
            assert_eq!(back.series, key.id());
            assert_eq!(back.key(), key);
            assert_eq!(back.point, point.point);
        }
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
        let log = extract_logs(request, &CompiledRules::default()).records.remove(0);
        let back = decode::<WireLog>("log", &encode(&WireLog::from(log.clone()))).unwrap().into_extracted().unwrap();
        assert_eq!((back.fingerprint, back.time_ns, &back.record), (log.fingerprint, log.time_ns, &log.record));
    }
}
