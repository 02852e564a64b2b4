//! From a decoded export to durable merges: extraction (rules crate), grouping by vnode, routing
//! each group to its owner — the local owner actor, or the owning node over the cluster port —
//! and waiting for every owner's durable reply, merged into one report.
//!
//! A request is acknowledged only when every owner it touched replied with a durable write. Any
//! failure (full owner queue, unreachable owner, vnode moving, timeout, storage) fails the whole
//! request with a retryable error; the parts that were written are recognised as duplicates when
//! the client retries.

use crate::error::Error;
use crate::metrics as m;
use crate::owner::OwnerHandle;
use crate::runtime::RuntimeConfig;
use crate::wire::{self, WireLog};
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tollgate_cluster::transport::TransportError;
use tollgate_cluster::Cluster;
use tollgate_proto::otlp::tonic::resource::v1::Resource;
use tollgate_proto::peer::{ForwardExportRequest, ForwardRequest, ForwardResponse, Signal, VnodeBatch};
use tollgate_rules::decode::{self, DecodedMetrics};
use tollgate_rules::entity::Selection;
use tollgate_rules::series::FastMap;
use tollgate_rules::{
    extract_decoded_metrics, extract_encoded_logs, extract_logs, extract_metrics, CompiledRules, DropReason,
    ExtractedLog, ExtractedPoint, IngestReport, LogsBatch, MetricsBatch, RejectReason,
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
    cluster: Arc<Cluster>,
    vnodes: u16,
    request_timeout: Duration,
}

type Pending = BoxFuture<'static, Result<IngestReport, Error>>;

/// Where a vnode's data goes now.
enum Route {
    Local(OwnerHandle),
    Remote { addr: String, epoch: u64 },
}

impl Ingest {
    /// Routing over `owners` (one per vnode, in vnode order) and the cluster's vnode map.
    pub fn new(
        owners: Arc<Vec<OwnerHandle>>,
        config: watch::Receiver<Arc<RuntimeConfig>>,
        cluster: Arc<Cluster>,
        request_timeout: Duration,
    ) -> Ingest {
        let vnodes = owners.len() as u16;
        Ingest { owners, config, cluster, vnodes, request_timeout }
    }

    fn route(&self, vnode: u16) -> Result<Route, Error> {
        let applied = Arc::clone(&self.cluster.applied().borrow());
        let state = &applied.state;
        match state.vnodes.owner(vnode) {
            Some(owner) if owner == self.cluster.id => Ok(Route::Local(self.owners[vnode as usize].clone())),
            Some(owner) => match state.nodes.get(&owner) {
                Some(node) => Ok(Route::Remote { addr: node.cluster_addr.clone(), epoch: state.vnodes.epoch }),
                None => Err(Error::Unavailable(format!("the owner of vnode {vnode} is not a member; retry"))),
            },
            None if state.vnodes.is_empty() => {
                Err(Error::Unavailable("the cluster is not bootstrapped yet; retry".into()))
            }
            None => Err(Error::Unavailable(format!("vnode {vnode} is being handed over; retry"))),
        }
    }

    /// The versions of the configuration documents this node uses (pricing, rules).
    pub fn config_versions(&self) -> (u64, u64) {
        let config = self.config.borrow();
        (config.pricing.version(), config.rules.version)
    }

    /// Waits, at most `timeout`, until this node uses configuration documents at least as new
    /// as `pricing` and `rules`; returns the versions it uses then. When it uses them already,
    /// this returns at once (the timeout polls the wait first, and starts no timer when it is
    /// ready).
    pub async fn config_at_least(&self, pricing: u64, rules: u64, timeout: Duration) -> (u64, u64) {
        let mut config = self.config.clone();
        let newer = |c: &Arc<RuntimeConfig>| c.pricing.version() >= pricing && c.rules.version >= rules;
        let _ = tokio::time::timeout(timeout, config.wait_for(newer)).await;
        self.config_versions()
    }

    fn forward(&self, addr: String, mut request: ForwardRequest) -> Pending {
        (request.pricing_version, request.rules_version) = self.config_versions();
        let transport = Arc::clone(self.cluster.transport());
        async move {
            let started = Instant::now();
            let result = transport.forward(&addr, request).await;
            forwarded(&addr, started, result)
        }
        .boxed()
    }

    /// Merges an export; the report says what was rejected and why.
    pub async fn metrics(
        &self,
        request: ExportMetricsServiceRequest,
        protocol: &'static str,
    ) -> Result<IngestReport, Error> {
        let rules = Arc::clone(&self.config.borrow().rules);
        let routed = self.route_points(extract_metrics(request, &rules))?;
        metrics::counter!(m::POINTS_RECEIVED, "protocol" => protocol).increment(routed.received);
        self.finish(Signal::Metrics, routed.report, routed.pending, protocol).await
    }

