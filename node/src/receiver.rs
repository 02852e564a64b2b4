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

/// Inflates a gzip body onto the end of `out`, at most `limit` bytes, charging them to `permit`
/// as they come. Every member of the gzip stream is read (RFC 1952 §2.2: a file is a series of
/// members; `cat a.gz b.gz` is one), and bytes after the last one are an error: reading only the
/// first member (what a plain gzip decoder, and tonic's, does) acknowledged the others' data
/// without merging it.
pub(crate) fn gunzip(wire: &[u8], limit: usize, permit: &mut BudgetPermit, out: &mut Vec<u8>) -> Result<(), Error> {
    let start = out.len();
    let mut reader = flate2::read::MultiGzDecoder::new(wire);
    loop {
        let inflated = out.len() - start;
        // Room for the next read, growing with what came (one byte past the limit shows it passed).
        let room = inflated.max(wire.len()).clamp(4096, 1 << 20).min(limit + 1 - inflated);
        out.resize(start + inflated + room, 0);
        let read = reader.read(&mut out[start + inflated..]);
        out.truncate(start + inflated + *read.as_ref().unwrap_or(&0));
        let read = read.map_err(|e| Error::InvalidArgument(format!("invalid gzip body: {e}")))?;
        if read == 0 {
            return Ok(());
        }
        if inflated + read > limit {
            return Err(Error::TooLarge(format!(
                "request body exceeds limits.max_request_bytes ({limit} bytes) once inflated"
            )));
        }
        permit.grow(read)?;
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
