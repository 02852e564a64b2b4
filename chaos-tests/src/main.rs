//! `tollgate-chaos`: a fault-injection suite against a real cluster of `tollgate` processes.
//!
//! It starts a cluster on loopback ports, lets producers stream gateway-shaped OTLP metric and
//! access-log exports to random members while a writer changes the pricing, injects faults
//! (`kill -9` and restart, `SIGSTOP`/`SIGCONT`, graceful restarts, scale out and in) one at a
//! time for `--duration` seconds, then waits for the cluster to settle and judges: every
//! acknowledged export counted exactly once and every unknown one at most once, and every kept
//! access-log record of an acknowledged export stored once, through every member; the
//! configuration converged; new writes succeed. Exit status: 0 when every check passed, 1 on a violation, 2
//! when the run could not be carried out.

/// `println!` that does not panic when standard output is closed (`| head`): the run goes on,
/// and stops its processes, whoever reads its report.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod cluster;
mod config;
mod export;
mod faults;
mod judge;
mod ledger;
mod node;
mod producer;

use anyhow::{bail, Context};
use clap::Parser;
use cluster::Cluster;
use config::ConfigWrite;
use faults::{FaultKind, FaultLog};
use judge::Check;
use ledger::{AttemptClass, Ledger};
use node::{NodeSpec, NodeState};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_rules::fleet::Xorshift;
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Fault injection against a real multi-node Tollgate cluster, with an exact judge.
///
/// Starts `--nodes` `tollgate serve` processes on free loopback ports (the first bootstraps, the
/// others join it), streams OTLP/gRPC metric and access-log exports shaped like Envoy AI
/// Gateway's to random members (one producer task per service; retried until acknowledged, or
/// recorded as unknown after --give-up-seconds), writes the pricing every 1-4 s, and injects the
/// --faults one at a time for --duration seconds. Then it restarts anything down, waits until the
/// cluster settled and judges, through every member: each service's request count, input-token
/// total and access-log count lies between what was acknowledged and that plus what is unknown,
/// its kept access logs hold every acknowledged record once, no record twice and none the rules
/// drop, no member is missing from an answer, the pricing is the same everywhere and is the last
/// acknowledged write, and new exports and a new pricing write succeed.
#[derive(Debug, Parser)]
#[command(name = "tollgate-chaos", version, verbatim_doc_comment)]
#[command(
    after_help = "Exit status: 0 every check passed, 1 a violation was found, 2 the run could not be carried out.\n\
The data directory holds chaos.log (this run's log), <node>.log (each node's output), <node>/ (each node's data),\n\
ledger.jsonl (every export and its outcome), config-writes.jsonl and cluster-final.json. It is kept when the run\n\
fails or --data/--keep is given. TOLLGATE_CHAOS_LOG sets the terminal log filter (default info)."
)]
struct Args {
    /// The `tollgate` binary to run [default: `tollgate` next to this binary, else
    /// target/release/tollgate, else target/debug/tollgate]
    #[arg(long, value_name = "PATH")]
    tollgate: Option<PathBuf>,

    /// Members to start with (at least 3: never more than one is down at a time, which a
    /// Raft cluster of 3 survives)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(3..=9))]
    nodes: u16,

    /// Seconds of traffic and faults before the judge
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    duration: u64,

    /// Seed of every random choice: fault kinds, victims, times, traffic [default: from the
    /// clock; printed, so a run can be repeated]
    #[arg(long)]
    seed: Option<u64>,

    /// Directory for the run's files (must be empty or absent) [default: a new temporary
    /// directory, deleted when the run passes]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,

    /// Faults to inject, comma-separated (`none` for a baseline run; `upgrade` needs
    /// --upgrade-from)
    #[arg(long, value_delimiter = ',', default_value = "kill,pause,restart,scale")]
    faults: Vec<FaultKind>,

