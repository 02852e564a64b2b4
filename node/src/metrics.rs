//! Self-metric names, all in one place, and the Prometheus recorder (SPEC §7 `/metrics`).
//!
//! Label values are bounded: protocols, reason names from fixed enums, outcome names.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Data points received, by `protocol` (`grpc`, `http`).
pub const POINTS_RECEIVED: &str = "tollgate_points_received_total";
/// Data points rejected, by `reason` and `protocol`.
pub const POINTS_REJECTED: &str = "tollgate_points_rejected_total";
/// Data points accepted but not kept, by `reason` (`not_gateway`, `unknown_metric`, ...).
pub const POINTS_DROPPED: &str = "tollgate_points_dropped_total";
/// Data points merged.
pub const POINTS_MERGED: &str = "tollgate_points_merged_total";
/// Data points recognised as retries of merged points.
pub const POINTS_DUPLICATE: &str = "tollgate_points_duplicate_total";
/// Points rejected because they were too late (also counted in `POINTS_REJECTED`).
pub const POINTS_LATE: &str = "tollgate_points_late_total";
/// Log records received, by `protocol`.
pub const LOGS_RECEIVED: &str = "tollgate_log_records_received_total";
/// Log records rejected, by `reason` and `protocol`.
pub const LOGS_REJECTED: &str = "tollgate_log_records_rejected_total";
/// Log records not kept, by `reason`.
pub const LOGS_DROPPED: &str = "tollgate_log_records_dropped_total";
/// Kept log records, by keep `reason` (a record with two reasons counts twice).
pub const LOGS_KEPT: &str = "tollgate_logs_kept_total";
/// Log records whose numeric attributes did not parse, by `field`.
pub const LOGS_MALFORMED: &str = "tollgate_log_records_malformed_total";
/// Log batches recognised as retries.
pub const LOG_BATCHES_DUPLICATE: &str = "tollgate_log_batches_duplicate_total";
/// Log records recognised as duplicates: those of a retried batch, and copies of a kept record.
pub const LOG_RECORDS_DUPLICATE: &str = "tollgate_log_records_duplicate_total";
/// Export requests, by `protocol`, `signal` (`metrics`, `logs`) and `outcome`.
pub const REQUESTS: &str = "tollgate_requests_total";
/// Requests refused for overload, by `what` (`inflight_bytes`, `owner_queue`).
pub const OVERLOAD: &str = "tollgate_overload_total";
/// Bytes of requests in flight.
pub const INFLIGHT_BYTES: &str = "tollgate_inflight_bytes";
/// Messages pushed into owner intakes.
pub const OWNER_PUSHED: &str = "tollgate_owner_intake_pushed_total";
/// Messages taken from owner intakes.
pub const OWNER_POPPED: &str = "tollgate_owner_intake_popped_total";
/// Write batches grouped into one flush.
pub const COMMIT_BATCHES_PER_FLUSH: &str = "tollgate_commit_batches_per_flush";
/// Bytes written per flush.
pub const COMMIT_BYTES_PER_FLUSH: &str = "tollgate_commit_bytes_per_flush";
/// Duration of apply + flush, seconds.
pub const COMMIT_FLUSH_SECONDS: &str = "tollgate_commit_flush_seconds";
/// Checkpoints of the memtable into the data tree.
pub const STORE_CHECKPOINTS: &str = "tollgate_store_checkpoints_total";
/// Keys written into the data tree by checkpoints (inserted or removed), by record kind (label
/// `record`, [`crate::store::codec::record_kind`]).
pub const STORE_CHECKPOINT_KEYS: &str = "tollgate_store_checkpoint_keys_total";
/// Duration of applying one checkpoint to the data tree, seconds.
pub const STORE_CHECKPOINT_SECONDS: &str = "tollgate_store_checkpoint_seconds";
/// Time the writer waited for a checkpoint to finish (back-pressure), seconds.
pub const STORE_CHECKPOINT_WAIT_SECONDS: &str = "tollgate_store_checkpoint_wait_seconds";
/// Memory of the memtable (written, not yet checkpointed), bytes (approximate).
pub const STORE_MEMTABLE_BYTES: &str = "tollgate_store_memtable_bytes";
/// Bytes appended to the current write-ahead generation.
pub const STORE_WAL_BYTES: &str = "tollgate_store_wal_bytes";
/// Bytes the store occupies on disk.
pub const STORE_SIZE_BYTES: &str = "tollgate_store_size_bytes";
/// Series held in owner memory.
pub const SERIES_ACTIVE: &str = "tollgate_series_active";
/// Aggregates (minute, hour and day states) held in the owners' caches.
pub const STATES_CACHED: &str = "tollgate_states_cached";
/// Minute states rolled into hour and day states.
pub const ROLLED_UP_MINUTES: &str = "tollgate_rolled_up_minutes_total";
/// Keys removed by retention.
pub const RETENTION_DELETED: &str = "tollgate_retention_deleted_total";
/// Config versions applied, by `document` (`pricing`, `rules`).
pub const CONFIG_VERSION: &str = "tollgate_config_version";
/// Points forwarded to their owner node, by `peer` (its cluster address).
pub const FORWARDED_POINTS: &str = "tollgate_forwarded_points_total";
/// Duration of a forward to an owner node until its durable acknowledgement, by `peer`.
pub const FORWARD_SECONDS: &str = "tollgate_forward_seconds";
/// Forwards that failed, by `peer` and `reason` (`unreachable`, `refused`, `backpressure`).
pub const FORWARD_FAILURES: &str = "tollgate_forward_failures_total";
/// Current Raft term.
pub const RAFT_TERM: &str = "tollgate_raft_term";
/// Leader changes seen by this node.
pub const RAFT_LEADER_CHANGES: &str = "tollgate_raft_leader_changes_total";
/// Index of the last committed Raft entry.
pub const RAFT_COMMIT_INDEX: &str = "tollgate_raft_commit_index";
/// Index of the last applied Raft entry.
pub const RAFT_APPLIED_INDEX: &str = "tollgate_raft_applied_index";
/// 1 while this node is the Raft leader.
pub const RAFT_IS_LEADER: &str = "tollgate_raft_is_leader";
/// Vnodes this node owns.
pub const VNODES_OWNED: &str = "tollgate_vnodes_owned";
/// 1 while this node holds its lease on the vnodes it owns (it merges their data); 0 while it is
/// lapsed (out of touch with the leader for half of `cluster.failover_after_seconds`, or not yet
/// caught up since: their exports are refused).
pub const VNODES_LEASE_HELD: &str = "tollgate_vnodes_lease_held";
/// Hand-overs this node completed, by `direction` (`in`, `out`) and `kind` (`state`: a vnode's
/// normalisation state; `drain`: all data of a leaving node).
pub const VNODE_MOVES: &str = "tollgate_vnode_moves_total";
/// Hand-over attempts that failed, by `direction` (`in`: taking a vnode over or copying a leaving
/// node's data failed and is retried; `out`: a request this node refused) and `kind`. In a
/// healthy cluster that is not losing members, zero.
pub const VNODE_MOVE_FAILURES: &str = "tollgate_vnode_move_failures_total";
/// Query requests, by `kind` (`metric`, `logs`) and `outcome`.
pub const QUERIES: &str = "tollgate_queries_total";

