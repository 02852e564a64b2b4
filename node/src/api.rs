//! The HTTP API on port 12800 (SPEC §7): services, metric catalogue and series, kept logs,
//! configuration, `/metrics`, `/healthz`, `/readyz`. Errors are `{"error", "code"}` JSON.

use crate::error::Error;
use crate::fanout::{Answer, Fanout};
use crate::query::{check_time, LogQuery};
use crate::runtime::cluster_error;
use crate::runtime::ConfigService;
use crate::store::{LogPosition, StoredLog};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tollgate_rules::{KeepReason, LogKind, PricingDocument, RulesConfig, Step};

/// Everything the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Reads, across the cluster.
    pub query: Fanout,
    /// The node's cluster handle.
    pub cluster: Arc<tollgate_cluster::Cluster>,
    /// Configuration reads and writes.
    pub config: Arc<dyn ConfigService>,
    /// Self-metrics.
    pub prometheus: PrometheusHandle,
    /// Required for writes when set.
    pub api_token: Option<String>,
    /// True once the node serves traffic.
    pub ready: Arc<AtomicBool>,
    /// True while the node is healthy (false once storage failed).
    pub healthy: Arc<AtomicBool>,
    /// Time.
    pub clock: Arc<dyn crate::clock::Clock>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// The API router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/metrics", get(catalogue))
        .route("/api/v1/metrics/{name}", get(metric))
        .route("/api/v1/logs", get(logs))
        .route("/api/v1/config/pricing", get(get_pricing).put(put_pricing))
        .route("/api/v1/config/rules", get(get_rules).put(put_rules))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/cluster/nodes", axum::routing::post(add_node))
        .route("/api/v1/cluster/nodes/{id}", axum::routing::delete(remove_node))
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { Error::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            Error::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(MAX_DOCUMENT_BYTES))
        .layer(axum::middleware::from_fn(refuse_declared_too_large))
        .with_state(state)
}

/// A request whose declared length is over the limit is answered at once, before its body is
/// read (the limit also holds for a body of undeclared length, as it is read).
async fn refuse_declared_too_large(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_DOCUMENT_BYTES as u64) {
        return too_large().into_response();
    }
    next.run(request).await
}

fn too_large() -> Error {
    Error::TooLarge(format!("documents are limited to {MAX_DOCUMENT_BYTES} bytes"))
}

/// Largest configuration document accepted by a `PUT`.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// Query parameters, with a malformed value answered in the API's error format.
fn params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Error> {
    query.map(|Query(params)| params).map_err(|rejection| Error::InvalidArgument(rejection.body_text()))
}

/// A path parameter, with a malformed one (not UTF-8 once percent-decoded) answered in the API's
/// error format.
fn path(path: Result<Path<String>, PathRejection>) -> Result<String, Error> {
    path.map(|Path(value)| value).map_err(|rejection| Error::InvalidArgument(rejection.body_text()))
}

/// A request body, with an oversized one answered in the API's error format.
fn body(bytes: Result<axum::body::Bytes, BytesRejection>) -> Result<axum::body::Bytes, Error> {
    bytes.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        _ => Error::InvalidArgument(rejection.body_text()),
    })
}

fn count_query<T>(kind: &'static str, result: &Result<T, Error>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    };
    metrics::counter!(crate::metrics::QUERIES, "kind" => kind, "outcome" => outcome).increment(1);
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
pub fn authorize(headers: &HeaderMap, token: Option<&str>) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    // The scheme is case-insensitive (RFC 9110 §11.1): some clients send `bearer`.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .ok_or_else(|| Error::Unauthorized("this write needs Authorization: Bearer <api_token>".into()))?;
    if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Error::Unauthorized("the bearer token is not the configured api_token".into()))
    }
}

