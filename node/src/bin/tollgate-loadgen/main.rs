//! `tollgate-loadgen`: load for Tollgate shaped like a fleet of Envoy AI Gateway pods, the no-op
//! baseline sink, and the benchmark driver behind `make bench`.
//!
//! Parts:
//! - [`fleet`]: gateway pods exporting their GenAI histograms (metrics);
//! - [`accesslog`]: the gateway's OTLP access-log stream;
//! - [`grpc`] and [`run`]: sending pre-encoded exports over OTLP/gRPC in lanes, with retries,
//!   pacing and latency samples;
//! - [`sink`]: the no-op OTLP/gRPC server (the throughput baseline);
//! - [`freshness`]: acknowledgement-to-visible probes;
//! - [`process`]: `tollgate serve` and sink processes;
//! - [`bench`]: the figures of `make bench`.
//!
//! Randomness is a seeded xorshift ([`tollgate_rules::fleet::Xorshift`]), so runs are reproducible.

/// `println!` that does not panic when standard output is closed (`| head`): the run goes on,
/// and stops its processes, whoever reads its report.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The same allocator as `tollgate`, so that the no-op sink (the baseline) is built like the node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod accesslog;
mod bench;
mod fleet;
mod freshness;
mod grpc;
mod process;
mod run;
mod sink;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exports in flight by default: one per pod of the access-log figure's fleet of 100 pods (a
/// gateway's exporter sends one batch at a time). Fewer leave a node with durable
/// acknowledgements waiting on its syncs rather than working, so a throughput figure would
/// measure the sync's latency; more (200) changed neither the node's nor the sink's rate in
/// figure 2 (docs/benchmarks-history.md, step 32).
const DEFAULT_IN_FLIGHT: usize = 100;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate-loadgen",
    about = "Envoy AI Gateway-shaped OTLP load, a no-op sink, and Tollgate's benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A no-op OTLP/gRPC server that decodes and drops (the baseline of the ingest figures).
    Sink(SinkArgs),
    /// A fleet of gateway pods exporting their GenAI histograms.
    Metrics(MetricsArgs),
    /// A gateway access-log stream.
    Logs(LogsArgs),
    /// Acknowledgement-to-visible probes against a running node.
    Freshness(FreshnessArgs),
    /// Every figure of `make bench`, against real processes started here.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct SinkArgs {
    /// Where to listen; the bound address is printed as `listening <address>`.
    #[arg(long, default_value = "127.0.0.1:4317")]
    grpc_addr: SocketAddr,
    /// Print the counts every this many seconds (0: only when stopped).
    #[arg(long, default_value_t = 0)]
    report_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Temporality {
    Cumulative,
    Delta,
}

/// Options every sender shares.
#[derive(Debug, Args)]
struct SendArgs {
    /// OTLP/gRPC endpoint, `http://host:port`.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    target: String,
    /// Exports in flight at once (one lane each; a pod's exports stay in order in its lane).
    #[arg(long, default_value_t = DEFAULT_IN_FLIGHT)]
    concurrency: usize,
    /// HTTP/2 connections the lanes share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Target items (points or records) per second; 0 sends as fast as acknowledgements return.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Stop after this many seconds even if rounds remain.
    #[arg(long)]
    duration_seconds: Option<f64>,
    /// Exports per pod.
    #[arg(long, default_value_t = 30)]
    rounds: u64,
    /// Encode every export before sending the first (keeps the generator's CPU out of the run);
    /// otherwise each export is generated just before it is sent.
    #[arg(long)]
    pregenerate: bool,
    /// gzip the requests.
    #[arg(long)]
    gzip: bool,
    /// Prefix of generated service names.
    #[arg(long, default_value = "aigw")]
    prefix: String,
    /// Gateways (services).
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Pods per service.
    #[arg(long, default_value_t = 10)]
    pods_per_service: usize,
}

