//! The judge, once the faults stopped and the cluster settled: through every member's API, each
//! service's totals lie between what was acknowledged and that plus what is unknown, and its
//! kept access logs hold every acknowledged record once, no other record twice and no dropped
//! one; the pricing converged on every member to the last acknowledged write; new writes
//! succeed.

use crate::cluster::{Cluster, Target};
use crate::config::{self, ConfigWrite};
use crate::export::{export, log_export, Pod};
use crate::ledger::{within_bounds, Ledger, LogObligations, Outcome, Tally};
use crate::producer::{self, Clients, Settings};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tollgate_rules::fleet::{Convention, Xorshift};
use tracing::{error, info};

/// The request-count metric.
pub const REQUESTS: &str = "meter_envoy_ai_gw_request_cpm";
/// The input-token metric.
pub const TOKENS: &str = "meter_envoy_ai_gw_input_token_rate";
/// The access-log request count (every record, kept or not), summed over its status classes.
pub const LOG_REQUESTS: &str = "meter_envoy_ai_gw_log_request_cpm";

/// A judged metric and its (acknowledged, unknown) figures in a tally.
type Judged = (&'static str, fn(&Tally) -> (u64, u64));

const JUDGED: [Judged; 3] = [
    (REQUESTS, |t| (t.acked_requests, t.unknown_requests)),
    (TOKENS, |t| (t.acked_tokens, t.unknown_tokens)),
    (LOG_REQUESTS, |t| (t.acked_log_records, t.unknown_log_records)),
];

/// One verdict.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// Figures, or what was wrong.
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Check {
        let check = Check { name: name.into(), passed, detail: detail.into() };
        if check.passed {
            info!(check = %check.name, detail = %check.detail, "PASS");
        } else {
            error!(check = %check.name, detail = %check.detail, "FAIL");
        }
        check
    }
}

/// A metric over a range through one node: per-minute values and the header naming members
/// that did not answer.
#[derive(Debug)]
struct Answer {
    points: BTreeMap<u64, f64>,
    missing: Option<String>,
}

async fn query(
    http: &reqwest::Client,
    api: &str,
    metric: &str,
    service: &str,
    start: u64,
    end: u64,
) -> Result<Answer, String> {
    let url = format!("{api}/api/v1/metrics/{metric}?service={service}&start={start}&end={end}&step=minute");
    let response = http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    let missing = response.headers().get("x-tollgate-missing-nodes").map(|v| v.to_str().unwrap_or("?").to_string());
    let status = response.status().as_u16();
    let body: Value = response.json().await.map_err(|e| format!("{url}: {e}"))?;
    if status != 200 {
        return Err(format!("{url}: {status} {body}"));
    }
    let mut points = BTreeMap::new();
    for series in body["series"].as_array().into_iter().flatten() {
        for point in series["points"].as_array().into_iter().flatten() {
            if let (Some(time), Some(value)) = (point[0].as_u64(), point[1].as_f64()) {
                *points.entry(time).or_default() += value;
            }
        }
    }
    Ok(Answer { points, missing })
}

/// The per-minute comparison printed when a total is off.
fn minute_diffs(minutes: &BTreeMap<u64, Tally>, got: &BTreeMap<u64, f64>, figures: fn(&Tally) -> (u64, u64)) -> String {
    let mut all: Vec<u64> = minutes.keys().chain(got.keys()).copied().collect();
    all.sort_unstable();
    all.dedup();
    let mut out = String::from("    minute (UTC)          acked  unknown      got  got-acked\n");
    for minute in all {
        let (acked, unknown) = figures(&minutes.get(&minute).copied().unwrap_or_default());
        let value = got.get(&minute).copied().unwrap_or(0.0);
        let mark = if value < acked as f64 || value > (acked + unknown) as f64 { "  <--" } else { "" };
        let when = chrono::DateTime::from_timestamp(minute as i64, 0).map(|t| t.format("%H:%M").to_string());
        let _ = writeln!(
            out,
            "    {minute} {:>5} {acked:>9} {unknown:>8} {value:>8} {:>10}{mark}",
            when.unwrap_or_default(),
            value - acked as f64
        );
    }
    out
}