    /// A rolling upgrade: the previous version's `tollgate` binary, which the first members run;
    /// the `upgrade` fault (which must be in --faults) moves them to --tollgate's one at a time,
    /// and any left are upgraded, one at a time, when the faults end (under traffic); members
    /// added by `scale` run the new version
    #[arg(long, value_name = "PATH")]
    upgrade_from: Option<PathBuf>,

    /// Services, one producer task each (odd-numbered ones send one request per pod, the
    /// others one request for all their pods)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    services: u16,

    /// Pods (instances) per service
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pods: u16,

    /// Deadline of one export attempt, milliseconds (after it the outcome is unknown and the
    /// export is retried)
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    export_timeout_ms: u64,

    /// Seconds an export or pricing write is retried before it is given up and recorded as
    /// unknown
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    give_up_seconds: u64,

    /// Seconds the cluster may take to settle after the faults
    #[arg(long, default_value_t = 180, value_name = "SECS")]
    settle_seconds: u64,

    /// Log filter of the nodes (their TOLLGATE_LOG)
    #[arg(long, default_value = "info", value_name = "FILTER")]
    node_log: String,

    /// Keep the data directory even when the run passes
    #[arg(long)]
    keep: bool,
}

/// Everything the summary reports.
#[derive(Debug, Default)]
struct Report {
    checks: Vec<Check>,
    aborted: Option<String>,
    faults: FaultLog,
    exports: (u64, u64, u64, u64),
    logs: (u64, u64, u64),
    failed_attempts: Vec<(AttemptClass, u64)>,
    writes: (u64, u64, u64),
    leaders: Vec<(u64, String)>,
    elapsed: Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let (root, temporary) = match prepare_root(args.data.as_deref()) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("tollgate-chaos: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = init_logging(&root) {
        eprintln!("tollgate-chaos: logging: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tollgate-chaos: runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let report = runtime.block_on(async {
        tokio::select! {
            report = run(&args, &root, seed) => report,
            _ = tokio::signal::ctrl_c() => Report { aborted: Some("interrupted".into()), ..Default::default() },
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let failed = report.checks.iter().any(|c| !c.passed) || !report.faults.violations.is_empty();
    let code = if failed {
        1
    } else if report.aborted.is_some() {
        2
    } else {
        0
    };
    print_summary(&args, seed, &root, &report, code);
    if code == 0 && temporary && !args.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    std::process::ExitCode::from(code)
}

/// The run's directory, and whether it is a temporary one.
fn prepare_root(data: Option<&Path>) -> anyhow::Result<(PathBuf, bool)> {
    match data {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!("--data {} is not empty (a previous run's nodes would be reused)", dir.display());
            }
            Ok((std::fs::canonicalize(dir)?, false))
        }
        None => Ok((tempfile::Builder::new().prefix("tollgate-chaos-").tempdir()?.keep(), true)),
    }
}

fn init_logging(root: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(root.join("chaos.log"))?;
    let terminal = std::env::var("TOLLGATE_CHAOS_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .with_filter(EnvFilter::try_new(format!("warn,tollgate_chaos={terminal}"))?),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(Mutex::new(file))
                .with_ansi(false)
                .with_target(false)
                .with_filter(EnvFilter::try_new("warn,tollgate_chaos=debug")?),
        )
        .try_init()?;
    Ok(())
}

/// `tollgate` next to this binary, else in target/release or target/debug.
fn default_tollgate() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()?.parent() {
        candidates.push(dir.join("tollgate"));
        if let Some(target) = dir.parent() {
            candidates.push(target.join("release").join("tollgate"));
            candidates.push(target.join("debug").join("tollgate"));
        }
    }
    candidates.push(PathBuf::from("target/release/tollgate"));
    candidates.push(PathBuf::from("target/debug/tollgate"));
    match candidates.iter().find(|c| c.is_file()) {
        Some(found) => Ok(found.clone()),
        None => bail!(
            "no tollgate binary at {candidates:?}: build it (cargo build --release -p tollgate) or pass --tollgate"
        ),
    }
}

