//! OTLP/gRPC: the standard services on every configured address, gzip accepted, the request size
//! limit enforced by tonic and reported as `RESOURCE_EXHAUSTED` (SPEC §8). Both services leave
//! each resource encoded until its owner is known (`tollgate_proto::otlp_routing`).

use super::{logs_response, metrics_response};
use crate::budget::{Budget, BudgetPermit};
use crate::ingest::Ingest;
use crate::metrics as m;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_proto::otlp_routing::logs::logs_service_server::{LogsService, LogsServiceServer};
use tollgate_proto::otlp_routing::logs::ExportLogsServiceRequest;
use tollgate_proto::otlp_routing::metrics::metrics_service_server::{MetricsService, MetricsServiceServer};
use tollgate_proto::otlp_routing::metrics::ExportMetricsServiceRequest;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use tower::{Layer, Service};
use tracing::info;

/// The OTLP gRPC services.
#[derive(Clone, Debug)]
pub struct OtlpGrpc {
    ingest: Ingest,
    budget: Budget,
}

impl OtlpGrpc {
    /// Services feeding `ingest` under `budget`.
    pub fn new(ingest: Ingest, budget: Budget) -> OtlpGrpc {
        OtlpGrpc { ingest, budget }
    }
}

fn outcome_label<T>(result: &Result<T, crate::error::Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    }
}

#[tonic::async_trait]
impl MetricsService for OtlpGrpc {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let result = async {
            // The wire bytes stay charged (`WirePermit`), the decoded request is charged on top.
            let _wire = request.extensions().get::<WirePermit>().cloned();
            let _decoded = self.budget.try_acquire(request.get_ref().encoded_len())?;
            self.ingest.metrics_encoded(request.into_inner().resource_metrics, "grpc").await
        }
        .await;
        metrics::counter!(m::REQUESTS, "protocol" => "grpc", "signal" => "metrics", "outcome" => outcome_label(&result))
            .increment(1);
        Ok(Response::new(metrics_response(&result?)))
    }
}

#[tonic::async_trait]
impl LogsService for OtlpGrpc {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let result = async {
            // The wire bytes stay charged (`WirePermit`), the decoded request is charged on top.
            let _wire = request.extensions().get::<WirePermit>().cloned();
            let _decoded = self.budget.try_acquire(request.get_ref().encoded_len())?;
            self.ingest.logs_encoded(request.into_inner().resource_logs, "grpc").await
        }
        .await;
        metrics::counter!(m::REQUESTS, "protocol" => "grpc", "signal" => "logs", "outcome" => outcome_label(&result))
            .increment(1);
        Ok(Response::new(logs_response(&result?)))
    }
}

/// Serves the OTLP gRPC services on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    services: OtlpGrpc,
    max_request_bytes: usize,
    body_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "otlp grpc listening");
    }
    let budget = services.budget.clone();
    let metrics = MetricsServiceServer::new(services.clone())
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_request_bytes);
    let logs = LogsServiceServer::new(services)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max_request_bytes);
    tonic::transport::Server::builder()
        .layer(CodecStatusMapping)
        .layer(ChargeWireBytes { budget, body_timeout })
        .add_service(metrics)
        .add_service(logs)
        .serve_with_incoming_shutdown(crate::net::grpc_incoming(listener), shutdown)
        .await
}

/// tonic's codec answers an oversized message with `OUT_OF_RANGE`, and a protobuf that does not
/// decode, a gzip body that does not inflate or a message cut short with `INTERNAL`; SPEC §8 (and OTLP clients, which
/// must not retry them) expect `RESOURCE_EXHAUSTED` and `INVALID_ARGUMENT`. Our handlers never
/// return `OUT_OF_RANGE`, and their `INTERNAL` errors never start with prost's decode-error or
/// tonic's decompression-error text, so the mapping cannot hide anything else.
#[derive(Clone, Copy, Debug)]
struct CodecStatusMapping;

impl<S> Layer<S> for CodecStatusMapping {
    type Service = CodecStatusService<S>;
    fn layer(&self, inner: S) -> CodecStatusService<S> {
        CodecStatusService { inner }
    }
}

#[derive(Clone, Debug)]
struct CodecStatusService<S> {
    inner: S,
}

const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";
const INTERNAL: &str = "13";
const INVALID_ARGUMENT: &str = "3";

