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
        .layer(ChargeWireBytes { budget, body_timeout, max_request_bytes })
        .add_service(metrics)
        .add_service(logs)
        .serve_with_incoming_shutdown(crate::net::grpc_incoming(listener), shutdown)
        .await
}

/// tonic's codec answers an oversized message with `OUT_OF_RANGE`, and a protobuf that does not
/// decode or a message cut short with `INTERNAL`; SPEC §8 (and OTLP clients, which must not retry
/// them) expect `RESOURCE_EXHAUSTED` and `INVALID_ARGUMENT`. Our handlers never return
/// `OUT_OF_RANGE`, and their `INTERNAL` errors never start with prost's decode-error or tonic's
/// end-of-stream text, so the mapping cannot hide anything else. (Gzip messages are inflated
/// before tonic reads them, with our own statuses: [`Inflater`].)
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
        let malformed = ["failed to decode Protobuf message", "Unexpected EOF decoding stream"];
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

/// Charges every request body frame to the in-flight budget as it arrives, before tonic buffers
/// and decodes the message: beyond the budget the request fails at once with a retryable
/// `RESOURCE_EXHAUSTED`, so memory held by requests being read stays bounded. A body still
/// arriving `body_timeout` after its headers fails with `DEADLINE_EXCEEDED`, which releases its
/// bytes: stalled streams held their share of the budget for as long as their connection stayed
/// open. The messages of a `grpc-encoding: gzip` request are inflated here ([`Inflater`]), not by
/// tonic.
#[derive(Clone, Debug)]
struct ChargeWireBytes {
    budget: Budget,
    body_timeout: Duration,
    max_request_bytes: usize,
}

impl<S> Layer<S> for ChargeWireBytes {
    type Service = ChargeWireBytesService<S>;
    fn layer(&self, inner: S) -> ChargeWireBytesService<S> {
        ChargeWireBytesService {
            inner,
            budget: self.budget.clone(),
            body_timeout: self.body_timeout,
            max_request_bytes: self.max_request_bytes,
        }
    }
}

#[derive(Clone, Debug)]
struct ChargeWireBytesService<S> {
    inner: S,
    budget: Budget,
    body_timeout: Duration,
    max_request_bytes: usize,
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
        // Any other encoding tonic refuses (`UNIMPLEMENTED`), before reading the body.
        let gzip = parts.headers.get("grpc-encoding").is_some_and(|encoding| encoding == "gzip");
        let inflater = gzip.then(|| Inflater { pending: bytes::BytesMut::new(), limit: self.max_request_bytes });
        self.inner.call(http::Request::from_parts(parts, ChargedBody { inner, permit, deadline, timeout, inflater }))
    }
}

/// The length-prefixed messages of a gzip-encoded request (gRPC's framing: a compressed flag, a
/// 4-byte big-endian length, the message), inflated and framed again uncompressed. tonic's own
/// decompression reads only a gzip stream's first member and ignores the bytes after it, so a
/// message compressed as several members (valid RFC 1952, `cat a.gz b.gz`) was answered `OK` with
/// only the first member's data merged.
#[derive(Debug)]
struct Inflater {
    /// Bytes of a message not complete yet.
    pending: bytes::BytesMut,
    limit: usize,
}

/// gRPC's message prefix: the compressed flag and the length.
const PREFIX: usize = 5;

