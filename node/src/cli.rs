//! The command line (SPEC §9): `serve` runs a node; the other commands are clients of a node's
//! HTTP API (`--api`, default `http://127.0.0.1:12800`).

use crate::clock::SystemClock;
use crate::config::{FlagOverrides, NodeConfig};
use crate::server::Node;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{error, info, warn};

/// Client commands write their output with these instead of `println!`/`print!`: when standard
/// output is closed early (`tollgate query --list | head`), the write error ends the command
/// quietly ([`StdoutClosed`]) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?;
    }};
}

/// [`out!`] without the newline.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*).map_err(stdout_error)?;
    }};
}

/// Standard output was closed by its reader: not a failure of the command.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

fn stdout_error(error: std::io::Error) -> anyhow::Error {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(error).context("writing to standard output")
    }
}

/// Exact observability for AI gateway traffic.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// The node API to talk to (client commands, not `serve`).
    #[arg(long, global = true, env = "TOLLGATE_API", default_value = "http://127.0.0.1:12800")]
    pub api: String,
    /// Bearer token for writes (client commands, not `serve`).
    #[arg(long, global = true, env = "TOLLGATE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Seconds a client command waits for the node's answer (`cluster leave`: at least 330; not `serve`)
    #[arg(long, global = true, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), value_name = "SECONDS")]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (a new single node with data under ./data when given no options).
    Serve(ServeArgs),
    /// Read or replace the pricing document (gen-ai-config.yml format).
    Pricing {
        /// get or set.
        #[command(subcommand)]
        action: DocumentAction,
    },
    /// Read or replace the rules document (routing, sampling thresholds, catalogue).
    Rules {
        /// get or set.
        #[command(subcommand)]
        action: DocumentAction,
    },
    /// Query a metric.
    Query(QueryArgs),
    /// List kept access logs, newest first.
    Logs(LogsArgs),
    /// List services and their instances.
    Services,
    /// The cluster: its members, and admitting or removing them.
    Cluster {
        /// status, join or leave.
        #[command(subcommand)]
        action: ClusterAction,
    },
}

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Members, roles, leader, Raft term and indexes, vnode ownership.
    Status {
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Admit the node whose API is NODE_API (a node started with --join that waits to be let in,
    /// or a member whose addresses changed).
    Join {
        /// The new node's API URL, e.g. http://10.0.0.7:12800.
        #[arg(value_parser = api_url)]
        node_api: String,
    },
    /// Remove a member (id or name): its vnodes and their data move to the others first.
    Leave {
        /// Raft id or name of the member.
        node: String,
    },
}

/// Document commands.
#[derive(Debug, Subcommand)]
pub enum DocumentAction {
    /// Print the document in force (YAML) and its version.
    Get,
    /// Replace the document with FILE (YAML or JSON); prints the new version.
    Set {
        /// The document.
        file: PathBuf,
    },
}

/// `tollgate serve` options; each also comes from the config file and `TOLLGATE_<OPTION>`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// YAML configuration file (also `TOLLGATE_CONFIG`).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Node identity.
    #[arg(long)]
    pub node_id: Option<String>,
    /// OTLP/gRPC listen addresses, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub otlp_grpc_addrs: Option<Vec<SocketAddr>>,
    /// OTLP/HTTP listen address.
    #[arg(long)]
    pub otlp_http_addr: Option<SocketAddr>,
    /// API listen address.
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Cluster listen address.
    #[arg(long)]
    pub cluster_addr: Option<SocketAddr>,
    /// HOST:PORT other nodes reach this node's cluster port at.
    #[arg(long)]
    pub advertise_addr: Option<String>,
    /// Cluster addresses of running nodes to join, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub join: Option<Vec<String>>,
}

