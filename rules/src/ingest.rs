//! The ingest path: OTLP request → selected, validated points ([`extract_metrics`]) → per-series
//! normalisation and cost ([`SeriesTable::apply`]) → merges into per-(series, minute) state.
//!
//! Extraction is stateless and runs where a request arrives; the series table is the state of
//! an owner and runs where the series' partition lives. [`MemoryPipeline`] strings both
//! together in memory: the reference the node is tested against, and the benchmark's subject.

use crate::aggregate::{empty_bounds, Aggregate, Bounds, Delta};
use crate::attributes::AttributeValue;
use crate::attributes::{AttributeSet, PointAttributes};
use crate::catalogue::{LOG_REQUESTS_METRIC, LOG_SAMPLED_METRIC};
use crate::config::CompiledRules;
use crate::decode::DecodedMetrics;
use crate::entity::{Entity, Selection};
use crate::evaluate::{MetricQuery, MetricResult, Partial, Step};
use crate::fixed::Fixed;
use crate::logrecord::{self, EncodedLog, LogView};
use crate::normalize::{normalize, Normalized, PartitionClock, SeriesCursor};
use crate::point::{check_histogram, check_number, Checked, RejectReason, Rejection, Temporality, ValidPoint};
use crate::pricing::{PriceTable, TokenType};
use crate::sampling::{KeepReason, LogDecision, LogKind};
use crate::series::{minute_of, shrink_if_sparse, FastMap, FastSet, IdEncoder, Minute, SeriesId, SeriesKey};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::DecodeError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

/// How many detailed rejection messages a report keeps (the counts are always complete).
pub const MAX_REPORT_MESSAGES: usize = 8;

/// Why data was accepted but not kept. Not errors: the sender did nothing wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The resource is not a gateway resource.
    NotGateway,
    /// No catalogue rule reads this metric.
    UnknownMetric,
    /// The point is flagged `NO_RECORDED_VALUE`.
    NoRecordedValue,
    /// A log record that is neither an LLM nor an MCP record.
    NotClassified,
    /// A log record that matched no keep reason (counted in log metrics, not stored).
    Sampled,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 5] = [
        DropReason::NotGateway,
        DropReason::UnknownMetric,
        DropReason::NoRecordedValue,
        DropReason::NotClassified,
        DropReason::Sampled,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotGateway => "not_gateway",
            DropReason::UnknownMetric => "unknown_metric",
            DropReason::NoRecordedValue => "no_recorded_value",
            DropReason::NotClassified => "not_classified",
            DropReason::Sampled => "sampled_out",
        }
    }
}

/// What happened to the items (points or log records) of one request. Mergeable, so that the
/// reports of several owners make the answer to one export.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    /// Items merged (or stored).
    pub merged: u64,
    /// Items recognised as already merged (retries).
    pub duplicates: u64,
    /// Cumulative first points that only became a baseline.
    pub baselines: u64,
    /// Rejected items per reason.
    pub rejected: BTreeMap<RejectReason, u64>,
    /// Accepted but not kept, per reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// The first few rejections in detail.
    pub messages: Vec<String>,
}

impl IngestReport {
    /// Counts a rejection, keeping its message if there is room.
    pub fn reject(&mut self, rejection: &Rejection, context: impl FnOnce() -> String) {
        self.reject_many(rejection, 1, context);
    }

    /// Counts `count` items rejected for the same cause, with one message.
    pub fn reject_many(&mut self, rejection: &Rejection, count: u64, context: impl FnOnce() -> String) {
        if count == 0 {
            return;
        }
        *self.rejected.entry(rejection.reason).or_default() += count;
        if self.messages.len() < MAX_REPORT_MESSAGES {
            self.messages.push(format!("{}: {}", context(), rejection));
        }
    }

    /// Counts dropped items.
    pub fn drop_items(&mut self, reason: DropReason, count: u64) {
        if count > 0 {
            *self.dropped.entry(reason).or_default() += count;
        }
    }

    /// Number of rejected items.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Adds another report.
    pub fn merge(&mut self, other: &IngestReport) {
        self.merged += other.merged;
        self.duplicates += other.duplicates;
        self.baselines += other.baselines;
        for (reason, count) in &other.rejected {
            *self.rejected.entry(*reason).or_default() += count;
        }
        for (reason, count) in &other.dropped {
            *self.dropped.entry(*reason).or_default() += count;
        }
        for message in &other.messages {
            if self.messages.len() < MAX_REPORT_MESSAGES {
                self.messages.push(message.clone());
            }
        }
    }

    /// The `partial_success.error_message`: empty when nothing was rejected, otherwise counts per
    /// reason followed by the first rejections in detail.
    pub fn error_message(&self, items: &str) -> String {
        let total = self.rejected_total();
        if total == 0 {
            return String::new();
        }
        let mut out = format!("rejected {total} {items} (");
        for (index, (reason, count)) in self.rejected.iter().enumerate() {
            if index > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{reason}: {count}");
        }
        out.push(')');
        for message in &self.messages {
            out.push_str("; ");
            out.push_str(message);
        }
        if total > self.messages.len() as u64 {
            let _ = write!(out, "; and {} more", total - self.messages.len() as u64);
        }
        out
    }
}

/// A valid point of a gateway series, with everything its owner needs.
#[derive(Clone, Debug)]
pub struct ExtractedPoint {
    /// Series id.
    pub series: SeriesId,
    /// The series' entity (shared by all points of a resource).
    pub entity: Arc<Entity>,
    /// `entity.partition_hash()`.
    pub partition: u64,
    /// Metric name (shared by all points of a metric).
    pub metric: Arc<str>,
    /// The point's attributes.
    pub attributes: PointAttributes,
    /// The validated point.
    pub point: ValidPoint,
}

impl ExtractedPoint {
    /// The owned series key (built only for series the owner has not seen yet).
    pub fn key(&self) -> SeriesKey {
        SeriesKey {
            entity: (*self.entity).clone(),
            metric: self.metric.to_string(),
            attributes: self.attributes.to_set(),
        }
    }

    fn describe(&self) -> String {
        describe_point(&self.metric, &self.entity, self.point.time_ns)
    }
}

fn describe_point(metric: &str, entity: &Entity, time_ns: u64) -> String {
    format!("{metric} of {entity} at {time_ns}")
}

/// The valid points of one request and the report of everything else.
#[derive(Debug, Default)]
pub struct MetricsBatch {
    /// Points to hand to their owners.
    pub points: Vec<ExtractedPoint>,
    /// Rejections and drops found while extracting.
    pub report: IngestReport,
}

/// Selects gateway resources, maps entities, keeps catalogue metrics and validates points.
/// Consumes the request so that bucket vectors move instead of being copied.
pub fn extract_metrics(request: ExportMetricsServiceRequest, rules: &CompiledRules) -> MetricsBatch {
    extract_decoded_metrics(request.resource_metrics.into_iter().map(DecodedMetrics::from_prost).collect(), rules)
}

