//! OTLP/gRPC: the standard services on every configured address, gzip accepted, the request size
//! limit enforced by tonic and reported as `RESOURCE_EXHAUSTED` (SPEC §8). Both services leave
//! each resource encoded until its owner is known (`tollgate_proto::otlp_routing`).

use super::{logs_response, metrics_response};
use crate::budget::{Budget, BudgetPermit};
use crate::ingest::Ingest;
use crate::metrics as m;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// Charges the decoded request to the same permit as its wire (and inflated) bytes: a
    /// request's charges together are capped at the whole budget, so one request within
    /// `limits.max_request_bytes` always fits on an idle node. Charged separately, the decoded
    /// request did not fit next to its own wire bytes once they held half the budget, and such a
    /// request was refused as overloaded at every retry. Without a wire permit (a call that did
    /// not come through [`ChargeWireBytes`]), a permit of its own.
    fn charge_decoded<T: prost::Message>(
        &self,
        request: &Request<T>,
    ) -> Result<(Option<WirePermit>, Option<BudgetPermit>), crate::error::Error> {
        let bytes = request.get_ref().encoded_len();
        match request.extensions().get::<WirePermit>().cloned() {
            Some(wire) => {
                wire.grow(bytes)?;
                Ok((Some(wire), None))
            }
            None => Ok((None, Some(self.budget.try_acquire(bytes)?))),
        }
    }
}

fn outcome_label<T>(result: &Result<T, crate::error::Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    }
}

/// Counts a gRPC export in `tollgate_requests_total`.
fn count_request(signal: &'static str, outcome: &'static str) {
    metrics::counter!(m::REQUESTS, "protocol" => "grpc", "signal" => signal, "outcome" => outcome).increment(1);
}

/// Counts the export a handler answered with `result`, and marks it counted for
/// [`CodecStatusService`].
fn count_handled<T>(signal: &'static str, result: &Result<T, crate::error::Error>, counted: Option<Counted>) {
    count_request(signal, outcome_label(result));
    counted.inspect(Counted::mark);
}

#[tonic::async_trait]
impl MetricsService for OtlpGrpc {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let counted = request.extensions().get::<Counted>().cloned();
        let result = async {
            // The wire bytes stay charged (`WirePermit`), the decoded request is charged on top.
            let (_wire, _decoded) = self.charge_decoded(&request)?;
            self.ingest.metrics_encoded(request.into_inner().resource_metrics, "grpc").await
        }
        .await;
        count_handled("metrics", &result, counted);
        Ok(Response::new(metrics_response(&result?)))
    }
}

