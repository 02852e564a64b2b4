//! The producers' obligations: what was acknowledged (must be counted exactly once) and what
//! has an unknown outcome (may be counted at most once), per (service, minute); and per service,
//! the access-log records to be stored exactly once (kept and acknowledged), at most once (kept
//! with an unknown outcome) or never (dropped by the rules).

use crate::export::LogEntry;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Tallies of one (service, minute).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Requests reported by acknowledged exports.
    pub acked_requests: u64,
    /// Input-token increase reported by acknowledged exports.
    pub acked_tokens: u64,
    /// Requests reported by exports with an unknown outcome.
    pub unknown_requests: u64,
    /// Input-token increase reported by exports with an unknown outcome.
    pub unknown_tokens: u64,
    /// Access-log records (kept or not) of acknowledged exports.
    pub acked_log_records: u64,
    /// Access-log records (kept or not) of exports with an unknown outcome.
    pub unknown_log_records: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.acked_requests += other.acked_requests;
        self.acked_tokens += other.acked_tokens;
        self.unknown_requests += other.unknown_requests;
        self.unknown_tokens += other.unknown_tokens;
        self.acked_log_records += other.acked_log_records;
        self.unknown_log_records += other.unknown_log_records;
    }
}

/// What one service's access logs must hold, by `x-request-id`.
#[derive(Clone, Debug, Default)]
pub struct LogObligations {
    /// Kept records of acknowledged exports: stored exactly once.
    pub acked: BTreeSet<String>,
    /// Kept records of exports with an unknown outcome: stored at most once.
    pub unknown: BTreeSet<String>,
    /// Records the rules drop, whatever the outcome: never stored.
    pub dropped: BTreeSet<String>,
}

/// How one export ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// OK without rejections: must be counted exactly once.
    Acked,
    /// Never acknowledged (given up after retries, or answered with rejections): at most once.
    Unknown,
}

/// One failed attempt, for the record.
#[derive(Clone, Debug, Serialize)]
pub struct FailedAttempt {
    /// The node asked.
    pub node: String,
    /// Milliseconds after the export's first attempt.
    pub at_ms: u64,
    /// How it failed (see [`AttemptClass`]).
    pub class: AttemptClass,
    /// The error.
    pub error: String,
}

/// How an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptClass {
    /// No connection: the request was not delivered.
    Unreachable,
    /// The node answered UNAVAILABLE / RESOURCE_EXHAUSTED (HTTP 503/429): retry.
    Refused,
    /// Timeout or connection lost mid-call: it may or may not have been applied.
    Unknown,
    /// Anything else (INTERNAL, INVALID_ARGUMENT, rejected points, other HTTP statuses).
    Unexpected,
}

impl AttemptClass {
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            AttemptClass::Unreachable => "unreachable",
            AttemptClass::Refused => "refused",
            AttemptClass::Unknown => "unknown-outcome",
            AttemptClass::Unexpected => "unexpected",
        }
    }
}

/// One export, as recorded in `ledger.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct ExportRecord {
    /// Service.
    pub service: String,
    /// Instances it carried.
    pub pods: Vec<String>,
    /// Unix seconds of its points.
    pub time: u64,
    /// Requests it reports.
    pub requests: u64,
    /// Input-token increase it reports.
    pub input_tokens: u64,
    /// Its access-log records (a logs export).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<LogEntry>,
    /// How it ended.
    pub outcome: Outcome,
    /// The node that acknowledged it.
    pub acked_by: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The failed ones.
    pub failures: Vec<FailedAttempt>,
    /// Milliseconds from the first attempt to the end.
    pub elapsed_ms: u64,
}

/// All obligations of a run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per (service, minute start in unix seconds).
    pub minutes: BTreeMap<(String, u64), Tally>,
    /// Per service: its access-log records.
    pub logs: BTreeMap<String, LogObligations>,
    /// Every export, in the order they ended.
    pub records: Vec<ExportRecord>,
    /// Failed attempts per class.
    pub failed_attempts: BTreeMap<AttemptClass, u64>,
    /// Messages of unexpected answers (the first ones).
    pub unexpected: Vec<String>,
}

impl Ledger {
    /// Records an export that ended.
    pub fn record(&mut self, record: ExportRecord) {
        let minute = record.time - record.time % 60;
        let tally = self.minutes.entry((record.service.clone(), minute)).or_default();
        let records = record.records.len() as u64;
        match record.outcome {
            Outcome::Acked => {
                tally.acked_requests += record.requests;
                tally.acked_tokens += record.input_tokens;
                tally.acked_log_records += records;
            }
            Outcome::Unknown => {
                tally.unknown_requests += record.requests;
                tally.unknown_tokens += record.input_tokens;
                tally.unknown_log_records += records;
            }
        }
        if !record.records.is_empty() {
            let logs = self.logs.entry(record.service.clone()).or_default();
            for entry in &record.records {
                let set = match (entry.kept, record.outcome) {
                    (false, _) => &mut logs.dropped,
                    (true, Outcome::Acked) => &mut logs.acked,
                    (true, Outcome::Unknown) => &mut logs.unknown,
                };
                set.insert(entry.id.clone());
            }
        }
        for failure in &record.failures {
            *self.failed_attempts.entry(failure.class).or_default() += 1;
            if failure.class == AttemptClass::Unexpected && self.unexpected.len() < 20 {
                self.unexpected
                    .push(format!("{} t={} via {}: {}", record.service, record.time, failure.node, failure.error));
            }
        }
        self.records.push(record);
    }

