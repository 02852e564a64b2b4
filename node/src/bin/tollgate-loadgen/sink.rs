//! The no-op baseline: an OTLP/gRPC server built from the same crates and with the same server
//! settings as Tollgate's receiver (tonic 0.14, opentelemetry-proto's generated services, gzip
//! accepted, 16 MiB messages, the default multi-threaded tokio runtime). It decodes every export,
//! counts its points and records, and drops them, so a throughput ratio against it is what
//! Tollgate's own work (extraction, routing, merging, durable writes) costs.

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tollgate_rules::ingest::data_point_count;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

/// Tollgate's default `limits.max_request_bytes`.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// What the sink has seen.
#[derive(Debug, Default)]
pub struct Counts {
    /// Metric export requests.
    pub metric_requests: AtomicU64,
    /// Data points in them.
    pub points: AtomicU64,
    /// Log export requests.
    pub log_requests: AtomicU64,
    /// Log records in them.
    pub records: AtomicU64,
}

#[derive(Clone, Debug)]
struct Sink {
    counts: Arc<Counts>,
}

fn points_of(request: &ExportMetricsServiceRequest) -> u64 {
    let metrics = request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics);
    metrics.map(|metric| data_point_count(metric.data.as_ref()) as u64).sum()
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let request = request.into_inner();
        self.counts.metric_requests.fetch_add(1, Ordering::Relaxed);
        self.counts.points.fetch_add(points_of(&request), Ordering::Relaxed);
        drop(request);
        Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let request = request.into_inner();
        let records: usize =
            request.resource_logs.iter().flat_map(|r| r.scope_logs.iter()).map(|s| s.log_records.len()).sum();
        self.counts.log_requests.fetch_add(1, Ordering::Relaxed);
        self.counts.records.fetch_add(records as u64, Ordering::Relaxed);
        drop(request);
        Ok(Response::new(ExportLogsServiceResponse { partial_success: None }))
    }
}

/// Binds `address` and returns the bound address and the server future (runs until `shutdown`).
pub async fn bind(
    address: SocketAddr,
    counts: Arc<Counts>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = Result<(), tonic::transport::Error>>)> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let sink = Sink { counts };
    // The same settings as Tollgate's receiver (node/src/receiver/grpc.rs).
    let metrics = MetricsServiceServer::new(sink.clone())
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let logs = LogsServiceServer::new(sink)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let server = tonic::transport::Server::builder()
        .add_service(metrics)
        .add_service(logs)
        .serve_with_incoming_shutdown(tollgate::net::grpc_incoming(listener), shutdown);
    Ok((bound, server))
}
