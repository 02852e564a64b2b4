//! OTLP/JSON requests (`POST /v1/metrics` and `/v1/logs` with `Content-Type: application/json`).
//!
//! opentelemetry-proto's serde derives are not used for requests: they turn each protobuf `oneof`
//! into a flattened `Option`, and serde answers any error inside a flattened `Option` with `None`
//! (a metric whose histogram had one field spelled another way than the derive expects decoded as
//! a metric without data, and all its points vanished from an export answered `{}`); and they
//! refuse some of what protobuf's JSON mapping allows (`"NaN"` for a double attribute, an enum by
//! its name), so a relay that writes them (the Collector writes a non-finite double as `"NaN"`)
//! lost whole exports to a 400. Requests are decoded here instead, by types that mirror the OTLP
//! messages, say what was wrong (with the line and column) when a field does not parse, and accept
//! what protobuf's JSON mapping allows beside OTLP/JSON's own spelling:
//! - integers as numbers or strings (OTLP/JSON writes 64-bit ones as strings);
//! - doubles as numbers or strings: `"NaN"`, `"Infinity"`, `"-Infinity"` (the mapping's only way
//!   to write them) or a decimal; a non-finite sum, min, max or bound is then rejected with its
//!   point (`non_finite_value`, `invalid_bounds`), as over protobuf, and the request's other
//!   points are kept;
//! - enums as numbers (OTLP/JSON) or by name (`"AGGREGATION_TEMPORALITY_DELTA"`,
//!   `"SEVERITY_NUMBER_ERROR"`);
//! - trace and span ids as hex (OTLP/JSON), `bytesValue` as base64 (the mapping);
//! - `null` for any field: its default. Unknown fields are ignored.

mod logs;
mod metrics;

pub use logs::logs_request;
pub use metrics::metrics_request;

use base64::Engine as _;
use opentelemetry_proto::tonic::common::v1 as common;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::resource::v1 as resource;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// The message of a request that does not parse.
fn malformed(error: serde_json::Error) -> String {
    format!("malformed JSON request: {error}")
}

/// Decodes a request, which must be a JSON object. serde reads a struct from an array too, by
/// position, so a body of `[]` was an empty request, answered 200.
fn request<'a, T: Deserialize<'a>>(bytes: &'a [u8], message: &str) -> Result<T, String> {
    let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
    if first == Some(&b'[') {
        return Err(format!("malformed JSON request: the body is an array; an {message} is an object"));
    }
    serde_json::from_slice(bytes).map_err(malformed)
}

/// A `Resource`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    #[serde(default)]
    attributes: Option<Vec<KeyValue>>,
    #[serde(default)]
    dropped_attributes_count: Option<Int<u32>>,
    #[serde(default)]
    entity_refs: Option<Vec<common::EntityRef>>,
}

impl From<Resource> for resource::Resource {
    fn from(r: Resource) -> Self {
        resource::Resource {
            attributes: list(r.attributes),
            dropped_attributes_count: r.dropped_attributes_count.map_or(0, |v| v.0),
            entity_refs: r.entity_refs.unwrap_or_default(),
        }
    }
}

/// An `InstrumentationScope`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Scope {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    attributes: Option<Vec<KeyValue>>,
    #[serde(default)]
    dropped_attributes_count: Option<Int<u32>>,
}

impl From<Scope> for common::InstrumentationScope {
    fn from(s: Scope) -> Self {
        common::InstrumentationScope {
            name: s.name.unwrap_or_default(),
            version: s.version.unwrap_or_default(),
            attributes: list(s.attributes),
            dropped_attributes_count: s.dropped_attributes_count.map_or(0, |v| v.0),
        }
    }
}

/// A `KeyValue`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyValue {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<AnyValue>,
    #[serde(default)]
    key_strindex: Option<Int<i32>>,
}

/// A repeated field, each item converted; absent or `null` is empty.
fn list<T: Into<U>, U>(items: Option<Vec<T>>) -> Vec<U> {
    items.unwrap_or_default().into_iter().map(Into::into).collect()
}

