//! OTLP attribute values as text, and sorted attribute sets.
//!
//! Tollgate keeps attribute keys as they arrive (dots included) and compares values as text:
//! the gateway sends strings, the access-log sink sends numbers as strings (`"404"`), other
//! SDKs send ints. One rendering for all of them keeps series identity and label values stable
//! whichever way a value was typed.

use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

/// A point's attributes as they arrived, each as its key and [`value_text`], all the text in one
/// buffer: what series identity, series keys and forwards read of them (the text, not the OTLP
/// value types), held in two allocations instead of two per attribute.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PointAttributes {
    text: String,
    /// For each attribute, where its key ends and where its value ends in `text`.
    ends: Vec<(u32, u32)>,
}

impl PointAttributes {
    /// Room for `attributes` attributes of `text` bytes in all.
    pub fn with_capacity(attributes: usize, text: usize) -> PointAttributes {
        PointAttributes { text: String::with_capacity(text), ends: Vec::with_capacity(attributes) }
    }

    /// The text of OTLP attributes, in their order.
    pub fn from_key_values(attributes: &[KeyValue]) -> PointAttributes {
        let text = attributes.iter().map(|kv| kv.key.len() + 16).sum();
        let mut out = PointAttributes::with_capacity(attributes.len(), text);
        for kv in attributes {
            out.push(&kv.key, &value_text(kv.value.as_ref()));
        }
        out
    }

    /// Attributes given as (key, value text) pairs, in their order.
    pub fn from_pairs(pairs: &[(String, String)]) -> PointAttributes {
        let text = pairs.iter().map(|(key, value)| key.len() + value.len()).sum();
        let mut out = PointAttributes::with_capacity(pairs.len(), text);
        for (key, value) in pairs {
            out.push(key, value);
        }
        out
    }

    /// Adds an attribute after the others.
    pub fn push(&mut self, key: &str, value: &str) {
        self.text.push_str(key);
        let key_end = offset(self.text.len());
        self.text.push_str(value);
        self.ends.push((key_end, offset(self.text.len())));
    }

    /// The number of attributes (repeated keys counted).
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The attributes as (key, value text), in their order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, value_end)| {
            let pair = (&self.text[start..key_end as usize], &self.text[key_end as usize..value_end as usize]);
            start = value_end as usize;
            pair
        })
    }

    /// The sorted set (the first of repeated keys wins, as in [`AttributeSet::from_key_values`]).
    pub fn to_set(&self) -> AttributeSet {
        AttributeSet::from_pairs(self.iter())
    }
}

/// [`PointAttributes`] built from bytes that are checked to be UTF-8 once, at the end: a
/// decoder appends each attribute's key and value as they are on the wire.
#[derive(Debug, Default)]
pub struct PointAttributesBuilder {
    bytes: Vec<u8>,
    ends: Vec<(u32, u32)>,
}

impl PointAttributesBuilder {
    /// Room for `attributes` attributes of `bytes` bytes in all.
    pub fn with_capacity(attributes: usize, bytes: usize) -> PointAttributesBuilder {
        PointAttributesBuilder { bytes: Vec::with_capacity(bytes), ends: Vec::with_capacity(attributes) }
    }

    /// Adds an attribute whose key and value text are still to be checked.
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = offset(self.bytes.len());
        self.bytes.extend_from_slice(value);
        self.ends.push((key_end, offset(self.bytes.len())));
    }

    /// The attributes, or `None` when a key or a value is not UTF-8. The whole text is checked
    /// at once: it is UTF-8 and every key and value starts and ends on a character boundary
    /// exactly when each of them is UTF-8.
    pub fn finish(self) -> Option<PointAttributes> {
        let text = String::from_utf8(self.bytes).ok()?;
        let boundaries = self.ends.iter().all(|&(key_end, _)| text.is_char_boundary(key_end as usize))
            && self.ends.iter().all(|&(_, value_end)| text.is_char_boundary(value_end as usize));
        boundaries.then_some(PointAttributes { text, ends: self.ends })
    }
}

fn offset(len: usize) -> u32 {
    u32::try_from(len).expect("a point's attributes are far smaller than 4 GiB (requests are limited)")
}

