//! How nodes reach each other: the [`Transport`] trait over the `Peer` gRPC service, its tonic
//! implementation (with the cluster secret, deadlines and a bound on bytes in flight per peer),
//! and [`FaultyTransport`], a decorator that partitions, drops and delays calls for tests.

use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tollgate_proto::peer::peer_client::PeerClient;
use tollgate_proto::peer::{
    AwaitConfigRequest, AwaitConfigResponse, ForwardExportRequest, ForwardExportsRequest, ForwardRequest,
    ForwardResponse, HandOffChunk, HandOffRequest, IdentifyRequest, IdentifyResponse, JoinRequest, JoinResponse,
    LeaseRequest, LeaseResponse, QueryRequest, QueryResponse, RaftRequest, RaftResponse, WriteRequest, WriteResponse,
};
use tollgate_proto::{CLUSTER_ID_HEADER, CLUSTER_SECRET_HEADER, PEER_ANSWER_HEADER};
use tonic::transport::{Channel, Endpoint};

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a call to a peer failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached (connection refused, partition, deadline): retry later.
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("peer {addr} refused: {code}: {message}")]
    Refused {
        /// The peer.
        addr: String,
        /// gRPC status code.
        code: String,
        /// Its message.
        message: String,
    },
    /// Too many bytes are already in flight to this peer: back off.
    #[error("too much data in flight to peer {addr}")]
    Backpressure {
        /// The peer.
        addr: String,
    },
}

impl TransportError {
    /// True when retrying later may succeed (everything but a refusal that says otherwise).
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Refused { code, .. } => {
                matches!(code.as_str(), "Unavailable" | "ResourceExhausted" | "DeadlineExceeded" | "Aborted")
            }
            _ => true,
        }
    }
}

/// A stream of hand-off chunks.
pub type ChunkStream = Pin<Box<dyn futures_util::Stream<Item = Result<HandOffChunk, TransportError>> + Send>>;

/// Calls to other nodes, addressed by their cluster address (`HOST:PORT`).
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// A Raft RPC.
    fn raft(&self, addr: &str, request: RaftRequest) -> BoxFuture<'_, Result<RaftResponse, TransportError>>;
    /// Forwarded points or records of one export for one owner; the payloads' size counts
    /// against the in-flight bound of that peer.
    fn forward(&self, addr: &str, request: ForwardRequest) -> BoxFuture<'_, Result<ForwardResponse, TransportError>>;
    /// Whole resources of one export for one owner, which extracts them itself; their size
    /// counts against the same in-flight bound. A peer that predates the call refuses it with
    /// the code `Unimplemented`.
    fn forward_export(
        &self,
        addr: &str,
        request: ForwardExportRequest,
    ) -> BoxFuture<'_, Result<ForwardResponse, TransportError>>;
    /// A query for the peer's partial result.
    fn query(&self, addr: &str, request: QueryRequest) -> BoxFuture<'_, Result<QueryResponse, TransportError>>;
    /// A vnode's hand-off stream.
    fn hand_off(&self, addr: &str, request: HandOffRequest) -> BoxFuture<'_, Result<ChunkStream, TransportError>>;
    /// A write for the leader.
    fn write(&self, addr: &str, request: WriteRequest) -> BoxFuture<'_, Result<WriteResponse, TransportError>>;
    /// A join request.
    fn join(&self, addr: &str, request: JoinRequest) -> BoxFuture<'_, Result<JoinResponse, TransportError>>;
    /// The cluster this node belongs to, for its calls to say (0: none yet). A transport that
    /// says nothing leaves peers unable to tell a caller of another cluster.
    fn set_cluster_id(&self, _cluster_id: u64) {}
    /// Who answers at `addr`. A transport without it cannot tell (an in-process test cluster).
    fn identify(&self, addr: &str) -> BoxFuture<'_, Result<IdentifyResponse, TransportError>> {
        let error = unreachable(addr, "this transport cannot ask who answers");
        Box::pin(async move { Err(error) })
    }
    /// Waits until the peer uses configuration documents at least as new as asked (at most the
    /// request's `timeout_ms`), and says which it uses. A transport without it cannot ask.
    fn await_config(
        &self,
        addr: &str,
        _request: AwaitConfigRequest,
    ) -> BoxFuture<'_, Result<AwaitConfigResponse, TransportError>> {
        let error =
            status_error(addr, tonic::Status::unimplemented("this transport cannot wait for a peer's configuration"));
        Box::pin(async move { Err(error) })
    }
    /// Asks the leader at `addr` to renew this node's lease (the `Lease` RPC), waiting at most
    /// `timeout`. A transport without it cannot ask (nor can a node that predates it: both
    /// answer as unimplemented).
    fn lease(
        &self,
        addr: &str,
        _request: LeaseRequest,
        _timeout: Duration,
    ) -> BoxFuture<'_, Result<LeaseResponse, TransportError>> {
        let error = status_error(addr, tonic::Status::unimplemented("this transport cannot renew a lease"));
        Box::pin(async move { Err(error) })
    }
}

