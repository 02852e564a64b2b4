//! Decoding of one encoded `ResourceMetrics`, the message a node decodes for every metrics
//! export it owns, into `opentelemetry-proto`'s types: the same values as prost's
//! `Message::decode`, for less work. An encoded `ResourceLogs` is checked as prost would decode
//! it, but its records stay encoded ([`encoded_resource_logs`], [`crate::logrecord`]).
//!
//! prost grows every repeated field one element at a time (a histogram point's attributes, bucket
//! counts and bounds each went through three or four reallocations, a log record's 25 attributes
//! through four) and walks each field through generic merge code. Under a figure 1 load
//! (docs/benchmarks-history.md, step 25) decoding was a third of the node's instructions, a sixth
//! of them growing vectors. This decoder counts the elements of a repeated field before it fills
//! the field, and reads each field directly. The attributes of histogram and sum points, two
//! `String`s per attribute that lived only until the point's series id was hashed, are kept as
//! text in one buffer per point instead ([`DecodedMetrics`], [`PointAttributes`]).
//!
//! It takes the inputs that prost's encoder (and every OTLP exporter) produces. Anything else it
//! does not decode itself but hands to prost, which then decodes the whole message and reports
//! any error: a singular message field that occurs twice (prost merges the occurrences), a
//! malformed field, a group. Field types that exporters of gateway data do not send (gauges,
//! exponential histograms, summaries, exemplars, entity references, arrays and key-value lists
//! as values) are decoded by prost in place. So the result is always prost's (with the points'
//! attributes as [`DecodedMetrics::from_prost`] makes them text), except that a value
//! nested more than about 95 levels deep inside an attribute is accepted here, where prost's
//! recursion limit of 100 counts the levels above it too.

use crate::attributes::{value_text, PointAttributes, PointAttributesBuilder};
use crate::logrecord::{EncodedLog, LogView};
use crate::varint;
use bytes::Bytes;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, EntityRef, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::ResourceLogs;
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, Exemplar, ExponentialHistogram, Gauge, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::{DecodeError, Message};

/// A decoded `ResourceMetrics` whose histogram and sum points hold their attributes apart, as
/// text ([`PointAttributes`]): what extraction reads of them. A point's attributes are otherwise
/// decoded into two `String`s per attribute that live only until the point's series id is hashed.
#[derive(Clone, Debug, Default)]
pub struct DecodedMetrics {
    /// The resource; its histogram and sum points have no `attributes` here.
    pub(crate) resource: ResourceMetrics,
    /// The attributes of every histogram and sum point, metric after metric.
    attributes: Vec<PointAttributes>,
    /// For each metric of every scope, in order, the index of its first point's attributes.
    starts: Vec<usize>,
}

impl DecodedMetrics {
    /// Moves the attributes of a decoded resource's histogram and sum points into text.
    pub fn from_prost(mut resource: ResourceMetrics) -> DecodedMetrics {
        let mut attributes = Vec::new();
        let mut starts = Vec::new();
        for metric in resource.scope_metrics.iter_mut().flat_map(|scope| scope.metrics.iter_mut()) {
            starts.push(attributes.len());
            match &mut metric.data {
                Some(Data::Histogram(histogram)) => attributes
                    .extend(histogram.data_points.iter_mut().map(|p| text_of(std::mem::take(&mut p.attributes)))),
                Some(Data::Sum(sum)) => {
                    attributes.extend(sum.data_points.iter_mut().map(|p| text_of(std::mem::take(&mut p.attributes))))
                }
                _ => {}
            }
        }
        DecodedMetrics { resource, attributes, starts }
    }

    /// Takes the attributes of histogram or sum point `point` of metric `metric` (counted over
    /// all scopes of the resource, in order).
    pub fn take_attributes(&mut self, metric: usize, point: usize) -> PointAttributes {
        std::mem::take(&mut self.attributes[self.starts[metric] + point])
    }
}

fn text_of(attributes: Vec<KeyValue>) -> PointAttributes {
    PointAttributes::from_key_values(&attributes)
}

/// Decodes an encoded `ResourceMetrics`: the values of `ResourceMetrics::decode`, and its errors,
/// with the histogram and sum points' attributes held apart ([`DecodedMetrics::from_prost`]).
pub fn resource_metrics(bytes: &[u8]) -> Result<DecodedMetrics, DecodeError> {
    match fast_resource_metrics(bytes) {
        Ok(decoded) => Ok(decoded),
        Err(Unusual) => ResourceMetrics::decode(bytes).map(DecodedMetrics::from_prost),
    }
}

/// Input this decoder leaves to prost: malformed, or encoded in a way no exporter encodes.
#[derive(Debug)]
struct Unusual;

impl From<DecodeError> for Unusual {
    fn from(_: DecodeError) -> Unusual {
        Unusual
    }
}

