//! Compiles Tollgate's node-to-node protocol and its routing view of the OTLP metrics and logs services
//! with protox (no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tollgate_peer.proto");
    println!("cargo:rerun-if-changed=proto/otlp_routing.proto");
    println!("cargo:rerun-if-changed=proto/otlp_routing_logs.proto");
    let descriptors = protox::compile(["proto/tollgate_peer.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".tollgate.peer.v1.ForwardExportRequest.resources")
        .codec_path("crate::codec::ReservingCodec")
        .compile_fds(descriptors)?;
    let descriptors = protox::compile(["proto/otlp_routing.proto", "proto/otlp_routing_logs.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        .extern_path(
            ".opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceResponse",
            "::opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse",
        )
        .extern_path(
            ".opentelemetry.proto.collector.metrics.v1.ExportMetricsPartialSuccess",
            "::opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess",
        )
        .extern_path(
            ".opentelemetry.proto.collector.logs.v1.ExportLogsServiceResponse",
            "::opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse",
        )
        .extern_path(
            ".opentelemetry.proto.collector.logs.v1.ExportLogsPartialSuccess",
            "::opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
