//! [`TonicTransport`] against a real gRPC `Peer` server: exports forwarded while the calls to a
//! peer are all in flight go together in one `ForwardExports` call, each with its own outcome,
//! and a peer that predates `ForwardExports` gets them one `ForwardExport` call each.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tollgate_cluster::transport::{TonicTransport, Transport, TransportError};
use tollgate_proto::peer::peer_server::{Peer, PeerServer};
use tollgate_proto::peer::{
    AwaitConfigRequest, AwaitConfigResponse, ExportOutcome, ForwardExportRequest, ForwardExportsRequest,
    ForwardExportsResponse, ForwardRequest, ForwardResponse, HandOffChunk, HandOffRequest, IdentifyRequest,
    IdentifyResponse, JoinRequest, JoinResponse, LeaseRequest, LeaseResponse, QueryRequest, QueryResponse, RaftRequest,
    RaftResponse, WriteRequest, WriteResponse,
};
use tonic::{Request, Response, Status};

/// What the test peer saw: the exports of each call, by the name of the call.
#[derive(Debug, Default)]
struct Calls {
    single: Vec<String>,
    batches: Vec<Vec<String>>,
}

/// A peer that answers each export with its resources joined by `+` as the report, refuses an
/// export whose resource is `bad`, and holds its first `ForwardExport` call until `gate` opens.
#[derive(Clone)]
struct TestPeer {
    calls: Arc<Mutex<Calls>>,
    gate: Arc<Semaphore>,
    gated: Arc<Mutex<bool>>,
    /// Answers `ForwardExports` as a node that predates it.
    predates_batches: bool,
}

fn name(request: &ForwardExportRequest) -> String {
    request.resources.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect::<Vec<_>>().join("+")
}

fn answer(request: &ForwardExportRequest) -> Result<Vec<u8>, Status> {
    let name = name(request);
    if name == "bad" {
        return Err(Status::invalid_argument("resource bad does not decode"));
    }
    if name == "lapsed" {
        return Err(Status::unavailable("this node's lease on the vnodes it owns is lapsed"));
    }
    Ok(name.into_bytes())
}

#[tonic::async_trait]
impl Peer for TestPeer {
    async fn raft(&self, _: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        Err(Status::unimplemented("raft"))
    }
    async fn forward(&self, _: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        Err(Status::unimplemented("forward"))
    }
    async fn forward_export(
        &self,
        request: Request<ForwardExportRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let request = request.into_inner();
        self.calls.lock().unwrap().single.push(name(&request));
        let first = std::mem::replace(&mut *self.gated.lock().unwrap(), false);
        if first {
            let _ = self.gate.acquire().await.expect("gate");
        }
        Ok(Response::new(ForwardResponse { report: answer(&request)? }))
    }
    async fn forward_exports(
        &self,
        request: Request<ForwardExportsRequest>,
    ) -> Result<Response<ForwardExportsResponse>, Status> {
        if self.predates_batches {
            return Err(Status::unimplemented("unknown method ForwardExports"));
        }
        let exports = request.into_inner().exports;
        self.calls.lock().unwrap().batches.push(exports.iter().map(name).collect());
        let outcomes = exports.iter().map(|export| ExportOutcome::new(answer(export))).collect();
        Ok(Response::new(ForwardExportsResponse { outcomes }))
    }
    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Err(Status::unimplemented("query"))
    }
    type HandOffStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<HandOffChunk, Status>> + Send>>;
    async fn hand_off(&self, _: Request<HandOffRequest>) -> Result<Response<Self::HandOffStream>, Status> {
        Err(Status::unimplemented("hand_off"))
    }
    async fn write(&self, _: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        Err(Status::unimplemented("write"))
    }
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        Err(Status::unimplemented("join"))
    }
    async fn identify(&self, _: Request<IdentifyRequest>) -> Result<Response<IdentifyResponse>, Status> {
        Err(Status::unimplemented("identify"))
    }
    async fn await_config(&self, _: Request<AwaitConfigRequest>) -> Result<Response<AwaitConfigResponse>, Status> {
        Err(Status::unimplemented("await_config"))
    }
    async fn lease(&self, _: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        Err(Status::unimplemented("lease"))
    }
}

