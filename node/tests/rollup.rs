//! Hour and day roll-ups (in-process node, maintenance driven by the test): a step's value is the
//! same before and after its minutes are rolled up, and merges behind the roll-up frontier reach
//! the roll-ups too; when minutes are rolled up (ten at a time, a quiet partition at once, none
//! left for the retention sweep to delete first).

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use serde_json::Value;
use std::sync::Arc;
use tollgate::{Node, NodeConfig, SystemClock};
use tollgate_rules::testing::{delta_duration, gateway_resource, Convention};

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The rate metric the tests read back.
const CPM: &str = "meter_envoy_ai_gw_request_cpm";
const MINUTE: u64 = 60;

fn export(time: u64, count: u64, seconds: f64) -> ExportMetricsServiceRequest {
    export_of("roll-gw", time, count, seconds)
}

/// `count` requests of `seconds` each at `time`, from pod `pod-0` of `service`.
fn export_of(service: &str, time: u64, count: u64, seconds: f64) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(gateway_resource(Convention::JobName, service, Some("pod-0"))),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![delta_duration(time, count, seconds)],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A node on loopback ports with 8 vnodes and its store in `dir`, after `configure`; its API URL
/// and a metrics client.
async fn start_node(
    dir: &std::path::Path,
    clock: Arc<dyn tollgate::Clock>,
    configure: impl FnOnce(&mut NodeConfig),
) -> (Node, String, MetricsServiceClient<tonic::transport::Channel>) {
    let mut config = NodeConfig { data_dir: dir.to_path_buf(), ..NodeConfig::default() };
    let any = "127.0.0.1:0".parse().unwrap();
    config.otlp_grpc_addrs = vec![any];
    config.otlp_http_addr = any;
    config.http_addr = any;
    config.cluster_addr = any;
    config.cluster.vnodes = 8;
    configure(&mut config);
    let node = Node::start(config, clock).await.unwrap();
    let api = format!("http://{}", node.endpoints.http);
    let client = MetricsServiceClient::connect(format!("http://{}", node.endpoints.otlp_grpc[0])).await.unwrap();
    (node, api, client)
}

/// Minutes kept an hour (the shortest retention allowed), swept every second.
fn minutes_kept_an_hour(config: &mut NodeConfig) {
    config.retention.minute_seconds = 3600;
    config.retention.sweep_interval_seconds = 1;
}

