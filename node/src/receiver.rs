//! OTLP receivers (SPEC §1.1): gRPC `MetricsService`/`LogsService` and OTLP/HTTP. They only
//! decode, take budget, and hand over to [`crate::ingest::Ingest`].

pub mod grpc;
pub mod http;
pub mod json;

use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use tollgate_rules::IngestReport;

/// The OTLP answer to a metrics export: `partial_success` only when points were rejected.
pub fn metrics_response(report: &IngestReport) -> ExportMetricsServiceResponse {
    let rejected = report.rejected_total();
    ExportMetricsServiceResponse {
        partial_success: (rejected > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: rejected as i64,
            error_message: report.error_message("data points"),
        }),
    }
}

/// The OTLP answer to a logs export: `partial_success` only when records were rejected.
pub fn logs_response(report: &IngestReport) -> ExportLogsServiceResponse {
    let rejected = report.rejected_total();
    ExportLogsServiceResponse {
        partial_success: (rejected > 0).then(|| ExportLogsPartialSuccess {
            rejected_log_records: rejected as i64,
            error_message: report.error_message("log records"),
        }),
    }
}
