//! Three real `tollgate` processes forming a cluster over their cluster ports: data sent to any
//! node lands on the owner of its series, queries through any node see everything, and the
//! results stay exact across `kill -9` of an owner or the leader, joins and leaves, provided the
//! client retries what was not acknowledged (as OTLP exporters do).

mod common;

use common::{fleet_export, fleet_tokens, metric_value, now_seconds, sum_of, wait_balanced, TestNode};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_rules::testing::{self, Convention};

const WAIT: Duration = Duration::from_secs(60);

async fn three_nodes(env: &[(&str, &str)]) -> Vec<TestNode> {
    let first = TestNode::start_member("n1", None, env).await;
    let seed = first.cluster_addr();
    let second = TestNode::start_member("n2", Some(&seed), env).await;
    let third = TestNode::start_member("n3", Some(&seed), env).await;
    let nodes = vec![first, second, third];
    wait_balanced(&nodes.iter().collect::<Vec<_>>()).await;
    assert_moves_accounted(&nodes).await;
    nodes
}

/// Every vnode hand-over of the cluster's formation happened once and none failed: each node owns
/// what it took over less what it handed away (the first node also the vnodes it bootstrapped
/// with), as many hand-overs went out as came in, and no take-over was refused or retried (a
/// take-over started twice for one move was refused by the old owner).
async fn assert_moves_accounted(nodes: &[TestNode]) {
    let moves = |direction: &str| format!("tollgate_vnode_moves_total{{direction=\"{direction}\",kind=\"state\"}}");
    let ledger = wait_for("every hand-over counted on both sides", || async {
        let mut ledger = Vec::new();
        let mut total = 0;
        for node in nodes {
            let status = node.cluster_status().await;
            total = status["vnodes"]["total"].as_i64().expect("vnode count");
            let owned = status["vnodes"]["owners"][&node.endpoints.node_id].as_i64().unwrap_or(0);
            let text = node.self_metrics().await;
            let taken = metric_value(&text, &moves("in")).unwrap_or(0.0) as i64;
            let given = metric_value(&text, &moves("out")).unwrap_or(0.0) as i64;
            ledger.push((owned, taken, given));
        }
        let owned_as_moved = ledger
            .iter()
            .enumerate()
            .all(|(n, (owned, taken, given))| *owned == if n == 0 { total } else { 0 } + taken - given);
        let taken: i64 = ledger.iter().map(|(_, taken, _)| taken).sum();
        let given: i64 = ledger.iter().map(|(_, _, given)| given).sum();
        (owned_as_moved && taken == given && taken > 0).then_some(ledger)
    })
    .await;
    for node in nodes {
        let text = node.self_metrics().await;
        for direction in ["in", "out"] {
            for kind in ["state", "drain"] {
                let name = format!("tollgate_vnode_move_failures_total{{direction=\"{direction}\",kind=\"{kind}\"}}");
                let failures = metric_value(&text, &name).unwrap_or(0.0);
                assert_eq!(
                    failures, 0.0,
                    "{}: {name} (owned, taken, given per node: {ledger:?})",
                    node.endpoints.node_id
                );
            }
        }
    }
}

fn leader_name(status: &Value) -> Option<String> {
    let leader = status["leader"].as_u64()?;
    status["nodes"].as_array()?.iter().find(|n| n["id"] == leader).and_then(|n| n["name"].as_str()).map(String::from)
}

async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(started.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_golden_cases_sent_to_all_nodes_read_back_through_any() {
    let nodes = three_nodes(&common::KEEP_OLD_DATA).await;
    let cases = testing::aggregation_cases();

    // Pricing written through a follower is applied everywhere, with one version.
    let mut follower = None;
    for node in &nodes {
        if node.cluster_status().await["state"] == "follower" {
            follower = Some(node);
        }
    }
    let follower = follower.expect("two of three nodes follow");
    let (status, body) = follower.put("/api/v1/config/pricing", &cases.pricing.to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].clone();
    for node in &nodes {
        wait_for("the pricing version on every node", || async {
            let (status, body) = node.get("/api/v1/config/pricing").await;
            (status == 200 && body["version"] == version).then_some(())
        })
        .await;
    }

    // Each case under its own service names, its points spread over the three nodes.
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(node.metrics_client(0).await);
    }
    let mut expectations = Vec::new();
    for (c, case) in cases.cases.iter().enumerate() {
        for (index, point) in case.points.iter().enumerate() {
            let mut point = point.clone();
            point.service = format!("{}-case{c}", point.service);
            let response = clients[index % 3]
                .export(point.request(Convention::AigwService))
                .await
                .unwrap_or_else(|e| panic!("{}: point {index} refused: {e}", case.name))
                .into_inner();
            assert!(response.partial_success.is_none(), "{}: {:?}", case.name, response.partial_success);
        }
        for expect in &case.expect {
            let mut expect = expect.clone();
            expect.service = format!("{}-case{c}", expect.service);
            expectations.push((case.name.clone(), expect));
        }
    }
    for (n, node) in nodes.iter().enumerate() {
        let mut failures = Vec::new();
        for (case, expect) in &expectations {
            let labels = json!(expect.labels);
            let actual =
                node.value(&expect.metric, &expect.service, expect.instance.as_deref(), &labels, expect.minute).await;
            if let Err(problem) = expect.check(actual) {
                failures.push(format!("{case}: {problem}"));
            }
        }
        assert!(
            failures.is_empty(),
            "through node {}: {} of {} expectations failed:\n{}",
            n + 1,
            failures.len(),
            expectations.len(),
            failures.join("\n")
        );
    }

    // Every node forwarded points (the series are spread over the cluster) and shows its Raft
    // and vnode figures; every vnode hand-over was counted on both sides.
    for node in &nodes {
        let text = node.self_metrics().await;
        for metric in [
            "tollgate_forwarded_points_total{peer=",
            "tollgate_forward_seconds_count{peer=",
            "tollgate_raft_term ",
            "tollgate_raft_commit_index ",
            "tollgate_raft_applied_index ",
            "tollgate_raft_is_leader ",
            "tollgate_vnodes_owned ",
            "tollgate_vnode_moves_total{direction=",
        ] {
            assert!(text.contains(metric), "{}: no {metric} in\n{text}", node.endpoints.node_id);
        }
    }
}