    /// Merges an export whose resources are still encoded (the gRPC receiver's
    /// [`otlp_routing`](tollgate_proto::otlp_routing) view): only the resource of each is read
    /// here to find its owner; a resource another node owns is passed on as it came, decoded and
    /// extracted once, by its owner. The rest takes the path of [`Ingest::metrics`].
    pub async fn metrics_encoded(&self, resources: Vec<Bytes>, protocol: &'static str) -> Result<IngestReport, Error> {
        self.encoded(Signal::Metrics, resources, protocol).await
    }

    /// [`Ingest::metrics_encoded`] for logs: what is not passed on takes the path of
    /// [`Ingest::logs`].
    pub async fn logs_encoded(&self, resources: Vec<Bytes>, protocol: &'static str) -> Result<IngestReport, Error> {
        self.encoded(Signal::Logs, resources, protocol).await
    }

    async fn encoded(
        &self,
        signal: Signal,
        resources: Vec<Bytes>,
        protocol: &'static str,
    ) -> Result<IngestReport, Error> {
        let rules = Arc::clone(&self.config.borrow().rules);
        let split = self.split_encoded(resources, &rules, signal);
        let routed = self.route_encoded(signal, split.here, &rules)?;
        let received = if signal == Signal::Logs { m::LOGS_RECEIVED } else { m::POINTS_RECEIVED };
        metrics::counter!(received, "protocol" => protocol).increment(split.received + routed.received);
        let mut pending = routed.pending;
        pending
            .extend(split.remote.into_iter().map(|(addr, remote)| self.forward_export(signal, addr, remote, &rules)));
        self.finish(signal, routed.report, pending, protocol).await
    }

    /// Decodes encoded resources and routes their points or records: the path of
    /// [`Ingest::metrics`] and [`Ingest::logs`].
    fn route_encoded(&self, signal: Signal, resources: Vec<Bytes>, rules: &CompiledRules) -> Result<Routed, Error> {
        if signal == Signal::Logs {
            let batch = extract_encoded_logs(&resources, rules).map_err(malformed)?;
            self.route_log_batch(batch)
        } else {
            let resources = resources.into_iter().map(decode_resource_metrics).collect::<Result<_, _>>()?;
            self.route_points(extract_decoded_metrics(resources, rules))
        }
    }

    /// Sorts encoded resources into those to decode here and those to pass on, per owner node.
    /// Every resource of one vnode goes the same way (the first route found for the vnode is
    /// kept for the whole export), so its owner computes the same log-batch fingerprint as this
    /// node would, and a retry is recognised whichever node receives it.
    fn split_encoded(&self, resources: Vec<Bytes>, rules: &CompiledRules, signal: Signal) -> Split {
        let mut split = Split::default();
        let mut routes: FastMap<u16, Option<(String, u64)>> = FastMap::default();
        for resource in resources {
            let remote = self.vnode_of_resource(&resource, rules).and_then(|vnode| {
                let route = routes.entry(vnode).or_insert_with(|| match self.route(vnode) {
                    Ok(Route::Remote { addr, epoch }) => Some((addr, epoch)),
                    _ => None,
                });
                let (addr, epoch) = route.clone()?;
                let items = match signal {
                    Signal::Logs => wire::count_log_records(&resource),
                    _ => wire::count_data_points(&resource),
                };
                // A resource whose framing does not parse is decoded here, which reports it.
                Some((addr, epoch, items.ok()?))
            });
            match remote {
                Some((addr, epoch, items)) => {
                    split.received += items;
                    let remote = split.remote.entry(addr).or_insert_with(|| Remote { epoch, ..Remote::default() });
                    remote.resources.push(resource);
                    remote.items += items;
                }
                None => split.here.push(resource),
            }
        }
        split
    }

    /// The vnode of an encoded resource (metrics or logs: the resource is field 1 of both), when
    /// it is a gateway's with a service; `None` leaves it to the decoding path, which reports
    /// everything else exactly.
    fn vnode_of_resource(&self, resource: &[u8], rules: &CompiledRules) -> Option<u16> {
        let head = ResourceHead::decode(resource).ok()?;
        match rules.config.routing.select(head.resource.as_ref()) {
            Selection::Ours(entity) => Some(vnode_of(entity.partition_hash(), self.vnodes)),
            Selection::NotOurs | Selection::Rejected(_) => None,
        }
    }