/// Compares two secrets in a time that does not depend on where they differ (the API token, the
/// cluster secret).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a time parameter, RFC 3339 or unix seconds, into unix nanoseconds: RFC 3339 keeps its
/// fraction of a second.
pub fn parse_time(name: &str, value: &str) -> Result<u64, Error> {
    let (seconds, nanos) = match value.trim().parse::<i64>() {
        Ok(seconds) => (seconds, 0),
        Err(_) => chrono::DateTime::parse_from_rfc3339(value.trim())
            .map(|t| (t.timestamp(), t.timestamp_subsec_nanos()))
            .map_err(|_| Error::InvalidArgument(format!("{name}: {value:?} is neither RFC 3339 nor unix seconds")))?,
    };
    check_time(name, seconds, value)?;
    let ns = seconds as u64 * NANOS_PER_SECOND + u64::from(nanos);
    // A fraction past the last second allowed is past it too.
    if ns > crate::query::LATEST_TIME as u64 * NANOS_PER_SECOND {
        check_time(name, crate::query::LATEST_TIME + 1, value)?;
    }
    Ok(ns)
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Rounds an API value to 6 decimals (SPEC §4: no rounding until the API).
pub fn round6(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}

/// The JSON answer, with `X-Tollgate-Missing-Nodes` naming members that could not be asked (the
/// answer may lack their data); with `partial=false`, such an answer is an error instead.
fn answer<T>(
    answer: Answer<T>,
    partial: Option<bool>,
    body: impl FnOnce(T) -> serde_json::Value,
) -> Result<Response, Error> {
    let missing = answer.missing;
    if !missing.is_empty() && partial == Some(false) {
        return Err(Error::Unavailable(format!(
            "no answer from {}: the answer would lack their data (partial=false); retry later",
            missing.join(", ")
        )));
    }
    let mut response = Json(body(answer.value)).into_response();
    if !missing.is_empty() {
        if let Ok(value) = missing.join(",").parse() {
            response.headers_mut().insert("x-tollgate-missing-nodes", value);
        }
    }
    Ok(response)
}

/// The parameter every read takes. Reads refuse parameters they do not know (here and below): a
/// mistyped `instnace=` would otherwise answer for the whole service as if it had been asked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    partial: Option<bool>,
}