impl Inflater {
    /// Appends `data` and takes the complete messages out: compressed ones inflated (at most
    /// `limit` bytes each, charged to `permit`) and flagged uncompressed, others as they came, for
    /// tonic to read or refuse.
    fn push(&mut self, data: &[u8], permit: &mut BudgetPermit) -> Result<bytes::Bytes, Status> {
        self.pending.extend_from_slice(data);
        let mut messages = bytes::BytesMut::new();
        while self.pending.len() >= PREFIX {
            let length = u32::from_be_bytes([self.pending[1], self.pending[2], self.pending[3], self.pending[4]]);
            let length = length as usize;
            if length > self.limit {
                return Err(Status::resource_exhausted(format!(
                    "a message of {length} bytes exceeds limits.max_request_bytes ({} bytes)",
                    self.limit
                )));
            }
            if self.pending.len() < PREFIX + length {
                break;
            }
            let message = self.pending.split_to(PREFIX + length);
            if message[0] != 1 {
                messages.extend_from_slice(&message);
                continue;
            }
            let inflated = super::gunzip(&message[PREFIX..], self.limit, permit)?;
            messages.extend_from_slice(&[0]);
            messages.extend_from_slice(&(inflated.len() as u32).to_be_bytes());
            messages.extend_from_slice(&inflated);
        }
        Ok(messages.freeze())
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
        inflater: Option<Inflater>,
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
        let mut this = self.project();
        loop {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let mut permit = this.permit.0.lock().map_err(|_| "in-flight budget lock poisoned")?;
                    // tonic finds the `Status` in the error and answers the client with it.
                    if let Err(error) = permit.grow(data.len()) {
                        return Poll::Ready(Some(Err(Box::new(Status::from(error)))));
                    }
                    let Some(inflater) = this.inflater.as_mut() else {
                        return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                    };
                    match inflater.push(&data, &mut permit) {
                        // No message complete yet.
                        Ok(messages) if messages.is_empty() => continue,
                        Ok(messages) => return Poll::Ready(Some(Ok(http_body::Frame::data(messages)))),
                        Err(status) => return Poll::Ready(Some(Err(Box::new(status)))),
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => {
                    // A message cut short goes to tonic as it came, which answers that it ended early.
                    let rest = this.inflater.as_mut().map(|inflater| inflater.pending.split().freeze());
                    return Poll::Ready(
                        rest.filter(|rest| !rest.is_empty()).map(|rest| Ok(http_body::Frame::data(rest))),
                    );
                }
                Poll::Pending => {
                    return match this.deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Status::deadline_exceeded(format!(
                            "the request body did not arrive within {} ms (limits.body_timeout_ms)",
                            this.timeout.as_millis()
                        )))))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.inflater.as_ref().is_none_or(|inflater| inflater.pending.is_empty())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // Inflating changes the size.
        match self.inflater {
            Some(_) => http_body::SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut frame = vec![flag];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(message);
        frame
    }

    #[test]
    fn test_messages_are_inflated_however_the_body_is_cut() {
        let first = b"first message".repeat(50);
        let second = b"second".to_vec();
        let third = b"sent uncompressed".to_vec();
        let body = [
            framed(1, &[gzip(&first[..100]), gzip(&first[100..])].concat()),
            framed(1, &gzip(&second)),
            framed(0, &third),
        ]
        .concat();
        let expected = [framed(0, &first), framed(0, &second), framed(0, &third)].concat();
        let budget = Budget::new(1 << 20);
        for cut in [1, 2, 5, 7, 100, body.len()] {
            let mut inflater = Inflater { pending: bytes::BytesMut::new(), limit: 10_000 };
            let mut permit = budget.empty();
            let mut out = Vec::new();
            for chunk in body.chunks(cut) {
                out.extend_from_slice(&inflater.push(chunk, &mut permit).unwrap());
            }
            assert_eq!(out, expected, "chunks of {cut} bytes");
            assert!(inflater.pending.is_empty());
            // The inflated bytes are charged.
            assert_eq!(permit.held(), first.len() + second.len());
        }
    }

    #[test]
    fn test_an_incomplete_message_stays_pending_and_limits_hold() {
        let budget = Budget::new(1 << 20);
        let mut permit = budget.empty();
        let mut inflater = Inflater { pending: bytes::BytesMut::new(), limit: 1_000 };
        let message = framed(1, &gzip(b"hello"));
        assert!(inflater.push(&message[..message.len() - 1], &mut permit).unwrap().is_empty());
        assert_eq!(inflater.pending.len(), message.len() - 1);
        // Said longer than the limit: refused before its bytes are waited for.
        let mut inflater = Inflater { pending: bytes::BytesMut::new(), limit: 1_000 };
        let status = inflater.push(&framed(1, &[0; 1_001])[..10], &mut permit).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        // Inflating past the limit.
        let status = inflater.push(&framed(1, &gzip(&[0; 1_001])), &mut permit).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        // Not gzip, or bytes after the last member.
        for bad in [b"not gzip".to_vec(), [gzip(b"fine"), b"trailing".to_vec()].concat()] {
            let mut inflater = Inflater { pending: bytes::BytesMut::new(), limit: 1_000 };
            let status = inflater.push(&framed(1, &bad), &mut permit).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with("invalid gzip body"), "{status:?}");
        }
    }
}