/// [`extract_metrics`] of resources decoded with [`crate::decode::resource_metrics`].
pub fn extract_decoded_metrics(resources: Vec<DecodedMetrics>, rules: &CompiledRules) -> MetricsBatch {
    let mut batch = MetricsBatch::default();
    let total: usize = resources
        .iter()
        .flat_map(|r| r.resource.scope_metrics.iter())
        .flat_map(|s| s.metrics.iter())
        .map(|m| data_point_count(m.data.as_ref()))
        .sum();
    batch.points.reserve_exact(total);
    let mut ids = IdEncoder::default();
    for mut decoded in resources {
        let resource_metrics = std::mem::take(&mut decoded.resource);
        let point_total: u64 = resource_metrics
            .scope_metrics
            .iter()
            .flat_map(|s| s.metrics.iter())
            .map(|m| data_point_count(m.data.as_ref()) as u64)
            .sum();
        let entity = match rules.config.routing.select(resource_metrics.resource.as_ref()) {
            Selection::Ours(entity) => Arc::new(entity),
            Selection::NotOurs => {
                batch.report.drop_items(DropReason::NotGateway, point_total);
                continue;
            }
            Selection::Rejected(rejection) => {
                batch.report.reject_many(&rejection, point_total, || "resource".to_string());
                continue;
            }
        };
        let partition = entity.partition_hash();
        let metrics = resource_metrics.scope_metrics.into_iter().flat_map(|scope| scope.metrics);
        for (ordinal, metric) in metrics.enumerate() {
            if !rules.is_source(&metric.name) {
                batch.report.drop_items(DropReason::UnknownMetric, data_point_count(metric.data.as_ref()) as u64);
                continue;
            }
            let name: Arc<str> = Arc::from(metric.name.as_str());
            let points = &mut batch.points;
            let ids = &mut ids;
            let mut emit = |attributes: PointAttributes, checked: Checked, time_ns: u64, report: &mut IngestReport| {
                match checked {
                    Checked::Valid(point) => points.push(ExtractedPoint {
                        series: ids.series(&entity, &name, &attributes),
                        entity: Arc::clone(&entity),
                        partition,
                        metric: Arc::clone(&name),
                        attributes,
                        point,
                    }),
                    Checked::NoRecordedValue => report.drop_items(DropReason::NoRecordedValue, 1),
                    Checked::Rejected(rejection) => {
                        report.reject(&rejection, || describe_point(&name, &entity, time_ns))
                    }
                }
            };
            let report = &mut batch.report;
            let histogram_reader = rules.histogram_reader(&name);
            match metric.data {
                Some(Data::Histogram(histogram)) => {
                    let temporality = Temporality::from_otlp(histogram.aggregation_temporality);
                    for (index, mut point) in histogram.data_points.into_iter().enumerate() {
                        let time_ns = point.time_unix_nano;
                        let checked = match temporality {
                            Some(t) => check_histogram(&mut point, t),
                            None => Checked::Rejected(unspecified(histogram.aggregation_temporality)),
                        };
                        emit(decoded.take_attributes(ordinal, index), checked, time_ns, report);
                    }
                }
                Some(Data::Sum(sum)) if histogram_reader.is_some() => {
                    let rule = histogram_reader.unwrap_or_default();
                    let rejection = Rejection::new(
                        RejectReason::UnsupportedType,
                        format!(
                            "sum points cannot be merged: rule {rule} reads this metric's counts (a count, mean or \
                             percentile), which only a histogram has; send a histogram"
                        ),
                    );
                    // Points that say they recorded nothing are dropped, as any such point is.
                    let empty =
                        sum.data_points.iter().filter(|p| p.flags & crate::point::FLAG_NO_RECORDED_VALUE != 0).count()
                            as u64;
                    report.drop_items(DropReason::NoRecordedValue, empty);
                    let count = sum.data_points.len() as u64 - empty;
                    if count > 0 {
                        report.reject_many(&rejection, count, || format!("{name} of {entity}"));
                    }
                }
                Some(Data::Sum(sum)) => {
                    let temporality = Temporality::from_otlp(sum.aggregation_temporality);
                    for (index, point) in sum.data_points.into_iter().enumerate() {
                        let time_ns = point.time_unix_nano;
                        let checked = match temporality {
                            Some(t) => check_number(&point, t, sum.is_monotonic),
                            None => Checked::Rejected(unspecified(sum.aggregation_temporality)),
                        };
                        emit(decoded.take_attributes(ordinal, index), checked, time_ns, report);
                    }
                }
                other => {
                    let rejection = Rejection::new(
                        RejectReason::UnsupportedType,
                        format!(
                            "{} points cannot be merged: send a histogram or a sum",
                            data_type_name(other.as_ref())
                        ),
                    );
                    let count = data_point_count(other.as_ref()) as u64;
                    report.reject_many(&rejection, count, || format!("{name} of {entity}"));
                }
            }
        }
    }
    batch
}

fn unspecified(value: i32) -> Rejection {
    Rejection::new(
        RejectReason::UnspecifiedTemporality,
        format!("aggregation_temporality {value} is neither DELTA (1) nor CUMULATIVE (2)"),
    )
}

/// The number of data points of a metric, whatever its type.
pub fn data_point_count(data: Option<&Data>) -> usize {
    match data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

fn data_type_name(data: Option<&Data>) -> &'static str {
    match data {
        Some(Data::Gauge(_)) => "gauge",
        Some(Data::Sum(_)) => "sum",
        Some(Data::Histogram(_)) => "histogram",
        Some(Data::ExponentialHistogram(_)) => "exponential histogram",
        Some(Data::Summary(_)) => "summary",
        None => "empty",
    }
}

/// A log record of a gateway resource, with everything its owner needs.
#[derive(Clone, Debug)]
pub struct ExtractedLog {
    /// The record's entity (shared by all records of a resource).
    pub entity: Arc<Entity>,
    /// `entity.partition_hash()`.
    pub partition: u64,
    /// The record's time: `time_unix_nano`, or `observed_time_unix_nano` when that is 0.
    pub time_ns: u64,
    /// The record, still encoded (see [`crate::logrecord`]).
    pub record: EncodedLog,
}

/// The log records of gateway resources in one request, and the report of everything else.
#[derive(Debug, Default)]
pub struct LogsBatch {
    /// Records to hand to their owners.
    pub records: Vec<ExtractedLog>,
    /// Rejections and drops found while extracting.
    pub report: IngestReport,
}

/// Selects gateway resources and maps their log records to entities. Records without any time
/// are rejected (`invalid_time`); classification and sampling happen at the owner, under the
/// rules in force there.
pub fn extract_logs(request: ExportLogsServiceRequest, rules: &CompiledRules) -> LogsBatch {
    let resources = request.resource_logs.into_iter().map(|resource_logs| {
        let records = resource_logs.scope_logs.iter().flat_map(|scope| &scope.log_records);
        (resource_logs.resource, records.map(EncodedLog::from_record).collect())
    });
    extract_log_resources(resources, rules)
}

/// [`extract_logs`] of encoded `ResourceLogs`, whose records stay encoded (slices of their
/// buffers, checked as prost's decoding checks them).
pub fn extract_encoded_logs(resources: &[Bytes], rules: &CompiledRules) -> Result<LogsBatch, DecodeError> {
    let decoded = resources.iter().map(crate::decode::encoded_resource_logs).collect::<Result<Vec<_>, _>>()?;
    Ok(extract_log_resources(decoded.into_iter(), rules))
}

fn extract_log_resources(
    resources: impl Iterator<Item = (Option<Resource>, Vec<EncodedLog>)>,
    rules: &CompiledRules,
) -> LogsBatch {
    let mut batch = LogsBatch::default();
    for (resource, records) in resources {
        let total = records.len() as u64;
        let entity = match rules.config.routing.select(resource.as_ref()) {
            Selection::Ours(entity) => Arc::new(entity),
            Selection::NotOurs => {
                batch.report.drop_items(DropReason::NotGateway, total);
                continue;
            }
            Selection::Rejected(rejection) => {
                batch.report.reject_many(&rejection, total, || "resource".to_string());
                continue;
            }
        };
        let partition = entity.partition_hash();
        for record in records {
            let time_ns = record.time_ns();
            if time_ns == 0 {
                let rejection = Rejection::new(
                    RejectReason::InvalidTime,
                    "log record has neither time_unix_nano nor observed_time_unix_nano",
                );
                batch.report.reject(&rejection, || format!("log record of {entity}"));
                continue;
            }
            batch.records.push(ExtractedLog { entity: Arc::clone(&entity), partition, time_ns, record });
        }
    }
    batch
}