async fn run(args: &Args, root: &Path, seed: u64) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    if let Err(e) = run_inner(args, root, seed, &mut report).await {
        error!(error = %format!("{e:#}"), "the run could not be completed");
        report.aborted = Some(format!("{e:#}"));
    }
    report.elapsed = started.elapsed();
    report
}

async fn run_inner(args: &Args, root: &Path, seed: u64, report: &mut Report) -> anyhow::Result<()> {
    let binary = match &args.tollgate {
        Some(path) => path.clone(),
        None => default_tollgate()?,
    };
    let binary = std::fs::canonicalize(&binary).with_context(|| format!("the tollgate binary {}", binary.display()))?;
    info!(seed, nodes = args.nodes, duration_s = args.duration, faults = ?args.faults, binary = %binary.display(),
        data = %root.display(), "tollgate-chaos starting");
    let upgrades = args.faults.contains(&FaultKind::Upgrade);
    if upgrades != args.upgrade_from.is_some() {
        bail!("the upgrade fault and --upgrade-from go together: --upgrade-from names the previous version to upgrade from");
    }
    let previous = match &args.upgrade_from {
        Some(path) => Some(
            std::fs::canonicalize(path).with_context(|| format!("the previous tollgate binary {}", path.display()))?,
        ),
        None => None,
    };
    let spec = NodeSpec { binary, root: root.to_path_buf(), log_filter: args.node_log.clone(), previous };
    let mut cluster = Cluster::start(spec, args.nodes as usize).await?;
    if let Err(problem) = cluster.wait_settled(Duration::from_secs(60)).await {
        bail!("the new cluster did not settle within 60 s: {problem}");
    }
    info!("cluster formed and balanced");

    // Traffic: producers and the pricing writer.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let writes: Arc<Mutex<Vec<ConfigWrite>>> = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let now = chrono::Utc::now().timestamp() as u64;
    let settings = producer::Settings {
        attempt_timeout: Duration::from_millis(args.export_timeout_ms),
        give_up: Duration::from_secs(args.give_up_seconds),
        started: Instant::now(),
        // Data time runs two minutes behind the clock: never in the future, well within lateness.
        base: now - 120,
    };
    let mut producers = Vec::new();
    for index in 0..args.services as usize {
        let producer = producer::Producer::new(
            index,
            &format!("chaos-gw-{index}"),
            args.pods as usize,
            settings.base,
            seed.wrapping_mul(31).wrapping_add(index as u64 + 1),
        );
        producers.push(tokio::spawn(producer.run(
            settings.clone(),
            cluster.targets(),
            stopped.clone(),
            Arc::clone(&ledger),
        )));
    }
    let writer = tokio::spawn(config::run(
        cluster.targets(),
        stopped.clone(),
        Arc::clone(&writes),
        Duration::from_secs(args.give_up_seconds),
        seed ^ 0xC0F1_6000,
    ));
    let progress = tokio::spawn(progress(Arc::clone(&ledger), Arc::clone(&writes)));

    // Faults.
    let mut rng = Xorshift::new(seed);
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let fault_result =
        faults::run(&mut cluster, &args.faults, deadline, &mut rng, args.nodes as usize, &mut report.faults).await;
    // Whatever happened, every member runs again before traffic stops.
    for index in cluster.members() {
        match cluster.nodes[index].state {
            NodeState::Paused => cluster.nodes[index].resume()?,
            NodeState::Down => {
                warn!(node = %cluster.nodes[index].name, "down after the faults: starting it");
                cluster.nodes[index].restart().await?;
                cluster.publish();
            }
            _ => {}
        }
    }
    // The rolling upgrade completes, under traffic, one member at a time.
    if fault_result.is_ok() {
        for index in cluster.members() {
            if cluster.nodes[index].runs_previous() {
                faults::upgrade(&mut cluster, index, &mut report.faults).await?;
                if !cluster.wait_healthy(Duration::from_secs(30)).await {
                    warn!("the cluster did not look healthy within 30 s of the upgrade; going on");
                }
            }
        }
    }
    info!("faults over; letting the producers finish their exports in progress");
    stop.send_replace(true);
    for producer in producers {
        producer.await?;
    }
    writer.await?;
    // An aborted task drops what it holds only once it is awaited.
    progress.abort();
    let _ = progress.await;
    let ledger = Arc::try_unwrap(ledger).map_err(|_| anyhow::anyhow!("ledger shared"))?.into_inner().expect("ledger");
    let writes = Arc::try_unwrap(writes).map_err(|_| anyhow::anyhow!("writes shared"))?.into_inner().expect("writes");
    let (acked, unknown, retried) = ledger.counts();
    report.exports = (ledger.records.len() as u64, acked, unknown, retried);
    report.logs = ledger.log_counts();
    report.failed_attempts = ledger.failed_attempts.iter().map(|(c, n)| (*c, *n)).collect();
    let writes_acked = writes.iter().filter(|w| w.version.is_some()).count() as u64;
    report.writes = (writes.len() as u64, writes_acked, writes.len() as u64 - writes_acked);
    save_jsonl(&root.join("ledger.jsonl"), &ledger.records)?;
    save_jsonl(&root.join("config-writes.jsonl"), &writes)?;
    fault_result?;

    // Settle, then judge.
    info!("waiting for the cluster to settle");
    let settle_started = Instant::now();
    let settled = cluster.wait_settled(Duration::from_secs(args.settle_seconds)).await;
    faults::check_crashes(&mut cluster, &mut report.faults).await?;
    let views = cluster.views().await;
    let views_json: Vec<serde_json::Value> = views
        .iter()
        .map(|(n, v)| serde_json::json!({"node": n, "view": v.as_ref().ok(), "error": v.as_ref().err()}))
        .collect();
    std::fs::write(root.join("cluster-final.json"), serde_json::to_string_pretty(&views_json)?)?;
    match settled {
        Ok(views) => {
            let epoch = views.first().map(|(_, v)| v["vnodes"]["epoch"].clone()).unwrap_or_default();
            report.checks.push(Check {
                name: "cluster settled".into(),
                passed: true,
                detail: format!(
                    "{} members, vnode epoch {epoch}, after {:.1} s",
                    views.len(),
                    settle_started.elapsed().as_secs_f64()
                ),
            });
        }
        Err(problem) => {
            report.checks.push(Check {
                name: "cluster settled".into(),
                passed: false,
                detail: format!("not within {} s: {problem}", args.settle_seconds),
            });
        }
    }
    let last_time = ledger.records.iter().map(|r| r.time).max().unwrap_or(settings.base);
    let start = settings.base - settings.base % 60 - 60;
    let end = last_time - last_time % 60 + 120;
    report.checks.extend(judge::check_totals(&cluster, &ledger, start, end).await);
    report.checks.extend(judge::check_logs(&cluster, &ledger, start, end).await);
    report.checks.push(judge::check_pricing(&cluster, &writes).await);
    report.checks.extend(judge::check_new_writes(&cluster, &settings, seed).await);

    let mut unexpected: Vec<String> = ledger.unexpected.clone();
    for write in &writes {
        for (node, class, error) in &write.failures {
            if *class == AttemptClass::Unexpected {
                unexpected.push(format!("pricing write #{} via {node}: {error}", write.seq));
            }
        }
    }
    report.checks.push(Check {
        name: "no unexpected answers (INTERNAL, rejected points, other statuses)".into(),
        passed: unexpected.is_empty(),
        detail: if unexpected.is_empty() { "none".into() } else { unexpected.join("\n") },
    });
    report.checks.push(failover_check(&cluster));
    report.leaders = leaderships(&cluster);
    report.checks.push(Check {
        name: "nodes started, stopped and changed membership as asked".into(),
        passed: report.faults.violations.is_empty(),
        detail: if report.faults.violations.is_empty() {
            "no crash, failed start, unclean stop or failed membership change".into()
        } else {
            report.faults.violations.join("\n")
        },
    });
    // Stop the nodes (the summary follows); their logs and data stay in the directory.
    for node in cluster.nodes.iter_mut().filter(|n| n.state == NodeState::Up) {
        node.kill9();
    }
    Ok(())
}

