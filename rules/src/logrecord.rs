//! Log records kept encoded from the request to their owner.
//!
//! An owner classifies every access-log record and keeps about one in ten (docs/benchmarks.md,
//! figure 2). Decoding each record into prost's `LogRecord`, two `String`s per attribute (some
//! 50 allocations for the gateway's 25 attributes), then fingerprinting it, was about a third of
//! the node's CPU under that load, mostly for records that were counted and dropped. A record
//! now travels as its encoded bytes (a slice of the request's buffer), checked once when the
//! request is read ([`crate::decode::encoded_resource_logs`], or [`EncodedLog::new`] for a
//! forwarded record: well-formed, every string valid UTF-8, as prost checks them). Its owner reads a [`LogView`] of it: the fields as slices of those bytes, values
//! decoded only when looked up. Only a kept record is fingerprinted and copied into its stored
//! form.

use crate::attributes::{AttributeValue, Attributes};
use crate::decode;
use bytes::Bytes;
use opentelemetry_proto::tonic::common::v1::AnyValue;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::{DecodeError, Message};
use std::borrow::Cow;

/// An encoded OTLP `LogRecord`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedLog {
    /// Bytes [`decode::log_view`] reads (checked at construction, or prost's encoding).
    bytes: Bytes,
    time_unix_nano: u64,
    observed_time_unix_nano: u64,
}

impl EncodedLog {
    /// Checks an encoded `LogRecord` as prost's decoding would (an error where it fails). An
    /// encoding exporters do not produce (a singular field twice, which prost merges, a value
    /// given twice) is decoded by prost and encoded again.
    pub fn new(bytes: Bytes) -> Result<EncodedLog, DecodeError> {
        match decode::check_log(&bytes) {
            Some((time, observed)) => Ok(EncodedLog::checked(bytes, time, observed)),
            None => Ok(EncodedLog::from_record(&LogRecord::decode(&*bytes)?)),
        }
    }

    /// Bytes [`decode::check_log`] accepted, with the times it read.
    pub(crate) fn checked(bytes: Bytes, time_unix_nano: u64, observed_time_unix_nano: u64) -> EncodedLog {
        EncodedLog { bytes, time_unix_nano, observed_time_unix_nano }
    }

    /// A decoded record, encoded.
    pub fn from_record(record: &LogRecord) -> EncodedLog {
        EncodedLog {
            bytes: Bytes::from(record.encode_to_vec()),
            time_unix_nano: record.time_unix_nano,
            observed_time_unix_nano: record.observed_time_unix_nano,
        }
    }

    /// `time_unix_nano`, or `observed_time_unix_nano` when that is 0 (0: neither).
    pub fn time_ns(&self) -> u64 {
        if self.time_unix_nano != 0 {
            self.time_unix_nano
        } else {
            self.observed_time_unix_nano
        }
    }

    /// The encoded record.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The record, decoded by prost (for tests and comparisons: the bytes were checked).
    pub fn decode(&self) -> LogRecord {
        LogRecord::decode(&*self.bytes).unwrap_or_default()
    }

    /// The record's fields, read from its bytes.
    pub fn view(&self) -> LogView<'_> {
        // The bytes were read the same way at construction, or are prost's encoding, which
        // [`decode::log_view`] reads: it does not fail.
        let view = decode::log_view(&self.bytes);
        debug_assert!(view.is_some(), "a checked record that does not read back");
        view.unwrap_or_default()
    }
}

/// The fields of an [`EncodedLog`]: scalars decoded, strings and values as slices of its bytes.
#[derive(Debug, Default)]
pub struct LogView<'a> {
    pub time_unix_nano: u64,
    pub observed_time_unix_nano: u64,
    pub severity_number: i32,
    pub severity_text: &'a str,
    /// The encoded `AnyValue` of the body, if the record has one.
    pub body: Option<&'a [u8]>,
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    /// Each attribute's key (UTF-8, checked) and encoded `AnyValue` (`None`: no value), in
    /// order.
    pub attributes: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