/// Sets the rules' lateness window through the cluster API.
async fn set_lateness(api: &str, seconds: u64) {
    let status = reqwest::Client::new()
        .put(format!("{api}/api/v1/config/rules"))
        .body(format!("normalize:\n  max_lateness_seconds: {seconds}\n"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// Runs every owner's maintenance (roll-ups) now.
async fn maintain(node: &Node) {
    for owner in node.owners() {
        owner.maintain().await.unwrap();
    }
}

async fn points(api: &str, metric: &str, start: u64, end: u64, step: &str) -> Value {
    series_of(api, metric, "roll-gw", start, end, step).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rollups_match_minutes_and_include_merges_behind_the_frontier() {
    let dir = tempfile::tempdir().unwrap();
    let (node, api, mut client) = start_node(dir.path(), Arc::new(SystemClock), |_| {}).await;

    // Three hours of data, one point every 7 minutes, ending two hours ago.
    let day = now_seconds() / 86_400 * 86_400;
    let first = now_seconds() / 3600 * 3600 - 5 * 3600;
    let mut expected_requests = 0;
    for (index, time) in (first..first + 3 * 3600).step_by(420).enumerate() {
        let count = index as u64 % 4 + 1;
        expected_requests += count;
        client.export(export(time, count, 0.25 * (index % 3 + 1) as f64)).await.unwrap();
    }
    let range = (first - 3600, first + 4 * 3600);
    let day_range = (day - 86_400, day + 86_400);
    // An end in the middle of an hour that will be rolled up: its step counts whole either way.
    let mid_hour_end = first + 3600 + 1800;
    let metrics = [CPM, "meter_envoy_ai_gw_request_latency_avg", "meter_envoy_ai_gw_request_latency_percentile"];
    let mut before = Vec::new();
    for metric in metrics {
        before.push(points(&api, metric, range.0, range.1, "hour").await);
        before.push(points(&api, metric, day_range.0, day_range.1, "day").await);
        before.push(points(&api, metric, range.0, mid_hour_end, "hour").await);
    }
    let whole_hour = &before[0][0]["points"][2];
    assert_eq!(whole_hour[0], first + 3600);
    assert_eq!(before[2][0]["points"].as_array().unwrap().last(), Some(whole_hour), "the last step counts whole");
    let hourly: f64 =
        before[0][0]["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).map(|v| v * 60.0).sum();
    assert!((hourly - expected_requests as f64).abs() < 1e-3, "{hourly} vs {expected_requests}");

    // Roll up everything closed (all but the last lateness window of the partition).
    maintain(&node).await;
    let mut after = Vec::new();
    for metric in metrics {
        after.push(points(&api, metric, range.0, range.1, "hour").await);
        after.push(points(&api, metric, day_range.0, day_range.1, "day").await);
        after.push(points(&api, metric, range.0, mid_hour_end, "hour").await);
    }
    assert_eq!(after, before, "roll-ups answer exactly like the minutes they replace");
    let metrics = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap();
    let rolled: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_rolled_up_minutes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("roll-up counter");
    assert!(rolled >= 20.0, "the closed minutes were rolled up ({rolled})");

    // Widen the lateness window, then merge a point into a minute that was rolled up already: the
    // hour and day values include it, and the minute value too. The point is of another series of
    // the partition (another provider): the series exported until now forgot the keys of its
    // points that old under the shorter window, so a point of it that old is refused, since it
    // cannot be told from a retry of one of them (SPEC §1.5: never merged twice).
    set_lateness(&api, 86400).await;
    let late = first + 61;
    let response = client.export(export(late, 5, 0.25)).await.unwrap().into_inner();
    let refused = response.partial_success.expect("a point of the same series that old is refused");
    assert_eq!(refused.rejected_data_points, 1, "{refused:?}");
    assert!(refused.error_message.contains("too_late"), "{refused:?}");
    let mut other = export(late, 5, 0.25);
    let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(histogram)) =
        other.resource_metrics[0].scope_metrics[0].metrics[0].data.as_mut()
    else {
        panic!("a histogram")
    };
    histogram.data_points[0].attributes =
        vec![tollgate_rules::testing::string_attribute("gen_ai.provider.name", "aws.bedrock")];
    let response = client.export(other).await.unwrap().into_inner();
    assert!(response.partial_success.is_none(), "{response:?}");
    let hour = points(&api, CPM, range.0, range.1, "hour").await;
    let hourly: f64 =
        hour[0]["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).map(|v| v * 60.0).sum();
    assert!((hourly - (expected_requests + 5) as f64).abs() < 1e-3, "{hourly}");
    maintain(&node).await;
    let minute = points(&api, CPM, range.0, range.1, "minute").await;
    let total: f64 = minute[0]["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).sum();
    assert_eq!(total, (expected_requests + 5) as f64);
    let day_after = points(&api, CPM, day_range.0, day_range.1, "day").await;
    let daily: f64 =
        day_after[0]["points"].as_array().unwrap().iter().filter_map(|p| p[1].as_f64()).map(|v| v * 1440.0).sum();
    assert!((daily - (expected_requests + 5) as f64).abs() < 1e-2, "{daily}");
    node.shutdown().await;
}

/// The series of `metric` for `service` at one step over `[start, end)`.
async fn series_of(api: &str, metric: &str, service: &str, start: u64, end: u64, step: &str) -> Value {
    let url = format!("{api}/api/v1/metrics/{metric}?service={service}&start={start}&end={end}&step={step}");
    let body: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    body["series"].clone()
}

fn values(series: &Value) -> Vec<f64> {
    series
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p[1].as_f64())
        .collect()
}

/// Waits until the retention sweep deleted `service`'s minutes of `metric` in `[start, end)`.
async fn wait_until_swept(api: &str, metric: &str, service: &str, start: u64, end: u64) {
    let started = std::time::Instant::now();
    while !values(&series_of(api, metric, service, start, end, "minute").await).is_empty() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the retention sweep never ran");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_quiet_partitions_are_rolled_up_before_their_minutes_expire() {
    const SERVICE: &str = "quiet-gw";
    let t0 = now_seconds() / 3600 * 3600 - 3600;
    let clock = tollgate::ManualClock::new((t0 + 5 * MINUTE) * 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (node, api, mut client) = start_node(dir.path(), Arc::new(clock.clone()), minutes_kept_an_hour).await;

    // Five minutes of a pod, then it stops. Its newest minute is not a lateness window old yet:
    // nothing is closed.
    let mut requests = 0;
    for minute in 0..5 {
        client.export(export_of(SERVICE, t0 + minute * MINUTE + 1, minute + 1, 0.5)).await.unwrap();
        requests += minute + 1;
    }
    let (start, end) = (t0 - 3600, t0 + 2 * 3600);
    let minutes = series_of(&api, CPM, SERVICE, start, end, "minute").await;
    assert_eq!(values(&minutes).iter().sum::<f64>(), requests as f64);
    let hours = series_of(&api, CPM, SERVICE, start, end, "hour").await;
    assert!((values(&hours).iter().sum::<f64>() * 60.0 - requests as f64).abs() < 1e-6, "{hours}");

    // A lateness window later the partition is quiet: maintenance closes all its minutes.
    clock.advance(11 * MINUTE * 1_000_000_000);
    maintain(&node).await;
    // Two hours later the minutes are past their retention (one hour) and the sweep deletes them;
    // the hour step still answers exactly as before.
    clock.advance(2 * 3600 * 1_000_000_000);
    wait_until_swept(&api, CPM, SERVICE, start, end).await;
    assert_eq!(
        series_of(&api, CPM, SERVICE, start, end, "hour").await,
        hours,
        "the hour step lost the quiet pod's minutes"
    );
    node.shutdown().await;
}

/// A pod that keeps sending is rolled up ten closed minutes at a time (each roll-up rewrites
/// every series' hour and day states), a quiet one at once; the hour and day steps answer the
/// same whether a minute is rolled up yet or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rollups_wait_for_ten_closed_minutes_unless_the_partition_is_quiet() {
    use tollgate::store::{SledStorage, Storage};
    const SERVICE: &str = "steady-gw";
    let t0 = now_seconds() / 3600 * 3600 - 3 * 3600;
    let m0 = t0 / MINUTE;
    let clock = tollgate::ManualClock::new(t0 * 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (start, end) = (t0 - 3600, t0 + 3 * 3600);
    let partition = tollgate_rules::entity::partition_hash(SERVICE, Some("pod-0"));
    let vnode = tollgate::ingest::vnode_of(partition, 8);
    // The frontier, read from the stopped node's store.
    let frontier = |dir: &std::path::Path| {
        let store = SledStorage::open(dir, &Default::default()).unwrap();
        store.rolled_until(vnode, partition).unwrap()
    };
    let mut requests = 0;
    // Requests in minute `minute`.
    let count = |minute: u64| minute % 5 + 1;
    // Moves the clock five seconds into minute `minute` and exports that minute's requests.
    let send = |client: &mut MetricsServiceClient<tonic::transport::Channel>, minute: u64| {
        let request = export_of(SERVICE, t0 + minute * MINUTE + 1, count(minute), 0.5);
        clock.set((t0 + minute * MINUTE + 5) * 1_000_000_000);
        let mut client = client.clone();
        async move { client.export(request).await.unwrap() }
    };
    let check_steps = |api: String, requests: u64| async move {
        let minutes = values(&series_of(&api, CPM, SERVICE, start, end, "minute").await);
        assert_eq!(minutes.iter().sum::<f64>(), requests as f64);
        for (step, minutes_per_step) in [("hour", 60.0), ("day", 1440.0)] {
            let total = values(&series_of(&api, CPM, SERVICE, start, end, step).await).iter().sum::<f64>();
            assert!((total * minutes_per_step - requests as f64).abs() < 1e-3, "{step}: {total} vs {requests}");
        }
    };

    // Minutes 0 to 19: at minute 10, minute 0 is a lateness window (10 minutes) behind and the
    // first ten minutes before it are rolled up; minutes 0 to 8 are closed since, but only nine.
    let (node, api, mut client) = start_node(dir.path(), Arc::new(clock.clone()), |_| {}).await;
    for minute in 0..20 {
        send(&mut client, minute).await;
        requests += count(minute);
        maintain(&node).await;
    }
    check_steps(api, requests).await;
    node.shutdown().await;
    assert_eq!(frontier(dir.path()), m0, "nine closed minutes wait");

    // Minute 20 closes a tenth: minutes 0 to 9 are rolled up together.
    let (node, api, mut client) = start_node(dir.path(), Arc::new(clock.clone()), |_| {}).await;
    send(&mut client, 20).await;
    requests += count(20);
    maintain(&node).await;
    check_steps(api, requests).await;
    node.shutdown().await;
    assert_eq!(frontier(dir.path()), m0 + 10, "ten closed minutes are rolled up");

    // With a lateness window of two minutes, minutes 21 to 24 close minutes 19 to 22: the ten
    // up to minute 19 are rolled up at minute 22, then two wait. The pod stops: two minutes later
    // its partition is quiet and every minute is rolled up, however few.
    let (node, api, mut client) = start_node(dir.path(), Arc::new(clock.clone()), |_| {}).await;
    set_lateness(&api, 120).await;
    for minute in 21..25 {
        send(&mut client, minute).await;
        requests += count(minute);
        maintain(&node).await;
    }
    check_steps(api.clone(), requests).await;
    clock.advance(3 * MINUTE * 1_000_000_000);
    maintain(&node).await;
    check_steps(api, requests).await;
    node.shutdown().await;
    assert_eq!(frontier(dir.path()), m0 + 25, "a quiet partition is rolled up to its newest minute");
}

/// A lateness window longer than the minutes' retention (both are allowed: up to a day, at least
/// an hour) must not let the sweep delete minutes before they are rolled up: a partition that
/// keeps sending is never quiet, and its minutes would close only a day later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_minutes_are_rolled_up_before_retention_with_a_long_lateness_window() {
    const SERVICE: &str = "late-gw";
    let t0 = now_seconds() / 3600 * 3600 - 4 * 3600;
    let clock = tollgate::ManualClock::new(t0 * 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (node, api, mut client) = start_node(dir.path(), Arc::new(clock.clone()), minutes_kept_an_hour).await;
    set_lateness(&api, 86400).await;
    // The pod sends a minute every ten for two hours; each time the owners are maintained.
    let mut requests = 0;
    for minute in (0..120).step_by(10) {
        clock.set((t0 + minute * MINUTE + 5) * 1_000_000_000);
        client.export(export_of(SERVICE, t0 + minute * MINUTE + 1, minute / 10 + 1, 0.5)).await.unwrap();
        requests += minute / 10 + 1;
        maintain(&node).await;
    }
    // The clock is at minute 110: the sweep deletes minutes 0 to 40, an hour old.
    let (start, end) = (t0 - 3600, t0 + 3 * 3600);
    wait_until_swept(&api, CPM, SERVICE, start, t0 + 45 * MINUTE).await;
    let hours = values(&series_of(&api, CPM, SERVICE, start, end, "hour").await);
    assert!(
        (hours.iter().sum::<f64>() * 60.0 - requests as f64).abs() < 1e-6,
        "the hour step lost minutes the sweep deleted before they were rolled up: {hours:?}, {requests} requests"
    );
    node.shutdown().await;
}

/// The first points of a new partition may be of any age: points of minutes already past their
/// retention are merged as minutes and rolled up later. The sweep must not delete them before
/// that, or they are lost to the hour and day steps although they were acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_minutes_merged_already_past_retention_reach_their_hour_and_day() {
    const SERVICE: &str = "old-gw";
    let now = now_seconds();
    let t0 = now / 3600 * 3600 - 3 * 3600;
    let clock = tollgate::ManualClock::new(now * 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (node, api, mut client) = start_node(dir.path(), Arc::new(clock.clone()), minutes_kept_an_hour).await;
    // Minutes 2 to 3 hours old, a new partition's first points: accepted.
    let mut requests = 0;
    for minute in 0..30 {
        client.export(export_of(SERVICE, t0 + minute * MINUTE + 1, 1, 0.5)).await.unwrap();
        requests += 1;
    }
    let (start, end) = (t0 - 3600, now + 3600);
    let hours = |series: Value| values(&series).iter().sum::<f64>() * 60.0;
    assert_eq!(hours(series_of(&api, CPM, SERVICE, start, end, "hour").await), requests as f64);
    // Sweeps run (every second) before any roll-up: the hour step still counts every request.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        hours(series_of(&api, CPM, SERVICE, start, end, "hour").await),
        requests as f64,
        "the sweep deleted minutes not rolled up yet"
    );
    // Rolled up, the minutes go at the next sweep; the hour and day steps keep them.
    maintain(&node).await;
    wait_until_swept(&api, CPM, SERVICE, start, end).await;
    assert_eq!(hours(series_of(&api, CPM, SERVICE, start, end, "hour").await), requests as f64);
    let days = values(&series_of(&api, CPM, SERVICE, start, end, "day").await).iter().sum::<f64>() * 1440.0;
    // The API gives 6 decimals: a day's rate of 30 requests is 0.020833 a minute.
    assert!((days - requests as f64).abs() < 2e-3, "the day step: {days}, {requests} requests");
    node.shutdown().await;
}

/// A partition that sends access logs only (no metrics) has its log-derived metrics rolled up
/// into hours and days like any other: the hour step keeps them once their minutes are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_partition_that_sends_only_access_logs_is_rolled_up() {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use tollgate_rules::testing::string_attribute;
    const SERVICE: &str = "logs-only-gw";
    const LOG_CPM: &str = "meter_envoy_ai_gw_log_request_cpm";
    let t0 = now_seconds() / 3600 * 3600 - 3600;
    let clock = tollgate::ManualClock::new((t0 + 5 * MINUTE) * 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (node, api, _) = start_node(dir.path(), Arc::new(clock.clone()), minutes_kept_an_hour).await;
    let mut logs = LogsServiceClient::connect(format!("http://{}", node.endpoints.otlp_grpc[0])).await.unwrap();
    let records = (0..5)
        .map(|minute| LogRecord {
            time_unix_nano: (t0 + minute * MINUTE + 1) * 1_000_000_000,
            attributes: vec![string_attribute("gen_ai.request.model", "m"), string_attribute("response_code", "200")],
            ..Default::default()
        })
        .collect();
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(gateway_resource(Convention::JobName, SERVICE, Some("pod-0"))),
            scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
            ..Default::default()
        }],
    };
    logs.export(request).await.unwrap();
    let (start, end) = (t0 - 3600, t0 + 2 * 3600);
    let hours = series_of(&api, LOG_CPM, SERVICE, start, end, "hour").await;
    // The API gives 6 decimals: 5 requests in an hour are 0.083333 a minute.
    assert!((values(&hours).iter().sum::<f64>() * 60.0 - 5.0).abs() < 1e-3, "{hours}");

    // Quiet a lateness window later: maintenance rolls its minutes up (by the partition's log
    // clock: it has no points). Past their retention the minutes go; the hour step keeps them.
    clock.advance(11 * MINUTE * 1_000_000_000);
    maintain(&node).await;
    clock.advance((2 * 3600) * 1_000_000_000);
    wait_until_swept(&api, LOG_CPM, SERVICE, start, end).await;
    assert_eq!(
        series_of(&api, LOG_CPM, SERVICE, start, end, "hour").await,
        hours,
        "the hour step lost the log-only partition's minutes"
    );
    node.shutdown().await;
}
