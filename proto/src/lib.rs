//! Protocols: OTLP (re-exported from `opentelemetry-proto`) and Tollgate's node-to-node
//! protocol ([`peer`], from `proto/tollgate_peer.proto`).

pub use opentelemetry_proto as otlp;

/// Tollgate's node-to-node protocol.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod peer {
    tonic::include_proto!("tollgate.peer.v1");
}

/// The OTLP metrics service with each `ResourceMetrics` left encoded
/// (`proto/otlp_routing.proto`): what a node needs to route resources to their owners.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod otlp_routing {
    tonic::include_proto!("opentelemetry.proto.collector.metrics.v1");
}

/// The metadata key carrying the cluster secret.
pub const CLUSTER_SECRET_HEADER: &str = "x-tollgate-cluster-secret";