/// Deadline of calls that do real work on the peer: queries, joins (the leader waits until the
/// new node caught up), and the start of a hand-off.
pub const SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls that carried forwarded exports to a peer (`ForwardExport` or `ForwardExports`), by `peer`
/// (its cluster address): with the node's `tollgate_forward_seconds` count (one per export), the
/// exports per call.
pub const FORWARD_CALLS: &str = "tollgate_forward_calls_total";

/// Default of [`TonicTransport::with_forward_calls`]: export-forwarding calls in flight to one peer.
/// One call at a time gathers the most exports per call; on the cluster benchmark (figure 7 of
/// `docs/benchmarks.md`, about 7 exports per call; docs/benchmarks-history.md, step 26) it took
/// the least CPU of 1, 2, 4 and unbounded (one call per export), for about 1 ms more per forward.
pub const DEFAULT_FORWARD_CALLS: usize = 1;

/// Most exports in one `ForwardExports` call.
const MAX_EXPORTS_PER_CALL: usize = 256;

/// Most resource bytes in one `ForwardExports` call (an export larger than this goes alone).
const MAX_BYTES_PER_CALL: usize = 8 * 1024 * 1024;

/// The real transport: one lazily connected tonic channel per peer.
///
/// Exports forwarded to a peer ([`Transport::forward_export`]) share at most `forward_calls`
/// calls in flight to it: an export that comes while they are all in flight waits for one of them
/// to return, and the exports that waited meanwhile go together in one `ForwardExports` call. An
/// idle peer therefore gets each export at once, and a busy one fewer, larger calls (less
/// per-call work on both nodes: HTTP/2 streams and headers, task wake-ups, TCP segments).
#[derive(Debug)]
pub struct TonicTransport {
    credentials: Credentials,
    timeout: Duration,
    slow_timeout: Duration,
    max_forward_bytes: usize,
    forward_calls: usize,
    channels: Mutex<HashMap<String, Channel>>,
    inflight: Mutex<HashMap<String, Arc<Semaphore>>>,
    exports: Arc<Mutex<HashMap<String, ExportQueue>>>,
}

/// The exports waiting for a call to one peer, and that peer's calls in flight.
#[derive(Debug, Default)]
struct ExportQueue {
    waiting: Vec<WaitingExport>,
    calls: usize,
}

/// An export waiting for its call, and where its outcome goes.
#[derive(Debug)]
struct WaitingExport {
    request: ForwardExportRequest,
    bytes: usize,
    reply: oneshot::Sender<Result<ForwardResponse, TransportError>>,
}

impl TonicTransport {
    /// A transport with the cluster secret, a deadline per call, and a bound on forwarded bytes
    /// in flight per peer.
    pub fn new(secret: Option<String>, timeout: Duration, max_forward_bytes: usize) -> TonicTransport {
        TonicTransport {
            credentials: Credentials { secret, cluster_id: Arc::default() },
            timeout,
            slow_timeout: timeout.max(SLOW_CALL_TIMEOUT),
            max_forward_bytes: max_forward_bytes.clamp(1, u32::MAX as usize),
            forward_calls: DEFAULT_FORWARD_CALLS,
            channels: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            exports: Arc::default(),
        }
    }

