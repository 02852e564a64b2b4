//! OTLP receivers (SPEC §1.1): gRPC `MetricsService`/`LogsService` and OTLP/HTTP. They only
//! decode, take budget, and hand over to [`crate::ingest::Ingest`].

pub mod grpc;
pub mod http;
pub mod json;

use crate::budget::BudgetPermit;
use crate::error::Error;
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use std::io::Read;
use tollgate_rules::IngestReport;

/// Inflates a gzip body of at most `limit` bytes inflated, charging them to `permit` as they come.
/// Every member of the gzip stream is read (RFC 1952 §2.2: a file is a series of members; `cat
/// a.gz b.gz` is one), and bytes after the last one are an error: reading only the first member
/// (what a plain gzip decoder, and tonic's, does) acknowledged the others' data without merging it.
pub(crate) fn gunzip(wire: &[u8], limit: usize, permit: &mut BudgetPermit) -> Result<Vec<u8>, Error> {
    let mut decoded = Vec::new();
    let mut reader = flate2::read::MultiGzDecoder::new(wire);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = reader.read(&mut chunk).map_err(|e| Error::InvalidArgument(format!("invalid gzip body: {e}")))?;
        if read == 0 {
            return Ok(decoded);
        }
        if decoded.len() + read > limit {
            return Err(Error::TooLarge(format!(
                "request body exceeds limits.max_request_bytes ({limit} bytes) once inflated"
            )));
        }
        permit.grow(read)?;
        decoded.extend_from_slice(&chunk[..read]);
    }
}

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