/// The node's metrics in Prometheus' text format: its own, then the process's figures under the
/// names of Prometheus' process collector (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, ...: read from `/proc` at each scrape, so that an alert on
/// memory against the pod's limit needs no other exporter) and `tollgate_build_info`.
pub fn render(handle: &PrometheusHandle) -> String {
    use std::fmt::Write as _;
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let mut family = |name: &str, labels: &str, kind: &str, help: &str, value: &dyn std::fmt::Display| {
        let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {value}\n\n");
    };
    if let Some(p) = crate::os::process_figures() {
        family(
            "process_cpu_seconds_total",
            "",
            "counter",
            "Total user and system CPU time spent in seconds.",
            &p.cpu_seconds,
        );
        family("process_resident_memory_bytes", "", "gauge", "Resident memory size in bytes.", &p.resident_bytes);
        family("process_virtual_memory_bytes", "", "gauge", "Virtual memory size in bytes.", &p.virtual_bytes);
        family("process_threads", "", "gauge", "Number of OS threads in the process.", &p.threads);
        family("process_open_fds", "", "gauge", "Number of open file descriptors.", &p.open_fds);
        if let Some(max) = p.max_fds {
            family("process_max_fds", "", "gauge", "Maximum number of open file descriptors.", &max);
        }
        let start = p.start_time_seconds;
        family(
            "process_start_time_seconds",
            "",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            &start,
        );
    }
    let version = format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    family("tollgate_build_info", &version, "gauge", "The running version; always 1.", &1);
    text
}