async fn services(
    State(state): State<ApiState>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, Error> {
    let params = params(query)?;
    let services = state.query.services().await?;
    answer(services, params.partial, |services| json!({ "services": services }))
}

async fn catalogue(State(state): State<ApiState>) -> Response {
    let config = state.query.local().config();
    Json(config.rules.config.catalogue.entries()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricParams {
    service: Option<String>,
    instance: Option<String>,
    start: Option<String>,
    end: Option<String>,
    step: Option<String>,
    partial: Option<bool>,
}

/// The default query range: the last hour.
const DEFAULT_RANGE_SECONDS: u64 = 3600;

/// `start` and `end` of a query, in unix nanoseconds (logs keep their nanoseconds; an RFC 3339
/// time its fraction of a second). The default `end` is the end of the current second: `end` is
/// exclusive, and a record stamped within the current second has been received already.
fn range(start: Option<&str>, end: Option<&str>, now: i64) -> Result<(u64, u64), Error> {
    let end = match end {
        Some(value) => parse_time("end", value)?,
        None => (now.max(0) as u64 + 1) * NANOS_PER_SECOND,
    };
    let start = match start {
        Some(value) => parse_time("start", value)?,
        None => end.saturating_sub(DEFAULT_RANGE_SECONDS * NANOS_PER_SECOND),
    };
    // Checked before a metric query rounds them to seconds (`start=...00.7Z&end=...00.2Z`).
    if end <= start {
        return Err(Error::InvalidArgument("end must be after start".into()));
    }
    Ok((start, end))
}

/// A range of [`range`] in whole seconds for metric steps: `end` rounded up, so that the step
/// that starts before an `end` within a second is in.
fn range_seconds((start, end): (u64, u64)) -> (i64, i64) {
    ((start / NANOS_PER_SECOND) as i64, end.div_ceil(NANOS_PER_SECOND) as i64)
}

async fn metric(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<MetricParams>, QueryRejection>,
) -> Result<Response, Error> {
    let result = metric_answer(state, name, query).await;
    count_query("metric", &result);
    result
}

async fn metric_answer(
    state: ApiState,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<MetricParams>, QueryRejection>,
) -> Result<Response, Error> {
    let name = path(name)?;
    let params = params(query)?;
    let service = required_service(params.service)?;
    let step = match params.step.as_deref() {
        None => Step::Minute,
        Some(value) => Step::parse(value)
            .ok_or_else(|| Error::InvalidArgument(format!("step: {value:?} is not minute, hour or day")))?,
    };
    let (start, end) = range_seconds(range(params.start.as_deref(), params.end.as_deref(), state.clock.now_seconds())?);
    let query = state.query.local().metric_query(&name, &service, params.instance.as_deref(), start, end, step)?;
    let mut result = state.query.metric(query).await?;
    for series in &mut result.value.series {
        for point in &mut series.points {
            point.1 = point.1.map(round6);
        }
    }
    answer(result, params.partial, |result| serde_json::to_value(result).unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    service: Option<String>,
    instance: Option<String>,
    start: Option<String>,
    end: Option<String>,
    reason: Option<String>,
    kind: Option<String>,
    model: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    partial: Option<bool>,
}

/// A log as the API shows it (SPEC §7).
#[derive(Debug, Serialize)]
struct LogView {
    time: u64,
    service: String,
    instance: Option<String>,
    kind: &'static str,
    reasons: Vec<String>,
    model: Option<String>,
    provider: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cost: Option<f64>,
    response_code: Option<i64>,
    duration_ms: Option<u64>,
    session_id: Option<String>,
    attributes: BTreeMap<String, String>,
    body: Option<String>,
}

impl From<StoredLog> for LogView {
    fn from(log: StoredLog) -> LogView {
        LogView {
            time: log.time_ns,
            service: log.service,
            instance: log.instance,
            kind: log.kind.as_str(),
            reasons: log.reasons,
            model: log.model,
            provider: log.provider,
            input_tokens: log.input_tokens,
            output_tokens: log.output_tokens,
            total_tokens: log.total_tokens,
            cost: log.cost.map(|c| round6(c.to_f64())),
            response_code: log.response_code,
            duration_ms: log.duration_ms,
            session_id: log.session_id,
            // A repeated key shows its first value, the one the record was classified by (its
            // reasons, model, response code); collected as they come, the last one won.
            attributes: log.attributes.into_iter().rev().collect(),
            body: log.body,
        }
    }
}

/// Cursor text: `<time ns>-<fingerprint hex>`.
pub fn format_cursor(position: LogPosition) -> String {
    format!("{}-{:032x}", position.time_ns, position.fingerprint)
}

/// Parses [`format_cursor`]'s text.
pub fn parse_cursor(text: &str) -> Result<LogPosition, Error> {
    let invalid = || Error::InvalidArgument(format!("cursor {text:?} is not a cursor returned by this API"));
    let (time, fingerprint) = text.split_once('-').ok_or_else(invalid)?;
    // As `format_cursor` writes it: decimal digits, then exactly 32 hex digits.
    let digits = |s: &str, hex: bool| {
        !s.is_empty() && s.bytes().all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
    };
    if !digits(time, false) || fingerprint.len() != 32 || !digits(fingerprint, true) {
        return Err(invalid());
    }
    Ok(LogPosition {
        time_ns: time.parse().map_err(|_| invalid())?,
        fingerprint: u128::from_str_radix(fingerprint, 16).map_err(|_| invalid())?,
    })
}

async fn logs(
    State(state): State<ApiState>,
    query: Result<Query<LogParams>, QueryRejection>,
) -> Result<Response, Error> {
    let result = logs_answer(state, query).await;
    count_query("logs", &result);
    result
}

/// The `service` parameter, which every read of data needs (empty is none).
fn required_service(service: Option<String>) -> Result<String, Error> {
    service.filter(|service| !service.is_empty()).ok_or_else(|| Error::InvalidArgument("service is required".into()))
}

async fn logs_answer(state: ApiState, query: Result<Query<LogParams>, QueryRejection>) -> Result<Response, Error> {
    let params = params(query)?;
    let service = required_service(params.service)?;
    let (start, end) = range(params.start.as_deref(), params.end.as_deref(), state.clock.now_seconds())?;
    let reason = match params.reason.as_deref() {
        None => None,
        Some(value) => Some(KeepReason::parse(value).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "reason: {value:?} is not error, upstream_failure, slow, high_tokens or high_cost"
            ))
        })?),
    };
    let kind = match params.kind.as_deref() {
        None => None,
        Some(value) => Some(
            LogKind::parse(value)
                .ok_or_else(|| Error::InvalidArgument(format!("kind: {value:?} is not llm or mcp")))?,
        ),
    };
    let query = LogQuery {
        service,
        // Empty is no filter, as an empty instance of a metric query (a dashboard's "all").
        instance: params.instance.filter(|instance| !instance.is_empty()),
        start_ns: start,
        end_ns: end,
        reason,
        kind,
        model: params.model.filter(|model| !model.is_empty()),
        limit: params.limit.unwrap_or_else(|| state.query.local().default_log_page()),
        cursor: params.cursor.as_deref().map(parse_cursor).transpose()?,
    };
    let page = state.query.logs(query).await?;
    answer(page, params.partial, |page| {
        let logs: Vec<LogView> = page.logs.into_iter().map(LogView::from).collect();
        json!({ "logs": logs, "next_cursor": page.next.map(format_cursor) })
    })
}