type Fast<T> = Result<T, Unusual>;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// The fields of one message.
struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Fields<'a> {
        Fields { buf }
    }

    /// The next field's tag and wire type, `None` at the end.
    fn next(&mut self) -> Fast<Option<(u32, u8)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag = key >> 3;
        if tag == 0 || tag > u64::from(u32::MAX >> 3) {
            return Err(Unusual);
        }
        Ok(Some((tag as u32, (key & 7) as u8)))
    }

    /// Unsigned LEB128, at most 10 bytes, as protobuf's varints.
    fn varint(&mut self) -> Fast<u64> {
        let (value, len) = varint::read(self.buf).ok_or(Unusual)?;
        self.buf = &self.buf[len..];
        Ok(value)
    }

    fn take(&mut self, len: usize) -> Fast<&'a [u8]> {
        if len > self.buf.len() {
            return Err(Unusual);
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    /// A length-delimited field's bytes.
    fn bytes(&mut self, wire: u8) -> Fast<&'a [u8]> {
        expect(wire, LEN)?;
        let len = self.varint()?;
        self.take(usize::try_from(len).map_err(|_| Unusual)?)
    }

    fn string(&mut self, wire: u8) -> Fast<String> {
        Ok(text(self.bytes(wire)?)?.to_owned())
    }

    fn fixed64(&mut self, wire: u8) -> Fast<u64> {
        expect(wire, FIXED64)?;
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("eight bytes")))
    }

    fn fixed32(&mut self, wire: u8) -> Fast<u32> {
        expect(wire, FIXED32)?;
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("four bytes")))
    }

    fn double(&mut self, wire: u8) -> Fast<f64> {
        self.fixed64(wire).map(f64::from_bits)
    }

    /// A varint field (`uint32`, `int32`, enumerations and `int64` truncate it, as prost does).
    fn uint(&mut self, wire: u8) -> Fast<u64> {
        expect(wire, VARINT)?;
        self.varint()
    }

    /// A repeated `fixed64` or `double` field, packed or not, appended to `values`.
    fn repeated_fixed64<T>(&mut self, wire: u8, values: &mut Vec<T>, from: fn(u64) -> T) -> Fast<()> {
        if wire == LEN {
            let bytes = self.bytes(wire)?;
            if bytes.len() % 8 != 0 {
                return Err(Unusual);
            }
            values.reserve_exact(bytes.len() / 8);
            values.extend(bytes.chunks_exact(8).map(|b| from(u64::from_le_bytes(b.try_into().expect("eight bytes")))));
        } else {
            values.push(from(self.fixed64(wire)?));
        }
        Ok(())
    }

    /// Skips a field no rule of this decoder reads, as prost skips unknown fields.
    fn skip(&mut self, wire: u8) -> Fast<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes(wire).map(drop),
            FIXED32 => self.take(4).map(drop),
            // Groups (deprecated) and invalid wire types: prost's to judge.
            _ => Err(Unusual),
        }
    }

    /// How many fields `tag` has in the rest of the message (0 when it is malformed: the decoding
    /// that follows finds out).
    fn count(&self, tag: u32) -> usize {
        let mut fields = Fields::new(self.buf);
        let mut count = 0;
        while let Ok(Some((t, wire))) = fields.next() {
            if fields.skip(wire).is_err() {
                return 0;
            }
            count += usize::from(t == tag);
        }
        count
    }
}

fn expect(wire: u8, expected: u8) -> Fast<()> {
    if wire == expected {
        Ok(())
    } else {
        Err(Unusual)
    }
}

/// A singular message field: decoded when it occurs first; a second occurrence is merged by prost.
fn once<T>(slot: &mut Option<T>, bytes: &[u8], decode: impl FnOnce(&[u8]) -> Fast<T>) -> Fast<()> {
    if slot.is_some() {
        return Err(Unusual);
    }
    *slot = Some(decode(bytes)?);
    Ok(())
}

/// A message type left to prost.
fn by_prost<M: Message + Default>(bytes: &[u8]) -> Fast<M> {
    Ok(M::decode(bytes)?)
}

