//! Freshness: how long after an export was acknowledged its value is visible in the query API.
//!
//! A probe pod exports a small delta export (one model: its four histograms) stamped with the
//! current time; as soon as the export is acknowledged, the probe asks
//! `GET /api/v1/metrics/meter_envoy_ai_gw_request_cpm` for the current minute until the value
//! includes the export. Freshness is the time from the acknowledgement to the response that shows
//! the value. The baseline is the latency of the very same query right after (the data is there
//! by then): what reading costs when nothing has to become visible.

use crate::grpc::{self, Signal};
use anyhow::{bail, Context};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tollgate_rules::fleet::GatewayPod;

/// Longest a value may take to appear before the sample counts as not visible.
const VISIBLE_DEADLINE: Duration = Duration::from_secs(10);

/// Samples of one freshness run.
#[derive(Clone, Debug, Default)]
pub struct FreshnessReport {
    /// Acknowledgement → value visible, µs.
    pub freshness_us: Vec<u32>,
    /// The same query once the value is there, µs.
    pub query_us: Vec<u32>,
    /// Queries that did not show the value yet.
    pub early_polls: u64,
    /// Samples whose value did not appear within the deadline.
    pub not_visible: u64,
    /// Export acknowledgement latency, µs.
    pub ack_us: Vec<u32>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

async fn query_value(http: &reqwest::Client, url: &str) -> anyhow::Result<Option<f64>> {
    let response = http.get(url).send().await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    if !status.is_success() {
        bail!("query failed with {status}: {body}");
    }
    Ok(body["series"].as_array().and_then(|s| s.first()).and_then(|s| s["points"][0][1].as_f64()))
}

/// Runs `samples` probes against a node (`grpc_target` for exports, `api` for queries) with
/// `pause` between them, as service `service`.
pub async fn measure(
    grpc_target: &str,
    api: &str,
    service: &str,
    samples: usize,
    pause: Duration,
) -> anyhow::Result<FreshnessReport> {
    let channel = grpc::connect(grpc_target, 1).await?.remove(0);
    let http = reqwest::Client::builder().pool_max_idle_per_host(4).build()?;
    let started = now_ns() / 1_000_000_000;
    let mut pod = GatewayPod::new(service, &format!("{service}-probe"), 1, false, 1, started.saturating_sub(1));
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    let mut report = FreshnessReport::default();
    for sample in 0..samples as u64 {
        let mut request = pod.export(sample);
        // Stamp with the current time (ns, so no two probes share a point key).
        let time_ns = now_ns();
        let mut calls = 0u64;
        for resource in &mut request.resource_metrics {
            for scope in &mut resource.scope_metrics {
                for metric in &mut scope.metrics {
                    if let Some(Data::Histogram(histogram)) = &mut metric.data {
                        for point in &mut histogram.data_points {
                            point.time_unix_nano = time_ns;
                            point.start_time_unix_nano = time_ns - 1_000_000_000;
                            if metric.name == "gen_ai.server.request.duration" {
                                calls += point.count;
                            }
                        }
                    }
                }
            }
        }
        let minute = time_ns / 60_000_000_000;
        let total = *expected.entry(minute).and_modify(|c| *c += calls).or_insert(calls);
        let body = request.encode_to_vec().into();
        let sent = Instant::now();
        let rejected = grpc::export(&channel, Signal::Metrics, body, false).await.context("probe export")?;
        let acked = Instant::now();
        if rejected > 0 {
            bail!("the probe export was rejected in part ({rejected} points)");
        }
        report.ack_us.push((acked - sent).as_micros() as u32);
        let url = format!(
            "{api}/api/v1/metrics/meter_envoy_ai_gw_request_cpm?service={service}&start={}&end={}",
            minute * 60,
            minute * 60 + 60
        );
        loop {
            let value = query_value(&http, &url).await?;
            if value.is_some_and(|v| (v - total as f64).abs() < 1e-6) {
                report.freshness_us.push(acked.elapsed().as_micros() as u32);
                let again = Instant::now();
                query_value(&http, &url).await?;
                report.query_us.push(again.elapsed().as_micros() as u32);
                break;
            }
            report.early_polls += 1;
            if acked.elapsed() > VISIBLE_DEADLINE {
                report.not_visible += 1;
                break;
            }
        }
        tokio::time::sleep(pause).await;
    }
    Ok(report)
}