/// The text of an attribute value: strings as they are, booleans `true`/`false`, integers in
/// decimal, doubles in their shortest round-trip form, bytes in lowercase hex, arrays and
/// key-value lists as JSON. A missing value is the empty string.
pub fn value_text(value: Option<&AnyValue>) -> Cow<'_, str> {
    let Some(inner) = value.and_then(|v| v.value.as_ref()) else {
        return Cow::Borrowed("");
    };
    match inner {
        Value::StringValue(s) => Cow::Borrowed(s.as_str()),
        Value::BoolValue(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::IntValue(i) => Cow::Owned(i.to_string()),
        Value::DoubleValue(d) => Cow::Owned(double_text(*d)),
        Value::BytesValue(bytes) => Cow::Owned(hex(bytes)),
        Value::ArrayValue(_) | Value::KvlistValue(_) => Cow::Owned(value_json(inner).to_string()),
        // An index into a profiles string table; metrics and logs have no such table.
        Value::StringValueStrindex(_) => Cow::Borrowed(""),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn double_text(d: f64) -> String {
    if d.is_finite() {
        format!("{d}")
    } else if d.is_nan() {
        "NaN".to_string()
    } else if d > 0.0 {
        "Infinity".to_string()
    } else {
        "-Infinity".to_string()
    }
}

fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::StringValue(s) => serde_json::Value::String(s.clone()),
        Value::BoolValue(b) => serde_json::Value::Bool(*b),
        Value::IntValue(i) => serde_json::Value::from(*i),
        Value::DoubleValue(d) => serde_json::Number::from_f64(*d)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| serde_json::Value::String(double_text(*d))),
        Value::BytesValue(bytes) => serde_json::Value::String(hex(bytes)),
        Value::ArrayValue(array) => serde_json::Value::Array(
            array.values.iter().map(|v| v.value.as_ref().map(value_json).unwrap_or(serde_json::Value::Null)).collect(),
        ),
        Value::KvlistValue(list) => serde_json::Value::Object(
            list.values
                .iter()
                .map(|kv| {
                    let inner = kv.value.as_ref().and_then(|v| v.value.as_ref());
                    (kv.key.clone(), inner.map(value_json).unwrap_or(serde_json::Value::Null))
                })
                .collect(),
        ),
        Value::StringValueStrindex(_) => serde_json::Value::Null,
    }
}

/// The first attribute named `key`, if any. OTLP forbids duplicate keys; when a sender repeats
/// one anyway, the first occurrence wins (as in SkyWalking's receiver).
pub fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
    attributes.iter().find(|kv| kv.key == key)
}

/// Attributes looked up by key: decoded ones (`[KeyValue]`), or an encoded log record's
/// ([`crate::logrecord::LogView`]).
pub trait Attributes {
    /// The value of the first attribute named `key` (see [`find`]), `None` when there is none.
    fn get(&self, key: &str) -> Option<AttributeValue<'_>>;
}

/// A looked-up attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeValue<'a> {
    /// A string value.
    Str(&'a str),
    /// Any other kind, or no value (an `AnyValue` without one).
    Other(Cow<'a, AnyValue>),
}

impl<'a> AttributeValue<'a> {
    /// The value as text, as [`value_text`] renders it.
    pub fn into_text(self) -> Cow<'a, str> {
        match self {
            AttributeValue::Str(text) => Cow::Borrowed(text),
            AttributeValue::Other(Cow::Borrowed(value)) => value_text(Some(value)),
            AttributeValue::Other(Cow::Owned(value)) => Cow::Owned(value_text(Some(&value)).into_owned()),
        }
    }
}

impl Attributes for [KeyValue] {
    fn get(&self, key: &str) -> Option<AttributeValue<'_>> {
        find(self, key).map(|kv| match kv.value.as_ref() {
            Some(AnyValue { value: Some(Value::StringValue(text)) }) => AttributeValue::Str(text),
            Some(value) => AttributeValue::Other(Cow::Borrowed(value)),
            None => AttributeValue::Other(Cow::Owned(AnyValue::default())),
        })
    }
}

/// The text of attribute `key`, or `None` when it is missing.
pub fn find_text<'a>(attributes: &'a [KeyValue], key: &str) -> Option<Cow<'a, str>> {
    find(attributes, key).map(|kv| value_text(kv.value.as_ref()))
}

/// A set of attributes as sorted, de-duplicated `(key, text)` pairs: the canonical form used
/// for series identity and label derivation.
///
/// Cloning is cheap (the pairs are shared), so that the series of one owner that have the same
/// attributes (the same model, token type and so on, on every pod) can share one set
/// ([`crate::ingest::SeriesTable`] interns them). Stored as a sequence of pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttributeSet(Arc<[(String, String)]>);

impl AttributeSet {
    /// The canonical set of OTLP attributes (first occurrence of a repeated key wins).
    pub fn from_key_values(attributes: &[KeyValue]) -> AttributeSet {
        AttributeSet::canonical(
            attributes.iter().map(|kv| (kv.key.clone(), value_text(kv.value.as_ref()).into_owned())).collect(),
        )
    }

