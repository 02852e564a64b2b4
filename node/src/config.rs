//! Node configuration: built-in defaults, overridden by a YAML file, overridden by environment
//! variables `TOLLGATE_<OPTION>` (nested options join their path with `_`:
//! `TOLLGATE_LIMITS_MAX_REQUEST_BYTES`), overridden by command-line flags (SPEC §9).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Everything a node needs to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Stable identity of this node in the cluster. Default: the one stored in the data
    /// directory, else the host name for a new data directory (`node-1` when there is none).
    pub node_id: Option<String>,
    /// Where sled keeps everything.
    pub data_dir: PathBuf,
    /// OTLP/gRPC listeners (the standard port and SkyWalking's).
    pub otlp_grpc_addrs: Vec<SocketAddr>,
    /// OTLP/HTTP listener.
    pub otlp_http_addr: SocketAddr,
    /// Query, config and cluster API, `/metrics`, `/healthz`, `/readyz`.
    pub http_addr: SocketAddr,
    /// Node-to-node listener.
    pub cluster_addr: SocketAddr,
    /// `HOST:PORT` other nodes use to reach this node's cluster port. Default: the bound
    /// `cluster_addr`, with an unspecified IP (`0.0.0.0`) replaced by the host name.
    pub advertise_addr: Option<String>,
    /// Cluster port addresses of running nodes to join (empty: bootstrap or restart).
    pub join: Vec<String>,
    /// Bearer token required for config and membership writes (none: writes are open).
    pub api_token: Option<String>,
    /// Shared secret every node-to-node call must carry (none: the cluster port is open).
    pub cluster_secret: Option<String>,
    /// On SIGTERM, how long the node stays up, not ready (`/readyz` 503) but still serving,
    /// before it closes its listeners, milliseconds: the time a load balancer takes to stop
    /// sending it new requests (Kubernetes removes a terminating pod's endpoint asynchronously).
    pub shutdown_delay_ms: u64,
    /// Request, memory and queue limits.
    #[serde(deserialize_with = "section")]
    pub limits: LimitsConfig,
    /// sled settings.
    #[serde(deserialize_with = "section")]
    pub storage: StorageConfig,
    /// How long data is kept.
    #[serde(deserialize_with = "section")]
    pub retention: RetentionConfig,
    /// Partitioning and failure detection.
    #[serde(deserialize_with = "section")]
    pub cluster: ClusterConfig,
}

/// A section of the file: an empty one (`limits:` with every option under it commented out)
/// reads as null, and means the defaults, as a missing one does.
fn section<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(deserializer: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Request, memory and queue limits (SPEC §8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request (compressed and decompressed), bytes.
    pub max_request_bytes: usize,
    /// Bytes of requests being processed at once; beyond it requests get a retryable overload
    /// error.
    pub max_inflight_bytes: usize,
    /// Batches queued per owner actor; beyond it requests get a retryable overload error.
    pub owner_queue_capacity: usize,
    /// Longest a request may wait for its owners' durable writes before a retryable error.
    pub request_timeout_ms: u64,
    /// Longest the body of an OTLP request may take to arrive, from its headers on; a request
    /// still arriving then is answered with a timeout and its bytes are released.
    pub body_timeout_ms: u64,
    /// Largest page of `GET /api/v1/logs`.
    pub max_log_page: usize,
    /// Longest range of a metric query, in steps.
    pub max_query_points: usize,
    /// Most values in one metric query's answer: a point per step of each series (each
    /// percentile rank of a percentile metric is a series).
    pub max_answer_points: usize,
    /// Queries this node runs at once (its share of a cluster-wide query included); as many
    /// again, four times over, wait for a turn, and further ones get a retryable overload error.
    pub max_concurrent_queries: usize,
    /// Most series in memory on this node, whatever their services; new series beyond it are
    /// rejected (`cardinality_limit`), live ones are never evicted. 0: no limit.
    pub max_series: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_bytes: 16 * 1024 * 1024,
            max_inflight_bytes: 256 * 1024 * 1024,
            owner_queue_capacity: 64,
            request_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_log_page: 1000,
            max_query_points: 20_000,
            max_answer_points: 1_000_000,
            max_concurrent_queries: 8,
            max_series: 0,
        }
    }
}

