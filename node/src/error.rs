//! One error taxonomy for the node, mapped once to gRPC codes and HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::time::Duration;

/// Everything a request can fail with. Retryable kinds say so to clients (`UNAVAILABLE`,
/// `RESOURCE_EXHAUSTED` with retry advice, HTTP 429/503 with `Retry-After`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (malformed protobuf/JSON, bad parameter).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The node is busy: retry after the given delay.
    #[error("{message}")]
    Overloaded {
        /// What is full.
        message: String,
        /// Suggested delay before retrying.
        retry_after: Duration,
    },
    /// The node cannot serve this now (shutting down, storage failed, owner unreachable): retry.
    #[error("{0}")]
    Unavailable(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// The request conflicts with the current state (e.g. a write to a minority partition).
    #[error("{0}")]
    Conflict(String),
    /// The endpoint exists but not with this HTTP method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request did not arrive in time (its body stalled): retry.
    #[error("{0}")]
    Timeout(String),
    /// A bug or an unexpected failure.
    #[error("{0}")]
    Internal(String),
}

/// Default retry advice for overload.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Error {
    /// Overload with the default retry advice.
    pub fn overloaded(message: impl Into<String>) -> Error {
        Error::Overloaded { message: message.into(), retry_after: RETRY_AFTER }
    }

    /// The stable machine-readable code of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::TooLarge(_) => "too_large",
            Error::Overloaded { .. } => "overloaded",
            Error::Unavailable(_) => "unavailable",
            Error::NotFound(_) => "not_found",
            Error::Unauthorized(_) => "unauthorized",
            Error::Conflict(_) => "conflict",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::Timeout(_) => "timeout",
            Error::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            // Retryable over OTLP/HTTP as DEADLINE_EXCEEDED is over gRPC (408 is not).
            Error::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status, with `RetryInfo` details when the client should retry later.
    pub fn grpc_status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        let message = self.to_string();
        match self {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::TooLarge(_) => tonic::Status::resource_exhausted(message),
            Error::Overloaded { retry_after, .. } => tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(*retry_after)),
            ),
            Error::Unavailable(_) => tonic::Status::with_error_details(
                tonic::Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            ),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::Unauthorized(_) => tonic::Status::unauthenticated(message),
            Error::Conflict(_) => tonic::Status::failed_precondition(message),
            Error::MethodNotAllowed(_) => tonic::Status::unimplemented(message),
            Error::Timeout(_) => tonic::Status::deadline_exceeded(message),
            Error::Internal(_) => tonic::Status::internal(message),
        }
    }

    /// Seconds for a `Retry-After` header, for retryable errors.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Overloaded { retry_after, .. } => Some(*retry_after),
            Error::Unavailable(_) | Error::Timeout(_) => Some(RETRY_AFTER),
            _ => None,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> tonic::Status {
        error.grpc_status()
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    code: &'a str,
}

impl IntoResponse for Error {
    /// `{"error": "...", "code": "..."}` with the mapped status (SPEC §7).
    fn into_response(self) -> Response {
        let status = self.http_status();
        let retry_after = self.retry_after();
        let body = axum::Json(ErrorBody { error: self.to_string(), code: self.code() });
        let mut response = (status, body).into_response();
        if let Some(delay) = retry_after {
            if let Ok(value) = axum::http::HeaderValue::from_str(&delay.as_secs().max(1).to_string()) {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Result with the node's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