    /// At most `calls` export-forwarding calls in flight to one peer (at least 1; see
    /// [`TonicTransport`]).
    pub fn with_forward_calls(mut self, calls: usize) -> TonicTransport {
        self.forward_calls = calls.max(1);
        self
    }

    fn client(&self, addr: &str) -> Result<PeerClient<Channel>, TransportError> {
        let channel = {
            let mut channels = self.channels.lock().expect("channels lock");
            match channels.get(addr) {
                Some(channel) => channel.clone(),
                None => {
                    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                        .map_err(|e| unreachable(addr, e))?
                        .connect_timeout(self.timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(10));
                    let channel = endpoint.connect_lazy();
                    channels.insert(addr.to_string(), channel.clone());
                    channel
                }
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }

    fn request<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        self.credentials.request(message, timeout)
    }

    fn semaphore(&self, addr: &str) -> Arc<Semaphore> {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        Arc::clone(inflight.entry(addr.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.max_forward_bytes))))
    }

    /// Charges `bytes` of forwarded data against the peer's in-flight bound until the permit drops.
    fn charge(&self, addr: &str, bytes: usize) -> Result<OwnedSemaphorePermit, TransportError> {
        let bytes = bytes.clamp(1, self.max_forward_bytes) as u32;
        self.semaphore(addr)
            .try_acquire_many_owned(bytes)
            .map_err(|_| TransportError::Backpressure { addr: addr.to_string() })
    }
}

/// What every call to a peer carries: the cluster secret, and the cluster this node belongs to
/// (a node of another cluster refuses the call, see `peer.rs`; 0 until this node knows it).
#[derive(Clone, Debug)]
struct Credentials {
    secret: Option<String>,
    cluster_id: Arc<AtomicU64>,
}

impl Credentials {
    /// `message` with a deadline and the credentials.
    fn request<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = self.stamp(tonic::Request::new(message));
        request.set_timeout(timeout);
        request
    }

    /// `request` with the credentials.
    fn stamp<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        if let Some(Ok(value)) = self.secret.as_deref().map(str::parse) {
            request.metadata_mut().insert(CLUSTER_SECRET_HEADER, value);
        }
        let cluster_id = self.cluster_id.load(Ordering::Relaxed);
        if cluster_id != 0 {
            request.metadata_mut().insert(CLUSTER_ID_HEADER, cluster_id.into());
        }
        request
    }
}

/// What an export-forwarding task needs to call one peer.
struct ExportCaller {
    addr: String,
    client: PeerClient<Channel>,
    credentials: Credentials,
    timeout: Duration,
    queues: Arc<Mutex<HashMap<String, ExportQueue>>>,
}

impl ExportCaller {
    /// Sends the peer's waiting exports, a call at a time, until none waits; then this call slot
    /// is free again.
    async fn run(mut self) {
        loop {
            let batch = {
                let mut queues = self.queues.lock().expect("export queues lock");
                let queue = queues.entry(self.addr.clone()).or_default();
                let batch = take_batch(&mut queue.waiting);
                if batch.is_empty() {
                    queue.calls -= 1;
                    return;
                }
                batch
            };
            self.send(batch).await;
        }
    }

