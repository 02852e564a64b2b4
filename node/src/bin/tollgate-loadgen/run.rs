//! Sending a workload: one task per lane, each with at most one export in flight, so the number of
//! lanes is the number of requests in flight and every pod's exports (which all sit in one lane)
//! arrive in order, as they do from a real pod.

use crate::grpc::{self, Signal};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// One encoded export and how many items (points or records) it carries.
#[derive(Clone, Debug)]
pub struct Export {
    /// The encoded `Export*ServiceRequest`.
    pub body: Bytes,
    /// Data points or log records in it.
    pub items: u64,
}

/// A source of exports for one lane, in sending order.
pub type Lane = Box<dyn Iterator<Item = Export> + Send>;

/// How to send.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// HTTP/2 connections the lanes share (lane `i` uses connection `i % connections`).
    pub connections: usize,
    /// Items per second over all lanes; 0 sends as fast as acknowledgements come back.
    pub rate: f64,
    /// Stop starting new exports after this long.
    pub duration: Option<Duration>,
    /// Attempts per export (an OTLP client retries retryable errors).
    pub max_attempts: u32,
    /// Compress requests with gzip.
    pub gzip: bool,
    /// Set from outside to stop the run (background load).
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { connections: 4, rate: 0.0, duration: None, max_attempts: 5, gzip: false, stop: None }
    }
}

/// What a run achieved.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// From the first send to the last acknowledgement.
    pub elapsed: Duration,
    /// Exports acknowledged.
    pub requests: u64,
    /// Items in acknowledged exports that the server did not reject.
    pub acked: u64,
    /// Items the server acknowledged but rejected (`partial_success`).
    pub rejected: u64,
    /// Attempts that failed (each retried, or given up after `max_attempts`).
    pub failed_attempts: u64,
    /// Items of exports given up on.
    pub lost: u64,
    /// The first failure's status, for the report.
    pub first_failure: Option<String>,
    /// Latency of each acknowledged export (send to acknowledgement of the last attempt), µs.
    pub latencies_us: Vec<u32>,
}

impl RunReport {
    /// Acknowledged items per second.
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency percentile (0..=100), milliseconds.
    pub fn latency_ms(&self, percentile: f64) -> f64 {
        percentile_ms(&self.latencies_us, percentile)
    }

    fn absorb(&mut self, other: RunReport) {
        self.requests += other.requests;
        self.acked += other.acked;
        self.rejected += other.rejected;
        self.failed_attempts += other.failed_attempts;
        self.lost += other.lost;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.latencies_us.extend(other.latencies_us);
    }

    /// One human-readable line.
    pub fn summary(&self, unit: &str) -> String {
        format!(
            "{:.0} {unit}/s acknowledged ({} {unit} in {:.2} s, {} requests), rejected {}, failed attempts {}, lost {}, latency p50 {:.2} ms p99 {:.2} ms{}",
            self.rate(),
            self.acked,
            self.elapsed.as_secs_f64(),
            self.requests,
            self.rejected,
            self.failed_attempts,
            self.lost,
            self.latency_ms(50.0),
            self.latency_ms(99.0),
            self.first_failure.as_ref().map(|f| format!(" (first failure: {f})")).unwrap_or_default(),
        )
    }
}

/// The `percentile` (0..=100, nearest rank) of microsecond samples, in milliseconds.
pub fn percentile_ms(samples_us: &[u32], percentile: f64) -> f64 {
    if samples_us.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples_us.to_vec();
    sorted.sort_unstable();
    let rank = ((percentile / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64 / 1000.0
}

/// Sends every lane's exports over `channels`; returns when all lanes are done (or stopped).
pub async fn run(signal: Signal, lanes: Vec<Lane>, channels: &[Channel], options: &RunOptions) -> RunReport {
    let lane_count = lanes.len().max(1);
    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, lane) in lanes.into_iter().enumerate() {
        let channel = channels[index % channels.len()].clone();
        let options = options.clone();
        // Each lane's share of the rate.
        let lane_rate = options.rate / lane_count as f64;
        tasks.spawn(run_lane(signal, lane, channel, options, lane_rate, started, deadline));
    }
    let mut report = RunReport::default();
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(lane) => report.absorb(lane),
            Err(e) => {
                report.first_failure.get_or_insert_with(|| format!("lane task failed: {e}"));
            }
        }
    }
    report.elapsed = started.elapsed();
    report
}

async fn run_lane(
    signal: Signal,
    lane: Lane,
    channel: Channel,
    options: RunOptions,
    lane_rate: f64,
    started: Instant,
    deadline: Option<Instant>,
) -> RunReport {
    let mut report = RunReport::default();
    let mut scheduled_items = 0.0f64;
    for export in lane {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if options.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        if lane_rate > 0.0 {
            // Open-loop pacing: this export is due when the lane's earlier items have had their
            // share of the time.
            let due = started + Duration::from_secs_f64(scheduled_items / lane_rate);
            scheduled_items += export.items as f64;
            tokio::time::sleep_until(due.into()).await;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = Instant::now();
            match grpc::export(&channel, signal, export.body.clone(), options.gzip).await {
                Ok(rejected) => {
                    let rejected = rejected.min(export.items);
                    report.requests += 1;
                    report.acked += export.items - rejected;
                    report.rejected += rejected;
                    report.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    break;
                }
                Err(status) => {
                    report.failed_attempts += 1;
                    report.first_failure.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
                    if !grpc::retryable(&status) || attempt >= options.max_attempts {
                        report.lost += export.items;
                        break;
                    }
                    // Exponential backoff as OTLP exporters do, short because this is a benchmark.
                    tokio::time::sleep(Duration::from_millis(20u64 << attempt.min(6))).await;
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_percentile_ms_uses_the_nearest_rank() {
        let samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&samples, 50.0), 50.0);
        assert_eq!(percentile_ms(&samples, 99.0), 99.0);
        assert_eq!(percentile_ms(&samples, 100.0), 100.0);
        assert_eq!(percentile_ms(&[1500], 99.0), 1.5);
        assert!(percentile_ms(&[], 50.0).is_nan());
    }
}