/// Every member's totals of every service against the ledger.
pub async fn check_totals(cluster: &Cluster, ledger: &Ledger, start: u64, end: u64) -> Vec<Check> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
    let mut checks = Vec::new();
    for index in cluster.up() {
        let node = &cluster.nodes[index];
        for (metric, judged) in JUDGED {
            let mut problems = Vec::new();
            let mut figures = Vec::new();
            for service in ledger.services() {
                let (acked, unknown) = judged(&ledger.service_total(&service));
                match query(&http, &node.api(), metric, &service, start, end).await {
                    Err(e) => problems.push(format!("{service}: {e}")),
                    Ok(answer) => {
                        let got: f64 = answer.points.values().sum();
                        figures.push(format!("{service} {got} in [{acked}, {}]", acked + unknown));
                        if let Some(missing) = answer.missing {
                            problems.push(format!("{service}: x-tollgate-missing-nodes: {missing}"));
                        }
                        if let Err(problem) = within_bounds(got, acked, unknown) {
                            problems.push(format!(
                                "{service}: {problem}\n{}",
                                minute_diffs(&ledger.service_minutes(&service), &answer.points, judged)
                            ));
                        }
                    }
                }
            }
            let name = format!("{metric} totals through {}", node.name);
            checks.push(if problems.is_empty() {
                Check::new(name, true, figures.join(", "))
            } else {
                Check::new(name, false, problems.join("\n"))
            });
        }
    }
    checks
}

/// The `x-request-id` of every kept log of `service` in `[start, end)` (unix seconds) through
/// one node, paging with the API's cursor, and the members a page said were missing.
async fn stored_logs(
    http: &reqwest::Client,
    api: &str,
    service: &str,
    start: u64,
    end: u64,
) -> Result<(Vec<String>, Option<String>), String> {
    let mut ids = Vec::new();
    let mut missing = None;
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let mut url = format!("{api}/api/v1/logs?service={service}&start={start}&end={end}&limit=1000");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let response = http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        if let Some(value) = response.headers().get("x-tollgate-missing-nodes") {
            missing = Some(value.to_str().unwrap_or("?").to_string());
        }
        let status = response.status().as_u16();
        let body: Value = response.json().await.map_err(|e| format!("{url}: {e}"))?;
        if status != 200 {
            return Err(format!("{url}: {status} {body}"));
        }
        for log in body["logs"].as_array().into_iter().flatten() {
            ids.push(log["attributes"]["x-request-id"].as_str().unwrap_or("<no x-request-id>").to_string());
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok((ids, missing)),
        }
    }
    Err(format!("{api}: more than 100 000 pages of logs for {service}"))
}

/// Stored ids against what the service's logs must hold: `Ok` with the figures, or what is
/// wrong (lost, stored twice, dropped but stored, never sent), with a few ids of each.
fn judge_logs(must: &LogObligations, stored: &[String]) -> Result<String, String> {
    let mut times: BTreeMap<&str, u64> = BTreeMap::new();
    for id in stored {
        *times.entry(id.as_str()).or_default() += 1;
    }
    let lost: Vec<&str> = must.acked.iter().map(String::as_str).filter(|id| !times.contains_key(id)).collect();
    let twice: Vec<&str> = times.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    let dropped: Vec<&str> = times.keys().filter(|id| must.dropped.contains(**id)).copied().collect();
    let invented: Vec<&str> = times
        .keys()
        .filter(|id| !must.acked.contains(**id) && !must.unknown.contains(**id) && !must.dropped.contains(**id))
        .copied()
        .collect();
    let unknown_stored = must.unknown.iter().filter(|id| times.contains_key(id.as_str())).count();
    let mut problems = Vec::new();
    let mut report = |what: &str, ids: &[&str]| {
        if !ids.is_empty() {
            problems.push(format!("{} {what} (e.g. {:?})", ids.len(), &ids[..ids.len().min(5)]));
        }
    };
    report("acknowledged records lost", &lost);
    report("records stored more than once", &twice);
    report("records the rules drop were stored", &dropped);
    report("records stored that were never sent", &invented);
    if problems.is_empty() {
        Ok(format!(
            "{} stored: {} acknowledged, {unknown_stored} of {} unknown",
            stored.len(),
            must.acked.len(),
            must.unknown.len()
        ))
    } else {
        Err(problems.join("; "))
    }
}

/// The kept logs of `service` in `[start, end)` through the node at `api`, judged against
/// `must` ([`judge_logs`]); a page naming members that did not answer is a problem too.
async fn check_stored_logs(
    http: &reqwest::Client,
    api: &str,
    service: &str,
    (start, end): (u64, u64),
    must: &LogObligations,
) -> Result<String, String> {
    let (stored, missing) = stored_logs(http, api, service, start, end).await?;
    let judged = judge_logs(must, &stored);
    match missing {
        Some(missing) => Err(format!(
            "x-tollgate-missing-nodes: {missing}{}",
            judged.err().map(|problem| format!("; {problem}")).unwrap_or_default()
        )),
        None => judged,
    }
}

