//! The node's CPU in a steady state: gateway pods exporting once a minute in real time, each
//! minute closing as the next one starts, the owners' maintenance (hour and day roll-ups) run
//! every minute. The figures of `make bench` send bursts, which close minutes many at a time;
//! this is what a fleet sending in real time costs (docs/benchmarks-history.md, steps 35 and 36).
//!
//! `cargo bench -p tollgate --bench steady_state` (`PODS`, `MINUTES` in the environment, and any
//! `TOLLGATE_*` setting as for `tollgate serve`). An in-process node on loopback ports with its
//! clock driven here ([`ManualClock`]); exports through a real gRPC client in the same process, so
//! the CPU counted (the whole process's, until every write reached the data tree) includes the
//! client's encoding. Then queries of every service over the whole run, timed, and the process's
//! memory.

// A benchmark reports on standard output.
#![allow(clippy::print_stdout)]

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use std::sync::Arc;
use tollgate::{ManualClock, Node, NodeConfig};
use tollgate_rules::fleet::GatewayPod;

// The allocator the node runs with (`node/src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds of this process so far (user and system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|v| v.parse::<f64>().ok()).expect("utime and stime");
    (ticks(11) + ticks(12)) / 100.0
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn metric(api: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn maintain(node: &Node) {
    for owner in node.owners() {
        owner.maintain().await.expect("maintenance");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // As the node's binary does (docs/benchmarks-history.md step 20).
    if let Err(error) = tollgate::os::disable_transparent_huge_pages() {
        eprintln!("transparent huge pages stay on: {error}");
    }
    let pods_n = env_or("PODS", 200) as usize;
    let minutes = env_or("MINUTES", 40);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let t0 = now / 3600 * 3600 - 3 * 3600;
    let clock = ManualClock::new(t0 * 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    // `TOLLGATE_*` variables apply as they do to `tollgate serve` (e.g.
    // `TOLLGATE_STORAGE_CACHE_CAPACITY_BYTES`), so settings can be compared.
    let environment = std::env::vars().collect();
    let mut config = NodeConfig { data_dir: dir.path().to_path_buf(), ..NodeConfig::default() }
        .with_environment(&environment)
        .expect("TOLLGATE_* variables are valid");
    let any = "127.0.0.1:0".parse().unwrap();
    config.otlp_grpc_addrs = vec![any];
    config.otlp_http_addr = any;
    config.http_addr = any;
    config.cluster_addr = any;
    let node = Node::start(config, Arc::new(clock.clone())).await.expect("node starts");
    let api = format!("http://{}", node.endpoints.http);
    let client = MetricsServiceClient::connect(format!("http://{}", node.endpoints.otlp_grpc[0])).await.unwrap();
    let mut pods: Vec<GatewayPod> =
        (0..pods_n).map(|i| GatewayPod::new(&format!("gw-{}", i % 10), &format!("pod-{i}"), 6, true, 60, t0)).collect();
    let series = pods_n * pods.first().map_or(0, GatewayPod::points_per_export);
    println!(
        "steady state: {pods_n} gateway pods of 10 services, {series} series, cumulative, one export a minute for {minutes} minutes, every owner maintained each minute, then the pods stop and a lateness window later every minute is rolled up"
    );
    let (mut exports_cpu, mut maintenance_cpu) = (0.0, 0.0);
    let started_cpu = cpu_seconds();
    for minute in 0..minutes {
        clock.set((t0 + (minute + 1) * 60 + 5) * 1_000_000_000);
        let requests: Vec<_> = pods.iter_mut().map(|pod| pod.export(minute)).collect();
        let before = cpu_seconds();
        let mut lanes = Vec::new();
        for lane in requests.chunks(requests.len().div_ceil(20).max(1)) {
            let (mut client, lane) = (client.clone(), lane.to_vec());
            lanes.push(tokio::spawn(async move {
                for request in lane {
                    client.export(request).await.expect("export acknowledged");
                }
            }));
        }
        for lane in lanes {
            lane.await.unwrap();
        }
        let exported = cpu_seconds();
        maintain(&node).await;
        exports_cpu += exported - before;
        maintenance_cpu += cpu_seconds() - exported;
    }
    clock.set((t0 + (minutes + 12) * 60) * 1_000_000_000);
    let before = cpu_seconds();
    maintain(&node).await;
    maintenance_cpu += cpu_seconds() - before;
    while metric(&api, "tollgate_store_memtable_bytes").await > 0.0 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let total = cpu_seconds() - started_cpu;
    let rolled = metric(&api, "tollgate_rolled_up_minutes_total").await;
    let per = |cpu: f64| cpu * 1e6 / (series as f64 * minutes as f64);
    // Exports and maintenance are the windows in which each ran; the writer and the checkpointer
    // work in the background throughout, so each window holds its share of them.
    println!(
        "  CPU: {total:.2} s in all ({:.1} µs per series and minute): exports {exports_cpu:.2} s ({:.1} µs), maintenance {maintenance_cpu:.2} s ({:.1} µs), the rest (checkpoints after the last minute) {:.2} s; {rolled} minutes rolled up",
        per(total),
        per(exports_cpu),
        per(maintenance_cpu),
        total - exports_cpu - maintenance_cpu,
    );
    // What the checkpoints wrote into sled, per series and minute, by record kind.
    let text = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap();
    let kinds: Vec<(String, f64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("tollgate_store_checkpoint_keys_total{record=\""))
        .filter_map(|rest| {
            let (kind, value) = rest.split_once("\"} ")?;
            Some((kind.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    let keys: f64 = kinds.iter().map(|(_, count)| count).sum();
    let per_series_minute = |count: f64| count / (series as f64 * minutes as f64);
    println!(
        "  keys written into the data tree: {:.2} per series and minute ({})",
        per_series_minute(keys),
        kinds
            .iter()
            .map(|(kind, count)| format!("{kind} {:.3}", per_series_minute(*count)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Queries once every write reached the data tree: per service, the latency percentiles and
    // the per-model request rate over the whole run, minute by minute (what a dashboard asks).
    let (start, end) = (t0, t0 + (minutes + 1) * 60);
    let mut took = Vec::new();
    for service in 0..10 {
        for metric in ["meter_envoy_ai_gw_request_latency_percentile", "meter_envoy_ai_gw_model_request_cpm"] {
            let url = format!("{api}/api/v1/metrics/{metric}?service=gw-{service}&start={start}&end={end}");
            let asked = std::time::Instant::now();
            let response = reqwest::get(&url).await.unwrap();
            assert!(response.status().is_success(), "{url}: {}", response.status());
            response.bytes().await.unwrap();
            took.push(asked.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "  queries from the data tree ({}, each over one service's {minutes} minutes): mean {:.1} ms, slowest {:.1} ms; RSS {:.0} MiB (peak {:.0} MiB)",
        took.len(),
        took.iter().sum::<f64>() / took.len() as f64,
        took.iter().copied().fold(0.0, f64::max),
        status_mib("VmRSS"),
        status_mib("VmHWM"),
    );
    node.shutdown().await;
}

/// A `/proc/self/status` memory field, in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