/// Streams `exports` fleet exports to `node`'s gRPC port, retrying each until it is
/// acknowledged; returns the number of failed attempts.
async fn stream_with_retries(
    endpoints: Arc<std::sync::Mutex<Vec<String>>>,
    service: &'static str,
    base: u64,
    exports: u64,
    pods: u64,
    acknowledged: Arc<AtomicU64>,
    allowed: Arc<AtomicU64>,
) -> u64 {
    let mut failures = 0;
    for k in 0..exports {
        // The test holds the stream here until it lets export `k` go.
        let held = Instant::now();
        while k >= allowed.load(Ordering::SeqCst) {
            assert!(held.elapsed() < WAIT, "export {k} was never allowed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let request = fleet_export(service, base, k, pods).0;
        let started = Instant::now();
        let mut attempt = 0usize;
        loop {
            let endpoint = {
                let endpoints = endpoints.lock().unwrap();
                endpoints[attempt % endpoints.len()].clone()
            };
            let result = async {
                let mut client = MetricsServiceClient::connect(endpoint).await.map_err(|e| e.to_string())?;
                client.export(request.clone()).await.map_err(|e| format!("{}: {}", e.code(), e.message()))
            }
            .await;
            match result {
                Ok(response) => {
                    assert!(response.into_inner().partial_success.is_none());
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Err(error) => {
                    failures += 1;
                    assert!(
                        !error.starts_with("Invalid") && !error.starts_with("Internal"),
                        "export {k}: not a retryable error: {error}"
                    );
                    assert!(started.elapsed() < Duration::from_secs(120), "export {k} never acknowledged: {error}");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    failures
}

async fn wait_acknowledged(acknowledged: &AtomicU64, count: u64) {
    let started = Instant::now();
    while acknowledged.load(Ordering::SeqCst) < count {
        assert!(started.elapsed() < WAIT, "the stream stalled at {}", acknowledged.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn assert_exact(node: &TestNode, service: &str, base: u64, exports: u64, pods: u64) {
    let expected_requests: u64 = (0..exports).map(|k| fleet_export(service, base, k, pods).1).sum();
    let (requests, missing) =
        sum_of(node, "meter_envoy_ai_gw_request_cpm", service, base - 120, base + exports + 120).await;
    assert_eq!(missing, None, "every member answered");
    assert_eq!(requests, expected_requests as f64, "every request counted exactly once");
    let (tokens, _) =
        sum_of(node, "meter_envoy_ai_gw_input_token_rate", service, base - 120, base + exports + 120).await;
    assert_eq!(tokens, fleet_tokens(exports, pods) as f64, "cumulative series: the whole increase, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_kill9_of_an_owner_during_a_stream_loses_and_doubles_nothing() {
    const EXPORTS: u64 = 240;
    const PODS: u64 = 12;
    let mut nodes = three_nodes(&[]).await;
    let base = now_seconds() - EXPORTS - 120;
    // Every export carries all pods, so it needs every owner: killing any node interrupts it.
    let endpoints = Arc::new(std::sync::Mutex::new(vec![nodes[0].grpc()]));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(stream_with_retries(
        Arc::clone(&endpoints),
        "owners-gw",
        base,
        EXPORTS,
        PODS,
        Arc::clone(&acknowledged),
        Arc::new(AtomicU64::new(u64::MAX)),
    ));
    wait_acknowledged(&acknowledged, 60).await;
    nodes[1].kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes[1].restart().await;
    let failures = producer.await.unwrap();
    assert!(failures > 0, "the kill interrupted the stream");

    // The restarted owner kept its vnodes (no failover within 60 s) and everything it acknowledged.
    wait_balanced(&nodes.iter().collect::<Vec<_>>()).await;
    for node in &nodes {
        assert_exact(node, "owners-gw", base, EXPORTS, PODS).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_kill9_of_the_leader_then_writes_resume_and_it_catches_up() {
    let env = [("TOLLGATE_CLUSTER_FAILOVER_AFTER_SECONDS", "8")];
    let mut nodes = three_nodes(&env).await;
    // A member names the leader while it is in touch with it (a starved one may not, a moment).
    let leader = wait_for("a leader", || async { leader_name(&nodes[0].cluster_status().await) }).await;
    let index = nodes.iter().position(|n| n.endpoints.node_id == leader).unwrap();
    let survivor = (index + 1) % 3;
    nodes[index].kill9();

    // A config write through a survivor succeeds once the survivors elected a new leader.
    let pricing = "providers:\n  - provider: openai\n    models:\n      - name: gpt-4o\n        input-estimated-cost-per-m: 2.5\n        output-estimated-cost-per-m: 10\n";
    let version = wait_for("a config write without the old leader", || async {
        let (status, body) = nodes[survivor].put("/api/v1/config/pricing", pricing, None).await;
        match status {
            200 => Some(body["version"].clone()),
            503 => None,
            other => panic!("unexpected {other}: {body}"),
        }
    })
    .await;
    let new_status = wait_for("the survivor in touch with a new leader", || async {
        let status = nodes[survivor].cluster_status().await;
        leader_name(&status).is_some_and(|name| name != leader).then_some(status)
    })
    .await;
    // The new leader shows how long the dead one has been silent: at least since it took over
    // (it showed nothing, as a follower does, though it counted that silence towards failover).
    let silent = || async {
        let new_leader = new_status["leader"].as_u64().expect("a new leader");
        let new_leader = nodes.iter().find(|n| n.raft_id() == new_leader).expect("a member");
        let status = new_leader.cluster_status().await;
        let old = status["nodes"].as_array().unwrap().iter().find(|n| n["name"] == leader.as_str()).cloned();
        old.expect("the old leader listed")["last_contact_ms"].as_u64()
    };
    let first = wait_for("the old leader's silence shown", || async { silent().await }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(silent().await.expect("still shown") > first, "the silence grows");
    wait_for("the leader change counted", || async {
        let text = nodes[survivor].self_metrics().await;
        let line = text.lines().find(|l| l.starts_with("tollgate_raft_leader_changes_total"))?.to_string();
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        (value >= 1.0).then_some(())
    })
    .await;

    // After failover_after, the dead node's vnodes belong to the survivors: all data is accepted.
    let base = now_seconds() - 200;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != index).collect();
    wait_for("ingest without the dead node", || async {
        let mut client = nodes[survivors[0]].metrics_client(0).await;
        client.export(fleet_export("failover-gw", base, 0, 12).0).await.ok().map(|_| ())
    })
    .await;
    let (_, missing) =
        sum_of(&nodes[survivors[1]], "meter_envoy_ai_gw_request_cpm", "failover-gw", base - 60, base + 60).await;
    assert_eq!(missing.as_deref(), Some(leader.as_str()), "the dead member is named as missing");
    // A client that wants all or nothing says so: the same read is then a retryable error.
    for read in [
        "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=failover-gw&partial=false",
        "/api/v1/logs?service=failover-gw&partial=false",
        "/api/v1/services?partial=false",
    ] {
        let (status, body) = nodes[survivors[1]].get(read).await;
        assert_eq!(status, 503, "{read}: {body}");
        assert_eq!(body["code"], "unavailable", "{read}: {body}");
        assert!(body["error"].as_str().unwrap().contains(&format!("no answer from {leader}")), "{read}: {body}");
    }

    // Back, the old leader is ready only once it caught up with the cluster's log: from then on
    // it merges with the new configuration. Then it gets vnodes again.
    nodes[index].restart().await;
    let (status, body) = nodes[index].get("/api/v1/config/pricing").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], version, "the restarted node is ready with the new pricing: {}", body["freshness"]);
    wait_balanced(&nodes.iter().collect::<Vec<_>>()).await;
    let (requests, missing) =
        sum_of(&nodes[index], "meter_envoy_ai_gw_request_cpm", "failover-gw", base - 60, base + 60).await;
    assert_eq!(missing, None);
    assert_eq!(requests, fleet_export("failover-gw", base, 0, 12).1 as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_join_and_leave_during_a_stream_keep_results_exact() {
    const EXPORTS: u64 = 300;
    const PODS: u64 = 12;
    let first = TestNode::start_member("n1", None, &[]).await;
    let seed = first.cluster_addr();
    let second = TestNode::start_member("n2", Some(&seed), &[]).await;
    wait_balanced(&[&first, &second]).await;

    let base = now_seconds() - EXPORTS - 120;
    let endpoints = Arc::new(std::sync::Mutex::new(vec![first.grpc()]));
    let acknowledged = Arc::new(AtomicU64::new(0));
    // The stream may not finish before each membership change is complete: it is held at these
    // exports until then, so both changes happen while exports are still coming.
    let allowed = Arc::new(AtomicU64::new(160));
    let producer = tokio::spawn(stream_with_retries(
        Arc::clone(&endpoints),
        "moves-gw",
        base,
        EXPORTS,
        PODS,
        Arc::clone(&acknowledged),
        Arc::clone(&allowed),
    ));

    // A third node joins mid-stream: vnodes move to it with their state.
    wait_acknowledged(&acknowledged, 60).await;
    let third = TestNode::start_member("n3", Some(&seed), &[]).await;
    wait_balanced(&[&first, &second, &third]).await;
    allowed.store(260, Ordering::SeqCst);

    // The second leaves mid-stream, through the command line: its vnodes and data move away.
    wait_acknowledged(&acknowledged, 160).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--api", &first.api(), "cluster", "leave", "n2"])
        .output()
        .expect("the cli runs");
    assert!(output.status.success(), "leave failed: {}", String::from_utf8_lossy(&output.stderr));
    wait_balanced(&[&first, &third]).await;
    allowed.store(u64::MAX, Ordering::SeqCst);
    let failures = producer.await.unwrap();
    eprintln!("{failures} export attempts were refused (vnodes moving) and retried");

    let status = String::from_utf8(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--api", &third.api(), "cluster", "status"])
            .output()
            .expect("the cli runs")
            .stdout,
    )
    .unwrap();
    assert!(status.contains("n1") && status.contains("n3") && !status.contains("n2"), "{status}");

    // The node that left says why it is not ready, also when started again on its data (it said
    // only "not ready").
    let mut second = second;
    for restarted in [false, true] {
        if restarted {
            second.restart_unready().await;
        }
        wait_for("the node that left saying so", || async {
            let (status, body) = second.get("/readyz").await;
            let why = body["error"].as_str().unwrap_or_default().to_string();
            (status == 503 && why.starts_with("not ready: this node left the cluster")).then_some(())
        })
        .await;
        // Nor does it answer reads: a member holds its data (its answers counted both), and it
        // no longer follows the configuration, which it takes no change of either.
        for read in [
            "/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service=moves-gw",
            "/api/v1/logs?service=moves-gw",
            "/api/v1/services",
            "/api/v1/config/pricing",
            "/api/v1/config/rules",
        ] {
            let (status, body) = second.get(read).await;
            assert_eq!(status, 503, "{read}: {body}");
            let error = body["error"].as_str().unwrap();
            assert!(error.starts_with("this node left the cluster") && error.contains("n1, n3"), "{read}: {body}");
        }
        let (status, body) = second.put("/api/v1/config/rules", "sampling:\n  token_threshold: 5000\n", None).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("this node left the cluster"), "{body}");
        // Nor membership changes (they said "no stable leader; retry").
        let (status, body) = second.delete("/api/v1/cluster/nodes/n3", None).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("this node left the cluster"), "{body}");
        let node = json!({"node_id": 7, "name": "x", "cluster_addr": "a:1", "api_addr": "b:2"});
        let (status, body) = second.post("/api/v1/cluster/nodes", &node, None).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("this node left the cluster"), "{body}");
    }
    // The node that left is gone for good; the other two hold everything.
    drop(second);
    assert_exact(&first, "moves-gw", base, EXPORTS, PODS).await;
    assert_exact(&third, "moves-gw", base, EXPORTS, PODS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_restart_on_another_port_is_announced() {
    let mut nodes = three_nodes(&[]).await;
    let old = nodes[2].cluster_addr();
    nodes[2].restart_elsewhere().await;
    let new = nodes[2].cluster_addr();
    assert_ne!(old, new);
    wait_for("the new address known by every node", || async {
        for node in &nodes {
            let status = node.cluster_status().await;
            let known = status["nodes"].as_array()?.iter().find(|n| n["name"] == "n3")?["cluster_addr"].clone();
            if known != json!(new) {
                return None;
            }
        }
        Some(())
    })
    .await;
    // Data for its vnodes reaches it at the new address.
    let base = now_seconds() - 200;
    let mut client = nodes[0].metrics_client(0).await;
    let (request, requests) = fleet_export("moved-gw", base, 0, 12);
    wait_for("an export acknowledged", || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.export(request).await.ok().map(|_| ()) }
    })
    .await;
    let _ = &mut client;
    let (sum, missing) = sum_of(&nodes[1], "meter_envoy_ai_gw_request_cpm", "moved-gw", base - 60, base + 60).await;
    assert_eq!((sum, missing), (requests as f64, None));
}

/// A single node is its own leader: restarted on another port, it updates its own addresses (it
/// asked the other members, which forward to the leader: to its old address, so it never did, and
/// a node joining later could not reach the leader). A join that gives a member's id with another
/// name is refused (it renamed the member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_leader_restarted_on_another_port_updates_its_own_addresses() {
    let mut first = TestNode::start_member("n1", None, &[]).await;
    first.restart_elsewhere().await;
    let new = first.cluster_addr();
    let known = |status: Value, name: &str| {
        status["nodes"].as_array()?.iter().find(|n| n["name"] == name).map(|n| n["cluster_addr"].clone())
    };
    wait_for("the leader's new address in its own state", || async {
        (known(first.cluster_status().await, "n1") == Some(json!(new))).then_some(())
    })
    .await;
    let second = TestNode::start_member("n2", Some(&new), &[]).await;
    wait_balanced(&[&first, &second]).await;
    assert_eq!(known(second.cluster_status().await, "n1"), Some(json!(new)));
    // A write through the follower, which forwards it to the leader at its new address.
    let (status, body) = second.put("/api/v1/config/rules", "sampling:\n  token_threshold: 5000\n", None).await;
    assert_eq!(status, 200, "{body}");

    let theirs = second.cluster_status().await;
    let renamed = json!({
        "node_id": theirs["node_id"], "name": "zz", "cluster_addr": theirs["cluster_addr"],
        "api_addr": theirs["api_addr"], "cluster_id": theirs["cluster_id"],
    });
    let (status, body) = first.post("/api/v1/cluster/nodes", &renamed, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(r#"is the member named "n2", not "zz""#), "{body}");
    assert_eq!(known(first.cluster_status().await, "n2"), Some(theirs["cluster_addr"].clone()));
    // New addresses of a member where another node answers: refused, naming that node (the
    // member's traffic would have gone to it).
    let mut moved = renamed.clone();
    moved["name"] = json!("n2");
    moved["cluster_addr"] = json!(new);
    let (status, body) = first.post("/api/v1/cluster/nodes", &moved, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&format!("reaches node n1 ({})", first.raft_id())), "{body}");
    assert_eq!(known(first.cluster_status().await, "n2"), Some(theirs["cluster_addr"].clone()));
}

/// A paused member (or one cut off by a partition) never answers, and a query waits for a
/// member's answer up to 30 s: every read waited about 20 s for it. Once a read found it
/// unreachable, the next ones ask it who it is first, for at most 2 s, and go on without it; once
/// it answers again it is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reads_do_not_wait_again_for_a_paused_member() {
    let first = TestNode::start_member("n1", None, &[]).await;
    let second = TestNode::start_member("n2", Some(&first.cluster_addr()), &[]).await;
    wait_balanced(&[&first, &second]).await;
    let base = now_seconds() - 200;
    let read = || sum_of(&first, "meter_envoy_ai_gw_request_cpm", "paused-gw", base - 60, base + 60);
    assert_eq!(read().await.1, None);
    second.signal("STOP");
    let started = Instant::now();
    assert_eq!(read().await.1.as_deref(), Some("n2"));
    eprintln!("the first read without the paused member took {:?}", started.elapsed());
    for _ in 0..3 {
        let answer = tokio::time::timeout(Duration::from_secs(10), read()).await;
        let (_, missing) = answer.expect("a read that does not wait for the paused member again");
        assert_eq!(missing.as_deref(), Some("n2"));
    }
    second.signal("CONT");
    wait_for("the member answering reads again", || async { read().await.1.is_none().then_some(()) }).await;
}

/// A leader cut off from the majority still leads as far as Raft knows (until it hears of a
/// newer term). It said so everywhere: `tollgate_raft_is_leader` 1 beside the majority's new
/// leader (the alert on one leader fired), `cluster status` naming itself leader, pricing's
/// `freshness.leader` naming it. It now names no leader and says it is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_leader_cut_off_from_the_majority_says_so() {
    let first = TestNode::start_member("n1", None, &[]).await;
    let second = TestNode::start_member("n2", Some(&first.cluster_addr()), &[]).await;
    wait_balanced(&[&first, &second]).await;
    let nodes = [first, second];
    let (leader, other) = wait_for("a leader in contact", || async {
        for (index, node) in nodes.iter().enumerate() {
            let status = node.cluster_status().await;
            let leads = status["state"] == "leader" && status["leader"].as_u64() == Some(node.raft_id());
            if leads && status["in_contact"] == true && node.self_metric("tollgate_raft_is_leader").await == 1.0 {
                return Some((&nodes[index], &nodes[1 - index]));
            }
        }
        None
    })
    .await;
    // Two voters: with the other paused, the leader has no majority.
    other.signal("STOP");
    wait_for("the leader saying it is cut off", || async {
        let status = leader.cluster_status().await;
        let (_, pricing) = leader.get("/api/v1/config/pricing").await;
        let cut_off = status["state"] == "leader"
            && status["in_contact"] == false
            && status["leader"].is_null()
            && pricing["freshness"]["leader"].is_null()
            && pricing["freshness"]["up_to_date"] == false;
        (cut_off && leader.self_metric("tollgate_raft_is_leader").await == 0.0).then_some(())
    })
    .await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--api", &leader.api(), "cluster", "status"])
        .output()
        .expect("the cli runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("leader     none, term") && text.contains("contact    no leader with a majority in touch"),
        "{text}"
    );
    // Its configuration documents are shown with a warning (the YAML has no freshness field).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--api", &leader.api(), "pricing", "get"])
        .output()
        .expect("the cli runs");
    let warning = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{warning}");
    assert!(warning.contains("not in touch with a leader that has a majority"), "{warning}");
    other.signal("CONT");
    wait_for("a leader in contact again", || async {
        for node in &nodes {
            let status = node.cluster_status().await;
            if status["in_contact"] == true && status["leader"].is_u64() {
                let leader = status["leader"].as_u64();
                let leading = nodes.iter().find(|n| Some(n.raft_id()) == leader)?;
                return (leading.self_metric("tollgate_raft_is_leader").await == 1.0).then_some(());
            }
        }
        None
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_secret_and_api_token_are_enforced() {
    let secured = [("TOLLGATE_CLUSTER_SECRET", "s3cret"), ("TOLLGATE_API_TOKEN", "t0ken")];
    let first = TestNode::start_member("n1", None, &secured).await;
    let second = TestNode::start_member("n2", Some(&first.cluster_addr()), &secured).await;
    wait_balanced(&[&first, &second]).await;

    // Membership changes need the token.
    let (status, body) = first.delete("/api/v1/cluster/nodes/n2", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = first
        .post(
            "/api/v1/cluster/nodes",
            &json!({"node_id": 7, "name": "x", "cluster_addr": "a:1", "api_addr": "b:2"}),
            None,
        )
        .await;
    assert_eq!(status, 401, "{body}");

    // A node with the wrong secret cannot join, and says why.
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(["serve", "--node-id", "intruder", "--data-dir"])
        .arg(dir.path())
        .args(["--otlp-grpc-addrs", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0", "--join", &first.cluster_addr()])
        .envs(common::CLUSTER_ENV)
        .env("TOLLGATE_CLUSTER_SECRET", "wrong")
        .env("TOLLGATE_LOG", "error");
    let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("Unauthenticated") && stderr.contains("secret"), "{stderr}");
    let status = first.cluster_status().await;
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2, "{status}");

    // A raw call on the cluster port without the secret is refused.
    let mut peer = tollgate_proto::peer::peer_client::PeerClient::connect(format!("http://{}", first.cluster_addr()))
        .await
        .unwrap();
    let error = peer
        .join(tollgate_proto::peer::JoinRequest { node_id: 9, name: "raw".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated);

    // With the token, the second node leaves.
    let (status, body) = first.delete("/api/v1/cluster/nodes/n2", Some("t0ken")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_forms_from_one_join_list_given_to_every_node() {
    // As in a StatefulSet: every node gets the same list; the first bootstraps, the others join.
    let addresses: Vec<String> = (0..3).map(|_| common::cluster_address()).collect();
    let join = addresses.join(",");
    let mut env: Vec<(&str, &str)> = common::CLUSTER_ENV.to_vec();
    env.push(("TOLLGATE_JOIN", &join));
    let (a, b, c) = tokio::join!(
        TestNode::start_at(&addresses[0], &env, &["--node-id", "s0"]),
        TestNode::start_at(&addresses[1], &env, &["--node-id", "s1"]),
        TestNode::start_at(&addresses[2], &env, &["--node-id", "s2"]),
    );
    wait_balanced(&[&a, &b, &c]).await;
    let status = c.cluster_status().await;
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3, "one cluster, not three: {status}");
}

/// A leader's status lists every member with the time since it last answered; the leader itself
/// is 0, also on an idle single node, where Raft writes nothing and its own entry would otherwise
/// grow for as long as the node runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_idle_single_node_is_in_contact_with_itself() {
    let node = TestNode::start_with(&[], &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = node.cluster_status().await;
    assert_eq!(status["leader"], status["node_id"], "{status}");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{status}");
    assert_eq!(nodes[0]["last_contact_ms"], 0, "{status}");
}

/// A node the leader cannot reach is not admitted: `POST /api/v1/cluster/nodes` with a wrong
/// cluster address answers a retryable 503 that names the address, and the cluster keeps its
/// majority. Before, openraft counted the unreachable learner as caught up (its lag threshold
/// exceeds a short log) and it was made a voter at once: a single-node cluster then had one of
/// two voters, no majority, and no way to remove the member (the request itself hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_unreachable_node_is_not_admitted_and_the_cluster_keeps_its_majority() {
    let node = TestNode::start_member("n1", None, &[]).await;
    let nobody = common::cluster_address();
    let ghost = json!({"node_id": 1234, "name": "ghost", "cluster_addr": nobody, "api_addr": "127.0.0.1:9"});
    let request = node.post("/api/v1/cluster/nodes", &ghost, None);
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), request).await.expect("an answer, not a hang");
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&nobody), "{body}");
    // Still one voter, and writes still commit.
    let cluster = node.cluster_status().await;
    let nodes = cluster["nodes"].as_array().unwrap();
    assert_eq!((nodes.len(), nodes[0]["name"].as_str()), (1, Some("n1")), "{cluster}");
    let (status, body) = node.put("/api/v1/config/rules", "sampling:\n  token_threshold: 5000\n", None).await;
    assert_eq!(status, 200, "{body}");
    // A name or an address no node could have is refused at once, naming the field: it was the
    // same 503 after 5 s ("retry"), or stored (an API address).
    for (field, value) in [
        ("name", "bad name!"),
        ("cluster_addr", "nonsense"),
        ("cluster_addr", "127.0.0.1:99999"),
        ("api_addr", "garbage"),
    ] {
        let mut bad = ghost.clone();
        bad[field] = json!(value);
        let (status, body) = node.post("/api/v1/cluster/nodes", &bad, None).await;
        assert_eq!(status, 400, "{field}={value}: {body}");
        assert!(body["error"].as_str().unwrap().contains(&format!("{field}: {value:?}")), "{body}");
    }
}

/// A node that bootstrapped a cluster of its own holds that cluster's Raft log and state: admitted
/// to another cluster, its log (the same indexes, other entries) is taken for the leader's, and
/// its state, other members and map, is never replaced. It is refused, whether the request says
/// which cluster it belongs to (as `tollgate cluster join` does) or not (its cluster port refuses
/// the leader's calls, which say their cluster, and the leader asks it who it is first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_node_of_another_cluster_is_not_admitted() {
    let node = TestNode::start_member("n1", None, &[]).await;
    let stranger = TestNode::start_member("n2", None, &[]).await;
    let ours = node.cluster_status().await;
    let theirs = stranger.cluster_status().await;
    assert_eq!(ours["cluster_id"], json!(node.raft_id()), "{ours}");
    assert_eq!(theirs["cluster_id"], json!(stranger.raft_id()), "{theirs}");

    let mut request = json!({
        "node_id": theirs["node_id"], "name": theirs["name"], "cluster_addr": theirs["cluster_addr"],
        "api_addr": theirs["api_addr"], "vnodes": theirs["configured_vnodes"], "cluster_id": theirs["cluster_id"],
    });
    let (status, body) = node.post("/api/v1/cluster/nodes", &request, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("another cluster"), "{body}");

    // Without the cluster in the request, the leader asks the node itself first, which refuses
    // a call from another cluster: the same final refusal, with the node's reason (it was a
    // retryable 503 once the leader could not replicate to it).
    request.as_object_mut().unwrap().remove("cluster_id");
    let answer = node.post("/api/v1/cluster/nodes", &request, None);
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), answer).await.expect("an answer, not a hang");
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&stranger.cluster_addr()) && error.contains("belongs to cluster"), "{body}");
    // A cluster address that reaches another node than the one named (here, the leader itself):
    // refused, naming the node it reaches (it was the same 503).
    let mut misdirected = request.clone();
    misdirected["cluster_addr"] = json!(node.cluster_addr());
    let (status, body) = node.post("/api/v1/cluster/nodes", &misdirected, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&format!("reaches node n1 ({})", node.raft_id())), "{body}");

    // Any call that says another cluster is refused on the cluster port; one that says nothing
    // (a node not yet in a cluster asking to join) is heard.
    let mut peer =
        tollgate_proto::peer::peer_client::PeerClient::connect(format!("http://{}", stranger.cluster_addr()))
            .await
            .unwrap();
    let mut query = tonic::Request::new(tollgate_proto::peer::QueryRequest::default());
    query.metadata_mut().insert(tollgate_proto::CLUSTER_ID_HEADER, node.raft_id().into());
    let error = peer.query(query).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains(&format!("the caller to cluster {}", node.raft_id())), "{error:?}");
    let error = peer.query(tollgate_proto::peer::QueryRequest::default()).await.unwrap_err();
    assert_ne!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");

    // Both clusters are as they were: one member each, each its own leader, and writes commit.
    for (member, name) in [(&node, "n1"), (&stranger, "n2")] {
        let cluster = member.cluster_status().await;
        let nodes = cluster["nodes"].as_array().unwrap();
        assert_eq!((nodes.len(), nodes[0]["name"].as_str()), (1, Some(name)), "{cluster}");
        assert_eq!((cluster["state"].as_str(), cluster["leader"].as_u64()), (Some("leader"), Some(member.raft_id())));
        assert_eq!(cluster["vnodes"]["owners"], json!({ name: 16 }), "{cluster}");
        let (status, body) = member.put("/api/v1/config/rules", "sampling:\n  token_threshold: 5000\n", None).await;
        assert_eq!(status, 200, "{body}");
    }
    // Asked through a follower, which forwards the join to the leader: the same final refusal
    // (it was a retryable 503).
    request["cluster_id"] = theirs["cluster_id"].clone();
    let follower = TestNode::start_member("n1-follower", Some(&node.cluster_addr()), &[]).await;
    let (status, body) = follower.post("/api/v1/cluster/nodes", &request, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("another cluster"), "{body}");
}

/// A member whose data directory is lost comes back at its old address as a new node (a pod on a
/// new volume). The leader's Raft messages for the old member reach it there. Taken, they would
/// make an empty node answer, and vote, for a member that acknowledged entries it no longer holds;
/// openraft's leader sees the member's log go backwards and its Raft core panics, so the cluster
/// could not write any more. The new node refuses them: the cluster keeps writing, and counts the
/// old member as silent (so that failover can give its vnodes away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_new_node_at_a_members_address_does_not_answer_for_it() {
    let mut nodes = three_nodes(&[]).await;
    let leader = wait_for("a leader", || async { nodes[0].cluster_status().await["leader"].as_u64() }).await;
    let lost = nodes.iter().rposition(|n| n.raft_id() != leader).expect("a follower");
    let address = nodes[lost].cluster_addr();
    nodes[lost].kill9();
    // It waits to join where nobody answers: whatever it holds then came from Raft messages
    // meant for the old member, not from being let in itself.
    let nobody = common::cluster_address();
    let args = ["--node-id", "newcomer", "--join", nobody.as_str()];
    let newcomer = TestNode::start_unready_at(&address, &common::CLUSTER_ENV, &args).await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let status = newcomer.cluster_status().await;
    assert_eq!((&status["cluster_id"], &status["applied_index"]), (&Value::Null, &Value::Null), "{status}");
    let leader_node = nodes.iter().find(|n| n.raft_id() == leader).unwrap();
    let (status, body) = leader_node.put("/api/v1/config/rules", "sampling:\n  token_threshold: 5000\n", None).await;
    assert_eq!(status, 200, "{body}");
    let cluster = leader_node.cluster_status().await;
    let old =
        cluster["nodes"].as_array().unwrap().iter().find(|n| n["id"] == nodes[lost].raft_id()).expect("still a member");
    let silent = old["last_contact_ms"].as_u64();
    assert!(silent.is_none_or(|ms| ms >= 3000), "the old member counts as answering: {cluster}");
    // Nor does it answer a query for the old member (with its own, empty, data): the old member
    // is named as missing, so the answer is not taken for complete.
    let now = now_seconds();
    let (_, missing) = sum_of(leader_node, "meter_envoy_ai_gw_request_cpm", "any-gw", now - 600, now).await;
    let old_name = old["name"].as_str().unwrap();
    assert_eq!(missing.as_deref(), Some(old_name), "the old member's data is missing, and said to be");
}

/// A query whose answer would pass `limits.max_answer_points` is refused through every member:
/// also through one that holds none of the data, where it is the member holding it that refuses
/// its part (before, that member was reported missing and the answer came back empty, 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_answer_too_large_is_refused_through_every_member() {
    let env = [("TOLLGATE_LIMITS_MAX_ANSWER_POINTS", "100")];
    let first = TestNode::start_member("n1", None, &env).await;
    let second = TestNode::start_member("n2", Some(&first.cluster_addr()), &env).await;
    wait_balanced(&[&first, &second]).await;
    // One pod: its series, of three providers, are on one member only.
    let base = now_seconds() - 120;
    first.metrics_client(0).await.export(fleet_export("limit-gw", base, 0, 1).0).await.unwrap();
    let end = base / 60 * 60 + 60;
    let metric = "/api/v1/metrics/meter_envoy_ai_gw_provider_request_cpm?service=limit-gw";
    for node in [&first, &second] {
        // 3 providers × 30 minutes: within.
        let (status, body) = node.get(&format!("{metric}&start={}&end={end}", end - 1800)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["series"].as_array().unwrap().len(), 3, "{body}");
        // 3 × 60: refused, and said why.
        let (status, body) = node.get(&format!("{metric}&start={}&end={end}", end - 3600)).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains("limits.max_answer_points"), "{body}");
    }
}