/// Makes the counters whose label values are all known exist at 0 from the start. A series that
/// appears with its first event has no earlier sample: `increase()`, and the alerts built on it,
/// miss that event (the first late points, the first leader change).
pub fn zero_counters() {
    let unlabelled = [
        POINTS_MERGED,
        POINTS_DUPLICATE,
        POINTS_LATE,
        LOG_BATCHES_DUPLICATE,
        LOG_RECORDS_DUPLICATE,
        STORE_CHECKPOINTS,
        ROLLED_UP_MINUTES,
        RETENTION_DELETED,
        RAFT_LEADER_CHANGES,
    ];
    for name in unlabelled {
        metrics::counter!(name).increment(0);
    }
    for protocol in ["grpc", "http"] {
        metrics::counter!(POINTS_RECEIVED, "protocol" => protocol).increment(0);
        metrics::counter!(LOGS_RECEIVED, "protocol" => protocol).increment(0);
        for reason in tollgate_rules::RejectReason::ALL {
            metrics::counter!(POINTS_REJECTED, "reason" => reason.as_str(), "protocol" => protocol).increment(0);
        }
    }
    for what in ["inflight_bytes", "owner_queue", "queries"] {
        metrics::counter!(OVERLOAD, "what" => what).increment(0);
    }
    metrics::gauge!(INFLIGHT_BYTES).increment(0.0);
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let seconds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
            let counts = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let bytes = [1024.0, 8192.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCHES_PER_FLUSH.into()), &counts))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_BYTES_PER_FLUSH.into()), &bytes))
                .expect("valid bucket configuration")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several nodes): then
            // this handle renders an empty registry, which is still valid output.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn test_counters_with_known_labels_start_at_zero() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, super::zero_counters);
        let text = handle.render();
        for line in [
            "tollgate_points_late_total 0",
            "tollgate_raft_leader_changes_total 0",
            "tollgate_points_received_total{protocol=\"http\"} 0",
            "tollgate_points_rejected_total{reason=\"name_too_long\",protocol=\"grpc\"} 0",
            "tollgate_overload_total{what=\"queries\"} 0",
            "tollgate_inflight_bytes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    /// The names in `text` that follow `prefix` (`prefix` and the `[a-z0-9_]` after it).
    fn names<'a>(text: &'a str, prefix: &str) -> BTreeSet<&'a str> {
        let mut found = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let name_end = tail[prefix.len()..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(tail.len(), |end| prefix.len() + end);
            if name_end > prefix.len() {
                found.insert(&tail[..name_end]);
            }
            rest = &tail[name_end..];
        }
        found
    }

    /// This module's code: the names it exports are string literals before its tests.
    fn module_source() -> &'static str {
        let source = include_str!("metrics.rs");
        &source[..source.find("#[cfg(test)]").expect("the tests")]
    }

    /// The `tollgate_*` names this module exports.
    fn exported() -> BTreeSet<&'static str> {
        names(module_source(), "\"tollgate_").iter().map(|name| &name[1..]).collect()
    }

    /// The metrics the operations guide and the API reference describe are ones the node exports
    /// (a histogram by its name or its `_bucket`, `_sum` and `_count` series).
    #[test]
    fn test_the_documented_metrics_exist() {
        let mut exported = exported();
        exported.insert(tollgate_cluster::transport::FORWARD_CALLS);
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        for page in ["operations.md", "api.md"] {
            let text = std::fs::read_to_string(docs.join(page)).unwrap();
            let used = names(&text, "tollgate_");
            assert!(used.len() >= 10, "{page}: {used:?}");
            let unknown: Vec<_> = used
                .iter()
                .filter(|name| {
                    let base = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix));
                    !exported.contains(*name) && !base.is_some_and(|base| exported.contains(base))
                })
                .collect();
            assert!(unknown.is_empty(), "docs/{page} describes metrics the node does not export: {unknown:?}");
        }
    }

    /// A Prometheus rules file, as far as the shipped alerts use it (unknown fields refused).
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RulesFile {
        groups: Vec<RuleGroup>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RuleGroup {
        name: String,
        rules: Vec<AlertRule>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AlertRule {
        alert: String,
        expr: String,
        #[serde(rename = "for")]
        pending: Option<String>,
        labels: std::collections::BTreeMap<String, String>,
        annotations: std::collections::BTreeMap<String, String>,
    }

    /// The labels an expression's results can carry: `None` for any (those of the series it
    /// selects), `Some` for only these (an aggregation `by` them).
    fn result_labels(expr: &promql_parser::parser::Expr) -> Option<BTreeSet<String>> {
        use promql_parser::parser::{Expr, LabelModifier};
        match expr {
            Expr::Aggregate(aggregate) => match &aggregate.modifier {
                Some(LabelModifier::Include(by)) => Some(by.labels.iter().cloned().collect()),
                Some(LabelModifier::Exclude(_)) => None,
                None => Some(BTreeSet::new()),
            },
            Expr::Binary(binary) => match (&*binary.lhs, &*binary.rhs) {
                (Expr::NumberLiteral(_), other) => result_labels(other),
                (lhs, _) => result_labels(lhs),
            },
            Expr::Paren(paren) => result_labels(&paren.expr),
            Expr::Unary(unary) => result_labels(&unary.expr),
            Expr::Call(call) => call.args.args.first().and_then(|arg| result_labels(arg)),
            _ => None,
        }
    }

    /// The shipped alerting rules are a valid Prometheus rules file: each expression parses as
    /// PromQL, each `for` as a duration, each alert has a severity, a summary and a description,
    /// and the labels its annotations print are ones its results carry (a `sum by (instance)`
    /// has no `reason` to print).
    #[test]
    fn test_the_shipped_alerts_are_valid_rules() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yaml");
        let file: RulesFile = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut alerts = BTreeSet::new();
        for group in &file.groups {
            assert!(!group.name.is_empty());
            for rule in &group.rules {
                let name = &rule.alert;
                assert!(alerts.insert(name.clone()), "{name} is defined twice");
                let expr = promql_parser::parser::parse(&rule.expr).unwrap_or_else(|e| panic!("{name}: {e}"));
                if let Some(pending) = &rule.pending {
                    promql_parser::util::parse_duration(pending).unwrap_or_else(|e| panic!("{name}: for: {e}"));
                }
                let severity = rule.labels.get("severity").map(String::as_str);
                assert!(matches!(severity, Some("critical" | "warning")), "{name}: severity {severity:?}");
                for key in ["summary", "description"] {
                    assert!(rule.annotations.get(key).is_some_and(|text| !text.is_empty()), "{name}: no {key}");
                }
                if let Some(carried) = result_labels(&expr) {
                    for text in rule.annotations.values() {
                        for printed in names(text, "$labels.") {
                            let label = &printed["$labels.".len()..];
                            assert!(carried.contains(label), "{name} prints {label}, its results carry {carried:?}");
                        }
                    }
                }
            }
        }
        assert!(alerts.len() >= 10, "{alerts:?}");
    }

    /// The alerting rules shipped in deploy/prometheus use only metrics the node exports.
    #[test]
    fn test_the_shipped_alerts_name_metrics_that_exist() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yaml");
        let alerts = std::fs::read_to_string(path).unwrap();
        let exported = exported();
        let used = names(&alerts, "tollgate_");
        assert!(used.len() >= 8, "{used:?}");
        let unknown: Vec<_> = used.iter().filter(|name| !exported.contains(*name)).collect();
        assert!(unknown.is_empty(), "the alerts use metrics the node does not export: {unknown:?}");
        let processes = names(&alerts, "process_");
        assert!(!processes.is_empty());
        for process in processes {
            assert!(module_source().contains(&format!("\"{process}\"")), "{process} is not exported");
        }
    }
}
