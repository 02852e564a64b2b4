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

impl peer::ExportOutcome {
    /// The outcome of one export of a `ForwardExports` call: the owner's encoded report, or the
    /// status `ForwardExport` would have answered.
    pub fn new(result: Result<Vec<u8>, tonic::Status>) -> peer::ExportOutcome {
        match result {
            Ok(report) => peer::ExportOutcome { code: 0, message: String::new(), report },
            Err(status) => peer::ExportOutcome {
                code: status.code() as i32,
                message: status.message().to_string(),
                report: Vec::new(),
            },
        }
    }

    /// The report, or the error's status.
    pub fn into_result(self) -> Result<Vec<u8>, tonic::Status> {
        match self.code {
            0 => Ok(self.report),
            code => Err(tonic::Status::new(code.into(), self.message)),
        }
    }
}

/// The metadata key carrying the cluster secret.
pub const CLUSTER_SECRET_HEADER: &str = "x-tollgate-cluster-secret";

/// gRPC metadata key of the cluster a calling node belongs to (`ClusterState::cluster_id`, in
/// decimal; absent while it belongs to none): a node of another cluster refuses the call.
pub const CLUSTER_ID_HEADER: &str = "x-tollgate-cluster-id";

/// Response header on every error answer of a node's peer service that carries its status in
/// the headers (trailers-only, as a handler's or the interceptor's refusal is): an `UNAVAILABLE`
/// status that carries it is the peer's own, retryable refusal (a lapsed lease, no quorum,
/// stopping); one without it came from the transport or from something in between (a proxy),
/// and the peer counts as unreachable.
pub const PEER_ANSWER_HEADER: &str = "x-tollgate-peer";
