//! OTLP/JSON metrics requests (`POST /v1/metrics` with `Content-Type: application/json`).
//!
//! opentelemetry-proto's serde derives turn each protobuf `oneof` into a flattened `Option`, and
//! serde answers any error inside a flattened `Option` with `None`: a metric whose histogram had
//! one field spelled another way than the derive expects (an enum by its name, `"NaN"` for a sum)
//! decoded as a metric without data, and all its points vanished from an export answered `{}`.
//! So the metrics of a request are decoded here, by types that mirror the OTLP messages down to
//! their points and say what was wrong (with the line and column) when a field does not parse,
//! and accept what protobuf's JSON mapping allows beside OTLP/JSON's own spelling:
//! - 64-bit integers as strings (OTLP/JSON) or numbers;
//! - doubles as numbers or strings: `"NaN"`, `"Infinity"`, `"-Infinity"` (the mapping's only way
//!   to write them) or a decimal; a non-finite sum, min, max or bound is then rejected with its
//!   point (`non_finite_value`, `invalid_bounds`), as over protobuf, and the request's other
//!   points are kept;
//! - enums as numbers (OTLP/JSON) or by name (`"AGGREGATION_TEMPORALITY_DELTA"`);
//! - `null` for any field: its default.
//!
//! Exponential histograms and summaries cannot be merged and are rejected point by point
//! (`unsupported_type`): only their points are counted, their contents are not read. Exemplars
//! are not used and are skipped. Resources, scopes and attributes are opentelemetry-proto's own
//! types (no `oneof` of theirs hides errors: `AnyValue` has its own deserializer).

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1 as otlp;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use std::fmt;

