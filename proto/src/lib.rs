//! Protocols: OTLP (re-exported from `opentelemetry-proto`) and Tollgate's node-to-node
//! protocol ([`peer`], from `proto/tollgate_peer.proto`).

pub use opentelemetry_proto as otlp;

pub mod codec;

/// Tollgate's node-to-node protocol.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod peer {
    tonic::include_proto!("tollgate.peer.v1");
}

/// The OTLP metrics and logs services with each resource left encoded
/// (`proto/otlp_routing.proto`, `proto/otlp_routing_logs.proto`): what a node needs to route
/// resources to their owners.
pub mod otlp_routing {
    /// `opentelemetry.proto.collector.metrics.v1`, each `ResourceMetrics` encoded.
    #[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
    pub mod metrics {
        tonic::include_proto!("opentelemetry.proto.collector.metrics.v1");
    }
    /// `opentelemetry.proto.collector.logs.v1`, each `ResourceLogs` encoded.
    #[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
    pub mod logs {
        tonic::include_proto!("opentelemetry.proto.collector.logs.v1");
    }
}

/// The metadata key carrying the cluster secret.
pub const CLUSTER_SECRET_HEADER: &str = "x-tollgate-cluster-secret";