fn rewrite(headers: &mut http::HeaderMap) {
    let Some(status) = headers.get("grpc-status") else { return };
    if status == OUT_OF_RANGE {
        headers.insert("grpc-status", http::HeaderValue::from_static(RESOURCE_EXHAUSTED));
    } else if status == INTERNAL {
        // `grpc-message` is percent-encoded: its spaces are `%20`.
        let message = headers.get("grpc-message").map(|m| m.as_bytes()).unwrap_or_default();
        // A message cut short (its frame says more bytes than the request held) is malformed too.
        let malformed =
            ["failed to decode Protobuf message", "Error decompressing: ", "Unexpected EOF decoding stream"];
        let malformed = malformed.iter().any(|text| {
            message.starts_with(text.as_bytes()) || message.starts_with(text.replace(' ', "%20").as_bytes())
        });
        if malformed {
            headers.insert("grpc-status", http::HeaderValue::from_static(INVALID_ARGUMENT));
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CodecStatusService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
{
    type Response = http::Response<CodecStatusBody<ResBody>>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite(response.headers_mut());
            Ok(response.map(|inner| CodecStatusBody { inner }))
        })
    }
}

pin_project_lite::pin_project! {
    /// The response body, with `grpc-status` in trailers rewritten the same way.
    #[derive(Debug)]
    pub struct CodecStatusBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B: http_body::Body<Data = bytes::Bytes>> http_body::Body for CodecStatusBody<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.project().inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite(&mut trailers);
                    http_body::Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The wire bytes of a request, charged to the in-flight budget frame by frame while tonic reads
/// the body ([`ChargeWireBytes`]); the handler keeps them charged until it answers.
#[derive(Clone, Debug)]
struct WirePermit(Arc<Mutex<BudgetPermit>>);

/// Charges every request body frame to the in-flight budget as it arrives, before tonic buffers,
/// decompresses and decodes the message: beyond the budget the request fails at once with a
/// retryable `RESOURCE_EXHAUSTED`, so memory held by requests being read stays bounded. A body
/// still arriving `body_timeout` after its headers fails with `DEADLINE_EXCEEDED`, which
/// releases its bytes: stalled streams held their share of the budget for as long as their
/// connection stayed open.
#[derive(Clone, Debug)]
struct ChargeWireBytes {
    budget: Budget,
    body_timeout: Duration,
}

impl<S> Layer<S> for ChargeWireBytes {
    type Service = ChargeWireBytesService<S>;
    fn layer(&self, inner: S) -> ChargeWireBytesService<S> {
        ChargeWireBytesService { inner, budget: self.budget.clone(), body_timeout: self.body_timeout }
    }
}

#[derive(Clone, Debug)]
struct ChargeWireBytesService<S> {
    inner: S,
    budget: Budget,
    body_timeout: Duration,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for ChargeWireBytesService<S>
where
    S: Service<http::Request<ChargedBody<ReqBody>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let permit = WirePermit(Arc::new(Mutex::new(self.budget.empty())));
        let (mut parts, inner) = request.into_parts();
        parts.extensions.insert(permit.clone());
        let deadline = tokio::time::sleep(self.body_timeout);
        let timeout = self.body_timeout;
        self.inner.call(http::Request::from_parts(parts, ChargedBody { inner, permit, deadline, timeout }))
    }
}

pin_project_lite::pin_project! {
    /// A request body whose data frames are charged to the budget as they arrive, and which
    /// fails once `deadline` passes before its end.
    #[derive(Debug)]
    pub struct ChargedBody<B> {
        #[pin]
        inner: B,
        permit: WirePermit,
        #[pin]
        deadline: tokio::time::Sleep,
        timeout: Duration,
    }
}

impl<B> http_body::Body for ChargedBody<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let bytes = frame.data_ref().map_or(0, |data| data.len());
                let charged = this.permit.0.lock().map_err(|_| "in-flight budget lock poisoned")?.grow(bytes);
                match charged {
                    Ok(()) => Poll::Ready(Some(Ok(frame))),
                    // tonic finds the `Status` in the error and answers the client with it.
                    Err(error) => Poll::Ready(Some(Err(Box::new(Status::from(error))))),
                }
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Status::deadline_exceeded(format!(
                    "the request body did not arrive within {} ms (limits.body_timeout_ms)",
                    this.timeout.as_millis()
                )))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