    async fn send(&mut self, mut batch: Vec<WaitingExport>) {
        metrics::counter!(FORWARD_CALLS, "peer" => self.addr.clone()).increment(1);
        if batch.len() == 1 {
            let export = batch.pop().expect("one export");
            let result = self.one(export.request).await;
            let _ = export.reply.send(result);
            return;
        }
        let exports: Vec<ForwardExportRequest> = batch.iter().map(|export| export.request.clone()).collect();
        let request = self.credentials.request(ForwardExportsRequest { exports }, self.timeout);
        let result = within(&self.addr, self.timeout, self.client.forward_exports(request)).await;
        match result {
            Ok(response) if response.outcomes.len() == batch.len() => {
                for (export, outcome) in batch.into_iter().zip(response.outcomes) {
                    let result = outcome
                        .into_result()
                        .map(|report| ForwardResponse { report })
                        // The call was answered: each outcome is the peer's own.
                        .map_err(|status| refused(&self.addr, status));
                    let _ = export.reply.send(result);
                }
            }
            Ok(response) => {
                let error = TransportError::Refused {
                    addr: self.addr.clone(),
                    code: "Internal".into(),
                    message: format!("{} outcomes for {} exports", response.outcomes.len(), batch.len()),
                };
                for export in batch {
                    let _ = export.reply.send(Err(error.clone()));
                }
            }
            // A peer that predates `ForwardExports`: one `ForwardExport` call per export.
            Err(TransportError::Refused { code, .. }) if code == "Unimplemented" => {
                let addr = self.addr.clone();
                metrics::counter!(FORWARD_CALLS, "peer" => addr).increment(batch.len() as u64);
                let calls = batch.into_iter().map(|export| {
                    let mut caller = self.clone_client();
                    async move {
                        let result = caller.one(export.request).await;
                        let _ = export.reply.send(result);
                    }
                });
                futures_util::future::join_all(calls).await;
            }
            Err(error) => {
                for export in batch {
                    let _ = export.reply.send(Err(error.clone()));
                }
            }
        }
    }

    async fn one(&mut self, request: ForwardExportRequest) -> Result<ForwardResponse, TransportError> {
        let request = self.credentials.request(request, self.timeout);
        within(&self.addr, self.timeout, self.client.forward_export(request)).await
    }

    fn clone_client(&self) -> ExportCaller {
        ExportCaller {
            addr: self.addr.clone(),
            client: self.client.clone(),
            credentials: self.credentials.clone(),
            timeout: self.timeout,
            queues: Arc::clone(&self.queues),
        }
    }
}

/// The oldest waiting exports that fit in one call: at least one, then up to
/// [`MAX_EXPORTS_PER_CALL`] and [`MAX_BYTES_PER_CALL`]. Exports whose caller stopped waiting (its
/// deadline passed: its client was told to retry) are dropped, not sent.
fn take_batch(waiting: &mut Vec<WaitingExport>) -> Vec<WaitingExport> {
    waiting.retain(|export| !export.reply.is_closed());
    let mut bytes = 0;
    let mut count = 0;
    for export in waiting.iter() {
        if count == MAX_EXPORTS_PER_CALL || (count > 0 && bytes + export.bytes > MAX_BYTES_PER_CALL) {
            break;
        }
        bytes += export.bytes;
        count += 1;
    }
    let rest = waiting.split_off(count);
    std::mem::replace(waiting, rest)
}

/// A call that fails as unreachable when `timeout` passes (the peer may be hung, not gone).
async fn within<T>(
    addr: &str,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map(tonic::Response::into_inner).map_err(|s| status_error(addr, s)),
        Err(_) => Err(unreachable(addr, format!("no answer within {timeout:?}"))),
    }
}

fn unreachable(addr: &str, error: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable { addr: addr.to_string(), reason: error.to_string() }
}

fn status_error(addr: &str, status: tonic::Status) -> TransportError {
    let answered = status.metadata().contains_key(PEER_ANSWER_HEADER);
    match status.code() {
        // The peer itself answered: it is up, and refused (retryably) what was asked.
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded if answered => refused(addr, status),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
            unreachable(addr, status.message())
        }
        _ => refused(addr, status),
    }
}

fn refused(addr: &str, status: tonic::Status) -> TransportError {
    TransportError::Refused {
        addr: addr.to_string(),
        code: format!("{:?}", status.code()),
        message: status.message().to_string(),
    }
}

impl Transport for TonicTransport {
    fn set_cluster_id(&self, cluster_id: u64) {
        self.credentials.cluster_id.store(cluster_id, Ordering::Relaxed);
    }

