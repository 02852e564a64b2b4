//! The owners' cache of aggregates holds about the newest minute of each series while
//! points arrive (not only after maintenance), and a late point into a minute that left the cache
//! merges with what the store holds for it. Checkpoints count the keys they write into the data
//! tree by record kind.

mod common;

use common::{now_seconds, TestNode};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use tollgate_rules::testing::{delta_duration, gateway_resource, Convention};

const SERVICE: &str = "cache-gw";
const PODS: u64 = 4;

/// One delta request-duration point of `count` requests at `time` (seconds) for each pod.
fn export(time: u64, count: u64) -> ExportMetricsServiceRequest {
    let resource_metrics = (0..PODS)
        .map(|pod| ResourceMetrics {
            resource: Some(gateway_resource(Convention::AigwService, SERVICE, Some(&format!("pod-{pod}")))),
            scope_metrics: vec![ScopeMetrics { metrics: vec![delta_duration(time, count, 0.5)], ..Default::default() }],
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cache_keeps_the_newest_minutes_while_points_arrive_and_late_points_read_back() {
    let node = TestNode::start().await;
    let mut client = node.metrics_client(0).await;
    // Nine minutes of one series per pod, a minute apart, each export acknowledged (durable)
    // before the next, all within the default lateness window (600 s).
    let first = (now_seconds() / 60 - 9) * 60 + 10;
    for minute in 0..9 {
        client.export(export(first + minute * 60, 1)).await.expect("export accepted");
    }
    let series = node.self_metric("tollgate_series_active").await;
    assert_eq!(series, PODS as f64);
    // The newest minute of each series, and the one before it until the next message drops it
    // (it is dropped only once everything written before is durable). Without eviction as minutes
    // move on, the cache would hold all nine until maintenance (every 10 s) ran.
    let cached = node.self_metric("tollgate_states_cached").await;
    assert!(
        (series..=2.0 * series).contains(&cached),
        "{cached} aggregates cached for {series} series after nine minutes of each"
    );

    // A late point into the second minute, which left the cache: the minute then holds both
    // points' requests (a point that started from an empty aggregate would show only the late
    // one's).
    let second = first + 60;
    client.export(export(second + 20, 5)).await.expect("late export accepted");
    let minute = (second / 60 * 60) as i64;
    let cpm = node.value("meter_envoy_ai_gw_request_cpm", SERVICE, None, &serde_json::json!({}), minute).await;
    assert_eq!(cpm, Some((PODS * (1 + 5)) as f64), "requests in the late point's minute");
    // The newest minute is untouched by the late point.
    let newest = ((first + 8 * 60) / 60 * 60) as i64;
    let cpm = node.value("meter_envoy_ai_gw_request_cpm", SERVICE, None, &serde_json::json!({}), newest).await;
    assert_eq!(cpm, Some(PODS as f64), "requests in the newest minute");
}

/// `tollgate_store_checkpoint_keys_total` for one record kind (0 while none was written).
async fn checkpoint_keys(node: &TestNode, record: &str) -> f64 {
    let name = format!("tollgate_store_checkpoint_keys_total{{record=\"{record}\"}}");
    node.self_metric_opt(&name).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_checkpoints_count_the_keys_they_write_by_record_kind() {
    let node = TestNode::start_with(&[("TOLLGATE_STORAGE_CHECKPOINT_INTERVAL_MS", "100")], &[]).await;
    let mut client = node.metrics_client(0).await;
    // Three minutes of one series per pod, each export acknowledged before the next.
    let first = (now_seconds() / 60 - 5) * 60 + 10;
    for minute in 0..3 {
        client.export(export(first + minute * 60, 1)).await.expect("export accepted");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while node.self_metric("tollgate_store_memtable_bytes").await > 0.0 {
        assert!(std::time::Instant::now() < deadline, "the memtable was not checkpointed within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A key is written once per checkpoint however often it changed since the last one: each
    // series record and each minute state once, each series' cursor once or more (the exports may
    // straddle checkpoints), nothing rolled up yet (the minutes are within the lateness window).
    assert_eq!(checkpoint_keys(&node, "series").await, PODS as f64, "series records");
    assert_eq!(checkpoint_keys(&node, "minute").await, (3 * PODS) as f64, "minute states");
    let cursors = checkpoint_keys(&node, "cursor").await;
    assert!((PODS as f64..=(3 * PODS) as f64).contains(&cursors), "{cursors} cursors written for {PODS} series");
    assert_eq!(checkpoint_keys(&node, "hour").await, 0.0, "hour states");
    assert_eq!(checkpoint_keys(&node, "other").await, 0.0, "keys of no known kind");
}