    /// Items grouped by the vnode of their partition, in their order within each group.
    fn by_vnode<T>(&self, items: Vec<T>, partition: impl Fn(&T) -> u64) -> FastMap<u16, Vec<T>> {
        let mut groups: FastMap<u16, Vec<T>> = FastMap::default();
        for item in items {
            groups.entry(vnode_of(partition(&item), self.vnodes)).or_default().push(item);
        }
        groups
    }

    /// Extracts an export's points and sends each vnode's to its owner: the replies to wait for,
    /// and what extraction already rejected or dropped.
    fn route_points(&self, batch: MetricsBatch) -> Result<Routed, Error> {
        let received =
            batch.points.len() as u64 + batch.report.rejected_total() + batch.report.dropped.values().sum::<u64>();
        let groups = self.by_vnode(batch.points, |point| point.partition);
        let mut pending: Vec<Pending> = Vec::with_capacity(groups.len());
        let mut remote = RemoteBatches::default();
        for (vnode, points) in groups {
            match self.route(vnode)? {
                Route::Local(owner) => pending.push(submit_metrics(&owner, points)?),
                Route::Remote { addr, epoch } => {
                    metrics::counter!(m::FORWARDED_POINTS, "peer" => addr.clone()).increment(points.len() as u64);
                    let batch = VnodeBatch {
                        vnode: u32::from(vnode),
                        payload: wire::encode_points(&points),
                        batch_fingerprint: Vec::new(),
                    };
                    remote.add(addr, epoch, batch);
                }
            }
        }
        pending.extend(remote.into_requests(Signal::Metrics).map(|(addr, request)| self.forward(addr, request)));
        Ok(Routed { report: batch.report, received, pending })
    }

    /// Waits for every owner's reply to an export and counts the outcome.
    async fn finish(
        &self,
        signal: Signal,
        report: IngestReport,
        pending: Vec<Pending>,
        protocol: &'static str,
    ) -> Result<IngestReport, Error> {
        let report = self.gather(report, pending).await?;
        if signal == Signal::Logs {
            count_report(&report, protocol, m::LOGS_REJECTED, m::LOGS_DROPPED);
            metrics::counter!(m::LOG_RECORDS_DUPLICATE).increment(report.duplicates);
        } else {
            count_report(&report, protocol, m::POINTS_REJECTED, m::POINTS_DROPPED);
            metrics::counter!(m::POINTS_MERGED).increment(report.merged);
            metrics::counter!(m::POINTS_DUPLICATE).increment(report.duplicates);
        }
        Ok(report)
    }

    /// Passes encoded resources on to the node owning them. A node that predates
    /// `ForwardExport` refuses it as unimplemented: the resources are then extracted here and
    /// forwarded as points or records, as that node expects.
    fn forward_export(&self, signal: Signal, addr: String, remote: Remote, rules: &Arc<CompiledRules>) -> Pending {
        let this = self.clone();
        let rules = Arc::clone(rules);
        async move {
            let started = Instant::now();
            let Remote { epoch, resources, items } = remote;
            let (pricing_version, rules_version) = this.config_versions();
            let request = ForwardExportRequest {
                map_epoch: epoch,
                signal: signal as i32,
                resources: resources.clone(),
                pricing_version,
                rules_version,
            };
            let result = this.cluster.transport().forward_export(&addr, request).await;
            let predates = matches!(&result, Err(TransportError::Refused { code, .. }) if code == "Unimplemented");
            if signal == Signal::Metrics && !predates {
                metrics::counter!(m::FORWARDED_POINTS, "peer" => addr.clone()).increment(items);
            }
            match result {
                // Extracted here, the points are counted as forwarded by `route_points`.
                Err(_) if predates => {
                    let routed = this.route_encoded(signal, resources, &rules)?;
                    let mut report = routed.report;
                    for part in futures_util::future::join_all(routed.pending).await {
                        report.merge(&part?);
                    }
                    Ok(report)
                }
                // The owner could not decode what the client sent: the client's error, not to retry.
                Err(TransportError::Refused { code, message, .. }) if code == "InvalidArgument" => {
                    Err(Error::InvalidArgument(format!("found by the owner node {addr}: {message}")))
                }
                result => forwarded(&addr, started, result),
            }
        }
        .boxed()
    }

