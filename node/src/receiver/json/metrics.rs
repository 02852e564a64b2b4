//! OTLP/JSON metrics requests, decoded down to their points (see the [module](super)).
//!
//! Exponential histograms and summaries cannot be merged and are rejected point by point
//! (`unsupported_type`): only their points are counted, their contents are not read. Exemplars
//! are not used and are skipped.

use super::{list, Enum, KeyValue, ProtoEnum, Resource, Scope, F64, I64, U64};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1 as otlp;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
use serde::de::IgnoredAny;
use serde::Deserialize;

/// Decodes an OTLP/JSON `ExportMetricsServiceRequest`; the error says what was wrong and where.
pub fn metrics_request(bytes: &[u8]) -> Result<ExportMetricsServiceRequest, String> {
    let request: Request = super::request(bytes, "ExportMetricsServiceRequest")?;
    Ok(ExportMetricsServiceRequest { resource_metrics: list(request.resource_metrics) })
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
    scope: Option<Scope>,
    #[serde(default)]
    metrics: Option<Vec<Metric>>,
    #[serde(default)]
    schema_url: Option<String>,
}

impl From<ResourceMetrics> for otlp::ResourceMetrics {
    fn from(r: ResourceMetrics) -> Self {
        otlp::ResourceMetrics {
            resource: r.resource.map(Into::into),
            scope_metrics: list(r.scope_metrics),
            schema_url: r.schema_url.unwrap_or_default(),
        }
    }
}

impl From<ScopeMetrics> for otlp::ScopeMetrics {
    fn from(s: ScopeMetrics) -> Self {
        otlp::ScopeMetrics {
            scope: s.scope.map(Into::into),
            metrics: list(s.metrics),
            schema_url: s.schema_url.unwrap_or_default(),
        }
    }
}

/// A metric, checked to hold at most one kind of data.
#[derive(Deserialize)]
#[serde(try_from = "MetricFields")]
struct Metric(otlp::Metric);

impl From<Metric> for otlp::Metric {
    fn from(m: Metric) -> Self {
        m.0
    }
}

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
            metadata: list(m.metadata),
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
    aggregation_temporality: Option<Enum<Temporality>>,
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
            (None, Some(super::Int(v))) => Some(number_data_point::Value::AsInt(v)),
            (None, None) => None,
        };
        Ok(otlp::NumberDataPoint {
            attributes: list(p.attributes),
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
    aggregation_temporality: Option<Enum<Temporality>>,
}

impl From<Histogram> for otlp::Histogram {
    fn from(h: Histogram) -> Self {
        otlp::Histogram {
            data_points: list(h.data_points),
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
            attributes: list(p.attributes),
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

/// An `AggregationTemporality`.
struct Temporality;

impl ProtoEnum for Temporality {
    const WHAT: &'static str = "an aggregation temporality";
    const VALUES: &'static str = "AGGREGATION_TEMPORALITY_DELTA (1) or AGGREGATION_TEMPORALITY_CUMULATIVE (2)";

    fn from_name(name: &str) -> Option<i32> {
        otlp::AggregationTemporality::from_str_name(name).map(|t| t as i32)
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
    fn test_resources_and_scopes_in_the_spellings_of_the_mapping() {
        use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue};
        let json = r#"{"resourceMetrics":[{"resource":{"attributes":[
                {"key":"service.name","value":{"stringValue":"gw"}},
                {"key":"weight","value":{"doubleValue":"Infinity"}}],"droppedAttributesCount":"2"},
              "scopeMetrics":[{"scope":{"name":"s","version":"1","attributes":[
                {"key":"n","value":{"intValue":"-3"}}]},"metrics":[]}]}]}"#;
        let request = metrics_request(json.as_bytes()).unwrap();
        let resource = request.resource_metrics[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[1].value, Some(AnyValue { value: Some(Value::DoubleValue(f64::INFINITY)) }));
        assert_eq!(resource.dropped_attributes_count, 2);
        let scope = request.resource_metrics[0].scope_metrics[0].scope.as_ref().unwrap();
        assert_eq!((scope.name.as_str(), scope.version.as_str()), ("s", "1"));
        assert_eq!(scope.attributes[0].value, Some(AnyValue { value: Some(Value::IntValue(-3)) }));
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
        // An array is not a request (serde read it as one, by position: `[]` was empty).
        for body in ["[]", " \n[[]]", "[null]"] {
            let error = metrics_request(body.as_bytes()).unwrap_err();
            assert_eq!(
                error, "malformed JSON request: the body is an array; an ExportMetricsServiceRequest is an object",
                "{body}"
            );
        }
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