/// No member was unreachable for `failover_after` (10 s): every fault is shorter, so a failover
/// means a node took too long to stop, start or rejoin. A failover gives vnodes away without a
/// hand-over, and the new owner cannot continue their cumulative series exactly (the failover
/// section of docs/operations.md), so the totals would be off for reasons of their own.
fn failover_check(cluster: &Cluster) -> Check {
    let mut lines = Vec::new();
    for node in &cluster.nodes {
        let text = std::fs::read_to_string(&node.log).unwrap_or_default();
        lines.extend(failover_lines(&text).map(|line| format!("{}: {line}", node.name)));
    }
    Check {
        name: "no failover (no member unreachable for failover_after)".into(),
        passed: lines.is_empty(),
        detail: if lines.is_empty() { "none".into() } else { lines.join("\n") },
    }
}

/// Every Raft leadership the nodes logged (`raft leader term=T leader=NAME`), in term order:
/// a fault of a follower should not make one (members ask first whether they could win).
fn leaderships(cluster: &Cluster) -> Vec<(u64, String)> {
    let mut seen = std::collections::BTreeSet::new();
    for node in &cluster.nodes {
        let text = std::fs::read_to_string(&node.log).unwrap_or_default();
        seen.extend(leader_lines(&text));
    }
    seen.into_iter().collect()
}

