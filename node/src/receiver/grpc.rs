//! OTLP/gRPC: the standard services on every configured address, gzip accepted, the request size
//! limit enforced by tonic and reported as `RESOURCE_EXHAUSTED` (SPEC §8).

use super::{logs_response, metrics_response};
use crate::budget::Budget;
use crate::ingest::Ingest;
use crate::metrics as m;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use prost::Message;
use std::future::Future;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
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
            let _permit = self.budget.try_acquire(request.get_ref().encoded_len())?;
            self.ingest.metrics(request.into_inner(), "grpc").await
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
            let _permit = self.budget.try_acquire(request.get_ref().encoded_len())?;
            self.ingest.logs(request.into_inner(), "grpc").await
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
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    info!(address = ?address, "otlp grpc listening");
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
        .add_service(metrics)
        .add_service(logs)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
}

/// tonic's codec answers an oversized message with `OUT_OF_RANGE` and a protobuf that does not
/// decode with `INTERNAL`; SPEC §8 (and OTLP clients, which must not retry them) expect
/// `RESOURCE_EXHAUSTED` and `INVALID_ARGUMENT`. Our handlers never return `OUT_OF_RANGE`, and
/// their `INTERNAL` errors never start with prost's decode-error text, so the mapping cannot hide
/// anything else.
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
        let message = headers.get("grpc-message").map(|m| m.as_bytes()).unwrap_or_default();
        let decode_error = message.starts_with(b"failed to decode Protobuf message")
            || message.starts_with(b"failed%20to%20decode%20Protobuf%20message");
        if decode_error {
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