/// sled settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// sled's page cache size, bytes (sled's own default of 1 GiB is too much for most pods).
    pub cache_capacity_bytes: u64,
    /// Most write batches one flush may group.
    pub max_batches_per_flush: usize,
    /// When the previous group held more than one batch (writes are arriving concurrently), the
    /// writer waits this long, microseconds, for more batches before it syncs a group: fewer
    /// syncs, each acknowledgement later by at most this. 0 disables the wait.
    pub commit_delay_us: u64,
    /// Write batches waiting for the writer; beyond it owners wait (back-pressure).
    pub writer_queue_capacity: usize,
    /// Write-ahead bytes after which the memtable is checkpointed into the data tree. While a
    /// checkpoint is being written the log may grow to twice this before the writer waits, so the
    /// writes held in memory (and read back by a restart) stay under about four times this.
    pub checkpoint_bytes: u64,
    /// Age after which a non-empty write-ahead generation is checkpointed, milliseconds.
    pub checkpoint_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_capacity_bytes: 256 * 1024 * 1024,
            max_batches_per_flush: 512,
            commit_delay_us: 300,
            writer_queue_capacity: 1024,
            checkpoint_bytes: 64 * 1024 * 1024,
            checkpoint_interval_ms: 30_000,
        }
    }
}

/// How long each kind of data is kept, seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Per-minute states.
    pub minute_seconds: u64,
    /// Per-hour roll-ups.
    pub hour_seconds: u64,
    /// Per-day roll-ups.
    pub day_seconds: u64,
    /// Kept access logs.
    pub logs_seconds: u64,
    /// How often the retention sweep runs.
    pub sweep_interval_seconds: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            minute_seconds: 3 * 86_400,
            hour_seconds: 45 * 86_400,
            day_seconds: 400 * 86_400,
            logs_seconds: 14 * 86_400,
            sweep_interval_seconds: 3_600,
        }
    }
}