/// The identity of a log record: xxh3-128 over its entity, times, severity, body and sorted
/// attributes. A retried export yields the same fingerprints; two records that differ in any of
/// these do not.
pub fn log_fingerprint(entity: &Entity, record: &LogRecord) -> u128 {
    LogFingerprinter::default().fingerprint(entity, &EncodedLog::from_record(record).view())
}

/// Computes [`log_fingerprint`]s of a stream of records, reusing the canonical attribute order of
/// the previous record while the keys come in the same order (the records of one gateway's
/// export do: its access-log format is fixed), so that the keys are sorted once per export
/// instead of once per record. Same fingerprints as [`log_fingerprint`].
#[derive(Debug, Default)]
pub struct LogFingerprinter {
    /// The keys of the record the order was computed for, in its order.
    keys: Vec<Vec<u8>>,
    /// Positions of the canonical attribute set (first of repeated keys, sorted by key).
    order: Vec<usize>,
    /// The bytes hashed, reused from record to record.
    bytes: Vec<u8>,
}

impl LogFingerprinter {
    /// The fingerprint of `record` of `entity`.
    pub fn fingerprint(&mut self, entity: &Entity, record: &LogView<'_>) -> u128 {
        let attributes = &record.attributes;
        let same_keys = self.keys.len() == attributes.len()
            && self.keys.iter().zip(attributes).all(|(key, (other, _))| key.as_slice() == *other);
        if !same_keys {
            // Sorting by (key, position) and keeping the first of each key is the first
            // occurrence, in O(n log n).
            self.order.clear();
            self.order.extend(0..attributes.len());
            self.order.sort_unstable_by(|a, b| attributes[*a].0.cmp(attributes[*b].0).then(a.cmp(b)));
            self.order.dedup_by(|later, first| attributes[*later].0 == attributes[*first].0);
            self.keys.clear();
            self.keys.extend(attributes.iter().map(|(key, _)| key.to_vec()));
        }
        // Written straight into one buffer, which the next record reuses: the records of an
        // access log carry some 25 attributes each.
        let bytes = &mut self.bytes;
        bytes.clear();
        push_field(bytes, entity.service.as_bytes());
        match &entity.instance {
            Some(instance) => push_field(bytes, instance.as_bytes()),
            None => push_field(bytes, &[0xff]), // not valid UTF-8, so no instance name encodes like this
        }
        push_field(bytes, &record.time_unix_nano.to_le_bytes());
        push_field(bytes, &record.observed_time_unix_nano.to_le_bytes());
        push_field(bytes, &record.severity_number.to_le_bytes());
        push_field(bytes, record.severity_text.as_bytes());
        push_value(bytes, record.body);
        push_field(bytes, record.trace_id);
        push_field(bytes, record.span_id);
        for position in &self.order {
            let (key, value) = attributes[*position];
            push_field(bytes, key);
            push_value(bytes, value);
        }
        xxhash_rust::xxh3::xxh3_128(bytes)
    }
}

/// Appends a field of a fingerprint: its `u32` length, then its bytes.
fn push_field(bytes: &mut Vec<u8>, value: &[u8]) {
    bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
    bytes.extend_from_slice(value);
}

/// Appends [`crate::attributes::value_text`] of an encoded value as a field, without a `String`
/// for the usual strings and integers.
fn push_value(bytes: &mut Vec<u8>, encoded: Option<&[u8]>) {
    match logrecord::value(encoded) {
        AttributeValue::Str(text) => push_field(bytes, text.as_bytes()),
        AttributeValue::Other(value) => match &value.value {
            Some(any_value::Value::IntValue(int)) => push_field(bytes, itoa::Buffer::new().format(*int).as_bytes()),
            _ => push_field(bytes, crate::attributes::value_text(Some(&value)).as_bytes()),
        },
    }
}

/// Price of a token series at a pricing version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TokenPrice {
    rules_version: u64,
    pricing_version: u64,
    /// Cost of one token, per million (0 for non-token series).
    per_m: Fixed,
    /// Input/output tokens of an unpriced model.
    unpriced: bool,
}

/// An owner's state of one series.
#[derive(Clone, Debug)]
pub struct SeriesEntry {
    /// The key.
    pub key: Arc<SeriesKey>,
    /// Normalisation state (persisted).
    pub cursor: SeriesCursor,
    /// Interned bucket bounds of the latest point.
    bounds: Bounds,
    /// Cached price, recomputed when rules or pricing change.
    price: Option<TokenPrice>,
    /// Time of the newest accepted point, for idle eviction.
    pub last_seen_ns: u64,
}

impl SeriesEntry {
    fn new(key: Arc<SeriesKey>, cursor: SeriesCursor) -> SeriesEntry {
        let bounds = cursor.baseline.as_ref().map(|b| Arc::clone(&b.bounds)).unwrap_or_else(empty_bounds);
        let last_seen_ns =
            cursor.seen.back().map(|k| k.time_ns).or(cursor.baseline.as_ref().map(|b| b.time_ns)).unwrap_or(0);
        SeriesEntry { key, cursor, bounds, price: None, last_seen_ns }
    }

    fn token_price(&mut self, rules: &CompiledRules, pricing: &PriceTable) -> TokenPrice {
        if let Some(price) = self.price {
            if price.rules_version == rules.version && price.pricing_version == pricing.version() {
                return price;
            }
        }
        let mut price = TokenPrice {
            rules_version: rules.version,
            pricing_version: pricing.version(),
            per_m: Fixed::ZERO,
            unpriced: false,
        };
        let catalogue = &rules.config.catalogue;
        if self.key.metric == catalogue.cost.metric {
            let token_type = self.key.attributes.get(&catalogue.cost.token_type_attribute).and_then(TokenType::parse);
            let model = catalogue.label_value(&catalogue.cost.model_label, &self.key.attributes).unwrap_or("");
            match (token_type, pricing.lookup(model)) {
                (Some(token_type), Some(model_price)) => price.per_m = model_price.price_per_m(token_type),
                (Some(TokenType::Input | TokenType::Output), None) => price.unpriced = true,
                _ => {}
            }
        }
        self.price = Some(price);
        price
    }
}

/// What [`SeriesTable::apply`] did with a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Merged into this minute.
    Merged(Minute),
    /// A retry of a merged point.
    Duplicate,
    /// Became a cumulative baseline.
    Baseline,
    /// Rejected (counted in the report).
    Rejected(RejectReason),
}

/// An owner's normalisation state: series cursors, partition clocks, per-service cardinality.
#[derive(Debug, Default)]
pub struct SeriesTable {
    series: FastMap<SeriesId, SeriesEntry>,
    clocks: FastMap<u64, PartitionClock>,
    per_service: FastMap<String, usize>,
    dirty_series: FastSet<SeriesId>,
    dirty_clocks: FastSet<u64>,
    new_series: Vec<SeriesId>,
    /// One copy of each attribute set among the series: the series of different pods with the
    /// same attributes share it.
    attribute_sets: FastSet<AttributeSet>,
    /// The bucket bounds the series use (a few lists: one per histogram metric), shared.
    bounds: Vec<Bounds>,
}

