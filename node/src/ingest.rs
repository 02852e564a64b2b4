//! From a decoded export to durable merges: extraction (rules crate), grouping by vnode,
//! submission to the owners, waiting for every owner's durable reply, one merged report.
//!
//! A request is acknowledged only when every owner it touched replied with a durable write. Any
//! failure (full owner queue, timeout, storage) fails the whole request with a retryable error;
//! the parts that were written are recognised as duplicates when the client retries.

use crate::error::Error;
use crate::metrics as m;
use crate::owner::OwnerHandle;
use crate::runtime::RuntimeConfig;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tollgate_rules::series::FastMap;
use tollgate_rules::{
    extract_logs, extract_metrics, DropReason, ExtractedLog, ExtractedPoint, IngestReport, RejectReason,
};

/// The vnode of a partition.
pub fn vnode_of(partition: u64, vnodes: u16) -> u16 {
    (partition % u64::from(vnodes)) as u16
}

/// Routes extracted data to owners.
#[derive(Clone, Debug)]
pub struct Ingest {
    owners: Arc<Vec<OwnerHandle>>,
    config: watch::Receiver<Arc<RuntimeConfig>>,
    vnodes: u16,
    request_timeout: Duration,
}

type Pending = oneshot::Receiver<Result<IngestReport, Error>>;

impl Ingest {
    /// Routing over `owners` (one per vnode, in vnode order).
    pub fn new(
        owners: Arc<Vec<OwnerHandle>>,
        config: watch::Receiver<Arc<RuntimeConfig>>,
        request_timeout: Duration,
    ) -> Ingest {
        let vnodes = owners.len() as u16;
        Ingest { owners, config, vnodes, request_timeout }
    }

    /// Merges an export; the report says what was rejected and why.
    pub async fn metrics(
        &self,
        request: ExportMetricsServiceRequest,
        protocol: &'static str,
    ) -> Result<IngestReport, Error> {
        let rules = Arc::clone(&self.config.borrow().rules);
        let batch = extract_metrics(request, &rules);
        let received =
            batch.points.len() as u64 + batch.report.rejected_total() + batch.report.dropped.values().sum::<u64>();
        metrics::counter!(m::POINTS_RECEIVED, "protocol" => protocol).increment(received);
        let mut groups: FastMap<u16, Vec<ExtractedPoint>> = FastMap::default();
        for point in batch.points {
            groups.entry(vnode_of(point.partition, self.vnodes)).or_default().push(point);
        }
        let mut pending = Vec::with_capacity(groups.len());
        for (vnode, points) in groups {
            pending.push(self.owners[vnode as usize].submit_metrics(points)?);
        }
        let report = self.gather(batch.report, pending).await?;
        count_report(&report, protocol, m::POINTS_REJECTED, m::POINTS_DROPPED);
        metrics::counter!(m::POINTS_MERGED).increment(report.merged);
        metrics::counter!(m::POINTS_DUPLICATE).increment(report.duplicates);
        Ok(report)
    }

    /// Classifies, counts and keeps the records of an export.
    pub async fn logs(&self, request: ExportLogsServiceRequest, protocol: &'static str) -> Result<IngestReport, Error> {
        let rules = Arc::clone(&self.config.borrow().rules);
        let batch = extract_logs(request, &rules);
        let received =
            batch.records.len() as u64 + batch.report.rejected_total() + batch.report.dropped.values().sum::<u64>();
        metrics::counter!(m::LOGS_RECEIVED, "protocol" => protocol).increment(received);
        let mut groups: FastMap<u16, Vec<ExtractedLog>> = FastMap::default();
        for record in batch.records {
            groups.entry(vnode_of(record.partition, self.vnodes)).or_default().push(record);
        }
        let mut pending = Vec::with_capacity(groups.len());
        for (vnode, records) in groups {
            let fingerprint = batch_fingerprint(vnode, &records);
            pending.push(self.owners[vnode as usize].submit_logs(records, fingerprint)?);
        }
        let report = self.gather(batch.report, pending).await?;
        count_report(&report, protocol, m::LOGS_REJECTED, m::LOGS_DROPPED);
        Ok(report)
    }

    async fn gather(&self, mut report: IngestReport, pending: Vec<Pending>) -> Result<IngestReport, Error> {
        let all = async {
            for receiver in pending {
                let part =
                    receiver.await.map_err(|_| Error::Unavailable("an owner stopped before replying".into()))??;
                report.merge(&part);
            }
            Ok::<_, Error>(report)
        };
        match tokio::time::timeout(self.request_timeout, all).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "durable writes did not complete within {} ms; retry (merges are idempotent)",
                self.request_timeout.as_millis()
            ))),
        }
    }
}

/// The fingerprint of the records of one export that belong to one vnode: a retry of the same
/// export produces the same one.
fn batch_fingerprint(vnode: u16, records: &[ExtractedLog]) -> u128 {
    let mut bytes = Vec::with_capacity(2 + records.len() * 16);
    bytes.extend_from_slice(&vnode.to_be_bytes());
    for record in records {
        bytes.extend_from_slice(&record.fingerprint.to_be_bytes());
    }
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

fn count_report(report: &IngestReport, protocol: &'static str, rejected: &'static str, dropped: &'static str) {
    for (reason, count) in &report.rejected {
        let reason: &'static str = RejectReason::as_str(*reason);
        metrics::counter!(rejected, "reason" => reason, "protocol" => protocol).increment(*count);
    }
    for (reason, count) in &report.dropped {
        let reason: &'static str = DropReason::as_str(*reason);
        metrics::counter!(dropped, "reason" => reason).increment(*count);
    }
}