    /// Classifies, counts and keeps the records of an export.
    pub async fn logs(&self, request: ExportLogsServiceRequest, protocol: &'static str) -> Result<IngestReport, Error> {
        let rules = Arc::clone(&self.config.borrow().rules);
        let routed = self.route_logs(request, &rules)?;
        metrics::counter!(m::LOGS_RECEIVED, "protocol" => protocol).increment(routed.received);
        self.finish(Signal::Logs, routed.report, routed.pending, protocol).await
    }

    /// Extracts an export's log records and sends each vnode's to its owner, with the fingerprint
    /// of that slice of the export.
    fn route_logs(&self, request: ExportLogsServiceRequest, rules: &CompiledRules) -> Result<Routed, Error> {
        self.route_log_batch(extract_logs(request, rules))
    }

    /// [`Ingest::route_logs`] of extracted records.
    fn route_log_batch(&self, batch: LogsBatch) -> Result<Routed, Error> {
        let received =
            batch.records.len() as u64 + batch.report.rejected_total() + batch.report.dropped.values().sum::<u64>();
        let groups = self.by_vnode(batch.records, |record| record.partition);
        let mut pending: Vec<Pending> = Vec::with_capacity(groups.len());
        let mut remote = RemoteBatches::default();
        for (vnode, records) in groups {
            let fingerprint = batch_fingerprint(vnode, &records);
            match self.route(vnode)? {
                Route::Local(owner) => pending.push(submit_logs(&owner, records, fingerprint)?),
                Route::Remote { addr, epoch } => {
                    let wire: Vec<WireLog> = records.into_iter().map(WireLog::from).collect();
                    let batch = VnodeBatch {
                        vnode: u32::from(vnode),
                        payload: wire::encode(&wire),
                        batch_fingerprint: fingerprint.to_be_bytes().to_vec(),
                    };
                    remote.add(addr, epoch, batch);
                }
            }
        }
        pending.extend(remote.into_requests(Signal::Logs).map(|(addr, request)| self.forward(addr, request)));
        Ok(Routed { report: batch.report, received, pending })
    }

    /// Points forwarded to this node, per owner of the vnodes they belong to.
    pub async fn owner_metrics(&self, batches: Vec<(OwnerHandle, Vec<ExtractedPoint>)>) -> Result<IngestReport, Error> {
        let mut pending = Vec::with_capacity(batches.len());
        for (owner, points) in batches {
            pending.push(submit_metrics(&owner, points)?);
        }
        self.gather(IngestReport::default(), pending).await
    }

    /// Encoded resources forwarded to this node (`ForwardExport`): decoded, extracted and merged
    /// by the owners of their vnodes, which refuse (retryably) a vnode this node does not own.
    pub async fn owner_export(&self, signal: Signal, resources: Vec<Bytes>) -> Result<IngestReport, Error> {
        let rules = Arc::clone(&self.config.borrow().rules);
        let mut pending = Vec::new();
        let report = match signal {
            Signal::Logs => {
                let batch = extract_encoded_logs(&resources, &rules).map_err(malformed)?;
                let groups = self.by_vnode(batch.records, |record| record.partition);
                for (vnode, records) in groups {
                    let fingerprint = batch_fingerprint(vnode, &records);
                    pending.push(submit_logs(&self.owners[vnode as usize], records, fingerprint)?);
                }
                batch.report
            }
            _ => {
                let resources = resources.into_iter().map(decode_resource_metrics).collect::<Result<_, _>>()?;
                let batch = extract_decoded_metrics(resources, &rules);
                let groups = self.by_vnode(batch.points, |point| point.partition);
                for (vnode, points) in groups {
                    pending.push(submit_metrics(&self.owners[vnode as usize], points)?);
                }
                batch.report
            }
        };
        self.gather(report, pending).await
    }

    /// Log records forwarded to this node, per owner of the vnodes they belong to, each with the
    /// fingerprint of its slice of the export.
    pub async fn owner_logs(
        &self,
        batches: Vec<(OwnerHandle, Vec<ExtractedLog>, u128)>,
    ) -> Result<IngestReport, Error> {
        let mut pending = Vec::with_capacity(batches.len());
        for (owner, records, fingerprint) in batches {
            pending.push(submit_logs(&owner, records, fingerprint)?);
        }
        self.gather(IngestReport::default(), pending).await
    }

    async fn gather(&self, mut report: IngestReport, pending: Vec<Pending>) -> Result<IngestReport, Error> {
        let all = futures_util::future::join_all(pending);
        match tokio::time::timeout(self.request_timeout, all).await {
            Ok(parts) => {
                for part in parts {
                    report.merge(&part?);
                }
                Ok(report)
            }
            Err(_) => Err(Error::Unavailable(format!(
                "durable writes did not complete within {} ms; retry (merges are idempotent)",
                self.request_timeout.as_millis()
            ))),
        }
    }
}