/// Every member's kept access logs of every service against the ledger.
pub async fn check_logs(cluster: &Cluster, ledger: &Ledger, start: u64, end: u64) -> Vec<Check> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
    let mut checks = Vec::new();
    for index in cluster.up() {
        let node = &cluster.nodes[index];
        let mut problems = Vec::new();
        let mut figures = Vec::new();
        for (service, must) in &ledger.logs {
            match check_stored_logs(&http, &node.api(), service, (start, end), must).await {
                Ok(figure) => figures.push(format!("{service} {figure}")),
                Err(problem) => problems.push(format!("{service}: {problem}")),
            }
        }
        let name = format!("kept access logs through {}", node.name);
        checks.push(if problems.is_empty() {
            Check::new(name, true, figures.join(", "))
        } else {
            Check::new(name, false, problems.join("\n"))
        });
    }
    checks
}

/// Pricing on every member: one version and document, the last acknowledged write's (or a
/// later one of a write whose outcome was unknown: it may have been committed without answer).
pub async fn check_pricing(cluster: &Cluster, writes: &[ConfigWrite]) -> Check {
    let name = "pricing converged to the last acknowledged write";
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client");
    let Some(last) = writes.iter().rev().find(|w| w.version.is_some()) else {
        return Check::new(name, writes.is_empty(), format!("none of {} writes was acknowledged", writes.len()));
    };
    let last_version = last.version.expect("acknowledged");
    // Versions of acknowledged writes only grow.
    let versions: Vec<u64> = writes.iter().filter_map(|w| w.version).collect();
    if versions.windows(2).any(|w| w[0] >= w[1]) {
        return Check::new(name, false, format!("acknowledged versions do not grow: {versions:?}"));
    }
    // Members may apply the last commit a little later than the leader: wait up to 15 s.
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for index in cluster.up() {
            let node = &cluster.nodes[index];
            let result = async {
                let response = http.get(format!("{}/api/v1/config/pricing", node.api())).send().await?;
                response.json::<Value>().await
            }
            .await;
            match result {
                Ok(body) => seen.push((node.name.clone(), body["version"].as_u64(), body["document"].clone())),
                Err(e) => seen.push((node.name.clone(), None, Value::String(e.to_string()))),
            }
        }
        let same = seen.windows(2).all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2);
        let (version, document) = (seen[0].1, &seen[0].2);
        let price = config::price_of(document);
        let verdict = if !same {
            Err(format!("members differ: {seen:?}"))
        } else if version == Some(last_version) && price == Some(last.price) {
            Ok(format!("version {last_version}, price {} (write #{}) on {} members", last.price, last.seq, seen.len()))
        } else if version.is_some_and(|v| v > last_version)
            && writes.iter().any(|w| w.maybe_applied && Some(w.price) == price)
        {
            Ok(format!(
                "version {version:?} (> last acknowledged {last_version}), price {price:?} of a write whose \
                 outcome was unknown, on {} members",
                seen.len()
            ))
        } else {
            Err(format!(
                "every member has version {version:?} price {price:?}; the last acknowledged write is #{} \
                 version {last_version} price {}",
                last.seq, last.price
            ))
        };
        match verdict {
            Ok(detail) => return Check::new(name, true, detail),
            Err(problem) if started.elapsed() > Duration::from_secs(15) => return Check::new(name, false, problem),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A new export through every member is acknowledged and then counted exactly through every
/// member; a new pricing write is acknowledged and applied everywhere.
pub async fn check_new_writes(cluster: &Cluster, settings: &Settings, seed: u64) -> Vec<Check> {
    let mut checks = Vec::new();
    let targets: Vec<Target> = cluster
        .up()
        .iter()
        .map(|i| {
            let n = &cluster.nodes[*i];
            Target { name: n.name.clone(), grpc: n.grpc(), api: n.api() }
        })
        .collect();
    let service = "chaos-final";
    let now = chrono::Utc::now().timestamp() as u64;
    let time = now - 30;
    let mut rng = Xorshift::new(seed ^ 0xF1A1);
    let mut ledger = Ledger::default();
    let mut failures = Vec::new();
    for target in &targets {
        // Only this node: a retry would hide that it refused.
        let (_tx, only) = watch::channel(vec![target.clone()]);
        let mut pod = Pod::new(&format!("{service}-via-{}", target.name), time - 1);
        let metrics = export(service, Convention::AigwService, &mut [&mut pod], time, &mut rng);
        let logs = log_export(service, Convention::AigwService, &[&pod], time, &mut rng);
        let mut quick = settings.clone();
        quick.give_up = Duration::from_secs(10);
        for export in [metrics, logs] {
            let record = producer::send(&mut Clients::default(), &mut rng, &only, export, &quick).await;
            if record.outcome != Outcome::Acked || record.attempts > 1 {
                failures.push(format!(
                    "via {}: {} attempts, {:?}: {:?}",
                    target.name, record.attempts, record.outcome, record.failures
                ));
            }
            ledger.record(record);
        }
    }
    checks.push(Check::new(
        "a new export through every member is acknowledged at once",
        failures.is_empty(),
        if failures.is_empty() {
            format!("{} metrics and {} access-log exports", targets.len(), targets.len())
        } else {
            failures.join("; ")
        },
    ));
    let total = ledger.service_total(service);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
    let mut problems = Vec::new();
    for target in &targets {
        match query(&http, &target.api, REQUESTS, service, time - 600, now + 60).await {
            Ok(answer) => {
                let got: f64 = answer.points.values().sum();
                if let Err(problem) = within_bounds(got, total.acked_requests, total.unknown_requests) {
                    problems.push(format!("through {}: {problem}", target.name));
                }
                if let Some(missing) = answer.missing {
                    problems.push(format!("through {}: x-tollgate-missing-nodes: {missing}", target.name));
                }
            }
            Err(e) => problems.push(e),
        }
        let must = ledger.logs.get(service).cloned().unwrap_or_default();
        if let Err(problem) = check_stored_logs(&http, &target.api, service, (time - 600, now + 60), &must).await {
            problems.push(format!("logs through {}: {problem}", target.name));
        }
    }
    let kept = ledger.logs.get(service).map_or(0, |logs| logs.acked.len());
    checks.push(Check::new(
        "the new exports are counted and stored exactly through every member",
        problems.is_empty(),
        if problems.is_empty() {
            format!("{} requests, {kept} kept access logs", total.acked_requests)
        } else {
            problems.join("; ")
        },
    ));

    // A new pricing write through the first member, then applied on every member.
    let seq = 1_000_000;
    let first = &targets[0];
    let written = config::put_pricing(&http, &first.api, &config::document(seq)).await;
    let check = match written {
        Err((class, e)) => {
            Check::new("a new pricing write is acknowledged and applied", false, format!("{}: {e}", class.name()))
        }
        Ok(version) => {
            let write = ConfigWrite {
                seq,
                price: config::price(seq),
                version: Some(version),
                acked_by: Some(first.name.clone()),
                maybe_applied: false,
                failures: Vec::new(),
            };
            let mut check = check_pricing(cluster, &[write]).await;
            check.name = "a new pricing write is acknowledged and applied".into();
            check
        }
    };
    checks.push(check);
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn must() -> LogObligations {
        let set = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect::<BTreeSet<String>>();
        LogObligations { acked: set(&["a1", "a2"]), unknown: set(&["u1", "u2"]), dropped: set(&["d1"]) }
    }

    fn stored(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    #[test]
    fn test_judge_logs_passes_every_acknowledged_record_once_and_unknown_ones_at_most_once() {
        let figures = judge_logs(&must(), &stored(&["a2", "u1", "a1"])).unwrap();
        assert_eq!(figures, "3 stored: 2 acknowledged, 1 of 2 unknown");
        assert!(judge_logs(&must(), &stored(&["a1", "a2"])).is_ok());
    }

    #[test]
    fn test_judge_logs_names_lost_doubled_dropped_and_invented_records() {
        let problem = judge_logs(&must(), &stored(&["a1"])).unwrap_err();
        assert_eq!(problem, r#"1 acknowledged records lost (e.g. ["a2"])"#);
        let problem = judge_logs(&must(), &stored(&["a1", "a2", "u2", "u2"])).unwrap_err();
        assert_eq!(problem, r#"1 records stored more than once (e.g. ["u2"])"#);
        let problem = judge_logs(&must(), &stored(&["a1", "a2", "d1", "x9"])).unwrap_err();
        assert_eq!(
            problem,
            r#"1 records the rules drop were stored (e.g. ["d1"]); 1 records stored that were never sent (e.g. ["x9"])"#
        );
    }
}