/// Partitioning and failure detection (SPEC §6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Number of virtual partitions; fixed when a cluster is created.
    pub vnodes: u16,
    /// A node unreachable this long has its vnodes reassigned.
    pub failover_after_seconds: u64,
    /// Deadline of one node-to-node call.
    pub rpc_timeout_ms: u64,
    /// Raft heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// Raft election timeout (lower bound; the upper bound is twice it).
    pub election_timeout_ms: u64,
    /// Bytes of forwarded data in flight per peer.
    pub max_forward_inflight_bytes: usize,
    /// Export-forwarding calls in flight per peer; the exports that come while they all are go
    /// together in the next call.
    pub forward_calls_per_peer: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            vnodes: 256,
            failover_after_seconds: 60,
            rpc_timeout_ms: 5_000,
            heartbeat_interval_ms: 250,
            election_timeout_ms: 1_000,
            max_forward_inflight_bytes: 64 * 1024 * 1024,
            forward_calls_per_peer: tollgate_cluster::transport::DEFAULT_FORWARD_CALLS,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: None,
            data_dir: PathBuf::from("./data"),
            otlp_grpc_addrs: vec![addr("0.0.0.0:4317"), addr("0.0.0.0:11800")],
            otlp_http_addr: addr("0.0.0.0:4318"),
            http_addr: addr("0.0.0.0:12800"),
            cluster_addr: addr("0.0.0.0:11900"),
            advertise_addr: None,
            join: Vec::new(),
            api_token: None,
            cluster_secret: None,
            shutdown_delay_ms: 0,
            limits: LimitsConfig::default(),
            storage: StorageConfig::default(),
            retention: RetentionConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a valid built-in address")
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Values given on the command line; `None` means "not given".
#[derive(Clone, Debug, Default)]
pub struct FlagOverrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--node-id`.
    pub node_id: Option<String>,
    /// `--otlp-grpc-addrs`.
    pub otlp_grpc_addrs: Option<Vec<SocketAddr>>,
    /// `--otlp-http-addr`.
    pub otlp_http_addr: Option<SocketAddr>,
    /// `--http-addr`.
    pub http_addr: Option<SocketAddr>,
    /// `--cluster-addr`.
    pub cluster_addr: Option<SocketAddr>,
    /// `--advertise-addr`.
    pub advertise_addr: Option<String>,
    /// `--join`.
    pub join: Option<Vec<String>>,
}

impl NodeConfig {
    /// Defaults < file < environment < flags, then validation.
    pub fn load(
        file: Option<&Path>,
        environment: &BTreeMap<String, String>,
        flags: &FlagOverrides,
    ) -> Result<NodeConfig, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
                NodeConfig::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))?
            }
            None => NodeConfig::default(),
        };
        config = config.with_environment(environment)?;
        config.apply_flags(flags);
        config.validate()?;
        Ok(config)
    }

    /// Parses a YAML configuration (unknown keys are errors).
    pub fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(NodeConfig::default());
        }
        // Worded for people, as the API's documents are (a duplicate key said to set the
        // library's `DuplicateKeyPolicy`).
        tollgate_rules::config::deserialize_yaml(text, serde_saphyr::Options::default(), |error| {
            error.render_with_formatter(&serde_saphyr::UserMessageFormatter)
        })
        .map_err(ConfigError)
    }

    /// Applies `TOLLGATE_*` variables: every option, nested ones with their path joined by `_`.
    /// Lists are comma-separated. Unknown `TOLLGATE_*` variables are errors (typos must not
    /// silently do nothing); `TOLLGATE_CONFIG` names the file, `TOLLGATE_LOG` and
    /// `TOLLGATE_LOG_FORMAT` the logs' filter and format.
    pub fn with_environment(self, environment: &BTreeMap<String, String>) -> Result<NodeConfig, ConfigError> {
        let base = serde_json::to_value(&self).map_err(|e| ConfigError(e.to_string()))?;
        let mut tree = base.clone();
        let mut known =
            ["TOLLGATE_CONFIG", "TOLLGATE_LOG", "TOLLGATE_LOG_FORMAT", "TOLLGATE_API"].map(String::from).to_vec();
        overlay(&mut tree, "TOLLGATE", environment, &mut known)?;
        if let Some(unknown) = environment.keys().find(|k| k.starts_with("TOLLGATE_") && !known.contains(k)) {
            return Err(ConfigError(format!("unknown environment variable {unknown}")));
        }
        serde_json::from_value(tree).map_err(|error| {
            // Named by the variable whose value does not parse (an address, say), found by
            // applying each one alone.
            let culprit =
                environment.iter().filter(|(name, _)| name.starts_with("TOLLGATE_")).find_map(|(name, value)| {
                    let mut alone = base.clone();
                    let one = BTreeMap::from([(name.clone(), value.clone())]);
                    overlay(&mut alone, "TOLLGATE", &one, &mut Vec::new()).ok()?;
                    let parsed: Result<NodeConfig, _> = serde_json::from_value(alone);
                    parsed.err().map(|error| format!("{name}: {value:?}: {error}"))
                });
            ConfigError(culprit.unwrap_or_else(|| format!("from environment: {error}")))
        })
    }

    fn apply_flags(&mut self, flags: &FlagOverrides) {
        if let Some(v) = &flags.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &flags.node_id {
            self.node_id = Some(v.clone());
        }
        if let Some(v) = &flags.otlp_grpc_addrs {
            self.otlp_grpc_addrs = v.clone();
        }
        if let Some(v) = flags.otlp_http_addr {
            self.otlp_http_addr = v;
        }
        if let Some(v) = flags.http_addr {
            self.http_addr = v;
        }
        if let Some(v) = flags.cluster_addr {
            self.cluster_addr = v;
        }
        if let Some(v) = &flags.advertise_addr {
            self.advertise_addr = Some(v.clone());
        }
        if let Some(v) = &flags.join {
            self.join = v.clone();
        }
    }

    /// Checks values; the message names the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        if self.data_dir.as_os_str().is_empty() {
            return fail("data_dir: must not be empty".into());
        }
        if let Some(id) = &self.node_id {
            check_node_name(id).map_err(|error| ConfigError(format!("node_id: {error}")))?;
        }
        if self.otlp_grpc_addrs.is_empty() {
            return fail("otlp_grpc_addrs: at least one address".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for listener in self.otlp_grpc_addrs.iter().chain([&self.otlp_http_addr, &self.http_addr, &self.cluster_addr]) {
            if listener.port() != 0 && !seen.insert(*listener) {
                return fail(format!("listener address {listener} is used twice"));
            }
        }
        if let Some(advertise) = &self.advertise_addr {
            check_host_port(advertise).map_err(|error| ConfigError(format!("advertise_addr: {error}")))?;
        }
        for address in &self.join {
            check_host_port(address).map_err(|error| ConfigError(format!("join: {error}")))?;
        }
        for (name, value) in [("api_token", &self.api_token), ("cluster_secret", &self.cluster_secret)] {
            if value.as_deref() == Some("") {
                return fail(format!("{name}: must not be empty when set (remove it to disable)"));
            }
            // Each travels in a header (`Authorization`, a gRPC header): a value a header cannot
            // carry, or whose spaces a server trims, never matched, so every write (every call
            // between nodes) was refused.
            if let Some(value) = value {
                if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) || value.trim() != value {
                    return fail(format!(
                        "{name}: must be printable ASCII, without spaces at either end (it travels in a header)"
                    ));
                }
            }
        }
        let l = &self.limits;
        for (name, value) in [
            ("limits.max_request_bytes", l.max_request_bytes),
            ("limits.max_inflight_bytes", l.max_inflight_bytes),
            ("limits.owner_queue_capacity", l.owner_queue_capacity),
            ("limits.max_log_page", l.max_log_page),
            ("limits.max_query_points", l.max_query_points),
            ("limits.max_answer_points", l.max_answer_points),
            ("limits.max_concurrent_queries", l.max_concurrent_queries),
            ("storage.max_batches_per_flush", self.storage.max_batches_per_flush),
            ("storage.writer_queue_capacity", self.storage.writer_queue_capacity),
            ("cluster.max_forward_inflight_bytes", self.cluster.max_forward_inflight_bytes),
            ("cluster.forward_calls_per_peer", self.cluster.forward_calls_per_peer),
        ]
        .map(|(name, value)| (name, value as u64))
        .into_iter()
        .chain([
            ("limits.request_timeout_ms", l.request_timeout_ms),
            ("limits.body_timeout_ms", l.body_timeout_ms),
            ("retention.logs_seconds", self.retention.logs_seconds),
            ("retention.sweep_interval_seconds", self.retention.sweep_interval_seconds),
            ("cluster.heartbeat_interval_ms", self.cluster.heartbeat_interval_ms),
            ("cluster.rpc_timeout_ms", self.cluster.rpc_timeout_ms),
            ("cluster.failover_after_seconds", self.cluster.failover_after_seconds),
        ]) {
            if value == 0 {
                return fail(format!("{name}: must be greater than 0"));
            }
        }
        if l.max_inflight_bytes < l.max_request_bytes {
            return fail(format!(
                "limits.max_inflight_bytes ({}) must be at least limits.max_request_bytes ({})",
                l.max_inflight_bytes, l.max_request_bytes
            ));
        }
        if self.storage.cache_capacity_bytes < 1024 * 1024 {
            return fail("storage.cache_capacity_bytes: at least 1 MiB".into());
        }
        if self.storage.checkpoint_bytes < 64 * 1024 {
            return fail("storage.checkpoint_bytes: at least 64 KiB (65536)".into());
        }
        if self.storage.commit_delay_us > 10_000 {
            return fail("storage.commit_delay_us: at most 10000 (10 ms)".into());
        }
        if self.storage.checkpoint_interval_ms < 100 {
            return fail("storage.checkpoint_interval_ms: at least 100".into());
        }
        let r = &self.retention;
        if r.minute_seconds < 3_600 || r.hour_seconds < r.minute_seconds || r.day_seconds < r.hour_seconds {
            return fail(
                "retention: need minute_seconds >= 3600, hour_seconds >= minute_seconds, day_seconds >= hour_seconds"
                    .into(),
            );
        }
        let c = &self.cluster;
        if c.vnodes == 0 || c.vnodes > 4096 {
            return fail(format!("cluster.vnodes: {} must be between 1 and 4096", c.vnodes));
        }
        if c.election_timeout_ms <= c.heartbeat_interval_ms.saturating_mul(2) {
            return fail(format!(
                "cluster.election_timeout_ms: {} must be more than twice cluster.heartbeat_interval_ms ({})",
                c.election_timeout_ms, c.heartbeat_interval_ms
            ));
        }
        if c.failover_after_seconds.saturating_mul(1000) < c.election_timeout_ms.saturating_mul(12) {
            return fail(format!(
                "cluster.failover_after_seconds: {} s must be at least twelve election timeouts, {} s here \
                 (cluster.election_timeout_ms {} ms): a member out of touch with the leader for half of it stops \
                 merging, and an election (three to four election timeouts and a few round trips) must not make it \
                 stop",
                c.failover_after_seconds,
                c.election_timeout_ms.saturating_mul(12).div_ceil(1000),
                c.election_timeout_ms
            ));
        }
        Ok(())
    }
}

/// Walks the configuration tree; for every leaf, a variable named after its path replaces it.
fn overlay(
    tree: &mut serde_json::Value,
    prefix: &str,
    environment: &BTreeMap<String, String>,
    known: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let serde_json::Value::Object(fields) = tree else { return Ok(()) };
    for (name, value) in fields.iter_mut() {
        let variable = format!("{prefix}_{}", name.to_ascii_uppercase());
        if value.is_object() {
            overlay(value, &variable, environment, known)?;
            continue;
        }
        known.push(variable.clone());
        let Some(text) = environment.get(&variable) else { continue };
        *value = match value {
            serde_json::Value::Array(_) => serde_json::Value::Array(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| serde_json::Value::String(s.to_string()))
                    .collect(),
            ),
            serde_json::Value::Number(_) => serde_json::Value::Number(
                text.trim()
                    .parse::<u64>()
                    .map_err(|_| ConfigError(format!("{variable}: {text:?} is not a number")))?
                    .into(),
            ),
            serde_json::Value::Bool(_) => serde_json::Value::Bool(
                text.trim()
                    .parse::<bool>()
                    .map_err(|_| ConfigError(format!("{variable}: {text:?} is not true/false")))?,
            ),
            _ => serde_json::Value::String(text.clone()),
        };
    }
    Ok(())
}

/// Checks a node's name (`node_id`): 1-128 ASCII letters, digits, '-', '_' or '.', and not `.`
/// or `..` (a URL path cannot name them: `tollgate cluster leave ..` asked for another path).
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("{name:?} must be 1-128 letters, digits, '-', '_' or '.'"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} cannot name a node: it is a path's own name in URLs"));
    }
    Ok(())
}

/// Checks a `HOST:PORT` address another node dials: a host, and a port from 1 to 65535.
pub fn check_host_port(address: &str) -> Result<(), String> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0) => Ok(()),
        _ => Err(format!("{address:?} must be HOST:PORT, with a port from 1 to 65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn test_config_defaults_are_the_embedded_single_node() {
        let config = NodeConfig::load(None, &BTreeMap::new(), &FlagOverrides::default()).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.otlp_grpc_addrs.len(), 2);
        assert_eq!(config.http_addr.port(), 12800);
        assert!(config.join.is_empty());
    }

    #[test]
    fn test_config_flags_beat_env_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tollgate.yaml");
        std::fs::write(&file, "data_dir: /from/file\nhttp_addr: 127.0.0.1:1000\nlimits:\n  max_log_page: 5\n").unwrap();
        let environment = env(&[
            ("TOLLGATE_DATA_DIR", "/from/env"),
            ("TOLLGATE_JOIN", "a:1, b:2"),
            ("TOLLGATE_LIMITS_MAX_LOG_PAGE", "7"),
            ("PATH", "/bin"),
        ]);
        let flags = FlagOverrides { data_dir: Some("/from/flag".into()), ..Default::default() };
        let config = NodeConfig::load(Some(&file), &environment, &flags).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(config.join, vec!["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(config.limits.max_log_page, 7);
        assert_eq!(config.http_addr, addr("127.0.0.1:1000"));
        let config = NodeConfig::load(Some(&file), &environment, &FlagOverrides::default()).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/env"));
    }

    #[test]
    fn test_config_rejects_unknown_keys_variables_and_bad_values() {
        assert!(NodeConfig::parse("data_dri: x\n").unwrap_err().0.contains("data_dri"));
        let error = NodeConfig::parse("http_addr: 127.0.0.1:1\nhttp_addr: 127.0.0.1:2\n").unwrap_err().0;
        assert!(error.contains("http_addr") && !error.contains("DuplicateKeyPolicy"), "{error}");
        // A type error names the option's path (it named only a line, a column and a type).
        for (text, path) in [
            ("limits: {max_request_bytes: -5}\n", "limits.max_request_bytes: "),
            ("limits:\n  max_request_bytes: big\n", "limits.max_request_bytes: "),
            ("otlp_grpc_addrs: [5]\n", "otlp_grpc_addrs[0]: "),
        ] {
            let error = NodeConfig::parse(text).unwrap_err().0;
            assert!(error.contains(path), "{text:?}: {error}");
        }
        let error = NodeConfig::load(None, &env(&[("TOLLGATE_DATADIR", "x")]), &FlagOverrides::default()).unwrap_err();
        assert!(error.0.contains("TOLLGATE_DATADIR"), "{error}");
        let error =
            NodeConfig::load(None, &env(&[("TOLLGATE_LIMITS_MAX_LOG_PAGE", "many")]), &FlagOverrides::default())
                .unwrap_err();
        assert!(error.0.contains("TOLLGATE_LIMITS_MAX_LOG_PAGE"), "{error}");
        // An address that does not parse names its variable too (it said only "invalid socket
        // address syntax"), beside others that do.
        for (variable, value) in [
            ("TOLLGATE_CLUSTER_ADDR", "garbage"),
            ("TOLLGATE_OTLP_GRPC_ADDRS", "127.0.0.1:4317,x"),
            ("TOLLGATE_HTTP_ADDR", "127.0.0.1"),
        ] {
            let environment = env(&[(variable, value), ("TOLLGATE_OTLP_HTTP_ADDR", "127.0.0.1:4318")]);
            let error = NodeConfig::load(None, &environment, &FlagOverrides::default()).unwrap_err();
            assert!(error.0.starts_with(&format!("{variable}: {value:?}: ")), "{error}");
        }
        let bad =
            NodeConfig { limits: LimitsConfig { max_inflight_bytes: 1, ..Default::default() }, ..Default::default() };
        assert!(bad.validate().unwrap_err().0.contains("limits.max_inflight_bytes"));
        // A section whose options are all commented out is empty: the defaults.
        let commented = "limits:\n  # max_request_bytes: 1000\nstorage:\ncluster: ~\nretention: null\n";
        assert_eq!(NodeConfig::parse(commented).unwrap(), NodeConfig::default());
        // A zero names its own option only.
        for (text, named, not_named) in [
            (
                "cluster: {heartbeat_interval_ms: 0}",
                "cluster.heartbeat_interval_ms: must be greater than 0",
                "election",
            ),
            ("cluster: {rpc_timeout_ms: 0}", "cluster.rpc_timeout_ms: must be greater than 0", "failover"),
            ("cluster: {failover_after_seconds: 0}", "cluster.failover_after_seconds: must be", "rpc_timeout"),
            ("retention: {sweep_interval_seconds: 0}", "retention.sweep_interval_seconds: must be", "logs_seconds"),
            ("cluster: {election_timeout_ms: 500}", "cluster.election_timeout_ms: 500 must be more than twice", "rpc"),
            (
                "cluster: {failover_after_seconds: 11}",
                "cluster.failover_after_seconds: 11 s must be at least twelve election timeouts, 12 s here (cluster.election_timeout_ms 1000 ms)",
                "heartbeat",
            ),
        ] {
            let error = NodeConfig::parse(text).unwrap().validate().unwrap_err().0;
            assert!(error.contains(named) && !error.contains(not_named), "{text}: {error}");
        }
        let bad = NodeConfig { node_id: Some("a b".into()), ..Default::default() };
        assert!(bad.validate().unwrap_err().0.contains("node_id"));
        let bad = NodeConfig {
            storage: StorageConfig { commit_delay_us: 10_001, ..Default::default() },
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().0.contains("storage.commit_delay_us"));
        let bad = NodeConfig { http_addr: addr("0.0.0.0:4317"), ..Default::default() };
        assert!(bad.validate().unwrap_err().0.contains("used twice"));
        for secret in ["sécret", "tab\tinside", " padded", "new\nline"] {
            let bad = NodeConfig { cluster_secret: Some(secret.into()), ..NodeConfig::default() };
            assert!(bad.validate().unwrap_err().0.contains("cluster_secret: must be printable ASCII"), "{secret:?}");
        }
        let good = NodeConfig { cluster_secret: Some("a b~!".into()), ..NodeConfig::default() };
        good.validate().unwrap();
        for token in ["tökén", " lead", "trail ", "tab\tinside"] {
            let bad = NodeConfig { api_token: Some(token.into()), ..NodeConfig::default() };
            assert!(bad.validate().unwrap_err().0.contains("api_token: must be printable ASCII"), "{token:?}");
        }
        for address in ["foo:abc", "foo:", ":4000", "foo:99999", "foo:0", "foo"] {
            let bad = NodeConfig { advertise_addr: Some(address.into()), ..NodeConfig::default() };
            assert!(bad.validate().unwrap_err().0.contains("advertise_addr: "), "{address:?}");
            let bad = NodeConfig { join: vec![address.into()], ..NodeConfig::default() };
            assert!(bad.validate().unwrap_err().0.contains("join: "), "{address:?}");
        }
        for name in ["", ".", "..", "a b", "é"] {
            let bad = NodeConfig { node_id: Some(name.into()), ..NodeConfig::default() };
            assert!(bad.validate().unwrap_err().0.starts_with("node_id: "), "{name:?}");
        }
        for address in ["tollgate-0.tollgate:11900", "10.0.0.1:1", "[::1]:65535"] {
            let good =
                NodeConfig { advertise_addr: Some(address.into()), join: vec![address.into()], ..Default::default() };
            good.validate().unwrap();
        }
    }

    #[test]
    fn test_example_config_in_deploy_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tollgate.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = NodeConfig::parse(&text).unwrap();
        config.validate().unwrap();
        assert_ne!(config, NodeConfig::default(), "the example should show settings, not be empty");
    }

    /// The node configuration the Kubernetes ConfigMap mounts: a typo there would stop every pod.
    #[test]
    fn test_kubernetes_configmap_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/configmap.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, block) = text.split_once("  tollgate.yaml: |\n").expect("the ConfigMap holds tollgate.yaml");
        let embedded: String =
            block.lines().map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line))).collect();
        let config = NodeConfig::parse(&embedded).unwrap();
        config.validate().unwrap();
        assert_eq!(config.limits.max_series, 120_000);
        assert_eq!(config.cluster.vnodes, 256);
    }
}