    fn raft(&self, addr: &str, request: RaftRequest) -> BoxFuture<'_, Result<RaftResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            let timeout = self.timeout;
            within(&addr, timeout, client.raft(self.request(request, timeout))).await
        })
    }

    fn forward(&self, addr: &str, request: ForwardRequest) -> BoxFuture<'_, Result<ForwardResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let payload: usize = request.batches.iter().map(|batch| batch.payload.len()).sum();
            let _permit = self.charge(&addr, payload)?;
            let mut client = self.client(&addr)?;
            let timeout = self.timeout;
            within(&addr, timeout, client.forward(self.request(request, timeout))).await
        })
    }

    fn forward_export(
        &self,
        addr: &str,
        request: ForwardExportRequest,
    ) -> BoxFuture<'_, Result<ForwardResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let bytes: usize = request.resources.iter().map(|resource| resource.len()).sum();
            let _permit = self.charge(&addr, bytes)?;
            let client = self.client(&addr)?;
            let (reply, outcome) = oneshot::channel();
            let start = {
                let mut queues = self.exports.lock().expect("export queues lock");
                let queue = queues.entry(addr.clone()).or_default();
                queue.waiting.push(WaitingExport { request, bytes, reply });
                let start = queue.calls < self.forward_calls;
                if start {
                    queue.calls += 1;
                }
                start
            };
            if start {
                let caller = ExportCaller {
                    addr: addr.clone(),
                    client,
                    credentials: self.credentials.clone(),
                    timeout: self.timeout,
                    queues: Arc::clone(&self.exports),
                };
                tokio::spawn(caller.run());
            }
            // The export may first wait for the call in flight (up to one deadline), then has its
            // own. Should it wait longer (more exports waited than one call carries), its client is
            // told to retry, and the export is dropped from the queue unsent (`take_batch`).
            let deadline = self.timeout * 2;
            match tokio::time::timeout(deadline, outcome).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unreachable(&addr, "the forwarding call ended without an answer")),
                Err(_) => Err(unreachable(&addr, format!("no answer within {deadline:?}"))),
            }
        })
    }

    fn query(&self, addr: &str, request: QueryRequest) -> BoxFuture<'_, Result<QueryResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            let timeout = self.slow_timeout;
            within(&addr, timeout, client.query(self.request(request, timeout))).await
        })
    }

    fn hand_off(&self, addr: &str, request: HandOffRequest) -> BoxFuture<'_, Result<ChunkStream, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            // A hand-off can be long: no overall deadline, the stream's messages keep it alive.
            let call = self.credentials.stamp(tonic::Request::new(request));
            let stream = within(&addr, self.slow_timeout, client.hand_off(call)).await?;
            let mapped = stream.map(move |item| item.map_err(|s| status_error(&addr, s)));
            Ok(Box::pin(mapped) as ChunkStream)
        })
    }

    fn write(&self, addr: &str, request: WriteRequest) -> BoxFuture<'_, Result<WriteResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            let timeout = self.timeout * 3;
            within(&addr, timeout, client.write(self.request(request, timeout))).await
        })
    }

    fn join(&self, addr: &str, request: JoinRequest) -> BoxFuture<'_, Result<JoinResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            let timeout = self.slow_timeout;
            within(&addr, timeout, client.join(self.request(request, timeout))).await
        })
    }

    fn identify(&self, addr: &str) -> BoxFuture<'_, Result<IdentifyResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            within(&addr, self.timeout, client.identify(self.request(IdentifyRequest {}, self.timeout))).await
        })
    }

    fn await_config(
        &self,
        addr: &str,
        request: AwaitConfigRequest,
    ) -> BoxFuture<'_, Result<AwaitConfigResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            // The peer answers within the request's own bound; a peer that does not (paused, hung)
            // must not hold a configuration write much longer.
            let timeout = Duration::from_millis(u64::from(request.timeout_ms) + 250);
            within(&addr, timeout, client.await_config(self.request(request, timeout))).await
        })
    }

    fn lease(
        &self,
        addr: &str,
        request: LeaseRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<LeaseResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut client = self.client(&addr)?;
            within(&addr, timeout, client.lease(self.request(request, timeout))).await
        })
    }
}