/// The (term, leader) of each `raft leader` line (plain or coloured).
fn leader_lines(log: &str) -> impl Iterator<Item = (u64, String)> + '_ {
    log.lines().filter(|line| line.contains("raft leader")).filter_map(|line| {
        let plain: String = strip_ansi(line);
        let field = |name: &str| plain.split_whitespace().find_map(|word| word.strip_prefix(name).map(str::to_string));
        Some((field("term=")?.parse().ok()?, field("leader=")?))
    })
}

/// `line` without ANSI escape sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The leader's log lines that reassign or abort a vnode move because a member is unreachable
/// (plain or coloured: the level and the fields may be wrapped in ANSI escapes).
fn failover_lines(log: &str) -> impl Iterator<Item = &str> {
    log.lines().filter(|line| line.contains("WARN") && line.contains(" failover "))
}

/// Logs progress every 10 s.
async fn progress(ledger: Arc<Mutex<Ledger>>, writes: Arc<Mutex<Vec<ConfigWrite>>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (exports, (acked, unknown, retried), failed) = {
            let ledger = ledger.lock().expect("ledger");
            (ledger.records.len(), ledger.counts(), ledger.failed_attempts.values().sum::<u64>())
        };
        let (written, acked_writes) = {
            let writes = writes.lock().expect("writes");
            (writes.len(), writes.iter().filter(|w| w.version.is_some()).count())
        };
        info!(
            exports,
            acked,
            unknown,
            retried,
            failed_attempts = failed,
            pricing_writes = written,
            pricing_acked = acked_writes,
            "progress"
        );
    }
}

fn save_jsonl<T: serde::Serialize>(path: &Path, items: &[T]) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for item in items {
        serde_json::to_writer(&mut file, item)?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    Ok(())
}