fn fast_resource_metrics(bytes: &[u8]) -> Fast<DecodedMetrics> {
    let mut fields = Fields::new(bytes);
    let mut out = DecodedMetrics::default();
    out.resource.scope_metrics.reserve_exact(fields.count(2));
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => once(&mut out.resource.resource, fields.bytes(wire)?, resource)?,
            2 => {
                let scope = scope_metrics(fields.bytes(wire)?, &mut out)?;
                out.resource.scope_metrics.push(scope);
            }
            3 => out.resource.schema_url = fields.string(wire)?,
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

fn resource(bytes: &[u8]) -> Fast<Resource> {
    let mut fields = Fields::new(bytes);
    let mut out = Resource::default();
    out.attributes.reserve_exact(fields.count(1));
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => out.attributes.push(key_value(fields.bytes(wire)?)?),
            2 => out.dropped_attributes_count = fields.uint(wire)? as u32,
            3 => out.entity_refs.push(by_prost::<EntityRef>(fields.bytes(wire)?)?),
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

fn scope(bytes: &[u8]) -> Fast<InstrumentationScope> {
    let mut fields = Fields::new(bytes);
    let mut out = InstrumentationScope::default();
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => out.name = fields.string(wire)?,
            2 => out.version = fields.string(wire)?,
            3 => out.attributes.push(key_value(fields.bytes(wire)?)?),
            4 => out.dropped_attributes_count = fields.uint(wire)? as u32,
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

fn key_value(bytes: &[u8]) -> Fast<KeyValue> {
    let mut fields = Fields::new(bytes);
    let mut out = KeyValue::default();
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => out.key = fields.string(wire)?,
            2 => once(&mut out.value, fields.bytes(wire)?, any_value)?,
            3 => out.key_strindex = fields.uint(wire)? as i32,
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

/// An attribute value: the scalar kinds here, the others (arrays, lists, bytes, string indices)
/// by prost.
fn any_value(bytes: &[u8]) -> Fast<AnyValue> {
    let mut fields = Fields::new(bytes);
    let mut value = None;
    while let Some((tag, wire)) = fields.next()? {
        value = Some(match tag {
            1 => any_value::Value::StringValue(fields.string(wire)?),
            2 => any_value::Value::BoolValue(fields.uint(wire)? != 0),
            3 => any_value::Value::IntValue(fields.uint(wire)? as i64),
            4 => any_value::Value::DoubleValue(fields.double(wire)?),
            5..=8 => return by_prost(bytes),
            _ => {
                fields.skip(wire)?;
                continue;
            }
        });
    }
    Ok(AnyValue { value })
}

fn scope_metrics(bytes: &[u8], decoded: &mut DecodedMetrics) -> Fast<ScopeMetrics> {
    let mut fields = Fields::new(bytes);
    let mut out = ScopeMetrics::default();
    out.metrics.reserve_exact(fields.count(2));
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => once(&mut out.scope, fields.bytes(wire)?, scope)?,
            2 => {
                decoded.starts.push(decoded.attributes.len());
                out.metrics.push(metric(fields.bytes(wire)?, &mut decoded.attributes)?);
            }
            3 => out.schema_url = fields.string(wire)?,
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

/// A metric; the attributes of its histogram or sum points go to `attributes`.
fn metric(bytes: &[u8], attributes: &mut Vec<PointAttributes>) -> Fast<Metric> {
    let mut fields = Fields::new(bytes);
    let mut out = Metric::default();
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => out.name = fields.string(wire)?,
            2 => out.description = fields.string(wire)?,
            3 => out.unit = fields.string(wire)?,
            5 => once(&mut out.data, fields.bytes(wire)?, |b| by_prost::<Gauge>(b).map(Data::Gauge))?,
            7 => once(&mut out.data, fields.bytes(wire)?, |b| sum(b, attributes).map(Data::Sum))?,
            9 => once(&mut out.data, fields.bytes(wire)?, |b| histogram(b, attributes).map(Data::Histogram))?,
            10 => once(&mut out.data, fields.bytes(wire)?, |b| {
                by_prost::<ExponentialHistogram>(b).map(Data::ExponentialHistogram)
            })?,
            11 => once(&mut out.data, fields.bytes(wire)?, |b| by_prost::<Summary>(b).map(Data::Summary))?,
            12 => out.metadata.push(key_value(fields.bytes(wire)?)?),
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

fn histogram(bytes: &[u8], attributes: &mut Vec<PointAttributes>) -> Fast<Histogram> {
    let mut fields = Fields::new(bytes);
    let mut out = Histogram::default();
    let points = fields.count(1);
    out.data_points.reserve_exact(points);
    attributes.reserve(points);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => {
                let (point, text) = histogram_point(fields.bytes(wire)?)?;
                out.data_points.push(point);
                attributes.push(text);
            }
            2 => out.aggregation_temporality = fields.uint(wire)? as i32,
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

/// A histogram point, and its attributes as text.
fn histogram_point(bytes: &[u8]) -> Fast<(HistogramDataPoint, PointAttributes)> {
    let mut fields = Fields::new(bytes);
    let mut out = HistogramDataPoint::default();
    let mut attributes = AttributeFields::default();
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            2 => out.start_time_unix_nano = fields.fixed64(wire)?,
            3 => out.time_unix_nano = fields.fixed64(wire)?,
            4 => out.count = fields.fixed64(wire)?,
            5 => out.sum = Some(fields.double(wire)?),
            6 => fields.repeated_fixed64(wire, &mut out.bucket_counts, |v| v)?,
            7 => fields.repeated_fixed64(wire, &mut out.explicit_bounds, f64::from_bits)?,
            8 => out.exemplars.push(by_prost::<Exemplar>(fields.bytes(wire)?)?),
            9 => attributes.push(fields.bytes(wire)?),
            10 => out.flags = fields.uint(wire)? as u32,
            11 => out.min = Some(fields.double(wire)?),
            12 => out.max = Some(fields.double(wire)?),
            _ => fields.skip(wire)?,
        }
    }
    Ok((out, attributes.text()?))
}

fn sum(bytes: &[u8], attributes: &mut Vec<PointAttributes>) -> Fast<Sum> {
    let mut fields = Fields::new(bytes);
    let mut out = Sum::default();
    let points = fields.count(1);
    out.data_points.reserve_exact(points);
    attributes.reserve(points);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => {
                let (point, text) = number_point(fields.bytes(wire)?)?;
                out.data_points.push(point);
                attributes.push(text);
            }
            2 => out.aggregation_temporality = fields.uint(wire)? as i32,
            3 => out.is_monotonic = fields.uint(wire)? != 0,
            _ => fields.skip(wire)?,
        }
    }
    Ok(out)
}

/// A number point, and its attributes as text.
fn number_point(bytes: &[u8]) -> Fast<(NumberDataPoint, PointAttributes)> {
    let mut fields = Fields::new(bytes);
    let mut out = NumberDataPoint::default();
    let mut attributes = AttributeFields::default();
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            2 => out.start_time_unix_nano = fields.fixed64(wire)?,
            3 => out.time_unix_nano = fields.fixed64(wire)?,
            4 => out.value = Some(number_data_point::Value::AsDouble(fields.double(wire)?)),
            5 => out.exemplars.push(by_prost::<Exemplar>(fields.bytes(wire)?)?),
            6 => out.value = Some(number_data_point::Value::AsInt(fields.fixed64(wire)? as i64)),
            7 => attributes.push(fields.bytes(wire)?),
            8 => out.flags = fields.uint(wire)? as u32,
            _ => fields.skip(wire)?,
        }
    }
    Ok((out, attributes.text()?))
}

/// The encoded attribute fields of one point, gathered while the point is read so that their
/// text is allocated once, at its size.
#[derive(Default)]
struct AttributeFields<'a> {
    first: [&'a [u8]; 16],
    len: usize,
    more: Vec<&'a [u8]>,
}

impl<'a> AttributeFields<'a> {
    fn push(&mut self, field: &'a [u8]) {
        match self.first.get_mut(self.len) {
            Some(slot) => *slot = field,
            None => self.more.push(field),
        }
        self.len += 1;
    }

    /// The attributes as text. Their text is at most their encoded size (string values are
    /// copied as they are; other kinds may render longer and grow it).
    fn text(&self) -> Fast<PointAttributes> {
        let fields = || self.first[..self.len.min(self.first.len())].iter().chain(&self.more);
        let bytes = fields().map(|field| field.len()).sum();
        let mut text = PointAttributesBuilder::with_capacity(self.len, bytes);
        for field in fields() {
            attribute_text(field, &mut text)?;
        }
        text.finish().ok_or(Unusual)
    }
}

/// Appends an encoded `KeyValue` to `text`: its key and [`value_text`], as
/// [`PointAttributes::from_key_values`] would after prost decoded it. A string value (what
/// gateways send) is copied as it is (checked as UTF-8 with the rest of the point's, by
/// [`PointAttributesBuilder::finish`]); other kinds are decoded first.
fn attribute_text(bytes: &[u8], text: &mut PointAttributesBuilder) -> Fast<()> {
    let mut fields = Fields::new(bytes);
    let mut key: Option<&[u8]> = None;
    let mut value = None;
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            // Only the last key counts, but prost checks every one as UTF-8: a repeated key is
            // left to it.
            1 if key.is_some() => return Err(Unusual),
            1 => key = Some(fields.bytes(wire)?),
            2 if value.is_some() => return Err(Unusual),
            2 => value = Some(fields.bytes(wire)?),
            3 => drop(fields.uint(wire)?),
            _ => fields.skip(wire)?,
        }
    }
    let key = key.unwrap_or_default();
    match value.map(string_value).transpose()? {
        Some(Some(string)) => text.push(key, string),
        None => text.push(key, b""),
        Some(None) => {
            let decoded = any_value(value.expect("a value"))?;
            text.push(key, value_text(Some(&decoded)).as_bytes());
        }
    }
    Ok(())
}