/// Decodes an OTLP/JSON `ExportMetricsServiceRequest`; the error says what was wrong and where.
pub fn metrics_request(bytes: &[u8]) -> Result<ExportMetricsServiceRequest, String> {
    let request: Request = serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON request: {e}"))?;
    Ok(ExportMetricsServiceRequest {
        resource_metrics: request
            .resource_metrics
            .unwrap_or_default()
            .into_iter()
            .map(|r| otlp::ResourceMetrics {
                resource: r.resource,
                scope_metrics: r
                    .scope_metrics
                    .unwrap_or_default()
                    .into_iter()
                    .map(|s| otlp::ScopeMetrics {
                        scope: s.scope,
                        metrics: s.metrics.unwrap_or_default().into_iter().map(|m| m.0).collect(),
                        schema_url: s.schema_url.unwrap_or_default(),
                    })
                    .collect(),
                schema_url: r.schema_url.unwrap_or_default(),
            })
            .collect(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    #[serde(default)]
    resource_metrics: Option<Vec<ResourceMetrics>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceMetrics {
    #[serde(default)]
    resource: Option<Resource>,
    #[serde(default)]
    scope_metrics: Option<Vec<ScopeMetrics>>,
    #[serde(default)]
    schema_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScopeMetrics {
    #[serde(default)]
    scope: Option<InstrumentationScope>,
    #[serde(default)]
    metrics: Option<Vec<Metric>>,
    #[serde(default)]
    schema_url: Option<String>,
}

/// A metric, checked to hold at most one kind of data.
#[derive(Deserialize)]
#[serde(try_from = "MetricFields")]
struct Metric(otlp::Metric);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetricFields {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    metadata: Option<Vec<KeyValue>>,
    #[serde(default)]
    gauge: Option<Numbers>,
    #[serde(default)]
    sum: Option<Numbers>,
    #[serde(default)]
    histogram: Option<Histogram>,
    #[serde(default)]
    exponential_histogram: Option<Unread>,
    #[serde(default)]
    summary: Option<Unread>,
}

impl TryFrom<MetricFields> for Metric {
    type Error = String;

    fn try_from(m: MetricFields) -> Result<Self, String> {
        let name = m.name.unwrap_or_default();
        let mut data = Vec::new();
        if let Some(gauge) = m.gauge {
            data.push(("gauge", Data::Gauge(otlp::Gauge { data_points: gauge.points()? })));
        }
        if let Some(sum) = m.sum {
            let (aggregation_temporality, is_monotonic) = (sum.temporality(), sum.is_monotonic.unwrap_or_default());
            let data_points = sum.points()?;
            data.push(("sum", Data::Sum(otlp::Sum { data_points, aggregation_temporality, is_monotonic })));
        }
        if let Some(histogram) = m.histogram {
            data.push(("histogram", Data::Histogram(histogram.into())));
        }
        if let Some(unread) = m.exponential_histogram {
            let data_points = vec![Default::default(); unread.points()];
            data.push((
                "exponentialHistogram",
                Data::ExponentialHistogram(otlp::ExponentialHistogram { data_points, aggregation_temporality: 0 }),
            ));
        }
        if let Some(unread) = m.summary {
            data.push((
                "summary",
                Data::Summary(otlp::Summary { data_points: vec![Default::default(); unread.points()] }),
            ));
        }
        if data.len() > 1 {
            let kinds: Vec<&str> = data.iter().map(|(kind, _)| *kind).collect();
            return Err(format!(
                "metric {name:?} has {}: a metric holds one of gauge, sum, histogram, exponentialHistogram and summary",
                kinds.join(" and ")
            ));
        }
        Ok(Metric(otlp::Metric {
            name,
            description: m.description.unwrap_or_default(),
            unit: m.unit.unwrap_or_default(),
            metadata: m.metadata.unwrap_or_default(),
            data: data.pop().map(|(_, data)| data),
        }))
    }
}

/// The data of a gauge or a sum.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Numbers {
    #[serde(default)]
    data_points: Option<Vec<NumberPoint>>,
    #[serde(default)]
    aggregation_temporality: Option<Temporality>,
    #[serde(default)]
    is_monotonic: Option<bool>,
}

impl Numbers {
    fn temporality(&self) -> i32 {
        self.aggregation_temporality.as_ref().map_or(0, |t| t.0)
    }

    fn points(self) -> Result<Vec<otlp::NumberDataPoint>, String> {
        self.data_points.unwrap_or_default().into_iter().map(otlp::NumberDataPoint::try_from).collect()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NumberPoint {
    #[serde(default)]
    attributes: Option<Vec<KeyValue>>,
    #[serde(default)]
    start_time_unix_nano: Option<U64>,
    #[serde(default)]
    time_unix_nano: Option<U64>,
    #[serde(default)]
    as_double: Option<F64>,
    #[serde(default)]
    as_int: Option<I64>,
    #[serde(default)]
    flags: Option<u32>,
}

impl TryFrom<NumberPoint> for otlp::NumberDataPoint {
    type Error = String;

    fn try_from(p: NumberPoint) -> Result<Self, String> {
        let value = match (p.as_double, p.as_int) {
            (Some(_), Some(_)) => return Err("a number point has both asDouble and asInt".into()),
            (Some(F64(v)), None) => Some(number_data_point::Value::AsDouble(v)),
            (None, Some(Int(v))) => Some(number_data_point::Value::AsInt(v)),
            (None, None) => None,
        };
        Ok(otlp::NumberDataPoint {
            attributes: p.attributes.unwrap_or_default(),
            start_time_unix_nano: p.start_time_unix_nano.map_or(0, |v| v.0),
            time_unix_nano: p.time_unix_nano.map_or(0, |v| v.0),
            exemplars: Vec::new(),
            flags: p.flags.unwrap_or_default(),
            value,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Histogram {
    #[serde(default)]
    data_points: Option<Vec<HistogramPoint>>,
    #[serde(default)]
    aggregation_temporality: Option<Temporality>,
}

impl From<Histogram> for otlp::Histogram {
    fn from(h: Histogram) -> Self {
        otlp::Histogram {
            data_points: h.data_points.unwrap_or_default().into_iter().map(Into::into).collect(),
            aggregation_temporality: h.aggregation_temporality.map_or(0, |t| t.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistogramPoint {
    #[serde(default)]
    attributes: Option<Vec<KeyValue>>,
    #[serde(default)]
    start_time_unix_nano: Option<U64>,
    #[serde(default)]
    time_unix_nano: Option<U64>,
    #[serde(default)]
    count: Option<U64>,
    #[serde(default)]
    sum: Option<F64>,
    #[serde(default)]
    bucket_counts: Option<Vec<U64>>,
    #[serde(default)]
    explicit_bounds: Option<Vec<F64>>,
    #[serde(default)]
    flags: Option<u32>,
    #[serde(default)]
    min: Option<F64>,
    #[serde(default)]
    max: Option<F64>,
}

impl From<HistogramPoint> for otlp::HistogramDataPoint {
    fn from(p: HistogramPoint) -> Self {
        otlp::HistogramDataPoint {
            attributes: p.attributes.unwrap_or_default(),
            start_time_unix_nano: p.start_time_unix_nano.map_or(0, |v| v.0),
            time_unix_nano: p.time_unix_nano.map_or(0, |v| v.0),
            count: p.count.map_or(0, |v| v.0),
            sum: p.sum.map(|v| v.0),
            bucket_counts: p.bucket_counts.unwrap_or_default().into_iter().map(|v| v.0).collect(),
            explicit_bounds: p.explicit_bounds.unwrap_or_default().into_iter().map(|v| v.0).collect(),
            exemplars: Vec::new(),
            flags: p.flags.unwrap_or_default(),
            min: p.min.map(|v| v.0),
            max: p.max.map(|v| v.0),
        }
    }
}

/// An exponential histogram or a summary: only its points are counted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Unread {
    #[serde(default)]
    data_points: Option<Vec<IgnoredAny>>,
}

impl Unread {
    fn points(&self) -> usize {
        self.data_points.as_ref().map_or(0, Vec::len)
    }
}

/// A 64-bit integer (`uint64`, `fixed64`: `Int<u64>`; `int64`, `sfixed64`: `Int<i64>`): a
/// number or a string of digits.
struct Int<T>(T);
/// A `double`: a number, `"NaN"`, `"Infinity"`, `"-Infinity"` or a decimal string.
struct F64(f64);
/// An `AggregationTemporality`: a number or the enum value's name.
struct Temporality(i32);

type U64 = Int<u64>;
type I64 = Int<i64>;

/// The integer types of [`Int`].
trait Integer: TryFrom<u64> + TryFrom<i64> + std::str::FromStr {
    /// What it is, for error messages.
    const WHAT: &'static str;
}

impl Integer for u64 {
    const WHAT: &'static str = "an unsigned 64-bit integer";
}

impl Integer for i64 {
    const WHAT: &'static str = "a 64-bit integer";
}

impl<'de, T: Integer> Deserialize<'de> for Int<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: Integer> Visitor<'_> for V<T> {
            type Value = Int<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{}, as a number or a string", T::WHAT)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int<T>, E> {
                T::try_from(v).map(Int).map_err(|_| E::custom(format!("{v} is out of range for {}", T::WHAT)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int<T>, E> {
                T::try_from(v).map(Int).map_err(|_| E::custom(format!("{v} is out of range for {}", T::WHAT)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Int<T>, E> {
                v.parse().map(Int).map_err(|_| E::custom(format!("{v:?} is not {}", T::WHAT)))
            }
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for F64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = F64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, or \"NaN\", \"Infinity\", \"-Infinity\" or a decimal as a string")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<F64, E> {
                Ok(F64(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<F64, E> {
                Ok(F64(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<F64, E> {
                Ok(F64(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<F64, E> {
                match v {
                    "NaN" => Ok(F64(f64::NAN)),
                    "Infinity" => Ok(F64(f64::INFINITY)),
                    "-Infinity" => Ok(F64(f64::NEG_INFINITY)),
                    // Rust's parser also reads "inf" and "nan"; JSON's decimals are what is meant.
                    _ if v.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) => {
                        v.parse().map(F64).map_err(|_| E::custom(format!("{v:?} is not a number")))
                    }
                    _ => Err(E::custom(format!("{v:?} is not a number"))),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Temporality {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Temporality;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an aggregation temporality, as a number or a name")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Temporality, E> {
                i32::try_from(v)
                    .map(Temporality)
                    .map_err(|_| E::custom(format!("aggregation temporality {v} is out of range")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Temporality, E> {
                i32::try_from(v)
                    .map(Temporality)
                    .map_err(|_| E::custom(format!("aggregation temporality {v} is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Temporality, E> {
                otlp::AggregationTemporality::from_str_name(v).map(|t| Temporality(t as i32)).ok_or_else(|| {
                    E::custom(format!(
                        "{v:?} is not an aggregation temporality: expected AGGREGATION_TEMPORALITY_DELTA (1) or \
                         AGGREGATION_TEMPORALITY_CUMULATIVE (2)"
                    ))
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram_of(request: &ExportMetricsServiceRequest) -> &otlp::Histogram {
        match &request.resource_metrics[0].scope_metrics[0].metrics[0].data {
            Some(Data::Histogram(histogram)) => histogram,
            other => panic!("histogram expected, got {other:?}"),
        }
    }

    fn with_histogram(histogram: &str) -> String {
        format!(
            r#"{{"resourceMetrics":[{{"resource":{{"attributes":[
                {{"key":"service.name","value":{{"stringValue":"gw"}}}}]}},
              "scopeMetrics":[{{"scope":{{"name":"envoyproxy/ai-gateway"}},"metrics":[{{
                "name":"gen_ai.server.request.duration","unit":"s","histogram":{histogram}}}]}}]}}]}}"#
        )
    }

    #[test]
    fn test_otlp_json_request_decodes_as_the_spec_writes_it() {
        // OTLP/JSON: camelCase names, 64-bit integers as strings, enums as numbers.
        let json = with_histogram(
            r#"{"aggregationTemporality":1,"dataPoints":[{
                "attributes":[{"key":"gen_ai.provider.name","value":{"stringValue":"openai"}}],
                "startTimeUnixNano":"1764151180000000000","timeUnixNano":"1764151210000000000",
                "count":"3","sum":3.242,"bucketCounts":["0","1","2"],"explicitBounds":[0.5,1.0],
                "min":0.304,"max":1.471,"exemplars":[{"asDouble":0.5,"timeUnixNano":"1"}]}]}"#,
        );
        let request = metrics_request(json.as_bytes()).unwrap();
        let histogram = histogram_of(&request);
        let point = &histogram.data_points[0];
        assert_eq!(histogram.aggregation_temporality, 1);
        assert_eq!(point.start_time_unix_nano, 1_764_151_180_000_000_000);
        assert_eq!(point.time_unix_nano, 1_764_151_210_000_000_000);
        assert_eq!(point.count, 3);
        assert_eq!(point.bucket_counts, vec![0, 1, 2]);
        assert_eq!(point.explicit_bounds, vec![0.5, 1.0]);
        assert_eq!((point.sum, point.min, point.max), (Some(3.242), Some(0.304), Some(1.471)));
        assert_eq!(point.attributes[0].key, "gen_ai.provider.name");
        assert_eq!(request.resource_metrics[0].resource.as_ref().unwrap().attributes[0].key, "service.name");
    }

    #[test]
    fn test_what_protobufs_json_mapping_allows_is_read_not_dropped() {
        // Before, each of these made opentelemetry-proto's derive drop the whole histogram.
        let json = with_histogram(
            r#"{"aggregationTemporality":"AGGREGATION_TEMPORALITY_CUMULATIVE","dataPoints":[
                {"timeUnixNano":1764151210000000000,"count":2,"sum":"NaN","bucketCounts":[1,1],
                 "explicitBounds":["Infinity"],"min":"-Infinity","max":"2.5e0"},
                {"timeUnixNano":"1","count":null,"sum":null,"bucketCounts":null}]}"#,
        );
        let request = metrics_request(json.as_bytes()).unwrap();
        let histogram = histogram_of(&request);
        assert_eq!(histogram.aggregation_temporality, 2);
        let point = &histogram.data_points[0];
        assert!(point.sum.unwrap().is_nan());
        assert_eq!(point.explicit_bounds, vec![f64::INFINITY]);
        assert_eq!((point.min, point.max), (Some(f64::NEG_INFINITY), Some(2.5)));
        let defaults = &histogram.data_points[1];
        assert_eq!((defaults.time_unix_nano, defaults.count, defaults.sum), (1, 0, None));
        assert!(defaults.bucket_counts.is_empty());
    }

    #[test]
    fn test_number_points_and_unmergeable_kinds() {
        let json = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[
            {"name":"a","sum":{"aggregationTemporality":1,"isMonotonic":true,"dataPoints":[
                {"asInt":"7","timeUnixNano":"5"},{"asDouble":"NaN"},{"asDouble":1.5},{}]}},
            {"name":"b","gauge":{"dataPoints":[{"asDouble":"-Infinity"}]}},
            {"name":"c","summary":{"dataPoints":[{"sum":"NaN","quantileValues":"whatever"},{}]}},
            {"name":"d","exponentialHistogram":{"dataPoints":[{"positive":{"bucketCounts":["x"]}}]}},
            {"name":"e"}]}]}]}"#;
        let request = metrics_request(json.as_bytes()).unwrap();
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let Some(Data::Sum(sum)) = &metrics[0].data else { panic!("sum expected") };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, 1);
        let values: Vec<_> = sum.data_points.iter().map(|p| p.value).collect();
        assert_eq!(values[0], Some(number_data_point::Value::AsInt(7)));
        assert!(matches!(values[1], Some(number_data_point::Value::AsDouble(v)) if v.is_nan()));
        assert_eq!(values[2], Some(number_data_point::Value::AsDouble(1.5)));
        assert_eq!(values[3], None);
        assert_eq!(sum.data_points[0].time_unix_nano, 5);
        let Some(Data::Gauge(gauge)) = &metrics[1].data else { panic!("gauge expected") };
        assert_eq!(gauge.data_points[0].value, Some(number_data_point::Value::AsDouble(f64::NEG_INFINITY)));
        let Some(Data::Summary(summary)) = &metrics[2].data else { panic!("summary expected") };
        assert_eq!(summary.data_points.len(), 2, "counted, to be rejected as unsupported");
        let Some(Data::ExponentialHistogram(exponential)) = &metrics[3].data else { panic!("expected") };
        assert_eq!(exponential.data_points.len(), 1);
        assert_eq!(metrics[4].data, None, "a metric without data is not an error");
    }

    #[test]
    fn test_malformed_fields_are_errors_that_say_what_and_where() {
        for (histogram, expected) in [
            (r#"{"aggregationTemporality":"DELTA"}"#, r#""DELTA" is not an aggregation temporality"#),
            (r#"{"dataPoints":[{"count":"three"}]}"#, r#""three" is not an unsigned 64-bit integer"#),
            (r#"{"dataPoints":[{"count":-1}]}"#, "-1 is out of range for an unsigned 64-bit integer"),
            (r#"{"dataPoints":[{"sum":"inf"}]}"#, r#""inf" is not a number"#),
            (r#"{"dataPoints":[{"sum":true}]}"#, "expected a number, or \"NaN\""),
            (r#"{"dataPoints":[{"bucketCounts":[1,"x"]}]}"#, r#""x" is not an unsigned 64-bit integer"#),
            (r#"{"dataPoints":{}}"#, "invalid type: map, expected a sequence"),
        ] {
            let error = metrics_request(with_histogram(histogram).as_bytes()).unwrap_err();
            assert!(error.starts_with("malformed JSON request: "), "{error}");
            assert!(error.contains(expected), "{histogram}: {error}");
            assert!(error.contains(" at line "), "{error}");
        }
        let both = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[
            {"name":"x","sum":{},"histogram":{}}]}]}]}"#;
        let error = metrics_request(both.as_bytes()).unwrap_err();
        assert!(error.contains(r#"metric "x" has sum and histogram"#), "{error}");
        let error = metrics_request(
            br#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[
            {"sum":{"dataPoints":[{"asInt":1,"asDouble":1}]}}]}]}]}"#,
        )
        .unwrap_err();
        assert!(error.contains("both asDouble and asInt"), "{error}");
        assert!(metrics_request(b"{\"resourceMetrics\": [}").unwrap_err().starts_with("malformed JSON request"));
    }

    #[test]
    fn test_an_empty_object_is_an_empty_request() {
        assert!(metrics_request(b"{}").unwrap().resource_metrics.is_empty());
        assert!(metrics_request(br#"{"resourceMetrics":null}"#).unwrap().resource_metrics.is_empty());
    }

    #[test]
    fn test_what_opentelemetry_proto_writes_is_read_back() {
        use tollgate_rules::testing::{delta_duration, gateway_resource, Convention};
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![otlp::ResourceMetrics {
                resource: Some(gateway_resource(Convention::AigwService, "gw", Some("pod-0"))),
                scope_metrics: vec![otlp::ScopeMetrics {
                    metrics: vec![delta_duration(1_796_000_000, 2, 0.75)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let json = serde_json::to_vec(&request).unwrap();
        assert_eq!(metrics_request(&json).unwrap(), request);
    }
}