fn print_summary(args: &Args, seed: u64, root: &Path, report: &Report, code: u8) {
    let faults: Vec<String> = args.faults.iter().map(|f| format!("{f:?}").to_lowercase()).collect();
    say!();
    say!("==== tollgate-chaos summary ====");
    say!(
        "seed {seed}, {} nodes, {} s of faults ({}), {:.0} s in all",
        args.nodes,
        args.duration,
        faults.join(","),
        report.elapsed.as_secs_f64()
    );
    if let Some(previous) = &args.upgrade_from {
        say!("a rolling upgrade from {}", previous.display());
    }
    let (sent, acked, unknown, retried) = report.exports;
    say!("exports: {sent} sent, {acked} acknowledged, {unknown} unknown, {retried} retried");
    let (log_exports, records, kept) = report.logs;
    say!("of which access logs: {log_exports} exports of {records} records, {kept} of them to be kept");
    let attempts: Vec<String> = report.failed_attempts.iter().map(|(c, n)| format!("{} {n}", c.name())).collect();
    say!("failed attempts: {}", if attempts.is_empty() { "none".into() } else { attempts.join(", ") });
    let (writes, writes_acked, writes_unknown) = report.writes;
    say!("pricing writes: {writes} ({writes_acked} acknowledged, {writes_unknown} unknown)");
    let injected: Vec<String> = report.faults.injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
    say!("faults injected: {}", if injected.is_empty() { "none".into() } else { injected.join(", ") });
    let leaders: Vec<String> = report.leaders.iter().map(|(term, name)| format!("{name} (term {term})")).collect();
    say!("raft leaders: {}", if leaders.is_empty() { "none logged".into() } else { leaders.join(", ") });
    say!("checks:");
    for check in &report.checks {
        let verdict = if check.passed { "PASS" } else { "FAIL" };
        let mut lines = check.detail.lines();
        say!("  {verdict} {}: {}", check.name, lines.next().unwrap_or(""));
        for line in lines {
            say!("       {line}");
        }
    }
    if let Some(reason) = &report.aborted {
        say!("ABORTED: {reason}");
    }
    let verdict = match code {
        0 => "PASS",
        1 => "FAIL (violations found)",
        _ => "ERROR (the run could not be carried out)",
    };
    say!("verdict: {verdict}");
    if code == 0 && args.data.is_none() && !args.keep {
        say!("data: {} (deleted: the run passed; --keep keeps it)", root.display());
    } else {
        say!("data: {} (chaos.log, <node>.log, ledger.jsonl)", root.display());
    }
}

#[cfg(test)]
mod tests {
    use super::failover_lines;

    #[test]
    fn test_leader_lines_reads_term_and_name_plain_or_coloured() {
        let log = "2026-12-06T19:30:10.663597Z  INFO raft leader term=1 leader=n1 id=24 this_node=true\n\
                   2026-12-06T19:30:11.000000Z  INFO vnodes owned by this node owned=3 of=32\n\
                   2026-12-06T19:30:30.665533Z \x1b[32m INFO\x1b[0m raft leader \x1b[3mterm\x1b[0m\x1b[2m=\x1b[0m3 \
                   \x1b[3mleader\x1b[0m\x1b[2m=\x1b[0mn2 \x1b[3mid\x1b[0m\x1b[2m=\x1b[0m7\n";
        let found: Vec<(u64, String)> = super::leader_lines(log).collect();
        assert_eq!(found, vec![(1, "n1".to_string()), (3, "n2".to_string())]);
    }

    #[test]
    fn test_failover_lines_finds_the_leaders_warnings_plain_or_coloured() {
        let log = "2026-12-03T12:10:41.512Z  INFO moving a vnode vnode=3 from=1 to=4\n\
                   2026-12-03T12:10:41.613Z  WARN failover vnode=5 command=reassign(5 -> 2)\n\
                   2026-12-03T12:10:41.614Z \x1b[33m WARN\x1b[0m failover \x1b[3mvnode\x1b[0m\x1b[2m=\x1b[0m6\n\
                   2026-12-03T12:10:42.000Z  INFO took a vnode over vnode=7 from=1\n";
        let found: Vec<&str> = failover_lines(log).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("vnode=5") && found[1].contains("6"));
    }
}
