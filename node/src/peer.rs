//! The node-to-node service (port 11900, `proto/tollgate_peer.proto`): Raft RPCs, forwarded data
//! for the vnodes this node owns, fan-out queries, vnode hand-overs, writes and joins for the
//! leader. Every call must carry the cluster secret when one is configured.

use crate::error::Error;
use crate::ingest::Ingest;
use crate::metrics as m;
use crate::owner::OwnerHandle;
use crate::query::{LogQuery, QueryEngine};
use crate::store::Storage;
use crate::wire::{self, WireLog};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_cluster::raft_store::AppliedState;
use tollgate_cluster::{Cluster, ClusterError, VnodeState};
use tollgate_proto::peer::peer_server::{Peer, PeerServer};
use tollgate_proto::peer::{
    AwaitConfigRequest, AwaitConfigResponse, ExportOutcome, ForwardExportRequest, ForwardExportsRequest,
    ForwardExportsResponse, ForwardRequest, ForwardResponse, HandOffChunk, HandOffRequest, IdentifyRequest,
    IdentifyResponse, JoinRequest, JoinResponse, LeaseRequest, LeaseResponse, QueryKind, QueryRequest, QueryResponse,
    RaftRequest, RaftResponse, Signal, WriteRequest, WriteResponse,
};
use tollgate_proto::{CLUSTER_ID_HEADER, CLUSTER_SECRET_HEADER, PEER_ANSWER_HEADER};
use tollgate_rules::{ExtractedLog, IngestReport, MetricQuery};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