/// Faults shared by the transports of an in-process test cluster.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    /// Addresses cut off from everyone else (both directions).
    isolated: BTreeSet<String>,
    /// One side of a partition: calls between it and the other addresses fail.
    side: BTreeSet<String>,
    /// Calls dropped (failing as unreachable) every `n`-th time, 0 for never.
    drop_every: u64,
    calls: u64,
    /// Forward calls per (from, to), whatever became of them.
    forwards: HashMap<(String, String), u64>,
    /// Added to every call.
    delay: Duration,
    /// Addresses and the RPCs they answer as a node that predates them.
    predating: BTreeSet<(String, &'static str)>,
    /// Raft calls to these addresses fail as unreachable (the other calls go through).
    raft_held: BTreeSet<String>,
    /// Added to Raft calls to these addresses.
    raft_delays: HashMap<String, Duration>,
}

impl Faults {
    /// No faults.
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Cuts `addr` off: calls from it and to it fail as unreachable.
    pub fn isolate(&self, addr: &str) {
        self.state.lock().expect("faults lock").isolated.insert(addr.to_string());
    }

    /// Splits the cluster in two: calls between `side` and every other address fail as
    /// unreachable (each side still reaches itself).
    pub fn partition(&self, side: &[&str]) {
        self.state.lock().expect("faults lock").side = side.iter().map(|a| a.to_string()).collect();
    }

    /// `addr` answers `Lease` as a node that predates it (unimplemented), until
    /// [`Faults::heal_all`].
    pub fn predate_lease(&self, addr: &str) {
        self.state.lock().expect("faults lock").predating.insert((addr.to_string(), "Lease"));
    }

    /// Reconnects `addr`.
    pub fn heal(&self, addr: &str) {
        self.state.lock().expect("faults lock").isolated.remove(addr);
    }

    /// Reconnects everything and removes drops, delays and predating nodes.
    pub fn heal_all(&self) {
        let mut state = self.state.lock().expect("faults lock");
        state.isolated.clear();
        state.side.clear();
        state.predating.clear();
        state.raft_held.clear();
        state.raft_delays.clear();
        state.drop_every = 0;
        state.delay = Duration::ZERO;
    }

    /// Fails every `n`-th call (0: never).
    pub fn drop_every(&self, n: u64) {
        self.state.lock().expect("faults lock").drop_every = n;
    }

    /// Delays every call.
    pub fn delay(&self, delay: Duration) {
        self.state.lock().expect("faults lock").delay = delay;
    }

    /// Raft calls to `addr` fail as unreachable (`None`), or are delayed, until
    /// [`Faults::heal_all`]: the node there falls behind the cluster's log while its other
    /// calls go through.
    pub fn slow_raft_to(&self, addr: &str, delay: Option<Duration>) {
        let mut state = self.state.lock().expect("faults lock");
        match delay {
            None => {
                state.raft_held.insert(addr.to_string());
            }
            Some(delay) => {
                state.raft_delays.insert(addr.to_string(), delay);
            }
        }
    }

    /// The delay of a Raft call to `to`, or its failure.
    fn check_raft(&self, to: &str) -> Result<Duration, TransportError> {
        let state = self.state.lock().expect("faults lock");
        if state.raft_held.contains(to) {
            return Err(unreachable(to, "raft calls held"));
        }
        Ok(state.raft_delays.get(to).copied().unwrap_or_default())
    }

    /// Makes the node at `addr` answer `ForwardExport` as a node that predates it does (a gRPC
    /// `UNIMPLEMENTED`), as during a rolling upgrade.
    pub fn predate_forward_export(&self, addr: &str) {
        self.state.lock().expect("faults lock").predating.insert((addr.to_string(), "ForwardExport"));
    }

    /// A call of `method` to `to` answered as a node that predates the RPC answers it (a gRPC
    /// `UNIMPLEMENTED`), when [`Faults::predate_forward_export`] or [`Faults::predate_lease`]
    /// said so.
    fn predates(&self, to: &str, method: &'static str) -> Result<(), TransportError> {
        if self.state.lock().expect("faults lock").predating.contains(&(to.to_string(), method)) {
            return Err(status_error(to, tonic::Status::unimplemented(format!("unknown method {method}"))));
        }
        Ok(())
    }

