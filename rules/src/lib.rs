//! Tollgate's pure core: everything a user sees as a number is computed here.
//!
//! No async runtime, no storage, no sockets, no wall clock: functions of their inputs, tested
//! without IO. The node and cluster crates move data to and from these functions.
//!
//! Parts, in the order data flows through them:
//! - [`entity`]: which OTLP resources are gateway resources, and their service and instance.
//! - [`series`]: series identity and the minute a point belongs to.
//! - [`point`]: validation of OTLP points and the rejection reasons.
//! - [`normalize`]: de-duplication, lateness, cumulative → delta, per series.
//! - [`aggregate`]: the mergeable per-(series, minute) histogram state, percentiles.
//! - [`pricing`]: `gen-ai-config.yml` prices, longest-prefix lookup, exact cost.
//! - [`catalogue`]: the output metrics as data, with the built-in gateway rules.
//! - [`evaluate`]: metric values over minute, hour and day steps from merged states.
//! - [`sampling`]: access-log classification and keep decisions.
//! - [`ingest`]: the request → merge path, and an in-memory pipeline built from the above.
//! - [`config`]: the replicated rules document.
//! - [`fixed`], [`attributes`]: fixed-point sums and attribute text.
//! - [`fleet`]: exports shaped like Envoy AI Gateway's, for load generation and tests.

pub mod aggregate;
pub mod attributes;
pub mod catalogue;
pub mod config;
pub mod decode;
pub mod entity;
pub mod evaluate;
pub mod fixed;
pub mod fleet;
pub mod ingest;
pub mod logrecord;
pub mod normalize;
pub mod point;
pub mod pricing;
pub mod sampling;
pub mod seen;
pub mod series;
pub mod varint;

pub use aggregate::{Aggregate, Bounds, Delta};
pub use catalogue::{Catalogue, CatalogueEntry, Scope, ValueKind};
pub use config::{CompiledRules, RulesConfig, RulesError};
pub use entity::{Entity, RoutingRules, Selection};
pub use evaluate::{MetricQuery, MetricResult, OutputSeries, Partial, Step};
pub use fixed::Fixed;
pub use ingest::{
    extract_decoded_metrics, extract_encoded_logs, extract_logs, extract_metrics, log_fingerprint, Applied, DropReason,
    ExtractedLog, ExtractedPoint, IngestReport, LogsBatch, MemoryPipeline, MetricsBatch, SeriesTable,
};
pub use logrecord::{EncodedLog, LogView};
pub use normalize::{NormalizeConfig, PartitionClock, SeriesCursor};
pub use point::{RejectReason, Rejection, Temporality};
pub use pricing::{PriceTable, PricingDocument, PricingError};
pub use sampling::{decide, decide_on, KeepReason, LogDecision, LogKind, SamplingRules};
pub use series::{Minute, SeriesId, SeriesKey};

#[cfg(any(test, feature = "testing"))]
pub mod testing;