/// The shared copy of `key`'s attribute set, remembered if it is the first.
fn intern_attributes(sets: &mut FastSet<AttributeSet>, mut key: SeriesKey) -> Arc<SeriesKey> {
    match sets.get(&key.attributes) {
        Some(shared) => key.attributes = shared.clone(),
        None => {
            sets.insert(key.attributes.clone());
        }
    }
    Arc::new(key)
}

/// At most this many bound lists are shared; series with other lists get their own copy.
const SHARED_BOUNDS: usize = 64;

/// The shared copy of `bounds`, remembered if there is room.
fn intern_bounds(shared: &mut Vec<Bounds>, bounds: Vec<f64>) -> Bounds {
    if let Some(existing) = shared.iter().find(|existing| ***existing == *bounds) {
        return Arc::clone(existing);
    }
    let bounds: Bounds = Arc::from(bounds);
    if shared.len() < SHARED_BOUNDS {
        shared.push(Arc::clone(&bounds));
    }
    bounds
}

impl SeriesTable {
    /// An empty table.
    pub fn new() -> SeriesTable {
        SeriesTable::default()
    }

    /// Number of series.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// True without series.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// A series' state.
    pub fn get(&self, id: &SeriesId) -> Option<&SeriesEntry> {
        self.series.get(id)
    }

    /// A partition's clock.
    pub fn clock(&self, partition: u64) -> Option<&PartitionClock> {
        self.clocks.get(&partition)
    }

    /// All series.
    pub fn iter(&self) -> impl Iterator<Item = (&SeriesId, &SeriesEntry)> {
        self.series.iter()
    }

    /// All partition clocks.
    pub fn clocks(&self) -> impl Iterator<Item = (&u64, &PartitionClock)> {
        self.clocks.iter()
    }

    /// Restores a persisted series (after a restart or a partition hand-over).
    pub fn restore_series(&mut self, key: SeriesKey, cursor: SeriesCursor) {
        let id = key.id();
        let service = key.entity.service.clone();
        let key = intern_attributes(&mut self.attribute_sets, key);
        if self.series.insert(id, SeriesEntry::new(key, cursor)).is_none() {
            *self.per_service.entry(service).or_default() += 1;
        }
    }

    /// Restores a persisted partition clock, keeping the newer minute.
    pub fn restore_clock(&mut self, partition: u64, clock: PartitionClock) {
        let current = self.clocks.entry(partition).or_default();
        if clock.newest_minute_ns > current.newest_minute_ns {
            *current = clock;
        }
    }

    /// Series and clocks changed since the last call, and the series created since then.
    /// The caller persists them in the same atomic write as the merged states.
    pub fn take_changes(&mut self) -> TableChanges {
        TableChanges {
            series: self.dirty_series.drain().collect(),
            clocks: self.dirty_clocks.drain().collect(),
            created: std::mem::take(&mut self.new_series),
        }
    }

    /// Forgets series with no accepted point since `before_ns` (their state is persisted by the
    /// owner and reloaded if they come back). Returns their keys.
    pub fn evict_idle(&mut self, before_ns: u64) -> Vec<Arc<SeriesKey>> {
        // Sets no series uses any more (those of the series evicted last time, whose keys the
        // caller has dropped since).
        self.attribute_sets.retain(AttributeSet::is_shared);
        let idle: Vec<SeriesId> =
            self.series.iter().filter(|(_, e)| e.last_seen_ns < before_ns).map(|(id, _)| *id).collect();
        let mut evicted = Vec::with_capacity(idle.len());
        for id in &idle {
            if let Some(entry) = self.series.remove(id) {
                if let Some(count) = self.per_service.get_mut(&entry.key.entity.service) {
                    *count -= 1;
                    if *count == 0 {
                        self.per_service.remove(&entry.key.entity.service);
                    }
                }
                evicted.push(entry.key);
            }
            self.dirty_series.remove(id);
        }
        if !evicted.is_empty() {
            shrink_if_sparse(&mut self.series);
        }
        evicted
    }

    /// Normalises one point and, when it is to be merged, calls `merge` with its minute and delta
    /// (cost included). Rejections are counted in `report`.
    pub fn apply(
        &mut self,
        mut extracted: ExtractedPoint,
        now_ns: u64,
        rules: &CompiledRules,
        pricing: &PriceTable,
        report: &mut IngestReport,
        mut merge: impl FnMut(SeriesId, Minute, &Delta<'_>),
    ) -> Applied {
        let config = &rules.config.normalize;
        let entry = match self.series.get_mut(&extracted.series) {
            Some(entry) => entry,
            None => {
                let service_count = self.per_service.get(&extracted.entity.service).copied().unwrap_or(0);
                if service_count >= config.max_series_per_service {
                    let rejection = Rejection::new(
                        RejectReason::CardinalityLimit,
                        format!(
                            "service {:?} already has {service_count} series (max_series_per_service)",
                            extracted.entity.service
                        ),
                    );
                    report.reject(&rejection, || extracted.describe());
                    return Applied::Rejected(RejectReason::CardinalityLimit);
                }
                *self.per_service.entry(extracted.entity.service.clone()).or_default() += 1;
                self.new_series.push(extracted.series);
                let key = intern_attributes(&mut self.attribute_sets, extracted.key());
                self.series.entry(extracted.series).or_insert_with(|| SeriesEntry::new(key, SeriesCursor::default()))
            }
        };
        if *entry.bounds != *extracted.point.bounds {
            entry.bounds = intern_bounds(&mut self.bounds, std::mem::take(&mut extracted.point.bounds));
        }
        let clock = self.clocks.entry(extracted.partition).or_default();
        let clock_before = *clock;
        let outcome = normalize(&mut entry.cursor, clock, &mut extracted.point, &entry.bounds, now_ns, config);
        if *clock != clock_before {
            self.dirty_clocks.insert(extracted.partition);
        }
        let point = &extracted.point;
        let applied = match outcome {
            Normalized::Duplicate => {
                report.duplicates += 1;
                return Applied::Duplicate;
            }
            Normalized::Rejected(rejection) => {
                let reason = rejection.reason;
                report.reject(&rejection, || extracted.describe());
                return Applied::Rejected(reason);
            }
            Normalized::Baseline => {
                report.baselines += 1;
                Applied::Baseline
            }
            Normalized::Merge => {
                let price = entry.token_price(rules, pricing);
                let minute = minute_of(point.time_ns);
                let delta = Delta {
                    count: point.count,
                    sum: point.sum,
                    min: point.min,
                    max: point.max,
                    bounds: &entry.bounds,
                    buckets: &point.buckets,
                    cost: point.sum.mul_price(price.per_m),
                    unpriced: if price.unpriced { point.sum } else { Fixed::ZERO },
                };
                merge(extracted.series, minute, &delta);
                report.merged += 1;
                Applied::Merged(minute)
            }
        };
        entry.last_seen_ns = entry.last_seen_ns.max(point.time_ns);
        self.dirty_series.insert(extracted.series);
        applied
    }
}

/// What a [`SeriesTable`] changed since the last [`SeriesTable::take_changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableChanges {
    /// Series whose cursor changed.
    pub series: Vec<SeriesId>,
    /// Partitions whose clock moved.
    pub clocks: Vec<u64>,
    /// Series created.
    pub created: Vec<SeriesId>,
}

