//! OTLP/JSON logs requests, decoded down to their records (see the [module](super)).

use super::{list, AnyValue, Enum, Hex, Int, KeyValue, ProtoEnum, Resource, Scope, U64};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::logs::v1 as otlp;
use serde::Deserialize;

/// Decodes an OTLP/JSON `ExportLogsServiceRequest`; the error says what was wrong and where.
pub fn logs_request(bytes: &[u8]) -> Result<ExportLogsServiceRequest, String> {
    let request: Request = super::request(bytes, "ExportLogsServiceRequest")?;
    Ok(ExportLogsServiceRequest { resource_logs: list(request.resource_logs) })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    #[serde(default)]
    resource_logs: Option<Vec<ResourceLogs>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceLogs {
    #[serde(default)]
    resource: Option<Resource>,
    #[serde(default)]
    scope_logs: Option<Vec<ScopeLogs>>,
    #[serde(default)]
    schema_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScopeLogs {
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(default)]
    log_records: Option<Vec<LogRecord>>,
    #[serde(default)]
    schema_url: Option<String>,
}

impl From<ResourceLogs> for otlp::ResourceLogs {
    fn from(r: ResourceLogs) -> Self {
        otlp::ResourceLogs {
            resource: r.resource.map(Into::into),
            scope_logs: list(r.scope_logs),
            schema_url: r.schema_url.unwrap_or_default(),
        }
    }
}

impl From<ScopeLogs> for otlp::ScopeLogs {
    fn from(s: ScopeLogs) -> Self {
        otlp::ScopeLogs {
            scope: s.scope.map(Into::into),
            log_records: list(s.log_records),
            schema_url: s.schema_url.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogRecord {
    #[serde(default)]
    time_unix_nano: Option<U64>,
    #[serde(default)]
    observed_time_unix_nano: Option<U64>,
    #[serde(default)]
    severity_number: Option<Enum<Severity>>,
    #[serde(default)]
    severity_text: Option<String>,
    #[serde(default)]
    body: Option<AnyValue>,
    #[serde(default)]
    attributes: Option<Vec<KeyValue>>,
    #[serde(default)]
    dropped_attributes_count: Option<Int<u32>>,
    #[serde(default)]
    flags: Option<Int<u32>>,
    #[serde(default)]
    trace_id: Option<Hex>,
    #[serde(default)]
    span_id: Option<Hex>,
    #[serde(default)]
    event_name: Option<String>,
}

impl From<LogRecord> for otlp::LogRecord {
    fn from(r: LogRecord) -> Self {
        otlp::LogRecord {
            time_unix_nano: r.time_unix_nano.map_or(0, |v| v.0),
            observed_time_unix_nano: r.observed_time_unix_nano.map_or(0, |v| v.0),
            severity_number: Enum::value(r.severity_number),
            severity_text: r.severity_text.unwrap_or_default(),
            body: r.body.map(Into::into),
            attributes: list(r.attributes),
            dropped_attributes_count: r.dropped_attributes_count.map_or(0, |v| v.0),
            flags: r.flags.map_or(0, |v| v.0),
            trace_id: r.trace_id.map(|v| v.0).unwrap_or_default(),
            span_id: r.span_id.map(|v| v.0).unwrap_or_default(),
            event_name: r.event_name.unwrap_or_default(),
        }
    }
}

/// A `SeverityNumber`.
struct Severity;

impl ProtoEnum for Severity {
    const WHAT: &'static str = "a severity number";
    const VALUES: &'static str = "SEVERITY_NUMBER_UNSPECIFIED (0) to SEVERITY_NUMBER_FATAL4 (24)";

    fn from_name(name: &str) -> Option<i32> {
        otlp::SeverityNumber::from_str_name(name).map(|s| s as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue as OtlpAnyValue};

    fn records(json: &str) -> Vec<otlp::LogRecord> {
        let request = logs_request(json.as_bytes()).unwrap();
        request.resource_logs.into_iter().flat_map(|r| r.scope_logs).flat_map(|s| s.log_records).collect()
    }

    fn with_records(records: &str) -> String {
        format!(
            r#"{{"resourceLogs":[{{"resource":{{"attributes":[
                {{"key":"service.name","value":{{"stringValue":"envoy-ai-gateway"}}}}]}},
              "scopeLogs":[{{"scope":{{"name":"envoy"}},"logRecords":{records}}}]}}]}}"#
        )
    }

    #[test]
    fn test_otlp_json_logs_decode_as_the_spec_writes_them() {
        let records = records(&with_records(
            r#"[{"timeUnixNano":"1796591300000000000","observedTimeUnixNano":"1796591300000000001",
                "severityNumber":9,"severityText":"INFO","body":{"stringValue":"GET /v1/chat 500"},
                "attributes":[{"key":"response_code","value":{"stringValue":"500"}},
                              {"key":"duration","value":{"intValue":"181"}}],
                "droppedAttributesCount":1,"flags":1,
                "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","eventName":"access"}]"#,
        ));
        let record = &records[0];
        assert_eq!(
            (record.time_unix_nano, record.observed_time_unix_nano),
            (1_796_591_300_000_000_000, 1_796_591_300_000_000_001)
        );
        assert_eq!((record.severity_number, record.severity_text.as_str()), (9, "INFO"));
        assert_eq!(record.body, Some(OtlpAnyValue { value: Some(Value::StringValue("GET /v1/chat 500".into())) }));
        assert_eq!(record.attributes[1].value, Some(OtlpAnyValue { value: Some(Value::IntValue(181)) }));
        assert_eq!((record.dropped_attributes_count, record.flags), (1, 1));
        assert_eq!(record.trace_id[..4], [0x5b, 0x8e, 0xff, 0xf7]);
        assert_eq!(record.span_id.len(), 8);
        assert_eq!(record.event_name, "access");
    }

    #[test]
    fn test_what_protobufs_json_mapping_allows_is_read_not_refused() {
        // Before, opentelemetry-proto's derive refused each of these, and the whole export with it.
        let records = records(&with_records(
            r#"[{"timeUnixNano":1796591300000000000,"severityNumber":"SEVERITY_NUMBER_ERROR",
                 "attributes":[{"key":"ratio","value":{"doubleValue":"NaN"}},
                               {"key":"limit","value":{"doubleValue":"Infinity"}}],"flags":"1"},
                {"timeUnixNano":null,"body":null,"attributes":null,"traceId":null}]"#,
        ));
        assert_eq!(records[0].time_unix_nano, 1_796_591_300_000_000_000);
        assert_eq!(records[0].severity_number, otlp::SeverityNumber::Error as i32);
        assert!(
            matches!(records[0].attributes[0].value, Some(OtlpAnyValue { value: Some(Value::DoubleValue(v)) }) if v.is_nan())
        );
        assert_eq!(
            records[0].attributes[1].value,
            Some(OtlpAnyValue { value: Some(Value::DoubleValue(f64::INFINITY)) })
        );
        assert_eq!(records[0].flags, 1);
        assert_eq!(records[1], otlp::LogRecord::default());
    }

    #[test]
    fn test_malformed_logs_are_errors_that_say_what_and_where() {
        for (records, expected) in [
            (
                r#"[{"severityNumber":"ERROR"}]"#,
                r#""ERROR" is not a severity number: expected SEVERITY_NUMBER_UNSPECIFIED"#,
            ),
            (r#"[{"severityNumber":4294967296}]"#, "4294967296 is out of range for a severity number"),
            (r#"[{"timeUnixNano":"soon"}]"#, r#""soon" is not an unsigned 64-bit integer"#),
            (r#"[{"traceId":"xyz"}]"#, r#""xyz" is not hex-encoded bytes"#),
            (r#"[{"attributes":[{"key":"a","value":{"doubleValue":true}}]}]"#, "expected a number, or \"NaN\""),
            (r#"[{"flags":-1}]"#, "-1 is out of range for an unsigned 32-bit integer"),
            (r#"{}"#, "invalid type: map, expected a sequence"),
        ] {
            let error = logs_request(with_records(records).as_bytes()).unwrap_err();
            assert!(error.starts_with("malformed JSON request: "), "{error}");
            assert!(error.contains(expected), "{records}: {error}");
            assert!(error.contains(" at line "), "{error}");
        }
        assert!(logs_request(b"{}").unwrap().resource_logs.is_empty());
        let error = logs_request(b"[]").unwrap_err();
        assert_eq!(error, "malformed JSON request: the body is an array; an ExportLogsServiceRequest is an object");
    }

    #[test]
    fn test_what_opentelemetry_proto_writes_is_read_back() {
        use opentelemetry_proto::tonic::common::v1::{ArrayValue, InstrumentationScope, KeyValue, KeyValueList};
        use opentelemetry_proto::tonic::resource::v1::Resource;
        let kv = |key: &str, value: Value| KeyValue {
            key: key.into(),
            value: Some(OtlpAnyValue { value: Some(value) }),
            key_strindex: 0,
        };
        let request = ExportLogsServiceRequest {
            resource_logs: vec![otlp::ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue("envoy-ai-gateway".into()))],
                    dropped_attributes_count: 2,
                    entity_refs: Vec::new(),
                }),
                scope_logs: vec![otlp::ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "envoy".into(),
                        version: "1".into(),
                        ..Default::default()
                    }),
                    log_records: vec![otlp::LogRecord {
                        time_unix_nano: 1_796_591_300_000_000_000,
                        observed_time_unix_nano: 1_796_591_300_000_000_007,
                        severity_number: 17,
                        severity_text: "ERROR".into(),
                        body: Some(OtlpAnyValue { value: Some(Value::StringValue("body".into())) }),
                        attributes: vec![
                            kv("i", Value::IntValue(-3)),
                            kv("d", Value::DoubleValue(0.25)),
                            kv("b", Value::BoolValue(true)),
                            kv("bytes", Value::BytesValue(vec![0, 1, 254])),
                            kv(
                                "a",
                                Value::ArrayValue(ArrayValue {
                                    values: vec![OtlpAnyValue { value: Some(Value::IntValue(1)) }],
                                }),
                            ),
                            kv(
                                "l",
                                Value::KvlistValue(KeyValueList {
                                    values: vec![kv("x", Value::StringValue("y".into()))],
                                }),
                            ),
                        ],
                        dropped_attributes_count: 1,
                        flags: 1,
                        trace_id: vec![0x5b; 16],
                        span_id: vec![0xee; 8],
                        event_name: "access".into(),
                    }],
                    schema_url: "s".into(),
                }],
                schema_url: "r".into(),
            }],
        };
        let json = serde_json::to_vec(&request).unwrap();
        assert_eq!(logs_request(&json).unwrap(), request);
    }
}
