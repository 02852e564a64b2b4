//! Three nodes in one process whose node-to-node calls go through a [`FaultyTransport`]: dropped,
//! delayed and partitioned forwarding fails the client's export with a retryable error, never
//! loses or doubles what was acknowledged, and results are exact once the client's retries got
//! through.

mod common;

use bytes::Bytes;
use common::{fleet_export, fleet_tokens, now_seconds, pod_export};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use prost::Message;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::ingest::vnode_of;
use tollgate::wire::count_data_points;
use tollgate::{Node, NodeConfig, SystemClock};
use tollgate_cluster::transport::{Faults, FaultyTransport, TonicTransport, Transport, TransportError};
use tollgate_proto::otlp_routing::metrics::metrics_service_client::MetricsServiceClient as RoutingClient;
use tollgate_proto::otlp_routing::metrics::ExportMetricsServiceRequest as RoutingRequest;
use tollgate_proto::peer::{ForwardExportRequest, Signal};
use tollgate_rules::entity::partition_hash;
use tollgate_rules::testing::{gateway_resource, sampling_cases, Convention};

const PODS: u64 = 12;
const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    nodes: Vec<Node>,
    faults: Arc<Faults>,
    _dirs: Vec<tempfile::TempDir>,
}

fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Starts a node whose cluster port is known before it starts (the faulty transport is named by
/// it): a free port is picked, released and bound again, so another test may take it in between;
/// then a new one is picked.
async fn start_node(name: &str, dir: &std::path::Path, join: Option<String>, faults: &Arc<Faults>) -> Node {
    for _ in 0..5 {
        match try_start_node(name, dir, join.clone(), faults).await {
            Err(tollgate::Error::Unavailable(reason)) if reason.contains("Address already in use") => continue,
            started => return started.expect("node starts"),
        }
    }
    panic!("no free cluster port for {name} in five tries");
}

async fn try_start_node(
    name: &str,
    dir: &std::path::Path,
    join: Option<String>,
    faults: &Arc<Faults>,
) -> Result<Node, tollgate::Error> {
    let cluster_addr = free_address();
    let mut config = NodeConfig { node_id: Some(name.into()), data_dir: dir.to_path_buf(), ..NodeConfig::default() };
    config.otlp_grpc_addrs = vec!["127.0.0.1:0".parse().unwrap()];
    config.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    config.http_addr = "127.0.0.1:0".parse().unwrap();
    config.cluster_addr = cluster_addr;
    config.join = join.into_iter().collect();
    config.cluster.vnodes = 16;
    config.cluster.heartbeat_interval_ms = 100;
    config.cluster.election_timeout_ms = 600;
    config.cluster.rpc_timeout_ms = 2_000;
    let inner: Arc<dyn Transport> = Arc::new(TonicTransport::new(None, Duration::from_secs(2), 64 << 20));
    let transport = Arc::new(FaultyTransport::new(&cluster_addr.to_string(), inner, Arc::clone(faults)));
    Node::start_with_transport(config, Arc::new(SystemClock), Some(transport)).await
}

impl Cluster {
    async fn start() -> Cluster {
        let faults = Faults::new();
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let first = start_node("f1", dirs[0].path(), None, &faults).await;
        let seed = first.endpoints.cluster.to_string();
        let mut nodes = vec![first];
        for (i, dir) in dirs.iter().enumerate().skip(1) {
            nodes.push(start_node(&format!("f{}", i + 1), dir.path(), Some(seed.clone()), &faults).await);
        }
        let cluster = Cluster { nodes, faults, _dirs: dirs };
        cluster.wait_balanced().await;
        cluster
    }

    async fn wait_balanced(&self) {
        let started = Instant::now();
        loop {
            let settled = self.nodes.iter().all(|node| {
                let state = node.cluster().state();
                let counts = state.vnodes.counts(&state.nodes.keys().copied().collect());
                state.nodes.len() == 3
                    && state.vnodes.vnodes.iter().all(|v| v.owner().is_some())
                    && counts.values().all(|c| (5..=6).contains(c))
            });
            if settled {
                return;
            }
            assert!(started.elapsed() < WAIT, "the cluster did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn grpc(&self, index: usize) -> String {
        format!("http://{}", self.nodes[index].endpoints.otlp_grpc[0])
    }

    async fn shutdown(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

/// Sends export `k` to `endpoint` until it is acknowledged; returns the refusals, which must all
/// be retryable.
async fn send_until_acknowledged(endpoint: &str, service: &str, base: u64, k: u64) -> Vec<tonic::Status> {
    export_until_acknowledged(endpoint, &fleet_export(service, base, k, PODS).0, &format!("export {k}")).await
}

/// Sends `request` to `endpoint` until it is acknowledged; returns the refusals, which must all
/// be retryable. `what` names the request in failures.
async fn export_until_acknowledged(
    endpoint: &str,
    request: &ExportMetricsServiceRequest,
    what: &str,
) -> Vec<tonic::Status> {
    let mut refusals = Vec::new();
    let started = Instant::now();
    loop {
        let mut client = MetricsServiceClient::connect(endpoint.to_string()).await.expect("connect");
        match client.export(request.clone()).await {
            Ok(response) => {
                assert!(response.into_inner().partial_success.is_none());
                return refusals;
            }
            Err(status) => {
                assert!(
                    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted),
                    "{what}: not retryable: {status:?}"
                );
                refusals.push(status);
                assert!(started.elapsed() < WAIT, "{what} never acknowledged");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn total(node: &Node, metric: &str, service: &str, start: u64, end: u64) -> f64 {
    let url = format!(
        "http://{}/api/v1/metrics/{metric}?service={service}&start={start}&end={end}&step=minute",
        node.endpoints.http
    );
    let response = reqwest::get(&url).await.expect("api");
    assert!(response.headers().get("x-tollgate-missing-nodes").is_none(), "a member did not answer");
    let body: Value = response.json().await.unwrap();
    body["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p[1].as_f64())
        .sum()
}

async fn assert_exact(node: &Node, service: &str, base: u64, exports: u64) {
    let expected: u64 = (0..exports).map(|k| fleet_export(service, base, k, PODS).1).sum();
    let (start, end) = (base - 120, base + exports + 120);
    assert_eq!(total(node, "meter_envoy_ai_gw_request_cpm", service, start, end).await, expected as f64);
    assert_eq!(
        total(node, "meter_envoy_ai_gw_input_token_rate", service, start, end).await,
        fleet_tokens(exports, PODS) as f64
    );
}

/// The owner node (its cluster address) and vnode of each of `service`'s pods `0..pods` that
/// `receiver` does not own.
fn remote_pods(receiver: &Node, service: &str, pods: u64) -> Vec<(u64, String, u16)> {
    let state = receiver.cluster().state();
    let me = receiver.cluster().id;
    (0..pods)
        .filter_map(|pod| {
            let vnode = vnode_of(pod_partition(service, pod), state.vnodes.vnodes.len() as u16);
            let owner = state.vnodes.owner(vnode).expect("balanced: every vnode has an owner");
            (owner != me).then(|| (pod, state.nodes[&owner].cluster_addr.clone(), vnode))
        })
        .collect()
}

/// The vnodes of `service`'s pods that `receiver` does not own, per owner node.
fn remote_vnodes(receiver: &Node, service: &str) -> BTreeMap<String, BTreeSet<u16>> {
    let mut remote: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for (_, owner, vnode) in remote_pods(receiver, service, PODS) {
        remote.entry(owner).or_default().insert(vnode);
    }
    remote
}

/// A service name (`<prefix>-<n>-gw`) whose pods land on both nodes other than `receiver`.
fn service_on_both_others(receiver: &Node, prefix: &str) -> String {
    (0..100)
        .map(|n| format!("{prefix}-{n}-gw"))
        .find(|service| remote_vnodes(receiver, service).len() == 2)
        .expect("some service name spreads its pods over both other nodes")
}

/// The data points of exports `ks` of `service` that `receiver` does not own.
fn remote_points(receiver: &Node, service: &str, base: u64, ks: std::ops::Range<u64>) -> u64 {
    let state = receiver.cluster().state();
    let vnodes = state.vnodes.vnodes.len() as u16;
    let remote =
        |pod: u64| state.vnodes.owner(vnode_of(pod_partition(service, pod), vnodes)) != Some(receiver.cluster().id);
    ks.flat_map(|k| (0..PODS).filter(|pod| remote(*pod)).map(move |pod| (k, pod)))
        .map(|(k, pod)| count_data_points(&pod_export(service, base, k, pod).0.encode_to_vec()).expect("parses"))
        .sum()
}

/// A node's `/metrics` text.
async fn self_metrics(node: &Node) -> String {
    reqwest::get(format!("http://{}/metrics", node.endpoints.http)).await.unwrap().text().await.unwrap()
}

/// `tollgate_forwarded_points_total` of the first node towards the other two (their addresses
/// are this cluster's own: forwards of other tests in this process do not show).
async fn forwarded_points(cluster: &Cluster) -> f64 {
    let text = self_metrics(&cluster.nodes[0]).await;
    let peers: Vec<String> =
        cluster.nodes[1..].iter().map(|node| format!(r#"peer="{}""#, node.endpoints.cluster)).collect();
    text.lines()
        .filter(|line| line.starts_with("tollgate_forwarded_points_total{"))
        .filter(|line| peers.iter().any(|peer| line.contains(peer.as_str())))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn pod_partition(service: &str, pod: u64) -> u64 {
    partition_hash(service, Some(&format!("pod-{pod}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_an_export_is_forwarded_in_one_call_per_owner_node() {
    const SERVICE: &str = "batched-gw";
    let cluster = Cluster::start().await;
    let receiver = &cluster.nodes[0];
    let from = receiver.endpoints.cluster.to_string();
    let remote = remote_vnodes(receiver, SERVICE);
    assert!(
        remote.values().any(|vnodes| vnodes.len() > 1),
        "the export must hold several vnodes of one owner for this test to mean anything: {remote:?}"
    );

    let base = now_seconds() - 120;
    assert!(send_until_acknowledged(&cluster.grpc(0), SERVICE, base, 0).await.is_empty());
    for node in &cluster.nodes[1..] {
        let to = node.endpoints.cluster.to_string();
        let expected = u64::from(remote.contains_key(&to));
        assert_eq!(
            cluster.faults.forward_calls(&from, &to),
            expected,
            "forward calls to {to}; remote vnodes {remote:?}"
        );
    }
    for node in &cluster.nodes {
        assert_exact(node, SERVICE, base, 1).await;
    }
    cluster.shutdown().await;
}

/// The `SETTINGS_MAX_FRAME_SIZE` an HTTP/2 server at `addr` announces in its first SETTINGS
/// frame (16 384, the protocol's default, when it announces none).
async fn advertised_max_frame_size(addr: &str) -> u32 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The client preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.expect("the server's first frame");
    assert_eq!(head[3], 4, "the server's preface starts with a SETTINGS frame: {head:?}");
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.unwrap();
    payload
        .chunks_exact(6)
        .find(|setting| u16::from_be_bytes([setting[0], setting[1]]) == 5)
        .map(|setting| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
        .unwrap_or(16_384)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_forwarding_call_larger_than_a_frame_arrives_whole() {
    // The peer port takes HTTP/2 frames of up to 1 MiB (`node/src/peer.rs`), so that a
    // forwarding call is written in few frames; the part of this export for each owner is
    // larger, so its call is sent in several.
    const SERVICE: &str = "large-gw";
    const LARGE_PODS: u64 = 2_500;
    let cluster = Cluster::start().await;
    let receiver = &cluster.nodes[0];
    let from = receiver.endpoints.cluster.to_string();
    let base = now_seconds() - 120;
    let (request, requests) = fleet_export(SERVICE, base, 0, LARGE_PODS);
    let mut bytes_per_owner: BTreeMap<String, usize> = BTreeMap::new();
    for (pod, owner, _) in remote_pods(receiver, SERVICE, LARGE_PODS) {
        *bytes_per_owner.entry(owner).or_default() += request.resource_metrics[pod as usize].encoded_len();
    }
    assert_eq!(bytes_per_owner.len(), 2, "both other nodes own some of the pods: {bytes_per_owner:?}");
    for node in &cluster.nodes {
        assert_eq!(advertised_max_frame_size(&node.endpoints.cluster.to_string()).await, 1 << 20);
    }
    assert!(
        bytes_per_owner.values().all(|bytes| *bytes > 1 << 20),
        "each owner's part must be larger than one frame for this test to mean anything: {bytes_per_owner:?}"
    );

    // A slow owner (a debug build merging 10 000 new series) may time the call out: retryable
    // (and only that way: nothing here fills a queue), and the retry is recognised.
    let refusals = export_until_acknowledged(&cluster.grpc(0), &request, "the large export").await;
    assert!(refusals.iter().all(|status| status.code() == tonic::Code::Unavailable), "{refusals:?}");
    for node in &cluster.nodes[1..] {
        assert!(cluster.faults.forward_calls(&from, &node.endpoints.cluster.to_string()) >= 1);
    }
    let (start, end) = (base - 120, base + 120);
    for node in &cluster.nodes {
        assert_eq!(total(node, "meter_envoy_ai_gw_request_cpm", SERVICE, start, end).await, requests as f64);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_dropped_and_delayed_forwarding_is_retried_to_an_exact_total() {
    const EXPORTS: u64 = 80;
    let cluster = Cluster::start().await;
    let base = now_seconds() - EXPORTS - 120;
    cluster.faults.drop_every(7);
    cluster.faults.delay(Duration::from_millis(3));
    let mut refusals = 0;
    for k in 0..EXPORTS {
        refusals += send_until_acknowledged(&cluster.grpc((k % 3) as usize), "drops-gw", base, k).await.len();
    }
    cluster.faults.heal_all();
    assert!(refusals > 0, "dropped calls must have failed some exports");
    // The failed forwards are counted by peer and reason (one process: one registry for all).
    let text = self_metrics(&cluster.nodes[0]).await;
    let unreachable: f64 = text
        .lines()
        .filter(|l| l.starts_with("tollgate_forward_failures_total{") && l.contains(r#"reason="unreachable""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(unreachable > 0.0, "dropped forwards counted as unreachable:\n{text}");
    for node in &cluster.nodes {
        assert_exact(node, "drops-gw", base, EXPORTS).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_partitioned_owner_makes_exports_retryable_until_it_heals() {
    const EXPORTS: u64 = 40;
    let cluster = Cluster::start().await;
    let base = now_seconds() - EXPORTS - 120;
    for k in 0..EXPORTS / 2 {
        assert!(send_until_acknowledged(&cluster.grpc(0), "partition-gw", base, k).await.is_empty());
    }
    // Node 3 is cut off: every export needs it (each carries all pods), so each fails, retryably.
    let isolated = cluster.nodes[2].endpoints.cluster.to_string();
    cluster.faults.isolate(&isolated);
    let mut client = MetricsServiceClient::connect(cluster.grpc(0)).await.unwrap();
    let status = client.export(fleet_export("partition-gw", base, EXPORTS / 2, PODS).0).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("retry"), "{status:?}");

    // The cut-off node refuses config writes (retryably) and says its reads may be stale.
    let api = format!("http://{}", cluster.nodes[2].endpoints.http);
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let body: Value = http.get(format!("{api}/api/v1/config/pricing")).send().await.unwrap().json().await.unwrap();
        if body["freshness"]["up_to_date"] == false {
            break;
        }
        assert!(started.elapsed() < WAIT, "the cut-off node still claims to be up to date: {}", body["freshness"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pricing = "providers:\n  - provider: openai\n    models:\n      - name: gpt-4o\n        input-estimated-cost-per-m: 2.5\n";
    let response = http.put(format!("{api}/api/v1/config/pricing")).body(pricing).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503, "{}", response.text().await.unwrap());

    // Healed well before failover: the client's retries go through, and nothing is doubled.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.faults.heal(&isolated);
    for k in EXPORTS / 2..EXPORTS {
        send_until_acknowledged(&cluster.grpc(1), "partition-gw", base, k).await;
    }
    for node in &cluster.nodes {
        assert_exact(node, "partition-gw", base, EXPORTS).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_owners_that_predate_forward_export_get_the_points_extracted() {
    const EXPORTS: u64 = 6;
    let cluster = Cluster::start().await;
    let receiver = &cluster.nodes[0];
    let from = receiver.endpoints.cluster.to_string();
    let service = service_on_both_others(receiver, "upgrade");
    let service = service.as_str();
    // Mid rolling upgrade: the other two nodes still run a version without `ForwardExport`.
    for node in &cluster.nodes[1..] {
        cluster.faults.predate_forward_export(&node.endpoints.cluster.to_string());
    }
    let base = now_seconds() - EXPORTS - 120;
    for k in 0..EXPORTS - 1 {
        assert!(send_until_acknowledged(&cluster.grpc(0), service, base, k).await.is_empty());
    }
    // OTLP/HTTP with protobuf takes the same route as gRPC.
    let body = fleet_export(service, base, EXPORTS - 1, PODS).0.encode_to_vec();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/metrics", receiver.endpoints.otlp_http))
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    // Per export and owner: the refused `ForwardExport`, then one `Forward` of extracted points.
    for node in &cluster.nodes[1..] {
        let to = node.endpoints.cluster.to_string();
        assert_eq!(cluster.faults.forward_calls(&from, &to), 2 * EXPORTS, "forward calls to {to}");
    }
    for node in &cluster.nodes {
        assert_exact(node, service, base, EXPORTS).await;
    }
    // Each forwarded point is counted once, although it was offered twice.
    let expected = remote_points(receiver, service, base, 0..EXPORTS);
    assert_eq!(forwarded_points(&cluster).await, expected as f64);

    // Upgraded: the resources travel undecoded, in one call per owner, counted once as well.
    cluster.faults.heal_all();
    for k in EXPORTS..2 * EXPORTS {
        assert!(send_until_acknowledged(&cluster.grpc(0), service, base, k).await.is_empty());
    }
    for node in &cluster.nodes[1..] {
        let to = node.endpoints.cluster.to_string();
        assert_eq!(cluster.faults.forward_calls(&from, &to), 3 * EXPORTS, "forward calls to {to}");
    }
    let expected = remote_points(receiver, service, base, 0..2 * EXPORTS);
    assert_eq!(forwarded_points(&cluster).await, expected as f64);
    for node in &cluster.nodes {
        assert_exact(node, service, base, 2 * EXPORTS).await;
    }

    // What the fallback relies on: a real server without the method refuses it as
    // `Unimplemented` (the OTLP port serves no peer service at all).
    let transport = TonicTransport::new(None, Duration::from_secs(2), 1 << 20);
    let otlp_port = receiver.endpoints.otlp_grpc[0].to_string();
    let request = ForwardExportRequest { map_epoch: 1, signal: Signal::Metrics as i32, ..Default::default() };
    match transport.forward_export(&otlp_port, request).await {
        Err(TransportError::Refused { code, .. }) => assert_eq!(code, "Unimplemented"),
        other => panic!("expected an Unimplemented refusal, got {other:?}"),
    }
    cluster.shutdown().await;
}

/// A member that answers a call with a retryable refusal (here a follower asked for a lease,
/// which only the leader gives) is told apart from one nobody reaches: an owner whose lease
/// lapsed says so to the node forwarding to it, rather than being reported unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_retryable_refusal_of_a_reachable_member_is_not_taken_for_unreachable() {
    let cluster = Cluster::start().await;
    let transport = TonicTransport::new(None, Duration::from_secs(2), 1 << 20);
    let follower = cluster.nodes.iter().find(|node| !node.cluster().is_leader()).expect("a follower");
    let addr = follower.endpoints.cluster.to_string();
    let request = tollgate_proto::peer::LeaseRequest { node_id: 1 };
    match transport.lease(&addr, request, Duration::from_secs(2)).await {
        Err(error) if matches!(error, TransportError::Refused { .. }) => {
            assert!(error.is_retryable(), "{error}");
            let text = error.to_string();
            assert!(text.contains("refused: Unavailable: not a leader"), "{text}");
        }
        other => panic!("expected the follower's retryable refusal, got {other:?}"),
    }
    // Nothing listening: unreachable, as before.
    let closed = free_address().to_string();
    match transport.lease(&closed, request, Duration::from_secs(2)).await {
        Err(TransportError::Unreachable { .. }) => {}
        other => panic!("expected an unreachable peer, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_resource_that_does_not_decode_fails_the_export_as_invalid() {
    const SERVICE: &str = "corrupt-gw";
    let cluster = Cluster::start().await;
    let receiver = &cluster.nodes[0];
    let state = receiver.cluster().state();
    let vnodes = state.vnodes.vnodes.len() as u16;
    let mine =
        |pod: u64| state.vnodes.owner(vnode_of(pod_partition(SERVICE, pod), vnodes)) == Some(receiver.cluster().id);
    let local = (0..PODS).find(|pod| mine(*pod)).expect("the receiver owns one of the pods");
    let remote = (0..PODS).find(|pod| !mine(*pod)).expect("another node owns one of the pods");
    let base = now_seconds() - 120;
    // Its framing is sound (the receiver reads its resource and counts its points), but a metric
    // name is not UTF-8: only a full decode, by the resource's owner, finds out.
    for (pod, whose, by_owner) in [(remote, "another node's", true), (local, "the receiver's", false)] {
        let (export, _) = fleet_export(SERVICE, base, 0, PODS);
        let mut resources: Vec<Bytes> =
            export.resource_metrics.iter().map(|r| Bytes::from(r.encode_to_vec())).collect();
        let mut corrupt = resources[pod as usize].to_vec();
        let at = corrupt.windows(6).position(|w| w == b"gen_ai").expect("a gen_ai metric name");
        corrupt[at] = 0xff;
        assert!(count_data_points(&corrupt).is_ok(), "the framing still holds");
        resources[pod as usize] = Bytes::from(corrupt);
        let mut client = RoutingClient::connect(cluster.grpc(0)).await.unwrap();
        let status = client.export(RoutingRequest { resource_metrics: resources }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{whose} resource: {status:?}");
        assert!(status.message().contains("UTF-8"), "{whose} resource: {status:?}");
        assert_eq!(status.message().contains("found by the owner node"), by_owner, "{whose} resource: {status:?}");
    }
    cluster.shutdown().await;
}

/// One log export of `service`: a resource per pod, each with every sampling case as a record.
fn log_export(service: &str, base: u64) -> (ExportLogsServiceRequest, usize) {
    let cases = sampling_cases();
    let resource_logs = (0..PODS)
        .map(|pod| {
            let records = cases
                .cases
                .iter()
                .enumerate()
                .map(|(i, case)| {
                    let time_ns = (base + i as u64) * 1_000_000_000;
                    LogRecord {
                        time_unix_nano: time_ns,
                        observed_time_unix_nano: time_ns + 5,
                        attributes: case
                            .attributes
                            .iter()
                            .map(|(key, value)| KeyValue {
                                key: key.clone(),
                                value: Some(value.any_value()),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }
                })
                .collect();
            ResourceLogs {
                resource: Some(gateway_resource(Convention::AigwService, service, Some(&format!("pod-{pod}")))),
                scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
                ..Default::default()
            }
        })
        .collect();
    let kept = PODS as usize * cases.cases.iter().filter(|case| case.keep).count();
    (ExportLogsServiceRequest { resource_logs }, kept)
}

/// Classified records of an export of [`log_export`], each counted once in the log-derived
/// request count.
fn log_records() -> f64 {
    (PODS as usize * sampling_cases().cases.iter().filter(|case| case.kind.is_some()).count()) as f64
}

async fn kept_logs(node: &Node, service: &str, base: u64) -> usize {
    let url = format!(
        "http://{}/api/v1/logs?service={service}&start={}&end={}&limit=1000",
        node.endpoints.http,
        base - 60,
        base + 600
    );
    let response = reqwest::get(&url).await.expect("api");
    assert!(response.headers().get("x-tollgate-missing-nodes").is_none(), "a member did not answer");
    let body: Value = response.json().await.unwrap();
    body["logs"].as_array().map(Vec::len).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_log_exports_reach_their_owners_and_retries_are_recognised_across_versions() {
    let cluster = Cluster::start().await;
    let service = service_on_both_others(&cluster.nodes[0], "log-route");
    let base = now_seconds() - 300;
    let (export, kept) = log_export(&service, base);
    let send = |index: usize| {
        let endpoint = cluster.grpc(index);
        let export = export.clone();
        async move {
            let mut client = LogsServiceClient::connect(endpoint).await.expect("connect");
            let response = client.export(export).await.expect("acknowledged").into_inner();
            assert!(response.partial_success.is_none(), "{:?}", response.partial_success);
        }
    };
    // The owners predate `ForwardExport`: the receiver extracts the records and uses `Forward`.
    for node in &cluster.nodes[1..] {
        cluster.faults.predate_forward_export(&node.endpoints.cluster.to_string());
    }
    send(0).await;
    let requests = |node| total(node, "meter_envoy_ai_gw_log_request_cpm", &service, base - 60, base + 600);
    for node in &cluster.nodes {
        assert_eq!(kept_logs(node, &service, base).await, kept);
        assert_eq!(requests(node).await, log_records());
    }
    // Upgraded: the same export again, passed on undecoded and fingerprinted by the owners, is
    // recognised as a retry; so is the same export received by another node.
    cluster.faults.heal_all();
    send(0).await;
    send(1).await;
    // And over OTLP/HTTP with protobuf, which takes the same route.
    let post = |index: usize, body: Vec<u8>| {
        let url = format!("http://{}/v1/logs", cluster.nodes[index].endpoints.otlp_http);
        async move {
            let client = reqwest::Client::new();
            let response =
                client.post(url).header("content-type", "application/x-protobuf").body(body).send().await.unwrap();
            assert_eq!(response.status(), 200, "{:?}", response.text().await);
        }
    };
    post(2, export.encode_to_vec()).await;
    for node in &cluster.nodes {
        assert_eq!(kept_logs(node, &service, base).await, kept);
        assert_eq!(requests(node).await, log_records(), "a retry was counted again");
    }
    // The same records of other pods are new records.
    let (other, _) = log_export("log-route-other-gw", base);
    post(2, other.encode_to_vec()).await;
    assert_eq!(kept_logs(&cluster.nodes[0], "log-route-other-gw", base).await, kept);
    cluster.shutdown().await;
}

/// `PUT`s a pricing document pricing model `m`'s input tokens at `price` per million through
/// `node`'s API.
async fn set_input_price(node: &Node, price: f64) {
    let pricing = format!(
        "providers:\n  - provider: p\n    models:\n      - name: m\n        input-estimated-cost-per-m: {price}\n"
    );
    let response = reqwest::Client::new()
        .put(format!("http://{}/api/v1/config/pricing", node.endpoints.http))
        .body(pricing)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
}

/// A service name (`<prefix>-<n>-gw`) with pods owned by `owner` among those of a fleet export.
fn service_with_pods_on(owner: &Node, prefix: &str) -> String {
    let state = owner.cluster().state();
    let vnodes = state.vnodes.vnodes.len() as u16;
    (0..100)
        .map(|n| format!("{prefix}-{n}-gw"))
        .find(|service| {
            (0..PODS).any(|pod| {
                state.vnodes.owner(vnode_of(pod_partition(service, pod), vnodes)) == Some(owner.cluster().id)
            })
        })
        .expect("some service name has pods on the node")
}

/// SPEC §4: a price applies to data merged after the change is committed. Once a pricing write
/// is answered, data merged on any member uses the new price: the answer waits until the
/// members in touch with the leader use it, and a member behind the cluster's log (paused, or
/// cut off from Raft a while) merges forwarded data only once it caught up with the sender's
/// configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_data_merged_after_a_pricing_write_is_answered_uses_the_new_price_on_every_member() {
    let cluster = Cluster::start().await;
    let lagging = &cluster.nodes[2];
    let lagging_addr = lagging.endpoints.cluster.to_string();
    let base = now_seconds() - 120;
    let tokens = fleet_tokens(1, PODS) as f64;

    // Node 3 gets the cluster's log 60 ms late but stays in touch. The write is answered once
    // it uses the new price, so an export it takes at once is merged with it.
    set_input_price(&cluster.nodes[0], 1.0).await;
    cluster.faults.slow_raft_to(&lagging_addr, Some(Duration::from_millis(60)));
    set_input_price(&cluster.nodes[0], 2.0).await;
    let service = service_with_pods_on(lagging, "late-apply");
    export_until_acknowledged(&cluster.grpc(2), &fleet_export(&service, base, 0, PODS).0, "late apply").await;
    let merged = total(&cluster.nodes[0], "meter_envoy_ai_gw_estimated_cost", &service, base - 120, base + 120).await;
    assert_eq!(merged, tokens * 2.0, "{service}: every pod's tokens at the new price");

    // Node 3 gets no Raft call at all while the next price is committed, then catches up: what
    // node 1 forwards to it meanwhile waits for the price node 1 used.
    cluster.faults.heal_all();
    cluster.faults.slow_raft_to(&lagging_addr, None);
    set_input_price(&cluster.nodes[0], 3.0).await;
    assert!(lagging.cluster().state().pricing.map_or(0, |p| p.version) < 3, "node 3 is behind");
    let faults = Arc::clone(&cluster.faults);
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        faults.heal_all();
    });
    let service = service_with_pods_on(lagging, "behind");
    export_until_acknowledged(&cluster.grpc(0), &fleet_export(&service, base, 0, PODS).0, "behind").await;
    heal.await.unwrap();
    let merged = total(&cluster.nodes[0], "meter_envoy_ai_gw_estimated_cost", &service, base - 120, base + 120).await;
    assert_eq!(merged, tokens * 3.0, "{service}: every pod's tokens at the new price");
    cluster.shutdown().await;
}