/// One log-derived counter series of a partition, named without its entity (SPEC §5): what
/// [`log_counters`] yields, and [`LogCounter::key`] turns into the series key. Small and
/// `Copy`, so that an owner can remember the id of each of its partitions' counters instead of
/// building and hashing their keys for every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogCounter {
    /// `tollgate.log.requests{kind, status_class}`.
    Requests {
        /// LLM or MCP.
        kind: LogKind,
        /// [`LogDecision::status_class`].
        status_class: &'static str,
    },
    /// `tollgate.log.sampled{kind, reason}`.
    Sampled {
        /// LLM or MCP.
        kind: LogKind,
        /// The keep reason.
        reason: KeepReason,
    },
}

impl LogCounter {
    /// The series key of this counter of `entity`.
    pub fn key(self, entity: &Entity) -> SeriesKey {
        let (metric, attributes) = match self {
            LogCounter::Requests { kind, status_class } => (
                LOG_REQUESTS_METRIC,
                AttributeSet::from_pairs([("kind", kind.as_str()), ("status_class", status_class)]),
            ),
            LogCounter::Sampled { kind, reason } => {
                (LOG_SAMPLED_METRIC, AttributeSet::from_pairs([("kind", kind.as_str()), ("reason", reason.as_str())]))
            }
        };
        SeriesKey { entity: entity.clone(), metric: metric.into(), attributes }
    }
}

/// The log-derived counters a classified record increments by one each: requests by kind and
/// status class, and one per keep reason. None for a record that is not classified.
pub fn log_counters(decision: &LogDecision) -> impl Iterator<Item = LogCounter> + '_ {
    let status_class = decision.status_class();
    decision.kind.into_iter().flat_map(move |kind| {
        std::iter::once(LogCounter::Requests { kind, status_class })
            .chain(decision.reasons.iter().map(move |&reason| LogCounter::Sampled { kind, reason }))
    })
}

/// The series keys of [`log_counters`] for `entity`.
pub fn log_counter_keys(entity: &Entity, decision: &LogDecision) -> Vec<SeriesKey> {
    log_counters(decision).map(|counter| counter.key(entity)).collect()
}

/// The delta of one log-derived increment.
pub fn log_increment() -> Aggregate {
    let mut state = Aggregate::empty();
    state.sum = Fixed::from_int(1);
    state
}

/// Every state an owner holds, per (series, minute), in memory.
#[derive(Debug, Default)]
pub struct MinuteStates {
    states: FastMap<(SeriesId, Minute), Aggregate>,
}

impl MinuteStates {
    /// Merges a delta.
    pub fn merge_delta(&mut self, series: SeriesId, minute: Minute, delta: &Delta<'_>) {
        match self.states.get_mut(&(series, minute)) {
            Some(state) => state.merge_delta(delta),
            None => {
                self.states.insert((series, minute), Aggregate::from_delta(delta));
            }
        }
    }

    /// Merges a state.
    pub fn merge(&mut self, series: SeriesId, minute: Minute, state: &Aggregate) {
        self.states.entry((series, minute)).or_default().merge(state);
    }

    /// The state of a series in a minute.
    pub fn get(&self, series: SeriesId, minute: Minute) -> Option<&Aggregate> {
        self.states.get(&(series, minute))
    }

    /// Every state.
    pub fn iter(&self) -> impl Iterator<Item = (&(SeriesId, Minute), &Aggregate)> {
        self.states.iter()
    }

    /// Number of states.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// True without states.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// The whole single-owner path in memory: extraction, normalisation, merge and evaluation.
#[derive(Debug)]
pub struct MemoryPipeline {
    /// Rules in force.
    pub rules: CompiledRules,
    /// Prices in force.
    pub pricing: PriceTable,
    /// Normalisation state.
    pub table: SeriesTable,
    /// Merged states.
    pub states: MinuteStates,
    keys: FastMap<SeriesId, Arc<SeriesKey>>,
}

impl MemoryPipeline {
    /// A pipeline with these rules and prices.
    pub fn new(rules: CompiledRules, pricing: PriceTable) -> MemoryPipeline {
        MemoryPipeline {
            rules,
            pricing,
            table: SeriesTable::new(),
            states: MinuteStates::default(),
            keys: FastMap::default(),
        }
    }

    /// Ingests one export at time `now_ns`.
    pub fn ingest(&mut self, request: ExportMetricsServiceRequest, now_ns: u64) -> IngestReport {
        let batch = extract_metrics(request, &self.rules);
        self.merge(batch, now_ns)
    }

    /// Ingests resources decoded by [`crate::decode::resource_metrics`] (the node's path) at time
    /// `now_ns`.
    pub fn ingest_decoded(&mut self, resources: Vec<DecodedMetrics>, now_ns: u64) -> IngestReport {
        let batch = extract_decoded_metrics(resources, &self.rules);
        self.merge(batch, now_ns)
    }

    fn merge(&mut self, batch: MetricsBatch, now_ns: u64) -> IngestReport {
        let mut report = batch.report;
        for point in batch.points {
            let states = &mut self.states;
            self.table.apply(point, now_ns, &self.rules, &self.pricing, &mut report, |series, minute, delta| {
                states.merge_delta(series, minute, delta)
            });
        }
        for id in self.table.take_changes().created {
            if let Some(entry) = self.table.get(&id) {
                self.keys.insert(id, Arc::clone(&entry.key));
            }
        }
        report
    }

    /// Counts one classified log record in the log-derived metrics.
    pub fn count_log(&mut self, entity: &Entity, decision: &LogDecision, time_ns: u64) {
        let increment = log_increment();
        for key in log_counter_keys(entity, decision) {
            let id = key.id();
            self.keys.entry(id).or_insert_with(|| Arc::new(key));
            self.states.merge(id, minute_of(time_ns), &increment);
        }
    }