impl SendArgs {
    fn options(&self) -> run::RunOptions {
        run::RunOptions {
            connections: self.connections,
            rate: self.rate,
            duration: self.duration_seconds.map(Duration::from_secs_f64),
            gzip: self.gzip,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
struct MetricsArgs {
    #[command(flatten)]
    send: SendArgs,
    /// Models each pod serves (1 to 6; each adds 9 series per pod).
    #[arg(long, default_value_t = 6)]
    models: usize,
    /// Data time between two exports of a pod, seconds.
    #[arg(long, default_value_t = 10)]
    interval_seconds: u64,
    /// Temporality of the exported histograms (the gateway's default is cumulative).
    #[arg(long, value_enum, default_value_t = Temporality::Cumulative)]
    temporality: Temporality,
}

#[derive(Debug, Args)]
struct LogsArgs {
    #[command(flatten)]
    send: SendArgs,
    /// Records per export (Envoy flushes its access-log buffer at 16 KiB, about 16 records).
    #[arg(long, default_value_t = 16)]
    records_per_export: usize,
    /// Share of requests with an error status.
    #[arg(long, default_value_t = 0.02)]
    error_rate: f64,
    /// Share of requests slower than 30 s.
    #[arg(long, default_value_t = 0.01)]
    slow_rate: f64,
    /// Share of requests with an upstream transport failure.
    #[arg(long, default_value_t = 0.005)]
    upstream_failure_rate: f64,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct FreshnessArgs {
    /// OTLP/gRPC endpoint of the node.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    target: String,
    /// API of the node.
    #[arg(long, default_value = "http://127.0.0.1:12800")]
    api: String,
    /// Probes.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Pause between probes, ms.
    #[arg(long, default_value_t = 20)]
    pause_ms: u64,
    /// Service name of the probe pod.
    #[arg(long, default_value = "freshness-probe")]
    service: String,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn main() -> ExitCode {
    // As in `tollgate`, so that the sink (the baseline) runs like the node.
    if let Err(error) = tollgate::os::disable_transparent_huge_pages() {
        eprintln!("tollgate-loadgen: cannot turn transparent huge pages off ({error}); going on with them");
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tollgate-loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Sink(args) => sink(args).await,
            Command::Metrics(args) => metrics(args).await,
            Command::Logs(args) => logs(args).await,
            Command::Freshness(args) => freshness(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

async fn sink(args: SinkArgs) -> anyhow::Result<()> {
    let counts = Arc::new(sink::Counts::default());
    let (address, server) = sink::bind(args.grpc_addr, Arc::clone(&counts), shutdown_signal()).await?;
    say!("listening {address}");
    let print = |counts: &sink::Counts| {
        use std::sync::atomic::Ordering::Relaxed;
        say!(
            "sink: {} metric exports, {} points, {} log exports, {} records",
            counts.metric_requests.load(Relaxed),
            counts.points.load(Relaxed),
            counts.log_requests.load(Relaxed),
            counts.records.load(Relaxed)
        );
    };
    if args.report_seconds > 0 {
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(args.report_seconds));
            interval.tick().await;
            loop {
                interval.tick().await;
                print(&counts);
            }
        });
    }
    server.await?;
    print(&counts);
    Ok(())
}

async fn metrics(args: MetricsArgs) -> anyhow::Result<()> {
    let send = &args.send;
    let rounds = send.rounds.max(1);
    let spec = fleet::FleetSpec {
        prefix: send.prefix.clone(),
        services: send.services,
        pods: send.services * send.pods_per_service,
        models: args.models,
        cumulative: args.temporality == Temporality::Cumulative,
        interval_seconds: args.interval_seconds.max(1),
        rounds,
        // The last round lands a minute before now; every data time is in the past.
        started: unix_now().saturating_sub(rounds * args.interval_seconds.max(1) + 60),
    };
    say!(
        "fleet: {} services, {} pods, {} series, {} rounds of {} s data time, {} points, {} in flight",
        spec.services,
        spec.pods,
        spec.series(),
        spec.rounds,
        spec.interval_seconds,
        spec.points(),
        send.concurrency
    );
    let lanes = if send.pregenerate {
        let pregenerated = fleet::pregenerate(&spec, send.concurrency);
        fleet::lanes_of(&pregenerated)
    } else {
        fleet::live_lanes(&spec, send.concurrency)
    };
    let channels = grpc::connect(&send.target, send.connections).await?;
    let report = run::run(grpc::Signal::Metrics, lanes, &channels, &send.options()).await;
    say!("metrics: {}", report.summary("points"));
    Ok(())
}

async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let send = &args.send;
    let spec = log_spec(&args);
    let (kept, high, errors, slow) = accesslog::expected_shares(&spec, 100_000);
    say!(
        "access logs: {} services, {} pods, {} records in exports of {}, expected kept {:.1}% (≥10k tokens {:.1}%, errors {:.1}%, slow {:.1}%)",
        spec.services,
        spec.pods,
        spec.records(),
        spec.records_per_export,
        kept * 100.0,
        high * 100.0,
        errors * 100.0,
        slow * 100.0
    );
    let lanes = if send.pregenerate {
        let pregenerated = accesslog::pregenerate(&spec, send.concurrency);
        fleet::lanes_of(&pregenerated)
    } else {
        accesslog::live_lanes(&spec, send.concurrency)
    };
    let channels = grpc::connect(&send.target, send.connections).await?;
    let report = run::run(grpc::Signal::Logs, lanes, &channels, &send.options()).await;
    say!("logs: {}", report.summary("records"));
    Ok(())
}

fn log_spec(args: &LogsArgs) -> accesslog::LogSpec {
    let send = &args.send;
    let pods = send.services * send.pods_per_service;
    let per_pod = send.rounds.max(1) * args.records_per_export.max(1) as u64;
    // Each pod's records spread evenly over the last ten minutes.
    let span_ns = 600 * 1_000_000_000u64;
    accesslog::LogSpec {
        prefix: send.prefix.clone(),
        services: send.services,
        pods,
        records_per_export: args.records_per_export.max(1),
        rounds: send.rounds.max(1),
        error_rate: args.error_rate,
        slow_rate: args.slow_rate,
        upstream_failure_rate: args.upstream_failure_rate,
        start_ns: unix_now().saturating_sub(660) * 1_000_000_000,
        spacing_ns: (span_ns / per_pod).max(1),
        seed: args.seed,
    }
}

async fn freshness(args: FreshnessArgs) -> anyhow::Result<()> {
    let report =
        freshness::measure(&args.target, &args.api, &args.service, args.samples, Duration::from_millis(args.pause_ms))
            .await?;
    say!(
        "freshness: p50 {:.2} ms p99 {:.2} ms; the same query with the data there: p50 {:.2} ms p99 {:.2} ms; export ack p50 {:.2} ms; {} early polls, {} not visible within 10 s",
        run::percentile_ms(&report.freshness_us, 50.0),
        run::percentile_ms(&report.freshness_us, 99.0),
        run::percentile_ms(&report.query_us, 50.0),
        run::percentile_ms(&report.query_us, 99.0),
        run::percentile_ms(&report.ack_us, 50.0),
        report.early_polls,
        report.not_visible
    );
    Ok(())
}

/// PathBuf helper for the driver: the `tollgate` binary next to this one.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(name))
}