/// A node whose advertised cluster address is another node's (a configuration copied from it)
/// does not start: other nodes would reach that node when they mean this one. Given `--join`
/// with that same address, it took it for its own, skipped it, and bootstrapped a cluster of its
/// own, ready and silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_node_advertising_another_nodes_address_does_not_start() {
    let first = TestNode::start_member("n1", None, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let address = first.cluster_addr();
    let args = ["--node-id", "n2", "--advertise-addr", &address, "--join", &address];
    let mut env = common::CLUSTER_ENV.to_vec();
    env.push(("TOLLGATE_LOG", "warn"));
    let (status, stderr) = common::refused_start(dir.path(), &args, &env, "it started, and runs after 30 s").await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("advertised cluster address {address}")) && stderr.contains("reaches node n1"),
        "{stderr}"
    );
    let cluster = first.cluster_status().await;
    assert_eq!(cluster["nodes"].as_array().unwrap().len(), 1, "{cluster}");
}

/// A member frozen (`SIGSTOP`, a stalled VM) for longer than `failover_after_seconds` loses its
/// vnodes to the others, and what waited for it in its sockets meanwhile (an export sent to it
/// directly, one forwarded to it as an owner) was retried by the senders and merged by the new
/// owners. When it resumes, it must not merge those waiting exports as well (they were counted
/// twice): out of touch with the cluster for half of `failover_after_seconds`, it merges nothing
/// until it is back in touch and has applied what the leader committed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_member_frozen_past_failover_does_not_merge_what_waited_for_it() {
    use prost::Message as _;
    const PODS: u64 = 12;
    let env = [("TOLLGATE_CLUSTER_FAILOVER_AFTER_SECONDS", "8")];
    let nodes = three_nodes(&env).await;
    let leader = wait_for("a leader", || async { leader_name(&nodes[0].cluster_status().await) }).await;
    let frozen = nodes.iter().find(|n| n.endpoints.node_id != leader).expect("a follower");
    let receiver = nodes.iter().find(|n| n.endpoints.node_id != frozen.endpoints.node_id).expect("another");
    let owned = |status: &Value| status["vnodes"]["owners"][&frozen.endpoints.node_id].as_u64().unwrap_or(0);
    assert!(owned(&receiver.cluster_status().await) > 0, "the member to freeze owns vnodes");
    let base = now_seconds() - 200;
    let service = "frozen-gw";
    // Every export carries twelve pods: some of their series belong to the frozen member.
    let (direct, direct_requests) = fleet_export(service, base, 0, PODS);
    let (forwarded, forwarded_requests) = fleet_export(service, base, 1, PODS);

    frozen.signal("STOP");
    // Sent to it directly (OTLP/HTTP, as a load balancer would): the client gives up.
    let sent = frozen
        .http
        .post(format!("{}/v1/metrics", frozen.otlp_http()))
        .header("content-type", "application/x-protobuf")
        .body(direct.encode_to_vec())
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(sent.is_err(), "a frozen node does not answer: {sent:?}");
    // Sent to another member, which forwards the frozen member's series to it: refused once the
    // forward timed out, retryably.
    let mut client = receiver.metrics_client(0).await;
    let refused = client.export(forwarded.clone()).await.expect_err("the owner is frozen");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // After failover the frozen member's vnodes belong to the others, which take the retries.
    wait_for("the frozen member's vnodes given to the others", || async {
        (owned(&receiver.cluster_status().await) == 0).then_some(())
    })
    .await;
    for export in [&direct, &forwarded] {
        wait_for("a retry taken by the new owners", || async {
            let mut client = receiver.metrics_client(0).await;
            client.export(export.clone()).await.ok().map(|_| ())
        })
        .await;
    }

    frozen.signal("CONT");
    wait_for("the resumed member caught up with the new map", || async {
        let mine = frozen.cluster_status().await;
        let theirs = receiver.cluster_status().await;
        (mine["in_contact"] == true && mine["vnodes"]["epoch"] == theirs["vnodes"]["epoch"]).then_some(())
    })
    .await;
    // Whatever the resumed member was going to do with what waited for it, it has done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        let (requests, missing) = sum_of(node, "meter_envoy_ai_gw_request_cpm", service, base - 120, base + 120).await;
        assert_eq!(missing, None, "every member answered");
        assert_eq!(requests, (direct_requests + forwarded_requests) as f64, "each export counted once");
    }
}