#[tonic::async_trait]
impl LogsService for OtlpGrpc {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let counted = request.extensions().get::<Counted>().cloned();
        let result = async {
            // The wire bytes stay charged (`WirePermit`), the decoded request is charged on top.
            let (_wire, _decoded) = self.charge_decoded(&request)?;
            self.ingest.logs_encoded(request.into_inner().resource_logs, "grpc").await
        }
        .await;
        count_handled("logs", &result, counted);
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
/// before tonic reads them, with our own statuses: [`Messages`].)
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

/// Set by the handlers once they counted their request in `tollgate_requests_total`; a request
/// refused before its handler ran (its body over the in-flight budget or the request limit, cut
/// off by `limits.body_timeout_ms`, or malformed) is counted by [`CodecStatusService`], from the
/// status it is answered with.
#[derive(Clone, Debug, Default)]
struct Counted(Arc<AtomicBool>);

impl Counted {
    fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The `outcome` of a request answered `headers` (a trailers-only answer: an error) before its
/// handler ran.
fn refused_outcome(headers: &http::HeaderMap) -> Option<&'static str> {
    let status = headers.get("grpc-status")?.as_bytes();
    let message = headers.get("grpc-message").map(|m| m.as_bytes()).unwrap_or_default();
    let mentions = |text: &str| message.windows(text.len()).any(|w| w == text.as_bytes());
    Some(match status {
        // Not refusals: an answer to a client that cancelled or lost its connection.
        b"0" | b"1" | b"2" => return None,
        b"8" if mentions("max_request_bytes") => "too_large",
        b"8" => "overloaded",
        b"3" | b"12" => "invalid_argument",
        b"4" => "timeout",
        b"14" => "unavailable",
        _ => "internal",
    })
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
        // tonic's answer to a body without a message (empty) is malformed too.
        let malformed =
            ["failed to decode Protobuf message", "Unexpected EOF decoding stream", "Missing request message"];
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

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let signal = match request.uri().path() {
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export" => Some("metrics"),
            "/opentelemetry.proto.collector.logs.v1.LogsService/Export" => Some("logs"),
            _ => None,
        };
        let counted = Counted::default();
        request.extensions_mut().insert(counted.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite(response.headers_mut());
            if let (Some(signal), false) = (signal, counted.0.load(Ordering::Relaxed)) {
                if let Some(outcome) = refused_outcome(response.headers()) {
                    count_request(signal, outcome);
                }
            }
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

impl WirePermit {
    /// Charges `bytes` more to the request's permit (see [`BudgetPermit::grow`]).
    fn grow(&self, bytes: usize) -> Result<(), crate::error::Error> {
        self.0.lock().map_err(|_| crate::error::Error::Internal("in-flight budget lock poisoned".into()))?.grow(bytes)
    }
}

/// Charges every request body frame to the in-flight budget as it arrives, before tonic buffers
/// and decodes the message: beyond the budget the request fails at once with a retryable
/// `RESOURCE_EXHAUSTED`, so memory held by requests being read stays bounded. A body still
/// arriving `body_timeout` after its headers fails with `DEADLINE_EXCEEDED`, which releases its
/// bytes: stalled streams held their share of the budget for as long as their connection stayed
/// open. The body must carry one message, which in a `grpc-encoding: gzip` request is inflated
/// here, not by tonic ([`Messages`]).
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
        let messages = Messages::new(gzip.then(|| permit.clone()), self.max_request_bytes);
        self.inner.call(http::Request::from_parts(parts, ChargedBody { inner, permit, deadline, timeout, messages }))
    }
}

/// gRPC's message prefix: the compressed flag and the 4-byte big-endian length.
const PREFIX: usize = 5;

/// The gRPC message of a request body, followed as its bytes arrive.
///
/// An `Export` call carries one message. tonic reads the first and drops any further ones
/// unseen, so a request of two was answered `OK` with the second's data dropped: a second message
/// is refused (`INVALID_ARGUMENT`), as gRPC's other servers do.
///
/// In a gzip request (`grpc-encoding: gzip`) the message is inflated here and handed to tonic
/// uncompressed. tonic's own decompression reads only a gzip stream's first member and ignores the
/// bytes after it, so a message compressed as several members (valid RFC 1952, `cat a.gz b.gz`)
/// was answered `OK` with only the first member's data merged; bytes after the last member were
/// ignored too.
#[derive(Debug)]
struct Messages {
    /// Set in a gzip request: the request's permit, which the inflated bytes are charged to.
    /// They stay charged until the body ends ([`Messages::end`]): tonic holds the message until
    /// then (it reads to the end before calling the handler, which charges the decoded request),
    /// and a client that never ends its body would otherwise hold up to the request limit
    /// uncharged for as long as `limits.body_timeout_ms`.
    inflate: Option<WirePermit>,
    /// The inflated message's bytes charged to `inflate`, given back when the body ends.
    inflated: usize,
    limit: usize,
    /// Inflating: the message's bytes so far. Otherwise: its prefix's bytes so far (the message
    /// itself is passed on as it comes).
    pending: bytes::BytesMut,
    /// Not inflating: the bytes of the message still to come after its prefix.
    remaining: usize,
    /// A message has begun.
    begun: bool,
    /// The body ended and what was pending was handed on.
    ended: bool,
}

impl Messages {
    fn new(inflate: Option<WirePermit>, limit: usize) -> Messages {
        let pending = bytes::BytesMut::new();
        Messages { inflate, inflated: 0, limit, pending, remaining: 0, begun: false, ended: false }
    }