/// Replies to wait for, what extraction rejected or dropped, and the items received, of one
/// export's points or records.
struct Routed {
    report: IngestReport,
    received: u64,
    pending: Vec<Pending>,
}

/// Only the resource (field 1) of an encoded OTLP `ResourceMetrics` or `ResourceLogs` (the rest
/// is skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceHead {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
}

/// Decodes one encoded `ResourceMetrics` (`tollgate_rules::decode`: prost's values, for less work,
/// the points' attributes as text).
fn decode_resource_metrics(bytes: Bytes) -> Result<DecodedMetrics, Error> {
    decode::resource_metrics(&bytes).map_err(malformed)
}

fn malformed(error: prost::DecodeError) -> Error {
    Error::InvalidArgument(format!("malformed protobuf request: {error}"))
}

/// An export's encoded resources: those to decode here, and those to pass on per owner node,
/// and the items of the latter.
#[derive(Default)]
struct Split {
    here: Vec<Bytes>,
    remote: FastMap<String, Remote>,
    received: u64,
}

/// The encoded resources of an export for one owner node.
#[derive(Default)]
struct Remote {
    /// The vnode map epoch they were routed with.
    epoch: u64,
    resources: Vec<Bytes>,
    /// Their points or records.
    items: u64,
}

/// A forward's outcome: the owner's report, or the error for the client.
fn forwarded(
    addr: &str,
    started: Instant,
    result: Result<ForwardResponse, TransportError>,
) -> Result<IngestReport, Error> {
    metrics::histogram!(m::FORWARD_SECONDS, "peer" => addr.to_string()).record(started.elapsed().as_secs_f64());
    let response = result.map_err(|error| {
        let reason = match &error {
            TransportError::Unreachable { .. } => "unreachable",
            TransportError::Refused { .. } => "refused",
            TransportError::Backpressure { .. } => "backpressure",
        };
        metrics::counter!(m::FORWARD_FAILURES, "peer" => addr.to_string(), "reason" => reason).increment(1);
        match error {
            TransportError::Backpressure { .. } => {
                Error::overloaded(format!("too much data in flight to {addr}; retry later"))
            }
            other => Error::Unavailable(format!("forwarding to the owner failed: {other}; retry")),
        }
    })?;
    wire::decode("forwarded report", &response.report).map_err(Error::Internal)
}

/// The remote parts of one export, gathered per owner node: one forward call each.
#[derive(Default)]
struct RemoteBatches {
    by_owner: FastMap<String, (u64, Vec<VnodeBatch>)>,
}

impl RemoteBatches {
    fn add(&mut self, addr: String, epoch: u64, batch: VnodeBatch) {
        self.by_owner.entry(addr).or_insert_with(|| (epoch, Vec::new())).1.push(batch);
    }

    fn into_requests(self, signal: Signal) -> impl Iterator<Item = (String, ForwardRequest)> {
        self.by_owner.into_iter().map(move |(addr, (map_epoch, batches))| {
            // The configuration versions are stamped as the request is sent.
            (addr, ForwardRequest { map_epoch, signal: signal as i32, batches, pricing_version: 0, rules_version: 0 })
        })
    }
}

fn submit_metrics(owner: &OwnerHandle, points: Vec<ExtractedPoint>) -> Result<Pending, Error> {
    let receiver = owner.submit_metrics(points)?;
    Ok(async move { receiver.await.map_err(|_| Error::Unavailable("an owner stopped before replying".into()))? }
        .boxed())
}

fn submit_logs(owner: &OwnerHandle, records: Vec<ExtractedLog>, fingerprint: u128) -> Result<Pending, Error> {
    let receiver = owner.submit_logs(records, fingerprint)?;
    Ok(async move { receiver.await.map_err(|_| Error::Unavailable("an owner stopped before replying".into()))? }
        .boxed())
}

/// The fingerprint of the records of one export that belong to one vnode: a retry of the same
/// export produces the same one, whichever node receives it (each hashes the records' entities
/// and their bytes as the client encoded them: forwarded exports keep them).
fn batch_fingerprint(vnode: u16, records: &[ExtractedLog]) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&vnode.to_be_bytes());
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for record in records {
        field(record.entity.service.as_bytes());
        // Not valid UTF-8, so no instance name is hashed like this.
        field(record.entity.instance.as_deref().map_or(&[0xff][..], str::as_bytes));
        field(record.record.bytes());
    }
    hasher.digest128()
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