/// Serves a test peer on a free loopback port: its address, and what it saw.
async fn serve(predates_batches: bool) -> (String, Arc<Mutex<Calls>>, Arc<Semaphore>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = TestPeer {
        calls: Arc::default(),
        gate: Arc::new(Semaphore::new(0)),
        gated: Arc::new(Mutex::new(true)),
        predates_batches,
    };
    let (calls, gate) = (Arc::clone(&peer.calls), Arc::clone(&peer.gate));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerServer::new(peer))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, calls, gate)
}

fn export(resource: &str) -> ForwardExportRequest {
    ForwardExportRequest {
        map_epoch: 7,
        signal: 1,
        resources: vec![Bytes::from(resource.to_string())],
        ..Default::default()
    }
}

/// Forwards `first` (held by the peer), then the `others` while it is in flight; the outcomes
/// of the others, in order.
async fn forward_behind_a_held_call(
    transport: &TonicTransport,
    addr: &str,
    gate: &Semaphore,
    calls: &Mutex<Calls>,
    others: &[&str],
) -> Vec<Result<ForwardResponse, TransportError>> {
    let mut first = std::pin::pin!(transport.forward_export(addr, export("first")));
    // The first export's call reaches the peer, which holds it.
    while calls.lock().unwrap().single.is_empty() {
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut rest = std::pin::pin!(futures_util::future::join_all(
        others.iter().map(|resource| transport.forward_export(addr, export(resource)))
    ));
    // One poll queues every other export behind the call in flight.
    assert!(futures_util::poll!(rest.as_mut()).is_pending());
    gate.add_permits(1);
    assert_eq!(first.await.expect("first export").report, b"first");
    rest.await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_exports_waiting_for_the_call_in_flight_go_in_one_call_each_with_its_own_outcome() {
    let (addr, calls, gate) = serve(false).await;
    let transport = TonicTransport::new(None, Duration::from_secs(10), 64 << 20).with_forward_calls(1);
    let others = ["a", "b", "bad", "lapsed", "c"];
    let outcomes = forward_behind_a_held_call(&transport, &addr, &gate, &calls, &others).await;

    let calls = calls.lock().unwrap();
    assert_eq!(calls.single, ["first"]);
    assert_eq!(calls.batches, [["a", "b", "bad", "lapsed", "c"]], "the waiting exports, in order, in one call");
    for (resource, outcome) in others.iter().zip(&outcomes) {
        match (*resource, outcome) {
            ("bad", Err(TransportError::Refused { code, message, .. })) => {
                assert_eq!(code, "InvalidArgument");
                assert_eq!(message, "resource bad does not decode");
            }
            // The peer's own retryable refusal of one export of the call: a refusal, not an
            // unreachable peer (the call itself was answered).
            ("lapsed", Err(error @ TransportError::Refused { .. })) => {
                assert!(error.is_retryable(), "{error}");
                assert!(error.to_string().contains("refused: Unavailable: this node's lease"), "{error}");
            }
            ("bad" | "lapsed", other) => panic!("the {resource} export got {other:?}"),
            (resource, outcome) => {
                assert_eq!(outcome.as_ref().expect("a good export").report, resource.as_bytes())
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_peer_that_predates_forward_exports_gets_one_call_per_export() {
    let (addr, calls, gate) = serve(true).await;
    let transport = TonicTransport::new(None, Duration::from_secs(10), 64 << 20).with_forward_calls(1);
    let outcomes = forward_behind_a_held_call(&transport, &addr, &gate, &calls, &["a", "b", "c"]).await;

    let reports: Vec<Vec<u8>> = outcomes.into_iter().map(|outcome| outcome.expect("forwarded").report).collect();
    assert_eq!(reports, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    let calls = calls.lock().unwrap();
    assert!(calls.batches.is_empty());
    let mut single = calls.single.clone();
    single.sort();
    assert_eq!(single, ["a", "b", "c", "first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_export_goes_at_once_while_fewer_than_forward_calls_are_in_flight() {
    let (addr, calls, gate) = serve(false).await;
    // Two calls may be in flight: the first is held, the second export goes alone at once.
    let transport = TonicTransport::new(None, Duration::from_secs(10), 64 << 20).with_forward_calls(2);
    let mut first = std::pin::pin!(transport.forward_export(&addr, export("first")));
    while calls.lock().unwrap().single.is_empty() {
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = transport.forward_export(&addr, export("second")).await.expect("second export");
    assert_eq!(second.report, b"second");
    gate.add_permits(1);
    assert_eq!(first.await.expect("first export").report, b"first");
    let calls = calls.lock().unwrap();
    assert_eq!(calls.single, ["first", "second"]);
    assert!(calls.batches.is_empty());
}
