//! The benchmark driver behind `make bench`: real `tollgate serve` processes and the no-op sink
//! on loopback, loaded by this process, each figure printed as
//! `bench <name>: <value> <unit> (baseline <what> <value> <unit>, ratio <r>)` with its baseline
//! measured in the same run. Lines starting with two spaces are details; the `bench` lines are
//! repeated in a summary at the end (with the pipeline figures of the criterion bench when its
//! output is given).
//!
//! The node, the sink and the load generator share the machine (2 cores here): nothing is pinned,
//! and the load generator's CPU is kept small by encoding every export before a run starts.
//! Method and interpretation: docs/benchmarks.md.

use crate::fleet::{self, FleetSpec};
use crate::grpc::{self, Signal};
use crate::process::{self, NodeProcess, SinkProcess};
use crate::run::{self, Export, RunOptions, RunReport};
use crate::{accesslog, freshness, unix_now};
use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::ingest::vnode_of;
use tollgate_rules::entity::partition_hash;

/// A figure as `make bench` prints it (docs/benchmarks.md): `bench <name>: <value> <unit>
/// (baseline <what> <value> <unit>, ratio <r>)`, values with `decimals` decimals.
fn bench_line(name: &str, value: f64, baseline_what: &str, baseline: f64, unit: &str, decimals: usize) -> String {
    format!(
        "bench {name}: {value:.decimals$} {unit} (baseline {baseline_what} {baseline:.decimals$} {unit}, ratio {:.2})",
        value / baseline
    )
}

/// Options of `tollgate-loadgen bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The `tollgate` binary (default: the one next to this executable).
    #[arg(long)]
    tollgate: Option<PathBuf>,
    /// Where the data directories go (default: a new directory in the system's temporary
    /// directory, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the data directories.
    #[arg(long)]
    keep: bool,
    /// Small loads: checks that the driver works, the figures mean nothing.
    #[arg(long)]
    quick: bool,
    /// Only these figures: metrics, logs, freshness, memory (memory and restart share one load),
    /// cluster.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Output of `cargo bench -p tollgate-rules --bench pipeline`; its `bench` lines join the
    /// summary.
    #[arg(long)]
    pipeline_output: Option<PathBuf>,
    /// Exports in flight during the ingest figures.
    #[arg(long, default_value_t = crate::DEFAULT_IN_FLIGHT)]
    concurrency: usize,
    /// HTTP/2 connections the load generator opens per target.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Longest run of each side of an ingest figure, seconds: a side that has not sent the whole
    /// workload by then stops, and its rate is what it acknowledged in that time.
    #[arg(long, default_value_t = 40)]
    max_seconds: u64,
    /// Points per second of the background load during the freshness probes (default: half of
    /// what the node acknowledged in figure 1, or 5 000 when figure 1 did not run).
    #[arg(long)]
    freshness_background_rate: Option<f64>,
}

struct Driver {
    args: BenchArgs,
    binary: PathBuf,
    work: PathBuf,
    http: reqwest::Client,
    lines: Vec<String>,
    /// Points/s the node acknowledged in figure 1.
    node_metrics_rate: Option<f64>,
}

/// Runs the figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let binary = match &args.tollgate {
        Some(path) => path.clone(),
        None => crate::sibling_binary("tollgate")?,
    };
    if !binary.exists() {
        bail!("{} does not exist: build it first (cargo build --release)", binary.display());
    }
    let work = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut driver =
        Driver { args, binary, work, http: reqwest::Client::new(), lines: Vec::new(), node_metrics_rate: None };
    driver.machine();
    let result = driver.figures().await;
    driver.summary();
    if !driver.args.keep {
        let _ = std::fs::remove_dir_all(&driver.work);
    }
    result
}

fn slowest(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// Sum of the samples of a self-metric (all label sets) in Prometheus text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn body_bytes(pregenerated: &[Vec<Export>]) -> (u64, u64) {
    let bytes = pregenerated.iter().flatten().map(|e| e.body.len() as u64).sum();
    let items = pregenerated.iter().flatten().map(|e| e.items).sum();
    (bytes, items)
}

/// A warning line for each run that lost, had rejected or retried exports.
fn warn_failures(runs: &[(&str, &RunReport)]) {
    for (who, report) in runs {
        if report.lost > 0 || report.rejected > 0 || report.failed_attempts > 0 {
            say!(
                "  warning: {who} lost {}, rejected {}, failed attempts {} ({})",
                report.lost,
                report.rejected,
                report.failed_attempts,
                report.first_failure.as_deref().unwrap_or("-")
            );
        }
    }
}