    /// Tallies of one service over all its minutes.
    pub fn service_total(&self, service: &str) -> Tally {
        let mut total = Tally::default();
        for ((s, _), tally) in &self.minutes {
            if s == service {
                total.add(tally);
            }
        }
        total
    }

    /// The services with exports.
    pub fn services(&self) -> Vec<String> {
        let mut services: Vec<String> = self.minutes.keys().map(|(s, _)| s.clone()).collect();
        services.dedup();
        services
    }

    /// Minutes of one service, in order.
    pub fn service_minutes(&self, service: &str) -> BTreeMap<u64, Tally> {
        self.minutes.iter().filter(|((s, _), _)| s == service).map(|((_, m), t)| (*m, *t)).collect()
    }

    /// Exports acknowledged / unknown / needing more than one attempt.
    pub fn counts(&self) -> (u64, u64, u64) {
        let acked = self.records.iter().filter(|r| r.outcome == Outcome::Acked).count() as u64;
        let unknown = self.records.len() as u64 - acked;
        let retried = self.records.iter().filter(|r| r.attempts > 1).count() as u64;
        (acked, unknown, retried)
    }

    /// Access-log exports and their records: (exports, records, kept records).
    pub fn log_counts(&self) -> (u64, u64, u64) {
        let exports = self.records.iter().filter(|r| !r.records.is_empty()).count() as u64;
        let records = self.records.iter().map(|r| r.records.len() as u64).sum();
        let kept = self.records.iter().flat_map(|r| &r.records).filter(|e| e.kept).count() as u64;
        (exports, records, kept)
    }
}

/// `Ok` when `got` lies in `[acked, acked + unknown]`, else what is wrong.
pub fn within_bounds(got: f64, acked: u64, unknown: u64) -> Result<(), String> {
    let low = acked as f64;
    let high = (acked + unknown) as f64;
    if got < low {
        Err(format!("{got} < {acked} acknowledged: {} acknowledged lost", low - got))
    } else if got > high {
        Err(format!("{got} > {acked} acknowledged + {unknown} unknown: {} counted twice or invented", got - high))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, time: u64, requests: u64, outcome: Outcome) -> ExportRecord {
        ExportRecord {
            service: service.into(),
            pods: vec!["p".into()],
            time,
            requests,
            input_tokens: requests * 10,
            records: Vec::new(),
            outcome,
            acked_by: None,
            attempts: 1,
            failures: Vec::new(),
            elapsed_ms: 0,
        }
    }

    #[test]
    fn test_ledger_tallies_per_service_and_minute() {
        let mut ledger = Ledger::default();
        ledger.record(record("a", 60, 3, Outcome::Acked));
        ledger.record(record("a", 119, 2, Outcome::Unknown));
        ledger.record(record("a", 120, 5, Outcome::Acked));
        ledger.record(record("b", 61, 7, Outcome::Acked));
        assert_eq!(ledger.services(), vec!["a", "b"]);
        let a = ledger.service_total("a");
        assert_eq!((a.acked_requests, a.unknown_requests, a.acked_tokens, a.unknown_tokens), (8, 2, 80, 20));
        let minutes = ledger.service_minutes("a");
        assert_eq!(minutes.keys().copied().collect::<Vec<_>>(), vec![60, 120]);
        assert_eq!(minutes[&60].unknown_requests, 2);
        assert_eq!(ledger.counts(), (3, 1, 0));
    }

    #[test]
    fn test_bounds_are_acked_to_acked_plus_unknown() {
        assert!(within_bounds(10.0, 10, 0).is_ok());
        assert!(within_bounds(12.0, 10, 2).is_ok());
        assert!(within_bounds(9.0, 10, 2).unwrap_err().contains("lost"));
        assert!(within_bounds(13.0, 10, 2).unwrap_err().contains("twice"));
    }

    #[test]
    fn test_log_records_are_sorted_by_what_the_store_must_hold() {
        let mut ledger = Ledger::default();
        let entry = |id: &str, kept| LogEntry { id: id.into(), kept };
        let mut acked = record("a", 60, 0, Outcome::Acked);
        acked.records = vec![entry("r1", true), entry("r2", false)];
        let mut unknown = record("a", 61, 0, Outcome::Unknown);
        unknown.records = vec![entry("r3", true), entry("r4", false), entry("r5", true)];
        ledger.record(acked);
        ledger.record(unknown);
        let logs = &ledger.logs["a"];
        let ids = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>();
        assert_eq!(ids(&logs.acked), vec!["r1"]);
        assert_eq!(ids(&logs.unknown), vec!["r3", "r5"]);
        assert_eq!(ids(&logs.dropped), vec!["r2", "r4"]);
        let minute = ledger.service_minutes("a")[&60];
        assert_eq!((minute.acked_log_records, minute.unknown_log_records), (2, 3));
        assert_eq!(ledger.log_counts(), (2, 5, 3));
    }
}