    /// Forward calls (`Forward` and `ForwardExport`) made from `from` to `to` so far.
    pub fn forward_calls(&self, from: &str, to: &str) -> u64 {
        let state = self.state.lock().expect("faults lock");
        state.forwards.get(&(from.to_string(), to.to_string())).copied().unwrap_or(0)
    }

    fn count_forward(&self, from: &str, to: &str) {
        let mut state = self.state.lock().expect("faults lock");
        *state.forwards.entry((from.to_string(), to.to_string())).or_default() += 1;
    }

    fn check(&self, from: &str, to: &str) -> Result<Duration, TransportError> {
        let mut state = self.state.lock().expect("faults lock");
        state.calls += 1;
        let split = !state.side.is_empty() && state.side.contains(from) != state.side.contains(to);
        if split || state.isolated.contains(from) || state.isolated.contains(to) {
            return Err(unreachable(to, format!("partitioned from {from}")));
        }
        if state.drop_every > 0 && state.calls.is_multiple_of(state.drop_every) {
            return Err(unreachable(to, "dropped"));
        }
        Ok(state.delay)
    }
}

/// A transport that applies [`Faults`] before delegating to another transport.
#[derive(Debug)]
pub struct FaultyTransport {
    from: String,
    inner: Arc<dyn Transport>,
    faults: Arc<Faults>,
}

impl FaultyTransport {
    /// Calls from `from` (a cluster address) through `inner`, subject to `faults`.
    pub fn new(from: &str, inner: Arc<dyn Transport>, faults: Arc<Faults>) -> FaultyTransport {
        FaultyTransport { from: from.to_string(), inner, faults }
    }

    async fn gate(&self, to: &str) -> Result<(), TransportError> {
        let delay = self.faults.check(&self.from, to)?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

impl Transport for FaultyTransport {
    fn set_cluster_id(&self, cluster_id: u64) {
        self.inner.set_cluster_id(cluster_id);
    }

    fn raft(&self, addr: &str, request: RaftRequest) -> BoxFuture<'_, Result<RaftResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            let delay = self.faults.check_raft(&addr)?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.inner.raft(&addr, request).await
        })
    }

    fn forward(&self, addr: &str, request: ForwardRequest) -> BoxFuture<'_, Result<ForwardResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.faults.count_forward(&self.from, &addr);
            self.gate(&addr).await?;
            self.inner.forward(&addr, request).await
        })
    }

    fn forward_export(
        &self,
        addr: &str,
        request: ForwardExportRequest,
    ) -> BoxFuture<'_, Result<ForwardResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.faults.count_forward(&self.from, &addr);
            self.gate(&addr).await?;
            self.faults.predates(&addr, "ForwardExport")?;
            self.inner.forward_export(&addr, request).await
        })
    }

    fn query(&self, addr: &str, request: QueryRequest) -> BoxFuture<'_, Result<QueryResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.inner.query(&addr, request).await
        })
    }

    fn hand_off(&self, addr: &str, request: HandOffRequest) -> BoxFuture<'_, Result<ChunkStream, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.inner.hand_off(&addr, request).await
        })
    }

    fn write(&self, addr: &str, request: WriteRequest) -> BoxFuture<'_, Result<WriteResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.inner.write(&addr, request).await
        })
    }

    fn join(&self, addr: &str, request: JoinRequest) -> BoxFuture<'_, Result<JoinResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.inner.join(&addr, request).await
        })
    }

    fn identify(&self, addr: &str) -> BoxFuture<'_, Result<IdentifyResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.inner.identify(&addr).await
        })
    }

    fn await_config(
        &self,
        addr: &str,
        request: AwaitConfigRequest,
    ) -> BoxFuture<'_, Result<AwaitConfigResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.inner.await_config(&addr, request).await
        })
    }

    fn lease(
        &self,
        addr: &str,
        request: LeaseRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<LeaseResponse, TransportError>> {
        let addr = addr.to_string();
        Box::pin(async move {
            self.gate(&addr).await?;
            self.faults.predates(&addr, "Lease")?;
            self.inner.lease(&addr, request, timeout).await
        })
    }
}