    /// A message begins: refused if it is not the first.
    fn begin(&mut self) -> Result<(), Status> {
        if std::mem::replace(&mut self.begun, true) {
            return Err(Status::invalid_argument(
                "the request carries more than one message: an Export call takes exactly one",
            ));
        }
        Ok(())
    }

    /// The length in a complete prefix, within the limit, after its compressed flag is checked.
    fn length(&self, prefix: &[u8]) -> Result<usize, Status> {
        match prefix[0] {
            0 => {}
            1 if self.inflate.is_some() => {}
            1 => {
                return Err(Status::invalid_argument(
                    "the message is marked compressed but the request names no grpc-encoding (gzip is served)",
                ))
            }
            flag => {
                return Err(Status::invalid_argument(format!(
                    "the message's compressed flag is {flag}: gRPC allows 0 (uncompressed) or 1 (compressed)"
                )))
            }
        }
        let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if length > self.limit {
            return Err(Status::resource_exhausted(format!(
                "a message of {length} bytes exceeds limits.max_request_bytes ({} bytes)",
                self.limit
            )));
        }
        Ok(length)
    }

    /// The bytes to hand tonic for `data`, the body's next bytes: `data` itself, or, inflating,
    /// nothing until the message is complete, then the message (inflated if it is compressed,
    /// as it came if not, for tonic to read or refuse).
    fn push(&mut self, data: bytes::Bytes) -> Result<bytes::Bytes, Status> {
        let Some(permit) = self.inflate.clone() else {
            self.follow(&data)?;
            return Ok(data);
        };
        if self.pending.is_empty() && !data.is_empty() {
            self.begin()?;
        }
        self.pending.extend_from_slice(&data);
        if self.pending.len() < PREFIX {
            return Ok(bytes::Bytes::new());
        }
        let length = self.length(&self.pending)?;
        if self.pending.len() < PREFIX + length {
            return Ok(bytes::Bytes::new());
        }
        if self.pending.len() > PREFIX + length {
            // Bytes of a second message.
            self.begin()?;
        }
        let message = self.pending.split();
        if message[0] != 1 {
            return Ok(message.freeze());
        }
        let mut inflated = vec![0u8; PREFIX];
        let mut permit = permit.0.lock().map_err(|_| Status::internal("in-flight budget lock poisoned"))?;
        let before = permit.held();
        let result = super::gunzip(&message[PREFIX..], self.limit, &mut permit, &mut inflated);
        self.inflated += permit.held() - before;
        drop(permit);
        result?;
        let length = (inflated.len() - PREFIX) as u32;
        inflated[1..PREFIX].copy_from_slice(&length.to_be_bytes());
        Ok(bytes::Bytes::from(inflated))
    }