/// The value of an encoded `AnyValue` when it is a string (its last value field is
/// `string_value`), `None` when it is another kind.
fn string_value(bytes: &[u8]) -> Fast<Option<&[u8]>> {
    let mut fields = Fields::new(bytes);
    let mut string = None;
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            // As for keys: prost checks every string value as UTF-8, not only the last.
            1 if string.is_some() => return Err(Unusual),
            1 => string = Some(fields.bytes(wire)?),
            2..=8 => return Ok(None),
            _ => fields.skip(wire)?,
        }
    }
    Ok(string)
}

/// Reads an encoded `LogRecord`'s fields for a [`LogView`]. `check`: also check what prost would
/// (every string is UTF-8, every value decodes), without collecting the attributes.
fn walk_log(bytes: &[u8], check: bool) -> Fast<LogView<'_>> {
    let mut fields = Fields::new(bytes);
    let mut view = LogView::default();
    if !check {
        view.attributes.reserve(32);
    }
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => view.time_unix_nano = fields.fixed64(wire)?,
            2 => view.severity_number = fields.uint(wire)? as i32,
            3 => view.severity_text = text(fields.bytes(wire)?)?,
            5 if view.body.is_some() => return Err(Unusual),
            5 => view.body = Some(checked_value(fields.bytes(wire)?, check)?),
            6 => {
                let attribute = key_and_value(fields.bytes(wire)?, check)?;
                if !check {
                    view.attributes.push(attribute);
                }
            }
            7 => drop(fields.uint(wire)?),
            8 => drop(fields.fixed32(wire)?),
            9 => view.trace_id = fields.bytes(wire)?,
            10 => view.span_id = fields.bytes(wire)?,
            11 => view.observed_time_unix_nano = fields.fixed64(wire)?,
            12 => check_text(fields.bytes(wire)?)?,
            _ => fields.skip(wire)?,
        }
    }
    Ok(view)
}

/// The `(time_unix_nano, observed_time_unix_nano)` of an encoded `LogRecord` this module reads
/// itself ([`log_view`]), having checked it as prost would; `None` when it is not one.
pub(crate) fn check_log(bytes: &[u8]) -> Option<(u64, u64)> {
    walk_log(bytes, true).ok().map(|view| (view.time_unix_nano, view.observed_time_unix_nano))
}

/// The fields of an encoded `LogRecord` that [`check_log`] accepted or prost encoded.
pub(crate) fn log_view(bytes: &[u8]) -> Option<LogView<'_>> {
    walk_log(bytes, false).ok()
}

/// An encoded `KeyValue`'s key and encoded value.
fn key_and_value(bytes: &[u8], check: bool) -> Fast<(&[u8], Option<&[u8]>)> {
    let mut fields = Fields::new(bytes);
    let mut key: Option<&[u8]> = None;
    let mut value = None;
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 if key.is_some() => return Err(Unusual),
            1 => key = Some(fields.bytes(wire)?),
            2 if value.is_some() => return Err(Unusual),
            2 => value = Some(checked_value(fields.bytes(wire)?, check)?),
            3 => drop(fields.uint(wire)?),
            _ => fields.skip(wire)?,
        }
    }
    let key = key.unwrap_or_default();
    if check {
        check_text(key)?;
    }
    Ok((key, value))
}

/// An encoded `AnyValue`, checked when `check`: one value at most (prost keeps the last of
/// several), a string UTF-8; arrays, lists and bytes decoded by prost.
fn checked_value(bytes: &[u8], check: bool) -> Fast<&[u8]> {
    if !check {
        return Ok(bytes);
    }
    let mut fields = Fields::new(bytes);
    let mut seen = false;
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1..=8 if seen => return Err(Unusual),
            1 => check_text(fields.bytes(wire)?)?,
            2 | 3 => drop(fields.uint(wire)?),
            4 => drop(fields.double(wire)?),
            5..=8 => {
                AnyValue::decode(bytes)?;
                return Ok(bytes);
            }
            _ => {
                fields.skip(wire)?;
                continue;
            }
        }
        seen = true;
    }
    Ok(bytes)
}

fn text(bytes: &[u8]) -> Fast<&str> {
    std::str::from_utf8(bytes).map_err(|_| Unusual)
}

/// [`text`], for a string only checked: the usual ASCII text is checked without `from_utf8`'s
/// setup, which costs more than the check itself on the short strings of attributes.
fn check_text(bytes: &[u8]) -> Fast<()> {
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(Unusual)
    }
}

/// The string of an encoded `AnyValue` whose value is a string, `None` for any other kind (or
/// none).
pub(crate) fn string_of_value(bytes: &[u8]) -> Option<&str> {
    match string_value(bytes) {
        Ok(Some(string)) => std::str::from_utf8(string).ok(),
        _ => None,
    }
}