/// `tollgate query` options.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Metric name (`tollgate query --list` shows them all).
    pub metric: Option<String>,
    /// List the catalogue instead.
    #[arg(long, conflicts_with_all = ["metric", "service", "instance", "start", "end", "step", "json"])]
    pub list: bool,
    /// Service.
    #[arg(long, requires = "metric")]
    pub service: Option<String>,
    /// Instance (instance metrics).
    #[arg(long, requires = "metric")]
    pub instance: Option<String>,
    /// Start (RFC 3339 or unix seconds; default: an hour before end).
    #[arg(long, requires = "metric")]
    pub start: Option<String>,
    /// End, exclusive (default: now).
    #[arg(long, requires = "metric")]
    pub end: Option<String>,
    /// minute, hour or day.
    #[arg(long, requires = "metric")]
    pub step: Option<String>,
    /// Print the raw JSON answer.
    #[arg(long, requires = "metric")]
    pub json: bool,
}

/// `tollgate logs` options.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Service.
    #[arg(long)]
    pub service: String,
    /// Instance.
    #[arg(long)]
    pub instance: Option<String>,
    /// Start (RFC 3339 or unix seconds).
    #[arg(long)]
    pub start: Option<String>,
    /// End, exclusive.
    #[arg(long)]
    pub end: Option<String>,
    /// Keep reason.
    #[arg(long)]
    pub reason: Option<String>,
    /// llm or mcp.
    #[arg(long)]
    pub kind: Option<String>,
    /// Model.
    #[arg(long)]
    pub model: Option<String>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Continue from a previous page's cursor.
    #[arg(long)]
    pub cursor: Option<String>,
}

/// Parses the command line: as [`Cli::parse`], and `serve` refuses the client commands' options
/// given on its command line, which it would otherwise ignore (`serve --token` left the writes
/// open while `--help` said it set a token).
fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    // Checked for the client commands only: `serve` ignores TOLLGATE_API (a value set for the
    // client commands in the same environment stopped the node from starting).
    if !matches!(cli.command, Command::Serve(_)) {
        if let Err(error) = api_url(&cli.api) {
            return Err(Cli::command()
                .error(clap::error::ErrorKind::ValueValidation, format!("--api (or TOLLGATE_API): {error}")));
        }
    }
    if let (Command::Serve(_), Some(serve)) = (&cli.command, matches.subcommand_matches("serve")) {
        let given = |matches: &ArgMatches, id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        for (id, instead) in [
            ("token", "the node's token is `api_token` in its configuration file, or TOLLGATE_API_TOKEN"),
            ("api", "the node's API address is `--http-addr`"),
            ("timeout", "it applies to client commands only"),
        ] {
            if given(&matches, id) || given(serve, id) {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--{id} is an option of the client commands, not of `serve`: {instead}"),
                ));
            }
        }
    }
    Ok(cli)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    if let Err(e) = init_logging() {
        eprintln!("tollgate: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            command => {
                let timeout = std::time::Duration::from_secs(cli.timeout);
                Client::with_timeouts(cli.api, cli.token, CONNECT_TIMEOUT, timeout)?.run(command).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An API URL: `http://`, a host, an optional port (and path). The node's API is plain HTTP,
/// and the client speaks nothing else: `https://` passed and then every command failed to connect.
fn api_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| format!("{text:?} is not a URL ({e}); expected http://HOST:PORT, e.g. http://127.0.0.1:12800"))?;
    if url.scheme() == "https" {
        return Err(format!(
            "{text:?}: the client speaks plain HTTP, as the node's API does (no TLS); give the node's http:// address"
        ));
    }
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err(format!("{text:?} is not an http:// URL with a host, e.g. http://127.0.0.1:12800"));
    }
    Ok(text.to_string())
}

