//! OTLP/HTTP (SPEC §1.1): `POST /v1/metrics` and `POST /v1/logs`, protobuf or JSON, optionally
//! gzip-compressed. Answers in the request's encoding; errors are a `google.rpc.Status` with the
//! HTTP status of SPEC §8 (400 for malformed or unsupported bodies, 413, 429 and 503 with
//! `Retry-After`).

use super::{logs_response, metrics_response};
use crate::budget::{Budget, BudgetPermit};
use crate::error::Error;
use crate::ingest::Ingest;
use crate::metrics as m;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::BodyExt;
use prost::Message;
use serde::Serialize;
use std::time::Duration;
use tollgate_proto::otlp_routing::logs::ExportLogsServiceRequest as RoutingLogs;
use tollgate_proto::otlp_routing::metrics::ExportMetricsServiceRequest as RoutingMetrics;

/// Shared state of the OTLP/HTTP handlers.
#[derive(Clone, Debug)]
pub struct OtlpHttp {
    ingest: Ingest,
    budget: Budget,
    max_request_bytes: usize,
    body_timeout: Duration,
}

/// The two encodings OTLP/HTTP allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// The router of the OTLP/HTTP listener.
pub fn router(ingest: Ingest, budget: Budget, max_request_bytes: usize, body_timeout: Duration) -> Router {
    Router::new()
        .route("/v1/metrics", post(export_metrics))
        .route("/v1/logs", post(export_logs))
        .with_state(OtlpHttp { ingest, budget, max_request_bytes, body_timeout })
        // Bodies are read with our own limit (below), which answers in OTLP's format.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// `google.rpc.Status`, the OTLP/HTTP error body.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn error_response(error: &Error, encoding: Encoding) -> Response {
    let status = RpcStatus { code: error.grpc_status().code() as i32, message: error.to_string() };
    let body = match encoding {
        Encoding::Protobuf => status.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&status).unwrap_or_default(),
    };
    let mut response = (error.http_status(), [(header::CONTENT_TYPE, encoding.content_type())], body).into_response();
    if let Some(delay) = error.retry_after() {
        if let Ok(value) = HeaderValue::from_str(&delay.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, Error> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        other => Err(Error::InvalidArgument(format!(
            "unsupported Content-Type {other:?}: use application/x-protobuf or application/json"
        ))),
    }
}

/// Reads the body within the size limit and undoes `Content-Encoding: gzip`, charging `permit`
/// for every frame as it arrives and for the decompressed bytes as they are produced. A body
/// still arriving `timeout` after the call is a retryable [`Error::Timeout`], which releases its bytes: a
/// stalled upload held its share of the in-flight budget for as long as its connection was open.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
    permit: &mut BudgetPermit,
) -> Result<Vec<u8>, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let too_large = || Error::TooLarge(format!("request body exceeds limits.max_request_bytes ({limit} bytes)"));
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let gzip = match encoding.trim().to_ascii_lowercase().as_str() {
        "identity" | "" => false,
        "gzip" => true,
        other => {
            return Err(Error::InvalidArgument(format!("unsupported Content-Encoding {other:?}: use gzip or none")))
        }
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let mut wire = Vec::with_capacity(declared.unwrap_or(0));
    let mut body = body;
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| {
            Error::Timeout(format!(
                "the request body did not arrive within {} ms (limits.body_timeout_ms): {} bytes came",
                timeout.as_millis(),
                wire.len()
            ))
        })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| Error::InvalidArgument(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if wire.len() + data.len() > limit {
            return Err(too_large());
        }
        permit.grow(data.len())?;
        wire.extend_from_slice(&data);
    }
    if !gzip {
        return Ok(wire);
    }
    let mut decoded = Vec::new();
    super::gunzip(&wire, limit, permit, &mut decoded)?;
    Ok(decoded)
}

/// A protobuf request in its routing view: resources left encoded, sharing the body's buffer.
fn decode_routing<T: Message + Default>(bytes: Vec<u8>) -> Result<T, Error> {
    T::decode(bytes::Bytes::from(bytes)).map_err(|e| Error::InvalidArgument(format!("malformed protobuf request: {e}")))
}