    /// Follows the framing through `data` without keeping the message.
    fn follow(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skipped = self.remaining.min(data.len());
                self.remaining -= skipped;
                data = &data[skipped..];
                continue;
            }
            if self.pending.is_empty() {
                self.begin()?;
            }
            let taken = (PREFIX - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..taken]);
            data = &data[taken..];
            if self.pending.len() == PREFIX {
                self.remaining = self.length(&self.pending)?;
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// A message has begun and not ended.
    fn unfinished(&self) -> bool {
        !self.pending.is_empty() || self.remaining > 0
    }

    /// At the body's end: what was kept of a message cut short, for tonic, which answers that the
    /// request ended early.
    fn end(&mut self) -> Option<bytes::Bytes> {
        self.ended = true;
        if let Some(permit) = &self.inflate {
            if let Ok(mut permit) = permit.0.lock() {
                permit.release(std::mem::take(&mut self.inflated));
            }
        }
        let rest = self.pending.split().freeze();
        (self.inflate.is_some() && !rest.is_empty()).then_some(rest)
    }
}

pin_project_lite::pin_project! {
    /// A request body whose data frames are charged to the budget as they arrive, which fails
    /// once `deadline` passes before its end, and whose message is followed (and, in a gzip
    /// request, inflated) by [`Messages`].
    #[derive(Debug)]
    pub struct ChargedBody<B> {
        #[pin]
        inner: B,
        permit: WirePermit,
        #[pin]
        deadline: tokio::time::Sleep,
        timeout: Duration,
        messages: Messages,
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
        if this.messages.ended {
            return Poll::Ready(None);
        }
        loop {
            // tonic finds a `Status` in the error and answers the client with it.
            let failed = |status: Status| Poll::Ready(Some(Err(Box::new(status) as Self::Error)));
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(_) if this.messages.unfinished() => {
                            return failed(Status::invalid_argument("the request's trailers came inside its message"))
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let charged = this.permit.0.lock().map_err(|_| "in-flight budget lock poisoned")?.grow(data.len());
                    if let Err(error) = charged {
                        return failed(error.into());
                    }
                    match this.messages.push(data) {
                        // The message is not complete yet.
                        Ok(data) if data.is_empty() && this.messages.inflate.is_some() => continue,
                        Ok(data) => return Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                        Err(status) => return failed(status),
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => {
                    return Poll::Ready(this.messages.end().map(|rest| Ok(http_body::Frame::data(rest))))
                }
                Poll::Pending => {
                    return match this.deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => failed(Status::deadline_exceeded(format!(
                            "the request body did not arrive within {} ms (limits.body_timeout_ms)",
                            this.timeout.as_millis()
                        ))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.messages.ended
            || (self.inner.is_end_stream() && (self.messages.inflate.is_none() || self.messages.pending.is_empty()))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // Inflating changes the size.
        match self.messages.inflate {
            Some(_) => http_body::SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
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

    fn inflating(budget: &Budget, limit: usize) -> Messages {
        Messages::new(Some(WirePermit(Arc::new(Mutex::new(budget.empty())))), limit)
    }

    /// What `messages` hands on for `body` cut into chunks of `cut` bytes, and its first error.
    fn feed(messages: &mut Messages, body: &[u8], cut: usize) -> (Vec<u8>, Option<Status>) {
        let mut out = Vec::new();
        for chunk in body.chunks(cut) {
            match messages.push(Bytes::copy_from_slice(chunk)) {
                Ok(data) => out.extend_from_slice(&data),
                Err(status) => return (out, Some(status)),
            }
        }
        out.extend_from_slice(&messages.end().unwrap_or_default());
        (out, None)
    }

    #[test]
    fn test_a_message_of_several_members_is_inflated_however_the_body_is_cut() {
        let message = b"one message".repeat(50);
        let body = framed(1, &[gzip(&message[..100]), gzip(&message[100..])].concat());
        let budget = Budget::new(1 << 20);
        for cut in [1, 2, 5, 7, 100, body.len()] {
            let (out, error) = feed(&mut inflating(&budget, 10_000), &body, cut);
            assert!(error.is_none(), "{error:?}");
            assert_eq!(out, framed(0, &message), "chunks of {cut} bytes");
        }
        // An uncompressed message of a gzip request goes on as it came.
        let body = framed(0, b"as it came");
        let (out, error) = feed(&mut inflating(&budget, 10_000), &body, 3);
        assert!(error.is_none() && out == body, "{out:?} {error:?}");
        // Not inflating, the bytes go on as they come.
        let body = framed(0, &message);
        let (out, error) = feed(&mut Messages::new(None, 10_000), &body, 3);
        assert!(error.is_none() && out == body, "{out:?} {error:?}");
    }

    #[test]
    fn test_a_second_message_is_refused() {
        let budget = Budget::new(1 << 20);
        for first in [framed(0, b""), framed(0, b"first"), framed(1, &gzip(b"first"))] {
            let body = [first.clone(), framed(0, b"second")].concat();
            for cut in [1, 4, 5, 6, first.len(), body.len()] {
                // A compressed message comes only in a gzip request.
                let plain = (first[0] == 0).then(|| Messages::new(None, 1_000));
                for mut messages in [Some(inflating(&budget, 1_000)), plain].into_iter().flatten() {
                    let (_, error) = feed(&mut messages, &body, cut);
                    let status = error.unwrap_or_else(|| panic!("{body:?} in chunks of {cut} bytes: accepted"));
                    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
                    assert!(status.message().contains("more than one message"), "{status:?}");
                }
            }
        }
    }

    #[test]
    fn test_limits_and_bad_gzip_and_a_message_cut_short() {
        let budget = Budget::new(1 << 20);
        // Said longer than the limit: refused before its bytes are waited for, inflating or not.
        for (flag, mut messages) in [(1, inflating(&budget, 1_000)), (0, Messages::new(None, 1_000))] {
            let status = messages.push(Bytes::from(framed(flag, &[0; 1_001])[..10].to_vec())).unwrap_err();
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        }
        // Inflating past the limit.
        let status = inflating(&budget, 1_000).push(Bytes::from(framed(1, &gzip(&[0; 1_001])))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("once inflated"), "{status:?}");
        // Not gzip, or bytes after the last member.
        for bad in [b"not gzip".to_vec(), [gzip(b"fine"), b"trailing".to_vec()].concat()] {
            let status = inflating(&budget, 1_000).push(Bytes::from(framed(1, &bad))).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with("invalid gzip body"), "{status:?}");
        }
        // A message cut short: what came goes on at the end, for tonic to say it ended early.
        let body = framed(1, &gzip(b"hello"));
        let mut messages = inflating(&budget, 1_000);
        assert!(messages.push(Bytes::from(body[..body.len() - 1].to_vec())).unwrap().is_empty());
        assert!(messages.unfinished());
        assert_eq!(messages.end().unwrap(), body[..body.len() - 1]);
        let mut messages = Messages::new(None, 1_000);
        assert_eq!(messages.push(Bytes::from(body[..3].to_vec())).unwrap(), body[..3]);
        assert!(messages.unfinished());
        assert_eq!(messages.end(), None);
    }

    #[test]
    fn test_a_bad_compressed_flag_is_refused() {
        let budget = Budget::new(1 << 20);
        // A flag gRPC does not define, inflating or not (tonic answered INTERNAL).
        for flag in [2, 0x80, 0xff] {
            for mut messages in [inflating(&budget, 1_000), Messages::new(None, 1_000)] {
                let (_, error) = feed(&mut messages, &framed(flag, b"message"), 2);
                let status = error.unwrap_or_else(|| panic!("flag {flag}: accepted"));
                assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
                assert!(status.message().contains(&format!("compressed flag is {flag}")), "{status:?}");
            }
        }
        // Marked compressed in a request that names no encoding.
        let (_, error) = feed(&mut Messages::new(None, 1_000), &framed(1, &gzip(b"message")), 3);
        let status = error.expect("a compressed message without grpc-encoding was accepted");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("names no grpc-encoding"), "{status:?}");
    }

    #[test]
    fn test_inflated_bytes_are_charged_until_the_body_ends() {
        let body = framed(1, &gzip(&[7; 900]));
        let budget = Budget::new(1_000);
        let mut holding = inflating(&budget, 10_000);
        assert_eq!(holding.push(Bytes::from(body.clone())).unwrap(), framed(0, &[7; 900]));
        let status = inflating(&budget, 10_000).push(Bytes::from(body.clone())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        holding.end();
        // Twice within a budget of 1 000: the first body's charge was released as it ended.
        for _ in 0..2 {
            let (out, error) = feed(&mut inflating(&budget, 10_000), &body, body.len());
            assert!(error.is_none(), "{error:?}");
            assert_eq!(out, framed(0, &[7; 900]));
        }
        // Beyond what is left of the budget: the retryable overload.
        let _held = budget.try_acquire(500).unwrap();
        let status = inflating(&budget, 10_000).push(Bytes::from(body)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("max_inflight_bytes"), "{status:?}");
    }
}