/// Logs to standard output: `TOLLGATE_LOG` (or `RUST_LOG`) filters them, `TOLLGATE_LOG_FORMAT`
/// chooses `text` (the default; coloured only on a terminal, so that files and log collectors get
/// plain lines) or `json` (one object per line).
///
/// openraft reports its internals at `info` (its tasks starting and stopping, every vote and
/// step of an election: about 25 lines for one start and stop of a single node), and on the
/// leader a warning for every heartbeat and replication call to a member that is down (four a
/// second each), which buries the node's own lines. The node logs what an operator needs of
/// them itself (a new leader; losing and regaining contact with a member), so unless the filter
/// names `openraft`, only [`openraft_shown`] events of openraft pass it.
fn init_logging() -> Result<(), String> {
    use tracing_subscriber::filter::{filter_fn, FilterExt as _};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let (variable, directives) = match std::env::var("TOLLGATE_LOG") {
        Ok(directives) => ("TOLLGATE_LOG", directives),
        Err(_) => ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
    };
    let filter = log_filter(&directives).map_err(|e| format!("{variable}: {e}"))?;
    let quiet_raft = !directives.contains("openraft");
    let raft = filter_fn(move |event| !quiet_raft || openraft_shown(event.target(), event.level()));
    let filter = filter.and(raft);
    let layer = tracing_subscriber::fmt::layer().with_target(false);
    let layer = match std::env::var("TOLLGATE_LOG_FORMAT").as_deref() {
        Err(_) | Ok("text") => layer.with_ansi(std::io::stdout().is_terminal()).with_filter(filter).boxed(),
        Ok("json") => layer.json().flatten_event(true).with_filter(filter).boxed(),
        Ok(other) => return Err(format!("TOLLGATE_LOG_FORMAT: {other:?} is not a log format (text or json)")),
    };
    tracing_subscriber::registry().with(layer).init();
    Ok(())
}

/// The log filter of `directives` (`tracing`'s `EnvFilter` syntax), refusing what it would
/// take silently for something else: a word that is not a level (`warning`, `notalevel`) is a
/// target name to it, and the filter then shows that target only, that is nothing.
fn log_filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    for directive in directives.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[', '{']);
        if bare && directive.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} is not a level (error, warn, info, debug, trace or off) nor TARGET=LEVEL, e.g. \
                 info or info,tollgate=debug"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(directives).map_err(|e| format!("{directives:?} is not a log filter: {e}"))
}

/// Whether an event of `target` at `level` is logged when the filter does not name openraft:
/// everything but openraft's `info` and below, and its warnings about calls to members that do
/// not answer (the node's "lost contact with a member" says it once).
fn openraft_shown(target: &str, level: &tracing::Level) -> bool {
    const PER_CALL: [&str; 3] =
        ["openraft::core::heartbeat", "openraft::replication", "openraft::engine::handler::replication_handler"];
    if !target.starts_with("openraft") {
        return true;
    }
    *level <= tracing::Level::WARN
        && !(*level == tracing::Level::WARN && PER_CALL.iter().any(|p| target.starts_with(p)))
}

/// The exit status of a stop forced by a second signal (128 + SIGINT, as shells report Ctrl-C).
pub const FORCED_EXIT: i32 = 130;

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let environment: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("TOLLGATE_")).collect();
    let flags = FlagOverrides {
        data_dir: args.data_dir,
        node_id: args.node_id,
        otlp_grpc_addrs: args.otlp_grpc_addrs,
        otlp_http_addr: args.otlp_http_addr,
        http_addr: args.http_addr,
        cluster_addr: args.cluster_addr,
        advertise_addr: args.advertise_addr,
        join: args.join,
    };
    let config = NodeConfig::load(args.config.as_deref(), &environment, &flags)?;
    let shutdown_delay = std::time::Duration::from_millis(config.shutdown_delay_ms);
    // Listening from before the start: a start can take minutes (a node waits to be admitted to
    // its cluster), and a signal nobody listens for kills the process at once, or does nothing to
    // a container's first process, which is then killed at the end of its grace period.
    let first = shutdown_signal();
    tokio::pin!(first);
    let mut node = tokio::select! {
        node = Node::start(config, Arc::new(SystemClock)) => node?,
        _ = &mut first => {
            // Whatever it acknowledged meanwhile is on disk already, as after `kill -9`.
            info!("stopped while starting");
            return Ok(());
        }
    };
    let reason = tokio::select! {
        _ = &mut first => None,
        reason = node.fatal() => Some(reason),
    };
    // A second signal stops at once, without waiting for requests in flight: what was
    // acknowledged is on disk already, as after `kill -9`.
    let second = shutdown_signal();
    info!("shutting down");
    tokio::spawn(async move {
        second.await;
        warn!("a second signal: stopping now, without draining");
        std::process::exit(FORCED_EXIT);
    });
    if reason.is_none() && !shutdown_delay.is_zero() {
        node.unready();
        info!(
            delay_ms = shutdown_delay.as_millis() as u64,
            "stopping: not ready, still serving while load balancers stop sending requests (shutdown_delay_ms)"
        );
        tokio::time::sleep(shutdown_delay).await;
    }
    node.shutdown().await;
    match reason {
        None => Ok(()),
        Some(reason) => {
            error!(%reason, "stopped after a fatal error");
            Err(anyhow::anyhow!("stopped: {reason}"))
        }
    }
}