impl Driver {
    fn wants(&self, figure: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|f| f == figure)
    }

    fn figure(&mut self, line: String) {
        say!("{line}");
        self.lines.push(line);
    }

    /// Rounds of figures 1 and 2: [`INGEST_ROUNDS`], one with `--quick`.
    fn ingest_rounds(&self) -> usize {
        if self.args.quick {
            1
        } else {
            INGEST_ROUNDS
        }
    }

    fn options(&self) -> RunOptions {
        RunOptions { connections: self.args.connections, ..Default::default() }
    }

    fn machine(&self) {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or("unknown".to_string(), |m| m.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        say!(
            "machine: {cores} cores ({model}), {:.1} GiB memory, load average {}; the node, the sink and this load generator share the cores, nothing is pinned",
            memory_kib / 1024.0 / 1024.0,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        if load.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l > 0.5) {
            say!("  note: the machine was busy before the run started; the figures may be low");
        }
        say!("  tollgate binary: {}, data directories under {}", self.binary.display(), self.work.display());
    }

    async fn figures(&mut self) -> anyhow::Result<()> {
        if self.wants("metrics") {
            self.metrics_ingest().await.context("figure metrics_ingest")?;
        }
        if self.wants("logs") {
            self.log_ingest().await.context("figure log_ingest")?;
        }
        if self.wants("freshness") {
            self.freshness().await.context("figure freshness")?;
        }
        if self.wants("memory") || self.wants("restart") {
            self.memory_and_restart().await.context("figures memory_per_series and restart_to_ready")?;
        }
        if self.wants("cluster") {
            self.cluster_cpu_per_point().await.context("figure cluster_cpu_per_point")?;
        }
        Ok(())
    }

    fn summary(&self) {
        say!("summary:");
        let mut pipeline = Vec::new();
        if let Some(path) = &self.args.pipeline_output {
            match std::fs::read_to_string(path) {
                Ok(text) => pipeline.extend(text.lines().filter(|l| l.starts_with("bench ")).map(str::to_string)),
                Err(e) => say!("  (cannot read {}: {e})", path.display()),
            }
        }
        // In figure order: the pipeline (figure 3) after the two ingest figures.
        let ingest = self.lines.iter().filter(|l| l.starts_with("bench metrics_") || l.starts_with("bench log_"));
        let rest = self.lines.iter().filter(|l| !(l.starts_with("bench metrics_") || l.starts_with("bench log_")));
        for line in ingest.chain(pipeline.iter()).chain(rest) {
            say!("{line}");
        }
    }

    /// [`Self::sink_vs_node`] [`Self::ingest_rounds`] times, each round on a new data directory.
    /// The sink's side lasts about two seconds, and a single pair moves with whatever the shared
    /// machine does in those seconds (one binary's figure 1 gave ratios of 0.37, 0.47 and 0.45
    /// within an hour); the figure is the round with the median ratio, and every round is
    /// printed. Returns that round's (sink, node) reports.
    async fn sink_vs_node_rounds(
        &mut self,
        signal: Signal,
        pregenerated: &[Vec<Export>],
        name: &str,
        unit: &str,
    ) -> anyhow::Result<(RunReport, RunReport)> {
        let ratio = |(sink, node): &(RunReport, RunReport)| node.rate() / sink.rate().max(1e-9);
        let count = self.ingest_rounds();
        let mut rounds = Vec::with_capacity(count);
        for round in 1..=count {
            if count > 1 {
                say!("  round {round}:");
            }
            let pair = self.sink_vs_node(signal, pregenerated, &format!("{name}-{round}"), unit).await?;
            if count > 1 {
                say!("  round {round}: ratio {:.2}", ratio(&pair));
            }
            rounds.push(pair);
        }
        Ok(median_round(rounds, ratio))
    }

    /// Runs pre-encoded lanes against the sink and against a fresh node, the same bytes in the
    /// same order with the same concurrency; returns (sink, node) reports.
    async fn sink_vs_node(
        &mut self,
        signal: Signal,
        pregenerated: &[Vec<Export>],
        name: &str,
        unit: &str,
    ) -> anyhow::Result<(RunReport, RunReport)> {
        let options = RunOptions { duration: Some(Duration::from_secs(self.args.max_seconds)), ..self.options() };
        let own_pid = std::process::id();

        let sink = SinkProcess::start()?;
        let channels = grpc::connect(&sink.target, options.connections).await?;
        let (sink_cpu, own_cpu) = (process::cpu_seconds(sink.pid())?, process::cpu_seconds(own_pid)?);
        let on_sink = run::run(signal, fleet::lanes_of(pregenerated), &channels, &options).await;
        let sink_cpu = process::cpu_seconds(sink.pid())? - sink_cpu;
        let own_cpu_sink = process::cpu_seconds(own_pid)? - own_cpu;
        drop(channels);
        drop(sink);
        say!("  sink:     {}", on_sink.summary(unit));

        let (node, _) = NodeProcess::start(&self.binary, &self.work.join(name), &self.http).await?;
        let channels = grpc::connect(&node.grpc(), options.connections).await?;
        let (node_cpu, own_cpu) = (node.cpu_seconds()?, process::cpu_seconds(own_pid)?);
        let on_node = run::run(signal, fleet::lanes_of(pregenerated), &channels, &options).await;
        let node_cpu_at_end = node.cpu_seconds()?;
        let node_cpu = node_cpu_at_end - node_cpu;
        let own_cpu_node = process::cpu_seconds(own_pid)? - own_cpu;
        say!("  tollgate: {}", on_node.summary(unit));
        say!(
            "  CPU: sink {sink_cpu:.1} s ({:.0} {unit} per CPU-second), tollgate {node_cpu:.1} s ({:.0} {unit} per CPU-second); load generator {own_cpu_sink:.1} s and {own_cpu_node:.1} s",
            on_sink.acked as f64 / sink_cpu.max(1e-9),
            on_node.acked as f64 / node_cpu.max(1e-9),
        );
        // Acknowledged writes wait in the memtable until a checkpoint writes them into the data
        // tree (by size during the run; the rest by age, after it): that deferred work belongs
        // to the run's cost as well.
        let waited = Instant::now();
        let drained = self.memtable_drained(&node, Duration::from_secs(90)).await?;
        let deferred_cpu = node.cpu_seconds()? - node_cpu_at_end;
        let total_cpu = node_cpu + deferred_cpu;
        say!(
            "  checkpoint after the run: memtable {} after {:.1} s, {deferred_cpu:.1} CPU-s more; tollgate {total_cpu:.1} CPU-s in all ({:.0} {unit} per CPU-second)",
            if drained { "empty" } else { "NOT empty" },
            waited.elapsed().as_secs_f64(),
            on_node.acked as f64 / total_cpu.max(1e-9),
        );
        if let Ok(text) = self.http.get(format!("{}/metrics", node.api())).send().await?.text().await {
            let flushes = metric_value(&text, "tollgate_commit_flush_seconds_count");
            let flush_sum = metric_value(&text, "tollgate_commit_flush_seconds_sum");
            let batches = metric_value(&text, "tollgate_commit_batches_per_flush_sum");
            if let (Some(flushes), Some(flush_sum), Some(batches)) = (flushes, flush_sum, batches) {
                say!(
                    "  group commit: {flushes:.0} flushes, {:.1} write batches per flush, {:.2} ms per apply + flush",
                    batches / flushes.max(1.0),
                    1000.0 * flush_sum / flushes.max(1.0)
                );
            }
        }
        warn_failures(&[("sink", &on_sink), ("tollgate", &on_node)]);
        Ok((on_sink, on_node))
    }

    /// Waits until the node's memtable is empty (everything checkpointed into the data tree), at
    /// most `limit`; false when it was not by then.
    async fn memtable_drained(&self, node: &NodeProcess, limit: Duration) -> anyhow::Result<bool> {
        let started = Instant::now();
        loop {
            let text = self.http.get(format!("{}/metrics", node.api())).send().await?.text().await?;
            if metric_value(&text, "tollgate_store_memtable_bytes") == Some(0.0) {
                return Ok(true);
            }
            if started.elapsed() > limit {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The workload of figure 1 (also figure 7's): 200 pods of 10 services, 6 models,
    /// cumulative, exports 10 s of data time apart, ending a minute ago.
    fn figure1_fleet(&self, prefix: &str) -> FleetSpec {
        let rounds = if self.args.quick { 10 } else { 100 };
        FleetSpec {
            prefix: prefix.into(),
            services: 10,
            pods: 200,
            models: 6,
            cumulative: true,
            interval_seconds: 10,
            rounds,
            started: unix_now().saturating_sub(rounds * 10 + 60),
        }
    }

    /// Figure 1: metrics ingest with durable acknowledgements vs the no-op sink.
    async fn metrics_ingest(&mut self) -> anyhow::Result<()> {
        let spec = self.figure1_fleet("ingest");
        say!(
            "figure 1, metrics ingest: {} gateway pods of {} services, {} series, cumulative, {} exports per pod at 10 s data-time intervals, {} points, {} exports in flight, at most {} s per side; {}",
            spec.pods,
            spec.services,
            spec.series(),
            spec.rounds,
            spec.points(),
            self.args.concurrency,
            self.args.max_seconds,
            rounds_text(self.ingest_rounds())
        );
        let generated = Instant::now();
        let pregenerated = fleet::pregenerate(&spec, self.args.concurrency);
        let (bytes, points) = body_bytes(&pregenerated);
        say!(
            "  encoded {points} points in {:.1} s: {:.1} MiB, {:.0} bytes per point on the wire",
            generated.elapsed().as_secs_f64(),
            mib(bytes as f64),
            bytes as f64 / points as f64
        );
        let (sink, node) = self.sink_vs_node_rounds(Signal::Metrics, &pregenerated, "metrics", "points").await?;
        self.node_metrics_rate = Some(node.rate());
        self.figure(bench_line("metrics_ingest", node.rate(), "sink", sink.rate(), "points/s", 0));
        Ok(())
    }

    /// Figure 2: access-log ingest with sampling vs the no-op sink.
    async fn log_ingest(&mut self) -> anyhow::Result<()> {
        let rounds = if self.args.quick { 10 } else { 300 };
        let records_per_export = 16;
        let pods = 100;
        let per_pod = rounds * records_per_export as u64;
        let spec = accesslog::LogSpec {
            prefix: "logs".into(),
            services: 10,
            pods,
            records_per_export,
            rounds,
            error_rate: 0.02,
            slow_rate: 0.01,
            upstream_failure_rate: 0.005,
            start_ns: unix_now().saturating_sub(660) * 1_000_000_000,
            spacing_ns: 600 * 1_000_000_000 / per_pod,
            seed: 1,
        };
        let (kept, high, errors, slow) = accesslog::expected_shares(&spec, 100_000);
        say!(
            "figure 2, access-log ingest: {} gateway pods of {} services, {} records in exports of {}, kept by the default rules: {:.1}% (≥ 10k tokens {:.1}%, errors {:.1}%, slow {:.1}%), {} exports in flight, at most {} s per side; {}",
            spec.pods,
            spec.services,
            spec.records(),
            spec.records_per_export,
            kept * 100.0,
            high * 100.0,
            errors * 100.0,
            slow * 100.0,
            self.args.concurrency,
            self.args.max_seconds,
            rounds_text(self.ingest_rounds())
        );
        let generated = Instant::now();
        let pregenerated = accesslog::pregenerate(&spec, self.args.concurrency);
        let (bytes, records) = body_bytes(&pregenerated);
        say!(
            "  encoded {records} records in {:.1} s: {:.1} MiB, {:.0} bytes per record, {:.1} KiB per export",
            generated.elapsed().as_secs_f64(),
            mib(bytes as f64),
            bytes as f64 / records as f64,
            bytes as f64 / 1024.0 / (records as f64 / records_per_export as f64)
        );
        let (sink, node) = self.sink_vs_node_rounds(Signal::Logs, &pregenerated, "logs", "records").await?;
        self.figure(bench_line("log_ingest", node.rate(), "sink", sink.rate(), "records/s", 0));
        Ok(())
    }

    /// Figure 4: acknowledged export → value visible in the query API, under a background load.
    async fn freshness(&mut self) -> anyhow::Result<()> {
        let samples = if self.args.quick { 20 } else { 300 };
        let rate = self.args.freshness_background_rate.or(self.node_metrics_rate.map(|r| r / 2.0)).unwrap_or(5000.0);
        let (node, _) = NodeProcess::start(&self.binary, &self.work.join("freshness"), &self.http).await?;
        // Background: a fleet of 100 pods (5 400 series) paced at `rate` points/s, for longer
        // than the probes take.
        let rounds = ((rate * 60.0) / 5400.0).ceil().max(2.0) as u64;
        let spec = FleetSpec {
            prefix: "background".into(),
            services: 5,
            pods: 100,
            models: 6,
            cumulative: true,
            interval_seconds: 10,
            rounds,
            started: unix_now().saturating_sub(rounds * 10 + 60),
        };
        say!(
            "figure 4, freshness: {samples} probes (export, then query until the value shows), while a background fleet of {} series sends {rate:.0} points/s (half of figure 1's rate)",
            spec.series()
        );
        let pregenerated = fleet::pregenerate(&spec, 8);
        let stop = Arc::new(AtomicBool::new(false));
        let background = {
            let channels = grpc::connect(&node.grpc(), 2).await?;
            let options = RunOptions { rate, stop: Some(Arc::clone(&stop)), ..self.options() };
            let lanes = fleet::lanes_of(&pregenerated);
            tokio::spawn(async move { run::run(Signal::Metrics, lanes, &channels, &options).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let probes =
            freshness::measure(&node.grpc(), &node.api(), "freshness-probe", samples, Duration::from_millis(20)).await;
        stop.store(true, Ordering::Relaxed);
        let background = background.await?;
        let probes = probes?;
        say!(
            "  background: {}; probes: export ack p50 {:.2} ms, {} queries before the value showed, {} not visible within 10 s",
            background.summary("points"),
            run::percentile_ms(&probes.ack_us, 50.0),
            probes.early_polls,
            probes.not_visible
        );
        for percentile in [50.0, 99.0] {
            let fresh = run::percentile_ms(&probes.freshness_us, percentile);
            let query = run::percentile_ms(&probes.query_us, percentile);
            self.figure(bench_line(&format!("freshness_p{percentile:.0}"), fresh, "query", query, "ms", 2));
        }
        Ok(())
    }

    /// Figures 5 and 6: memory per active series after loading 100 000 series, then restart to
    /// ready with the 1 000 000 minute states that load stored.
    async fn memory_and_restart(&mut self) -> anyhow::Result<()> {
        let dir = self.work.join("restart");
        let (mut node, _) = NodeProcess::start(&self.binary, &dir, &self.http).await?;
        // 1852 pods × 6 models × 9 = 100 008 series; 10 exports a minute apart put each point in
        // a minute of its own: 1 000 080 minute states.
        let pods = if self.args.quick { 100 } else { 1852 };
        let spec = FleetSpec {
            prefix: "memory".into(),
            services: 20,
            pods,
            models: 6,
            cumulative: true,
            interval_seconds: 60,
            rounds: 10,
            started: unix_now().saturating_sub(10 * 60 + 120),
        };
        say!(
            "figure 5, memory per series: {} pods of {} services, {} series, {} exports per pod a minute apart ({} minute states)",
            spec.pods,
            spec.services,
            spec.series(),
            spec.rounds,
            spec.points()
        );
        let pregenerated = fleet::pregenerate(&spec, self.args.concurrency);
        let (bytes, points) = body_bytes(&pregenerated);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = node.rss_bytes()? as f64;
        let channels = grpc::connect(&node.grpc(), self.args.connections).await?;
        let load = run::run(Signal::Metrics, fleet::lanes_of(&pregenerated), &channels, &self.options()).await;
        drop(channels);
        drop(pregenerated);
        say!("  load: {}", load.summary("points"));
        // Let one maintenance pass (every 10 s) move closed minutes out of the owners' caches.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let after = node.rss_bytes()? as f64;
        let text = self.http.get(format!("{}/metrics", node.api())).send().await?.text().await?;
        let series = metric_value(&text, "tollgate_series_active").unwrap_or(0.0);
        let merged = metric_value(&text, "tollgate_points_merged_total").unwrap_or(0.0);
        if series <= 0.0 {
            bail!("the node reports no active series");
        }
        let per_series = (after - before) / series;
        let wire = bytes as f64 / points as f64;
        let memtable = metric_value(&text, "tollgate_store_memtable_bytes").unwrap_or(0.0);
        let cached = metric_value(&text, "tollgate_states_cached").unwrap_or(0.0);
        say!(
            "  RSS {:.1} MiB before, {:.1} MiB after; {series:.0} active series; {merged:.0} points merged; {cached:.0} aggregates cached; memtable {:.1} MiB (not yet checkpointed)",
            mib(before),
            mib(after),
            mib(memtable)
        );
        if self.memtable_drained(&node, Duration::from_secs(90)).await? {
            let drained = node.rss_bytes()? as f64;
            say!(
                "  once the memtable was checkpointed: RSS {:.1} MiB, {:.0} bytes per series",
                mib(drained),
                (drained - before) / series
            );
        }
        if self.wants("memory") {
            self.figure(bench_line("memory_per_series", per_series, "wire", wire, "bytes/series", 0));
        }
        if !self.wants("restart") {
            return Ok(());
        }

        node.kill9();
        say!(
            "figure 6, restart to ready: kill -9, then `tollgate serve` until /readyz answers 200, three times, on {:.0} MiB of data ({merged:.0} minute states), slowest of three; baseline: the same with empty data directories",
            mib(dir_size(&dir) as f64)
        );
        let mut loaded = Vec::new();
        for _ in 0..3 {
            let (mut restarted, took) = NodeProcess::start(&self.binary, &dir, &self.http).await?;
            restarted.kill9();
            loaded.push(took.as_secs_f64());
        }
        let mut empty = Vec::new();
        for attempt in 0..3 {
            let empty_dir = self.work.join(format!("empty-{attempt}"));
            let (mut fresh, took) = NodeProcess::start(&self.binary, &empty_dir, &self.http).await?;
            fresh.kill9();
            empty.push(took.as_secs_f64());
        }
        say!("  loaded: {loaded:.3?} s; empty: {empty:.3?} s");
        // The first restart after the crash is the slowest (it recovers sled's log; the later
        // ones start from the snapshot it left): report the slowest of each.
        let (loaded, empty) = (slowest(&loaded), slowest(&empty));
        self.figure(bench_line("restart_to_ready", loaded, "empty", empty, "s", 3));
        Ok(())
    }

    /// Polls `GET /api/v1/cluster` of every node until they agree on a map epoch with no vnode
    /// moving and every member owning its fair share; returns the first node's view.
    async fn wait_balanced(&self, nodes: &[NodeProcess]) -> anyhow::Result<serde_json::Value> {
        let started = Instant::now();
        loop {
            let mut views = Vec::new();
            for node in nodes {
                views.push(
                    self.http
                        .get(format!("{}/api/v1/cluster", node.api()))
                        .send()
                        .await?
                        .json::<serde_json::Value>()
                        .await?,
                );
            }
            let fair = views[0]["vnodes"]["total"].as_u64().unwrap_or(0) / nodes.len() as u64;
            let settled = views.iter().all(|view| {
                view["vnodes"]["moving"] == 0
                    && view["vnodes"]["epoch"] == views[0]["vnodes"]["epoch"]
                    && view["nodes"].as_array().map(Vec::len) == Some(nodes.len())
                    && view["nodes"].as_array().into_iter().flatten().all(|member| {
                        let owned = member["vnodes"].as_u64().unwrap_or(0);
                        owned == fair || owned == fair + 1
                    })
            });
            if settled {
                return Ok(views.swap_remove(0));
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the cluster did not settle within 60 s: {views:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Figure 7: the workload of figure 1, with pods chosen so that every series is owned by
    /// another node than the one receiving it, sent to one node of a three-node cluster; CPU of
    /// the three processes per acknowledged point against a single node's. CPU time on a shared
    /// 2-core machine varies from run to run, so the cluster and the single node run
    /// [`CLUSTER_ROUNDS`] times, back to back, each on new data directories; the figure is the
    /// round with the median ratio, and every round is printed.
    async fn cluster_cpu_per_point(&mut self) -> anyhow::Result<()> {
        let mut rounds = Vec::with_capacity(CLUSTER_ROUNDS);
        for round in 1..=CLUSTER_ROUNDS {
            let (per_point, baseline) = self.cluster_round(round).await?;
            say!(
                "  round {round}: {per_point:.2} µs/point, one node {baseline:.2} µs/point, ratio {:.2}",
                per_point / baseline
            );
            rounds.push((per_point, baseline));
        }
        let (per_point, baseline) = median_round(rounds, |(per_point, baseline)| per_point / baseline);
        self.figure(bench_line("cluster_cpu_per_point", per_point, "one node", baseline, "µs/point", 2));
        Ok(())
    }

    /// Group commits of a node so far: syncs of its write-ahead log and the write batches they
    /// carried (zeros when its metrics cannot be read).
    async fn group_commits(&self, node: &NodeProcess) -> (f64, f64) {
        let Ok(response) = self.http.get(format!("{}/metrics", node.api())).send().await else {
            return (0.0, 0.0);
        };
        let text = response.text().await.unwrap_or_default();
        (
            metric_value(&text, "tollgate_commit_flush_seconds_count").unwrap_or(0.0),
            metric_value(&text, "tollgate_commit_batches_per_flush_sum").unwrap_or(0.0),
        )
    }

    /// One round of figure 7: CPU µs per acknowledged point of the cluster and of one node.
    async fn cluster_round(&mut self, round: usize) -> anyhow::Result<(f64, f64)> {
        let dir = self.work.join(format!("cluster-{round}"));
        let (first, _) =
            NodeProcess::start_with(&self.binary, &dir.join("n1"), &self.http, &["--node-id", "n1"]).await?;
        let seed = first.endpoints.cluster.to_string();
        let mut nodes = vec![first];
        for name in ["n2", "n3"] {
            let args = ["--node-id", name, "--join", &seed];
            nodes.push(NodeProcess::start_with(&self.binary, &dir.join(name), &self.http, &args).await?.0);
        }
        let status = self.wait_balanced(&nodes).await?;
        // n1 receives. It bootstrapped the cluster owning every vnode, and a rebalance only ever
        // takes a member's highest vnodes away (`VnodeMap::rebalance`), so n1 owns vnodes
        // 0..owned: a series is remote when its vnode is at least `owned`. The forwarded-points
        // check after the run confirms it.
        let vnodes = status["vnodes"]["total"].as_u64().context("vnode count in /api/v1/cluster")? as u16;
        let owned = status["vnodes"]["owners"]["n1"].as_u64().context("n1's vnodes in /api/v1/cluster")? as u16;
        let spec = self.figure1_fleet("cluster");
        let pods =
            spec.pods_where(|service, instance| vnode_of(partition_hash(service, Some(instance)), vnodes) >= owned);
        if round == 1 {
            say!(
                "figure 7, cluster CPU per point: three nodes on loopback ({vnodes} vnodes, n1 owns {owned}), the load of figure 1 ({} series, {} points) with every pod on a vnode n1 does not own, sent to n1; baseline: the same exports to one node; {CLUSTER_ROUNDS} rounds, the median one is the figure",
                spec.series(),
                spec.points()
            );
        }
        let pregenerated = fleet::pregenerate_pods(&pods, spec.rounds, self.args.concurrency);
        let options = RunOptions { duration: Some(Duration::from_secs(self.args.max_seconds)), ..self.options() };

        let channels = grpc::connect(&nodes[0].grpc(), options.connections).await?;
        let cpu_before = nodes.iter().map(NodeProcess::cpu_seconds).collect::<anyhow::Result<Vec<_>>>()?;
        let on_cluster = run::run(Signal::Metrics, fleet::lanes_of(&pregenerated), &channels, &options).await;
        let cpu_after = nodes.iter().map(NodeProcess::cpu_seconds).collect::<anyhow::Result<Vec<_>>>()?;
        drop(channels);
        let cluster_cpu: Vec<f64> = cpu_after.iter().zip(&cpu_before).map(|(after, before)| after - before).collect();
        let text = self.http.get(format!("{}/metrics", nodes[0].api())).send().await?.text().await?;
        let received = metric_value(&text, "tollgate_points_received_total").unwrap_or(0.0);
        let forwarded = metric_value(&text, "tollgate_forwarded_points_total").unwrap_or(0.0);
        let forwards = metric_value(&text, "tollgate_forward_seconds_count").unwrap_or(0.0);
        let forward_seconds = metric_value(&text, "tollgate_forward_seconds_sum").unwrap_or(0.0);
        let forward_calls = metric_value(&text, "tollgate_forward_calls_total").unwrap_or(0.0);
        let mut cluster_commits = Vec::new();
        for node in &nodes[1..] {
            cluster_commits.push(self.group_commits(node).await);
        }
        drop(nodes);
        say!("  cluster:  {}", on_cluster.summary("points"));
        say!(
            "  n1 received {received:.0} points and forwarded {forwarded:.0} in {forwards:.0} forwards ({:.0} points, {:.2} ms each on average), carried by {forward_calls:.0} calls ({:.1} forwards each)",
            forwarded / forwards.max(1.0),
            1000.0 * forward_seconds / forwards.max(1.0),
            forwards / forward_calls.max(1.0)
        );
        if forwarded < received {
            bail!("n1 merged {:.0} of the points itself: not every series was remote", received - forwarded);
        }

        let (node, _) = NodeProcess::start(&self.binary, &dir.join("one-node"), &self.http).await?;
        let channels = grpc::connect(&node.grpc(), options.connections).await?;
        let node_cpu = node.cpu_seconds()?;
        let on_node = run::run(Signal::Metrics, fleet::lanes_of(&pregenerated), &channels, &options).await;
        let node_cpu = node.cpu_seconds()? - node_cpu;
        drop(channels);
        let node_commits = self.group_commits(&node).await;
        drop(node);
        say!("  one node: {}", on_node.summary("points"));
        let describe =
            |(flushes, batches): (f64, f64)| format!("{flushes:.0} ({:.1} batches each)", batches / flushes.max(1.0));
        say!(
            "  syncs of the write-ahead log: n2 {}, n3 {}; one node {}",
            describe(cluster_commits[0]),
            describe(cluster_commits[1]),
            describe(node_commits)
        );
        say!(
            "  CPU: n1 {:.1} s, n2 {:.1} s, n3 {:.1} s (together {:.1} s); one node {node_cpu:.1} s",
            cluster_cpu[0],
            cluster_cpu[1],
            cluster_cpu[2],
            cluster_cpu.iter().sum::<f64>()
        );
        warn_failures(&[("cluster", &on_cluster), ("one node", &on_node)]);
        let per_point = 1e6 * cluster_cpu.iter().sum::<f64>() / (on_cluster.acked as f64).max(1.0);
        let baseline = 1e6 * node_cpu / (on_node.acked as f64).max(1.0);
        Ok((per_point, baseline))
    }
}

/// Rounds of figure 7 (cluster and single node back to back, on new directories each).
const CLUSTER_ROUNDS: usize = 3;

/// Rounds of figures 1 and 2 (sink and node back to back, the node on a new directory each).
const INGEST_ROUNDS: usize = 3;

/// The round with the median `ratio` (the upper one of an even count). `rounds` is not empty.
fn median_round<T>(mut rounds: Vec<T>, ratio: impl Fn(&T) -> f64) -> T {
    rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    rounds.swap_remove(rounds.len() / 2)
}

/// How a figure's header line names its rounds.
fn rounds_text(rounds: usize) -> String {
    if rounds == 1 {
        "one round of sink then node".into()
    } else {
        format!("{rounds} rounds of sink then node, the median one is the figure")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bench_line_has_the_documented_form() {
        assert_eq!(
            bench_line("metrics_ingest", 19394.4, "sink", 168615.2, "points/s", 0),
            "bench metrics_ingest: 19394 points/s (baseline sink 168615 points/s, ratio 0.12)"
        );
        assert_eq!(
            bench_line("restart_to_ready", 2.1144, "empty", 0.053, "s", 3),
            "bench restart_to_ready: 2.114 s (baseline empty 0.053 s, ratio 39.89)"
        );
    }

    #[test]
    fn test_median_round_is_the_round_of_the_median_ratio() {
        // (value, baseline): ratios 2.0, 0.5, 1.25; the median round is the third.
        let rounds = vec![(4.0, 2.0), (1.0, 2.0), (5.0, 4.0)];
        assert_eq!(median_round(rounds, |(value, baseline)| value / baseline), (5.0, 4.0));
        assert_eq!(median_round(vec![(3.0, 1.0)], |(value, baseline)| value / baseline), (3.0, 1.0));
        // An even count takes the upper of the two middle rounds.
        let rounds = vec![(1.0, 1.0), (4.0, 1.0), (2.0, 1.0), (3.0, 1.0)];
        assert_eq!(median_round(rounds, |(value, baseline)| value / baseline), (3.0, 1.0));
    }

    #[test]
    fn test_metric_value_sums_label_sets_and_ignores_longer_names() {
        let text = "# TYPE x counter\ntollgate_points_merged_total 12\ntollgate_series_active 5\ntollgate_series_active_other 9\nt{a=\"1\"} 1\ntollgate_requests_total{outcome=\"ok\"} 3\ntollgate_requests_total{outcome=\"overloaded\"} 4\n";
        assert_eq!(metric_value(text, "tollgate_points_merged_total"), Some(12.0));
        assert_eq!(metric_value(text, "tollgate_series_active"), Some(5.0));
        assert_eq!(metric_value(text, "tollgate_requests_total"), Some(7.0));
        assert_eq!(metric_value(text, "tollgate_missing"), None);
    }
}