impl LogView<'_> {
    /// The body's text ([`crate::attributes::value_text`]), if the record has a body.
    pub fn body_text(&self) -> Option<Cow<'_, str>> {
        self.body.map(|body| value(Some(body)).into_text())
    }
}

/// An attribute value from its encoding: a string as a slice, any other kind decoded (the
/// bytes were checked, so decoding does not fail).
pub fn value(encoded: Option<&[u8]>) -> AttributeValue<'_> {
    let Some(encoded) = encoded else { return AttributeValue::Other(Cow::Owned(AnyValue::default())) };
    match decode::string_of_value(encoded) {
        Some(text) => AttributeValue::Str(text),
        None => AttributeValue::Other(Cow::Owned(AnyValue::decode(encoded).unwrap_or_default())),
    }
}

impl Attributes for LogView<'_> {
    fn get(&self, key: &str) -> Option<AttributeValue<'_>> {
        self.attributes.iter().find(|(k, _)| *k == key.as_bytes()).map(|(_, encoded)| value(*encoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::PriceTable;
    use crate::sampling::{decide, decide_on, SamplingRules};
    use opentelemetry_proto::tonic::common::v1::{any_value, ArrayValue, KeyValue};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Option<AnyValue>> {
        fn of(value: any_value::Value) -> Option<AnyValue> {
            Some(AnyValue { value: Some(value) })
        }
        fn text(text: &str) -> Option<AnyValue> {
            of(any_value::Value::StringValue(text.to_string()))
        }
        prop_oneof![
            Just(None),
            Just(Some(AnyValue::default())),
            prop_oneof![
                Just(""),
                Just("-"),
                Just("unknown"),
                Just("gpt-4o"),
                Just("openai"),
                Just(" 42 "),
                Just("4.5")
            ]
            .prop_map(text),
            (0u64..200_000).prop_map(|n| text(&n.to_string())),
            any::<i64>().prop_map(|i| of(any_value::Value::IntValue(i % 100_000))),
            prop_oneof![Just(503.0), Just(-2.0), Just(1.5), Just(1e16)]
                .prop_map(|d| of(any_value::Value::DoubleValue(d))),
            any::<bool>().prop_map(|b| of(any_value::Value::BoolValue(b))),
            Just(of(any_value::Value::ArrayValue(ArrayValue { values: vec![] }))),
        ]
    }

    /// Attributes named as the sampling rules read them (some twice, some missing), with values
    /// of every kind.
    fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
        let names = &SamplingRules::default().attributes;
        let keys: Vec<String> = [
            &names.request_model,
            &names.response_model,
            &names.provider,
            &names.mcp_method,
            &names.mcp_provider,
            &names.response_code,
            &names.duration,
            &names.upstream_failure,
            &names.input_tokens,
            &names.output_tokens,
            &names.cached_input_tokens,
            &names.cache_creation_input_tokens,
            &names.session_id,
            &names.mcp_session_id,
        ]
        .into_iter()
        .cloned()
        .chain(["x-request-id".to_string()])
        .collect();
        vec((proptest::sample::select(keys), value()), 0..20).prop_map(|pairs| {
            pairs.into_iter().map(|(key, value)| KeyValue { key, value, ..Default::default() }).collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Classification of an encoded record's view is that of its decoded attributes.
        #[test]
        fn a_view_is_classified_as_the_decoded_record(attributes in attributes(), slow in 0u64..100_000) {
            let pricing = PriceTable::parse(
                "providers:\n  - provider: openai\n    models:\n      - name: gpt-4o\n        input-estimated-cost-per-m: 2.5\n        output-estimated-cost-per-m: 10\n",
            )
            .unwrap();
            let rules = SamplingRules { slow_threshold_ms: Some(slow), ..SamplingRules::default() };
            let record = LogRecord { time_unix_nano: 1, attributes, ..Default::default() };
            let encoded = EncodedLog::from_record(&record);
            prop_assert_eq!(decide_on(&encoded.view(), &rules, &pricing), decide(&record.attributes, &rules, &pricing));
        }
    }
}