/// Resolves at the next SIGTERM or SIGINT (Ctrl-C). It listens from the moment it is called, not
/// from its first poll, so that a signal right after the call is not missed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listeners = signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
        async move {
            match listeners {
                Ok((mut terminate, mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                Err(_) => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Why `what` could not be asked, with the causes ("connection refused", "timed out"), which
/// reqwest's own message leaves out.
fn unreachable(what: &str, error: &reqwest::Error) -> anyhow::Error {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let causes = if causes.is_empty() { error.to_string() } else { causes.join(": ") };
    if error.is_timeout() {
        return anyhow::anyhow!("{what} did not answer in time ({causes})");
    }
    anyhow::anyhow!("cannot reach {what}: {causes}")
}

/// A client of a node's HTTP API.
#[derive(Debug)]
pub struct Client {
    api: String,
    token: Option<String>,
    http: reqwest::Client,
    request_timeout: std::time::Duration,
}

/// How long a client command waits to connect to a node.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long `cluster leave` waits at least: the node answers once its vnodes moved away, or
/// after 300 s.
const LEAVE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(330);

/// `value` as one segment of a URL path: every byte but RFC 3986's unreserved characters
/// percent-encoded, so that a name holding `/`, `?` or `#` names that one resource.
fn path_segment(value: &str) -> String {
    let mut segment = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            segment.push(char::from(byte));
        } else {
            segment.push_str(&format!("%{byte:02X}"));
        }
    }
    segment
}

impl Client {
    /// A client of `api` that waits `connect` to connect and `request` for an answer (`--timeout`;
    /// a paused or hung node made a command wait forever).
    pub fn with_timeouts(
        api: String,
        token: Option<String>,
        connect: std::time::Duration,
        request: std::time::Duration,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder().connect_timeout(connect).timeout(request).build()?;
        Ok(Client { api: api.trim_end_matches('/').to_string(), token, http, request_timeout: request })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(|e| unreachable(&self.api, &e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body =
            response.text().await.map_err(|e| anyhow::anyhow!("{status}, and its message could not be read: {e}"))?;
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(body);
        if message.trim().is_empty() {
            // Not Tollgate's API (it says what was wrong): another port of the node (OTLP/HTTP
            // answers an unknown path with an empty 404), or another server.
            anyhow::bail!("{status} without a message from {}: is it a Tollgate node's API address (http_addr, port 12800 by default)?", self.api)
        }
        anyhow::bail!("{status}: {message}")
    }

    async fn get_json(&self, path: &str, query: &[(&str, Option<String>)]) -> anyhow::Result<Value> {
        let query: Vec<(&str, String)> = query.iter().filter_map(|(k, v)| v.clone().map(|v| (*k, v))).collect();
        let response = self.send(self.http.get(format!("{}{path}", self.api)).query(&query)).await?;
        if let Some(missing) = response.headers().get("x-tollgate-missing-nodes") {
            eprintln!(
                "tollgate: warning: no answer from {}: their data is missing, values may be too low",
                missing.to_str().unwrap_or("some members")
            );
        }
        Ok(response.json().await?)
    }

    /// Runs a client command.
    pub async fn run(&self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::Serve(_) => unreachable!("serve is not a client command"),
            Command::Pricing { action } => self.document("pricing", action).await,
            Command::Rules { action } => self.document("rules", action).await,
            Command::Cluster { action } => self.cluster(action).await,
            Command::Services => {
                let value = self.get_json("/api/v1/services", &[]).await?;
                out!("{}", serde_json::to_string_pretty(&value)?);
                Ok(())
            }
            Command::Query(args) => {
                if args.list || args.metric.is_none() {
                    let value = self.get_json("/api/v1/metrics", &[]).await?;
                    for entry in value.as_array().into_iter().flatten() {
                        out!(
                            "{:<60} {:<16} {:<9} {}",
                            entry["name"].as_str().unwrap_or(""),
                            entry["unit"].as_str().unwrap_or(""),
                            entry["scope"].as_str().unwrap_or(""),
                            entry["labels"]
                                .as_array()
                                .map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                                .unwrap_or_default()
                        );
                    }
                    return Ok(());
                }
                let metric = args.metric.unwrap_or_default();
                let value = self
                    .get_json(
                        &format!("/api/v1/metrics/{}", path_segment(&metric)),
                        &[
                            ("service", args.service),
                            ("instance", args.instance),
                            ("start", args.start),
                            ("end", args.end),
                            ("step", args.step),
                        ],
                    )
                    .await?;
                if args.json {
                    out!("{}", serde_json::to_string_pretty(&value)?);
                    return Ok(());
                }
                out!(
                    "{} ({}), step {}",
                    value["name"].as_str().unwrap_or(""),
                    value["unit"].as_str().unwrap_or(""),
                    value["step"].as_str().unwrap_or("")
                );
                for series in value["series"].as_array().into_iter().flatten() {
                    out!("{}", series["labels"]);
                    for point in series["points"].as_array().into_iter().flatten() {
                        let time = point[0].as_i64().unwrap_or(0);
                        let stamp =
                            chrono::DateTime::from_timestamp(time, 0).map(|t| t.to_rfc3339()).unwrap_or_default();
                        out!("  {stamp}  {}", point[1]);
                    }
                }
                Ok(())
            }
            Command::Logs(args) => {
                let value = self
                    .get_json(
                        "/api/v1/logs",
                        &[
                            ("service", Some(args.service)),
                            ("instance", args.instance),
                            ("start", args.start),
                            ("end", args.end),
                            ("reason", args.reason),
                            ("kind", args.kind),
                            ("model", args.model),
                            ("limit", args.limit.map(|l| l.to_string())),
                            ("cursor", args.cursor),
                        ],
                    )
                    .await?;
                out!("{}", serde_json::to_string_pretty(&value)?);
                Ok(())
            }
        }
    }

    async fn cluster(&self, action: ClusterAction) -> anyhow::Result<()> {
        match action {
            ClusterAction::Status { json } => {
                let value = self.get_json("/api/v1/cluster", &[]).await?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&value)?);
                    return Ok(());
                }
                let status: tollgate_cluster::ClusterStatus = serde_json::from_value(value)?;
                out_raw!("{}", render_status(&status));
                Ok(())
            }
            ClusterAction::Join { node_api } => {
                let node_api = node_api.trim_end_matches('/');
                let url = format!("{node_api}/api/v1/cluster");
                let response = self.http.get(&url).send().await.map_err(|e| unreachable(&url, &e))?;
                if !response.status().is_success() {
                    anyhow::bail!("{url}: {}", response.status());
                }
                let node: tollgate_cluster::ClusterStatus = response.json().await?;
                let body = serde_json::json!({
                    "node_id": node.node_id,
                    "name": node.name,
                    "cluster_addr": node.cluster_addr,
                    "api_addr": node.api_addr,
                    "vnodes": node.configured_vnodes,
                    "cluster_id": node.cluster_id,
                });
                let response =
                    self.send(self.http.post(format!("{}/api/v1/cluster/nodes", self.api)).json(&body)).await?;
                let value: Value = response.json().await?;
                out!("admitted {} (id {}) by leader {}", node.name, node.node_id, value["leader"]);
                Ok(())
            }
            ClusterAction::Leave { node } => {
                let url = format!("{}/api/v1/cluster/nodes/{}", self.api, path_segment(&node));
                let wait = self.request_timeout.max(LEAVE_REQUEST_TIMEOUT);
                let response = self.send(self.http.delete(url).timeout(wait)).await?;
                let value: Value = response.json().await?;
                out!(
                    "removed {node} (id {}): its vnodes moved and another member holds its data; its process can be stopped",
                    value["removed"]
                );
                Ok(())
            }
        }
    }

    async fn document(&self, name: &str, action: DocumentAction) -> anyhow::Result<()> {
        let url = format!("{}/api/v1/config/{name}", self.api);
        match action {
            DocumentAction::Get => {
                let response = self.send(self.http.get(&url).header("accept", "application/yaml")).await?;
                let version = response
                    .headers()
                    .get("x-tollgate-config-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                if response.headers().get("x-tollgate-up-to-date").is_some_and(|v| v == "false") {
                    eprintln!(
                        "tollgate: warning: this node is not in touch with a leader that has a majority: the \
                         {name} it shows may be stale"
                    );
                }
                out!("# {name} version {version}");
                out_raw!("{}", response.text().await?);
                Ok(())
            }
            DocumentAction::Set { file } => {
                let body =
                    std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                // The node refuses it with 413 before reading it, which a client still sending
                // sees as a broken connection ("cannot reach": as if the node were down).
                if body.len() > crate::api::MAX_DOCUMENT_BYTES {
                    anyhow::bail!(
                        "{} is {} bytes: the API takes documents of at most {} bytes",
                        file.display(),
                        body.len(),
                        crate::api::MAX_DOCUMENT_BYTES
                    );
                }
                let response =
                    self.send(self.http.put(&url).header("content-type", "application/yaml").body(body)).await?;
                let value: Value = response.json().await?;
                out!("{name} version {}", value["version"]);
                Ok(())
            }
        }
    }
}