fn encode<T: Message + Serialize>(message: &T, encoding: Encoding) -> Response {
    let body = match encoding {
        Encoding::Protobuf => message.encode_to_vec(),
        Encoding::Json => {
            // Absent fields are omitted, as protobuf's JSON mapping writes them (`{}` when all
            // was accepted), rather than written as null.
            let mut value = serde_json::to_value(message).unwrap_or_default();
            drop_nulls(&mut value);
            int64_as_strings(&mut value);
            serde_json::to_vec(&value).unwrap_or_default()
        }
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response()
}

fn drop_nulls(value: &mut serde_json::Value) {
    if let serde_json::Value::Object(fields) = value {
        fields.retain(|_, v| !v.is_null());
        fields.values_mut().for_each(drop_nulls);
    }
}

/// Protobuf's JSON mapping writes 64-bit integers as strings (a JSON number loses precision past
/// 2^53 in many parsers); the answers' only ones are the partial successes' rejected counts.
fn int64_as_strings(value: &mut serde_json::Value) {
    if let serde_json::Value::Object(fields) = value {
        for (key, field) in fields.iter_mut() {
            match field {
                serde_json::Value::Number(number) if key == "rejectedDataPoints" || key == "rejectedLogRecords" => {
                    *field = serde_json::Value::String(number.to_string());
                }
                _ => int64_as_strings(field),
            }
        }
    }
}

fn count(signal: &'static str, result: &Result<Response, Error>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    };
    metrics::counter!(m::REQUESTS, "protocol" => "http", "signal" => signal, "outcome" => outcome).increment(1);
}

async fn export_metrics(State(state): State<OtlpHttp>, headers: HeaderMap, body: Body) -> Response {
    let encoding = encoding_of(&headers).unwrap_or(Encoding::Protobuf);
    let result = async {
        let encoding = encoding_of(&headers)?;
        let mut permit = state.budget.empty();
        let bytes = read_body(&headers, body, state.max_request_bytes, state.body_timeout, &mut permit).await?;
        let report = match encoding {
            // Resources stay encoded until their owner is known, as over gRPC.
            Encoding::Protobuf => {
                let request: RoutingMetrics = decode_routing(bytes)?;
                state.ingest.metrics_encoded(request.resource_metrics, "http").await?
            }
            Encoding::Json => {
                let request = super::json::metrics_request(&bytes).map_err(Error::InvalidArgument)?;
                drop(bytes);
                state.ingest.metrics(request, "http").await?
            }
        };
        Ok(encode(&metrics_response(&report), encoding))
    }
    .await;
    count("metrics", &result);
    result.unwrap_or_else(|error| error_response(&error, encoding))
}

async fn export_logs(State(state): State<OtlpHttp>, headers: HeaderMap, body: Body) -> Response {
    let encoding = encoding_of(&headers).unwrap_or(Encoding::Protobuf);
    let result = async {
        let encoding = encoding_of(&headers)?;
        let mut permit = state.budget.empty();
        let bytes = read_body(&headers, body, state.max_request_bytes, state.body_timeout, &mut permit).await?;
        let report = match encoding {
            Encoding::Protobuf => {
                let request: RoutingLogs = decode_routing(bytes)?;
                state.ingest.logs_encoded(request.resource_logs, "http").await?
            }
            Encoding::Json => {
                let request = super::json::logs_request(&bytes).map_err(Error::InvalidArgument)?;
                drop(bytes);
                state.ingest.logs(request, "http").await?
            }
        };
        Ok(encode(&logs_response(&report), encoding))
    }
    .await;
    count("logs", &result);
    result.unwrap_or_else(|error| error_response(&error, encoding))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_encoding_of_content_types() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert_eq!(encoding_of(&headers).unwrap(), Encoding::Json);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        assert_eq!(encoding_of(&headers).unwrap(), Encoding::Protobuf);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(encoding_of(&headers).unwrap_err().to_string().contains("text/plain"));
    }
}