fn wants_yaml(headers: &HeaderMap) -> bool {
    // Media types are case-insensitive (`application/YAML`).
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.to_ascii_lowercase().contains("yaml"))
}

fn document_response<T: Serialize>(
    headers: &HeaderMap,
    version: u64,
    document: &T,
    freshness: crate::runtime::Freshness,
) -> Result<Response, Error> {
    if wants_yaml(headers) {
        let text = serde_saphyr::to_string(document).map_err(|e| Error::Internal(e.to_string()))?;
        let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, "application/yaml")], text).into_response();
        if let Ok(value) = version.to_string().parse() {
            response.headers_mut().insert("x-tollgate-config-version", value);
        }
        // The YAML answer has no room for the freshness: a node out of touch says so here.
        if !freshness.up_to_date {
            response.headers_mut().insert("x-tollgate-up-to-date", header::HeaderValue::from_static("false"));
        }
        return Ok(response);
    }
    Ok(Json(json!({ "version": version, "document": document, "freshness": freshness })).into_response())
}

async fn get_pricing(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, Error> {
    state.query.refuse_if_departed()?;
    let config = state.query.local().config();
    document_response(&headers, config.pricing.version(), config.pricing.document(), state.config.freshness())
}

async fn get_rules(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, Error> {
    state.query.refuse_if_departed()?;
    let config = state.query.local().config();
    document_response(&headers, config.rules.version, &config.rules.config, state.config.freshness())
}

fn body_text(body: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(body).map_err(|_| Error::InvalidArgument("the body is not UTF-8 text".into()))
}

async fn put_pricing(
    State(state): State<ApiState>,
    headers: HeaderMap,
    bytes: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, Error> {
    authorize(&headers, state.api_token.as_deref())?;
    state.query.refuse_if_departed()?;
    let body = body(bytes)?;
    let document = PricingDocument::parse(body_text(&body)?).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let version = state.config.set_pricing(document).await?;
    Ok(Json(json!({ "version": version })).into_response())
}

async fn put_rules(
    State(state): State<ApiState>,
    headers: HeaderMap,
    bytes: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, Error> {
    authorize(&headers, state.api_token.as_deref())?;
    state.query.refuse_if_departed()?;
    let body = body(bytes)?;
    let document = RulesConfig::parse(body_text(&body)?).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let version = state.config.set_rules(document).await?;
    Ok(Json(json!({ "version": version })).into_response())
}

async fn cluster_status(State(state): State<ApiState>) -> Response {
    Json(state.cluster.status()).into_response()
}

/// A node to add, as `POST /api/v1/cluster/nodes` takes it (what `serve --join` sends itself).
#[derive(Debug, Deserialize)]
struct NodeToAdd {
    node_id: u64,
    name: String,
    cluster_addr: String,
    api_addr: String,
    /// The node's configured vnode count, checked against the cluster's (absent: not checked).
    #[serde(default)]
    vnodes: u32,
    /// The cluster whose state the node holds, from its `GET /api/v1/cluster` (absent or null:
    /// not checked here; the leader's calls say their cluster, and a node of another cluster
    /// refuses them).
    #[serde(default)]
    cluster_id: Option<u64>,
}

async fn add_node(
    State(state): State<ApiState>,
    headers: HeaderMap,
    bytes: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, Error> {
    authorize(&headers, state.api_token.as_deref())?;
    state.query.refuse_if_departed()?;
    let body = body(bytes)?;
    let node: NodeToAdd =
        serde_json::from_slice(&body).map_err(|e| Error::InvalidArgument(format!("the node to add: {e}")))?;
    // What the node itself would refuse to start with: the leader could never reach it, or a
    // client could never reach its API (it was stored, or waited for until a "retry" timed out).
    let invalid = |field: &str, error: String| Error::InvalidArgument(format!("the node to add: {field}: {error}"));
    crate::config::check_node_name(&node.name).map_err(|error| invalid("name", error))?;
    crate::config::check_host_port(&node.cluster_addr).map_err(|error| invalid("cluster_addr", error))?;
    crate::config::check_host_port(&node.api_addr).map_err(|error| invalid("api_addr", error))?;
    let request = tollgate_proto::peer::JoinRequest {
        node_id: node.node_id,
        name: node.name,
        cluster_addr: node.cluster_addr,
        api_addr: node.api_addr,
        vnodes: node.vnodes,
        cluster_id: node.cluster_id.unwrap_or(0),
    };
    let response = state.cluster.handle_join(request).await.map_err(cluster_error)?;
    Ok(Json(json!({ "leader": response.leader_id })).into_response())
}

/// How long `DELETE /api/v1/cluster/nodes/{id}` waits for the node's vnodes to move away.
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// `DELETE /api/v1/cluster/nodes/{id}` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveOptions {
    /// Forget a member that is down for good, with the data it held.
    #[serde(default)]
    force: bool,
}

async fn remove_node(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    options: Result<Query<RemoveOptions>, QueryRejection>,
) -> Result<Response, Error> {
    let id = path(id)?;
    let options = params(options)?;
    authorize(&headers, state.api_token.as_deref())?;
    state.query.refuse_if_departed()?;
    let members = state.cluster.state().nodes;
    let node_id = match id.parse::<u64>() {
        Ok(number) if members.contains_key(&number) => number,
        _ => *members
            .iter()
            .find(|(_, node)| node.name == id)
            .map(|(number, _)| number)
            .ok_or_else(|| Error::NotFound(format!("no member with id or name {id:?}")))?,
    };
    state.cluster.remove_node(node_id, options.force, LEAVE_TIMEOUT).await.map_err(cluster_error)?;
    Ok(Json(json!({ "removed": node_id })).into_response())
}

async fn prometheus(State(state): State<ApiState>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render(&state.prometheus))
        .into_response()
}

async fn healthz(State(state): State<ApiState>) -> Response {
    if state.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        Error::Unavailable("storage failed: the node is stopping".into()).into_response()
    }
}

/// Ready, or 503 saying why not.
async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::SeqCst) && state.healthy.load(Ordering::SeqCst) {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let why = if !state.healthy.load(Ordering::SeqCst) {
        "its store or its Raft node failed (its log says which); it is stopping"
    } else {
        let applied = state.cluster.applied().borrow().clone();
        let id = state.cluster.id;
        if applied.state.departed.contains(&id) {
            "this node left the cluster: its data is held by another member; start it with an empty \
             data directory to add it again"
        } else if !applied.state.is_member(id) {
            "not a member of a bootstrapped cluster yet"
        } else if !state.cluster.caught_up() {
            "catching up with the cluster: not in touch with a leader yet, or still applying the changes it \
             committed"
        } else if !state.cluster.holds_lease().holds() {
            "catching up with the cluster: no lease on its vnodes yet (the leader has not answered a renewal \
             sent since it started, or it is still applying what the leader committed)"
        } else {
            "starting or stopping"
        }
    };
    Error::Unavailable(format!("not ready: {why}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RFC 3339 time keeps its fraction of a second: logs are read to the nanosecond, and a
    /// metric query's `end` within a second takes in the step that starts before it.
    #[test]
    fn test_a_fraction_of_a_second_is_kept() {
        let start = 1_796_657_220; // 2026-12-07T15:27:00Z
        assert_eq!(parse_time("end", "2026-12-07T15:27:00.999Z").unwrap(), start * 1_000_000_000 + 999_000_000);
        let within = range(Some("2026-12-07T15:27:00Z"), Some("2026-12-07T15:27:00.7941Z"), 0).unwrap();
        assert_eq!(within, (start * 1_000_000_000, start * 1_000_000_000 + 794_100_000));
        assert_eq!(range_seconds(within), (start as i64, start as i64 + 1));
        assert_eq!(range_seconds(range(Some("1"), Some("60"), 0).unwrap()), (1, 60));
        assert_eq!(range_seconds(range(None, None, 7_200).unwrap()), (3_601, 7_201));
        // An inverted range within one second, and a fraction past the last second allowed.
        let inverted = range(Some("2026-12-07T15:27:00.7Z"), Some("2026-12-07T15:27:00.2Z"), 0).unwrap_err();
        assert!(inverted.to_string().contains("end must be after start"), "{inverted}");
        let late = parse_time("end", "2500-01-01T00:00:00.5Z").unwrap_err().to_string();
        assert!(late.contains("2500-01-01T00:00:00Z"), "{late}");
        assert!(parse_time("end", "2500-01-01T00:00:00Z").is_ok());
    }

    #[test]
    fn test_parse_time_accepts_rfc3339_and_unix_seconds() {
        assert_eq!(parse_time("start", "1764151200").unwrap(), 1_764_151_200_000_000_000);
        assert_eq!(parse_time("start", "2025-11-26T10:00:00Z").unwrap(), 1_764_151_200_000_000_000);
        assert_eq!(parse_time("start", "2025-11-26T11:00:00+01:00").unwrap(), 1_764_151_200_000_000_000);
        assert!(parse_time("start", "yesterday").unwrap_err().to_string().contains("start"));
        assert_eq!(parse_time("end", "0").unwrap(), 0);
        assert_eq!(
            parse_time("end", "2500-01-01T00:00:00Z").unwrap(),
            crate::query::LATEST_TIME as u64 * 1_000_000_000
        );
        for (value, why) in [
            ("-1", "before 1970"),
            ("16725225601", "after 2500"),
            ("9223372036854775807", "i64::MAX"),
            ("-9223372036854775808", "i64::MIN"),
            ("1969-12-31T23:59:59Z", "before 1970"),
            ("9999-01-01T00:00:00Z", "after 2500"),
        ] {
            let error = parse_time("end", value).unwrap_err().to_string();
            assert!(error.contains("end") && error.contains("2500-01-01T00:00:00Z"), "{why}: {error}");
        }
    }

    #[test]
    fn test_cursor_round_trips() {
        let position = LogPosition { time_ns: 17, fingerprint: u128::MAX - 5 };
        assert_eq!(parse_cursor(&format_cursor(position)).unwrap(), position);
        let small = LogPosition { time_ns: 0, fingerprint: 1 };
        assert_eq!(parse_cursor(&format_cursor(small)).unwrap(), small);
        // Not the `<time ns>-<32 hex digits>` this API writes (`u128::from_str_radix` and
        // `u64::from_str` took the first four, with a sign or as few digits as given).
        let hex = "0123456789abcdef0123456789abcdef";
        for bad in [
            "nope",
            "123-abc",
            &format!("+17-{hex}"),
            &format!("17-+{}", &hex[1..]),
            &format!("-{hex}"),
            "17-",
            &format!("17-{hex}0"),
        ] {
            let error = parse_cursor(bad).unwrap_err().to_string();
            assert!(error.contains("is not a cursor returned by this API"), "{bad}: {error}");
        }
    }

    #[test]
    fn test_authorize_needs_the_exact_bearer_token() {
        let mut headers = HeaderMap::new();
        assert!(authorize(&headers, None).is_ok());
        assert!(matches!(authorize(&headers, Some("s3cret")), Err(Error::Unauthorized(_))));
        headers.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(matches!(authorize(&headers, Some("s3cret")), Err(Error::Unauthorized(_))));
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorize(&headers, Some("s3cret")).is_ok());
        for scheme in ["bearer", "BEARER"] {
            headers.insert(header::AUTHORIZATION, format!("{scheme} s3cret").parse().unwrap());
            assert!(authorize(&headers, Some("s3cret")).is_ok(), "{scheme}");
        }
        for wrong in ["Basic s3cret", "Bearers3cret", "s3cret", "Bearer S3CRET"] {
            headers.insert(header::AUTHORIZATION, wrong.parse().unwrap());
            assert!(matches!(authorize(&headers, Some("s3cret")), Err(Error::Unauthorized(_))), "{wrong}");
        }
    }

    #[test]
    fn test_round6() {
        assert_eq!(round6(1992.0454545454), 1992.045455);
        assert_eq!(round6(276.29999999999995), 276.3);
    }
}