/// What the peer service needs from the node.
#[derive(Clone, Debug)]
pub struct PeerService {
    cluster: Arc<Cluster>,
    ingest: Ingest,
    owners: Arc<Vec<OwnerHandle>>,
    query: QueryEngine,
    store: Arc<dyn Storage>,
    /// True once the node is stopping: calls that wait for the applied state give up at once
    /// (the state they wait for may never come: the node is about to close this port).
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl PeerService {
    /// The service.
    pub fn new(
        cluster: Arc<Cluster>,
        ingest: Ingest,
        owners: Arc<Vec<OwnerHandle>>,
        query: QueryEngine,
        store: Arc<dyn Storage>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> PeerService {
        PeerService { cluster, ingest, owners, query, store, stopping }
    }

    /// Merges the resources of one forwarded export (`ForwardExport`, or one of `ForwardExports`).
    async fn owner_export(&self, request: ForwardExportRequest) -> Result<IngestReport, Status> {
        let signal = match Signal::try_from(request.signal) {
            Ok(signal @ (Signal::Metrics | Signal::Logs)) => signal,
            _ => return Err(invalid(format!("unknown signal {}", request.signal))),
        };
        self.fence(request.pricing_version, request.rules_version).await?;
        Ok(self.ingest.owner_export(signal, request.resources).await?)
    }

    /// Forwarded data is merged with configuration documents at least as new as the ones its
    /// sender used: this node waits for them a while (it was paused, or restarted, while they
    /// were committed, and catches up) and else refuses the data with a retryable error.
    async fn fence(&self, pricing: u64, rules: u64) -> Result<(), Status> {
        // At once, without a timer, when this node uses them already (`config_at_least`).
        let timeout = self.cluster.settings().election_timeout * 2;
        let (used_pricing, used_rules) = self.ingest.config_at_least(pricing, rules, timeout).await;
        if used_pricing >= pricing && used_rules >= rules {
            return Ok(());
        }
        Err(Status::unavailable(format!(
            "this node uses pricing version {used_pricing} and rules version {used_rules}, older than the sending \
             node's ({pricing}, {rules}), and did not catch up within {timeout:?}; retry"
        )))
    }

    /// The owner actor of a vnode named in a request.
    fn owner(&self, vnode: u32) -> Result<OwnerHandle, Status> {
        usize::try_from(vnode)
            .ok()
            .and_then(|index| self.owners.get(index))
            .cloned()
            .ok_or_else(|| invalid(format!("vnode {vnode} out of range")))
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

fn cluster_status(error: ClusterError) -> Status {
    match error {
        ClusterError::NoQuorum(message) => Status::unavailable(message),
        ClusterError::Refused(message) => Status::failed_precondition(message),
        ClusterError::Failed(message) => Status::internal(message),
    }
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<HandOffChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, request: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        Ok(Response::new(self.cluster.serve_raft(request.into_inner()).await))
    }

    async fn forward(&self, request: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        let request = request.into_inner();
        let signal = Signal::try_from(request.signal).unwrap_or(Signal::Unspecified);
        if signal == Signal::Unspecified {
            return Err(invalid(format!("unknown signal {}", request.signal)));
        }
        self.fence(request.pricing_version, request.rules_version).await?;
        let mut seen = std::collections::HashSet::with_capacity(request.batches.len());
        let mut points = Vec::new();
        let mut logs = Vec::new();
        for batch in request.batches {
            let owner = self.owner(batch.vnode)?;
            if !seen.insert(batch.vnode) {
                return Err(invalid(format!("vnode {} appears twice in one forward", batch.vnode)));
            }
            if signal == Signal::Metrics {
                points.push((owner, wire::decode_points(&batch.payload).map_err(invalid)?));
            } else {
                let wire: Vec<WireLog> = wire::decode("log records", &batch.payload).map_err(invalid)?;
                let records: Vec<ExtractedLog> =
                    wire.into_iter().map(WireLog::into_extracted).collect::<Result<_, _>>().map_err(invalid)?;
                let fingerprint: [u8; 16] =
                    batch.batch_fingerprint.as_slice().try_into().map_err(|_| invalid("batch fingerprint".into()))?;
                logs.push((owner, records, u128::from_be_bytes(fingerprint)));
            }
        }
        let report = if signal == Signal::Metrics {
            self.ingest.owner_metrics(points).await?
        } else {
            self.ingest.owner_logs(logs).await?
        };
        Ok(Response::new(ForwardResponse { report: wire::encode(&report) }))
    }

    async fn forward_export(
        &self,
        request: Request<ForwardExportRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let report = self.owner_export(request.into_inner()).await?;
        Ok(Response::new(ForwardResponse { report: wire::encode(&report) }))
    }

    async fn forward_exports(
        &self,
        request: Request<ForwardExportsRequest>,
    ) -> Result<Response<ForwardExportsResponse>, Status> {
        // One task per export: their decoding spreads over the runtime's threads instead of
        // running one after the other in this call's poll.
        let tasks: Vec<_> = request
            .into_inner()
            .exports
            .into_iter()
            .map(|export| {
                let this = self.clone();
                tokio::spawn(async move { this.owner_export(export).await })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            let result = task.await.unwrap_or_else(|error| Err(Status::internal(format!("an export failed: {error}"))));
            outcomes.push(ExportOutcome::new(result.map(|report| wire::encode(&report))));
        }
        Ok(Response::new(ForwardExportsResponse { outcomes }))
    }

    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        let request = request.into_inner();
        if let Some(error) = tollgate_cluster::network::misaddressed(self.cluster.id, request.target) {
            return Err(Status::failed_precondition(error));
        }
        let engine = self.query.clone();
        let holders = request.holders;
        let payload = match QueryKind::try_from(request.kind).unwrap_or(QueryKind::Unspecified) {
            QueryKind::Metric => {
                let query: MetricQuery = wire::decode_json("metric query", &request.payload).map_err(invalid)?;
                crate::query::check_time("start", query.start, query.start)?;
                crate::query::check_time("end", query.end, query.end)?;
                let partial = self.query.run(move || engine.partial_held(&query, &holders)).await?;
                wire::encode(&partial)
            }
            QueryKind::Logs => {
                let query: LogQuery = wire::decode("log query", &request.payload).map_err(invalid)?;
                // An asker that predates byte-bounded pages merges by count only: it gets whole
                // pages, as it did.
                let max_bytes = usize::try_from(request.max_page_bytes).ok().filter(|b| *b > 0).unwrap_or(usize::MAX);
                let page = self.query.run(move || engine.logs_held(&query, &holders, max_bytes)).await?;
                wire::encode(&page)
            }
            QueryKind::Entities => {
                let entities = self.query.run(move || engine.entities_held(&holders)).await?;
                wire::encode(&entities)
            }
            QueryKind::Unspecified => return Err(invalid(format!("unknown query kind {}", request.kind))),
        };
        Ok(Response::new(QueryResponse { payload }))
    }

    type HandOffStream = ChunkStream;

    async fn hand_off(&self, request: Request<HandOffRequest>) -> Result<Response<ChunkStream>, Status> {
        let request = request.into_inner();
        if request.drain {
            return self.drain().await;
        }
        let owner = self.owner(request.vnode)?;
        let vnode = owner.vnode;
        // Only once this node applied the move does its owner refuse new data for the vnode; then
        // everything it accepted is made durable, and the store holds the whole state.
        // A vnode this node neither has nor is getting was handed over already (a late or repeated
        // request), or its move was undone: refused as soon as that is so, since waiting would not
        // change it.
        let me = self.cluster.id;
        let ready = move |a: &AppliedState| hand_over_ready(a.state.vnodes.vnodes.get(vnode as usize), me);
        if ready(&self.cluster.applied().borrow()) == Some(false)
            || !self.applied_within(|a| ready(a).is_some()).await
            || ready(&self.cluster.applied().borrow()) != Some(true)
        {
            metrics::counter!(m::VNODE_MOVE_FAILURES, "direction" => "out", "kind" => "state").increment(1);
            self.refuse_if_stopping()?;
            let now = self.cluster.applied().borrow().state.vnodes.vnodes.get(vnode as usize).cloned();
            let now = now.map_or_else(|| "unknown".into(), |s| format!("{s:?}"));
            return Err(Status::failed_precondition(format!("vnode {vnode} is not moving away from this node: {now}")));
        }
        owner.release().await?;
        let store = Arc::clone(&self.store);
        let stream = export_stream(move |send| {
            let mut sent = 0usize;
            store.export_vnode(vnode, &mut |entries| {
                sent += entries.len();
                send(entries, 0)
            })?;
            metrics::counter!(m::VNODE_MOVES, "direction" => "out", "kind" => "state").increment(1);
            debug!(vnode, entries = sent, "handed a vnode over");
            Ok(())
        });
        Ok(Response::new(stream))
    }

    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        self.cluster.handle_write(request.into_inner()).await.map(Response::new).map_err(cluster_status)
    }

    async fn identify(&self, _request: Request<IdentifyRequest>) -> Result<Response<IdentifyResponse>, Status> {
        Ok(Response::new(IdentifyResponse { node_id: self.cluster.id, name: self.cluster.me.name.clone() }))
    }

    async fn await_config(
        &self,
        request: Request<AwaitConfigRequest>,
    ) -> Result<Response<AwaitConfigResponse>, Status> {
        let request = request.into_inner();
        // Bounded whatever the caller asks: a call waits for moments, not for an outage.
        let timeout = Duration::from_millis(u64::from(request.timeout_ms)).min(Duration::from_secs(10));
        let (pricing_version, rules_version) =
            self.ingest.config_at_least(request.pricing_version, request.rules_version, timeout).await;
        Ok(Response::new(AwaitConfigResponse { pricing_version, rules_version }))
    }

    async fn lease(&self, request: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        self.cluster.handle_lease(request.into_inner()).map(Response::new).map_err(cluster_status)
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let request = request.into_inner();
        info!(node = request.node_id, name = %request.name, addr = %request.cluster_addr, "join request");
        self.cluster.handle_join(request).await.map(Response::new).map_err(cluster_status)
    }
}

/// Whether this node (`me`) can hand a vnode in `state` over: `Some(true)` once it applied the
/// vnode's move away from it, `Some(false)` when the vnode is neither its own nor coming to it
/// (the move is over, or was undone: waiting would not change that), `None` while the move may
/// still come (the vnode is still its own, or still coming to it).
fn hand_over_ready(state: Option<&VnodeState>, me: u64) -> Option<bool> {
    match state {
        Some(VnodeState::Moving { from, .. }) if *from == me => Some(true),
        Some(VnodeState::Active { owner }) if *owner == me => None,
        Some(VnodeState::Moving { to, .. }) if *to == me => None,
        _ => Some(false),
    }
}

impl PeerService {
    /// A retryable refusal when the node is stopping.
    fn refuse_if_stopping(&self) -> Result<(), Status> {
        if *self.stopping.borrow() {
            return Err(Status::unavailable("this node is stopping; retry once it is back"));
        }
        Ok(())
    }

    /// Waits (a while) until this node applied a state satisfying `ready`; false on timeout, and
    /// at once when the node is stopping.
    async fn applied_within(&self, ready: impl Fn(&Arc<AppliedState>) -> bool) -> bool {
        let mut stopping = self.stopping.clone();
        let applied = self.cluster.applied();
        tokio::select! {
            applied = tollgate_cluster::runtime::wait_applied(&applied, Duration::from_secs(30), ready) => applied,
            _ = stopping.wait_for(|stopping| *stopping) => false,
        }
    }

    /// Everything this leaving node holds, for the member draining it: every minute rolled up
    /// first, then its own data and the data it holds for departed nodes, each tagged with whose
    /// it is.
    async fn drain(&self) -> Result<Response<ChunkStream>, Status> {
        let me = self.cluster.id;
        if !self.applied_within(move |a| a.state.draining.contains_key(&me)).await {
            metrics::counter!(m::VNODE_MOVE_FAILURES, "direction" => "out", "kind" => "drain").increment(1);
            self.refuse_if_stopping()?;
            return Err(Status::failed_precondition("this node is not being drained"));
        }
        for owner in self.owners.iter() {
            owner.roll_up_all().await?;
        }
        let holders = self.cluster.state().held_by_member(me);
        let mut sources = vec![(me, Arc::clone(&self.store))];
        for holder in holders {
            sources.push((holder, self.store.held(holder)?));
        }
        let stream = export_stream(move |send| {
            for (holder, store) in sources {
                let mut sent = 0usize;
                store.export_all(&mut |entries| {
                    sent += entries.len();
                    send(entries, holder)
                })?;
                info!(holder, entries = sent, "drained data");
            }
            metrics::counter!(m::VNODE_MOVES, "direction" => "out", "kind" => "drain").increment(1);
            Ok(())
        });
        Ok(Response::new(stream))
    }
}

/// Runs a blocking export that hands chunks (entries, holder) to `send`, as a stream of chunks;
/// a failure ends the stream with an error.
fn export_stream(
    export: impl FnOnce(&mut dyn FnMut(Vec<(Vec<u8>, Vec<u8>)>, u64) -> Result<(), Error>) -> Result<(), Error>
        + Send
        + 'static,
) -> ChunkStream {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<HandOffChunk, Status>>(4);
    tokio::task::spawn_blocking(move || {
        let mut send = |entries: Vec<(Vec<u8>, Vec<u8>)>, holder: u64| {
            let (keys, values) = entries.into_iter().unzip();
            sender
                .blocking_send(Ok(HandOffChunk { keys, values, holder }))
                .map_err(|_| Error::Unavailable("the receiving node went away".into()))
        };
        if let Err(error) = export(&mut send) {
            warn!(%error, "hand-over failed");
            let _ = sender.blocking_send(Err(Status::from(error)));
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}

/// The HTTP/2 frame size this server accepts, and so the size of the frames peers send it. With
/// h2's default (16 KiB), a sender writes each frame of a call with its own system call, because
/// its connection holds one pending data frame at a time: a forwarding call of a few hundred KiB
/// took about a dozen writes. With 1 MiB, such a call is one frame, and the largest call a peer
/// sends (8 MiB, `tollgate_cluster::transport`) eight. A receiver buffers at most one frame per
/// connection.
const PEER_MAX_FRAME_BYTES: u32 = 1 << 20;

/// Streams a peer may reset before this node accepted them (see [`serve`]).
const PEER_MAX_PENDING_RESETS: usize = 4096;

/// Serves the peer service on `listener` until `shutdown` resolves. Calls without the secret
/// (when one is configured) are refused as unauthenticated; calls from a node of another cluster
/// than this node's, as failed preconditions.
pub async fn serve(
    listener: TcpListener,
    service: PeerService,
    secret: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "cluster port listening");
    }
    let applied = service.cluster.applied();
    let check = move |request: Request<()>| -> Result<Request<()>, Status> {
        if let Some(expected) = &secret {
            let given = request.metadata().get(CLUSTER_SECRET_HEADER).and_then(|v| v.to_str().ok());
            if !given.is_some_and(|given| crate::api::constant_time_eq(given.as_bytes(), expected.as_bytes())) {
                return Err(Status::unauthenticated(
                    "missing or wrong cluster secret: every node of a cluster needs the same cluster_secret",
                ));
            }
        }
        let caller = request.metadata().get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match (caller, applied.borrow().state.cluster_id) {
            (Some(caller), Some(ours)) if caller != ours => Err(Status::failed_precondition(format!(
                "this node belongs to cluster {ours}, the caller to cluster {caller}: a node joins another cluster \
                 only with an empty data directory"
            ))),
            _ => Ok(request),
        }
    };
    let server = tonic::service::interceptor::InterceptedService::new(
        PeerServer::new(service)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024),
        check,
    );
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(mark_answer::<tonic::body::Body>))
        .max_frame_size(PEER_MAX_FRAME_BYTES)
        // A node that was paused (a stalled VM, CPU throttling) finds on resuming every call its
        // peers cancelled meanwhile (heartbeats, four a second, time out after the RPC timeout);
        // past hyper's default of 20 it dropped the connection, and with it the calls that were
        // about to be answered (vnode hand-overs failed and started again).
        .http2_max_pending_accept_reset_streams(Some(PEER_MAX_PENDING_RESETS))
        .add_service(server)
        .serve_with_incoming_shutdown(crate::net::grpc_incoming(listener), shutdown)
        .await
}

/// Marks an error answer as this service's own ([`PEER_ANSWER_HEADER`]): a caller tells this
/// node's retryable refusals from a node it cannot reach. Only trailers-only answers (an error
/// status in the headers) are marked: tonic hands the headers of an answer whose body then failed
/// (a connection lost mid-answer) to the caller's error, which must stay unreachable.
fn mark_answer<B>(mut response: http::Response<B>) -> http::Response<B> {
    if response.headers().contains_key("grpc-status") {
        response.headers_mut().insert(PEER_ANSWER_HEADER, http::HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_hand_over_waits_only_while_the_move_may_still_come() {
        let (me, other, third) = (1, 2, 3);
        let ready = |state: VnodeState| hand_over_ready(Some(&state), me);
        assert_eq!(ready(VnodeState::Moving { from: me, to: other }), Some(true), "the move is applied here");
        assert_eq!(ready(VnodeState::Active { owner: me }), None, "the move is not applied here yet");
        assert_eq!(ready(VnodeState::Moving { from: other, to: me }), None, "still coming here");
        assert_eq!(ready(VnodeState::Active { owner: other }), Some(false), "handed over already");
        assert_eq!(ready(VnodeState::Moving { from: other, to: third }), Some(false), "moving elsewhere");
        assert_eq!(hand_over_ready(None, me), Some(false), "no such vnode");
    }
}