impl From<KeyValue> for common::KeyValue {
    fn from(kv: KeyValue) -> Self {
        common::KeyValue {
            key: kv.key.unwrap_or_default(),
            value: kv.value.map(Into::into),
            key_strindex: kv.key_strindex.map_or(0, |v| v.0),
        }
    }
}

/// An `AnyValue`: the field it holds (of several, the last, as protobuf decodes a `oneof`); an
/// object with none of them is an empty value.
struct AnyValue(Option<any_value::Value>);

impl From<AnyValue> for common::AnyValue {
    fn from(v: AnyValue) -> Self {
        common::AnyValue { value: v.0 }
    }
}

/// The `values` of an `ArrayValue` or a `KeyValueList`.
#[derive(Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
struct Values<T> {
    #[serde(default)]
    values: Option<Vec<T>>,
}

impl<'de> Deserialize<'de> for AnyValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an AnyValue object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
                use any_value::Value;
                let mut value = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let next = match key.as_ref() {
                        "stringValue" => map.next_value::<Option<String>>()?.map(Value::StringValue),
                        "boolValue" => map.next_value::<Option<bool>>()?.map(Value::BoolValue),
                        "intValue" => map.next_value::<Option<Int<i64>>>()?.map(|v| Value::IntValue(v.0)),
                        "doubleValue" => map.next_value::<Option<F64>>()?.map(|v| Value::DoubleValue(v.0)),
                        "arrayValue" => map
                            .next_value::<Option<Values<AnyValue>>>()?
                            .map(|a| Value::ArrayValue(common::ArrayValue { values: list(a.values) })),
                        "kvlistValue" => map
                            .next_value::<Option<Values<KeyValue>>>()?
                            .map(|l| Value::KvlistValue(common::KeyValueList { values: list(l.values) })),
                        "bytesValue" => match map.next_value::<Option<String>>()? {
                            Some(text) => Some(Value::BytesValue(
                                base64::engine::general_purpose::STANDARD
                                    .decode(&text)
                                    .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&text))
                                    .map_err(|_| de::Error::custom(format!("bytesValue {text:?} is not base64")))?,
                            )),
                            None => None,
                        },
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            None
                        }
                    };
                    if next.is_some() {
                        value = next;
                    }
                }
                Ok(AnyValue(value))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// An integer: a number or a string of digits (`Int<u64>` for `uint64` and `fixed64`, ...).
struct Int<T>(T);
/// A `double`: a number, `"NaN"`, `"Infinity"`, `"-Infinity"` or a decimal string.
struct F64(f64);
/// A protobuf enum's value: a number or the value's name.
struct Enum<T>(i32, std::marker::PhantomData<T>);
/// Bytes written as hex (trace and span ids).
struct Hex(Vec<u8>);

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

impl Integer for u32 {
    const WHAT: &'static str = "an unsigned 32-bit integer";
}