    /// A set from pairs (sorted here; the first of repeated keys wins).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> AttributeSet {
        AttributeSet::canonical(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// Pairs in their order made a set: sorted by key, the first of repeated keys kept. A stable
    /// sort keeps repeated keys in their order, so the first is the one `dedup` keeps: O(n log n),
    /// where looking for each key among those kept before was O(n²) (a point with 300 000
    /// attributes took two minutes of a runtime thread).
    fn canonical(mut pairs: Vec<(String, String)>) -> AttributeSet {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, kept| later.0 == kept.0);
        AttributeSet(pairs.into())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|index| self.0[index].1.as_str())
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no attribute.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when another clone of this set exists.
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    #[test]
    fn point_attributes_keep_each_key_and_value_text_in_order() {
        let attributes = [
            kv("model", Value::StringValue("gpt-4o".into())),
            kv("", Value::StringValue(String::new())),
            kv("code", Value::IntValue(503)),
            kv("model", Value::StringValue("ignored: the first wins".into())),
            KeyValue { key: "none".into(), value: None, ..Default::default() },
        ];
        let text = PointAttributes::from_key_values(&attributes);
        let pairs: Vec<(&str, &str)> = text.iter().collect();
        assert_eq!(
            pairs,
            [("model", "gpt-4o"), ("", ""), ("code", "503"), ("model", "ignored: the first wins"), ("none", "")]
        );
        assert_eq!((text.len(), text.iter().nth(2)), (5, Some(("code", "503"))));
        assert_eq!(text.to_set(), AttributeSet::from_key_values(&attributes));
        let mut built = PointAttributesBuilder::with_capacity(0, 0);
        for (key, value) in &pairs {
            built.push(key.as_bytes(), value.as_bytes());
        }
        assert_eq!(built.finish(), Some(text));
        let mut invalid = PointAttributesBuilder::default();
        invalid.push(b"k", &[0xff]);
        assert_eq!(invalid.finish(), None);
    }

    #[test]
    fn test_value_text_renders_every_kind() {
        let s = AnyValue { value: Some(Value::StringValue("404".into())) };
        assert_eq!(value_text(Some(&s)), "404");
        let i = AnyValue { value: Some(Value::IntValue(404)) };
        assert_eq!(value_text(Some(&i)), "404");
        let b = AnyValue { value: Some(Value::BoolValue(true)) };
        assert_eq!(value_text(Some(&b)), "true");
        let d = AnyValue { value: Some(Value::DoubleValue(0.25)) };
        assert_eq!(value_text(Some(&d)), "0.25");
        let bytes = AnyValue { value: Some(Value::BytesValue(vec![0xde, 0xad])) };
        assert_eq!(value_text(Some(&bytes)), "dead");
        let array = AnyValue {
            value: Some(Value::ArrayValue(ArrayValue {
                values: vec![
                    AnyValue { value: Some(Value::IntValue(1)) },
                    AnyValue { value: Some(Value::StringValue("a".into())) },
                ],
            })),
        };
        assert_eq!(value_text(Some(&array)), r#"[1,"a"]"#);
        let list = AnyValue {
            value: Some(Value::KvlistValue(KeyValueList { values: vec![kv("k", Value::BoolValue(false))] })),
        };
        assert_eq!(value_text(Some(&list)), r#"{"k":false}"#);
        assert_eq!(value_text(None), "");
        assert_eq!(value_text(Some(&AnyValue { value: None })), "");
    }

    #[test]
    fn test_attribute_set_is_sorted_and_first_key_wins() {
        let set = AttributeSet::from_key_values(&[
            kv("z", Value::StringValue("1".into())),
            kv("a", Value::IntValue(2)),
            kv("z", Value::StringValue("ignored".into())),
        ]);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![("a", "2"), ("z", "1")]);
        assert_eq!(set.get("z"), Some("1"));
        assert_eq!(set.get("missing"), None);
        // Many keys, each repeated with values that sort before the first one's: the first
        // occurrence still wins, in both constructors.
        let pairs: Vec<(String, String)> = (0..3)
            .flat_map(|round| (0..1000).rev().map(move |key| (format!("k{key:04}"), format!("{}", 9 - round))))
            .collect();
        let set = AttributeSet::from_pairs(pairs.clone());
        assert_eq!(set.len(), 1000);
        assert!(set.iter().all(|(_, value)| value == "9"), "{set:?}");
        assert!(set.iter().zip(set.iter().skip(1)).all(|(a, b)| a.0 < b.0));
        let values: Vec<KeyValue> = pairs.iter().map(|(k, v)| kv(k, Value::StringValue(v.clone()))).collect();
        assert_eq!(AttributeSet::from_key_values(&values), set);
    }

    #[test]
    fn test_find_text_returns_first_occurrence() {
        let attributes =
            vec![kv("response_code", Value::StringValue("404".into())), kv("response_code", Value::IntValue(200))];
        assert_eq!(find_text(&attributes, "response_code").as_deref(), Some("404"));
        assert_eq!(find_text(&attributes, "duration"), None);
    }
}
