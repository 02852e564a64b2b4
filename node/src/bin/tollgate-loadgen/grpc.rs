//! OTLP/gRPC exports from pre-encoded request bodies.
//!
//! Each export is encoded once, before it is sent (by the generator, possibly long before), so
//! the load generator spends its share of the machine on HTTP/2 and not on protobuf encoding.
//! The bytes on the wire are exactly what prost encodes for the same request: a server cannot
//! tell the difference from the generated OTLP clients.

use bytes::{BufMut, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;
use std::marker::PhantomData;
use std::time::Duration;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Which OTLP service an export goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// `MetricsService/Export`.
    Metrics,
    /// `LogsService/Export`.
    Logs,
}

impl Signal {
    fn path(self) -> http::uri::PathAndQuery {
        http::uri::PathAndQuery::from_static(match self {
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        })
    }
}

/// Encodes an already encoded message (the bytes as they are), decodes the response with prost.
#[derive(Debug)]
struct PreEncodedCodec<R>(PhantomData<R>);

#[derive(Debug)]
struct PreEncodedEncoder;

#[derive(Debug)]
struct ProstResponseDecoder<R>(PhantomData<R>);

impl<R: Message + Default + Send + 'static> Codec for PreEncodedCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = PreEncodedEncoder;
    type Decoder = ProstResponseDecoder<R>;

    fn encoder(&mut self) -> PreEncodedEncoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> ProstResponseDecoder<R> {
        ProstResponseDecoder(PhantomData)
    }
}

impl Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<R: Message + Default> Decoder for ProstResponseDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src).map(Some).map_err(|e| Status::internal(format!("response does not decode: {e}")))
    }
}

/// Opens `connections` HTTP/2 connections to `target` (`http://host:port`).
pub async fn connect(target: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let endpoint = Endpoint::from_shared(target.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

/// Sends one export; on success, the number of items (points or records) the server said it
/// rejected in `partial_success`.
pub async fn export(channel: &Channel, signal: Signal, body: Bytes, gzip: bool) -> Result<u64, Status> {
    let mut client = tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(16 * 1024 * 1024);
    if gzip {
        client = client.send_compressed(CompressionEncoding::Gzip);
    }
    client.ready().await.map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    match signal {
        Signal::Metrics => {
            let response = client
                .unary(Request::new(body), signal.path(), PreEncodedCodec::<ExportMetricsServiceResponse>(PhantomData))
                .await?;
            Ok(response.into_inner().partial_success.map_or(0, |p| p.rejected_data_points.max(0) as u64))
        }
        Signal::Logs => {
            let response = client
                .unary(Request::new(body), signal.path(), PreEncodedCodec::<ExportLogsServiceResponse>(PhantomData))
                .await?;
            Ok(response.into_inner().partial_success.map_or(0, |p| p.rejected_log_records.max(0) as u64))
        }
    }
}

/// Whether an OTLP client retries after this status (OTLP spec: retryable codes).
pub fn retryable(status: &Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
            | Code::ResourceExhausted
    )
}