impl Integer for i32 {
    const WHAT: &'static str = "a 32-bit integer";
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

/// The protobuf enums of [`Enum`].
trait ProtoEnum {
    /// What it is, for error messages.
    const WHAT: &'static str;
    /// The values it has, for error messages.
    const VALUES: &'static str;
    /// The value of a name.
    fn from_name(name: &str) -> Option<i32>;
}

impl<T> Enum<T> {
    fn value(this: Option<Self>) -> i32 {
        this.map_or(0, |e| e.0)
    }
}

impl<'de, T: ProtoEnum> Deserialize<'de> for Enum<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: ProtoEnum> V<T> {
            fn number<E: de::Error>(v: impl TryInto<i32> + fmt::Display + Copy) -> Result<Enum<T>, E> {
                v.try_into()
                    .map(|v| Enum(v, std::marker::PhantomData))
                    .map_err(|_| E::custom(format!("{v} is out of range for {}", T::WHAT)))
            }
        }
        impl<T: ProtoEnum> Visitor<'_> for V<T> {
            type Value = Enum<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{}, as a number or a name", T::WHAT)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Enum<T>, E> {
                Self::number(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Enum<T>, E> {
                Self::number(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Enum<T>, E> {
                T::from_name(v)
                    .map(|v| Enum(v, std::marker::PhantomData))
                    .ok_or_else(|| E::custom(format!("{v:?} is not {}: expected {}", T::WHAT, T::VALUES)))
            }
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let digits: Option<Vec<u8>> = text.bytes().map(|b| (b as char).to_digit(16).map(|d| d as u8)).collect();
        match digits {
            Some(digits) if digits.len() % 2 == 0 => Ok(Hex(digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect())),
            _ => Err(de::Error::custom(format!("{text:?} is not hex-encoded bytes"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(json: &str) -> Result<Option<any_value::Value>, String> {
        serde_json::from_str::<AnyValue>(json).map(|v| v.0).map_err(|e| e.to_string())
    }

    #[test]
    fn test_any_values_in_every_spelling_the_mapping_allows() {
        use any_value::Value;
        assert_eq!(any(r#"{"stringValue":"a"}"#).unwrap(), Some(Value::StringValue("a".into())));
        assert_eq!(any(r#"{"boolValue":true}"#).unwrap(), Some(Value::BoolValue(true)));
        assert_eq!(any(r#"{"intValue":"-7"}"#).unwrap(), Some(Value::IntValue(-7)));
        assert_eq!(any(r#"{"intValue":7}"#).unwrap(), Some(Value::IntValue(7)));
        assert_eq!(any(r#"{"doubleValue":1.5}"#).unwrap(), Some(Value::DoubleValue(1.5)));
        assert_eq!(any(r#"{"doubleValue":"-Infinity"}"#).unwrap(), Some(Value::DoubleValue(f64::NEG_INFINITY)));
        assert!(matches!(any(r#"{"doubleValue":"NaN"}"#).unwrap(), Some(Value::DoubleValue(v)) if v.is_nan()));
        assert_eq!(any(r#"{"bytesValue":"AQL/"}"#).unwrap(), Some(Value::BytesValue(vec![1, 2, 255])));
        assert_eq!(any(r#"{"bytesValue":"AQL_"}"#).unwrap(), Some(Value::BytesValue(vec![1, 2, 255])));
        let nested =
            any(r#"{"kvlistValue":{"values":[{"key":"k","value":{"arrayValue":{"values":[{"intValue":"1"},{}]}}}]}}"#)
                .unwrap();
        let expected = Value::KvlistValue(common::KeyValueList {
            values: vec![common::KeyValue {
                key: "k".into(),
                key_strindex: 0,
                value: Some(common::AnyValue {
                    value: Some(Value::ArrayValue(common::ArrayValue {
                        values: vec![
                            common::AnyValue { value: Some(Value::IntValue(1)) },
                            common::AnyValue { value: None },
                        ],
                    })),
                }),
            }],
        });
        assert_eq!(nested, Some(expected));
        assert_eq!(any(r#"{}"#).unwrap(), None);
        assert_eq!(any(r#"{"stringValue":null,"futureValue":{"x":1}}"#).unwrap(), None);
        assert_eq!(any(r#"{"arrayValue":{}}"#).unwrap(), Some(Value::ArrayValue(common::ArrayValue::default())));
    }

    #[test]
    fn test_malformed_any_values_say_what_was_wrong() {
        for (json, expected) in [
            (r#"{"intValue":"7.5"}"#, r#""7.5" is not a 64-bit integer"#),
            (r#"{"doubleValue":"nan"}"#, r#""nan" is not a number"#),
            (r#"{"bytesValue":"not base64!"}"#, "is not base64"),
            (r#"{"boolValue":"yes"}"#, "expected a boolean"),
            (r#""text""#, "expected an AnyValue object"),
        ] {
            let error = any(json).unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn test_hex_ids() {
        let hex: Hex = serde_json::from_str(r#""0aFF""#).unwrap();
        assert_eq!(hex.0, vec![0x0a, 0xff]);
        assert_eq!(serde_json::from_str::<Hex>(r#""""#).unwrap().0, Vec::<u8>::new());
        for bad in [r#""abc""#, r#""zz""#, r#""é0""#] {
            let error = serde_json::from_str::<Hex>(bad).err().unwrap().to_string();
            assert!(error.contains("is not hex-encoded bytes"), "{bad}: {error}");
        }
    }
}