    /// Evaluates a catalogue metric.
    pub fn query(
        &self,
        name: &str,
        service: &str,
        instance: Option<&str>,
        start: i64,
        end: i64,
        step: Step,
    ) -> Option<MetricResult> {
        let metric = self.rules.metric(name)?.clone();
        let query = MetricQuery {
            metric,
            service: service.to_string(),
            instance: instance.map(str::to_string),
            start,
            end,
            step,
        };
        let mut partial = Partial::default();
        for ((series, minute), state) in self.states.iter() {
            if let Some(key) = self.keys.get(series) {
                partial.add(&self.rules.config.catalogue, &query, key, minute * 60, state);
            }
        }
        Some(partial.finish(&query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::KeyValue;

    #[test]
    fn test_log_counters_are_requests_then_one_per_keep_reason() {
        let entity = Entity { service: "gw".into(), instance: Some("gw-0".into()) };
        let mut decision = LogDecision { kind: Some(LogKind::Llm), response_code: Some(503), ..Default::default() };
        decision.reasons = vec![KeepReason::Error, KeepReason::Slow];
        let counters: Vec<LogCounter> = log_counters(&decision).collect();
        assert_eq!(
            counters,
            [
                LogCounter::Requests { kind: LogKind::Llm, status_class: "5xx" },
                LogCounter::Sampled { kind: LogKind::Llm, reason: KeepReason::Error },
                LogCounter::Sampled { kind: LogKind::Llm, reason: KeepReason::Slow },
            ]
        );
        let keys = log_counter_keys(&entity, &decision);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].metric, LOG_REQUESTS_METRIC);
        assert_eq!(keys[0].attributes, AttributeSet::from_pairs([("kind", "llm"), ("status_class", "5xx")]));
        assert_eq!(keys[2].metric, LOG_SAMPLED_METRIC);
        assert_eq!(keys[2].attributes, AttributeSet::from_pairs([("kind", "llm"), ("reason", "slow")]));
        assert!(keys.iter().all(|key| key.entity == entity));
        let ids: FastSet<SeriesId> = keys.iter().map(SeriesKey::id).collect();
        assert_eq!(ids.len(), 3, "each counter is its own series");

        decision.kind = None;
        assert_eq!(log_counters(&decision).count(), 0, "an unclassified record counts nowhere");
    }

    /// A fingerprint from a fingerprinter that has seen the records before, of `record` encoded.
    fn streamed(fingerprinter: &mut LogFingerprinter, entity: &Entity, record: &LogRecord) -> u128 {
        fingerprinter.fingerprint(entity, &EncodedLog::from_record(record).view())
    }

    /// The fingerprint as first written: the attributes through an owned [`AttributeSet`].
    fn fingerprint_model(entity: &Entity, record: &LogRecord) -> u128 {
        let mut bytes: Vec<u8> = Vec::new();
        let mut push = |value: &[u8]| {
            bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
            bytes.extend_from_slice(value);
        };
        push(entity.service.as_bytes());
        match &entity.instance {
            Some(instance) => push(instance.as_bytes()),
            None => push(&[0xff]),
        }
        push(&record.time_unix_nano.to_le_bytes());
        push(&record.observed_time_unix_nano.to_le_bytes());
        push(&record.severity_number.to_le_bytes());
        push(record.severity_text.as_bytes());
        push(crate::attributes::value_text(record.body.as_ref()).as_bytes());
        push(&record.trace_id);
        push(&record.span_id);
        for (key, value) in AttributeSet::from_key_values(&record.attributes).iter() {
            push(key.as_bytes());
            push(value.as_bytes());
        }
        xxhash_rust::xxh3::xxh3_128(&bytes)
    }

    #[test]
    fn test_log_fingerprint_is_canonical_and_tells_records_apart() {
        let no_instance = || Entity { service: "gw".into(), instance: None };
        use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
        let int = |key: &str, value: i64| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::IntValue(value)) }),
            ..Default::default()
        };
        let entity = Entity { service: "gw".into(), instance: Some("pod-0".into()) };
        let record = LogRecord {
            time_unix_nano: 1_764_151_210_000_000_000,
            attributes: vec![
                crate::testing::string_attribute("gen_ai.request.model", "gpt-4o"),
                int("response_code", 500),
                crate::testing::string_attribute("x-request-id", "a"),
                crate::testing::string_attribute("gen_ai.request.model", "ignored: repeated key"),
            ],
            ..Default::default()
        };
        let fingerprint = log_fingerprint(&entity, &record);
        assert_eq!(fingerprint, fingerprint_model(&entity, &record));
        // Attribute order does not matter; the first of a repeated key wins.
        let mut reordered = record.clone();
        reordered.attributes.swap(0, 2);
        reordered.attributes.swap(1, 3);
        reordered.attributes.swap(0, 3);
        assert_eq!(log_fingerprint(&entity, &reordered), fingerprint_model(&entity, &reordered));
        let mut first_wins = record.clone();
        first_wins.attributes.pop();
        assert_eq!(log_fingerprint(&entity, &first_wins), fingerprint);
        // Any difference makes another record.
        let mut other_value = record.clone();
        other_value.attributes[1] = int("response_code", 502);
        let mut other_time = record.clone();
        other_time.time_unix_nano += 1;
        // A record shaped like the gateway's access log (25 attributes, some keys repeated, in
        // several orders) fingerprints as the model does.
        let mut many = record.clone();
        many.body = Some(AnyValue { value: Some(any_value::Value::StringValue("GET /v1/chat 200".into())) });
        many.severity_text = "INFO".into();
        many.trace_id = vec![7; 16];
        many.span_id = vec![9; 8];
        many.attributes = (0..25)
            .map(|i| crate::testing::string_attribute(&format!("key.{}", (i * 7) % 19), &format!("value {i}")))
            .collect();
        // One fingerprinter over a stream whose key order changes, stays, and changes back
        // (it reuses the order while the keys come the same way), and whose values change.
        let mut fingerprinter = LogFingerprinter::default();
        for rotation in 0..5 {
            many.attributes.rotate_left(rotation * 3);
            assert_eq!(log_fingerprint(&entity, &many), fingerprint_model(&entity, &many));
            assert_eq!(log_fingerprint(&no_instance(), &many), fingerprint_model(&no_instance(), &many));
            // Records with the keys of the previous one (the order is reused), other values.
            for value in 0..3 {
                let mut next = many.clone();
                next.attributes[value * 4] = crate::testing::string_attribute(&next.attributes[value * 4].key, "new");
                assert_eq!(streamed(&mut fingerprinter, &entity, &next), fingerprint_model(&entity, &next));
            }
            assert_eq!(streamed(&mut fingerprinter, &entity, &record), fingerprint_model(&entity, &record));
            assert_eq!(streamed(&mut fingerprinter, &entity, &reordered), fingerprint_model(&entity, &reordered));
            assert_eq!(streamed(&mut fingerprinter, &entity, &reordered), fingerprint_model(&entity, &reordered));
        }
        // Same keys in the same order but one more: not the same key list.
        let mut longer = many.clone();
        longer.attributes.push(crate::testing::string_attribute("key.0", "a repeated key, last"));
        assert_eq!(streamed(&mut fingerprinter, &entity, &many), fingerprint_model(&entity, &many));
        assert_eq!(streamed(&mut fingerprinter, &entity, &longer), fingerprint_model(&entity, &longer));
        for (what, other) in [
            ("a value", log_fingerprint(&entity, &other_value)),
            ("the time", log_fingerprint(&entity, &other_time)),
            ("the instance", log_fingerprint(&no_instance(), &record)),
        ] {
            assert_ne!(other, fingerprint, "{what} differs");
        }
        // Every kind of value, written as its text, as the model does.
        let value = |value: any_value::Value| Some(AnyValue { value: Some(value) });
        let mut kinds = record.clone();
        kinds.attributes = [
            ("int.min", value(any_value::Value::IntValue(i64::MIN))),
            ("int.negative", value(any_value::Value::IntValue(-42))),
            ("int.zero", value(any_value::Value::IntValue(0))),
            ("double", value(any_value::Value::DoubleValue(0.25))),
            ("bool", value(any_value::Value::BoolValue(true))),
            ("bytes", value(any_value::Value::BytesValue(vec![0, 255]))),
            ("empty", Some(AnyValue { value: None })),
            ("absent", None),
        ]
        .into_iter()
        .map(|(key, value)| KeyValue { key: key.into(), value, ..Default::default() })
        .collect();
        kinds.body = value(any_value::Value::IntValue(7));
        assert_eq!(streamed(&mut fingerprinter, &entity, &kinds), fingerprint_model(&entity, &kinds));
        kinds.body = value(any_value::Value::DoubleValue(f64::NAN));
        assert_eq!(log_fingerprint(&entity, &kinds), fingerprint_model(&entity, &kinds));
    }
    use crate::normalize::NormalizeConfig;
    use crate::testing::{gateway_resource, string_attribute, Convention};
    use crate::RulesConfig;
    use opentelemetry_proto::tonic::metrics::v1::{
        number_data_point, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    const T0: u64 = 1_764_151_200 * 1_000_000_000;
    const NOW: u64 = T0 + 120 * 1_000_000_000;

    fn histogram_point(attributes: Vec<KeyValue>, time: u64, buckets: Vec<u64>, sum: f64) -> HistogramDataPoint {
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: time - 10_000_000_000,
            time_unix_nano: time,
            count: buckets.iter().sum(),
            sum: Some(sum),
            explicit_bounds: vec![1.0, 10.0],
            bucket_counts: buckets,
            ..Default::default()
        }
    }

    fn request(resource: Resource, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(resource),
                scope_metrics: vec![ScopeMetrics { metrics, ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    fn histogram(name: &str, temporality: i32, points: Vec<HistogramDataPoint>) -> Metric {
        Metric {
            name: name.into(),
            data: Some(Data::Histogram(Histogram { data_points: points, aggregation_temporality: temporality })),
            ..Default::default()
        }
    }

    fn tokens(model: &str, token_type: &str, time: u64, count: u64) -> HistogramDataPoint {
        histogram_point(
            vec![
                string_attribute("gen_ai.response.model", model),
                string_attribute("gen_ai.provider.name", "openai"),
                string_attribute("gen_ai.token.type", token_type),
            ],
            time,
            vec![0, 0, 1],
            count as f64,
        )
    }

    fn resource() -> Resource {
        gateway_resource(Convention::JobName, "gw", Some("pod-0"))
    }

    fn pricing(input: f64) -> PriceTable {
        PriceTable::parse(&format!(
            "providers:\n  - provider: openai\n    models:\n      - name: gpt-4o\n        input-estimated-cost-per-m: {input}\n        output-estimated-cost-per-m: 10\n"
        ))
        .unwrap()
    }

    fn duration_metric(points: Vec<HistogramDataPoint>) -> Metric {
        histogram("gen_ai.server.request.duration", 1, points)
    }

    #[test]
    fn test_one_bad_point_keeps_the_good_points_of_the_request() {
        let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
        let mut bad = histogram_point(vec![string_attribute("gen_ai.provider.name", "b")], T0 + 1, vec![1, 0, 0], 0.5);
        bad.bucket_counts = vec![1, 0];
        let good = histogram_point(vec![string_attribute("gen_ai.provider.name", "a")], T0 + 1, vec![1, 1, 0], 2.5);
        let report = pipeline.ingest(request(resource(), vec![duration_metric(vec![bad, good])]), NOW);
        assert_eq!(report.merged, 1);
        assert_eq!(report.rejected.get(&RejectReason::BucketCountMismatch), Some(&1));
        let message = report.error_message("data points");
        assert!(
            message.starts_with(
                "rejected 1 data points (bucket_count_mismatch: 1); gen_ai.server.request.duration of gw/pod-0 at"
            ),
            "{message}"
        );
        assert!(message.contains("bucket_counts has 2 entries and explicit_bounds 2: expected 3"), "{message}");
        let result = pipeline
            .query("meter_envoy_ai_gw_request_cpm", "gw", None, 1_764_151_200, 1_764_151_260, Step::Minute)
            .unwrap();
        assert_eq!(result.series[0].points, vec![(1_764_151_200, Some(2.0))]);
    }

    #[test]
    fn test_extract_drops_foreign_resources_and_unknown_metrics_without_rejecting() {
        let rules = CompiledRules::default();
        let foreign = Resource { attributes: vec![string_attribute("service.name", "checkout")], ..Default::default() };
        let point = histogram_point(vec![], T0, vec![1, 0, 0], 0.5);
        let batch =
            extract_metrics(request(foreign, vec![duration_metric(vec![point.clone(), point.clone()])]), &rules);
        assert!(batch.points.is_empty());
        assert_eq!(batch.report.dropped.get(&DropReason::NotGateway), Some(&2));
        let batch =
            extract_metrics(request(resource(), vec![histogram("http.server.duration", 1, vec![point])]), &rules);
        assert_eq!(batch.report.dropped.get(&DropReason::UnknownMetric), Some(&1));
        assert_eq!(batch.report.rejected_total(), 0);
    }

    #[test]
    fn test_extract_rejects_resource_without_service_and_unsupported_types() {
        let rules = CompiledRules::default();
        let nameless =
            Resource { attributes: vec![string_attribute("job_name", "envoy-ai-gateway")], ..Default::default() };
        let point = histogram_point(vec![], T0, vec![1, 0, 0], 0.5);
        let batch =
            extract_metrics(request(nameless, vec![duration_metric(vec![point.clone(), point.clone()])]), &rules);
        assert_eq!(batch.report.rejected.get(&RejectReason::MissingService), Some(&2));
        assert_eq!(batch.report.messages.len(), 1);
        // A name too long to be queried (a query parameter): rejected with how long it is, the
        // other resources of the request kept.
        let long = "g".repeat(crate::entity::MAX_NAME_BYTES + 1);
        let mut long_resource = request(resource(), vec![duration_metric(vec![point.clone()])]);
        long_resource.resource_metrics[0].resource = Some(Resource {
            attributes: vec![string_attribute("job_name", "envoy-ai-gateway"), string_attribute("service.name", &long)],
            ..Default::default()
        });
        long_resource
            .resource_metrics
            .extend(request(resource(), vec![duration_metric(vec![point.clone()])]).resource_metrics);
        let batch = extract_metrics(long_resource, &rules);
        assert_eq!(batch.report.rejected.get(&RejectReason::NameTooLong), Some(&1));
        assert!(
            batch.report.messages[0].contains("service name of 1025 bytes is longer than 1024"),
            "{:?}",
            batch.report.messages
        );
        assert_eq!(batch.points.len(), 1);

        let gauge = Metric {
            name: "gen_ai.server.request.duration".into(),
            data: Some(Data::Gauge(Gauge { data_points: vec![NumberDataPoint::default(); 3] })),
            ..Default::default()
        };
        let batch = extract_metrics(request(resource(), vec![gauge]), &rules);
        assert_eq!(batch.report.rejected.get(&RejectReason::UnsupportedType), Some(&3));
        assert!(batch.report.error_message("data points").contains("gauge points cannot be merged"));

        // A sum under a name a rule reads the counts of (a count, mean or percentile rule):
        // refused, where its value was merged as a sum over no calls.
        let sum_point = NumberDataPoint {
            start_time_unix_nano: T0 - 10_000_000_000,
            time_unix_nano: T0,
            value: Some(number_data_point::Value::AsInt(5)),
            ..Default::default()
        };
        // One that says it recorded nothing is dropped, as any such point is.
        let empty = NumberDataPoint { flags: crate::point::FLAG_NO_RECORDED_VALUE, ..sum_point.clone() };
        let sum = Metric {
            name: "gen_ai.server.request.duration".into(),
            data: Some(Data::Sum(Sum {
                data_points: vec![sum_point, empty],
                aggregation_temporality: 1,
                is_monotonic: true,
            })),
            ..Default::default()
        };
        let batch = extract_metrics(request(resource(), vec![sum, duration_metric(vec![point.clone()])]), &rules);
        assert_eq!(batch.report.rejected.get(&RejectReason::UnsupportedType), Some(&1));
        let message = batch.report.error_message("data points");
        assert!(message.contains("rule request_cpm reads this metric's counts"), "{message}");
        assert_eq!(batch.points.len(), 1, "the histogram of the same request is kept");
        assert_eq!(batch.report.dropped.get(&DropReason::NoRecordedValue), Some(&1));

        let unspecified = histogram("gen_ai.server.request.duration", 0, vec![point]);
        let batch = extract_metrics(request(resource(), vec![unspecified]), &rules);
        assert_eq!(batch.report.rejected.get(&RejectReason::UnspecifiedTemporality), Some(&1));
    }

    #[test]
    fn test_extract_skips_no_recorded_value_points() {
        let rules = CompiledRules::default();
        let mut point = histogram_point(vec![], T0, vec![1, 0, 0], 0.5);
        point.flags = crate::point::FLAG_NO_RECORDED_VALUE;
        let batch = extract_metrics(request(resource(), vec![duration_metric(vec![point])]), &rules);
        assert!(batch.points.is_empty());
        assert_eq!(batch.report.dropped.get(&DropReason::NoRecordedValue), Some(&1));
    }

    #[test]
    fn test_counter_points_merge_as_sums() {
        let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
        let counter = |time: u64, value: i64| NumberDataPoint {
            attributes: vec![string_attribute("mcp.method.name", "tools/call"), string_attribute("status", "error")],
            start_time_unix_nano: T0 - 10_000_000_000,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsInt(value)),
            ..Default::default()
        };
        let metric = Metric {
            name: "mcp.method.count".into(),
            data: Some(Data::Sum(Sum {
                data_points: vec![counter(T0 + 1, 3), counter(T0 + 30_000_000_000, 7)],
                aggregation_temporality: 2,
                is_monotonic: true,
            })),
            ..Default::default()
        };
        let report = pipeline.ingest(request(resource(), vec![metric]), NOW);
        assert_eq!(report.merged, 2);
        let result = pipeline
            .query("meter_envoy_ai_gw_mcp_error_cpm", "gw", None, 1_764_151_200, 1_764_151_260, Step::Minute)
            .unwrap();
        assert_eq!(result.series[0].points, vec![(1_764_151_200, Some(7.0))]);
    }

    #[test]
    fn test_cardinality_limit_rejects_new_series_and_keeps_live_ones() {
        let config = RulesConfig {
            normalize: NormalizeConfig { max_series_per_service: 2, ..Default::default() },
            ..Default::default()
        };
        let mut pipeline = MemoryPipeline::new(CompiledRules::new(config, 1).unwrap(), PriceTable::default());
        let point = |provider: &str, time: u64| {
            histogram_point(vec![string_attribute("gen_ai.provider.name", provider)], time, vec![1, 0, 0], 0.5)
        };
        let report = pipeline.ingest(
            request(
                resource(),
                vec![duration_metric(vec![point("a", T0 + 1), point("b", T0 + 1), point("c", T0 + 1)])],
            ),
            NOW,
        );
        assert_eq!((report.merged, report.rejected.get(&RejectReason::CardinalityLimit)), (2, Some(&1)));
        let report =
            pipeline.ingest(request(resource(), vec![duration_metric(vec![point("a", T0 + 20_000_000_000)])]), NOW);
        assert_eq!(report.merged, 1, "existing series keep working at the limit");
        let other = gateway_resource(Convention::JobName, "other-gw", None);
        let report = pipeline.ingest(request(other, vec![duration_metric(vec![point("c", T0 + 1)])]), NOW);
        assert_eq!(report.merged, 1, "the limit is per service");
        assert_eq!(
            pipeline.table.evict_idle(T0 + 10_000_000_000).len(),
            2,
            "gw/b and other-gw/c are idle since T0+10s"
        );
        let report =
            pipeline.ingest(request(resource(), vec![duration_metric(vec![point("c", T0 + 20_000_000_000)])]), NOW);
        assert_eq!(report.merged, 1, "an evicted series frees its slot");
    }

    #[test]
    fn test_series_of_different_pods_share_attribute_sets_and_bounds() {
        let mut pipeline = MemoryPipeline::new(CompiledRules::default(), PriceTable::default());
        let point = |provider: &str, time: u64| {
            histogram_point(vec![string_attribute("gen_ai.provider.name", provider)], time, vec![1, 0, 0], 0.5)
        };
        for pod in ["pod-a", "pod-b", "pod-c"] {
            let pod_resource = gateway_resource(Convention::JobName, "gw", Some(pod));
            let metric = duration_metric(vec![point("openai", T0 + 1), point("anthropic", T0 + 1)]);
            assert_eq!(pipeline.ingest(request(pod_resource, vec![metric]), NOW).merged, 2);
        }
        assert_eq!(pipeline.table.len(), 6);
        assert_eq!(pipeline.table.attribute_sets.len(), 2, "one set per provider, not per series");
        assert_eq!(pipeline.table.bounds.len(), 1, "one bound list for the one histogram metric");
        for (_, entry) in pipeline.table.iter() {
            assert!(entry.key.attributes.is_shared());
            assert!(Arc::ptr_eq(&entry.bounds, &pipeline.table.bounds[0]));
        }
        // The sets of evicted series are forgotten once nothing holds their keys.
        let evicted = pipeline.table.evict_idle(T0 + 10_000_000_000);
        assert_eq!(evicted.len(), 6);
        assert_eq!(pipeline.table.attribute_sets.len(), 2, "the evicted keys still hold them");
        drop(evicted);
        pipeline.keys.clear();
        assert!(pipeline.table.evict_idle(T0).is_empty());
        assert!(pipeline.table.attribute_sets.is_empty());
    }

    #[test]
    fn test_cost_is_fixed_at_merge_time_and_unpriced_tokens_are_counted() {
        let mut pipeline = MemoryPipeline::new(CompiledRules::default(), pricing(2.5).with_version(1));
        let metric = |points| histogram("gen_ai.client.token.usage", 1, points);
        pipeline.ingest(
            request(
                resource(),
                vec![metric(vec![
                    tokens("gpt-4o", "input", T0 + 1, 1000),
                    tokens("gpt-4o", "output", T0 + 1, 100),
                    tokens("llama3", "input", T0 + 1, 40),
                ])],
            ),
            NOW,
        );
        pipeline.pricing = pricing(5.0).with_version(2);
        pipeline
            .ingest(request(resource(), vec![metric(vec![tokens("gpt-4o", "input", T0 + 61_000_000_000, 1000)])]), NOW);
        let cost = pipeline
            .query("meter_envoy_ai_gw_estimated_cost", "gw", None, 1_764_151_200, 1_764_151_320, Step::Minute)
            .unwrap();
        // 1000·2.5 + 100·10 = 3500 before the change; 1000·5 after it, history unchanged.
        assert_eq!(cost.series[0].points, vec![(1_764_151_200, Some(3500.0)), (1_764_151_260, Some(5000.0))]);
        let unpriced = pipeline
            .query("meter_envoy_ai_gw_unpriced_token_rate", "gw", None, 1_764_151_200, 1_764_151_260, Step::Minute)
            .unwrap();
        assert_eq!(unpriced.series.len(), 1);
        assert_eq!(unpriced.series[0].labels["model"], "llama3");
        assert_eq!(unpriced.series[0].points, vec![(1_764_151_200, Some(40.0))]);
    }

    #[test]
    fn test_report_merge_and_message_limit() {
        let mut a = IngestReport::default();
        for index in 0..MAX_REPORT_MESSAGES + 3 {
            a.reject(&Rejection::new(RejectReason::TooLate, "x"), || format!("p{index}"));
        }
        let mut b = IngestReport { merged: 2, ..Default::default() };
        b.merge(&a);
        assert_eq!(b.rejected_total(), MAX_REPORT_MESSAGES as u64 + 3);
        assert_eq!(b.messages.len(), MAX_REPORT_MESSAGES);
        assert!(b.error_message("data points").ends_with("; and 3 more"));
        assert_eq!(IngestReport::default().error_message("data points"), "");
    }
}