/// The resource of an encoded `ResourceLogs` and its records, each a slice of `bytes` (see
/// [`crate::logrecord`]), checked as `ResourceLogs::decode` checks them.
pub fn encoded_resource_logs(bytes: &Bytes) -> Result<(Option<Resource>, Vec<EncodedLog>), DecodeError> {
    match fast_encoded_resource_logs(bytes) {
        Ok(decoded) => Ok(decoded),
        Err(Unusual) => {
            let decoded = ResourceLogs::decode(&**bytes)?;
            let records = decoded.scope_logs.iter().flat_map(|scope| &scope.log_records);
            Ok((decoded.resource, records.map(EncodedLog::from_record).collect()))
        }
    }
}

fn fast_encoded_resource_logs(bytes: &Bytes) -> Fast<(Option<Resource>, Vec<EncodedLog>)> {
    let mut fields = Fields::new(bytes);
    let mut out = None;
    let mut records = Vec::new();
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => once(&mut out, fields.bytes(wire)?, resource)?,
            2 => scope_log_records(bytes, fields.bytes(wire)?, &mut records)?,
            3 => check_text(fields.bytes(wire)?)?,
            _ => fields.skip(wire)?,
        }
    }
    Ok((out, records))
}

/// The records of an encoded `ScopeLogs` inside `buffer` (its scope checked, then dropped).
fn scope_log_records(buffer: &Bytes, bytes: &[u8], records: &mut Vec<EncodedLog>) -> Fast<()> {
    let mut fields = Fields::new(bytes);
    let mut scope_of = None;
    records.reserve(fields.count(2));
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => once(&mut scope_of, fields.bytes(wire)?, scope)?,
            2 => {
                let record = fields.bytes(wire)?;
                let (time, observed) = check_log(record).ok_or(Unusual)?;
                records.push(EncodedLog::checked(buffer.slice_ref(record), time, observed));
            }
            3 => check_text(fields.bytes(wire)?)?,
            _ => fields.skip(wire)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::Attributes;
    use crate::logrecord;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::exemplar;
    use proptest::collection::vec;
    use proptest::option::of;
    use proptest::prelude::*;
    use std::borrow::Cow;

    fn scalar() -> impl Strategy<Value = any_value::Value> {
        prop_oneof![
            "[a-zA-Z0-9._/ -]{0,24}".prop_map(any_value::Value::StringValue),
            "[a-zé€😀 ]{0,12}".prop_map(any_value::Value::StringValue),
            any::<bool>().prop_map(any_value::Value::BoolValue),
            any::<i64>().prop_map(any_value::Value::IntValue),
            any::<f64>().prop_map(any_value::Value::DoubleValue),
        ]
    }

    fn value() -> impl Strategy<Value = AnyValue> {
        let leaf = of(scalar()).prop_map(|value| AnyValue { value });
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                4 => of(scalar()).prop_map(|value| AnyValue { value }),
                1 => vec(inner.clone(), 0..3)
                    .prop_map(|values| AnyValue { value: Some(any_value::Value::ArrayValue(ArrayValue { values })) }),
                1 => vec(("[a-z]{1,6}", of(inner)), 0..3).prop_map(|pairs| AnyValue {
                    value: Some(any_value::Value::KvlistValue(KeyValueList {
                        values: pairs.into_iter().map(|(key, value)| KeyValue { key, value, key_strindex: 0 }).collect(),
                    })),
                }),
                1 => vec(any::<u8>(), 0..8).prop_map(|b| AnyValue { value: Some(any_value::Value::BytesValue(b)) }),
                1 => any::<i32>().prop_map(|i| AnyValue { value: Some(any_value::Value::StringValueStrindex(i)) }),
            ]
        })
    }

    fn attributes(max: usize) -> impl Strategy<Value = Vec<KeyValue>> {
        vec(("[a-z_.]{0,16}", of(value()), prop_oneof![9 => Just(0), 1 => any::<i32>()]), 0..max).prop_map(|pairs| {
            pairs.into_iter().map(|(key, value, key_strindex)| KeyValue { key, value, key_strindex }).collect()
        })
    }

    fn exemplars() -> impl Strategy<Value = Vec<Exemplar>> {
        vec(
            (
                attributes(2),
                any::<u64>(),
                of(prop_oneof![
                    any::<f64>().prop_map(exemplar::Value::AsDouble),
                    any::<i64>().prop_map(exemplar::Value::AsInt),
                ]),
                vec(any::<u8>(), 0..8),
            ),
            0..2,
        )
        .prop_map(|list| {
            list.into_iter()
                .map(|(filtered_attributes, time_unix_nano, value, span_id)| Exemplar {
                    filtered_attributes,
                    time_unix_nano,
                    span_id,
                    trace_id: vec![],
                    value,
                })
                .collect()
        })
    }

    fn histogram_point() -> impl Strategy<Value = HistogramDataPoint> {
        (
            attributes(8),
            (any::<u64>(), any::<u64>(), any::<u64>(), of(any::<f64>())),
            (vec(any::<u64>(), 0..20), vec(any::<f64>(), 0..20)),
            exemplars(),
            (any::<u32>(), of(any::<f64>()), of(any::<f64>())),
        )
            .prop_map(
                |(
                    attributes,
                    (start, time, count, sum),
                    (bucket_counts, explicit_bounds),
                    exemplars,
                    (flags, min, max),
                )| {
                    HistogramDataPoint {
                        attributes,
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        count,
                        sum,
                        bucket_counts,
                        explicit_bounds,
                        exemplars,
                        flags,
                        min,
                        max,
                    }
                },
            )
    }

    fn number_point() -> impl Strategy<Value = NumberDataPoint> {
        (
            attributes(6),
            any::<u64>(),
            any::<u64>(),
            of(prop_oneof![
                any::<f64>().prop_map(number_data_point::Value::AsDouble),
                any::<i64>().prop_map(number_data_point::Value::AsInt),
            ]),
            exemplars(),
            any::<u32>(),
        )
            .prop_map(|(attributes, start, time, value, exemplars, flags)| NumberDataPoint {
                attributes,
                start_time_unix_nano: start,
                time_unix_nano: time,
                value,
                exemplars,
                flags,
            })
    }

    fn data() -> impl Strategy<Value = Option<Data>> {
        of(prop_oneof![
            3 => (vec(histogram_point(), 0..4), 0..4i32)
                .prop_map(|(data_points, t)| Data::Histogram(Histogram { data_points, aggregation_temporality: t })),
            2 => (vec(number_point(), 0..4), 0..4i32, any::<bool>()).prop_map(|(data_points, t, is_monotonic)| {
                Data::Sum(Sum { data_points, aggregation_temporality: t, is_monotonic })
            }),
            1 => vec(number_point(), 0..3).prop_map(|data_points| Data::Gauge(Gauge { data_points })),
            1 => (0..4i32).prop_map(|t| Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![Default::default()],
                aggregation_temporality: t,
            })),
            1 => Just(Data::Summary(Summary { data_points: vec![Default::default()] })),
        ])
    }

    fn metric() -> impl Strategy<Value = Metric> {
        ("[a-z_.]{0,24}", "[a-z ]{0,12}", "[a-z{}]{0,4}", data(), attributes(2))
            .prop_map(|(name, description, unit, data, metadata)| Metric { name, description, unit, data, metadata })
    }

    fn scope() -> impl Strategy<Value = Option<InstrumentationScope>> {
        of(("[a-z/]{0,16}", "[0-9.]{0,6}", attributes(3), any::<u32>()).prop_map(
            |(name, version, attributes, dropped_attributes_count)| InstrumentationScope {
                name,
                version,
                attributes,
                dropped_attributes_count,
            },
        ))
    }

    fn resource() -> impl Strategy<Value = Option<Resource>> {
        of((attributes(10), any::<u32>(), vec("[a-z]{0,6}", 0..2)).prop_map(
            |(attributes, dropped_attributes_count, types)| Resource {
                attributes,
                dropped_attributes_count,
                entity_refs: types
                    .into_iter()
                    .map(|r#type| EntityRef { r#type, id_keys: vec!["k".into()], ..Default::default() })
                    .collect(),
            },
        ))
    }

    fn resource_metrics_message() -> impl Strategy<Value = ResourceMetrics> {
        (resource(), vec((scope(), vec(metric(), 0..4), "[a-z:/]{0,8}"), 0..3), "[a-z:/]{0,8}").prop_map(
            |(resource, scopes, schema_url)| ResourceMetrics {
                resource,
                scope_metrics: scopes
                    .into_iter()
                    .map(|(scope, metrics, schema_url)| ScopeMetrics { scope, metrics, schema_url })
                    .collect(),
                schema_url,
            },
        )
    }

    fn log_record() -> impl Strategy<Value = LogRecord> {
        (
            (any::<u64>(), any::<u64>(), 0..25i32, "[A-Z]{0,5}"),
            (of(value()), attributes(30), any::<u32>(), any::<u32>()),
            (vec(any::<u8>(), 0..16), vec(any::<u8>(), 0..8), "[a-z.]{0,8}"),
        )
            .prop_map(
                |(
                    (time, observed, severity_number, severity_text),
                    (body, attributes, dropped_attributes_count, flags),
                    (trace_id, span_id, event_name),
                )| LogRecord {
                    time_unix_nano: time,
                    observed_time_unix_nano: observed,
                    severity_number,
                    severity_text,
                    body,
                    attributes,
                    dropped_attributes_count,
                    flags,
                    trace_id,
                    span_id,
                    event_name,
                },
            )
    }

    fn resource_logs_message() -> impl Strategy<Value = ResourceLogs> {
        (resource(), vec((scope(), vec(log_record(), 0..5), "[a-z:/]{0,8}"), 0..3), "[a-z:/]{0,8}").prop_map(
            |(resource, scopes, schema_url)| ResourceLogs {
                resource,
                scope_logs: scopes
                    .into_iter()
                    .map(|(scope, log_records, schema_url)| ScopeLogs { scope, log_records, schema_url })
                    .collect(),
                schema_url,
            },
        )
    }

    /// Damage done to an encoding: a byte changed, the end cut off, bytes inserted, or the
    /// message repeated (prost merges the two).
    #[derive(Debug, Clone)]
    enum Damage {
        Flip(usize, u8),
        Cut(usize),
        Insert(usize, Vec<u8>),
        Twice,
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            any::<(usize, u8)>().prop_map(|(at, byte)| Damage::Flip(at, byte)),
            any::<usize>().prop_map(Damage::Cut),
            (any::<usize>(), vec(any::<u8>(), 1..6)).prop_map(|(at, bytes)| Damage::Insert(at, bytes)),
            Just(Damage::Twice),
        ]
    }

    fn apply(mut bytes: Vec<u8>, damage: &Damage) -> Vec<u8> {
        let len = bytes.len();
        match damage {
            Damage::Flip(at, byte) if len > 0 => bytes[at % len] = *byte,
            Damage::Cut(at) if len > 0 => bytes.truncate(at % len),
            Damage::Insert(at, more) => {
                let at = at % (len + 1);
                bytes.splice(at..at, more.iter().copied());
            }
            Damage::Twice => bytes.extend_from_slice(&bytes.clone()),
            _ => {}
        }
        bytes
    }

    /// Two decodings of metrics hold the same values and the same attribute text.
    fn assert_same(decoded: &DecodedMetrics, expected: &DecodedMetrics) {
        assert_eq!(decoded.resource.encode_to_vec(), expected.resource.encode_to_vec());
        assert_eq!(decoded.starts, expected.starts);
        assert_eq!(decoded.attributes, expected.attributes);
    }

    /// The fast path's answer, when it has one, is prost's decoding (with its points' attributes
    /// made text); the public function's answer always is.
    fn metrics_same_as_prost(bytes: &[u8]) {
        let prost = ResourceMetrics::decode(bytes).map(DecodedMetrics::from_prost);
        if let Ok(fast) = fast_resource_metrics(bytes) {
            assert_same(&fast, prost.as_ref().expect("the fast path decoded what prost refuses"));
        }
        match (resource_metrics(bytes), prost) {
            (Ok(public), Ok(prost)) => assert_same(&public, &prost),
            (Err(public), Err(prost)) => assert_eq!(public.to_string(), prost.to_string()),
            (public, prost) => panic!("decoded {:?}, prost {:?}", public.is_ok(), prost.is_ok()),
        }
    }

    /// Records kept encoded ([`encoded_resource_logs`]) read back as prost decodes them, or the
    /// encoding is refused as prost refuses it.
    fn encoded_logs_same_as_prost(bytes: &[u8]) {
        match (encoded_resource_logs(&Bytes::copy_from_slice(bytes)), ResourceLogs::decode(bytes)) {
            (Ok((resource, records)), Ok(expected)) => {
                assert_eq!(resource, expected.resource);
                let expected: Vec<&LogRecord> =
                    expected.scope_logs.iter().flat_map(|scope| &scope.log_records).collect();
                assert_eq!(records.len(), expected.len());
                for (record, expected) in records.iter().zip(expected) {
                    assert_same_record(record, expected);
                }
            }
            (Err(encoded), Err(prost)) => assert_eq!(encoded.to_string(), prost.to_string()),
            (encoded, prost) => panic!("kept encoded {:?}, prost {:?}", encoded.is_ok(), prost.is_ok()),
        }
    }

    /// An encoded record and its view hold the fields of `expected`; its attributes are looked
    /// up as in the decoded ones.
    fn assert_same_record(record: &EncodedLog, expected: &LogRecord) {
        assert_eq!(&record.decode(), expected);
        let time =
            if expected.time_unix_nano != 0 { expected.time_unix_nano } else { expected.observed_time_unix_nano };
        assert_eq!(record.time_ns(), time);
        let view = record.view();
        assert_eq!(
            (view.time_unix_nano, view.observed_time_unix_nano, view.severity_number, view.severity_text),
            (
                expected.time_unix_nano,
                expected.observed_time_unix_nano,
                expected.severity_number,
                &expected.severity_text[..]
            )
        );
        assert_eq!((view.trace_id, view.span_id), (&expected.trace_id[..], &expected.span_id[..]));
        assert_eq!(view.body_text(), expected.body.as_ref().map(|body| value_text(Some(body))));
        let texts: Vec<(&[u8], Cow<'_, str>)> =
            view.attributes.iter().map(|(key, value)| (*key, logrecord::value(*value).into_text())).collect();
        let expected_texts: Vec<(&[u8], Cow<'_, str>)> =
            expected.attributes.iter().map(|kv| (kv.key.as_bytes(), value_text(kv.value.as_ref()))).collect();
        assert_eq!(texts, expected_texts);
        for kv in &expected.attributes {
            assert_eq!(Attributes::get(&view, &kv.key), Attributes::get(expected.attributes.as_slice(), &kv.key));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// What an exporter encodes is decoded by the fast path, to prost's values; every kind of
        /// attribute value gets `value_text`'s text.
        #[test]
        fn metrics_decode_as_prost_does(message in resource_metrics_message()) {
            let bytes = message.encode_to_vec();
            let fast = fast_resource_metrics(&bytes).expect("an encoder's output takes the fast path");
            assert_same(&fast, &DecodedMetrics::from_prost(message));
        }

        /// Damaged or merged encodings get prost's answer, values or error.
        #[test]
        fn damaged_metrics_get_prost_answer(message in resource_metrics_message(), damage in damage()) {
            metrics_same_as_prost(&apply(message.encode_to_vec(), &damage));
        }


        /// An exporter's records are kept encoded as they came, and read as prost decodes them.
        #[test]
        fn logs_kept_encoded_read_as_prost_decodes(message in resource_logs_message()) {
            let bytes = Bytes::from(message.encode_to_vec());
            let (_, records) = fast_encoded_resource_logs(&bytes).expect("an encoder's output is kept as it is");
            for record in &records {
                prop_assert!(bytes.as_ptr_range().contains(&record.bytes().as_ptr()), "a slice of the request");
            }
            encoded_logs_same_as_prost(&bytes);
        }

        #[test]
        fn damaged_logs_kept_encoded_get_prost_answer(message in resource_logs_message(), damage in damage()) {
            encoded_logs_same_as_prost(&apply(message.encode_to_vec(), &damage));
        }

        /// One record checked alone (as a forwarded one is) gets prost's answer too.
        #[test]
        fn damaged_records_kept_encoded_get_prost_answer(record in log_record(), damage in damage()) {
            let bytes = apply(record.encode_to_vec(), &damage);
            match (EncodedLog::new(Bytes::from(bytes.clone())), LogRecord::decode(&bytes[..])) {
                (Ok(encoded), Ok(expected)) => assert_same_record(&encoded, &expected),
                (Err(encoded), Err(prost)) => prop_assert_eq!(encoded.to_string(), prost.to_string()),
                (encoded, prost) => panic!("kept encoded {:?}, prost {:?}", encoded.is_ok(), prost.is_ok()),
            }
        }
    }

    #[test]
    fn unpacked_repeated_fields_and_unknown_fields_decode_as_prost_does() {
        // bucket_counts (6) unpacked, twice; explicit_bounds (7) packed then unpacked; an unknown
        // varint field (99) and an unknown length-delimited one (100).
        let mut point = vec![0x31];
        point.extend_from_slice(&3u64.to_le_bytes());
        point.push(0x31);
        point.extend_from_slice(&4u64.to_le_bytes());
        point.extend_from_slice(&[0x3a, 8]);
        point.extend_from_slice(&1.5f64.to_le_bytes());
        point.push(0x39);
        point.extend_from_slice(&2.5f64.to_le_bytes());
        point.extend_from_slice(&[0x98, 0x06, 0x05, 0xa2, 0x06, 0x02, 0xff, 0xff]);
        let (decoded, _) = super::histogram_point(&point).unwrap();
        assert_eq!(decoded.bucket_counts, vec![3, 4]);
        assert_eq!(decoded.explicit_bounds, vec![1.5, 2.5]);
        assert_eq!(decoded, HistogramDataPoint::decode(&point[..]).unwrap());
    }

    #[test]
    fn the_last_of_several_value_fields_is_the_attribute_value() {
        // AnyValue { string_value: "a", bool_value: true } and the reverse: the last one wins.
        for value in [vec![0x0a, 0x01, b'a', 0x10, 0x01], vec![0x10, 0x01, 0x0a, 0x01, b'a']] {
            let mut key_value = vec![0x0a, 0x01, b'k', 0x12, value.len() as u8];
            key_value.extend_from_slice(&value);
            let mut point = vec![0x4a, key_value.len() as u8];
            point.extend_from_slice(&key_value);
            let (_, text) = super::histogram_point(&point).unwrap();
            let prost = HistogramDataPoint::decode(&point[..]).unwrap();
            assert_eq!(text, PointAttributes::from_key_values(&prost.attributes));
            assert_eq!(text.iter().next().unwrap().1, if value[0] == 0x10 { "a" } else { "true" });
        }
    }

    #[test]
    fn a_character_split_between_key_and_value_is_not_utf8() {
        // Key "a" + 0xc3 and value 0xa9 + "b": together "aéb", each on its own not UTF-8.
        let key_value = [0x0a, 0x02, b'a', 0xc3, 0x12, 0x04, 0x0a, 0x02, 0xa9, b'b'];
        let mut point = vec![0x4a, key_value.len() as u8];
        point.extend_from_slice(&key_value);
        assert!(super::histogram_point(&point).is_err());
        let metric = [&[0x4a, point.len() as u8 + 2, 0x0a, point.len() as u8][..], &point].concat();
        let scope = [&[0x12, metric.len() as u8][..], &metric].concat();
        let resource = [&[0x12, scope.len() as u8][..], &scope].concat();
        let error = resource_metrics(&resource).unwrap_err();
        assert_eq!(error.to_string(), ResourceMetrics::decode(&resource[..]).unwrap_err().to_string());
        assert!(error.to_string().contains("UTF-8"), "{error}");
    }

    #[test]
    fn a_point_with_many_attributes_keeps_them_all_in_order() {
        let attributes: Vec<KeyValue> =
            (0..40).map(|i| string_attribute(&format!("key.{}", 39 - i), &i.to_string())).collect();
        let point = HistogramDataPoint { attributes: attributes.clone(), ..Default::default() }.encode_to_vec();
        let (_, text) = super::histogram_point(&point).unwrap();
        assert_eq!(text, PointAttributes::from_key_values(&attributes));
        assert_eq!(text.len(), 40);
    }

    #[test]
    fn an_overwritten_key_or_value_that_is_not_utf8_fails_as_in_prost() {
        // KeyValue { key: 0xff, key: "k", value: "v" } and KeyValue { key: "k", value: { 0xff, "v" } }.
        let keys = vec![0x0a, 0x01, 0xff, 0x0a, 0x01, b'k', 0x12, 0x03, 0x0a, 0x01, b'v'];
        let values = vec![0x0a, 0x01, b'k', 0x12, 0x06, 0x0a, 0x01, 0xff, 0x0a, 0x01, b'v'];
        for key_value in [keys, values] {
            let mut point = vec![0x4a, key_value.len() as u8];
            point.extend_from_slice(&key_value);
            assert!(super::histogram_point(&point).is_err(), "left to prost");
            assert!(HistogramDataPoint::decode(&point[..]).is_err(), "prost refuses it");
        }
    }

    #[test]
    fn a_second_resource_is_merged_by_prost() {
        let first = ResourceMetrics {
            resource: Some(Resource { attributes: vec![string_attribute("a", "1")], ..Default::default() }),
            ..Default::default()
        };
        let second = ResourceMetrics {
            resource: Some(Resource { attributes: vec![string_attribute("b", "2")], ..Default::default() }),
            ..Default::default()
        };
        let mut bytes = first.encode_to_vec();
        bytes.extend_from_slice(&second.encode_to_vec());
        assert!(fast_resource_metrics(&bytes).is_err(), "left to prost");
        let merged = resource_metrics(&bytes).unwrap();
        assert_eq!(
            merged.resource.resource.unwrap().attributes,
            vec![string_attribute("a", "1"), string_attribute("b", "2")]
        );
    }

    #[test]
    fn malformed_input_gets_prost_error() {
        let bytes = [0x0a, 0x05, 0x0a, 0x03];
        let error = resource_metrics(&bytes).unwrap_err();
        assert_eq!(error.to_string(), ResourceMetrics::decode(&bytes[..]).unwrap_err().to_string());
        // An unknown varint field (99) whose value runs past 64 bits.
        let overlong = [0x98, 0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(fast_resource_metrics(&overlong).is_err());
        assert!(resource_metrics(&overlong).unwrap_err().to_string().contains("varint"));
        let not_utf8 = [0x1a, 0x02, 0xc3, 0x28];
        assert!(encoded_resource_logs(&Bytes::copy_from_slice(&not_utf8)).unwrap_err().to_string().contains("UTF-8"));
    }

    fn string_attribute(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
            key_strindex: 0,
        }
    }
}