/// `tollgate cluster status` as text.
pub fn render_status(status: &tollgate_cluster::ClusterStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = status
        .leader
        .and_then(|id| status.nodes.iter().find(|n| n.id == id).map(|n| format!("{} ({id})", n.name)))
        .unwrap_or_else(|| "none".into());
    let _ = writeln!(out, "this node  {} ({}), {}", status.name, status.node_id, status.state);
    let member = status.nodes.iter().any(|n| n.id == status.node_id);
    let cluster = match status.cluster_id {
        Some(id) => id.to_string(),
        None if member => "not recorded (bootstrapped by a version before it was)".to_string(),
        None => "none yet (not a member)".to_string(),
    };
    let _ = writeln!(out, "cluster    {cluster}");
    let _ = writeln!(out, "leader     {leader}, term {}", status.term);
    if !status.in_contact {
        let _ = writeln!(
            out,
            "contact    no leader with a majority in touch (an election, not yet admitted, or cut off from the \
             majority): what this node shows may be stale"
        );
    }
    let index = |i: Option<u64>| i.map_or_else(|| "-".to_string(), |i| i.to_string());
    let _ = writeln!(
        out,
        "raft log   last {}, committed {}, applied {}",
        index(status.last_log_index),
        index(status.commit_index),
        index(status.applied_index)
    );
    let _ = writeln!(
        out,
        "vnodes     {} (map epoch {}, {} moving, {} to move)",
        status.vnodes.total, status.vnodes.epoch, status.vnodes.moving, status.vnodes.to_move
    );
    let _ = writeln!(
        out,
        "{:<20} {:<20} {:<8} {:>6} {:>10}  {:<22} api",
        "id", "name", "role", "vnodes", "contact", "cluster"
    );
    for node in &status.nodes {
        let contact = node.last_contact_ms.map_or_else(|| "-".to_string(), |ms| format!("{ms}ms"));
        let role = if node.leaving { format!("{}*", node.role) } else { node.role.clone() };
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<8} {:>6} {:>10}  {:<22} {}",
            node.id, node.name, role, node.vnodes, contact, node.cluster_addr, node.api_addr
        );
    }
    if status.nodes.iter().any(|n| n.leaving) {
        let _ = writeln!(out, "* leaving: its vnodes are moving to the other members");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{api_url, log_filter, openraft_shown, parse_args, path_segment, render_status, Cli, Client};
    use clap::Parser;
    use tracing::Level;

    #[test]
    fn test_a_path_segment_keeps_only_unreserved_characters() {
        assert_eq!(path_segment("meter_envoy_ai_gw_request_cpm"), "meter_envoy_ai_gw_request_cpm");
        assert_eq!(path_segment("a/b?c#d e.f~g-h"), "a%2Fb%3Fc%23d%20e.f~g-h");
        assert_eq!(path_segment("ü"), "%C3%BC");
    }

    /// A node that accepts the connection and never answers (paused, hung) gets a timeout, not
    /// a wait forever; one that refuses it is named with the reason.
    #[tokio::test]
    async fn test_client_commands_time_out_and_say_why_a_node_is_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = format!("http://{}", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                connections.push(connection);
            }
        });
        let timeout = std::time::Duration::from_millis(300);
        let client = Client::with_timeouts(silent.clone(), None, timeout, timeout).unwrap();
        let started = std::time::Instant::now();
        let error = client.get_json("/api/v1/cluster", &[]).await.unwrap_err().to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{error}");
        assert!(error.starts_with(&format!("{silent} did not answer in time")), "{error}");
        held.abort();

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let client = Client::with_timeouts(refused.clone(), None, timeout, timeout).unwrap();
        let error = client.get_json("/api/v1/cluster", &[]).await.unwrap_err().to_string();
        assert!(error.starts_with(&format!("cannot reach {refused}: ")), "{error}");
        assert!(error.to_lowercase().contains("refused"), "{error}");
    }

    /// A document larger than the API takes is refused before it is sent: the node's early 413
    /// reached the client as a broken pipe, reported as an unreachable node.
    #[tokio::test]
    async fn test_a_document_too_large_is_refused_before_it_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.yaml");
        std::fs::write(&file, "#".repeat(crate::api::MAX_DOCUMENT_BYTES + 1)).unwrap();
        let second = std::time::Duration::from_secs(1);
        let client = Client::with_timeouts("http://127.0.0.1:1".into(), None, second, second).unwrap();
        let command = super::Command::Pricing { action: super::DocumentAction::Set { file: file.clone() } };
        let error = client.run(command).await.unwrap_err().to_string();
        assert!(error.contains("is 4194305 bytes: the API takes documents of at most 4194304 bytes"), "{error}");
    }

    /// `cluster status` says which cluster the node's state belongs to (comparing it across
    /// nodes tells a node of another cluster), and that a node waiting to join has none.
    #[test]
    fn test_cluster_status_shows_the_cluster() {
        let mut status: tollgate_cluster::ClusterStatus = serde_json::from_value(serde_json::json!({
            "node_id": 3906136011091775u64, "name": "n2", "cluster_addr": "n2:11900", "api_addr": "n2:12800",
            "configured_vnodes": 256, "cluster_id": 4158538403316899u64, "state": "follower",
            "leader": 4158538403316899u64, "term": 1, "last_log_index": 22, "commit_index": 22, "applied_index": 22,
            "nodes": [], "vnodes": {"total": 256, "epoch": 17, "moving": 0, "owners": {}}, "held_by": {}, "draining": {}
        }))
        .unwrap();
        let text = render_status(&status);
        assert!(text.lines().nth(1) == Some("cluster    4158538403316899"), "{text}");
        status.cluster_id = None;
        assert!(render_status(&status).contains("cluster    none yet (not a member)\n"));
        status.nodes.push(
            serde_json::from_value(serde_json::json!({
                "id": 3906136011091775u64, "name": "n2", "cluster_addr": "n2:11900", "api_addr": "n2:12800",
                "role": "voter", "last_contact_ms": null, "vnodes": 256, "leaving": false
            }))
            .unwrap(),
        );
        assert!(render_status(&status).contains("cluster    not recorded (bootstrapped by a version before it was)\n"));
    }

    /// A mistyped `--api` is refused with what was expected, before any request ("cannot reach
    /// not-a-url: builder error" before).
    #[test]
    fn test_api_urls_are_checked_when_parsed() {
        for good in ["http://127.0.0.1:12800", "http://tollgate.example", "http://[::1]:12800/"] {
            assert_eq!(api_url(good).as_deref(), Ok(good));
        }
        // The client cannot speak TLS: refused here rather than failing to connect later.
        let error = api_url("https://tollgate.example").unwrap_err();
        assert!(error.contains("plain HTTP") && error.contains("http://"), "{error}");
        for bad in ["not-a-url", "127.0.0.1:12800", "ftp://host", "http://", "localhost:12800"] {
            let error = api_url(bad).unwrap_err();
            assert!(error.contains(bad) && error.contains("http://127.0.0.1:12800"), "{bad}: {error}");
        }
        let error = parse_args(["tollgate", "--api", "not-a-url", "services"].map(Into::into)).unwrap_err().to_string();
        assert!(error.contains("--api (or TOLLGATE_API)") && error.contains("not-a-url"), "{error}");
        let error = Cli::try_parse_from(["tollgate", "cluster", "join", "10.0.0.7:12800"]).unwrap_err().to_string();
        assert!(error.contains("10.0.0.7:12800"), "{error}");
        // A query's options without a metric: refused (it listed the catalogue, options ignored).
        let error = Cli::try_parse_from(["tollgate", "query", "--service", "gw"]).unwrap_err().to_string();
        assert!(error.contains("<METRIC>"), "{error}");
        assert!(Cli::try_parse_from(["tollgate", "query"]).is_ok(), "the catalogue");
        assert!(Cli::try_parse_from(["tollgate", "query", "m", "--service", "gw", "--json"]).is_ok());
    }

    /// A typo in `TOLLGATE_LOG` (`warning`) made `EnvFilter` show one target of that name, and
    /// the node logged nothing at all.
    #[test]
    fn test_a_log_filter_that_would_show_nothing_is_refused() {
        for good in ["info", "warn,tollgate=debug", "info,openraft=info", "WARN", "off", "debug,tollgate::owner=trace"]
        {
            assert!(log_filter(good).is_ok(), "{good}: {:?}", log_filter(good).err());
        }
        for (bad, says) in [
            ("notalevel", "\"notalevel\" is not a level (error, warn, info, debug, trace or off) nor TARGET=LEVEL"),
            ("info,warning", "\"warning\" is not a level"),
            ("info,tollgate=loud", "\"info,tollgate=loud\" is not a log filter"),
        ] {
            let error = log_filter(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    /// `serve` refuses the client commands' options on its command line (it ignored them, so
    /// `serve --token` left the writes open); from the environment they are fine, since
    /// `TOLLGATE_API_TOKEN` is also the node's `api_token`.
    #[test]
    fn test_serve_refuses_the_client_options() {
        let parse = |args: &[&str]| parse_args(args.iter().map(std::ffi::OsString::from));
        for args in [
            &["tollgate", "serve", "--token", "s3cret"][..],
            &["tollgate", "--token", "s3cret", "serve"],
            &["tollgate", "serve", "--api", "http://127.0.0.1:1"],
            &["tollgate", "serve", "--timeout", "5"],
        ] {
            let error = parse(args).unwrap_err().to_string();
            let option = args.iter().find(|a| a.starts_with("--")).unwrap();
            assert!(error.contains(option) && error.contains("not of `serve`"), "{args:?}: {error}");
        }
        let error = parse(&["tollgate", "serve", "--token", "s3cret"]).unwrap_err().to_string();
        assert!(error.contains("api_token"), "{error}");
        assert!(parse(&["tollgate", "serve", "--data-dir", "/tmp/x"]).is_ok());
        assert!(parse(&["tollgate", "--token", "s3cret", "pricing", "get"]).is_ok());
        assert!(parse(&["tollgate", "services", "--timeout", "5"]).is_ok());
    }

    #[test]
    fn test_openraft_shows_its_warnings_and_errors_but_not_per_call_ones_or_its_internals() {
        assert!(openraft_shown("tollgate::server", &Level::INFO));
        assert!(openraft_shown("tollgate_cluster::runtime", &Level::DEBUG), "the filter decides the rest");
        assert!(!openraft_shown("openraft::core::raft_core", &Level::INFO));
        assert!(!openraft_shown("openraft::engine::engine_impl", &Level::DEBUG));
        assert!(openraft_shown("openraft::core::raft_core", &Level::WARN));
        assert!(openraft_shown("openraft::storage", &Level::ERROR));
        assert!(!openraft_shown("openraft::core::heartbeat::worker", &Level::WARN));
        assert!(!openraft_shown("openraft::replication", &Level::WARN));
        assert!(!openraft_shown("openraft::engine::handler::replication_handler", &Level::WARN));
        assert!(openraft_shown("openraft::replication", &Level::ERROR));
    }
}
